"""
Experiment 2: the document masking strategy of post-training, in miniature (PAPER.md section 3).

From the base model of experiment 1 (pre-trained at 512 tokens), post-train three copies at 4x
the window (2048-token packed sequences, diffusion-aware NTK base for 2048) with the same data
order, steps and seed, one per strategy: concat, eod, adaptive. Then compare
  - needle in a haystack at 2048 and 4096 tokens,
  - perplexity of held-out documents at 2048 and 4096 tokens,
  - cross-document mixing: a prompt holds two documents, each with its own secret code, and asks
    for the code of the second; how often does the answer take the first document's code?
    (The paper: models post-trained with concat "produce incoherent results, possibly because of
    the mutual penetration of irrelevant content".) The prompt is given the way each model was
    trained (an EOS token between the documents for eod, none otherwise) with full attention,
    as a user's prompt would be; a single-document control measures retrieval alone.
Writes experiments/results/masking.md and the README section "masking".

    python experiments/masking.py          # about 13 minutes on 2 CPU cores after experiment 1
"""
import os
import random
import time

import numpy as np
import torch

from common import (CODES, NIAH_FLAGS, PPL_FLAGS, PROTOCOL, RUNS, SEED, WINDOW, base_model, evaluate,
                    log, minutes, retrieval_finetune, train, write_section)
from checkpoint import from_pretrained  # noqa: E402
from diffusion import generate  # noqa: E402
from masks import STRATEGIES  # noqa: E402
from prepare import FACT, NAMES, QUESTION, SyntheticConfig, filler_text, synthetic_texts  # noqa: E402
from tokenizer import load_tokenizer, tiktoken_tokenizer  # noqa: E402

SEQ_LEN = 4 * WINDOW
STEPS = 300
REFRESH_STEPS = 400
EVAL_LENGTHS = [SEQ_LEN, 2 * SEQ_LEN]
MIX_PROMPTS = 60


def corpus() -> str:
    """The built-in synthetic corpus written out as books, with its facts' codes drawn from the
    64 codes the base model was fine-tuned on (CODES), so post-training does not teach other ones."""
    folder = os.path.join(RUNS, "corpus-codes")
    if not os.path.isdir(folder):
        tmp = folder + ".tmp"
        os.makedirs(tmp, exist_ok=True)
        for i, text in enumerate(synthetic_texts(SyntheticConfig(seed=SEED, codes=CODES))):
            with open(os.path.join(tmp, f"doc{i:05d}.txt"), "w") as f:
                f.write(text)
        os.rename(tmp, folder)
    return folder


def post_train(base: str, strategy: str) -> tuple[str, list[dict]]:
    out = os.path.join(RUNS, "masking", strategy)
    log_records = train(out, "--init", base, "--data", corpus(), "--seq-len", str(SEQ_LEN),
                        "--train-len", str(WINDOW), "--rope", "diffusion", "--mask", strategy,
                        "--batch-size", "2", "--max-steps", str(STEPS), "--lr", "5e-4",
                        "--warmup", "20", "--save-every", "100", "--log-every", "50",
                        "--seed", str(SEED), "--cache-dir", os.path.join(RUNS, "cache"))
    return os.path.join(out, "checkpoint"), log_records


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
    """Answers to the second document's question, with and without the first document."""
    model = from_pretrained(checkpoint).eval()
    tok = load_tokenizer(checkpoint)
    counter = tiktoken_tokenizer()
    rng = random.Random(SEED)
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


def main():
    started = time.perf_counter()
    base, _ = base_model()
    rows, train_seconds, eval_seconds = {}, 0.0, 0.0
    for strategy in STRATEGIES:
        ckpt, records = post_train(base, strategy)
        train_seconds += records[-1]["elapsed_s"]
        rope = ["--rope", "diffusion", "--train-len", str(WINDOW)]
        # post-training on corpus text erases the answer-only skill of the base model (NIAH fell
        # to chance for every strategy), so each gets the same short retrieval fine-tuning again
        # inside the 512 window before NIAH and the mixing test; perplexity is taken before it
        sft = os.path.join(RUNS, "masking", f"{strategy}-retrieval")
        seconds, accuracy = retrieval_finetune(ckpt, sft, steps=REFRESH_STEPS)
        train_seconds += seconds
        niah, s1 = evaluate(sft, os.path.join(RUNS, "masking", f"niah-{strategy}"), *NIAH_FLAGS,
                            "--len", *map(str, EVAL_LENGTHS), *rope)
        ppl, s2 = evaluate(ckpt, os.path.join(RUNS, "masking", f"ppl-{strategy}"), *PPL_FLAGS,
                           "--len", *map(str, EVAL_LENGTHS), *rope)
        t = time.perf_counter()
        mix = mixing(sft, strategy)
        eval_seconds += s1 + s2 + time.perf_counter() - t
        rows[strategy] = {
            "loss": float(np.mean([r["loss"] for r in records[-30:]])), "refresh": 100 * accuracy,
            **{f"niah{L}": np.mean([c["score"] for c in niah if c["length"] == L]) for L in EVAL_LENGTHS},
            **{f"ppl{L}": np.mean([c["perplexity"] for c in ppl if c["length"] == L]) for L in EVAL_LENGTHS},
            **mix,
        }
        log(f"{strategy}: {rows[strategy]}")

    L1, L2 = EVAL_LENGTHS
    table = [
        f"| strategy | final training loss | PPL {L1} | PPL {L2} | retrieval in the window after "
        f"refresh | NIAH {L1} | NIAH {L2} | "
        "code found, one document | code found, two documents | took the other document's code |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ] + [f"| {s} | {r['loss']:.3f} | {r[f'ppl{L1}']:.2f} | {r[f'ppl{L2}']:.2f} | {r['refresh']:.0f}% | "
         f"{r[f'niah{L1}']:.0f} | {r[f'niah{L2}']:.0f} | {r['alone']:.0f}% | {r['with_other']:.0f}% | {r['took_other']:.0f}% |"
         for s, r in rows.items()]
    total = time.perf_counter() - started
    text = "\n".join([
        f"Each strategy post-trains the base model of experiment 1 for {STEPS} steps x 2 sequences "
        f"of {SEQ_LEN} tokens (4x its window; diffusion-aware base for {SEQ_LEN}; lr 5e-4; seed "
        f"{SEED}; the same data order) on the synthetic corpus with codes {CODES[0]}-{CODES[1]}. {PROTOCOL}; mixing: {MIX_PROMPTS} prompts of two documents (the question, about "
        f"the second document's code, ends the prompt; the first document states another code). "
        f"After post-training, each model gets the same {REFRESH_STEPS}-step retrieval fine-tuning "
        "inside the 512 window (post-training alone left NIAH at chance for all three); NIAH and "
        "mixing use the refreshed models, perplexity the post-trained ones. The "
        "training loss is the mean of the last 30 steps (eod's includes its separator tokens).",
        "",
        *table,
        "",
        f"Written by `python experiments/masking.py` (post-training and refresh "
        f"{minutes(train_seconds)} as logged, evaluation cells {minutes(eval_seconds)}; "
        f"{minutes(total)} this run, which reuses finished steps and cells).",
    ])
    write_section("masking", text)


if __name__ == "__main__":
    main()
