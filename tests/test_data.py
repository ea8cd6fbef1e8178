"""Tests for data.py and prepare.py: packing and batch schedules, reading folders and .jsonl
files into the token cache, the cache's manifest, the synthetic corpus, and data.py's command
line. Every test makes its own small data (in tmp_path); nothing is downloaded."""
import glob
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import data
from data import Schedule
from harness import prepare
from harness.prepare import Corpus, SyntheticConfig, load_corpus
from harness.tokenizer import load_tokenizer, tiktoken_tokenizer
from scripts import ENV, ROOT, one_line_error, script
from test_tokenizer import make_tokenizer

EOS = 10**9  # a separator id no test token can equal


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


def folders(cache) -> list[str]:
    """The cache folders in `cache`, not the lock files beside them."""
    return sorted(n for n in os.listdir(cache) if not n.endswith(".lock"))


# ---------------------------------------------------------------------------------------------
# Packing and batches

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
    # Too few sequences for one step is a one-line error with the numbers
    with pytest.raises(ValueError, match=r"packs into 33 sequences of 32 tokens .* needs 40 \(4 processes x 2 "
                                         r"accumulation x 5 batch\): shorter sequences, a smaller"):
        Schedule(c, L, batch_size=5, grad_accum=2, world_size=4)
    with pytest.raises(ValueError, match=r"packs into 0 sequences of 4096 tokens \(1075 tokens\)"):
        Schedule(c, 4096)


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
    assert any((ids == EOS).any() for ids, _ in run.values())  # eod separates by the corpus's EOS
    other_seed = Schedule(c, L, "eod", batch_size=2, grad_accum=2, world_size=2, seed=2)
    assert [all_indices(other_seed, st) for st in range(4)] != [all_indices(a, st) for st in range(4)]
    # 2 ranks x 1 micro step and 1 rank x 2 micro steps train on the same sequences
    two_ranks = Schedule(c, L, batch_size=3, world_size=2, seed=7)
    two_micro = Schedule(c, L, batch_size=3, grad_accum=2, seed=7)
    for step in range(4):
        assert [data.sequence_indices(two_ranks, step, 0, r) for r in range(2)] == \
               [data.sequence_indices(two_micro, step, m, 0) for m in range(2)]


def test_long_documents_are_the_longest_first():
    c = make_corpus(LENGTHS)
    docs = data.long_documents(c, 100)
    assert docs == [8, 3, 6, 13] and [LENGTHS[j] for j in docs] == [300, 200, 130, 128]
    assert c.document(3).dtype == np.int64 and np.array_equal(c.document(3), np.arange(54, 254))
    assert len(data.long_documents(c, 100, limit=2)) == 2
    with pytest.raises(ValueError, match="the longest has 300"):
        data.long_documents(c, 301)


# ---------------------------------------------------------------------------------------------
# Reading folders into the token cache

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
    c = load_corpus(tok, str(tmp_path / "books"), heldout=0, cache_dir=cache, workers=1)
    assert not c.reused and c.n_docs == 3
    for j, name in enumerate(["a.txt", "b.txt", "sub/c.txt"]):  # sorted paths
        assert c.document(j).tolist() == tok.encode(BOOKS[name])
    assert c.names == ["a.txt", "b.txt", "sub/c.txt"]  # where each document came from
    stamp = os.stat(os.path.join(c.path, "tokens.bin")).st_mtime_ns

    def no_tokenizing(*a, **k):
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr(prepare, "tokenize_task", no_tokenizing)
    again = load_corpus(tok, str(tmp_path / "books"), heldout=0, cache_dir=cache, workers=1)
    assert again.reused and again.path == c.path and again.names == c.names
    assert os.stat(os.path.join(c.path, "tokens.bin")).st_mtime_ns == stamp
    s1, s2 = Schedule(c, 8, "eod", batch_size=2, seed=3), Schedule(again, 8, "eod", batch_size=2, seed=3)
    assert all(torch.equal(data.batch_for_step(s1, st)[0], data.batch_for_step(s2, st)[0]) for st in range(4))
    monkeypatch.undo()

    # A build that fails midway (here at its second file) leaves nothing, not even the
    # temporary folder a build killed outright (kill -9) left before it; the next build works
    shutil.rmtree(c.path)
    write(c.path + ".tmp/tokens.bin", "partial")
    real, calls = prepare.tokenize_task, []

    def fail_on_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("interrupted")
        return real(*a, **k)

    monkeypatch.setattr(prepare, "tokenize_task", fail_on_second)
    with pytest.raises(RuntimeError, match="interrupted"):
        load_corpus(tok, str(tmp_path / "books"), heldout=0, cache_dir=cache, workers=1)
    assert folders(cache) == []
    monkeypatch.undo()
    rebuilt = load_corpus(tok, str(tmp_path / "books"), heldout=0, cache_dir=cache, workers=1)
    assert not rebuilt.reused and np.array_equal(rebuilt.tokens, c.tokens)

    # Settings that change the tokens give a new cache: the held-out fraction, a file's content,
    # the tokenizer
    other = load_corpus(tok, str(tmp_path / "books"), heldout=0.5, cache_dir=cache, workers=1)
    assert not other.reused and other.path != c.path
    write(tmp_path / "books" / "b.txt", "A different book altogether, and longer than before.")
    edited = load_corpus(tok, str(tmp_path / "books"), heldout=0, cache_dir=cache, workers=1)
    assert not edited.reused and edited.path not in (c.path, other.path)
    assert edited.document(1).tolist() == tok.encode("A different book altogether, and longer than before.")
    word_level = load_tokenizer(make_tokenizer(tmp_path / "ckpt"))
    by_json = load_corpus(word_level, str(tmp_path / "books"), heldout=0, cache_dir=cache, workers=1)
    assert not by_json.reused and by_json.path != edited.path
    assert folders(cache) == sorted(os.path.basename(x.path) for x in (c, other, edited, by_json))


def test_files_that_cannot_be_read_are_skipped_and_named(tmp_path, tok, capsys):
    folder = tmp_path / "books"
    write(folder / "good.txt", "A perfectly good book.")
    write(folder / "latin1.txt", "caf\xe9 au lait".encode("latin-1"), "wb")
    write(folder / "empty.txt", "")
    write(folder / "blank.txt", "  \n\n ")
    os.symlink(folder / "nowhere.txt", folder / "gone.txt")  # unreadable, even for root
    os.mkfifo(folder / "aa.jsonl")  # sorts first: a read would block everything
    os.mkfifo(folder / "zz.txt")
    write(folder / "notes.md", "ignored: not a .txt or .jsonl file")
    expected = {"aa.jsonl": "unreadable: a named pipe, not a regular file", "latin1.txt":
                "not UTF-8 at byte 3", "empty.txt": "empty", "blank.txt": "empty", "gone.txt":
                "unreadable: No such file", "zz.txt": "unreadable: a named pipe, not a regular file"}
    if os.geteuid() != 0:  # root reads anything, so this case only exists for other users
        write(folder / "secret.txt", "no permission")
        os.chmod(folder / "secret.txt", 0)
        expected["secret.txt"] = "unreadable: Permission denied"
    cache = str(tmp_path / "cache")
    c = load_corpus(tok, str(folder), heldout=0, cache_dir=cache, workers=2)
    assert c.n_docs == 1 and c.document(0).tolist() == tok.encode("A perfectly good book.")
    assert c.n_skipped == len(c.skipped) == len(expected)
    reasons = dict(c.skipped)
    assert reasons.keys() == expected.keys()
    assert all(reasons[n].startswith(r) for n, r in expected.items()), reasons
    err = capsys.readouterr().err
    assert f"skipped {len(expected)} documents" in err and all(n in err for n in expected)
    load_corpus(tok, str(folder), heldout=0, cache_dir=cache, workers=1)
    assert "latin1.txt (not UTF-8 at byte 3)" in capsys.readouterr().err  # reported again when reused
    assert folders(cache) == [os.path.basename(c.path)]  # no temporary folder left

    # A corpus of nothing readable, or of nothing at all, is one line
    write(tmp_path / "nothing" / "x.md", "no books")
    for corpus, says in [(folder / "zz.txt", r"1 skipped: zz.txt \(unreadable: a named pipe"),
                         (folder / "empty.txt", r"1 skipped: empty.txt \(empty\)"),
                         (tmp_path / "nothing", r"no usable documents in .*nothing")]:
        with pytest.raises(ValueError, match=says):
            load_corpus(tok, str(corpus), cache_dir=cache, workers=1)
    with pytest.raises(ValueError, match="does not exist; pass a folder"):
        load_corpus(tok, str(tmp_path / "missing"), cache_dir=cache)


JSONL = [
    b'{"text": "First document."}',
    b'',
    b'{"text": "broken',
    b'{"id": 3}',
    b'{"text": ""}',
    b'{"text": "caf\xe9"}',
    b'[' * 100000,
    b'{"text": "Second document, with more words in it.", "meta": 1}',
    b'{"text": "Third."}',
]


def test_jsonl_lines_are_documents_and_skipped_lines_are_named_by_number(tmp_path, tok):
    write(tmp_path / "d" / "x.jsonl", b"\n".join(JSONL) + b"\n", "wb")
    # no newline after the last line
    write(tmp_path / "d" / "y.jsonl", b'{"text": "Fourth."}\n[1, 2]\n{"text": "Fifth."}', "wb")
    c = load_corpus(tok, str(tmp_path / "d"), heldout=0, cache_dir=str(tmp_path / "cache"), workers=1)
    texts = ["First document.", "Second document, with more words in it.", "Third.", "Fourth.",
             "Fifth."]
    assert [c.document(j).tolist() for j in range(c.n_docs)] == [tok.encode(t) for t in texts]
    assert c.names == ["x.jsonl line 1", "x.jsonl line 8", "x.jsonl line 9", "y.jsonl line 1",
                       "y.jsonl line 3"]
    assert c.skipped == [["x.jsonl line 3", "not JSON (Unterminated string starting at)"],
                         ["x.jsonl line 4", 'no "text" field'], ["x.jsonl line 5", "empty"],
                         ["x.jsonl line 6", "not UTF-8 text"],
                         ["x.jsonl line 7", "not JSON (nested too deeply)"],
                         ["y.jsonl line 2", "not a JSON object"]]


def test_documents_over_the_size_limit_are_skipped_and_never_read_whole(tmp_path, tok, monkeypatch):
    """A line of exactly MAX_DOCUMENT_BYTES (plus its newline) is a document; one byte more is
    skipped, read in bounded pieces, and the line after it is still read."""
    monkeypatch.setattr(prepare, "MAX_DOCUMENT_BYTES", 20)
    folder = tmp_path / "d"
    write(folder / "big.txt", "word " * 5)  # 25 bytes: one document, over the limit
    write(folder / "small.txt", "A short book.")
    lines = [json.dumps({"text": "x" * n}) for n in (7, 8, 9, 10)]  # 19, 20, 21 and 22 bytes
    write(folder / "x.jsonl", "".join(f'{line}\n{{"text": "ok"}}\n' for line in lines)
          + json.dumps({"text": "y" * 50}))  # the last line, long, has no newline
    write(folder / "y.jsonl", "z" * 5000)  # no newline at all
    asked = []

    class Spy(io.BufferedReader):  # every read, with the size asked for
        def read(self, n=-1):
            asked.append(n)
            return super().read(n)

        def readline(self, n=-1):
            asked.append(n)
            return super().readline(n)

    real = prepare.open_if_regular
    monkeypatch.setattr(prepare, "open_if_regular",  # the corpus's files, not the cache's
                        lambda path: Spy(real(path).detach()) if str(folder) in path else real(path))
    c = load_corpus(tok, str(folder), heldout=0, cache_dir=str(tmp_path / "cache"), workers=1)
    assert c.names == ["small.txt"] + [f"x.jsonl line {n}" for n in (1, 2, 3, 4, 6, 8)]
    assert c.skipped == [["big.txt", "larger than 0 MB (a .txt is one document: split it, or "
                                     "make it a .jsonl)"]] + [
        [f"{name} line {n}", "longer than 0 MB"] for name, n in [("x.jsonl", 5), ("x.jsonl", 7),
                                                                ("x.jsonl", 9), ("y.jsonl", 1)]]
    # every read was bounded (the small book's whole-file read aside): none held a long line
    assert asked.count(-1) == 1 and all(n == -1 or 0 < n <= 1 << 20 for n in asked), asked


def test_split_folders_and_held_out_documents(tmp_path, tok):
    pg = tmp_path / "pg19"
    write(pg / "train" / "1.txt", "A training book.")
    write(pg / "validation" / "2.txt", "A validation book, quite different.")
    cache = str(tmp_path / "cache")
    train = load_corpus(tok, str(pg), "train", cache_dir=cache, workers=1)
    val = load_corpus(tok, str(pg), "validation", cache_dir=cache, workers=1)
    assert train.document(0).tolist() == tok.encode("A training book.")
    assert val.document(0).tolist() == tok.encode("A validation book, quite different.")
    assert train.n_docs == val.n_docs == 1 and "validation folder" in val.name
    with pytest.raises(ValueError, match=r"pg19 has no test split: it has train, validation$"):
        load_corpus(tok, str(pg), "test", cache_dir=cache)

    # Without split folders, validation is a hashed fraction of the documents
    texts = [f"Document number {i} says {i * i}." for i in range(60)]
    write(tmp_path / "flat" / "all.jsonl", "\n".join(json.dumps({"text": t}) for t in texts))
    parts = {}
    for split in ("train", "validation"):
        c = load_corpus(tok, str(tmp_path / "flat"), split, heldout=0.3, cache_dir=cache, workers=1)
        parts[split] = [tok.decode(c.document(j)) for j in range(c.n_docs)]
    assert sorted(parts["train"] + parts["validation"]) == sorted(texts)  # disjoint, nothing lost
    assert 8 <= len(parts["validation"]) <= 30
    assert parts["validation"] == [t for t in texts if prepare.is_heldout(t, 0.3)]
    # One rule for every split asked for that is not there; nothing is built for it
    before = folders(cache)
    for folder, split, heldout, says in [
            (tmp_path / "flat", "validation", 0, "flat has no validation split: it has train (validation "
                                                 "is the held-out fraction of its documents, 0)"),
            (tmp_path / "flat", "test", 0.02, "flat has no test split: it has train, validation ("),
            (None, "test", 0.02, "the synthetic corpus has no test split: it has train, validation (")]:
        with pytest.raises(ValueError, match=re.escape(says)):
            load_corpus(tok, folder and str(folder), split, heldout, cache_dir=cache)
    assert folders(cache) == before


# ---------------------------------------------------------------------------------------------
# The cache proves itself: manifest.json, written last, lists every file's size and SHA-256

def test_a_cache_changed_from_outside_is_one_line_saying_to_delete_it(tmp_path, tok):
    """Whatever changed in a cache folder (ids past the vocabulary, which would fail in the
    embedding mid-step; a cut file; an edited manifest; a named pipe, which would block the
    read forever), it is refused in one line before anything reads it."""
    cfg = SyntheticConfig(seed=4, n_docs=30)
    path = load_corpus(tok, synthetic=cfg, cache_dir=str(tmp_path / "good"), workers=1).path
    n_tokens = os.path.getsize(os.path.join(path, "tokens.bin")) // 4

    def edit_manifest(f):
        manifest = json.loads(f.read_text())
        f.write_text(json.dumps({**manifest, "n_skipped": True}))

    for i, (name, damage) in enumerate([
            ("tokens.bin", lambda f: np.full(n_tokens, 4_000_000_000, np.uint32).tofile(f)),
            ("tokens.bin", lambda f: os.truncate(f, 1001)),
            ("offsets.bin", lambda f: np.fromfile(f, np.int64)[::-1].tofile(f)),
            ("names.json", lambda f: f.write_text("{}")),
            ("tokens.bin", lambda f: (os.remove(f), os.mkfifo(f))),
            ("manifest.json", edit_manifest),
            ("manifest.json", lambda f: f.write_text("[" * 100000 + "]" * 100000)),
            ("manifest.json", os.remove),
            ("manifest.json", lambda f: (os.remove(f), os.mkfifo(f)))]):
        cache = tmp_path / f"copy{i}"
        shutil.copytree(tmp_path / "good", cache)
        folder = cache / os.path.basename(path)
        damage(folder / name)
        with pytest.raises(ValueError) as e:
            load_corpus(tok, synthetic=cfg, cache_dir=str(cache), workers=1)
        assert re.fullmatch(f"cache {folder} is damaged \\({name} [^\n]*\\); delete it and run "
                            f"again", str(e.value)), (name, str(e.value))


def test_a_damaged_cache_is_named_before_training_starts(tmp_path, books):
    corpus = load_corpus(tiktoken_tokenizer(), books, cache_dir=str(tmp_path / "cache"), workers=1)
    tokens = np.memmap(os.path.join(corpus.path, "tokens.bin"), dtype=np.uint32, mode="r+")
    tokens[:] = 4_000_000_000  # past any vocabulary: the embedding would fail mid-step
    tokens.flush()
    r = script("train.py", *train_flags(books, tmp_path / "cache", tmp_path / "out"))
    one_line_error(r, f"cache {corpus.path} is damaged (tokens.bin is not the one manifest.json "
                      f"lists); delete it and run again")
    assert not (tmp_path / "out").exists()
    r = script("train.py", *train_flags(books, "/proc/ultrallada-cache", tmp_path / "out"))
    one_line_error(r, "cannot write the token cache in /proc/ultrallada-cache")


def train_flags(books, cache, out):
    return ["--data", books, "--cache-dir", cache, "--out", out, "--seq-len", "128", "--warmup",
            "1", "--log-every", "1", "--max-steps", "1"]


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


def test_synthetic_corpus_is_labelled_split_and_the_same_built_by_any_number_of_workers(tmp_path, tok):
    cfg = SyntheticConfig(seed=2, n_docs=250)  # 3 tasks of 100, 100, 50 documents
    train = load_corpus(tok, synthetic=cfg, cache_dir=str(tmp_path / "a"), workers=1)
    val = load_corpus(tok, split="validation", heldout=0.1, synthetic=cfg, cache_dir=str(tmp_path / "a"),
                      workers=1)
    assert train.name == "synthetic (built-in, seed 2, train)"
    assert val.name.startswith("synthetic (built-in, seed 2") and 0 < val.n_docs < 60
    assert train.n_docs == 250 - sum(prepare.is_heldout(t, 0.02) for t in prepare.synthetic_texts(cfg))
    assert train.names[:2] == ["synthetic document 0", "synthetic document 1"]
    parallel = load_corpus(tok, synthetic=cfg, cache_dir=str(tmp_path / "b"), workers=2)
    assert not parallel.reused and parallel.names == train.names
    assert np.array_equal(train.offsets, parallel.offsets)
    assert np.array_equal(train.tokens, parallel.tokens)


@pytest.mark.parametrize("n", [0, 1, 2, 7, 100, 1000, 4096])
def test_filler_text_has_the_requested_token_length(tok, n):
    text = prepare.filler_text(n, tok, seed=n)
    assert len(tok.encode(text)) == n
    assert "secret" not in text
    assert prepare.filler_text(n, tok, seed=n) == text
    if n > 10:
        assert prepare.filler_text(n, tok, seed=n + 1) != text


def test_data_cli_prints_how_a_corpus_packs_and_answers_bad_input_in_one_line(tmp_path, books):
    r = script("data.py", "--cache-dir", tmp_path, "--synthetic-docs", 40, "--seq-len", 256,
               "--workers", 1)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "corpus: synthetic (built-in, seed 0, train)" in r.stdout
    assert "packed sequences of 256 (adaptive): " in r.stdout
    # A path that is not UTF-8 is printed with \xff escapes (a strict stdout refuses it as it is)
    folder = os.fsdecode(os.path.join(os.fsencode(tmp_path), b"bad\xffname"))
    write(os.path.join(folder, "book.txt"), "A book in a folder whose name is not UTF-8.")
    r = script("data.py", "--data", folder, "--cache-dir", tmp_path, "--workers", 1)
    assert r.returncode == 0 and f"corpus: {tmp_path}/bad\\xffname (train" in r.stdout, r.stderr
    for args, says in [
            (["--synthetic-docs", "0"], "argument --synthetic-docs: must be above 0"),
            (["--workers", "0"], "argument --workers: must be above 0, got 0"),
            (["--seq-len", "1e3"], "argument --seq-len: '1e3' is not an integer"),
            (["--heldout", "2"], "argument --heldout: must be at least 0 and at most 0.5, got 2"),
            (["--split", "dev"], "argument --split: invalid choice: 'dev'"),
            (["--data", "/no/such/books"], "--data /no/such/books does not exist"),
            (["--tokenizer", "/no/such"], "'/no/such' is neither cl100k_base nor a checkpoint"),
            (["--data", books, "--cache-dir", "/proc/ultrallada-cache"],
             "cannot write the token cache in /proc/ultrallada-cache"),
            # refused before any work: a typo of a few zeros would run for hours
            (["--synthetic-docs", 10**12, "--cache-dir", tmp_path / "new"],
             "argument --synthetic-docs: must be above 0 and at most 1e+06, got 1000000000000")]:
        r = script("data.py", *args)
        one_line_error(r, says)
        assert "usage:" not in r.stderr and r.stdout == ""
    assert not (tmp_path / "new").exists()  # not even the cache folder


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
        while not any(os.path.getsize(f) for f in glob.glob(str(cache / "*.tmp" / "tokens.bin"))):
            assert p.poll() is None and time.time() < deadline, p.communicate()
            time.sleep(0.05)
        os.killpg(p.pid, signal.SIGINT)
        out, err = p.communicate(timeout=240)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 130, (out[-1000:], err[-2000:])
    # no worker's traceback
    assert err == "error: interrupted; nothing half-written was left: run the same command again to go on\n"
    assert folders(cache) == []
