"""
estimate_paper.py: how long the paper's evaluations take for LLaDA-8B on one GPU, estimated
from FLOPs (evaluate.py's own cost model), not measured: no GPU has run them here yet.

Each benchmark's cells are costed as evaluate.py runs them (exact decoding, the authors'
decoding settings; results.generation_flops and ppl.cell_flops) and divided by an assumed
sustained throughput: --peak-tflops (the H200's dense bf16 peak, about 790) times --mfu (the
share a long-context forward sustains; 0.4 is a guess until `python -m pytest tests/test_gpu.py -s`
prints a measured MFU). The README's wall times come from this script.

    python -m bench.estimate_paper [--peak-tflops 790] [--mfu 0.4]
"""
from bench.child import parser
from evaluations import ppl
from evaluations.compare import NIAH_LENGTHS  # the authors' NeedleBench config: 8K..128K
from evaluations.longbench import DATASETS, answer_tokens
from harness.flags import number, positive
from harness.results import generation_flops
from model import preset

RULER_LENGTHS = [4096, 8192, 16384, 32768]  # the paper's RULER table
# Rows of the official LongBench files (200 each, 150 for multifieldqa_en, 500 for the two
# code datasets); the prompts are cut to 16000 tokens, and most are longer, so all count 16000.
LONGBENCH_ROWS = {name: 500 if name in ("lcc", "repobench-p") else 150
                  if name == "multifieldqa_en" else 200 for name in DATASETS}


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--peak-tflops", type=positive, default=790.0,
                   help="the GPU's dense bf16 peak in TFLOP/s (H200: about 790)")
    p.add_argument("--mfu", type=number(float, 0, False, 1), default=0.4,
                   help="assumed share of the peak sustained at long context, in (0, 1] "
                        "(default 0.4)")
    args = p.parse_args(argv)
    c = preset("llada-8b")
    speed = args.peak_tflops * 1e12 * args.mfu

    def hours(flops):
        return flops / speed / 3600

    rows = []
    per_cell = {L: generation_flops(c, L, 32, 32, 16, False) for L in NIAH_LENGTHS}
    rows.append(("NeedleBench NIAH, 8K..128K x 11 depths x 10 repeats", 11 * 10 * 16,
                 f"{per_cell[8192] / speed:.0f} s at 8K, {per_cell[131072] / speed / 60:.1f} min at 128K",
                 hours(110 * sum(per_cell.values()))))
    per_cell = {L: generation_flops(c, L, 64, 64, 64, False) for L in RULER_LENGTHS}
    rows.append(("RULER, 13 tasks x 100 samples x 4K..32K", 13 * 100 * 4,
                 f"{per_cell[4096] / speed:.1f} s at 4K, {per_cell[32768] / speed:.0f} s at 32K",
                 hours(1300 * sum(per_cell.values()))))
    lb = {d: generation_flops(c, 16000, answer_tokens(d), 64, answer_tokens(d), False)
          for d in DATASETS}
    rows.append(("LongBench, 21 datasets at 16K", sum(LONGBENCH_ROWS.values()),
                 f"{lb['hotpotqa'] / speed:.0f} s (64 tokens) to {lb['gov_report'] / speed:.0f} s "
                 f"(512 tokens)", hours(sum(LONGBENCH_ROWS[d] * f for d, f in lb.items()))))
    paper = ppl.Options(chunk_size=64, draws=8)  # the paper's protocol: 64-token chunks, 8 draws
    rows.append(("Perplexity, one 128K-token document", 1, "",
                 hours(ppl.cell_flops(c, paper, {"length": 131072}))))
    print(f"LLaDA-8B on one GPU at {args.mfu:.0%} of {args.peak_tflops:.0f} TFLOP/s "
          f"(estimated from FLOPs, exact decoding)\n")
    print("| evaluation | cells | one cell | total (GPU hours) |")
    print("|---|---:|---|---:|")
    for name, n, cell, total in rows:
        print(f"| {name} | {n:,} | {cell} | {total:.1f} |")


if __name__ == "__main__":
    main()
