"""
Experiment 3: the critical dimension of the diffusion-aware NTK, swept (PAPER.md section 2).

UltraLLaDA computes d_crit from the doubled capacity 2 T_train (70 for LLaDA; a later version of
the paper reports 73 worked best). For the base model of experiment 1 (head size 64, base 10000,
window 512) the computed value is 36. Training-free, as in experiment 1, the diffusion-aware
base is recomputed with d_crit forced to each value of a sweep around it (`--d-crit`), and the
model is evaluated at 4x and 8x its window: needle in a haystack and perplexity.
Writes experiments/results/dcrit.md and the README section "dcrit".

    python experiments/dcrit.py            # about 15 minutes on 2 CPU cores after experiment 1
"""
import os
import time

import numpy as np

from common import (NIAH_FLAGS, PPL_FLAGS, PROTOCOL, RUNS, WINDOW, base_model, evaluate, log,
                    minutes, write_section)
from rope import critical_dim, rope_lambda

LENGTHS = [4 * WINDOW, 8 * WINDOW]
HEAD_DIM, BASE = 64, 10000.0


def main():
    started = time.perf_counter()
    model, _ = base_model()
    computed = critical_dim(HEAD_DIM, BASE, 2 * WINDOW)
    sweep = sorted({computed + k for k in (-8, -4, 0, 4, 8)})
    rows = []
    for d in sweep:
        rope = ["--rope", "diffusion", "--train-len", str(WINDOW), "--d-crit", str(d)]
        niah, _ = evaluate(model, os.path.join(RUNS, "dcrit", f"niah-{d}"), *NIAH_FLAGS,
                           "--len", *map(str, LENGTHS), *rope)
        ppl, _ = evaluate(model, os.path.join(RUNS, "dcrit", f"ppl-{d}"), *PPL_FLAGS,
                          "--len", *map(str, LENGTHS), *rope)
        row = [f"{d}{' (computed)' if d == computed else ''}"]
        row += [f"{rope_lambda('diffusion', L, WINDOW, HEAD_DIM, BASE, d):.1f}" for L in LENGTHS]
        row += [f"{np.mean([c['score'] for c in niah if c['length'] == L]):.0f}" for L in LENGTHS]
        row += [f"{np.mean([c['perplexity'] for c in ppl if c['length'] == L]):.2f}" for L in LENGTHS]
        rows.append("| " + " | ".join(row) + " |")
        log(rows[-1])
    L1, L2 = LENGTHS
    text = "\n".join([
        f"Training-free diffusion-aware NTK on the base model of experiment 1, with the critical "
        f"dimension forced to each value (head size {HEAD_DIM}; computed from 2 x {WINDOW} tokens: "
        f"{computed}). {PROTOCOL}.",
        "",
        f"| d_crit | lambda at {L1} | lambda at {L2} | NIAH {L1} | NIAH {L2} | PPL {L1} | PPL {L2} |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        f"Written by `python experiments/dcrit.py` ({minutes(time.perf_counter() - started)} this run).",
    ])
    write_section("dcrit", text)


if __name__ == "__main__":
    main()
