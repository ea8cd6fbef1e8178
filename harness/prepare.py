"""
prepare.py: from text files to a token cache: every document tokenized once, reused by later runs.

Harness, not part of the paper (data.py packs what this file prepares). Sources:

    folder     PG19's layout: one book per .txt, optionally in train/ validation/ test/
    .jsonl     one document a line, in a "text" field
    synthetic  with no --data: a corpus built from a seed [ours], so that the default run
               works on a fresh machine and a tiny model has something long-range to learn:
               facts stated early in a document ("The secret code of Mira Holt is 417.") are
               asked for thousands of tokens later

The cache is tokens.bin (every document back to back, uint32), offsets.npy (where each
starts), names.json (which file, or line of a .jsonl, each came from) and meta.json, built in
parallel worker processes in a temporary folder renamed into place, and keyed by the tokenizer,
the split and the files' sizes and times. What cannot be read is skipped and named in a warning:
files that are not UTF-8, unreadable or not regular files (a named pipe would block forever),
and documents over 256 MB (a worker holds about 8 bytes per byte while tokenizing).

Run `python data.py --help` to build a cache and print its statistics.
"""
import contextlib
import functools
import hashlib
import json
import math
import multiprocessing
import os
import random
import re
import shutil
import signal
import stat
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field

import numpy as np
from tqdm import tqdm

from harness.files import (FileError, file_kind, open_if_regular, parse_json_line, physical_memory,
                           publish_dir, read_json, try_lock, write_json)
from harness.tokenizer import Tokenizer, load_tokenizer

CACHE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "cache")
CACHE_VERSION = 2  # bump when the cache layout or the document reading rules change
SPLITS = ("train", "validation", "test")

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
# A worker holds about 8 bytes per byte of a document while tokenizing it (the ids as Python
# ints): longer documents are skipped, and a .txt that big is a corpus in one file, not a book.
MAX_DOCUMENT_BYTES = 256 << 20


@dataclass
class Task:
    reader: str  # key of READERS
    path: str
    name: str  # the file relative to the corpus folder, for reports
    start: int = 0  # byte range (jsonl) or document range (synthetic)
    end: int = 0
    synthetic: SyntheticConfig | None = None
    work: int = 0  # bytes or documents, for the progress bar
    why: str = ""  # reader "skip": why the file is not read


def read_text_file(task: Task):
    try:
        with open_if_regular(task.path) as f:
            if os.fstat(f.fileno()).st_size > MAX_DOCUMENT_BYTES:
                yield task.name, None, (f"larger than {MAX_DOCUMENT_BYTES >> 20} MB (a .txt is "
                                        f"one document: split it, or make it a .jsonl)")
                return
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


def jsonl_lines(f, start: int, end: int):
    """The lines of bytes [start, end) of an open file, as bytes.splitlines gives them (so \r
    ends a line too), read a line at a time: a line longer than MAX_DOCUMENT_BYTES comes as None
    and is never held whole."""
    f.seek(start)
    pos = start
    while pos < end:
        # the limit, one byte over it, and the newline: a line of the limit's size fits whole
        line = f.readline(min(MAX_DOCUMENT_BYTES + 2, end - pos))
        if not line:  # the file got shorter
            return
        pos += len(line)
        if len(line.removesuffix(b"\n")) > MAX_DOCUMENT_BYTES:
            if not line.endswith(b"\n"):  # only the start was read: skip to the next line
                pos = next_line_start(f, pos, end)
                f.seek(pos)
            yield None
        else:
            yield from line.splitlines()


def read_jsonl_chunk(task: Task):
    """Lines of one byte range. Names are (file, line within the range): the range's first line
    number is only known once the ranges before it are read, so the caller adds it."""
    try:
        with open_if_regular(task.path) as f:
            lines = list(enumerate(jsonl_lines(f, task.start, task.end)))
    except OSError as e:
        yield task.name, None, f"unreadable: {e.strerror or e}"
        return
    if task.start == 0 and all(line is not None and not line.strip() for _, line in lines):
        yield task.name, None, "empty"
        return
    for i, line in lines:
        name = (task.name, i)
        if line is None:
            yield name, None, f"longer than {MAX_DOCUMENT_BYTES >> 20} MB"
            continue
        if not line.strip():
            yield name, None, None  # a blank line is no document, but it still counts as a line
            continue
        obj, wrong = parse_json_line(line)
        if wrong:  # a corpus skips what it cannot read, and says so at the end
            yield name, None, wrong
            continue
        text = obj.get("text")
        if not isinstance(text, str):
            yield name, None, 'no "text" field'
        elif not text.strip():
            yield name, None, "empty"
        else:
            yield name, text, None


def skip_file(task: Task):
    yield task.name, None, task.why  # never opened: a named pipe would block the read forever


def read_synthetic(task: Task):
    for i in range(task.start, task.end):
        yield f"synthetic document {i}", synthetic_document(task.synthetic, i), None


READERS = {"text": read_text_file, "jsonl": read_jsonl_chunk, "synthetic": read_synthetic,
           "skip": skip_file}


def is_heldout(text: str, fraction: float) -> bool:
    """Held out for validation by a hash of the text: stable, needs no global view, and puts
    duplicate documents on the same side, so none leaks from training into validation."""
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")
    return h / 2**64 < fraction


@dataclass
class TaskResult:
    tokens: np.ndarray  # (n,) uint32: the kept documents back to back
    lengths: list[int]
    names: list  # of the kept documents: a file, (file, line within the range) or "synthetic ..."
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
    pieces, lengths, names, skipped, lines = [], [], [], [], 0
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
        names.append(name)
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, np.uint32)
    return TaskResult(tokens, lengths, names, skipped, lines, task.work)


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
    if not os.path.isdir(data):
        raise ValueError(f"--data {data} is {file_kind(os.stat(data).st_mode)}, not a folder or a "
                         f"file; pass a folder of .txt or .jsonl files")
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


def printable(path: str) -> str:
    """A path as it can be printed: bytes that are not UTF-8 (Python holds them as surrogates,
    which a strict stdout refuses to encode) shown as \\xff escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def file_signature(path: str) -> tuple[int, int, int]:
    """(size, modification time, mode); -1s for a file that cannot be looked at."""
    try:
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns, st.st_mode
    except OSError:
        return -1, -1, -1  # unreadable: it is reported when the cache is built


def next_line_start(f, pos: int, end: int) -> int:
    """Where the line holding byte `pos` of an open file ends (the next line starts), or `end`;
    read in blocks, so a file without newlines is never held whole."""
    f.seek(pos)
    while pos < end:
        block = f.read(min(1 << 20, end - pos))
        if not block:
            break
        newline = block.find(b"\n")
        if newline >= 0:
            return pos + newline + 1
        pos += len(block)
    return end


def jsonl_ranges(path: str, size: int) -> list[tuple[int, int]]:
    """Byte ranges of about JSONL_CHUNK_BYTES that start and end on line boundaries."""
    starts = [0]
    with open_if_regular(path) as f:
        while starts[-1] + JSONL_CHUNK_BYTES < size:
            start = next_line_start(f, starts[-1] + JSONL_CHUNK_BYTES, size)
            if start >= size:
                break
            starts.append(start)
    return list(zip(starts, starts[1:] + [size]))


def corpus_tasks(data: str | None, split: str, heldout: float, synthetic: SyntheticConfig):
    """(corpus name, cache key, cache directory label, tasks, heldout fraction or None)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if not 0 <= heldout < 1:
        raise ValueError(f"--heldout must be in [0, 1), got {heldout}")
    if data is None:
        if synthetic.n_docs < 1:
            raise ValueError(f"the synthetic corpus needs at least one document, got {synthetic.n_docs}")
        if split == "test":
            raise ValueError("the synthetic corpus has train and validation splits only")
        step = max(100, -(-synthetic.n_docs // 10_000))  # at most 10,000 tasks: they are cheap
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
        size, mtime, mode = file_signature(path)
        signatures.append([rel, size, mtime])
        if mode != -1 and not stat.S_ISREG(mode):  # reported as skipped, like unreadable files
            tasks.append(Task("skip", path, rel, why=f"{file_kind(mode)}, not a regular file"))
        elif path.endswith(".jsonl") and size > 0:
            try:
                ranges = jsonl_ranges(path, size)
            except OSError:  # gone or unreadable since it was listed: the worker says which
                ranges = [(0, size)]
            tasks += [Task("jsonl", path, rel, a, b, work=b - a) for a, b in ranges]
        else:
            tasks.append(Task("text" if path.endswith(".txt") else "jsonl", path, rel, 0, max(size, 0),
                              work=max(size, 0)))
    label = os.path.basename(os.path.abspath(data))
    if by_hash:
        share = f"{1 - heldout:.0%} of documents" if split == "train" else f"{heldout:.0%} held out"
        name = f"{printable(data)} ({split}: {share})"
    else:
        name = f"{printable(os.path.join(data, split))} ({split} folder)"
    key = {"folder": os.path.abspath(folder), "files": signatures}
    return name, key, label, tasks, heldout if by_hash else None


# ---------------------------------------------------------------------------------------------
# The token cache: tokens.bin (every document back to back, uint32: LLaDA's 126464 ids do not
# fit in 16 bits), offsets.npy ((n_docs + 1,) int64), names.json and meta.json. Built in a temporary
# directory and renamed into place, so a directory under its final name is always complete.

@dataclass
class Corpus:
    name: str  # says where the documents came from, "synthetic (built-in, seed 0, train)" etc.
    tokens: np.ndarray  # (n_tokens,) uint32, memory-mapped: every document back to back
    offsets: np.ndarray  # (n_docs + 1,) int64: document j is tokens[offsets[j]:offsets[j + 1]]
    eos_id: int  # the separator of the eod strategy
    path: str | None = None  # the cache directory
    reused: bool = False  # loaded from an existing cache, nothing tokenized
    # [name, reason] of the documents not read (the first 1000)
    skipped: list = field(default_factory=list)
    n_skipped: int = 0
    # document j came from names[j] ("b.txt", "x.jsonl line 3")
    names: list[str] = field(default_factory=list)

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
    reused = os.path.exists(path)  # a folder under its final name is complete (or damaged)
    if not reused:
        try:
            new_folder = not os.path.isdir(cache_dir)
            os.makedirs(cache_dir, exist_ok=True)
            if data is None:
                try:
                    check_synthetic_size(synthetic.n_docs, cache_dir)
                except ValueError:
                    if new_folder:  # refused before any work: nothing left behind either
                        os.rmdir(cache_dir)
                    raise
            build_cache(path, name, key, tasks, tokenizer, select, split != "train", workers,
                        progress)
        except OSError as e:  # a cache folder that cannot be created, a full disk
            raise FileError(f"cannot write the token cache in {cache_dir}: "
                            f"{e.strerror or e}; pass --cache-dir DIR") from None
    corpus = open_cache(path, tokenizer, reused)
    if corpus.n_skipped:
        report_skipped(corpus)
    return corpus


# What a synthetic cache costs, measured on the generator: about 800 tokens a document (4 bytes
# each in tokens.bin, plus its name in names.json), and about 200 bytes of the builder's memory
# (its length and name in Python lists).
SYNTHETIC_DISK_PER_DOC = 3300
SYNTHETIC_MEMORY_PER_DOC = 200


def check_synthetic_size(n_docs: int, cache_dir: str) -> None:
    """Refuse, before any work, a synthetic corpus whose cache cannot fit on the disk or whose
    build cannot fit in memory (a typo of a few zeros would otherwise run for hours)."""
    gb = 1e9
    disk, free = n_docs * SYNTHETIC_DISK_PER_DOC, shutil.disk_usage(cache_dir).free
    if disk > free:
        raise ValueError(f"a synthetic corpus of {n_docs:,} documents needs about {disk / gb:,.1f} "
                         f"GB of token cache (800 tokens a document), and {cache_dir} has "
                         f"{free / gb:,.1f} GB free; ask for fewer documents")
    memory = n_docs * SYNTHETIC_MEMORY_PER_DOC
    total = physical_memory()
    if memory > 0.8 * total:
        raise ValueError(f"a synthetic corpus of {n_docs:,} documents needs about "
                         f"{memory / gb:,.1f} GB of memory to build, and this machine has "
                         f"{total / gb:,.1f} GB; ask for fewer documents")


BUILDING = ".building"  # locked by the process that builds a temporary cache folder


@contextlib.contextmanager
def ctrl_c_ignored():
    """Ctrl-C (SIGINT) ignored inside. Processes started inside inherit it: the parent alone
    handles a Ctrl-C (stops the pool, removes the temporary folder, says one line), and no
    worker prints a traceback. signal() works in the main thread only; elsewhere Ctrl-C never
    arrives anyway."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def remove_abandoned(path: str, min_age_s: float = 60.0) -> None:
    """Remove the temporary folders of this cache that a killed build left (kill -9, a lost
    machine: no clean-up ran). A live build holds its folder's lock; a folder younger than
    min_age_s is left alone, since its builder may not have taken the lock yet."""
    parent, prefix = os.path.dirname(path) or ".", os.path.basename(path) + ".tmp-"
    for name in os.listdir(parent):
        folder = os.path.join(parent, name)
        try:
            if not name.startswith(prefix) or time.time() - os.stat(folder).st_mtime < min_age_s:
                continue
            lock = try_lock(os.path.join(folder, BUILDING))
        except (OSError, FileError):  # gone meanwhile, or another user's
            continue
        if lock is not None:
            shutil.rmtree(folder, ignore_errors=True)
            lock.close()


def build_cache(path: str, name: str, key: dict, tasks: list[Task], tokenizer: Tokenizer,
                heldout: float | None, want_heldout: bool, workers: int | None,
                progress: bool | None) -> None:
    remove_abandoned(path)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(path) + ".tmp-", dir=os.path.dirname(path) or ".")
    building = try_lock(os.path.join(tmp, BUILDING))  # held until published or removed
    started = time.time()
    workers = max(1, min(workers or os.cpu_count() or 1, len(tasks)))
    synthetic = tasks[0].reader == "synthetic"
    bar = tqdm(total=sum(t.work for t in tasks), unit="doc" if synthetic else "B", unit_scale=True,
               desc=f"tokenizing {name}", disable=None if progress is None else not progress)
    run = functools.partial(tokenize_task, heldout=heldout, want_heldout=want_heldout)
    pool, lengths, names, skipped, n_skipped, line_base = None, [], [], [], 0, 0
    try:
        with ctrl_c_ignored():  # map starts the worker processes
            if workers > 1:
                # spawn, not fork: a forked child inherits the parent's locks mid-use (torch's
                # thread pools, tqdm's monitor) and can hang, e.g. when training is started
                # from a process that already ran the model. An executor, not
                # multiprocessing.Pool: if a worker dies (out of memory), Pool waits forever,
                # an executor raises.
                pool = ProcessPoolExecutor(workers, multiprocessing.get_context("spawn"),
                                           init_worker, (tokenizer.source,))
            # map keeps the task order, so the cache is the same for any number of workers
            results = pool.map(run, tasks) if pool else (run(t, tokenizer=tokenizer) for t in tasks)
        with open(os.path.join(tmp, "tokens.bin"), "wb") as out:
            for task, result in zip(tasks, results):
                result.tokens.tofile(out)
                lengths += result.lengths
                line_base = 0 if task.start == 0 else line_base
                names += [document_name(doc, line_base) for doc in result.names]
                n_skipped += len(result.skipped)
                skipped += [[document_name(doc, line_base), reason]
                            for doc, reason in result.skipped[:MAX_SKIPPED_KEPT - len(skipped)]]
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
        write_json(os.path.join(tmp, "names.json"), names)
        meta = {"name": name, "tokenizer": tokenizer.name, "n_docs": len(lengths),
                "n_tokens": int(offsets[-1]), "n_skipped": n_skipped, "skipped": skipped,
                "build_seconds": round(time.time() - started, 2), "key": key}
        write_json(os.path.join(tmp, "meta.json"), meta)  # last: marks the cache complete
        # Published with its lock still held: a build that sees this folder before the rename
        # must not take it for an abandoned one (remove_abandoned) and delete it mid-rename.
        if publish_dir(tmp, path):  # False: another process finished the same cache first
            os.remove(os.path.join(path, BUILDING))  # the lock's file is not part of the cache
    except BrokenProcessPool:
        raise ValueError(f"a process tokenizing {name} died (out of memory?); free memory, or "
                         f"pass fewer --workers if the command has the flag") from None
    finally:
        with ctrl_c_ignored():  # a second Ctrl-C cutting this short hangs the exit, in the executor
            if pool is not None:
                pool.shutdown(cancel_futures=True)
            bar.close()
            building.close()
            if os.path.isdir(tmp):
                shutil.rmtree(tmp)


def document_name(doc, line_base: int) -> str:
    """A document's name for reports: jsonl lines come numbered within their byte range, so
    they are numbered in the file here."""
    return f"{doc[0]} line {line_base + doc[1] + 1}" if isinstance(doc, tuple) else doc


CACHE_FILES = ("meta.json", "names.json", "offsets.npy", "tokens.bin")


def open_cache(path: str, tokenizer: Tokenizer, reused: bool) -> Corpus:
    """The cache in `path`, checked: one edited, replaced or cut short from outside is a
    ValueError that names the file and says to delete the folder, never a crash mid-training
    (or, for token ids past the vocabulary, an index error in the embedding)."""
    def damaged(what: str) -> ValueError:
        return ValueError(f"cache {path} is damaged ({what}); delete it and run again")

    for name in CACHE_FILES:  # a named pipe would block the read below forever
        mode = file_signature(os.path.join(path, name))[2]
        if mode == -1 or not stat.S_ISREG(mode):
            raise damaged(f"no {name}" if mode == -1 else f"{name} is {file_kind(mode)}")
    try:
        meta, names = (read_json(os.path.join(path, n)) for n in ("meta.json", "names.json"))
    except (ValueError, RecursionError):  # FileError, or JSON nested past the recursion limit
        raise damaged("meta.json or names.json is not valid JSON") from None
    fields = {"name": str, "n_docs": int, "n_skipped": int, "skipped": list}
    if not isinstance(meta, dict) or any(type(meta.get(k)) is not t for k, t in fields.items()):
        wanted = ", ".join(f"{k} ({t.__name__})" for k, t in fields.items())
        raise damaged(f"meta.json does not hold {wanted}")
    if not (isinstance(names, list) and len(names) == meta["n_docs"]):
        raise damaged(f"names.json is not a list of {meta['n_docs']} names")
    try:
        offsets = np.load(os.path.join(path, "offsets.npy"), allow_pickle=False)
    except (ValueError, OSError, EOFError):  # not an .npy, or one of objects (pickled)
        raise damaged("offsets.npy is not a numpy array of offsets") from None
    try:
        tokens = np.memmap(os.path.join(path, "tokens.bin"), dtype=np.uint32, mode="r")
    except (ValueError, OSError):  # empty, or not a whole number of uint32
        raise damaged("tokens.bin is not a whole number of uint32 token ids") from None
    if offsets.dtype != np.int64 or offsets.shape != (meta["n_docs"] + 1,) or offsets[0] != 0 \
            or (np.diff(offsets) < 0).any():
        raise damaged(f"offsets.npy is not {meta['n_docs'] + 1} increasing int64 offsets")
    if len(tokens) != offsets[-1]:
        raise damaged(f"{len(tokens)} tokens, offsets say {offsets[-1]}")
    # Ids past the vocabulary only come from outside (this tokenizer made the ones it built)
    if reused and (top := max_token(tokens)) >= tokenizer.vocab_size:
        raise damaged(f"token id {top} in tokens.bin, past the tokenizer's "
                      f"{tokenizer.vocab_size} ids")
    return Corpus(meta["name"], tokens, offsets, tokenizer.eos_id, path, reused, meta["skipped"],
                  meta["n_skipped"], names)


def max_token(tokens: np.ndarray, chunk: int = 1 << 26) -> int:
    """The largest id in a memory-mapped token file, a chunk (256 MB) at a time."""
    return max((int(tokens[i:i + chunk].max()) for i in range(0, len(tokens), chunk)), default=0)


def report_skipped(corpus: Corpus, shown: int = 10) -> None:
    names = ", ".join(f"{n} ({r})" for n, r in corpus.skipped[:shown])
    more = f" and {corpus.n_skipped - shown} more (see {corpus.path}/meta.json)" \
        if corpus.n_skipped > shown else ""
    print(f"warning: {corpus.name}: skipped {corpus.n_skipped} documents: {names}{more}",
          file=sys.stderr)


