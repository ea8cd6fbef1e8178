"""
bench_data.py: how fast data.py turns a corpus into the cache, and packs 64K sequences.

Two measurements, printed as markdown tables:
  1. tokenization: the whole pipeline (read .txt books, tokenize in worker processes, write the
     cache) against calling the tokenizer directly on the same texts already in memory, one
     process. A ratio above 1 means the pipeline beats a plain loop (it has more processes).
  2. packing: masks.pack_sequence through data.batch_for_step, as training calls it, for
     sequences of 65536 tokens in a shuffled order, on book-length documents and on short ones.

The books are written from the synthetic generator (no downloads): English-like text with a
small vocabulary, so absolute tokens/s may differ from PG19; the ratio is what matters.

    python -m bench.bench_data                # about 1-2 minutes on 2 cores
    python -m bench.bench_data --mb 8         # quicker
"""
import os
import platform
import tempfile

import numpy as np

import data
from bench.child import best_time, parser
from harness import prepare
from harness.flags import count, number
from harness.files import physical_memory, write_text
from harness.runtime import fail
from harness.tokenizer import tiktoken_tokenizer


def write_books(folder: str, megabytes: float, book_bytes: int = 400_000) -> list[str]:
    """PG19-like .txt books (about 400 KB each) made of synthetic documents; returns their texts."""
    os.makedirs(folder, exist_ok=True)
    config = prepare.SyntheticConfig(seed=123, n_docs=10**9)
    books, book, size, i = [], [], 0, 0
    while sum(len(b) for b in books) < megabytes * 1e6:
        doc = prepare.synthetic_document(config, i)
        i += 1
        book.append(doc)
        size += len(doc) + 2
        if size >= book_bytes:
            books.append("\n\n".join(book))
            book, size = [], 0
    for j, text in enumerate(books):
        write_text(os.path.join(folder, f"{j:05d}.txt"), text)  # a full disk: one FileError line
    return books


def bench_tokenization(tok, folder, texts, workers_list, cache_dir, repeats):
    n_bytes = sum(len(t.encode()) for t in texts)
    ids, direct = best_time(lambda: [tok.encode(t) for t in texts], repeats)
    n_tokens = sum(len(x) for x in ids)
    rows = [("tokenizer.encode on texts in memory (direct)", 1, n_tokens, direct)]
    for w in workers_list:  # cold builds: a fresh cache folder each time, so nothing is reused
        c, sec = best_time(lambda: prepare.load_corpus(
            tok, folder, heldout=0, workers=w, progress=False,
            cache_dir=tempfile.mkdtemp(dir=cache_dir)), repeats)
        assert not c.reused and c.n_tokens == n_tokens
        rows.append(("pipeline: .txt folder -> cache, built", w, c.n_tokens, sec))
    c, sec = best_time(lambda: prepare.load_corpus(tok, folder, heldout=0, progress=False,
                                            cache_dir=os.path.dirname(c.path)), repeats)
    assert c.reused
    rows.append(("pipeline: cache reused (second run)", "-", c.n_tokens, sec))
    print(f"\n### Tokenization: {len(texts)} books, {n_bytes / 1e6:.1f} MB, {tok.name}, "
          f"best of {repeats}\n")
    print("| stage | processes | tokens | seconds | tokens/s | MB/s | vs direct |")
    print("|---|---|---|---|---|---|---|")
    for name, w, n, sec in rows:
        if sec < 0.01:  # below what two decimals show: a rate from it would be noise
            print(f"| {name} | {w} | {n:,} | <0.01 | - | - | - |")
            continue
        print(f"| {name} | {w} | {n:,} | {sec:.2f} | {n / sec:,.0f} | {n_bytes / 1e6 / sec:.1f} "
              f"| {direct / sec:.2f}x |")
    return c


def bench_packing(corpora, seq_len, max_seqs):
    """data.batch_for_step, which packs through masks.pack_sequence, as training calls it."""
    print(f"\n### Packing sequences of {seq_len:,} tokens (shuffled order, one process, best of 3)\n")
    print("| corpus | documents / sequence | strategy | sequences | seconds | sequences/s | tokens/s |")
    print("|---|---|---|---|---|---|---|")
    for label, c in corpora:
        label = f"{label}, mean document {c.n_tokens / c.n_docs:,.0f} tokens"
        for strategy in ("concat", "eod", "adaptive"):
            s = data.Schedule(c, seq_len, strategy, batch_size=1, seed=0)
            n = min(max_seqs, s.n_sequences)
            batches, sec = best_time(lambda: [data.batch_for_step(s, step) for step in range(n)], 3)
            per_seq = np.mean([len(doc_lens[0]) for _, doc_lens in batches])
            print(f"| {label} | {per_seq:.1f} | {strategy} | {n} | {sec:.3f} | {n / sec:,.0f} "
                  f"| {n * seq_len / sec:,.0f} |")


def main(argv=None):
    p = parser(__doc__)
    # the direct row holds every book's ids as Python ints, about 10 bytes per byte of text
    most = round(0.08 * physical_memory() / 1e6)
    p.add_argument("--mb", type=number(float, 0, False, most), default=32, help="megabytes of "
                   f"books to tokenize (default 32, at most {most} here: a tenth of 80%% of memory)")
    p.add_argument("--workers", type=count, default=os.cpu_count(),
                   help="most worker processes to try (default: every core)")
    p.add_argument("--seq-len", type=count, default=65536, help="packed sequence length (default 65536)")
    p.add_argument("--short-docs", type=count, default=4000,
                   help="documents of the short-document corpus for packing (default 4000)")
    p.add_argument("--max-seqs", type=count, default=200, help="most sequences packed per row (default 200)")
    p.add_argument("--repeats", type=count, default=2,
                   help="tokenization timings are the best of this many runs (default 2)")
    args = p.parse_args(argv)
    tok = tiktoken_tokenizer()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"python {platform.python_version()}, numpy {np.__version__}")
    with tempfile.TemporaryDirectory(prefix="bench_data-") as work:
        folder, cache = os.path.join(work, "books"), os.path.join(work, "cache")
        os.makedirs(cache)
        try:
            books = bench_tokenization(tok, folder, write_books(folder, args.mb),
                                       sorted({1, args.workers}), cache, args.repeats)
            short = prepare.load_corpus(tok, synthetic=prepare.SyntheticConfig(n_docs=args.short_docs),
                                        progress=False, cache_dir=cache)
        except ValueError as e:
            fail(str(e))
        bench_packing([("books", books), ("synthetic corpus", short)], args.seq_len, args.max_seqs)


if __name__ == "__main__":
    main()
