"""
Experiment 2: the document masking strategy of post-training, in miniature (docs/paper.md
section 3.1), over several seeds.

From the base model of experiment 1 (pre-trained at 512 tokens, then fine-tuned to retrieve),
post-train one copy per strategy (concat, eod, adaptive) at the longest evaluated length, SEQ_LEN, with the
diffusion-aware NTK base for SEQ_LEN, the same steps and, per seed, the same data order. Every
model is then evaluated with its own saved base (no --rope: evaluate.py uses the checkpoint's),
at EVAL_LENGTHS, which end at SEQ_LEN:
  - needle in a haystack,
  - perplexity of a held-out document,
  - cross-document mixing: a prompt holds two documents, each with its own secret code, and asks
    for the code of the second; how often does the answer take the first document's code?
    (The paper: models post-trained with concat "produce incoherent results, possibly because of
    the mutual penetration of irrelevant content".) The prompt is given the way each model was
    trained (an EOS token between the documents for eod, none otherwise) with full attention,
    as a user's prompt would be; a single-document control measures retrieval alone.
Each (strategy, seed) is one post-training run; the seed sets the data order and noise of
post-training and of the retrieval refresh. Every number is reported as mean ± standard
deviation over the seeds, and the paper's ablation claim (eod better at short and medium
lengths, adaptive overtaking at the longest) is tested with paired 95% t-intervals of
eod - adaptive per length.
Writes experiments/results/masking.md.

    python -m experiments.masking          # about 45 minutes of one CPU core after the base
                                           # model; or one worker per seed in parallel:
    python -m experiments.masking --seed 1 &  python -m experiments.masking --seed 2 &
    python -m experiments.masking          # seed 0, then the results from all three
"""
import argparse
import json
import os
import random
import tempfile
import time

import numpy as np
import torch

from diffusion import generate
from experiments.common import (CODES, NIAH_FLAGS, PPL_FLAGS, PROTOCOL, RUNS, WINDOW, base_model,
                                evaluate, log, mean_by_length, mean_sd, minutes, paired_interval,
                                retrieval_finetune, train, write_section)
from harness.checkpoint import from_pretrained
from harness.files import publish_dir, write_json
from harness.prepare import FACT, NAMES, QUESTION, SyntheticConfig, filler_text, synthetic_texts
from harness.tokenizer import load_tokenizer, tiktoken_tokenizer
from masks import STRATEGIES

EVAL_LENGTHS = [WINDOW, 2 * WINDOW, 4 * WINDOW]  # short, medium, long for this model
SEQ_LEN = max(EVAL_LENGTHS)  # post-train for the longest evaluated length
BATCH = 2
STEPS = 100
SEEDS = [0, 1, 2]
REFRESH_STEPS = 300
MIX_PROMPTS = 60


def corpus() -> str:
    """The built-in synthetic corpus written out as books, with its facts' codes drawn from the
    64 codes the base model was fine-tuned on (CODES), so post-training does not teach other ones."""
    folder = os.path.join(RUNS, "corpus-codes")
    if not os.path.isdir(folder):
        os.makedirs(RUNS, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix="corpus-codes.tmp-", dir=RUNS)
        for i, text in enumerate(synthetic_texts(SyntheticConfig(seed=0, codes=CODES))):
            with open(os.path.join(tmp, f"doc{i:05d}.txt"), "w") as f:
                f.write(text)
        publish_dir(tmp, folder)
    return folder


def two_documents(rng: random.Random, counter) -> tuple[str, str, int, int]:
    """A distractor document and a target document that ends with a question about its fact."""
    name_a, name_b = rng.sample(NAMES, 2)
    code_a, code_b = rng.sample(range(CODES[0], CODES[1] + 1), 2)

    def filler(n):
        return filler_text(n, counter, seed=rng.randrange(10**9)).strip()

    doc_a = f"{filler(rng.randint(20, 200))} {FACT.format(name=name_a, code=code_a)} {filler(rng.randint(20, 200))}"
    question = QUESTION.format(name=name_b, code=code_b).rsplit(" ", 1)[0]
    doc_b = (f"{filler(rng.randint(20, 100))} {FACT.format(name=name_b, code=code_b)} "
             f"{filler(rng.randint(100, 300))} {question}")
    return doc_a, doc_b, code_a, code_b


@torch.no_grad()
def mixing(checkpoint: str, strategy: str) -> dict:
    """Answers to the second document's question, with and without the first document (the
    same 60 prompts for every model)."""
    model = from_pretrained(checkpoint).eval()
    tok = load_tokenizer(checkpoint)
    counter = tiktoken_tokenizer()
    rng = random.Random(0)
    counts = {"alone": 0, "with_other": 0, "took_other": 0}
    for _ in range(MIX_PROMPTS):
        doc_a, doc_b, code_a, code_b = two_documents(rng, counter)
        sep = [tok.eos_id] if STRATEGIES[strategy][0] else []
        for key, ids in (("alone", tok.encode(doc_b)), ("with_other", tok.encode(doc_a) + sep + tok.encode(doc_b))):
            out = generate(model, torch.tensor([ids]), steps=4, gen_length=4, block_length=4)
            answer = tok.decode(out[0, len(ids):].tolist())
            counts[key] += str(code_b) in answer
            if key == "with_other":
                counts["took_other"] += str(code_a) in answer
    return {k: 100 * v / MIX_PROMPTS for k, v in counts.items()}


def one_run(base: str, strategy: str, seed: int) -> tuple[dict, float, float]:
    """Post-train, refresh and evaluate one (strategy, seed); returns its numbers and the
    training and evaluation seconds."""
    folder = os.path.join(RUNS, "masking", f"{strategy}-seed{seed}")
    records = train(folder, "--init", base, "--data", corpus(), "--seq-len", str(SEQ_LEN),
                    "--train-len", str(WINDOW), "--rope", "diffusion", "--mask", strategy,
                    "--batch-size", str(BATCH), "--max-steps", str(STEPS), "--lr", "5e-4",
                    "--warmup", "20", "--save-every", "100", "--log-every", "50",
                    "--seed", str(seed), "--cache-dir", os.path.join(RUNS, "cache"))
    ckpt, train_seconds = os.path.join(folder, "checkpoint"), records[-1]["elapsed_s"]
    # post-training on corpus text erases the answer-only skill of the base model (NIAH fell to
    # chance in the single-seed run), so each model gets the same short retrieval fine-tuning
    # again inside the 512 window before NIAH and the mixing test; perplexity is taken before it.
    # Both evaluations use each model's saved RoPE base (no --rope).
    sft = folder + "-retrieval"
    seconds, accuracy = retrieval_finetune(ckpt, sft, steps=REFRESH_STEPS, seed=seed)
    train_seconds += seconds
    lengths = [str(L) for L in EVAL_LENGTHS]
    niah, s1 = evaluate(sft, folder + "-niah", *NIAH_FLAGS, "--len", *lengths)
    ppl, s2 = evaluate(ckpt, folder + "-ppl", *PPL_FLAGS, "--len", *lengths)
    mix_file = folder + "-mixing.json"
    if os.path.isfile(mix_file):
        with open(mix_file) as f:
            mix = json.load(f)
    else:
        t = time.perf_counter()
        mix = {**mixing(sft, strategy), "seconds": time.perf_counter() - t}
        write_json(mix_file, mix)
    row = {"loss": float(np.mean([r["loss"] for r in records[-30:]])), "refresh": 100 * accuracy,
           **{f"niah{L}": s for L, s in mean_by_length(niah, "score", EVAL_LENGTHS).items()},
           **{f"ppl{L}": p for L, p in mean_by_length(ppl, "perplexity", EVAL_LENGTHS).items()},
           **{k: mix[k] for k in ("alone", "with_other", "took_other")}}
    log(f"{strategy} seed {seed}: {row}")
    return row, train_seconds, s1 + s2 + mix["seconds"]


PAIRS = [("eod", "adaptive"), ("concat", "adaptive"), ("concat", "eod")]


def paired(runs: dict, key: str, a: str, b: str, digits: int = 1) -> tuple[str, float, float]:
    """The per-seed difference a - b of one metric (the seeds pair the runs): its mean and 95%
    t-interval as the tables show them, and the interval's (low, high); perplexity as the ratio
    a / b, its interval that of log a - log b."""
    va, vb = [r[key] for r in runs[a]], [r[key] for r in runs[b]]
    if not key.startswith("ppl"):
        mean, low, high = paired_interval(va, vb)
        return f"{mean:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]", low, high
    mean, low, high = paired_interval(np.log(va), np.log(vb))  # the ratio is what matters
    return f"x{np.exp(mean):.3f} [{np.exp(low):.3f}, {np.exp(high):.3f}]", low, high


def claim_rows(runs: dict) -> tuple[list[str], str]:
    """eod - adaptive per metric and length: mean, 95% t-interval, and what it supports; and
    the verdict on the paper's claim (eod better at the shorter lengths, adaptive at the
    longest), which holds only where every such interval says so."""
    rows, verdicts = [], {}
    for metric, name in (("ppl", "perplexity"), ("niah", "NIAH")):
        for L in EVAL_LENGTHS:
            shown, low, high = paired(runs, f"{metric}{L}", "eod", "adaptive")
            lower_is_better = metric == "ppl"
            eod_better = high < 0 if lower_is_better else low > 0
            ada_better = low > 0 if lower_is_better else high < 0
            verdict = "eod better" if eod_better else "adaptive better" if ada_better else "no difference shown"
            rows.append(f"| {name} | {L} | {shown} | {verdict} |")
            verdicts[name, L] = verdict
    *shorter, longest = EVAL_LENGTHS
    findings = []
    for name in ("perplexity", "NIAH"):
        wanted = all(verdicts[name, L] == "eod better" for L in shorter) and \
            verdicts[name, longest] == "adaptive better"
        seen = ", ".join(f"{verdicts[name, L]} at {L}" for L in EVAL_LENGTHS)
        findings.append(f"{name}: {'supported' if wanted else 'not supported'} ({seen})")
    return rows, "Verdict on the paper's claim at this scale: " + "; ".join(findings) + "."


def pairwise_rows(runs: dict, columns: list) -> list[str]:
    """Every metric, every pair of strategies (paired). A star marks an interval that excludes
    no difference (0, a ratio of 1)."""
    rows = ["| metric | " + " | ".join(f"{a} - {b}" for a, b in PAIRS) + " |",
            "|---|" + "---|" * len(PAIRS)]
    for key, title, digits in columns:
        cells = [paired(runs, key, a, b, max(digits, 1)) for a, b in PAIRS]
        rows.append(f"| {title} | " + " | ".join(
            f"{shown}{'*' if low > 0 or high < 0 else ''}" for shown, low, high in cells) + " |")
    return rows


def main():
    parser = argparse.ArgumentParser(description="Masking strategies, post-trained per seed.")
    parser.add_argument("--seed", type=int, choices=SEEDS, default=None, help="run only this "
                        "seed's three models and write nothing (a worker: start one per seed to "
                        "use more cores, then run without --seed to write the results)")
    parser.add_argument("--finished", action="store_true", help="write the results from the "
                        "seeds whose three models are finished, running nothing else (a partial "
                        "report; the text says how many seeds it holds)")
    args = parser.parse_args()
    started = time.perf_counter()
    base, _ = base_model()
    if args.seed is not None:
        for strategy in STRATEGIES:
            one_run(base, strategy, args.seed)
        return
    seeds = [seed for seed in SEEDS if not args.finished or all(
        os.path.isfile(os.path.join(RUNS, "masking", f"{s}-seed{seed}-mixing.json")) for s in STRATEGIES)]
    runs, train_seconds, eval_seconds = {s: [] for s in STRATEGIES}, 0.0, 0.0
    for seed in seeds:  # seed-major: an interrupted run leaves whole seeds for every strategy
        for strategy in STRATEGIES:
            row, t, e = one_run(base, strategy, seed)
            runs[strategy].append(row)
            train_seconds += t
            eval_seconds += e
    write_section("masking", report(runs, seeds, train_seconds, eval_seconds,
                                    time.perf_counter() - started))


def report(runs: dict, seeds: list[int], train_seconds: float, eval_seconds: float,
           total: float) -> str:
    """The markdown of experiments/results/masking.md from every (strategy, seed)'s numbers."""
    L = EVAL_LENGTHS
    columns = ([("loss", "final training loss", 3), ("refresh", "retrieval in the window after refresh (%)", 0)]
               + [(f"ppl{n}", f"PPL {n}", 2) for n in L] + [(f"niah{n}", f"NIAH {n}", 0) for n in L]
               + [("alone", "code found, one document (%)", 0),
                  ("with_other", "code found, two documents (%)", 0),
                  ("took_other", "took the other document's code (%)", 0)])
    table = ["| strategy | " + " | ".join(title for _, title, _ in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    table += [f"| {s} | " + " | ".join(mean_sd([r[k] for r in runs[s]], d) for k, _, d in columns) + " |"
              for s in STRATEGIES]
    per_seed = ["| strategy | seed | " + " | ".join(f"PPL {n}" for n in L) + " | "
                + " | ".join(f"NIAH {n}" for n in L) + " |", "|---|---:|" + "---:|" * 2 * len(L)]
    per_seed += [f"| {s} | {seed} | " + " | ".join(f"{r[f'ppl{n}']:.2f}" for n in L) + " | "
                 + " | ".join(f"{r[f'niah{n}']:.0f}" for n in L) + " |"
                 for s in STRATEGIES for seed, r in zip(seeds, runs[s])]
    claim = claim_rows(runs)
    return "\n".join([
        f"Each strategy post-trains the base model of experiment 1 (after its retrieval "
        f"fine-tuning) for {STEPS} steps x {BATCH} sequences of "
        f"{SEQ_LEN} tokens ({SEQ_LEN // WINDOW}x its window, the longest evaluated length; "
        f"diffusion-aware base for {SEQ_LEN}; lr 5e-4) on the synthetic corpus with codes "
        f"{CODES[0]}-{CODES[1]}, once per seed {', '.join(map(str, seeds))} (the seed sets the "
        f"data order and masks; the three strategies of one seed see the same data). After "
        f"post-training each model gets a {REFRESH_STEPS}-step retrieval fine-tuning inside the "
        f"512 window with LLaDA's SFT loss (diffusion.sft_loss, same seed); NIAH and mixing use the "
        f"refreshed models, perplexity the post-trained ones. Every model is evaluated with its "
        f"own saved RoPE base (no re-scaling at evaluation). {PROTOCOL}; mixing: {MIX_PROMPTS} "
        f"prompts of two documents (the question, about the second document's code, ends the "
        f"prompt; the first document states another code). The evaluation prompts are the same "
        f"for every model. The training loss is the mean of the last 30 steps (eod's includes "
        f"its separator tokens).",
        "",
        f"Scale: {STEPS} post-training and {REFRESH_STEPS} refresh steps per model, fewer than "
        "the earlier single-seed run's 300 and 400, so that three seeds of three strategies fit "
        "in about an hour of a shared 2-core CPU. With so few steps the strategies have little "
        "room to diverge; read the intervals, not the means.",
        "",
        f"Mean ± standard deviation over {len(seeds)} seeds:",
        "",
        *table,
        "",
        "The paper's ablation claim, eod better than adaptive at short and medium lengths and "
        "adaptive better at the longest: eod - adaptive per seed (paired by seed), mean and 95% "
        f"t-interval over the {len(seeds)} seeds (perplexity as the ratio eod / adaptive). A "
        "difference is called shown only when the interval excludes zero (ratio 1).",
        "",
        "| metric | length | eod - adaptive, mean [95% interval] | verdict |",
        "|---|---:|---|---|",
        *claim[0],
        "",
        claim[1],
        "",
        "All pairs, every metric: the per-seed difference (perplexity: ratio), mean and 95% "
        "t-interval over the seeds; * marks an interval that excludes no difference.",
        "",
        *pairwise_rows(runs, columns),
        "",
        "Per seed:",
        "",
        *per_seed,
        "",
        f"Written by `python -m experiments.masking` (post-training and refresh "
        f"{minutes(train_seconds)} as logged, evaluation {minutes(eval_seconds)}; "
        f"{minutes(total)} this run, which reuses finished steps and cells).",
    ])


if __name__ == "__main__":
    main()
