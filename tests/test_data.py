"""Tests for data.py: tokenizers, corpus reading, the token cache, packing and batch schedules.

Every test makes its own small data (in tmp_path); nothing is downloaded.
"""
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

import data
from data import Schedule
from harness import prepare
from harness.checkpoint import config_to_dict, model_tokenizer
from harness.files import try_lock
from harness.prepare import Corpus, SyntheticConfig, load_corpus
from harness.tokenizer import TIKTOKEN_VOCAB, load_tokenizer, tiktoken_tokenizer
from model import preset
from scripts import one_line_error, script

EOS = 10**9  # a separator id no test token can equal
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def tok():
    return tiktoken_tokenizer()


def make_corpus(lengths) -> Corpus:
    """Documents of the given lengths whose tokens are all different (0, 1, 2, ...), so where
    every token ends up can be checked."""
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return Corpus("test", np.arange(offsets[-1], dtype=np.uint32), offsets, EOS)


LENGTHS = [3, 50, 1, 200, 17, 64, 130, 5, 300, 2, 90, 33, 7, 128, 45]  # 1075 tokens
L = 32


def write(path, content, mode="w"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, mode) as f:
        f.write(content)


# ---------------------------------------------------------------------------------------------
# Packing and batches

@pytest.mark.parametrize("strategy", ["concat", "eod", "adaptive"])
def test_packing_covers_every_token_once(strategy):
    c = make_corpus(LENGTHS)
    n_seq = data.num_sequences(c, L, strategy)
    stream = c.n_tokens + (c.n_docs if strategy == "eod" else 0)
    assert n_seq == stream // L and stream - n_seq * L < L  # only the last partial sequence is dropped
    seqs = [data.packed_sequence(c, i, L, strategy) for i in range(n_seq)]
    flat = np.concatenate([t for t, _ in seqs])
    text = flat[flat != EOS]
    # In order, every token once, nothing from outside the corpus
    assert np.array_equal(text, np.arange(len(text)))
    if strategy == "eod":  # a separator right after the last token of every whole document
        ends = np.flatnonzero(flat == EOS)
        assert np.array_equal(flat[ends - 1][ends > 0], c.offsets[1:len(ends) + 1][ends > 0] - 1)
    else:
        assert not (flat == EOS).any()


@pytest.mark.parametrize("strategy", ["concat", "eod", "adaptive"])
def test_doc_lens_match_source_documents_and_long_ones_are_chunked(strategy):
    c = make_corpus(LENGTHS)
    sep = strategy == "eod"
    doc_of = np.repeat(np.arange(c.n_docs), LENGTHS)  # the document of token t
    pieces = {}  # document -> lengths of its pieces, in order
    whole_sequences = 0
    for i in range(data.num_sequences(c, L, strategy)):
        tokens, lens = data.packed_sequence(c, i, L, strategy)
        assert sum(lens) == L and all(n > 0 for n in lens)
        whole_sequences += lens == [L]
        for piece in np.split(tokens, np.cumsum(lens)[:-1]):
            text = piece[piece != EOS]
            docs = set(doc_of[text].tolist())
            if not docs:  # under eod a piece can be just the separator of the previous document
                assert sep and len(piece) == 1
                pieces[last].append(1)
                continue
            assert len(docs) == 1  # a piece never mixes documents
            last = docs.pop()
            pieces.setdefault(last, []).append(len(piece))
            if sep and piece[-1] == EOS:  # the separator ends its own document
                assert text[-1] == c.offsets[last + 1] - 1
    for j, lens in pieces.items():
        if j < max(pieces):  # every document before the dropped tail is complete
            assert sum(lens) == LENGTHS[j] + sep
        assert max(lens) <= L
    assert len(pieces[8]) >= 300 // L  # the 300-token document is cut into chunks
    assert whole_sequences >= 300 // L - 1  # ... and fills whole sequences by itself


def all_indices(s: Schedule, step: int) -> list[list[int]]:
    return [data.sequence_indices(s, step, m, r) for m in range(s.grad_accum) for r in range(s.world_size)]


def test_epoch_visits_each_sequence_once_and_ranks_never_overlap():
    c = make_corpus(LENGTHS)
    s = Schedule(c, L, "adaptive", batch_size=2, grad_accum=1, world_size=3, seed=5)
    assert s.n_sequences == 33 and s.per_step == 6 and s.steps_per_epoch == 5
    for epoch in range(2):
        seen = []
        for step in range(epoch * 5, epoch * 5 + 5):
            per_rank = all_indices(s, step)
            flat = [i for r in per_rank for i in r]
            assert len(set(flat)) == len(flat) == 6  # no overlap between ranks
            seen += flat
        assert len(set(seen)) == len(seen) == 30  # no sequence twice in an epoch
        assert set(seen) <= set(range(33))  # 33 % 6 = 3 left over, documented
    # Each epoch is a different order of the sequences
    assert all_indices(s, 0) != all_indices(s, 5)
    # The tokens a whole epoch trains on are all different
    tokens = torch.cat([data.batch_for_step(s, step, 0, r)[0].flatten()
                        for step in range(5) for r in range(3)])
    assert len(torch.unique(tokens)) == len(tokens) == 30 * L


def test_batches_are_a_pure_function_of_step_and_rank():
    c = make_corpus(LENGTHS)
    a = Schedule(c, L, "eod", batch_size=2, grad_accum=2, world_size=2, seed=1)
    run = {(st, m, r): data.batch_for_step(a, st, m, r)
           for st in range(9) for m in range(2) for r in range(2)}
    # A restarted run: a new corpus object and schedule
    b = Schedule(make_corpus(LENGTHS), L, "eod", batch_size=2, grad_accum=2, world_size=2, seed=1)
    for st in (8, 3, 0, 6):  # any order, as a resumed run would ask
        for m in range(2):
            for r in range(2):
                ids, lens = data.batch_for_step(b, st, m, r)
                assert torch.equal(ids, run[st, m, r][0]) and lens == run[st, m, r][1]
    ids, lens = run[0, 0, 0]
    assert ids.dtype == torch.int64 and ids.shape == (2, L) and all(sum(x) == L for x in lens)
    other_seed = Schedule(c, L, "eod", batch_size=2, grad_accum=2, world_size=2, seed=2)
    assert [all_indices(other_seed, st) for st in range(4)] != [all_indices(a, st) for st in range(4)]


def test_ranks_and_accumulation_split_a_step_the_same_way():
    c = make_corpus(LENGTHS)
    two_ranks = Schedule(c, L, batch_size=3, world_size=2, seed=7)
    two_micro = Schedule(c, L, batch_size=3, grad_accum=2, seed=7)
    for step in range(4):
        assert [data.sequence_indices(two_ranks, step, 0, r) for r in range(2)] == \
               [data.sequence_indices(two_micro, step, m, 0) for m in range(2)]


def test_too_few_sequences_is_a_one_line_error_with_numbers():
    c = make_corpus(LENGTHS)
    with pytest.raises(ValueError, match=r"packs into 33 sequences of 32 tokens .* needs 40 \(4 processes x 2 "
                                         r"accumulation x 5 batch\)"):
        Schedule(c, L, batch_size=5, grad_accum=2, world_size=4)
    with pytest.raises(ValueError, match=r"packs into 0 sequences of 4096 tokens \(1075 tokens\)"):
        Schedule(c, 4096)
    with pytest.raises(ValueError, match="outside"):
        data.sequence_indices(Schedule(c, L, world_size=2), 0, 0, rank=2)


def test_long_documents_are_the_longest_first():
    c = make_corpus(LENGTHS)
    docs = data.long_documents(c, 100)
    assert docs == [8, 3, 6, 13] and [LENGTHS[j] for j in docs] == [300, 200, 130, 128]
    assert c.document(3).dtype == np.int64 and np.array_equal(c.document(3), np.arange(54, 254))
    assert len(data.long_documents(c, 100, limit=2)) == 2
    with pytest.raises(ValueError, match="the longest has 300"):
        data.long_documents(c, 301)


# ---------------------------------------------------------------------------------------------
# Reading folders and the cache

BOOKS = {
    "b.txt": "It was a bright cold day in April, and the clocks were striking thirteen.",
    "a.txt": "Call me Ishmael. Some years ago, never mind how long precisely, ...",
    "sub/c.txt": "Größe, naïve café: non-ASCII text is fine when it is UTF-8. " * 5,
}


def make_books(folder):
    for name, text in BOOKS.items():
        write(os.path.join(folder, name), text)


def test_txt_folder_is_tokenized_in_order_and_the_cache_reused(tmp_path, tok, monkeypatch):
    make_books(tmp_path / "books")
    cache = str(tmp_path / "cache")
    c = prepare.load_corpus(tok, str(tmp_path / "books"), heldout=0, cache_dir=cache, workers=1)
    assert not c.reused and c.n_docs == 3
    for j, name in enumerate(["a.txt", "b.txt", "sub/c.txt"]):  # sorted paths
        assert c.document(j).tolist() == tok.encode(BOOKS[name])
    assert c.names == ["a.txt", "b.txt", "sub/c.txt"]  # where each document came from
    stamp = os.stat(os.path.join(c.path, "tokens.bin")).st_mtime_ns

    def no_tokenizing(*a, **k):
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr(prepare, "tokenize_task", no_tokenizing)
    again = prepare.load_corpus(tok, str(tmp_path / "books"), heldout=0, cache_dir=cache, workers=1)
    assert again.reused and again.path == c.path
    assert os.stat(os.path.join(c.path, "tokens.bin")).st_mtime_ns == stamp
    s1, s2 = Schedule(c, 8, "eod", batch_size=2, seed=3), Schedule(again, 8, "eod", batch_size=2, seed=3)
    assert all(torch.equal(data.batch_for_step(s1, st)[0], data.batch_for_step(s2, st)[0]) for st in range(4))
    monkeypatch.undo()

    # Settings that change the tokens give a new cache: the held-out fraction, a file's content,
    # the tokenizer
    other = prepare.load_corpus(tok, str(tmp_path / "books"), heldout=0.5, cache_dir=cache, workers=1)
    assert not other.reused and other.path != c.path
    write(tmp_path / "books" / "b.txt", "A different book altogether, and longer than before.")
    edited = prepare.load_corpus(tok, str(tmp_path / "books"), heldout=0, cache_dir=cache, workers=1)
    assert not edited.reused and edited.path not in (c.path, other.path)
    assert edited.document(1).tolist() == tok.encode("A different book altogether, and longer than before.")
    json_tok = load_tokenizer(make_json_tokenizer(tmp_path / "ckpt"))
    by_json = prepare.load_corpus(json_tok, str(tmp_path / "books"), heldout=0, cache_dir=cache, workers=1)
    assert not by_json.reused and by_json.path != edited.path
    assert sorted(os.listdir(cache)) == sorted(os.path.basename(x.path) for x in (c, other, edited, by_json))


def test_an_interrupted_build_leaves_no_cache(tmp_path, tok, monkeypatch):
    make_books(tmp_path / "books")
    cache = tmp_path / "cache"
    real, calls = prepare.tokenize_task, []

    def fail_on_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("interrupted")
        return real(*a, **k)

    monkeypatch.setattr(prepare, "tokenize_task", fail_on_second)
    with pytest.raises(RuntimeError, match="interrupted"):
        prepare.load_corpus(tok, str(tmp_path / "books"), cache_dir=str(cache), workers=1)
    assert os.listdir(cache) == []  # neither a finished-looking cache nor a temporary directory
    monkeypatch.undo()
    c = prepare.load_corpus(tok, str(tmp_path / "books"), heldout=0, cache_dir=str(cache), workers=1)
    assert not c.reused and c.n_docs == 3


def test_parallel_build_equals_serial_build(tmp_path, tok):
    cfg = SyntheticConfig(seed=1, n_docs=250)  # 3 tasks of 100, 100, 50 documents
    serial = prepare.load_corpus(tok, synthetic=cfg, cache_dir=str(tmp_path / "a"), workers=1)
    parallel = prepare.load_corpus(tok, synthetic=cfg, cache_dir=str(tmp_path / "b"), workers=2)
    assert serial.n_docs > 200 and not parallel.reused
    assert np.array_equal(serial.offsets, parallel.offsets)
    assert np.array_equal(serial.tokens, parallel.tokens)
    assert serial.names == parallel.names and serial.names[:2] == ["synthetic document 0",
                                                                    "synthetic document 1"]


def test_bad_files_are_reported_and_skipped(tmp_path, tok, capsys):
    folder = tmp_path / "books"
    write(folder / "good.txt", "A perfectly good book.")
    write(folder / "latin1.txt", "caf\xe9 au lait".encode("latin-1"), "wb")
    write(folder / "empty.txt", "")
    write(folder / "blank.txt", "  \n\n ")
    os.symlink(folder / "nowhere.txt", folder / "gone.txt")  # unreadable, even for root
    write(folder / "notes.md", "ignored: not a .txt or .jsonl file")
    expected = {"latin1.txt": "not UTF-8", "empty.txt": "empty", "blank.txt": "empty",
                "gone.txt": "unreadable"}
    if os.geteuid() != 0:  # root reads anything, so this case only exists for other users
        write(folder / "secret.txt", "no permission")
        os.chmod(folder / "secret.txt", 0)
        expected["secret.txt"] = "unreadable"
    c = prepare.load_corpus(tok, str(folder), heldout=0, cache_dir=str(tmp_path / "cache"), workers=1)
    assert c.n_docs == 1 and c.document(0).tolist() == tok.encode("A perfectly good book.")
    assert c.n_skipped == len(c.skipped) == len(expected)
    reasons = dict(c.skipped)
    assert reasons.keys() == expected.keys()
    assert all(reasons[n].startswith(r) for n, r in expected.items()), reasons
    err = capsys.readouterr().err
    assert f"skipped {len(expected)} documents" in err and all(n in err for n in expected)
    prepare.load_corpus(tok, str(folder), heldout=0, cache_dir=str(tmp_path / "cache"), workers=1)
    assert "latin1.txt (not UTF-8 at byte 3)" in capsys.readouterr().err  # reported again when reused

    bad_only = tmp_path / "bad"
    write(bad_only / "empty.txt", "")
    with pytest.raises(ValueError, match=r"no usable documents .* 1 skipped: empty.txt \(empty\)"):
        prepare.load_corpus(tok, str(bad_only), cache_dir=str(tmp_path / "cache"), workers=1)
    with pytest.raises(ValueError, match="does not exist"):
        prepare.load_corpus(tok, str(tmp_path / "missing"), cache_dir=str(tmp_path / "cache"))
    write(tmp_path / "nothing" / "x.md", "no books")
    with pytest.raises(ValueError, match=r"no \.txt or \.jsonl files"):
        prepare.load_corpus(tok, str(tmp_path / "nothing"), cache_dir=str(tmp_path / "cache"))
    assert not any(".tmp-" in n for n in os.listdir(tmp_path / "cache"))


JSONL = [
    b'{"text": "First document."}',
    b'',
    b'{"text": "broken',
    b'{"id": 3}',
    b'{"text": ""}',
    b'{"text": "caf\xe9"}',
    b'{"text": "Second document, with more words in it.", "meta": 1}',
    b'{"text": "Third."}',
]
JSONL_TEXTS = ["First document.", "Second document, with more words in it.", "Third."]
JSONL_SKIPPED = [["x.jsonl line 3", "not JSON (Unterminated string starting at)"],
                 ["x.jsonl line 4", 'no "text" field'], ["x.jsonl line 5", "empty"],
                 ["x.jsonl line 6", "not UTF-8 text"]]


@pytest.mark.parametrize("chunk_bytes", [8 << 20, 20])  # one range, or one range per line or two
def test_jsonl_lines_are_documents(tmp_path, tok, monkeypatch, chunk_bytes):
    monkeypatch.setattr(prepare, "JSONL_CHUNK_BYTES", chunk_bytes)
    write(tmp_path / "d" / "x.jsonl", b"\n".join(JSONL) + b"\n", "wb")
    # no newline after the last line
    write(tmp_path / "d" / "y.jsonl", b'{"text": "Fourth."}\n[1, 2]\n{"text": "Fifth."}', "wb")
    c = prepare.load_corpus(tok, str(tmp_path / "d"), heldout=0, cache_dir=str(tmp_path / "cache"), workers=1)
    texts = JSONL_TEXTS + ["Fourth.", "Fifth."]
    assert [c.document(j).tolist() for j in range(c.n_docs)] == [tok.encode(t) for t in texts]
    # line numbers count across ranges, and start again in the next file
    assert c.skipped == JSONL_SKIPPED + [["y.jsonl line 2", "not a JSON object"]]
    assert c.names == ["x.jsonl line 1", "x.jsonl line 7", "x.jsonl line 8", "y.jsonl line 1",
                       "y.jsonl line 3"]


def test_split_folders_and_held_out_documents(tmp_path, tok):
    pg = tmp_path / "pg19"
    write(pg / "train" / "1.txt", "A training book.")
    write(pg / "validation" / "2.txt", "A validation book, quite different.")
    cache = str(tmp_path / "cache")
    train = prepare.load_corpus(tok, str(pg), "train", cache_dir=cache, workers=1)
    val = prepare.load_corpus(tok, str(pg), "validation", cache_dir=cache, workers=1)
    assert train.document(0).tolist() == tok.encode("A training book.")
    assert val.document(0).tolist() == tok.encode("A validation book, quite different.")
    assert train.n_docs == val.n_docs == 1 and "validation folder" in val.name
    with pytest.raises(ValueError, match="has no test/ folder"):
        prepare.load_corpus(tok, str(pg), "test", cache_dir=cache)

    # Without split folders, validation is a hashed fraction of the documents
    texts = [f"Document number {i} says {i * i}." for i in range(60)]
    write(tmp_path / "flat" / "all.jsonl", "\n".join(json.dumps({"text": t}) for t in texts))
    parts = {}
    for split in ("train", "validation"):
        c = prepare.load_corpus(tok, str(tmp_path / "flat"), split, heldout=0.3, cache_dir=cache, workers=1)
        parts[split] = [tok.decode(c.document(j)) for j in range(c.n_docs)]
    assert sorted(parts["train"] + parts["validation"]) == sorted(texts)  # disjoint, nothing lost
    assert 8 <= len(parts["validation"]) <= 30
    assert parts["validation"] == [t for t in texts if prepare.is_heldout(t, 0.3)]
    with pytest.raises(ValueError, match="--heldout is 0"):
        prepare.load_corpus(tok, str(tmp_path / "flat"), "validation", heldout=0, cache_dir=cache)


# ---------------------------------------------------------------------------------------------
# Tokenizers

TEXT = "Hello, wörld! 你好 <|endoftext|> and 12345 tabs\tand\nnewlines."


def test_tiktoken_round_trip_and_reserved_ids(tok):
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT
    assert max(ids) < TIKTOKEN_VOCAB  # "<|endoftext|>" in a book is text, not a special token
    assert (tok.eos_id, tok.mask_id) == (TIKTOKEN_VOCAB, TIKTOKEN_VOCAB + 1)
    assert tok.vocab_size == TIKTOKEN_VOCAB + 2
    # EOS, [MASK] and cl100k's unused ids are skipped, not an error
    assert tok.decode([tok.mask_id] + ids + [tok.eos_id, 100256, tok.mask_id]) == TEXT


def make_json_tokenizer(path, config=None) -> str:
    """A small byte-level BPE tokenizer.json, trained here, in a checkpoint-like directory."""
    from tokenizers import Tokenizer as HF
    from tokenizers import decoders, models, pre_tokenizers, trainers
    hf = HF(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator([TEXT, "the quick brown fox jumps over the lazy dog"] * 5, trainer=trainer)
    os.makedirs(path, exist_ok=True)
    hf.save(os.path.join(path, "tokenizer.json"))
    if config is not None:
        write(os.path.join(path, "config.json"), json.dumps(config))
    return str(path)


def test_tokenizer_json_from_a_checkpoint_directory(tmp_path):
    t = load_tokenizer(make_json_tokenizer(tmp_path / "llada", {"eos_token_id": 7, "mask_token_id": 9}))
    assert (t.eos_id, t.mask_id) == (7, 9) and t.fingerprint.startswith("json-")
    ids = t.encode(TEXT)
    assert t.decode(ids) == TEXT and len(ids) < len(TEXT.encode())  # merges were learned
    default = load_tokenizer(make_json_tokenizer(tmp_path / "noconfig"))
    assert (default.eos_id, default.mask_id) == (126081, 126336)  # LLaDA's, without a config.json
    assert default.vocab_size == 126337
    assert default.decode(ids + [126081, 126336]) == TEXT  # ids it does not know are skipped
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ValueError, match="has no tokenizer.json"):
        load_tokenizer(str(tmp_path / "empty"))


def test_load_tokenizer_for_presets_and_our_tiny_checkpoints(tmp_path):
    assert model_tokenizer("tiny").fingerprint == "tiktoken-cl100k_base"
    assert load_tokenizer("cl100k_base").eos_id == TIKTOKEN_VOCAB
    with pytest.raises(ValueError, match="preset llada-8b uses LLaDA's tokenizer.json"):
        model_tokenizer("llada-8b")
    with pytest.raises(ValueError, match="neither a preset"):
        model_tokenizer(str(tmp_path / "nope"))
    marked = {**config_to_dict(preset("tiny")), "tokenizer": "cl100k_base"}  # what train.py writes
    write(tmp_path / "tiny" / "config.json", json.dumps(marked))
    assert load_tokenizer(str(tmp_path / "tiny")).source == "cl100k_base"
    write(tmp_path / "old" / "config.json", json.dumps(config_to_dict(preset("tiny"))))  # no marker
    assert load_tokenizer(str(tmp_path / "old")).source == "cl100k_base"
    write(tmp_path / "llada" / "config.json", json.dumps(config_to_dict(preset("llada-8b"))))
    with pytest.raises(ValueError, match="has no tokenizer.json"):
        load_tokenizer(str(tmp_path / "llada"))


# ---------------------------------------------------------------------------------------------
# The synthetic corpus

FACT_RE = re.compile(r"The secret code of (\w+ \w+) is (\d+)\.")
QUESTION_RE = re.compile(r"What is the secret code of (\w+ \w+)\? It is (\d+)\.")


def test_synthetic_corpus_is_deterministic_long_and_asks_back_facts(tok):
    cfg = SyntheticConfig(seed=3, n_docs=150)
    texts = prepare.synthetic_texts(cfg)
    assert texts == prepare.synthetic_texts(SyntheticConfig(seed=3, n_docs=150))
    assert prepare.synthetic_texts(SyntheticConfig(seed=4, n_docs=150)) != texts
    assert prepare.synthetic_document(cfg, 77) == texts[77]  # any document on its own
    lengths = np.array([len(tok.encode(t)) for t in texts])
    assert (lengths >= 4000).sum() >= 3  # several thousand tokens, longer than a 2048 window
    assert (lengths < 512).mean() > 0.6  # and many short ones
    far = 0
    for text in texts:
        facts = {m.group(1): (m.group(2), m.end()) for m in FACT_RE.finditer(text)}
        questions = {m.group(1): (m.group(2), m.start()) for m in QUESTION_RE.finditer(text)}
        assert facts and facts.keys() == questions.keys()
        for name, (code, end) in facts.items():
            answer, start = questions[name]
            assert answer == code and start > end  # asked after it is stated, same answer
            if len(tok.encode(text[end:start])) > 2048:
                far += 1
    assert far >= 5  # some facts are asked for more than a 2048-token window later


def test_synthetic_corpus_is_labelled_and_split(tmp_path, tok):
    cfg = SyntheticConfig(seed=2, n_docs=120)
    train = prepare.load_corpus(tok, synthetic=cfg, cache_dir=str(tmp_path), workers=1)
    val = prepare.load_corpus(tok, split="validation", heldout=0.1, synthetic=cfg, cache_dir=str(tmp_path),
                           workers=1)
    assert train.name == "synthetic (built-in, seed 2, train)"
    assert val.name.startswith("synthetic (built-in, seed 2")
    assert 0 < val.n_docs < 30
    assert train.n_docs == 120 - sum(prepare.is_heldout(t, 0.02) for t in prepare.synthetic_texts(cfg))


@pytest.mark.parametrize("n", [0, 1, 2, 7, 100, 1000, 4096])
def test_filler_text_has_the_requested_token_length(tok, n):
    text = prepare.filler_text(n, tok, seed=n)
    assert len(tok.encode(text)) == n
    assert "secret" not in text
    assert prepare.filler_text(n, tok, seed=n) == text
    if n > 10:
        assert prepare.filler_text(n, tok, seed=n + 1) != text


def test_cli_prints_stats_and_one_line_errors(tmp_path, capsys):
    data.main(["--cache-dir", str(tmp_path), "--synthetic-docs", "40", "--seq-len", "256", "--workers", "1"])
    out = capsys.readouterr().out
    assert "corpus: synthetic (built-in, seed 0, train)" in out and "packed sequences of 256" in out
    for args, message in [(["--data", str(tmp_path / "missing")], r"--data .*missing does not exist; pass"),
                          (["--workers", "0"], "argument --workers: must be above 0, got 0"),
                          (["--synthetic-docs", "-5"], "argument --synthetic-docs: must be above 0"),
                          (["--seq-len", "1e3"], "argument --seq-len: '1e3' is not an integer")]:
        with pytest.raises(SystemExit) as exit_:
            data.main([*args, "--cache-dir", str(tmp_path)])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.count("\n") == 1, err  # no usage block
        assert re.match(f"^error: {message}", err), err


def data_py(*args, env=ENV, **popen):
    """data.py as a user runs it; a hang fails the test instead of holding it forever."""
    return subprocess.run([sys.executable, "data.py", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300, **popen)


def one_error_line(r, fragment: str, code: int = 2) -> None:
    assert r.returncode == code, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and r.stderr.count("error: ") == 1, r.stderr[-2000:]
    line = next(x for x in r.stderr.splitlines() if x.startswith("error: "))
    assert fragment in line, line


def test_files_that_are_not_regular_are_skipped_and_never_opened(tmp_path):
    make_books(tmp_path / "books")
    os.mkfifo(tmp_path / "books" / "aa.jsonl")  # sorts first: its read would block everything
    os.mkfifo(tmp_path / "books" / "zz.txt")
    cache = tmp_path / "cache"
    r = data_py("--data", tmp_path / "books", "--heldout", 0, "--cache-dir", cache, "--workers", 2)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "skipped 2 documents: aa.jsonl (a named pipe, not a regular file), zz.txt (a named " \
           "pipe, not a regular file)" in r.stderr
    assert "documents: 3," in r.stdout
    assert len(os.listdir(cache)) == 1 and not glob.glob(str(cache / "*.tmp-*"))
    one_error_line(data_py("--data", tmp_path / "books" / "zz.txt", "--cache-dir", cache),
                   "zz.txt is a named pipe, not a folder or a file")


def test_a_pipe_that_appears_after_the_listing_is_not_waited_for(tmp_path):
    pipe = str(tmp_path / "late.txt")
    os.mkfifo(pipe)
    said = []
    reader = threading.Thread(target=lambda: said.append(next(prepare.read_text_file(
        prepare.Task("text", pipe, "late.txt")))), daemon=True)
    reader.start()
    reader.join(30)
    if reader.is_alive():  # blocked in open(): give it a writer so the thread can end
        os.close(os.open(pipe, os.O_WRONLY | os.O_NONBLOCK))
    assert said == [("late.txt", None, "unreadable: a named pipe, not a regular file")]


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory, tok):
    folder = tmp_path_factory.mktemp("small_cache")
    c = prepare.load_corpus(tok, synthetic=SyntheticConfig(seed=4, n_docs=30), cache_dir=str(folder),
                            workers=1)
    return c.path


def damage_meta(d, change):
    with open(os.path.join(d, "meta.json")) as f:
        meta = json.load(f)
    with open(os.path.join(d, "meta.json"), "w") as f:
        json.dump(change(meta), f)


DAMAGE = {  # what a cache folder damaged from outside holds, and what the one line says
    "meta without a key": (lambda d: damage_meta(d, lambda m: {k: v for k, v in m.items()
                                                               if k != "skipped"}),
                           r"meta.json does not hold name \(str\), n_docs"),
    "meta a list": (lambda d: damage_meta(d, lambda m: [1, 2]), "meta.json does not hold"),
    "meta a bool count": (lambda d: damage_meta(d, lambda m: {**m, "n_skipped": True}),
                          "meta.json does not hold"),
    "meta nested too deep": (lambda d: write(os.path.join(d, "meta.json"), "[" * 100000 + "]" * 100000),
                             "meta.json or names.json is not valid JSON"),
    "names not a list": (lambda d: write(os.path.join(d, "names.json"), "{}"),
                         "names.json is not a list of"),
    "offsets garbage": (lambda d: write(os.path.join(d, "offsets.npy"), os.urandom(200), "wb"),
                        "offsets.npy is not a numpy array of offsets"),
    "offsets of objects": (lambda d: np.save(os.path.join(d, "offsets.npy"),
                                             np.array([0, "x"], dtype=object), allow_pickle=True),
                           "offsets.npy is not a numpy array of offsets"),
    "offsets decreasing": (lambda d: np.save(os.path.join(d, "offsets.npy"),
                                             np.load(os.path.join(d, "offsets.npy"))[::-1].copy()),
                           "offsets.npy is not"),
    "tokens cut mid-id": (lambda d: os.truncate(os.path.join(d, "tokens.bin"), 1001),
                          "tokens.bin is not a whole number of uint32 token ids"),
    "tokens cut short": (lambda d: os.truncate(os.path.join(d, "tokens.bin"), 1000),
                         "250 tokens, offsets say"),
    "ids past the vocabulary": (lambda d: np.full(os.path.getsize(os.path.join(d, "tokens.bin")) // 4,
                                                  4_000_000_000, np.uint32).tofile(os.path.join(d, "tokens.bin")),
                                "token id 4000000000 in tokens.bin, past the tokenizer's 100279 ids"),
    "no meta": (lambda d: os.remove(os.path.join(d, "meta.json")), "(no meta.json)"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_cache_is_one_line_that_names_the_file(tmp_path, tok, small_cache, damage):
    cache = tmp_path / "cache"
    shutil.copytree(os.path.dirname(small_cache), cache)
    folder = cache / os.path.basename(small_cache)
    do, message = DAMAGE[damage]
    do(str(folder))
    with pytest.raises(ValueError) as e:
        prepare.load_corpus(tok, synthetic=SyntheticConfig(seed=4, n_docs=30), cache_dir=str(cache),
                            workers=1)
    said = str(e.value)
    assert said.startswith(f"cache {folder} is damaged (") and said.endswith("; delete it and run again")
    assert re.search(message, said), said
    assert "pickle" not in said and "\n" not in said  # never the advice to unpickle it


def test_a_cache_file_that_is_a_pipe_is_not_read(tmp_path, small_cache):
    cache = tmp_path / "cache"
    shutil.copytree(os.path.dirname(small_cache), cache)
    meta = cache / os.path.basename(small_cache) / "meta.json"
    os.remove(meta)
    os.mkfifo(meta)
    r = data_py("--synthetic-seed", 4, "--synthetic-docs", 30, "--cache-dir", cache, "--workers", 1)
    one_error_line(r, "is damaged (meta.json is a named pipe); delete it and run again")


def test_json_nested_too_deeply_is_a_skipped_line(tmp_path, tok):
    write(tmp_path / "d" / "x.jsonl", '{"text": "One."}\n' + "[" * 100000 + "\n" + '{"text": "Two."}\n')
    c = prepare.load_corpus(tok, str(tmp_path / "d"), heldout=0, cache_dir=str(tmp_path / "cache"),
                            workers=1)
    assert c.names == ["x.jsonl line 1", "x.jsonl line 3"]
    assert c.skipped == [["x.jsonl line 2", "not JSON (nested too deeply)"]]


def test_documents_over_the_size_limit_are_skipped_and_never_read_whole(tmp_path, tok, monkeypatch):
    monkeypatch.setattr(prepare, "MAX_DOCUMENT_BYTES", 100)
    monkeypatch.setattr(prepare, "JSONL_CHUNK_BYTES", 64)
    folder = tmp_path / "d"
    write(folder / "big.txt", "word " * 40)  # 200 bytes: one document, over the limit
    write(folder / "small.txt", "A short book.")
    long_line = json.dumps({"text": "x" * 500})
    write(folder / "x.jsonl", f'{{"text": "First."}}\n{long_line}\n{{"text": "Third."}}\n'
                              f'{long_line}')  # the last line has no newline
    write(folder / "y.jsonl", "z" * 5000)  # no newline at all
    asked = []

    class Spy:  # the file reads, with the sizes asked for
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def read(self, n=-1):
            asked.append(n)
            return self.f.read(n)

        def readline(self, n=-1):
            asked.append(n)
            return self.f.readline(n)

        def __getattr__(self, name):
            return getattr(self.f, name)

    real = prepare.open_if_regular
    monkeypatch.setattr(prepare, "open_if_regular", lambda path: Spy(real(path)))
    c = prepare.load_corpus(tok, str(folder), heldout=0, cache_dir=str(tmp_path / "cache"), workers=1)
    assert c.names == ["small.txt", "x.jsonl line 1", "x.jsonl line 3"]
    assert [n for n, _ in c.skipped] == ["big.txt", "x.jsonl line 2", "x.jsonl line 4",
                                         "y.jsonl line 1"]
    assert c.skipped[0][1].startswith("larger than 0 MB (a .txt is one document")
    assert all(r == "longer than 0 MB" for _, r in c.skipped[1:])
    # every read was bounded (the small book's whole-file read aside): none held a long line
    assert -1 in asked and all(n == -1 or 0 < n <= 1 << 20 for n in asked), asked
    assert asked.count(-1) == 1


def test_a_synthetic_corpus_too_big_for_the_disk_is_refused_before_any_work(tmp_path):
    r = data_py("--synthetic-docs", 10**12, "--cache-dir", tmp_path / "cache")
    one_error_line(r, "a synthetic corpus of 1,000,000,000,000 documents needs about 3,300,000.0 GB")
    assert os.listdir(tmp_path) == []  # not even the cache folder


def test_ctrl_c_while_building_is_one_line_and_leaves_nothing(tmp_path):
    """As a terminal delivers Ctrl-C: to the whole process group, workers included."""
    cache = tmp_path / "cache"
    p = subprocess.Popen([sys.executable, "data.py", "--synthetic-docs", "20000", "--workers", "2",
                          "--cache-dir", str(cache)], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True,
                         # Ctrl-C as in a terminal's foreground job: a process started in the
                         # background (`cmd &` in a script) inherits SIGINT ignored, and so would
                         # data.py, which then rightly builds on
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 240
        # tokens are being written: the workers run and the parent collects their results
        while not any(os.path.getsize(f) for f in glob.glob(str(cache / "*.tmp-*" / "tokens.bin"))):
            assert p.poll() is None and time.time() < deadline, p.communicate()
            time.sleep(0.05)
        os.killpg(p.pid, signal.SIGINT)
        out, err = p.communicate(timeout=240)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 130, (out[-1000:], err[-2000:])
    assert err == "error: interrupted; no token cache was written\n"  # no worker's traceback
    assert os.listdir(cache) == []


def test_temporary_folders_of_killed_builds_are_removed(tmp_path, tok):
    cfg, cache = SyntheticConfig(seed=5, n_docs=20), str(tmp_path / "cache")
    path = prepare.load_corpus(tok, synthetic=cfg, cache_dir=cache, workers=1).path
    shutil.rmtree(path)
    killed, young, held = (f"{path}.tmp-{x}" for x in ("killed", "young", "held"))
    for folder in (killed, young, held):
        os.makedirs(folder)
        write(os.path.join(folder, "tokens.bin"), "partial")
    for folder in (killed, held):
        os.utime(folder, (time.time() - 3600, time.time() - 3600))
    lock = try_lock(os.path.join(held, prepare.BUILDING))  # a build still running, elsewhere
    try:
        c = prepare.load_corpus(tok, synthetic=cfg, cache_dir=cache, workers=1)
    finally:
        lock.close()
    assert not c.reused and c.path == path
    assert sorted(os.listdir(cache)) == sorted(os.path.basename(x) for x in (path, young, held))
    assert not os.path.exists(os.path.join(path, prepare.BUILDING))  # not part of the cache


def test_a_path_that_is_not_utf8_is_printed(tmp_path):
    folder = os.path.join(os.fsencode(tmp_path), b"bad\xffname")
    os.makedirs(folder)
    write(os.path.join(folder, b"book.txt"), "A book in a folder whose name is not UTF-8.")
    r = subprocess.run([sys.executable, b"data.py", b"--data", folder, b"--cache-dir",
                        os.path.join(os.fsencode(tmp_path), b"cache"), b"--workers", b"1"],
                       cwd=ROOT, env={**ENV, "PYTHONIOENCODING": "utf-8:strict"},
                       capture_output=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert b"corpus: " + os.fsencode(tmp_path) + b"/bad\\xffname (train" in r.stdout


@pytest.mark.parametrize("extra", [-1, 0, 1, 2])
def test_a_line_at_the_size_limit_is_read_and_the_next_one_kept(tmp_path, monkeypatch, extra):
    """A line of exactly MAX_DOCUMENT_BYTES (plus its newline) is a document; one byte more is
    skipped, and in neither case the line after it."""
    monkeypatch.setattr(prepare, "MAX_DOCUMENT_BYTES", 8)
    body = b"a" * (8 + extra)
    path = tmp_path / "x.jsonl"
    path.write_bytes(body + b"\nxy\nzz\n")
    with open(path, "rb") as f:
        lines = list(prepare.jsonl_lines(f, 0, path.stat().st_size))
    assert lines == [None if extra > 0 else body, b"xy", b"zz"]


def train_flags(books, cache, out, *extra):
    return ["--data", books, "--cache-dir", cache, "--out", str(out), "--seq-len", "128",
            "--warmup", "1", "--log-every", "1", *extra]


def test_a_token_cache_damaged_from_outside_is_named_before_training(tmp_path, books):
    cache = tmp_path / "cache"
    corpus = load_corpus(tiktoken_tokenizer(), books, cache_dir=str(cache), workers=1)
    tokens = np.memmap(os.path.join(corpus.path, "tokens.bin"), dtype=np.uint32, mode="r+")
    tokens[:] = 4_000_000_000  # past any vocabulary: the embedding would fail mid-step
    tokens.flush()
    out = tmp_path / "out"
    r = script("train.py", *train_flags(books, cache, out, "--max-steps", "1"))
    one_line_error(r, f"cache {corpus.path} is damaged (token id 4000000000 in tokens.bin, past "
                      f"the tokenizer's 100279 ids); delete it and run again")
    assert not out.exists()


def test_a_named_pipe_in_the_data_is_skipped_by_ppl(tmp_path, books, tiny_ckpt):
    data = tmp_path / "books"
    shutil.copytree(books, data)
    os.mkfifo(data / "aaa.txt")  # read first, it blocked the run forever
    r = script("evaluate.py", "--task", "ppl", "--model", tiny_ckpt, "--len", "128", "--draws",
               "1", "--data", data, "--cache-dir", tmp_path / "cache", "--results", tmp_path / "res")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "skipped 1 documents: aaa.txt (a named pipe, not a regular file)" in r.stderr
    assert os.listdir(tmp_path / "cache")[0].startswith("books-") and \
        len(os.listdir(tmp_path / "cache")) == 1  # no temporary folder left


def test_an_unwritable_token_cache_is_named(tmp_path, books):
    r = script("train.py", *train_flags(books, "/proc/ultrallada-cache", tmp_path / "out",
                                        "--max-steps", "1"))
    one_line_error(r, "cannot write the token cache in /proc/ultrallada-cache")


@pytest.mark.parametrize("args, fragment", [
    (["data.py", "--synthetic-docs", "0"], "--synthetic-docs: must be above 0"),
    (["data.py", "--synthetic-docs", "1000000000000"], "needs about 3,300,000.0 GB of token cache"),
    (["data.py", "--workers", "0"], "--workers: must be above 0"),
    (["data.py", "--data", "/no/such/books"], "--data /no/such/books does not exist"),
    (["data.py", "--heldout", "2"], "--heldout must be in [0, 1)"),
    (["data.py", "--cache-dir", "/proc/ultrallada-cache"], "cannot write the token cache"),
    (["data.py", "--split", "dev"], "argument --split: invalid choice: 'dev'"),
])
def test_data_cli_answers_bad_input_in_one_line(args, fragment):
    r = script(*args)
    one_line_error(r, fragment)
    assert "usage:" not in r.stderr and r.stdout == ""
