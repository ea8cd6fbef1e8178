"""
bench_attention.py: full vs adaptive (per-document) attention on the CPU, time and peak memory.

Cases, each run in a fresh subprocess so its peak resident memory is its own:
  - one attention layer (2 heads of 64) and a tiny-model forward (hidden states), for
    L = 4K, 16K, 64K, 128K, with full attention and with adaptive attention over 4K documents;
  - a 64K sequence of 1024 documents of 64 tokens (adaptive);
  - the 4K documents run one at a time, summed (what adaptive attention should cost).
Prints a markdown table and the goals as ratios:
  adaptive / documents run separately <= 1.2;  full / adaptive at 64K >= 10;
  full / adaptive with 1024 documents >= 100;  peak at 131072 / peak at 65536 <= 2.2.

    python -m bench.bench_attention [--lengths 4096 16384 65536 131072] [--doc-len 4096]
"""
import argparse
import json
import os
import sys
import time

from bench.child import run_child
from bench.memory import memory_mb, reset_peak
from harness.flags import count
from harness.runtime import fail

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_case(what: str, L: int, doc_len: int, repeats: int) -> dict:
    """Runs in the child process: time the case, report time and peak memory above baseline."""
    import torch

    from harness.runtime import tune_cpu_memory
    tune_cpu_memory()  # huge pages for large tensors, as train.py and evaluate.py run
    from masks import attention, attention_plan
    from model import LLaDA, preset

    torch.manual_seed(0)
    kind, layout = what.split(":")  # e.g. "layer:adaptive"
    doc_lens = None if layout == "full" else [[doc_len] * (L // doc_len)]
    if layout == "separate":  # the documents one by one, each as its own batch of one
        doc_lens, pieces = None, L // doc_len
        L = doc_len
    else:
        pieces = 1
    net = LLaDA(preset("tiny"))

    def make_step(L, doc_lens):
        if kind == "layer":
            q, k, v = (torch.randn(1, L, 2, 64) for _ in range(3))
            return lambda: attention(q, k, v, attention_plan(doc_lens, 1, L, q.device))
        x = torch.randint(0, 50000, (1, L))
        return lambda: net(x, doc_lens=doc_lens)

    torch.set_grad_enabled(False)
    make_step(256, None)()  # warm-up: thread pool, allocator, kernel selection
    step = make_step(L, doc_lens)
    base = memory_mb("VmRSS")
    reset_peak()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(pieces):
            step()
        times.append(time.perf_counter() - t)
    return {"time": min(times), "peak_mb": memory_mb("VmHWM") - base}


def measure(what, L, doc_len, repeats):
    cmd = [sys.executable, "-m", "bench.bench_attention", "--child", what, str(L), str(doc_len),
           str(repeats)]
    out = run_child(cmd, f"the {what} case at {L} tokens", ROOT)
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None):
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        what, L, doc_len, repeats = sys.argv[2], *map(int, sys.argv[3:6])
        print(json.dumps(run_case(what, L, doc_len, repeats)))
        return
    p = argparse.ArgumentParser(description="Full vs adaptive attention on the CPU: time and peak memory.")
    p.error = fail  # one line, not the usage block
    p.add_argument("--lengths", type=count, nargs="+", default=[4096, 16384, 65536, 131072],
                   help="sequence lengths to measure, multiples of --doc-len")
    p.add_argument("--doc-len", type=count, default=4096, help="document length of the adaptive rows")
    p.add_argument("--short-docs", type=count, default=64,
                   help="document length of the many-documents row (at 65536 tokens)")
    p.add_argument("--repeats", type=count, default=3,
                   help="timed repetitions, the best kept: the first run of a shape in a fresh "
                        "process also pays for its memory (default 3; 1 at 131072)")
    args = p.parse_args(argv)
    # the adaptive rows tile each sequence with whole documents
    if any(L % args.doc_len for L in args.lengths):
        fail(f"--lengths {' '.join(map(str, args.lengths))} must all be multiples of --doc-len "
             f"{args.doc_len}")
    if 65536 in args.lengths and 65536 % args.short_docs:
        fail(f"--short-docs {args.short_docs} must divide 65536, the many-documents row's length")

    print("| case | L | documents | time (s) | peak memory above baseline (MB) |")
    print("|---|---:|---:|---:|---:|")
    res = {}

    def row(kind, layout, L, doc_len):
        r = measure(f"{kind}:{layout}", L, doc_len, args.repeats if L < 131072 else 1)
        res[(kind, layout, L, doc_len)] = r
        docs = 1 if layout == "full" else L // doc_len
        label = {"full": "full attention", "adaptive": "adaptive",
                 "separate": "documents run separately"}[layout]
        name = "attention layer" if kind == "layer" else "tiny model forward"
        print(f"| {name}, {label} | {L:,} | {docs} | {r['time']:.3f} | {r['peak_mb']:.0f} |", flush=True)

    for kind in ("layer", "model"):
        for L in args.lengths:
            row(kind, "full", L, args.doc_len)
            row(kind, "adaptive", L, args.doc_len)
        if 65536 in args.lengths:
            row(kind, "adaptive", 65536, args.short_docs)
            row(kind, "separate", 65536, args.doc_len)

    def ratio(a, b):
        return res[a]["time"] / res[b]["time"]

    print("\n| goal | measured | target | met |")
    print("|---|---:|---:|---|")
    if 65536 in args.lengths:
        for kind in ("layer", "model"):
            name = "attention layer" if kind == "layer" else "tiny model"
            r1 = ratio((kind, "adaptive", 65536, args.doc_len), (kind, "separate", 65536, args.doc_len))
            r2 = ratio((kind, "full", 65536, args.doc_len), (kind, "adaptive", 65536, args.doc_len))
            r3 = ratio((kind, "full", 65536, args.doc_len), (kind, "adaptive", 65536, args.short_docs))
            print(f"| {name}: adaptive / documents separately (64K, {args.doc_len} per doc) | {r1:.2f}x | <= 1.2x | {'yes' if r1 <= 1.2 else 'no'} |")
            print(f"| {name}: full / adaptive at 64K ({65536 // args.doc_len} documents) | {r2:.1f}x | >= 10x | {'yes' if r2 >= 10 else 'no'} |")
            print(f"| {name}: full / adaptive at 64K ({65536 // args.short_docs} documents) | {r3:.0f}x | >= 100x | {'yes' if r3 >= 100 else 'no'} |")
    if 65536 in args.lengths and 131072 in args.lengths:
        for kind in ("layer", "model"):
            for layout in ("full", "adaptive"):
                m = res[(kind, layout, 131072, args.doc_len)]["peak_mb"] / res[(kind, layout, 65536, args.doc_len)]["peak_mb"]
                name = "attention layer" if kind == "layer" else "tiny model"
                print(f"| {name}, {layout}: peak memory 131072 / 65536 | {m:.2f}x | <= 2.2x | {'yes' if m <= 2.2 else 'no'} |")


if __name__ == "__main__":
    main()
