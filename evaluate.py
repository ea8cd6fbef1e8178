"""
evaluate.py: needle in a haystack (NIAH) up to 131072 tokens, and long-document perplexity.

Paper map (shared/PAPER.md section 5). Both tasks follow the LongLLaDA / UltraLLaDA protocol:

    niah   a needle sentence is hidden at depths 0%, 10%, ..., 100% of a long haystack, a
           question about it is appended, and the model decodes 32 tokens in one block with
           16 steps. score = 100 if the needle's keyword is in the answer, otherwise
           0.2 * 100 * (1 - edit_distance / max_len) between the answer and the needle, both
           without whitespace (OpenCompass NeedleBench). Lengths are counted in tiktoken
           cl100k_base tokens; the picture is a depth x length heatmap in red-yellow-green.
    ppl    long documents scored in 64-token chunks given all the text before them, each chunk
           with 8 Monte Carlo draws of k ~ U{1..64} masked tokens (diffusion.chunk_nll); the
           perplexity is the running geometric mean, plotted against position.

What --len counts (NIAH): the whole prompt, haystack + needle + separator + question, is
exactly --len cl100k tokens; the answer's gen_length tokens come on top. The haystack window
ends at a sentence end (so at depth 100% the needle is the last sentence before the question)
and starts wherever --len places it. The needle goes to the last sentence boundary at or
before depth% of the haystack. --rope re-scales the checkpoint's RoPE base for each length,
which is the training-free comparison of the paper (LLaDA with and without NTK scaling).

Every cell (one length, depth and repeat, or one length and document) is one JSON file in the
results folder, written atomically; a rerun skips finished cells, so an interrupted run loses
at most the cell in progress. The heatmap, the tables and the summary are rebuilt from all of
them at the end.

    python evaluate.py --task niah --len 131072                 # out/checkpoint, synthetic haystack
    python evaluate.py --task niah --len 8192 16384 --rope critical --prompt-cache
    python evaluate.py --task ppl --len 4096 --data /path/pg19
"""
import argparse
import hashlib
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from data import (CACHE_DIR, TIKTOKEN_NAME, filler_text, load_corpus, load_tokenizer,
                  long_documents, tiktoken_tokenizer)
from diffusion import chunk_nll, cumulative_perplexity, generate
from model import CheckpointError, from_pretrained, read_config
from rope import METHODS

DEFAULT_MODEL = os.path.join("out", "checkpoint")  # where train.py writes
# A fact in the format of data.py's synthetic corpus, which is what our tiny models learn;
# for LLaDA-8B pass an OpenCompass-style needle, question and keyword.
DEFAULT_NEEDLE = "The secret code of Mira Holt is 417."
DEFAULT_QUESTION = "What is the secret code of Mira Holt? It is"
DEFAULT_KEYWORD = "417"


@dataclass
class EvalConfig:
    task: str = "niah"
    model: str = DEFAULT_MODEL
    len: list[int] = field(default_factory=list)
    rope: str | None = None
    train_len: int | None = None
    d_crit: int | None = None
    results: str | None = None
    overwrite: bool = False
    # NIAH
    depths: list[int] = field(default_factory=lambda: list(range(0, 101, 10)))
    repeats: int = 1
    haystack: str | None = None
    needle: str = DEFAULT_NEEDLE
    question: str = DEFAULT_QUESTION
    keyword: str = DEFAULT_KEYWORD
    separator: str = " "
    gen_length: int = 32
    block_length: int = 32
    steps: int = 16
    prompt_cache: bool = False
    # PPL
    data: str | None = None
    split: str = "validation"
    docs: int = 1
    chunk_size: int = 64
    draws: int = 8
    seed: int = 0
    cache_dir: str = CACHE_DIR
    # where it runs
    device: str | None = None
    dtype: str | None = None


class UserError(Exception):
    """Bad input: reported as one line, exit code 2, nothing written."""


def fail(message: str):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_args(argv=None) -> EvalConfig:
    p = argparse.ArgumentParser(
        description="Needle-in-a-haystack (heatmap of depth x length) and long-document perplexity "
                    "of a LLaDA checkpoint. Results: one JSON per cell, a rerun skips finished ones.")
    p.error = fail  # argparse prints its usage first; our errors are one line
    a = p.add_argument
    a("--task", default="niah", choices=("niah", "ppl"), help="niah (default) or ppl")
    a("--model", default=DEFAULT_MODEL, help=f"checkpoint directory (default {DEFAULT_MODEL}, "
      "where train.py writes)")
    a("--len", type=int, nargs="+", required=True, help="context length(s): niah counts the whole "
      "prompt (haystack, needle, separator, question) in cl100k tokens, e.g. --len 8192 16384 131072; ppl scores the first L model tokens "
      "of each document (a multiple of --chunk-size)")
    a("--rope", default=None, choices=METHODS, help="re-scale the checkpoint's RoPE base for each "
      "evaluated length: none, ntk, critical (LongLLaDA), diffusion (UltraLLaDA) or pi; default: "
      "use the checkpoint's base as saved")
    a("--train-len", type=int, default=None, help="with --rope: the context the base was trained "
      "for (default: the checkpoint's rope_scaling train_len, else max_sequence_length)")
    a("--d-crit", type=int, default=None, help="with --rope critical/diffusion: override the "
      "critical dimension")
    a("--results", default=None, help="results folder (default results/<model name>/<task>/)")
    a("--overwrite", action="store_true", help="redo cells that already have a result")
    a("--depths", type=int, nargs="+", default=list(range(0, 101, 10)),
      help="needle depths in percent of the haystack (default 0 10 ... 100)")
    a("--repeats", type=int, default=1, help="haystacks per (length, depth), each a different "
      "stretch of text (paper: 10; default 1)")
    a("--haystack", default=None, help="folder of long .txt texts (PG19 books, essays), read in "
      "name order; default: filler sentences of data.py's synthetic corpus (without its facts)")
    a("--needle", default=DEFAULT_NEEDLE, help=f"the sentence hidden in the haystack (default "
      f"'{DEFAULT_NEEDLE}', the synthetic corpus's format that our tiny models learn)")
    a("--question", default=DEFAULT_QUESTION, help=f"appended after the haystack (default "
      f"'{DEFAULT_QUESTION}')")
    a("--keyword", default=DEFAULT_KEYWORD, help="an answer containing it scores 100; it must "
      f"occur in the needle (default '{DEFAULT_KEYWORD}')")
    a("--separator", default=" ", help="text between the haystack and the question (default a "
      "space, as in the synthetic corpus; for LLaDA-8B e.g. $'\\n\\n')")
    a("--gen-length", type=int, default=32, help="answer tokens (paper: 32)")
    a("--block-length", type=int, default=32, help="tokens per decoding block (paper: 32, one block)")
    a("--steps", type=int, default=16, help="decoding steps (paper: 16)")
    a("--prompt-cache", action="store_true", help="reuse the prompt's keys and values while the "
      "answer is decoded (diffusion.py's approximate prefix cache): approaching --steps times "
      "faster as the context grows (4x at 8K, 12x at 32K on a CPU)")
    a("--data", default=None, help="ppl: folder of long .txt/.jsonl documents (default: the "
      "built-in synthetic corpus)")
    a("--split", default="validation", choices=("train", "validation", "test"), help="ppl: the "
      "split of the synthetic corpus or of a --data folder with split folders; a plain folder "
      "uses every document (default validation)")
    a("--docs", type=int, default=1, help="ppl: documents per length, longest first (default 1)")
    a("--chunk-size", type=int, default=64, help="ppl: tokens per chunk (paper: 64)")
    a("--draws", type=int, default=8, help="ppl: Monte Carlo draws per chunk (paper: 8)")
    a("--seed", type=int, default=0, help="seed of the synthetic haystack (niah) and of the masks "
      "(ppl) (default 0)")
    a("--cache-dir", default=CACHE_DIR, help=f"ppl: token cache of the corpus (default {CACHE_DIR})")
    a("--device", default=None, help="cuda or cpu (default cuda when available)")
    a("--dtype", default=None, choices=("float32", "bfloat16"),
      help="default bfloat16 on CUDA, float32 on CPU")
    return EvalConfig(**vars(p.parse_args(argv)))


# ---------------------------------------------------------------------------------------------
# Checks that need nothing loaded: everything a user can get wrong fails before any work.

def check_config(cfg: EvalConfig) -> None:
    if not os.path.isfile(os.path.join(cfg.model, "config.json")):
        if cfg.model == DEFAULT_MODEL:
            raise UserError(f"no checkpoint in {DEFAULT_MODEL}; run train.py first, or pass "
                            f"--model DIR")
        raise UserError(f"--model {cfg.model} is not a checkpoint directory (no config.json)")
    if min(cfg.len) <= 0:
        raise UserError(f"--len must be positive token counts, got {min(cfg.len)}")
    if (cfg.train_len is not None or cfg.d_crit is not None) and not cfg.rope:
        raise UserError("--train-len and --d-crit only apply with --rope METHOD")
    positive = dict(repeats=cfg.repeats, steps=cfg.steps, gen_length=cfg.gen_length,
                    block_length=cfg.block_length, docs=cfg.docs, chunk_size=cfg.chunk_size,
                    draws=cfg.draws, train_len=cfg.train_len, d_crit=cfg.d_crit)
    for name, value in positive.items():
        if value is not None and value <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if cfg.task == "niah":
        bad = [d for d in cfg.depths if not 0 <= d <= 100]
        if bad:
            raise UserError(f"--depths must lie in 0..100 (percent of the haystack), got {bad[0]}")
        if cfg.gen_length % cfg.block_length:
            raise UserError(f"--gen-length {cfg.gen_length} must be a multiple of --block-length "
                            f"{cfg.block_length}")
        if cfg.steps % (cfg.gen_length // cfg.block_length):
            raise UserError(f"--steps {cfg.steps} must be a multiple of the number of blocks "
                            f"{cfg.gen_length // cfg.block_length}")
        if not cfg.keyword or cfg.keyword not in cfg.needle:
            raise UserError(f"--keyword {cfg.keyword!r} does not occur in --needle {cfg.needle!r}; "
                            f"no answer could find it")
        if cfg.haystack is not None and not os.path.isdir(cfg.haystack):
            raise UserError(f"--haystack {cfg.haystack} is not a folder; pass a folder of .txt "
                            f"texts, or leave it out for the synthetic haystack")
    else:
        bad = [L for L in cfg.len if L % cfg.chunk_size]
        if bad:
            raise UserError(f"--len {bad[0]} is not a multiple of --chunk-size {cfg.chunk_size}; "
                            f"pass --len {bad[0] // cfg.chunk_size * cfg.chunk_size or cfg.chunk_size}")


def load_checked_tokenizer(cfg: EvalConfig, config):
    try:
        tokenizer = load_tokenizer(cfg.model)
    except ValueError:
        raise UserError(f"{cfg.model} has no tokenizer: neither tokenizer.json nor \"tokenizer\": "
                        f"\"{TIKTOKEN_NAME}\" in its config.json; copy the tokenizer.json of the "
                        f"model it comes from into it") from None
    except Exception as e:  # a damaged tokenizer.json: the tokenizers library has its own errors
        raise UserError(f"cannot read the tokenizer of {cfg.model}: {e}") from None
    if tokenizer.mask_id != config.mask_token_id or tokenizer.vocab_size > config.embedding_size:
        raise UserError(f"the tokenizer of {cfg.model} ({tokenizer.name}, [MASK] {tokenizer.mask_id}) "
                        f"does not fit the model ([MASK] {config.mask_token_id}, "
                        f"{config.embedding_size} embeddings)")
    return tokenizer


# ---------------------------------------------------------------------------------------------
# RoPE: the checkpoint's base, or --rope re-scaled for each evaluated length.

def rope_label(cfg: EvalConfig) -> str:
    """How the base was chosen, part of every result's file name."""
    if not cfg.rope:
        return "ckpt"
    return cfg.rope + (f"-train{cfg.train_len}" if cfg.train_len else "") + \
        (f"-dcrit{cfg.d_crit}" if cfg.d_crit else "")


def rope_for_length(config, cfg: EvalConfig, length: int) -> dict:
    """The rope_scaling to evaluate `length` tokens with: the checkpoint's own, or --rope
    re-scaled from the pre-trained base and window (LLaDAConfig.scaled_rope)."""
    if not cfg.rope:
        return {**(config.rope_scaling or {}), "rope_theta": config.rope_theta}
    return config.scaled_rope(cfg.rope, length, cfg.train_len, cfg.d_crit)


# ---------------------------------------------------------------------------------------------
# NIAH: the haystack, where the needle goes, and the score.

SENTENCE_END = re.compile(r"[.!?][\"')\]]*$")  # a sentence's last token, closing quotes allowed


def haystack_pool(cfg: EvalConfig, counter, need: int) -> tuple[np.ndarray, str]:
    """cl100k token ids to cut haystacks from, (n,) int64, and a name for the results.

    Enough for every repeat to read a different stretch where the texts allow it (repeats x
    need tokens); at least `need`, or a one-line error: a haystack is never silently shorter.
    """
    want = (need + 256) * cfg.repeats  # 256: room to end each window at a sentence end
    if cfg.haystack is None:
        # data.py's filler sentences, without the corpus's facts: its secret codes would be
        # competing needles.
        return np.asarray(counter.encode(filler_text(want, counter, seed=cfg.seed)), np.int64), \
            "synthetic filler (data.py)"
    files = sorted(os.path.join(root, n) for root, _, names in os.walk(cfg.haystack)
                   for n in names if n.endswith(".txt"))
    if not files:
        raise UserError(f"--haystack {cfg.haystack} has no .txt files; pass a folder of long texts")
    pieces, total = [], 0
    for path in files:  # only as many files as needed: a PG19 folder holds billions of tokens
        try:
            with open(path, encoding="utf-8-sig") as f:
                text = f.read().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read {path} as UTF-8 text ({e.__class__.__name__}); remove it "
                            f"from --haystack") from None
        ids = counter.encode(text + "\n\n")  # the blank line keeps two texts apart
        pieces.append(np.asarray(ids, np.int64))
        total += len(ids)
        if total >= want:
            break
    if total < need:
        raise UserError(f"--len {max(cfg.len):,} needs {need:,} haystack tokens, but --haystack "
                        f"{cfg.haystack} holds only {total:,} cl100k tokens in {len(files)} .txt "
                        f"files; add texts or pass a shorter --len")
    return np.concatenate(pieces), os.path.abspath(cfg.haystack)


def sentence_boundaries(ids: np.ndarray, counter) -> np.ndarray:
    """(n + 1,) bool: True at j when the needle may go just before token j.

    Inside the text: a token ending with . ! or ? followed by one that starts with whitespace,
    so that " The needle ... 417." and the text after it tokenize apart exactly as together
    ("417.A" or "417.." would merge into other tokens). The start qualifies when the first token
    starts with whitespace; the end always does (the separator follows).
    """
    text = {int(i): counter.decode([int(i)]) for i in np.unique(ids)}
    ends = np.array([bool(SENTENCE_END.search(text[int(i)])) for i in ids])  # (n,)
    spaced = np.array([text[int(i)][:1].isspace() for i in ids])  # (n,)
    bounds = np.ones(len(ids) + 1, dtype=bool)  # (n + 1,)
    bounds[1:-1] = ends[:-1] & spaced[1:]
    bounds[0] = spaced[0]
    return bounds


def haystack_window(pool: np.ndarray, bounds: np.ndarray, n: int, repeat: int) -> np.ndarray:
    """n haystack tokens (n,) that end at a sentence end and start wherever that puts them.

    Repeat r reads from r * n tokens into the pool (wrapping around when the texts are
    short), so repeats read different text, and a cell's haystack does not depend on the
    other lengths of the run. bounds: sentence_boundaries(pool).
    """
    start = repeat * n % len(pool)
    ids = np.roll(pool, -start)  # (N,): the pool read from `start`, wrapping around
    b = np.append(np.roll(bounds[:-1], -start), True)  # (N + 1,): the pool's end is one too
    end = int(np.flatnonzero(b[n:])[0]) + n  # the first sentence end at or after n tokens
    return ids[end - n:end]


def needle_position(bounds: np.ndarray, depth: int) -> int:
    """The last boundary at or before depth% of the haystack (OpenCompass rounds down), or the
    first one when the haystack starts mid-sentence and the depth lies before it."""
    n = len(bounds) - 1
    before = np.flatnonzero(bounds[:n * depth // 100 + 1])
    return int(before[-1]) if len(before) else int(np.flatnonzero(bounds)[0])


def niah_pieces(cfg: EvalConfig, counter) -> tuple[list[int], list[int]]:
    """The needle (with its leading space) and the tail (separator + question), in cl100k ids."""
    return counter.encode(" " + cfg.needle.strip()), counter.encode(cfg.separator + cfg.question)


def niah_prompt(window: np.ndarray, bounds: np.ndarray, needle: list[int], tail: list[int],
                depth: int) -> tuple[list[int], int]:
    """haystack[:p] + needle + haystack[p:] + separator + question, and p."""
    p = needle_position(bounds, depth)
    return window[:p].tolist() + needle + window[p:].tolist() + tail, p


def levenshtein(a: str, b: str) -> int:
    """Edit distance: insertions, deletions and substitutions of one character each."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def niah_score(answer: str, needle: str, keyword: str) -> float:
    """OpenCompass NeedleBench: 100 if the keyword is in the answer, otherwise 0.2 x the edit
    similarity 100 * (1 - distance / longer length) of answer and needle without whitespace."""
    if keyword in answer:
        return 100.0
    a, n = re.sub(r"\s+", "", answer), re.sub(r"\s+", "", needle)
    longest = max(len(a), len(n))
    similarity = 100.0 * (1 - levenshtein(a, n) / longest) if longest else 100.0
    return 0.2 * similarity


# ---------------------------------------------------------------------------------------------
# Running one cell.

def model_prompt(ids: list[int], tokenizer, counter) -> list[int]:
    """The prompt in the model's tokens: the counted ids themselves for a cl100k model, so it
    reads exactly --len tokens; otherwise the prompt's text encoded by its own tokenizer."""
    if tokenizer.source == TIKTOKEN_NAME:
        return ids
    return tokenizer.encode(counter.decode(ids))


def run_niah_cell(model, tokenizer, counter, cfg: EvalConfig, prompt_ids: list[int],
                  device) -> dict:
    ids = model_prompt(prompt_ids, tokenizer, counter)
    prompt = torch.tensor([ids], device=device)  # (1, Lp)
    # Inner bars only on a terminal (disable=None): in a log file the cell bar says enough.
    bar = tqdm(total=cfg.steps, desc="  decoding", unit="step", leave=False, dynamic_ncols=True,
               disable=None)

    t = time.perf_counter()
    try:
        out = generate(model, prompt, steps=cfg.steps, gen_length=cfg.gen_length,
                       block_length=cfg.block_length, temperature=0.0,
                       cache="prefix" if cfg.prompt_cache else None,
                       on_step=lambda: bar.update(1))  # (1, Lp + gen_length)
    finally:
        bar.close()
    seconds = time.perf_counter() - t
    answer = out[0, len(ids):].tolist()
    if tokenizer.eos_id in answer:  # after the first EOS comes padding
        answer = answer[:answer.index(tokenizer.eos_id)]
    text = tokenizer.decode(answer)
    return {"answer": text, "keyword_found": cfg.keyword in text,
            "score": niah_score(text, cfg.needle, cfg.keyword), "model_tokens": len(ids),
            "seconds": round(seconds, 3)}


def run_ppl_cell(model, cfg: EvalConfig, tokens: np.ndarray, length: int, doc: int,
                 device) -> dict:
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + doc)  # same masks on rerun
    t = time.perf_counter()
    nll = chunk_nll(model, torch.from_numpy(tokens[:length]).to(device), cfg.chunk_size,
                    cfg.draws, generator=generator,
                    progress=sys.stderr.isatty())  # (length / chunk_size,)
    seconds = time.perf_counter() - t
    ppl = cumulative_perplexity(nll.double())
    return {"perplexity": float(ppl[-1]), "chunk_nll": nll.tolist(),
            "cumulative_perplexity": ppl.tolist(),
            "seconds": round(seconds, 3)}


# ---------------------------------------------------------------------------------------------
# Estimating the run: one timed forward, scaled to every cell by its FLOPs.

def forward_flops(c, q_len: int, k_len: int, head_tokens: int) -> float:
    """Multiply-adds x 2 of a forward: linear layers grow with q_len, attention with q_len x
    k_len, the LM head with the positions it is asked for."""
    linear = 2 * (4 * c.d_model ** 2 + 3 * c.d_model * c.mlp_hidden_size)
    attention = 4 * k_len * c.d_model
    return c.n_layers * q_len * (linear + attention) + 2 * c.d_model * c.embedding_size * head_tokens


def cell_flops(c, cfg: EvalConfig, length: int) -> float:
    if cfg.task == "ppl":  # `draws` rows of every prefix that ends a chunk; ~chunk/2 masked each
        return sum(cfg.draws * forward_flops(c, end, end, (cfg.chunk_size + 1) / 2)
                   for end in range(cfg.chunk_size, length + 1, cfg.chunk_size))
    L = length + cfg.gen_length
    full = forward_flops(c, L, L, cfg.block_length)
    if not cfg.prompt_cache:
        return cfg.steps * full
    # With the cache each block's first step is a full forward; the others run its suffix only.
    blocks = cfg.gen_length // cfg.block_length
    per_block = cfg.steps // blocks
    suffix = sum(forward_flops(c, cfg.gen_length - b * cfg.block_length, L, cfg.block_length)
                 for b in range(blocks))
    return blocks * full + (per_block - 1) * suffix


@torch.no_grad()
def timed_forward(model, c, length: int, device) -> tuple[float, float]:
    """Seconds and FLOPs of one forward of `length` tokens plus the head on one block.

    The best of three when a forward is quick (a first call at a new length pays for
    allocation), a single one when it is not (at 131072 tokens one costs minutes on a CPU).
    """
    model(torch.zeros(1, 64, dtype=torch.long, device=device))  # warm-up: threads, allocator
    x = torch.randint(0, min(c.eos_token_id, c.mask_token_id), (1, length), device=device)
    times = []
    while len(times) < 3 and (not times or times[-1] < 2.0):
        t = time.perf_counter()
        model.head(model(x)[:, -32:])
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return min(times), forward_flops(c, length, length, 32)


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


# ---------------------------------------------------------------------------------------------
# The results folder: one JSON per cell, and the reports rebuilt from all of them.

def results_dir(cfg: EvalConfig) -> str:
    if cfg.results:
        return cfg.results
    path = os.path.abspath(cfg.model)
    name = os.path.basename(path)
    if name == "checkpoint":  # train.py's OUT/checkpoint: OUT says more
        name = os.path.basename(os.path.dirname(path))
    return os.path.join("results", name, cfg.task)


def cell_name(task: str, length: int, rope: str, depth: int = 0, repeat: int = 0,
              doc: int = 0) -> str:
    if task == "niah":
        return f"niah_len{length}_depth{depth:03d}_rep{repeat}_rope-{rope}.json"
    return f"ppl_len{length}_doc{doc}_rope-{rope}.json"


def checkpoint_fingerprint(path: str) -> str:
    """Changes when the checkpoint does (retrained in place), so old results are not reused."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        if name == "config.json" or name.endswith(".safetensors"):
            st = os.stat(os.path.join(path, name))
            h.update(f"{name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


def settings(cfg: EvalConfig, dtype: str, source: str) -> dict:
    """What a cell's result depends on besides its coordinates (length, depth, repeat, rope)."""
    s = {"model": os.path.abspath(cfg.model), "checkpoint": checkpoint_fingerprint(cfg.model),
         "dtype": dtype}
    if cfg.task == "niah":
        return {**s, "haystack": source, "needle": cfg.needle, "question": cfg.question,
                "keyword": cfg.keyword, "separator": cfg.separator, "steps": cfg.steps,
                "gen_length": cfg.gen_length, "block_length": cfg.block_length,
                "prompt_cache": "prefix" if cfg.prompt_cache else "none", "seed": cfg.seed}
    return {**s, "data": source, "chunk_size": cfg.chunk_size, "draws": cfg.draws, "seed": cfg.seed}


def read_results(folder: str, task: str) -> dict[str, dict]:
    """Every finished cell of `task` in the folder, by file name; unreadable files are unfinished."""
    found = {}
    if os.path.isdir(folder):
        for name in sorted(os.listdir(folder)):
            if name.startswith(task + "_") and name.endswith(".json"):
                try:
                    with open(os.path.join(folder, name)) as f:
                        found[name] = json.load(f)
                except (OSError, ValueError):
                    pass
    return found


def write_atomic(path: str, write) -> None:
    """write(file object) into a temporary file renamed over `path` when complete."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str, obj: dict) -> None:
    write_atomic(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def short(length: int) -> str:
    return f"{length // 1024}K" if length % 1024 == 0 else f"{length:,}"


def niah_grids(cells: list[dict]) -> dict[str, tuple[list, list, np.ndarray]]:
    """Per rope label: depths, lengths and the mean score over repeats, (depths, lengths)."""
    grids = {}
    for rope in sorted({c["rope"] for c in cells}):
        mine = [c for c in cells if c["rope"] == rope]
        depths = sorted({c["depth"] for c in mine})
        lengths = sorted({c["length"] for c in mine})
        grid = np.full((len(depths), len(lengths)), np.nan)
        for i, d in enumerate(depths):
            for j, L in enumerate(lengths):
                scores = [c["score"] for c in mine if c["depth"] == d and c["length"] == L]
                if scores:
                    grid[i, j] = sum(scores) / len(scores)
        grids[rope] = (depths, lengths, grid)
    return grids


def niah_table(depths, lengths, grid) -> str:
    rows = ["| depth \\ length | " + " | ".join(short(L) for L in lengths) + " |",
            "|---:|" + "---:|" * len(lengths)]
    for d, row in zip(depths, grid):
        rows.append(f"| {d}% | " + " | ".join("-" if np.isnan(v) else f"{v:.1f}" for v in row) + " |")
    means = [np.nanmean(col) if not np.all(np.isnan(col)) else np.nan for col in grid.T]
    rows.append("| **average** | " + " | ".join("-" if np.isnan(v) else f"**{v:.1f}**" for v in means)
                + " |")
    return "\n".join(rows)


def plot_heatmap(path: str, depths, lengths, grid, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LinearSegmentedColormap

    # The colours of the original NIAH pictures (gkamradt): red 0, yellow 50, green 100.
    cmap = LinearSegmentedColormap.from_list("niah", ["#F0496E", "#EBB839", "#0CD79F"]) \
        .with_extremes(bad="#dddddd")  # grey: cells not evaluated
    fig, ax = plt.subplots(figsize=(2.5 + 0.9 * len(lengths), 1.6 + 0.4 * len(depths)))
    im = ax.imshow(grid, cmap=cmap, vmin=0, vmax=100, aspect="auto")
    for i in range(len(depths)):
        for j in range(len(lengths)):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.0f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(lengths)), [short(L) for L in lengths])
    ax.set_yticks(range(len(depths)), [f"{d}%" for d in depths])
    ax.set_xlabel("context length (cl100k tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label="score")
    fig.tight_layout()
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)


def ppl_curves(cells: list[dict]) -> dict[tuple[str, int], tuple[int, np.ndarray]]:
    """Per (rope, length): documents and the running perplexity of their mean chunk NLL."""
    curves = {}
    for key in sorted({(c["rope"], c["length"]) for c in cells}):
        nll = np.mean([c["chunk_nll"] for c in cells if (c["rope"], c["length"]) == key], axis=0)
        n = sum(1 for c in cells if (c["rope"], c["length"]) == key)
        curves[key] = (n, cumulative_perplexity(torch.from_numpy(nll)).numpy())
    return curves


def plot_ppl(path: str, curves, chunk_size: int, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for (rope, length), (n, ppl) in curves.items():
        ax.plot(np.arange(1, len(ppl) + 1) * chunk_size, ppl, label=f"rope {rope}, len {short(length)}")
    ax.set_yscale("log")
    ax.set_xlabel("position (tokens)")
    ax.set_ylabel("perplexity of the text so far")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)


def write_reports(folder: str, cfg: EvalConfig, current: dict) -> str:
    """Heatmaps/plots and markdown tables from every cell made with the current settings;
    returns the summary to print."""
    found = read_results(folder, cfg.task)
    cells = [c for c in found.values() if c.get("settings") == current]
    lines = []
    if len(cells) < len(found):
        lines.append(f"({len(found) - len(cells)} cells in {folder} were made with other settings "
                     f"and are left out)")
    if not cells:
        return "\n".join(lines + ["no results yet"])
    model_name = os.path.basename(os.path.abspath(cfg.model))
    if cfg.task == "niah":
        for rope, (depths, lengths, grid) in niah_grids(cells).items():
            overall = float(np.nanmean(grid))
            title = f"NIAH, {model_name}, rope {rope}: average {overall:.1f}"
            table = niah_table(depths, lengths, grid)
            plot_heatmap(os.path.join(folder, f"heatmap_rope-{rope}.png"), depths, lengths, grid, title)
            write_atomic(os.path.join(folder, f"table_rope-{rope}.md"),
                         lambda f: f.write(f"# {title}\n\n{table}\n".encode()))
            lines += [f"{title} ({folder}/heatmap_rope-{rope}.png)", table, ""]
        return "\n".join(lines)
    curves = ppl_curves(cells)
    table = ["| length | rope | documents | perplexity |", "|---:|---|---:|---:|"]
    table += [f"| {L:,} | {rope} | {n} | {ppl[-1]:.3f} |" for (rope, L), (n, ppl) in curves.items()]
    table = "\n".join(table)
    title = f"perplexity, {model_name}"
    plot_ppl(os.path.join(folder, "ppl_vs_position.png"), curves, cfg.chunk_size, title)
    write_atomic(os.path.join(folder, "table_ppl.md"), lambda f: f.write(f"# {title}\n\n{table}\n".encode()))
    return "\n".join(lines + [f"{title} ({folder}/ppl_vs_position.png)", table])


# ---------------------------------------------------------------------------------------------

def plan_niah(cfg: EvalConfig, counter) -> tuple[list[dict], dict, str]:
    """Every NIAH cell, and the pieces its prompt is made of; every length is checked
    against the needle, the question and the haystack before anything runs."""
    needle, tail = niah_pieces(cfg, counter)
    shortest = len(needle) + len(tail) + 1
    if min(cfg.len) < shortest:
        raise UserError(f"--len {min(cfg.len)} cannot hold the needle ({len(needle)} tokens) and "
                        f"the question ({len(tail)} tokens); pass --len {shortest} or more")
    pool, source = haystack_pool(cfg, counter, max(cfg.len) - len(needle) - len(tail))
    bounds = sentence_boundaries(pool, counter)
    label = rope_label(cfg)
    cells = [dict(task="niah", length=L, depth=d, repeat=r, rope=label,
                  name=cell_name("niah", L, label, depth=d, repeat=r))
             for L in sorted(set(cfg.len)) for r in range(cfg.repeats) for d in cfg.depths]
    return cells, {"pool": pool, "bounds": bounds, "needle": needle, "tail": tail}, source


def plan_ppl(cfg: EvalConfig, tokenizer) -> tuple[list[dict], dict, str]:
    has_splits = cfg.data is not None and any(os.path.isdir(os.path.join(cfg.data, s))
                                              for s in ("train", "validation", "test"))
    if cfg.data is None or has_splits:  # the synthetic corpus, or PG19's split folders
        corpus = load_corpus(tokenizer, cfg.data, split=cfg.split, cache_dir=cfg.cache_dir)
    else:  # a plain folder of evaluation texts: every document ("train" with nothing held out)
        corpus = load_corpus(tokenizer, cfg.data, split="train", heldout=0.0, cache_dir=cfg.cache_dir)
    docs = {}
    for L in sorted(set(cfg.len)):
        found = long_documents(corpus, L, limit=cfg.docs)
        if len(found) < cfg.docs:
            raise UserError(f"--docs {cfg.docs}: only {len(found)} documents of {corpus.name} have "
                            f"{L:,} tokens; pass --docs {len(found)} or a shorter --len")
        docs[L] = found
    label = rope_label(cfg)
    cells = [dict(task="ppl", length=L, doc=j, rope=label, name=cell_name("ppl", L, label, doc=j))
             for L in sorted(docs) for j in range(cfg.docs)]
    return cells, {"docs": docs}, corpus.name


def main(argv=None):
    cfg = parse_args(argv)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = cfg.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    try:
        check_config(cfg)
        config = read_config(cfg.model)
        if cfg.d_crit is not None and cfg.d_crit > config.head_dim:
            raise UserError(f"--d-crit {cfg.d_crit} exceeds the head size {config.head_dim}")
        tokenizer = load_checked_tokenizer(cfg, config)
        counter = tiktoken_tokenizer()  # NIAH lengths are cl100k tokens whatever the model's
        if cfg.task == "niah":
            cells, work, source = plan_niah(cfg, counter)
        else:
            cells, work, source = plan_ppl(cfg, tokenizer)
        folder = results_dir(cfg)
        current = settings(cfg, dtype, source)
        done = read_results(folder, cfg.task)
        other = [n for n, c in done.items() if c.get("settings") != current]
        if other and not cfg.overwrite:
            old = done[other[0]].get("settings") or {}
            diff = [f"{k} {old.get(k)!r} there, {v!r} here" for k, v in current.items() if old.get(k) != v]
            raise UserError(f"{folder} holds {len(other)} results made with other settings "
                            f"({'; '.join(diff[:2])}); pass --results DIR for this run, or "
                            f"--overwrite to redo them")
        pending = [c for c in cells if cfg.overwrite or c["name"] not in done]
        model = from_pretrained(cfg.model, dtype=getattr(torch, dtype), device=device).eval()
    except (UserError, CheckpointError, ValueError) as e:
        fail(str(e))

    c = model.config
    ropes = {L: rope_for_length(c, cfg, L) for L in sorted(set(cfg.len))}
    print(f"model: {cfg.model} ({c.n_layers} layers, d_model {c.d_model}, trained context "
          f"{c.max_sequence_length:,}), tokenizer {tokenizer.name}, {dtype} on {device.type}")
    print(f"{'haystack' if cfg.task == 'niah' else 'documents'}: {source}; results: {folder}")
    for L, rope in ropes.items():
        how = f"{rope['method']}, lambda {rope['lambda']:.3f}" if cfg.rope else \
            f"as saved ({rope.get('method', 'none')} for {rope.get('target_len', c.max_sequence_length):,})"
        print(f"rope at {L:,}: base {rope['rope_theta']:,.0f} ({how})")
    if not cfg.rope and max(cfg.len) > (c.rope_scaling or {}).get("target_len", c.max_sequence_length):
        print("note: lengths beyond the checkpoint's context run with its base unchanged; "
              "--rope diffusion (or critical, ntk, pi) re-scales it for each length")
    if not pending:
        print(f"all {len(cells)} cells are done; --overwrite redoes them")
    else:
        first = pending[0]["length"] + (cfg.gen_length if cfg.task == "niah" else 0)
        c.set_rope(ropes[pending[0]["length"]])
        seconds, flops = timed_forward(model, c, first, device)
        total = seconds / flops * sum(cell_flops(c, cfg, p["length"]) for p in pending)
        print(f"{len(pending)} cells to run ({len(cells) - len(pending)} already done); one forward "
              f"of {first:,} tokens took {seconds:.1f} s, so the estimate is {duration(total)} in "
              f"all (scaled by FLOPs: linear layers ~ L, attention ~ L^2; rough when lengths differ)")

    started = time.perf_counter()
    bar = tqdm(pending, desc=cfg.task, unit="cell", dynamic_ncols=True)
    windows = {}  # (length, repeat) -> haystack window: the same for every depth
    try:
        for cell in bar:
            L = cell["length"]
            rope = ropes[L]
            c.set_rope(rope)
            record = {k: v for k, v in cell.items() if k != "name"}
            if cfg.task == "niah":
                key = (L, cell["repeat"])
                if key not in windows:
                    n = L - len(work["needle"]) - len(work["tail"])
                    window = haystack_window(work["pool"], work["bounds"], n, cell["repeat"])
                    windows = {key: (window, sentence_boundaries(window, counter))}
                window, bounds = windows[key]
                ids, p = niah_prompt(window, bounds, work["needle"], work["tail"], cell["depth"])
                record.update(needle_position=p, needle_depth_actual=round(100 * p / len(window), 2),
                              context_tokens=len(ids))
                record.update(run_niah_cell(model, tokenizer, counter, cfg, ids, device))
                bar.set_postfix(score=f"{record['score']:.0f}")
            else:
                doc = work["docs"][L][cell["doc"]]
                record.update(document_tokens=len(doc))
                record.update(run_ppl_cell(model, cfg, doc, L, cell["doc"], device))
                bar.set_postfix(ppl=f"{record['perplexity']:.2f}")
            record.update(rope_theta=rope["rope_theta"], rope_scaling=rope,
                          settings=current, finished=time.strftime("%Y-%m-%d %H:%M:%S"))
            write_json(os.path.join(folder, cell["name"]), record)
    except KeyboardInterrupt:
        bar.close()
        print(f"interrupted after {bar.n} of {len(pending)} cells; the finished ones are in "
              f"{folder}: run the same command again to continue", file=sys.stderr)
        sys.exit(130)
    bar.close()
    if pending:
        print(f"ran {len(pending)} cells in {duration(time.perf_counter() - started)}")
    print(write_reports(folder, cfg, current))


if __name__ == "__main__":
    main()
