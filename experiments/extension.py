"""
Experiment 1: training-free context extension, in miniature (docs/paper.md section 2).

A tiny LLaDA is pre-trained with the masked-diffusion loss at a 512-token window on the built-in
synthetic corpus, then fine-tuned to retrieve facts inside that window (common.base_model). Without any
further training it is then evaluated at 2x, 4x and 8x its window with each RoPE method of
rope.py: none, ntk, critical (LongLLaDA), diffusion (UltraLLaDA) and pi (NIAH also at 16x). Needle in a haystack
(evaluate.py --task niah) and perplexity of a held-out document (evaluate.py --task ppl, the
LongLLaDA protocol), each length with its own scaled base.
Writes experiments/results/extension.{md,png}.

    python -m experiments.extension        # about 35 minutes on 2 CPU cores from scratch (base model:
                                           # 24 of them, shared by the other two), 10 without
"""
import os
import time

from experiments.common import (NIAH_FLAGS, PPL_FLAGS, PROTOCOL, RESULTS, RUNS, WINDOW, base_model,
                                evaluate, log, mean_by_length, minutes, write_section)
from harness.results import figure
from rope import METHODS

LENGTHS = [WINDOW, 2 * WINDOW, 4 * WINDOW, 8 * WINDOW]  # perplexity: the longest documents are ~8K
NIAH_LENGTHS = LENGTHS + [16 * WINDOW]


def plot(path: str, niah: dict, ppl: dict) -> None:
    with figure(path, 1, 2, figsize=(11, 4)) as (fig, (a, b)):
        for method in METHODS:
            a.plot(NIAH_LENGTHS, [niah[method][L] for L in NIAH_LENGTHS], marker="o", label=method)
            b.plot(LENGTHS, [ppl[method][L] for L in LENGTHS], marker="o", label=method)
        for ax, title, lengths in ((a, "needle in a haystack (score, 100 = found)", NIAH_LENGTHS),
                                   (b, "perplexity (lower is better)", LENGTHS)):
            ax.set_xscale("log", base=2)
            ax.set_xticks(lengths, [f"{L}\n({L // WINDOW}x)" for L in lengths])
            ax.axvline(WINDOW, color="grey", ls=":", lw=1)
            ax.set_xlabel("context length (tokens; window = 512)")
            ax.set_title(title)
        b.set_yscale("log")
        a.legend(title="RoPE scaling")
        fig.suptitle("Training-free extension of a tiny LLaDA pre-trained at 512 tokens")


def main():
    started = time.perf_counter()
    base, info = base_model()
    log(f"base model ready: {base}")
    # Inside the window every method is the identity (lambda = 1): evaluate that column once.
    inside_niah, s1 = evaluate(base, os.path.join(RUNS, "extension", "niah-window"), *NIAH_FLAGS,
                               "--len", str(WINDOW))
    inside_ppl, s2 = evaluate(info["lm"], os.path.join(RUNS, "extension", "ppl-window"), *PPL_FLAGS,
                              "--len", str(WINDOW))
    niah, ppl, eval_seconds = {}, {}, s1 + s2
    for method in METHODS:
        rope = ["--rope", method, "--train-len", str(WINDOW)]
        cells, s1 = evaluate(base, os.path.join(RUNS, "extension", f"niah-{method}"), *NIAH_FLAGS,
                             "--len", *map(str, NIAH_LENGTHS[1:]), *rope)
        niah[method] = mean_by_length(cells + inside_niah, "score", NIAH_LENGTHS)
        cells, s2 = evaluate(info["lm"], os.path.join(RUNS, "extension", f"ppl-{method}"), *PPL_FLAGS,
                             "--len", *map(str, LENGTHS[1:]), *rope)
        ppl[method] = mean_by_length(cells + inside_ppl, "perplexity", LENGTHS)
        eval_seconds += s1 + s2
        log(f"{method}: NIAH {niah[method]}, PPL {ppl[method]}")

    plot(os.path.join(RESULTS, "extension.png"), niah, ppl)

    def header(lengths):
        return ["| RoPE | " + " | ".join(f"{L} ({L // WINDOW}x)" for L in lengths) + " |",
                "|---|" + "---:|" * len(lengths)]

    niah_rows = [f"| {m} | " + " | ".join(f"{niah[m][L]:.0f}" for L in NIAH_LENGTHS) + " |" for m in METHODS]
    ppl_rows = [f"| {m} | " + " | ".join(f"{ppl[m][L]:.2f}" for L in LENGTHS) + " |" for m in METHODS]
    best = {L: min(METHODS, key=lambda m: ppl[m][L]) for L in LENGTHS[1:]}
    total = time.perf_counter() - started
    text = "\n".join([
        info["text"],
        "",
        "No training after that: only the RoPE base (or the positions, for pi) changes.",
        "",
        f"Evaluation: {PROTOCOL}. The {WINDOW} column is inside the window, where every method "
        "leaves the model unchanged.",
        "",
        "Needle in a haystack, mean score (100 = the needle's code was found):",
        "", *header(NIAH_LENGTHS), *niah_rows, "",
        "Perplexity of the first L tokens of a held-out document (LongLLaDA's protocol), each length "
        "with its own scaled base:",
        "", *header(LENGTHS), *ppl_rows, "",
        "Lowest perplexity beyond the window: " +
        ", ".join(f"{L // WINDOW}x {best[L]}" for L in LENGTHS[1:]) + ".",
        "",
        "![extension](extension.png)",
        "",
        f"Written by `python -m experiments.extension` ({minutes(total)} this run; the evaluation "
        f"cells took {minutes(eval_seconds)} in all, a rerun reuses finished cells).",
    ])
    write_section("extension", text)


if __name__ == "__main__":
    main()
