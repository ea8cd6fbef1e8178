"""
evaluate.py: the evaluation runner: a checkpoint, a task, lengths; one result file per cell.

Paper map: docs/paper.md section 5. The paper's evaluations, each in a file of its own:

    niah         needle in a haystack, our synthetic version for tiny models (niah.py)
    needlebench  NeedleBench "origin", the authors' NIAH to 128K (needlebench.py)
    ruler        RULER's 13 tasks at 4K-128K (ruler.py)
    longbench    LongBench's 21 datasets at 16K (longbench.py)
    ppl          long-document perplexity, LongLLaDA's protocol (ppl.py)

A task module has four functions: check(cfg) refuses bad flags and data before any model
work, plan(cfg, tokenizer, counter) lists the cells, run_cell(...) evaluates one, and
report(cells, cfg, folder) writes the tables and pictures. --rope re-scales the checkpoint's
RoPE base for each evaluated length, which is the training-free comparison of the paper (LLaDA
with and without NTK scaling); without it the checkpoint runs with the base it was saved with.

Every cell is one JSON file in the results folder, written atomically; a rerun skips finished
cells, so an interrupted run loses at most the cell in progress, and the reports are rebuilt
from all of them at the end. One process at a time may use a results folder.

    python evaluate.py --task niah --len 131072                 # out/checkpoint, synthetic haystack
    python evaluate.py --task niah --len 8192 16384 --rope critical --prompt-cache   # approximate, faster
    python evaluate.py --task ppl --len 4096 --data /path/pg19
    python evaluate.py --model /path/UltraLLaDA --task needlebench --len 8192 131072 \
        --haystack en_un_asr.jsonl --needles needles.jsonl
    python evaluate.py --model /path/UltraLLaDA --task ruler --len 4096 32768 \
        --essays PaulGrahamEssays.jsonl --squad dev-v2.0.json --hotpot hotpot_dev_distractor_v1.json
    python evaluate.py --model /path/UltraLLaDA --task longbench --data /path/LongBench/data
"""
import argparse
import os
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from evaluations import longbench, needlebench, niah, ppl, ruler
from harness.checkpoint import from_pretrained, read_config
from harness.files import lock_folder, write_json
from harness.prepare import CACHE_DIR
from harness.results import (
    checkpoint_fingerprint,
    duration,
    flops_per_second,
    forward_flops,
    generation_flops,
    read_results,
    results_dir,
)
from harness.runtime import fail, positive, tune_cpu_memory
from harness.tokenizer import TIKTOKEN_NAME, load_tokenizer, tiktoken_tokenizer
from rope import METHODS, check_scaling_args

TASKS = {"niah": niah, "needlebench": needlebench, "ruler": ruler, "longbench": longbench,
         "ppl": ppl}
DEFAULT_MODEL = os.path.join("out", "checkpoint")  # where train.py writes
# Per-task defaults of the shared flags, from the authors' configs. RULER and LongBench decode
# with each task's own answer length unless --gen-length and friends are given.
NIAH_DECODING = dict(gen_length=32, block_length=32, steps=16)
TASK_DEFAULTS = {"niah": {**NIAH_DECODING, "repeats": 1},
                 "needlebench": {**NIAH_DECODING, "repeats": 10}, "ruler": {"samples": 100}}


@dataclass
class EvalConfig:
    task: str = "niah"
    model: str = DEFAULT_MODEL
    len: list[int] | None = None
    rope: str | None = None
    train_len: int | None = None
    d_crit: int | None = None
    results: str | None = None
    overwrite: bool = False
    gen_length: int | None = None
    block_length: int | None = None
    steps: int | None = None
    prompt_cache: bool = False
    seed: int = 0
    samples: int | None = None
    # niah and needlebench
    depths: list[int] = field(default_factory=lambda: list(range(0, 101, 10)))
    repeats: int | None = None
    haystack: str | None = None
    # needlebench
    needles: str | None = None
    length_buffer: int = 600
    guide: bool = True
    language: str = "English"
    # ruler
    ruler_tasks: list[str] | None = None
    essays: str | None = None
    squad: str | None = None
    hotpot: str | None = None
    # longbench
    datasets: list[str] | None = None
    max_len: int = longbench.MAX_LEN
    # niah
    needle: str = niah.DEFAULT_NEEDLE
    question: str = niah.DEFAULT_QUESTION
    keyword: str = niah.DEFAULT_KEYWORD
    separator: str = " "
    # ppl
    data: str | None = None
    split: str = "validation"
    docs: int = 1
    chunk_size: int = 64
    draws: int = 8
    cache_dir: str = CACHE_DIR
    # where it runs
    device: str | None = None
    dtype: str | None = None
    rope_label: str = field(default="ckpt", init=False)  # how the base was chosen, in file names

    def __post_init__(self):  # the task's own defaults for the flags left unset
        for name, value in TASK_DEFAULTS.get(self.task, {}).items():
            if getattr(self, name) is None:
                setattr(self, name, value)


def parse_args(argv=None) -> EvalConfig:
    p = argparse.ArgumentParser(
        description="Evaluate a LLaDA checkpoint: needle in a haystack (heatmap of depth x "
                    "length) or long-document perplexity. Results: one JSON per cell, a rerun "
                    "skips finished ones.")
    p.error = fail  # argparse prints its usage first; our errors are one line
    a = p.add_argument
    count, count0 = positive(int), positive(int, zero=True)
    a("--task", default="niah", choices=list(TASKS), help="niah (default): synthetic needle in a "
      "haystack for tiny models; needlebench: the authors' NIAH (NeedleBench origin); ruler: "
      "RULER's 13 tasks; longbench: LongBench's 21 datasets; ppl: long-document perplexity")
    a("--model", default=DEFAULT_MODEL, help=f"checkpoint directory (default {DEFAULT_MODEL}, "
      "where train.py writes)")
    a("--len", type=count, nargs="+", default=None, help="context length(s), e.g. --len 8192 "
      "16384 131072 (required except for longbench, which uses --max-len): niah counts the "
      "whole prompt (haystack, needle, separator, question) in cl100k tokens; needlebench and "
      "ruler count cl100k tokens as the authors' configs do; ppl scores the first L model "
      "tokens of each document (a multiple of --chunk-size)")
    a("--rope", default=None, choices=METHODS, help="re-scale the checkpoint's RoPE base for each "
      "evaluated length: none, ntk, critical (LongLLaDA), diffusion (UltraLLaDA) or pi; default: "
      "use the checkpoint's base as saved")
    a("--train-len", type=count, default=None, help="with --rope: the context the base was "
      "trained for (default: the checkpoint's rope_scaling train_len, else max_sequence_length)")
    a("--d-crit", type=count, default=None, help="with --rope critical/diffusion: override the "
      "critical dimension (1..head size)")
    a("--results", default=None, help="results folder (default results/<model name>/<task>/)")
    a("--overwrite", action="store_true", help="redo cells that already have a result, and "
      "replace results made with other settings")
    a("--gen-length", type=count, default=None, help="answer tokens (default: the task's, from the "
      "authors' configs: niah and needlebench 32, ruler 64)")
    a("--block-length", type=count, default=None, help="tokens per decoding block (default: the "
      "task's: niah and needlebench 32, one block; ruler 64)")
    a("--steps", type=count, default=None, help="decoding steps (default: the task's: niah and "
      "needlebench 16, ruler 64)")
    a("--prompt-cache", action="store_true", help="reuse the prompt's keys and values while the "
      "answer is decoded (diffusion.py's approximate prefix cache): approaching --steps times "
      "faster as the context grows; exact decoding is the paper's protocol")
    a("--seed", type=count0, default=0, help="seed of the synthetic haystack (niah) and of the "
      "masks (ppl) (default 0)")
    a("--samples", type=count, default=None, help="ruler: samples per task and length (paper and "
      "default: 100); longbench: the first N rows of each dataset (default: all)")
    a("--depths", type=int, nargs="+", default=list(range(0, 101, 10)),
      help="niah, needlebench: needle depths in percent of the haystack (default 0 10 ... 100)")
    a("--repeats", type=count, default=None, help="niah, needlebench: haystacks per (length, "
      "depth), each a different stretch or shuffle of text (default: niah 1, needlebench 10 as "
      "in the paper)")
    a("--haystack", default=None, help="niah: folder of long .txt texts (PG19 books, essays), "
      "read in name order (default: filler sentences of the synthetic corpus, without its "
      "facts); needlebench: NeedleBench's en_un_asr.jsonl (JSON lines with a \"text\" field)")
    a("--needles", default=None, help="needlebench: NeedleBench's needles.jsonl (fields needle, "
      "retrieval_question, arg2 = keyword, language)")
    a("--length-buffer", type=count0, default=600, help="needlebench: cl100k tokens of each length "
      "kept free of haystack for the template and question (OpenCompass: 600 for English)")
    a("--guide", action=argparse.BooleanOptionalAction, default=True, help="needlebench: the "
      "question with OpenCompass's guide sentence (default, as the authors ran it)")
    a("--language", default="English", choices=("English", "Chinese"), help="needlebench: "
      "needle language (Chinese needs NeedleBench's Chinese haystack; default English)")
    a("--ruler-tasks", nargs="+", default=None, choices=list(ruler.TASKS), metavar="TASK",
      help="ruler: tasks to run (default all 13; those whose data file is not given are "
      f"skipped): {', '.join(ruler.TASKS)}")
    a("--essays", default=None, help="ruler: Paul Graham's essays, PaulGrahamEssays.jsonl "
      "(niah_single_2/3, niah_multikey_1 haystack)")
    a("--squad", default=None, help="ruler: SQuAD v2 dev set, dev-v2.0.json (qa_squad)")
    a("--hotpot", default=None, help="ruler: HotpotQA dev set, hotpot_dev_distractor_v1.json "
      "(qa_hotpotqa)")
    a("--needle", default=niah.DEFAULT_NEEDLE, help="niah: the sentence hidden in the haystack "
      f"(default '{niah.DEFAULT_NEEDLE}', the synthetic corpus's format that tiny models learn)")
    a("--question", default=niah.DEFAULT_QUESTION, help="niah: appended after the haystack "
      f"(default '{niah.DEFAULT_QUESTION}')")
    a("--keyword", default=niah.DEFAULT_KEYWORD, help="niah: an answer containing it scores 100; "
      f"it must occur in the needle (default '{niah.DEFAULT_KEYWORD}')")
    a("--separator", default=" ", help="niah: text between the haystack and the question "
      "(default a space, as in the synthetic corpus; for LLaDA-8B e.g. $'\\n\\n')")
    a("--datasets", nargs="+", default=None, choices=list(longbench.DATASETS), metavar="NAME",
      help=f"longbench: datasets to run (default all 21): {', '.join(longbench.DATASETS)}")
    a("--max-len", type=count, default=longbench.MAX_LEN, help="longbench: model tokens a prompt "
      "is cut to, in the middle (paper: 16000)")
    a("--data", default=None, help="longbench: the folder of LongBench's .jsonl files (required); "
      "ppl: folder of long .txt/.jsonl documents (default: the built-in synthetic corpus)")
    a("--split", default="validation", choices=("train", "validation", "test"), help="ppl: the "
      "split of the synthetic corpus or of a --data folder with split folders; a plain folder "
      "uses every document (default validation)")
    a("--docs", type=count, default=1, help="ppl: documents per length, longest first (default 1)")
    a("--chunk-size", type=count, default=64, help="ppl: tokens per chunk (paper: 64)")
    a("--draws", type=count, default=8, help="ppl: Monte Carlo draws per chunk (paper: 8)")
    a("--cache-dir", default=CACHE_DIR, help=f"ppl: token cache of the corpus (default {CACHE_DIR})")
    a("--device", default=None, help="cuda or cpu (default cuda when available)")
    a("--dtype", default=None, choices=("float32", "bfloat16"),
      help="default bfloat16 on CUDA, float32 on CPU")
    cfg = EvalConfig(**vars(p.parse_args(argv)))
    if cfg.task == "longbench":
        if cfg.len:
            fail("--len does not apply to longbench: its prompts are cut to --max-len model tokens")
        cfg.len = [cfg.max_len]  # the one length its cells are run at (and RoPE scaled for)
    elif not cfg.len:
        fail(f"--task {cfg.task} needs --len, the context length(s) to evaluate")
    return cfg


# ---------------------------------------------------------------------------------------------
# Checks that need no model: everything a user can get wrong fails before any work.

def check_config(cfg: EvalConfig) -> None:
    if not os.path.isfile(os.path.join(cfg.model, "config.json")):
        if cfg.model == DEFAULT_MODEL:
            raise ValueError(f"no checkpoint in {DEFAULT_MODEL}; run train.py first, or pass "
                             f"--model DIR")
        raise ValueError(f"--model {cfg.model} is not a checkpoint directory (no config.json)")
    if (cfg.train_len is not None or cfg.d_crit is not None) and not cfg.rope:
        raise ValueError("--train-len and --d-crit only apply with --rope METHOD")
    if cfg.gen_length and cfg.block_length and cfg.gen_length % cfg.block_length:
        raise ValueError(f"--gen-length {cfg.gen_length} must be a multiple of --block-length "
                         f"{cfg.block_length}")
    if cfg.gen_length and cfg.block_length and cfg.steps and \
            cfg.steps % (cfg.gen_length // cfg.block_length):
        raise ValueError(f"--steps {cfg.steps} must be a multiple of the number of blocks "
                         f"{cfg.gen_length // cfg.block_length}")
    if cfg.device and cfg.device.split(":")[0] not in ("cpu", "cuda"):
        raise ValueError(f"--device {cfg.device}: pass cpu or cuda")
    if cfg.device and cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {cfg.device}: no CUDA device is available here; pass cpu")
    TASKS[cfg.task].check(cfg)


def load_checked_tokenizer(cfg: EvalConfig, config):
    try:
        tokenizer = load_tokenizer(cfg.model)
    except ValueError as e:
        if "no tokenizer.json" not in str(e):
            raise
        raise ValueError(f"{cfg.model} has no tokenizer: neither tokenizer.json nor \"tokenizer\": "
                         f"\"{TIKTOKEN_NAME}\" in its config.json; copy the tokenizer.json of the "
                         f"model it comes from into it") from None
    if tokenizer.mask_id != config.mask_token_id or tokenizer.vocab_size > config.embedding_size:
        raise ValueError(f"the tokenizer of {cfg.model} ({tokenizer.name}, [MASK] {tokenizer.mask_id}) "
                         f"does not fit the model ([MASK] {config.mask_token_id}, "
                         f"{config.embedding_size} embeddings)")
    return tokenizer


def rope_label(cfg: EvalConfig) -> str:
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


def settings(cfg: EvalConfig, dtype: str) -> dict:
    """What a cell's result depends on besides its coordinates (the cell's name): a rerun with
    other settings into the same folder is refused instead of mixing two runs' cells, while
    more lengths, depths, samples or tasks only add cells."""
    task = {name: getattr(cfg, name) for name in TASKS[cfg.task].SETTINGS}
    return {"model": os.path.abspath(cfg.model), "checkpoint": checkpoint_fingerprint(cfg.model),
            "dtype": dtype, **task}


def cell_flops(task, c, cfg: EvalConfig, cell: dict) -> float:
    if hasattr(task, "cell_flops"):
        return task.cell_flops(c, cfg, cell, forward_flops)
    gen, block = cfg.gen_length or 64, cfg.block_length or 64  # ruler's and longbench's usual
    return generation_flops(c, cell["length"], gen, block, cfg.steps or gen, cfg.prompt_cache)


# ---------------------------------------------------------------------------------------------

def prepare_run(cfg: EvalConfig, dtype: str, device):
    """Everything before the first cell, after check_config: the plan, the results folder (one
    run at a time, never mixing settings) and the model."""
    task = TASKS[cfg.task]
    config = read_config(cfg.model)
    check_scaling_args(max(cfg.len), cfg.train_len, config.head_dim, cfg.d_crit)
    tokenizer = load_checked_tokenizer(cfg, config)
    cfg.rope_label = rope_label(cfg)
    counter = tiktoken_tokenizer()  # NIAH and RULER lengths are cl100k tokens whatever the model's
    cells, work, source = task.plan(cfg, tokenizer, counter)
    folder = results_dir(cfg.model, cfg.task, cfg.results)
    lock = lock_folder(folder)
    current = settings(cfg, dtype)
    done = read_results(folder, cfg.task)
    other = [n for n, c in done.items() if c.get("settings") != current]
    if other and not cfg.overwrite:
        old = done[other[0]].get("settings") or {}
        diff = [f"{k} {old.get(k)!r} there, {current.get(k)!r} here"
                for k in sorted(set(old) | set(current)) if old.get(k) != current.get(k)]
        raise ValueError(f"{folder} holds {len(other)} results made with other settings "
                         f"({'; '.join(diff[:2])}); pass --results DIR for this run, or "
                         f"--overwrite to redo them")
    pending = [c for c in cells if cfg.overwrite or c["name"] not in done]
    model = from_pretrained(cfg.model, dtype=getattr(torch, dtype), device=device).eval()
    return task, tokenizer, cells, work, source, folder, lock, current, pending, model


def main(argv=None):
    cfg = parse_args(argv)
    tune_cpu_memory()  # huge pages for large CPU tensors, before the first one
    try:
        check_config(cfg)
        device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = cfg.dtype or ("bfloat16" if device.type == "cuda" else "float32")
        task, tokenizer, cells, work, source, folder, lock, current, pending, model = \
            prepare_run(cfg, dtype, device)
    except ValueError as e:  # CheckpointError and FileError are ValueErrors
        fail(str(e))
    except KeyboardInterrupt:
        fail("interrupted before the first cell; nothing was written", 130)

    c = model.config
    ropes = {L: rope_for_length(c, cfg, L) for L in sorted({cell["length"] for cell in cells})}
    print(f"model: {cfg.model} ({c.n_layers} layers, d_model {c.d_model}, trained context "
          f"{c.max_sequence_length:,}), tokenizer {tokenizer.name}, {dtype} on {device.type}")
    print(f"data: {source}; results: {folder}")
    for L, rope in ropes.items():
        how = f"{rope['method']}, lambda {rope['lambda']:.3f}" if cfg.rope else \
            f"as saved ({rope.get('method', 'none')} for {rope.get('target_len', c.max_sequence_length):,})"
        print(f"rope at {L:,}: base {rope['rope_theta']:,.0f} ({how})")
    if not cfg.rope and max(ropes) > (c.rope_scaling or {}).get("target_len", c.max_sequence_length):
        print("note: lengths beyond the checkpoint's context run with its base unchanged; "
              "--rope diffusion (or critical, ntk, pi) re-scales it for each length")
    estimate = 0.0
    if not pending:
        print(f"all {len(cells)} cells are done; --overwrite redoes them")
    else:
        speed = flops_per_second(model, device)
        estimate = sum(cell_flops(task, c, cfg, p) for p in pending) / speed
        print(f"{len(pending)} cells to run ({len(cells) - len(pending)} already done); estimate "
              f"{duration(estimate)} (from a short timed forward scaled by FLOPs: rough at long "
              f"lengths, where attention's share grows)")

    started = time.perf_counter()
    bar = tqdm(pending, desc=cfg.task, unit="cell", dynamic_ncols=True)
    try:
        for cell in bar:
            rope = ropes[cell["length"]]
            c.set_rope(rope)
            record = {k: v for k, v in cell.items() if k != "name"}
            record.update(task.run_cell(model, tokenizer, cfg, cell, work, device))
            if "score" in record:
                bar.set_postfix(score=f"{record['score']:.0f}")
            record.update(rope_theta=rope["rope_theta"], rope_scaling=rope, settings=current,
                          finished=time.strftime("%Y-%m-%d %H:%M:%S"))
            write_json(os.path.join(folder, cell["name"]), record)
    except KeyboardInterrupt:
        bar.close()
        fail(f"interrupted after {bar.n} of {len(pending)} cells; the finished ones are in "
             f"{folder}: run the same command again to continue", 130)
    except ValueError as e:  # FileError: the disk filled up, the folder became read-only
        bar.close()
        fail(str(e))
    bar.close()
    if pending:
        print(f"ran {len(pending)} cells in {duration(time.perf_counter() - started)} "
              f"(estimated {duration(estimate)})")
    found = read_results(folder, cfg.task)
    mine = [cell for cell in found.values() if cell.get("settings") == current]
    if len(mine) < len(found):
        print(f"({len(found) - len(mine)} cells in {folder} were made with other settings and "
              f"are left out)")
    print(task.report(mine, cfg, folder) if mine else "no results yet")
    del lock


if __name__ == "__main__":
    main()
