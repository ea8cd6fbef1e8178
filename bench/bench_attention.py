"""
bench_attention.py: full vs adaptive (per-document) attention on the CPU, time and peak memory.

Cases, each run in a fresh subprocess so its peak resident memory is its own:
  - one attention layer (2 heads of 64) and a tiny-model forward (hidden states), for
    L = 4K, 16K, 64K, 128K, with full attention and with adaptive attention over 4K documents;
  - a 64K sequence of 1024 documents of 64 tokens (adaptive);
  - the 4K documents run one at a time, summed (what adaptive attention should cost).
Prints a markdown table, then the goals (time and memory ratios of these cases) and whether
each is met.

    python -m bench.bench_attention [--lengths 4096 16384 65536 131072] [--doc-len 4096]
"""
from bench.child import measure, parser, serve, time_and_peak
from harness.flags import count
from harness.runtime import fail

SHORT_DOC = 64  # tokens per document of the many-documents row: 1024 of them in 65536


def run_case(what: str, L: int, doc_len: int, repeats: int) -> dict:
    """Runs in the child process: time the case, report time and peak memory above baseline."""
    import torch

    from masks import attention, attention_plan
    from model import LLaDA, preset

    torch.manual_seed(0)
    kind, layout = what.split(":")  # e.g. "layer:adaptive"
    pieces = L // doc_len if layout == "separate" else 1  # the documents one by one, if separate
    L = doc_len if layout == "separate" else L
    doc_lens = [[doc_len] * (L // doc_len)] if layout == "adaptive" else None
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

    def run():
        for _ in range(pieces):
            step()
    return time_and_peak(run, repeats)


def main(argv=None):
    if serve(run_case):
        return
    p = parser(__doc__)
    p.add_argument("--lengths", type=count, nargs="+", default=[4096, 16384, 65536, 131072],
                   help="sequence lengths to measure, multiples of --doc-len")
    p.add_argument("--doc-len", type=count, default=4096, help="document length of the adaptive rows")
    p.add_argument("--repeats", type=count, default=3,
                   help="timed repetitions, the best kept: the first run of a shape in a fresh "
                        "process also pays for its memory (default 3; 1 at 131072)")
    args = p.parse_args(argv)
    # the adaptive rows tile each sequence with whole documents
    if any(L % args.doc_len for L in args.lengths):
        fail(f"--lengths {' '.join(map(str, args.lengths))} must all be multiples of --doc-len "
             f"{args.doc_len}")

    print("| case | L | documents | time (s) | peak memory above baseline (MB) |")
    print("|---|---:|---:|---:|---:|")
    res = {}

    def row(kind, layout, L, doc_len):
        r = measure("bench.bench_attention", f"the {kind}:{layout} case at {L} tokens",
                    f"{kind}:{layout}", L, doc_len, args.repeats if L < 131072 else 1)
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
            row(kind, "adaptive", 65536, SHORT_DOC)
            row(kind, "separate", 65536, args.doc_len)

    def goal(name: str, what: str, a: tuple, b: tuple, target: float, at_most: bool):
        m = res[a][what] / res[b][what]
        met = m <= target if at_most else m >= target
        print(f"| {name} | {m:.2f}x | {'<=' if at_most else '>='} {target}x | "
              f"{'yes' if met else 'no'} |")

    print("\n| goal | measured | target | met |\n|---|---:|---:|---|")
    for kind, name in (("layer", "attention layer"), ("model", "tiny model")):
        def case(layout, L=65536, doc_len=args.doc_len):
            return (kind, layout, L, doc_len)
        if 65536 in args.lengths:
            goal(f"{name}: adaptive / documents separately (64K, {args.doc_len} per doc)", "time",
                 case("adaptive"), case("separate"), 1.2, True)
            goal(f"{name}: full / adaptive at 64K ({65536 // args.doc_len} documents)", "time",
                 case("full"), case("adaptive"), 10, False)
            goal(f"{name}: full / adaptive at 64K ({65536 // SHORT_DOC} documents)", "time",
                 case("full"), case("adaptive", doc_len=SHORT_DOC), 100, False)
        if 65536 in args.lengths and 131072 in args.lengths:
            for layout in ("full", "adaptive"):
                goal(f"{name}, {layout}: peak memory 131072 / 65536", "peak_mb",
                     case(layout, 131072), case(layout), 2.2, True)


if __name__ == "__main__":
    main()
