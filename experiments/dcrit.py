"""
Experiment 3: the critical dimension of the diffusion-aware NTK, swept (docs/paper.md section 2).

UltraLLaDA computes d_crit from the doubled capacity 2 T_train (70 for LLaDA; a later version of
the paper reports 73 worked best). For the base model of experiment 1 (head size 64, base 10000,
window 512) the computed value is 36. Training-free, as in experiment 1, the diffusion-aware
base is recomputed with d_crit forced to each value of a sweep around it (`--d-crit`), and the
model is evaluated: needle in a haystack at 8x and 16x its window, perplexity at 4x and 8x.
Writes experiments/results/dcrit.md.

    python -m experiments.dcrit            # about 10 minutes on 2 CPU cores after experiment 1
"""
import os
import time

from experiments.common import (NIAH_FLAGS, PPL_FLAGS, PROTOCOL, RUNS, WINDOW, base_model,
                                evaluate, log, mean_by_length, minutes, write_section)
from rope import critical_dim, rope_lambda

LENGTHS = [4 * WINDOW, 8 * WINDOW]  # perplexity (the longest held-out documents are ~8K)
NIAH_LENGTHS = [8 * WINDOW, 16 * WINDOW]  # NIAH: at 4x every scaled method already scores 100
HEAD_DIM, BASE = 64, 10000.0


def main():
    started = time.perf_counter()
    model, info = base_model()
    computed = critical_dim(HEAD_DIM, BASE, 2 * WINDOW)
    sweep = sorted({computed + k for k in (-8, -4, 0, 4, 8)})
    rows = []
    for d in sweep:
        rope = ["--rope", "diffusion", "--train-len", str(WINDOW), "--d-crit", str(d)]
        niah, _ = evaluate(model, os.path.join(RUNS, "dcrit", f"niah-{d}"), *NIAH_FLAGS,
                           "--len", *map(str, NIAH_LENGTHS), *rope)
        ppl, _ = evaluate(info["lm"], os.path.join(RUNS, "dcrit", f"ppl-{d}"), *PPL_FLAGS,
                          "--len", *map(str, LENGTHS), *rope)
        row = [f"{d}{' (computed)' if d == computed else ''}"]
        row += [f"{rope_lambda('diffusion', L, WINDOW, HEAD_DIM, BASE, d):.1f}" for L in NIAH_LENGTHS]
        row += [f"{s:.0f}" for s in mean_by_length(niah, "score", NIAH_LENGTHS).values()]
        row += [f"{p:.2f}" for p in mean_by_length(ppl, "perplexity", LENGTHS).values()]
        rows.append("| " + " | ".join(row) + " |")
        log(rows[-1])
    L1, L2 = LENGTHS
    N1, N2 = NIAH_LENGTHS
    text = "\n".join([
        f"Training-free diffusion-aware NTK on the base model of experiment 1, with the critical "
        f"dimension forced to each value (head size {HEAD_DIM}; computed from 2 x {WINDOW} tokens: "
        f"{computed}). {PROTOCOL}. NIAH on the fine-tuned model, perplexity on the pre-trained one "
        "(experiment 1 says why).",
        "",
        f"| d_crit | lambda at {N1} | lambda at {N2} | NIAH {N1} | NIAH {N2} | PPL {L1} | PPL {L2} |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        f"Written by `python -m experiments.dcrit` ({minutes(time.perf_counter() - started)} this run).",
    ])
    write_section("dcrit", text)


if __name__ == "__main__":
    main()
