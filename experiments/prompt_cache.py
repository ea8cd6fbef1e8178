"""
The approximate prompt cache against exact decoding, on the trained retrieval model.

diffusion.generate(..., cache="prefix") (evaluate.py --prompt-cache) keeps the keys and values of
the prompt from the first step of each block and reuses them while the block is denoised
(Fast-dLLM's prefix cache). A bidirectional model's prompt keys depend on the answer tokens, so
this is an approximation. Here it is measured where it matters: the base model of experiment 1
(fine-tuned to retrieve), at 1x to 16x its 512-token window, with the diffusion-aware base
re-scaled for each length (--rope diffusion, as experiment 1). The same NIAH cells are decoded
twice, exactly and with the cache, and compared:
  - token agreement: the fraction of the answer's positions where both decodings hold the same
    token (the answer as the evaluator reads it, up to the first EOS, padded with EOS),
  - identical answers: the fraction of cells whose answers are equal,
  - the NIAH score of each, and the decoding time of each.
Writes experiments/results/prompt_cache.md.

    python -m experiments.prompt_cache     # about 10 minutes on 2 CPU cores after experiment 1

Every command that reproduces a paper number (extension.py, masking.py, dcrit.py) decodes
exactly: none of them passes --prompt-cache.
"""
import os
import time

import numpy as np

from experiments.common import (DEPTHS, NIAH_FLAGS, RUNS, WINDOW, base_model, evaluate, log,
                                mean_sd, minutes, write_section)
from harness.tokenizer import load_tokenizer

LENGTHS = [WINDOW, 2 * WINDOW, 4 * WINDOW, 8 * WINDOW, 16 * WINDOW]
REPEATS = 4  # twice the experiments' NIAH repeats: 20 prompts per length
GEN = int(NIAH_FLAGS[NIAH_FLAGS.index("--gen-length") + 1])


def answer_ids(tok, answer: str) -> list[int]:
    """The answer as the evaluator read it (text up to the first EOS), as GEN token ids."""
    ids = tok.encode(answer)[:GEN]
    return ids + [tok.eos_id] * (GEN - len(ids))


def main():
    started = time.perf_counter()
    model, _ = base_model()
    tok = load_tokenizer(model)
    flags = [*NIAH_FLAGS, "--repeats", str(REPEATS), "--len", *map(str, LENGTHS),
             "--rope", "diffusion", "--train-len", str(WINDOW)]
    folder = os.path.join(RUNS, "prompt_cache")
    exact, s1 = evaluate(model, os.path.join(folder, "exact"), *flags)
    cached, s2 = evaluate(model, os.path.join(folder, "cached"), *flags, "--prompt-cache")
    key = lambda c: (c["length"], c["depth"], c["repeat"])  # noqa: E731
    twin = {key(c): c for c in cached}  # the same prompt, decoded with the cache
    rows = []
    for L in LENGTHS:
        mine = [(e, twin[key(e)]) for e in exact if e["length"] == L]
        agree = [np.mean(np.equal(answer_ids(tok, e["answer"]), answer_ids(tok, c["answer"])))
                 for e, c in mine]
        same = [e["answer"] == c["answer"] for e, c in mine]
        score_e, score_c = [e["score"] for e, _ in mine], [c["score"] for _, c in mine]
        t_e, t_c = np.mean([e["seconds"] for e, _ in mine]), np.mean([c["seconds"] for _, c in mine])
        rows.append(f"| {L} ({L // WINDOW}x) | {len(mine)} | {100 * np.mean(agree):.1f} | "
                    f"{100 * np.mean(same):.0f} | {mean_sd(score_e, 0)} | {mean_sd(score_c, 0)} | "
                    f"{sum(a != b for a, b in zip(score_e, score_c))} | {t_e:.2f} | {t_c:.2f} |")
        log(rows[-1])
    text = "\n".join([
        "Approximate prefix cache (`evaluate.py --prompt-cache`, `diffusion.generate(..., "
        "cache=\"prefix\")`) against exact decoding, on the retrieval model of experiment 1 "
        "(window 512), each length with the diffusion-aware base re-scaled for it (`--rope "
        f"diffusion --train-len {WINDOW}`). NIAH: {len(DEPTHS)} "
        f"depths x {REPEATS} repeats per length, {GEN} answer tokens in one block of {GEN} steps "
        f"(the experiments' decoding, with {REPEATS} repeats instead of 2). The same "
        "prompts are decoded both ways. Token agreement: positions of the answer (as the "
        f"evaluator reads it, up to the first EOS, padded with EOS to {GEN}) holding the same "
        "token. NIAH scores are mean ± standard deviation over the prompts; 'cells that differ' "
        "counts prompts whose score changed.",
        "",
        "| length | prompts | token agreement (%) | identical answers (%) | NIAH exact | "
        "NIAH cached | cells that differ | s per answer, exact | s per answer, cached |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        "What this shows and what it does not: on this model the cache never changed an answer "
        "up to 16x the window, so the NIAH scores agree; but the answers here are one "
        "confident code and its full stop, decoded in a single block, which is the easiest case "
        "for the cache. Longer answers decoded over several blocks (RULER, LongBench) are not "
        "measured here. The seconds are wall times on a shared 2-core CPU on which other "
        "sessions' benchmarks paused these jobs at times (the exact 16x row most of all): "
        "they show the direction of the speed-up, not its size (docs/benchmarks.md times it).",
        "",
        "Every command that reproduces a paper number decodes exactly: experiments/extension.py, "
        "masking.py and dcrit.py never pass --prompt-cache (its mixing test calls "
        "diffusion.generate without a cache).",
        "",
        f"Written by `python -m experiments.prompt_cache` (decoding {minutes(s1)} exact, "
        f"{minutes(s2)} cached, as logged; {minutes(time.perf_counter() - started)} this run, "
        "which reuses finished cells).",
    ])
    write_section("prompt_cache", text)


if __name__ == "__main__":
    main()
