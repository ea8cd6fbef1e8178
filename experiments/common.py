"""
common.py: what the experiments share: a tiny model with a word-level vocabulary, the
pre-trained base model they all start from, running train.py and evaluate.py, and writing the
results files experiments/results/*.md.

Why a word-level vocabulary: the built-in synthetic corpus uses about 1,100 distinct words, and
with tiktoken's 100K-token output layer 90% of a tiny model's training FLOPs go into that layer.
A word-level tokenizer.json (the same code path as LLaDA-8B's tokenizer.json) makes training
about ten times faster, which is what lets a 2-core CPU pre-train a model that retrieves.
Everything else is the project's own code, run through its command lines.
"""
import json
import os
import random
import subprocess
import sys
import time

import numpy as np
import torch

from diffusion import sft_loss
from harness.checkpoint import from_pretrained, save_pretrained
from harness.files import write_json, write_text
from harness.prepare import (FACT, NAMES, QUESTION, SyntheticConfig, filler_sentence, filler_text,
                             synthetic_texts)
from harness.results import read_results
from harness.tokenizer import load_tokenizer, tiktoken_tokenizer
from model import LLaDA, preset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RUNS = os.path.join(ROOT, "experiments", "runs")  # checkpoints and raw results (git-ignored)
RESULTS = os.path.join(ROOT, "experiments", "results")  # tables and plots (committed)
WINDOW = 512  # the pre-training context of the base model
SEED = 0
BASE_STEPS = 1000
SFT_STEPS = 2500
# Secret codes of the fine-tuning prompts and of the needle. A 2-layer model copies one of 64
# codes after ~2,000 steps; with all 900 three-digit codes it had learned nothing after 1,500.
CODES = (100, 163)
# Evaluation settings shared by the experiments, lighter than the paper's protocol so that each
# script fits in about 30 minutes: the answer (a 3-digit code) is 1 token, so 8 tokens decoded
# in 8 steps suffice; perplexity uses 1 document and 4 draws per 64-token chunk.
DEPTHS = ["0", "25", "50", "75", "100"]
REPEATS = 2
NIAH_FLAGS = ["--task", "niah", "--needle", "The secret code of Mira Holt is 142.", "--keyword", "142",
              "--depths", *DEPTHS, "--repeats", str(REPEATS),
              "--gen-length", "8", "--block-length", "8", "--steps", "8"]
PPL_FLAGS = ["--task", "ppl", "--docs", "1", "--draws", "4", "--cache-dir", os.path.join(RUNS, "cache")]
PROTOCOL = (f"NIAH: {len(DEPTHS)} depths x {REPEATS} repeats, 8 answer tokens in 8 steps; "
            f"perplexity: 1 held-out synthetic document, 64-token chunks, 4 draws each")

NEEDLE = FACT.format(name="Mira Holt", code=142)
QUESTION_PROMPT = QUESTION.format(name="Mira Holt", code=417).rsplit(" ", 1)[0]  # "... It is"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def initial_checkpoint(path: str) -> str:
    """A randomly initialised tiny LLaDA with a word-level tokenizer.json covering the synthetic
    corpus, as a checkpoint directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    split = pre_tokenizers.Whitespace()
    texts = synthetic_texts(SyntheticConfig()) + [filler_text(2000, tiktoken_tokenizer()),
                                                  NEEDLE, QUESTION_PROMPT]
    words = {w for t in texts for w, _ in split.pre_tokenize_str(t)}
    words |= {str(n) for n in range(100, 1000)}  # every secret code, seen in training or not
    vocab = {w: i for i, w in enumerate(["[UNK]"] + sorted(words))}
    eos, mask = len(vocab), len(vocab) + 1
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = split
    tok.add_special_tokens(["[EOS]", "[MASK]"])  # ids eos and mask: decode skips them
    assert tok.token_to_id("[EOS]") == eos and tok.token_to_id("[MASK]") == mask
    os.makedirs(RUNS, exist_ok=True)
    tok_file = os.path.join(RUNS, "word_tokenizer.json")
    tok.save(tok_file)
    size = len(vocab) + 2
    cfg = preset("tiny", vocab_size=size, embedding_size=size, eos_token_id=eos, pad_token_id=eos,
                 mask_token_id=mask, max_sequence_length=WINDOW)
    model = LLaDA(cfg)
    model.init_weights(SEED)
    save_pretrained(path, cfg, model.state_dict(), extra_files={"tokenizer.json": tok_file})
    return path


def run(script: str, *args: str) -> None:
    """Run one of the project's scripts as a user would."""
    subprocess.run([sys.executable, script, *args], cwd=ROOT, check=True)


def train(out: str, *args: str) -> list[dict]:
    """train.py into `out`, resuming an interrupted attempt (a finished one returns at once);
    returns its log.jsonl records, whose elapsed_s counts a resumed run's earlier time too."""
    resume = ["--resume"] if os.path.isfile(os.path.join(out, "checkpoint", "train_state.json")) else []
    run("train.py", "--out", out, *args, *resume)
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def base_model() -> tuple[str, dict]:
    """The base model every experiment starts from: pre-trained with the masked-diffusion loss
    at a 512-token window on the built-in synthetic corpus (the language model, "lm"), then
    fine-tuned to answer questions about a fact inside that window (retrieval_finetune).
    Returns its checkpoint and {"lm": the language model's checkpoint, "text": how they were
    made, for the results files}."""
    out = os.path.join(RUNS, "base")
    pretrain_seconds = train(
        out, "--init", initial_checkpoint(os.path.join(RUNS, "init")), "--seq-len", str(WINDOW),
        "--rope", "none", "--mask", "adaptive", "--batch-size", "8", "--lr", "2e-3", "--warmup",
        "50", "--schedule", "cosine", "--max-steps", str(BASE_STEPS), "--save-every", "250",
        "--log-every", "100", "--seed", str(SEED), "--cache-dir", os.path.join(RUNS, "cache"),
    )[-1]["elapsed_s"]
    lm, sft = os.path.join(out, "checkpoint"), os.path.join(RUNS, "retrieval")
    sft_seconds, accuracy = retrieval_finetune(lm, sft)
    # what the fine-tuning does to language modelling: perplexity inside the window, both models
    ppl = {name: evaluate(path, os.path.join(RUNS, f"window-ppl-{name}"), *PPL_FLAGS,
                          "--len", str(WINDOW))[0][0]["perplexity"]
           for name, path in (("lm", lm), ("sft", sft))}
    text = (
        f"Base model: tiny LLaDA (2 layers, d_model 128, word-level vocabulary), seed {SEED}. "
        f"Pre-trained with the masked-diffusion loss for {BASE_STEPS} steps x 8 sequences of "
        f"{WINDOW} tokens on the built-in synthetic corpus ({minutes(pretrain_seconds)}), then "
        f"fine-tuned {SFT_STEPS} steps x 16 prompts with LLaDA's SFT loss (diffusion.sft_loss: "
        f"the prompt never masked, the masked-answer cross-entropy / p normalised by the answer "
        f"length) to answer a question about a fact stated in a haystack inside the window, "
        f"codes {CODES[0]}-{CODES[1]}, haystacks growing to the full window over the first 60% "
        f"of the steps ({minutes(sft_seconds)}); it then answers {accuracy:.0%} of 64 held-out "
        f"prompts with every answer token masked (chance: {1 / (CODES[1] - CODES[0] + 1):.1%}). "
        f"Why the fine-tuning: in an earlier run, pre-training alone never taught the model to "
        f"retrieve a needle, and a 2-layer model learns to copy one of 900 codes far more slowly "
        f"than one of 64. The fine-tuning trains answers only and costs language modelling "
        f"(perplexity at {WINDOW} tokens: {ppl['lm']:.2f} before it, {ppl['sft']:.3g} after), so "
        f"perplexity is measured on the pre-trained model and NIAH on the fine-tuned one.")
    return sft, {"lm": lm, "text": text}


def retrieval_batch(tok, rng: random.Random, batch: int, gen: int, longest: int = WINDOW - 48
                    ) -> torch.Tensor:
    """Needle-in-a-haystack prompts inside the window: filler, a fact at a random sentence
    boundary, more filler, the question; the answer (code, ".", EOS padding) is `gen` tokens."""
    n = rng.randint(16, longest)  # haystack tokens: one length per batch, rows stay equal
    rows = []
    for _ in range(batch):
        name, code = rng.choice(NAMES), rng.randint(*CODES)
        hay, ends = [], []
        while len(hay) < n:
            hay += tok.encode(filler_sentence(rng))
            ends.append(len(hay))
        extra = len(hay) - n  # drop the surplus from the front, keep the sentence ends
        hay, ends = hay[extra:], [0] + [e - extra for e in ends if e - extra > 0]
        cut = rng.choice(ends)
        text = hay[:cut] + tok.encode(FACT.format(name=name, code=code)) + hay[cut:]
        question = tok.encode(QUESTION.format(name=name, code=code).rsplit(" ", 1)[0])
        answer = (tok.encode(f"{code}.") + [tok.eos_id] * gen)[:gen]
        rows.append(text + question + answer)
    width = min(map(len, rows))  # names of other lengths (other tokenizers): trim the front
    rows = [r[len(r) - width:] for r in rows]
    return torch.tensor(rows)  # (B, L)


def retrieval_finetune(src: str, dst: str, steps: int = SFT_STEPS, batch: int = 16, gen: int = 8,
                       lr: float = 1e-3, seed: int = SEED) -> tuple[float, float]:
    """Supervised fine-tuning on retrieval prompts inside the window, so that the model answers
    a question about a fact it was told. The objective is LLaDA's SFT loss (diffusion.sft_loss):
    the prompt is never masked, each answer token is masked with probability p ~ U(eps, 1) per
    row, and the masked-answer cross-entropy / p is normalised by the answer length (`gen`
    tokens: the code, ".", EOS padding). Haystacks grow from 16 tokens to the full window over
    the first 60% of the steps (a curriculum), and the codes are CODES. Returns (seconds,
    retrieval accuracy on 64 held-out prompts, judged at t = 1: every answer token masked, which
    is what the sampler's first step sees)."""
    done = os.path.join(dst, "finetune.json")
    if os.path.isfile(done):
        with open(done) as f:
            info = json.load(f)
        return info["seconds"], info["accuracy"]
    t = time.perf_counter()
    torch.manual_seed(seed)
    model, tok = from_pretrained(src), load_tokenizer(src)
    mask = model.config.mask_token_id
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    rng, longest = random.Random(seed), WINDOW - 48
    noise = torch.Generator().manual_seed(seed)  # the forward process's masks

    def answer_logits(x):
        return model.head(model(torch.cat([x[:, :-gen], torch.full_like(x[:, -gen:], mask)], 1))[:, -gen:])

    for step in range(steps):
        grow = min(1.0, step / (0.6 * steps))
        x = retrieval_batch(tok, rng, batch, gen, longest=int(16 + (longest - 16) * grow))  # (B, L)
        loss = sft_loss(model, x, [x.shape[1] - gen] * batch, noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % 250 == 0:
            log(f"retrieval fine-tuning step {step + 1}/{steps}: loss {loss.item():.3f}")
    model.eval()
    test_rng = random.Random(SEED + 1)
    with torch.no_grad():  # 4 batches of 16 prompts (each batch has its own haystack length)
        batches = [retrieval_batch(tok, test_rng, 16, gen) for _ in range(4)]
        accuracy = sum((answer_logits(x)[:, 0].argmax(-1) == x[:, -gen]).sum().item()
                       for x in batches) / 64
    seconds = time.perf_counter() - t
    log(f"retrieval fine-tuning done: {accuracy:.0%} of 64 held-out prompts answered ({minutes(seconds)})")
    save_pretrained(dst, model.config, model.state_dict(),
                    extra_files={"tokenizer.json": os.path.join(src, "tokenizer.json")})
    write_json(done, {"seconds": seconds, "accuracy": accuracy, "steps": steps, "lr": lr,
                   "batch": batch, "codes": CODES, "seed": seed, "objective": "diffusion.sft_loss"})
    return seconds, accuracy


def mean_by_length(cells: list[dict], key: str, lengths: list[int]) -> dict[int, float]:
    """The mean of each length's cells' `key` (a NIAH score, a perplexity)."""
    return {L: float(np.mean([c[key] for c in cells if c["length"] == L])) for L in lengths}


def evaluate(model: str, results: str, *args: str) -> tuple[list[dict], float]:
    """evaluate.py into `results` (finished cells are kept); returns every cell's JSON and the
    seconds the cells took, summed from their JSONs (so a rerun that reuses them reports them)."""
    run("evaluate.py", "--model", model, "--results", results, *args)
    cells = list(read_results(results, args[args.index("--task") + 1]).values())
    return cells, sum(c["seconds"] for c in cells)


def write_section(name: str, markdown: str) -> None:
    """Write experiments/results/<name>.md (the README links these files; it holds no results)."""
    path = os.path.join(RESULTS, f"{name}.md")
    write_text(path, markdown + "\n")
    log(f"wrote {os.path.relpath(path, ROOT)}")


# Two-sided 95% quantiles of Student's t by degrees of freedom (n - 1 for n seeds).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def mean_sd(values, digits: int = 1) -> str:
    """'mean ± sd' over seeds (sample standard deviation), the spread every table carries."""
    v = np.asarray(values, dtype=float)
    sd = v.std(ddof=1) if len(v) > 1 else float("nan")
    return f"{v.mean():.{digits}f} ± {sd:.{digits}f}"


def paired_interval(a, b) -> tuple[float, float, float]:
    """Mean of the per-seed differences a - b and its 95% t-interval (low, high): the seeds pair
    the runs (same data order and evaluation prompts), so the difference is the fair test."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    half = T95[len(d) - 1] * d.std(ddof=1) / np.sqrt(len(d))
    return d.mean(), d.mean() - half, d.mean() + half


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"
