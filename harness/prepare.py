"""
prepare.py: from text files to a token cache: every document tokenized once, reused by later runs.

Harness, not part of the paper (data.py packs what this file prepares). Sources:

    folder     PG19's layout: one book per .txt, optionally in train/ validation/ test/
    .jsonl     one document a line, in a "text" field
    synthetic  with no --data: a corpus built from a seed [ours], so that the default run
               works on a fresh machine and a tiny model has something long-range to learn:
               facts stated early in a document ("The secret code of Mira Holt is 417.") are
               asked for thousands of tokens later

The cache is one folder per corpus, named by its key (the tokenizer, the split, the files'
sizes and times), built as NAME.tmp under a lock and renamed into place; its manifest.json,
written last, proves it whole. What cannot be read is skipped and named in a warning: files
that are not UTF-8, unreadable or not regular files, and documents over 256 MB.

Run `python data.py --help` to build a cache and print its statistics.
"""
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
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field

import numpy as np
from tqdm import tqdm

from harness.files import (FileError, open_if_regular, parse_json_line, read_json, wait_for_lock,
                           write_json)
from harness.tokenizer import Tokenizer, load_tokenizer

CACHE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "cache")
CACHE_VERSION = 3  # bump when the cache layout or the document reading rules change
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
# Reading documents, in worker processes, one task each: a file (a .txt is one document, a
# .jsonl one document a line) or a range of synthetic documents. A worker writes each
# document's tokens to its task's part file as it goes, so it holds one document at a time,
# however large the file. Every file is opened by open_if_regular, which refuses a named pipe
# or a device instead of blocking on it: like an unreadable file, it is skipped.

# A worker holds about 8 bytes per byte of a document while tokenizing it (the ids as Python
# ints): longer documents are skipped, and a .txt that big is a corpus in one file, not a book.
MAX_DOCUMENT_BYTES = 256 << 20
MAX_SKIPPED_KEPT = 1000  # skipped documents named in the manifest


@dataclass
class Task:
    name: str  # the file relative to the corpus folder, for reports
    path: str  # "" for synthetic documents
    size: int  # the file's bytes, or the number of synthetic documents (the progress bar's unit)
    start: int = 0  # the first synthetic document
    synthetic: SyntheticConfig | None = None


def read_book(path: str) -> tuple[str | None, str | None]:
    """A .txt file as one document: (its text, None), or (None, why it is skipped)."""
    try:
        with open_if_regular(path) as f:
            if os.fstat(f.fileno()).st_size > MAX_DOCUMENT_BYTES:
                return None, (f"larger than {MAX_DOCUMENT_BYTES >> 20} MB (a .txt is one "
                              f"document: split it, or make it a .jsonl)")
            text = f.read().decode("utf-8-sig")  # -sig: a byte-order mark is not part of the book
    except OSError as e:
        return None, f"unreadable: {e.strerror or e}"
    except UnicodeDecodeError as e:
        return None, f"not UTF-8 at byte {e.start}"
    return (text, None) if text.strip() else (None, "empty")


def jsonl_documents(path: str, name: str):
    """("NAME line N", its "text", None) for each line of a .jsonl file, or (where, None, why
    it is skipped); a blank line is no document: (where, None, None). A line over the size
    limit is read on past in bounded pieces, never held whole."""
    try:
        with open_if_regular(path) as f:
            # the limit and its newline: a line of the limit's size fits whole
            for i, line in enumerate(iter(lambda: f.readline(MAX_DOCUMENT_BYTES + 1), b""), 1):
                text, why = None, None
                if len(line) > MAX_DOCUMENT_BYTES and not line.endswith(b"\n"):
                    while (piece := f.readline(1 << 20)) and not piece.endswith(b"\n"):
                        pass
                    why = f"longer than {MAX_DOCUMENT_BYTES >> 20} MB"
                elif line.strip():  # a bad line is skipped, and said
                    obj, why = parse_json_line(line.rstrip(b"\r\n"))
                    text = None if why else obj.get("text")
                    if why is None and not (isinstance(text, str) and text.strip()):
                        why = "empty" if isinstance(text, str) else 'no "text" field'
                yield f"{name} line {i}", None if why else text, why
    except OSError as e:
        yield name, None, f"unreadable: {e.strerror or e}"


def is_heldout(text: str, fraction: float) -> bool:
    """Held out for validation by a hash of the text: stable, needs no global view, and puts
    duplicate documents on the same side, so none leaks from training into validation."""
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")
    return h / 2**64 < fraction


_worker_tokenizer = None  # each worker process builds its tokenizer once, in init_worker


def init_worker(source: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = load_tokenizer(source)
    # A worker starts with Ctrl-C ignored (build_cache), so none prints a traceback while it
    # starts; from here on Ctrl-C ends it at once and silently: the parent says the one line.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def tokenize_task(task: Task, part: str, heldout: float | None, want_heldout: bool,
                  tokenizer: Tokenizer | None = None):
    """Read, select (heldout=None keeps every document) and tokenize the documents of a task,
    their tokens written back to back (uint32) to the file `part`: (their lengths; their
    names; [name, why] of the first skipped ones; how many were skipped)."""
    if task.synthetic:
        docs = ((f"synthetic document {i}", synthetic_document(task.synthetic, i), None)
                for i in range(task.start, task.start + task.size))
    else:
        docs = [(task.name, *read_book(task.path))] if task.path.endswith(".txt") \
            else jsonl_documents(task.path, task.name)
    lengths, names, skipped, n_skipped = [], [], [], 0
    with open(part, "wb") as out:
        for name, text, why in docs:
            if why:  # the first ones named: a wrong field name in a big .jsonl skips millions
                skipped += [[name, why]] if len(skipped) < MAX_SKIPPED_KEPT else []
                n_skipped += 1
            elif text is not None and (heldout is None or is_heldout(text, heldout) == want_heldout):
                tokens = np.asarray((tokenizer or _worker_tokenizer).encode(text), np.uint32)
                tokens.tofile(out)
                lengths.append(len(tokens))
                names.append(name)
    return lengths, names, skipped, n_skipped


def printable(path: str) -> str:
    """A path as it can be printed: bytes that are not UTF-8 (Python holds them as surrogates,
    which a strict stdout refuses to encode) shown as \\xff escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def corpus_tasks(data: str | None, split: str, heldout: float, synthetic: SyntheticConfig):
    """(corpus name, cache key, cache folder label, tasks, held-out fraction or None: a split
    folder is taken whole)."""
    assert split in SPLITS and 0 <= heldout < 1, (split, heldout)
    if data is not None and not os.path.exists(data):
        raise ValueError(f"--data {data} does not exist; pass a folder of .txt or .jsonl files, "
                         f"or leave --data out for the synthetic corpus")
    present = [s for s in SPLITS if data is not None and os.path.isdir(os.path.join(data, s))]
    have = present or ["train", "validation"][:1 + (heldout > 0)]
    if split not in have:
        raise ValueError(f"{data or 'the synthetic corpus'} has no {split} split: it has "
                         f"{', '.join(have)}" + ("" if present else f" (validation is the "
                                                 f"held-out fraction of its documents, {heldout:g})"))
    if data is None:
        tasks = [Task("synthetic", "", min(100, synthetic.n_docs - i), i, synthetic)
                 for i in range(0, synthetic.n_docs, 100)]
        key = {"synthetic": asdict(synthetic), "generator": SYNTHETIC_VERSION}
        return (f"synthetic (built-in, seed {synthetic.seed}, {split})", key,
                f"synthetic-seed{synthetic.seed}", tasks, heldout)
    if os.path.isdir(data):
        folder, files = os.path.join(data, split) if present else data, []
        for root, dirs, names in os.walk(folder):
            dirs.sort()
            files += [os.path.join(root, n) for n in sorted(names) if n.endswith((".txt", ".jsonl"))]
    else:  # one file (a named pipe is skipped when it is read)
        folder, files = os.path.dirname(os.path.abspath(data)), [os.path.abspath(data)]
    tasks, signatures = [], []
    for path in files:
        try:
            stat = os.stat(path)
        except OSError:  # gone or unreadable: reported as skipped when the cache is built
            stat = os.stat_result((0,) * 10)
        tasks.append(Task(os.path.relpath(path, folder), path, stat.st_size))
        signatures.append([tasks[-1].name, stat.st_size, stat.st_mtime_ns])
    if present:
        name = f"{printable(os.path.join(data, split))} ({split} folder)"
    else:
        share = f"{1 - heldout:.0%} of documents" if split == "train" else f"{heldout:.0%} held out"
        name = f"{printable(data)} ({split}: {share})"
    key = {"folder": os.path.abspath(folder), "files": signatures}
    return name, key, os.path.basename(os.path.abspath(data)), tasks, None if present else heldout


# ---------------------------------------------------------------------------------------------
# The token cache: tokens.bin ((n_tokens,) uint32: LLaDA's 126464 ids do not fit in 16 bits),
# offsets.bin ((n_docs + 1,) int64), names.json, and manifest.json last. Raw arrays and JSON:
# nothing in the folder can run code when it is read.

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
    tok_label = tokenizer.fingerprint.split("-")[-1][:11]
    dirname = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{label}-{split}-{tok_label}-{digest(key)[:16]}")
    path = os.path.join(cache_dir, dirname)
    reused = os.path.isdir(path)
    if not reused:
        try:
            os.makedirs(cache_dir, exist_ok=True)
            # one builder at a time: the others wait, and then find the cache built
            with wait_for_lock(path + ".lock", f"building the token cache {path}"):
                reused = os.path.isdir(path)
                if not reused:
                    build_cache(path, name, key, tasks, tokenizer, select, split != "train",
                                workers, progress)
        except OSError as e:  # a cache folder that cannot be created, a full disk
            raise FileError(f"cannot write the token cache in {cache_dir}: "
                            f"{e.strerror or e}; pass --cache-dir DIR") from None
    manifest = read_manifest(path, key)
    with open_if_regular(os.path.join(path, "tokens.bin")) as f:
        tokens = np.memmap(f, dtype=np.uint32, mode="r")
    with open_if_regular(os.path.join(path, "offsets.bin")) as f:
        offsets = np.fromfile(f, dtype=np.int64)
    if manifest["n_skipped"]:
        shown = ", ".join(f"{n} ({r})" for n, r in manifest["skipped"][:10])
        print(f"warning: {manifest['name']}: skipped {manifest['n_skipped']} documents: {shown}"
              f"{' ... (all in ' + path + '/manifest.json)' if manifest['n_skipped'] > 10 else ''}",
              file=sys.stderr)
    return Corpus(manifest["name"], tokens, offsets, tokenizer.eos_id, path, reused,
                  manifest["skipped"], manifest["n_skipped"],
                  read_json(os.path.join(path, "names.json")))


def build_cache(path: str, name: str, key: dict, tasks: list[Task], tokenizer: Tokenizer,
                heldout: float | None, want_heldout: bool, workers: int | None,
                progress: bool | None) -> None:
    """Tokenize the tasks into PATH.tmp (each into a part file, appended to tokens.bin in task
    order, so the cache is the same for any number of workers), write the manifest last and
    rename the folder into place. The caller holds the cache's lock: a PATH.tmp already there
    is a killed build's. A Ctrl-C is a KeyboardInterrupt here, which removes PATH.tmp."""
    tmp, started = path + ".tmp", time.time()
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    parts = [os.path.join(tmp, f"part{i}.bin") for i in range(len(tasks))]
    workers = min(workers or os.cpu_count() or 1, len(tasks))
    bar = tqdm(total=sum(t.size for t in tasks), unit_scale=True, desc=f"tokenizing {name}",
               unit="doc" if tasks and tasks[0].synthetic else "B",
               disable=None if progress is None else not progress)
    run = functools.partial(tokenize_task, heldout=heldout, want_heldout=want_heldout)
    pool, results = None, (run(t, p, tokenizer=tokenizer) for t, p in zip(tasks, parts))
    lengths, names, skipped, n_skipped = [], [], [], 0
    try:
        if workers > 1:
            # spawn, not fork: a forked child inherits the parent's locks mid-use (torch's
            # thread pools, tqdm's monitor) and can hang, e.g. when training is started from a
            # process that already ran the model. An executor, not multiprocessing.Pool: if a
            # worker dies (out of memory), Pool waits forever, an executor raises.
            interrupt = signal.signal(signal.SIGINT, signal.SIG_IGN)  # the workers inherit it
            try:
                pool = ProcessPoolExecutor(workers, multiprocessing.get_context("spawn"),
                                           init_worker, (tokenizer.source,))
                results = pool.map(run, tasks, parts)  # starts the workers
            finally:
                signal.signal(signal.SIGINT, interrupt)
        with open(os.path.join(tmp, "tokens.bin"), "wb") as out:
            for task, part, (task_lengths, task_names, task_skipped, task_n_skipped) in zip(
                    tasks, parts, results):
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out)
                os.remove(part)
                lengths += task_lengths
                names += task_names
                skipped += task_skipped[:MAX_SKIPPED_KEPT - len(skipped)]
                n_skipped += task_n_skipped
                bar.update(task.size)
        if not lengths:
            shown = "; ".join(f"{n} ({r})" for n, r in skipped[:5])
            raise ValueError(f"no usable documents in {name}" + (f": {n_skipped} skipped: {shown}"
                                                                 if skipped else "")
                             + "; pass --data a folder of UTF-8 .txt or .jsonl files")
        offsets = np.cumsum([0] + lengths, dtype=np.int64)
        offsets.tofile(os.path.join(tmp, "offsets.bin"))
        write_json(os.path.join(tmp, "names.json"), names)
        manifest = {"name": name, "tokenizer": tokenizer.name, "n_docs": len(lengths),
                    "n_tokens": int(offsets[-1]), "n_skipped": n_skipped, "skipped": skipped,
                    "build_seconds": round(time.time() - started, 2), "key": key,
                    "files": {n: file_checksum(os.path.join(tmp, n)) for n in CACHE_FILES}}
        write_json(os.path.join(tmp, "manifest.json"), {**manifest, "checksum": digest(manifest)})
        os.rename(tmp, path)
    except BrokenProcessPool:
        raise ValueError(f"a process tokenizing {name} died (out of memory?); free memory, or "
                         f"use fewer worker processes") from None
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)


CACHE_FILES = ("tokens.bin", "offsets.bin", "names.json")  # listed in manifest.json


def digest(obj) -> str:
    """SHA-256 of an object's JSON: the cache key in the folder's name, the manifest's checksum."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def file_checksum(path: str) -> list:
    """[size, SHA-256] of a file."""
    with open_if_regular(path) as f:
        return [os.fstat(f.fileno()).st_size, hashlib.file_digest(f, "sha256").hexdigest()]


def read_manifest(path: str, key: dict) -> dict:
    """manifest.json of the cache folder `path`, once it proves the folder is what was built:
    its own checksum holds, it was built for `key`, and every file has the size and SHA-256 it
    lists. Anything else (a folder edited, replaced or cut short from outside: token ids past
    the vocabulary, a truncated tokens.bin, a named pipe) is one ValueError saying to delete
    it, never a crash mid-training."""
    why = "manifest.json is missing or was changed"
    try:
        manifest = read_json(os.path.join(path, "manifest.json"))
        if isinstance(manifest, dict) and manifest.pop("checksum", None) == digest(manifest) \
                and digest(manifest["key"]) == digest(key):
            for name in CACHE_FILES:
                why = f"{name} is not the one manifest.json lists"
                if file_checksum(os.path.join(path, name)) != manifest["files"][name]:
                    break
            else:
                return manifest
    except (OSError, ValueError):  # missing, a named pipe, not JSON (read_json's FileError)
        pass
    raise ValueError(f"cache {path} is damaged ({why}); delete it and run again")
