"""
common.py: what the three experiments share: a tiny model with a word-level vocabulary, the
pre-trained base model they all start from, running train.py and evaluate.py, and writing the
README's results sections.

Why a word-level vocabulary: the built-in synthetic corpus uses about 1,100 distinct words, and
with tiktoken's 100K-token output layer 90% of a tiny model's training FLOPs go into that layer.
A word-level tokenizer.json (the same code path as LLaDA-8B's tokenizer.json) makes training
about ten times faster, which is what lets a 2-core CPU pre-train a model that retrieves.
Everything else is the project's own code, run through its command lines.
"""
import json
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import random  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from data import (FACT, NAMES, QUESTION, SyntheticConfig, filler_sentence, filler_text,  # noqa: E402
                  load_tokenizer, synthetic_texts, tiktoken_tokenizer)
from diffusion import forward_process  # noqa: E402
from model import LLaDA, from_pretrained, preset, save_pretrained  # noqa: E402

RUNS = os.path.join(ROOT, "experiments", "runs")  # checkpoints and raw results (git-ignored)
RESULTS = os.path.join(ROOT, "experiments", "results")  # tables and plots (committed)
WINDOW = 512  # the pre-training context of the base model
SEED = 0
BASE_STEPS = 1000
# Evaluation settings shared by the experiments, lighter than the paper's protocol so that each
# script fits in about 30 minutes: the answer (a 3-digit code) is 1 token, so 8 tokens decoded
# in 8 steps suffice; perplexity uses 1 document and 4 draws per 64-token chunk.
DEPTHS = ["0", "25", "50", "75", "100"]
REPEATS = 2
NIAH_FLAGS = ["--task", "niah", "--depths", *DEPTHS, "--repeats", str(REPEATS),
              "--gen-length", "8", "--block-length", "8", "--steps", "8"]
PPL_FLAGS = ["--task", "ppl", "--docs", "1", "--draws", "4"]
PROTOCOL = (f"NIAH: {len(DEPTHS)} depths x {REPEATS} repeats, 8 answer tokens in 8 steps; "
            f"perplexity: 1 held-out synthetic document, 64-token chunks, 4 draws each")

NEEDLE = FACT.format(name="Mira Holt", code=417)
QUESTION_PROMPT = QUESTION.format(name="Mira Holt", code=417).rsplit(" ", 1)[0]  # "... It is"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def word_tokenizer(path: str) -> tuple[int, int, int]:
    """Write a word-level tokenizer.json covering the synthetic corpus; returns (size, eos, mask)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

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
    tok.save(path)
    return len(vocab) + 2, eos, mask


def initial_checkpoint(path: str) -> str:
    """A randomly initialised tiny LLaDA with the word vocabulary, as a checkpoint directory."""
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    os.makedirs(RUNS, exist_ok=True)
    tok_file = os.path.join(RUNS, "word_tokenizer.json")
    size, eos, mask = word_tokenizer(tok_file)
    cfg = preset("tiny", vocab_size=size, embedding_size=size, eos_token_id=eos, pad_token_id=eos,
                 mask_token_id=mask, max_sequence_length=WINDOW)
    model = LLaDA(cfg)
    model.init_weights(SEED)
    save_pretrained(path, cfg, model.state_dict(), extra_files={"tokenizer.json": tok_file})
    return path


def run(script: str, *args: str) -> float:
    """Run one of the project's scripts as a user would; returns its wall time in seconds."""
    t = time.perf_counter()
    subprocess.run([sys.executable, script, *args], cwd=ROOT, check=True)
    return time.perf_counter() - t


def train(out: str, *args: str) -> float:
    """train.py into `out`, resuming an interrupted attempt (a finished one returns at once)."""
    resume = ["--resume"] if os.path.isfile(os.path.join(out, "checkpoint", "train_state.json")) else []
    return run("train.py", "--out", out, *args, *resume)


def base_model() -> tuple[str, float]:
    """The base model: pre-trained with the masked-diffusion loss at a 512-token window on the
    built-in synthetic corpus, until it retrieves facts within its window."""
    out = os.path.join(RUNS, "base")
    init = initial_checkpoint(os.path.join(RUNS, "init"))
    seconds = train(out, "--init", init, "--seq-len", str(WINDOW), "--rope", "none",
                    "--mask", "adaptive", "--batch-size", "8", "--lr", "2e-3", "--warmup", "50",
                    "--schedule", "cosine", "--max-steps", str(BASE_STEPS), "--save-every", "250",
                    "--log-every", "100", "--seed", str(SEED),
                    "--cache-dir", os.path.join(RUNS, "cache"))
    return os.path.join(out, "checkpoint"), seconds


def retrieval_batch(tok, rng: random.Random, batch: int, gen: int) -> tuple[torch.Tensor, int]:
    """Needle-in-a-haystack prompts inside the window: filler, a fact at a random sentence
    boundary, more filler, the question; the answer (code, ".", EOS padding) is `gen` tokens."""
    n = rng.randint(16, WINDOW - 48)  # haystack tokens: one length per batch, rows stay equal
    rows = []
    for _ in range(batch):
        name, code = rng.choice(NAMES), rng.randint(100, 999)
        hay = []
        while len(hay) < n:
            hay.append(tok.encode(filler_sentence(rng)))
        cut = rng.randint(0, len(hay))
        text = [t for s in hay[:cut] for t in s] + tok.encode(FACT.format(name=name, code=code)) + \
            [t for s in hay[cut:] for t in s]
        question = tok.encode(QUESTION.format(name=name, code=code).rsplit(" ", 1)[0])
        answer = (tok.encode(f"{code}.") + [tok.eos_id] * gen)[:gen]
        rows.append(text[len(text) - n - 8:] + question + answer)  # same length for every row
    return torch.tensor(rows), gen  # (B, L)


def retrieval_finetune(src: str, dst: str, steps: int, batch: int = 16, gen: int = 8,
                       lr: float = 1e-3) -> float:
    """LLaDA's SFT loss (only the answer is noised; CE / p over its masked tokens) on retrieval
    prompts inside the window, so the base model answers questions about a fact it was told."""
    if os.path.isfile(os.path.join(dst, "config.json")):
        return 0.0
    t = time.perf_counter()
    torch.manual_seed(SEED)
    model, tok = from_pretrained(src), load_tokenizer(src)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    rng, g = random.Random(SEED), torch.Generator().manual_seed(SEED)
    for step in range(steps):
        x, gen = retrieval_batch(tok, rng, batch, gen)
        noisy_answer, masked_answer, p = forward_process(x[:, -gen:], model.config.mask_token_id, g)
        noisy = torch.cat([x[:, :-gen], noisy_answer], 1)
        masked = torch.cat([torch.zeros_like(x[:, :-gen], dtype=torch.bool), masked_answer], 1)
        hidden = model(noisy)[masked]  # (N, d)
        ce = F.cross_entropy(model.head(hidden), x[masked], reduction="none")
        loss = (ce / p[:, None].expand_as(masked)[masked]).sum() / (batch * gen)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % 100 == 0:
            log(f"retrieval fine-tuning step {step + 1}/{steps}: loss {loss.item():.3f}")
    save_pretrained(dst, model.config, model.state_dict(),
                    extra_files={"tokenizer.json": os.path.join(src, "tokenizer.json")})
    return time.perf_counter() - t


def evaluate(model: str, results: str, *args: str) -> tuple[list[dict], float]:
    """evaluate.py into `results` (finished cells are kept); returns every cell's JSON."""
    seconds = run("evaluate.py", "--model", model, "--results", results,
                  "--cache-dir", os.path.join(RUNS, "cache"), *args)
    cells = []
    for name in sorted(os.listdir(results)):
        if name.endswith(".json"):
            with open(os.path.join(results, name)) as f:
                cells.append(json.load(f))
    return cells, seconds


def write_section(name: str, markdown: str) -> None:
    """Replace the README's results section `name` (between its markers) and save a copy."""
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"{name}.md"), "w") as f:
        f.write(markdown + "\n")
    readme = os.path.join(ROOT, "README.md")
    with open(readme) as f:
        text = f.read()
    begin, end = f"<!-- results:{name} -->", f"<!-- /results:{name} -->"
    if begin not in text:
        raise SystemExit(f"README.md has no {begin} marker")
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: f"{begin}\n{markdown}\n{end}", text)
    with open(readme, "w") as f:
        f.write(text)
    log(f"wrote README section {name} and {os.path.relpath(os.path.join(RESULTS, name + '.md'), ROOT)}")


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"
