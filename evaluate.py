"""
evaluate.py: the evaluation runner: a checkpoint, a task, lengths; one result file per cell.

Paper map: docs/paper.md section 5. The paper's evaluations, each in evaluations/:

    niah         needle in a haystack, our synthetic version for tiny models
    needlebench  NeedleBench "origin", the authors' NIAH to 128K
    ruler        RULER's 13 tasks at 4K-128K
    longbench    LongBench's 21 datasets at 16K
    ppl          long-document perplexity, LongLLaDA's protocol

A task module holds its flags (`Options`, a dataclass), the keys its results need (`KEYS`)
and six functions: check(cfg) refuses bad flags and data before any model work,
forward_tokens(cfg) sizes its largest forward (the memory check), plan(cfg, tokenizer,
counter) lists the cells, run_cell(...) evaluates one, cell_flops(...) says what it costs, and
report(cells, cfg, folder) writes the tables and pictures. This runner owns the flags every
task shares, the model and the cell loop. --rope re-scales the checkpoint's RoPE base for each
evaluated length, the paper's training-free comparison (LLaDA with and without NTK scaling);
--rope-factor multiplies it by one factor, as the authors' wrapper did; without either it runs
as saved.

Every cell is one JSON file in the results folder, written atomically; a rerun skips finished
cells, so an interrupted run loses at most the cell in progress, and the reports are rebuilt
from all of them at the end. Any number of processes can share a folder (torchrun, or separate
jobs): each claims the cells nobody holds (harness/results.py, claim_cells).

    python evaluate.py --task niah --len 131072           # out/checkpoint, synthetic haystack
    torchrun --nproc-per-node 8 evaluate.py --task ruler --len 4096 ...   # one GPU each
    python evaluate.py --task ruler --help                # the shared flags and RULER's own
    python evaluate.py --compare ULTRA=results/ultra LLADA=results/base   # the paper's tables
"""
import argparse
import os
import socket
import sys
import time
from dataclasses import dataclass, field, make_dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

from evaluations import TASKS, compare
from harness.checkpoint import check_tokenizer_fits, from_pretrained, model_tokenizer, read_config
from harness.flags import add_flags, count, flag, from_args, positive, settings_of
from harness.results import (DoesNotFit, check_fits, checkpoint_fingerprint, claim_cells,
                             duration, finished_cells, finite_outputs, flops_per_second,
                             prepare_folder, read_results, results_dir)
from harness.runtime import fail, join_processes, process_env, rank_zero_first, tune_cpu_memory
from harness.tokenizer import tiktoken_tokenizer
from rope import METHODS, check_scaling_args

DEFAULT_MODEL = os.path.join("out", "checkpoint")  # where train.py writes


@dataclass
class EvalConfig:
    """The flags every task shares; each task adds its own (evaluations/<task>.py, Options).
    None of these is in a result's settings but the model and the dtype (settings()): the rope
    choice is in each cell's name, the rest say where and how a run goes."""
    task: str = flag("niah", "niah: synthetic needle in a haystack for tiny models; needlebench: "
                     "the authors' NIAH (NeedleBench origin); ruler: RULER's 13 tasks; "
                     "longbench: LongBench's 21 datasets; ppl: long-document perplexity. "
                     "`--task NAME --help` lists that task's own flags", choices=list(TASKS))
    model: str = flag(DEFAULT_MODEL, "checkpoint directory (train.py writes out/checkpoint)")
    len: list[int] | None = flag(None, "context length(s), e.g. --len 8192 16384 131072 "
                                 "(every task but longbench, which uses --max-len): niah counts "
                                 "the whole prompt in cl100k tokens; needlebench and ruler count "
                                 "cl100k tokens as the authors' configs do; ppl scores the first "
                                 "L model tokens of each document", type=count, nargs="+")
    rope: str | None = flag(None, "re-scale the checkpoint's RoPE base for each evaluated length: "
                            "none, ntk, critical (LongLLaDA), diffusion (UltraLLaDA) or pi "
                            "(default: the checkpoint's base as saved)", choices=METHODS)
    train_len: int | None = flag(None, "with --rope: the context the base was trained for "
                                 "(default: the checkpoint's rope_scaling train_len, else "
                                 "max_sequence_length)", type=count)
    d_crit: int | None = flag(None, "with --rope critical/diffusion: override the critical "
                              "dimension (1..head size)", type=count)
    rope_factor: float | None = flag(None, "multiply the checkpoint's RoPE base by this fixed "
                                     "factor at every length, as the authors' wrapper applies "
                                     "its scaling_factor (LongLLaDA's rows: 4, 14, 31, 55); not "
                                     "with --rope", type=positive)
    results: str | None = flag(None, "results folder (default: results/<model name>/<task>/)")
    overwrite: bool = flag(False, "redo cells that already have a result, and replace results "
                           "made with other settings")
    device: str | None = flag(None, "cuda or cpu (default: cuda when available)")
    dtype: str | None = flag(None, "the model's dtype (default: bfloat16 on CUDA, float32 on "
                             "CPU; the authors' wrapper loads LLaDA in float16)",
                             choices=("float32", "bfloat16", "float16"))
    rope_label: str = field(default="ckpt", init=False)  # how the base was chosen, in file names


def task_config(task: str) -> type:
    """The shared flags plus the task's own, as one dataclass: a task reads cfg.len and
    cfg.needle alike, and its defaults are written once, in its Options."""
    return make_dataclass(f"{task}_config", [], bases=(TASKS[task].Options, EvalConfig))


def parse_args(argv=None):
    # The task decides which flags exist, so it is read first (--help included).
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--task", default="niah", choices=list(TASKS))
    first.error = fail
    task = first.parse_known_args(argv)[0].task
    p = argparse.ArgumentParser(
        description="Evaluate a LLaDA checkpoint on one of the paper's benchmarks. Results: one "
                    "JSON per cell, a rerun skips finished ones, then tables and pictures.",
        epilog=f"Each task has its own flags: python evaluate.py --task {{{','.join(TASKS)}}} "
               f"--help. This is --task {task}. To put finished evaluations of several models "
               f"side by side: python evaluate.py --compare NAME=DIR ... (--compare --help).")
    p.error = fail  # argparse prints its usage first; our errors are one line
    add_flags(p.add_argument_group("flags of every task"), EvalConfig)
    add_flags(p.add_argument_group(f"flags of --task {task}"), TASKS[task].Options)
    cfg = from_args(task_config(task), p.parse_args(argv))
    if task == "longbench":
        if cfg.len:
            fail("--len does not apply to longbench: its prompts are cut to --max-len model tokens")
        cfg.len = [cfg.max_len]  # the one length its cells are run at (and RoPE scaled for)
    elif not cfg.len:
        fail(f"--task {task} needs --len, the context length(s) to evaluate")
    return cfg


# ---------------------------------------------------------------------------------------------
# Checks that need no model: everything a user can get wrong fails before any work.

def check_config(cfg) -> None:
    if not os.path.isfile(os.path.join(cfg.model, "config.json")):
        if cfg.model == DEFAULT_MODEL:
            raise ValueError(f"no checkpoint in {DEFAULT_MODEL}; run train.py first, or pass "
                             f"--model DIR")
        raise ValueError(f"--model {cfg.model} is not a checkpoint directory (no config.json)")
    if (cfg.train_len is not None or cfg.d_crit is not None) and not cfg.rope:
        raise ValueError("--train-len and --d-crit only apply with --rope METHOD")
    if cfg.rope_factor is not None and cfg.rope:
        raise ValueError("--rope-factor and --rope both set the RoPE base; pass one of them")
    if cfg.device and cfg.device.split(":")[0] not in ("cpu", "cuda"):
        raise ValueError(f"--device {cfg.device}: pass cpu or cuda")
    if cfg.device and cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {cfg.device}: no CUDA device is available here; pass cpu")
    TASKS[cfg.task].check(cfg)


def rope_label(cfg) -> str:
    if cfg.rope_factor is not None:
        return f"factor{cfg.rope_factor:g}"
    if not cfg.rope:
        return "ckpt"
    return cfg.rope + (f"-train{cfg.train_len}" if cfg.train_len else "") + \
        (f"-dcrit{cfg.d_crit}" if cfg.d_crit else "")


def rope_for_length(config, cfg, length: int) -> dict:
    """The rope_scaling to evaluate `length` tokens with: the checkpoint's own, its base times
    --rope-factor (the same at every length, as the authors' wrapper), or --rope re-scaled from
    the pre-trained base and window (LLaDAConfig.scaled_rope)."""
    if cfg.rope_factor is not None:
        return {**(config.rope_scaling or {}), "method": "factor", "lambda": cfg.rope_factor,
                "original_rope_theta": config.rope_theta,
                "rope_theta": config.rope_theta * cfg.rope_factor}
    if not cfg.rope:
        return {**(config.rope_scaling or {}), "rope_theta": config.rope_theta}
    return config.scaled_rope(cfg.rope, length, cfg.train_len, cfg.d_crit)


def settings(cfg, dtype: str) -> dict:
    """What a cell's result depends on besides its coordinates (the cell's name): a rerun with
    other settings into the same folder is refused instead of mixing two runs' cells, while
    more lengths, depths, samples or tasks only add cells."""
    return {"model": os.path.abspath(cfg.model), "checkpoint": checkpoint_fingerprint(cfg.model),
            "dtype": dtype, **settings_of(TASKS[cfg.task].Options, cfg)}


# ---------------------------------------------------------------------------------------------

@dataclass
class Run:
    """Everything the cell loop needs, made before the first cell."""
    name: str  # the task's name
    task: object  # its module
    tokenizer: object
    model: torch.nn.Module
    cells: list  # every cell of the plan
    work: dict  # what the task's plan prepared for its cells (haystacks, rows)
    source: str  # what the data is, for the log
    folder: str
    settings: dict

    def finished(self) -> set:
        """Names of the plan's cells with a result, whichever process made it."""
        return finished_cells(self.folder, self.name, [c["name"] for c in self.cells])


def prepare_run(cfg, dtype: str, device, rank: int, world: int) -> Run:
    """The plan, the results folder (never mixing settings) and the model."""
    task = TASKS[cfg.task]
    config = read_config(cfg.model)
    base, train_len = config.rope_origin(cfg.train_len)  # what rope_for_length scales from
    check_scaling_args(max(cfg.len), train_len, config.head_dim, cfg.d_crit, base, cfg.rope)
    tokens = task.forward_tokens(cfg)  # the longest prompt and its answer, every row at once
    check_fits(config, tokens, dtype, device,  # before a haystack is built
               f"this run's largest forward ({tokens:,} tokens)")
    tokenizer = model_tokenizer(cfg.model)
    check_tokenizer_fits(tokenizer, config, cfg.model)
    cfg.rope_label = rope_label(cfg)
    counter = tiktoken_tokenizer()  # NIAH and RULER lengths are cl100k tokens whatever the model's
    cells, work, source = task.plan(cfg, tokenizer, counter)
    folder = results_dir(cfg.model, cfg.task, cfg.results)
    current = settings(cfg, dtype)
    # nobody starts a cell before rank 0 has prepared the folder
    rank_zero_first(lambda: prepare_folder(folder, cfg.task, task.KEYS, current, cells,
                                           cfg.overwrite),
                    rank, world, what="prepare the results folder", others=False)
    model = from_pretrained(cfg.model, dtype=getattr(torch, dtype), device=device).eval()
    return Run(cfg.task, task, tokenizer, model, cells, work, source, folder, current)


def describe_run(cfg, run: Run, ropes: dict, dtype: str, device, world: int) -> float:
    """Print what is about to run; returns the estimated seconds."""
    c = run.model.config
    print(f"model: {cfg.model} ({c.n_layers} layers, d_model {c.d_model}, trained context "
          f"{c.max_sequence_length:,}), tokenizer {run.tokenizer.name}, {dtype} on {device.type}"
          + (f", {world} processes" if world > 1 else ""))
    print(f"data: {run.source}; results: {run.folder}")
    for L, rope in ropes.items():
        how = f"{rope['method']}, lambda {rope['lambda']:.3f}" if cfg.rope or cfg.rope_factor else \
            f"as saved ({rope.get('method', 'none')} for {rope.get('target_len', c.max_sequence_length):,})"
        print(f"rope at {L:,}: base {rope['rope_theta']:,.0f} ({how})")
    if not cfg.rope and cfg.rope_factor is None and \
            max(ropes) > (c.rope_scaling or {}).get("target_len", c.max_sequence_length):
        print("note: lengths beyond the checkpoint's context run with its base unchanged; "
              "--rope diffusion (or critical, ntk, pi) re-scales it for each length")
    finished = run.finished()
    pending = [cell for cell in run.cells if cell["name"] not in finished]
    if not pending:
        print(f"all {len(run.cells)} cells are done; --overwrite redoes them")
        return 0.0
    speed = flops_per_second(run.model, device) * world  # the processes share the cells
    estimate = sum(run.task.cell_flops(c, cfg, cell) for cell in pending) / speed
    print(f"{len(pending)} cells to run ({len(finished)} already done); estimate "
          f"{duration(estimate)}{f' on {world} processes' if world > 1 else ''} (from a short "
          f"timed forward scaled by FLOPs: rough at long lengths, where attention's share grows)")
    return estimate


def evaluate_cell(cfg, run: Run, cell: dict, rope: dict, device, rank: int) -> dict:
    """One cell's result record: its coordinates, what the task measured, how it was run."""
    run.model.config.set_rope(rope)
    record = {k: v for k, v in cell.items() if k != "name"}
    with finite_outputs(run.model, f"cell {cell['name']}"):
        record.update(run.task.run_cell(run.model, run.tokenizer, cfg, cell, run.work, device))
    record.update(rope_theta=rope["rope_theta"], rope_scaling=rope, settings=run.settings,
                  process=f"{socket.gethostname()} pid {os.getpid()} rank {rank} on {device}")
    return record


def run_cells(cfg, run: Run, ropes: dict, device, rank: int) -> None:
    """Every process claims and evaluates the cells nobody holds (results.claim_cells); rank 0,
    or a process on its own, then waits for the others' cells. Its bar counts them all."""
    by_name = {cell["name"]: cell for cell in run.cells}
    bar = tqdm(total=len(run.cells), initial=len(run.finished()), desc=cfg.task, unit="cell",
               dynamic_ncols=True, disable=rank != 0)

    def evaluate_one(name: str) -> dict:
        cell = by_name[name]
        record = evaluate_cell(cfg, run, cell, ropes[cell["length"]], device, rank)
        if "score" in record:
            bar.set_postfix(score=f"{record['score']:.0f}")
        return record

    def progress(finished: int, waiting: bool) -> None:
        bar.update(finished - bar.n)
        if waiting:
            bar.set_postfix_str("waiting for the other processes' cells")
    try:
        claim_cells(run.folder, run.name, list(by_name), evaluate_one, wait=rank == 0,
                    progress=progress if rank == 0 else None)
    finally:
        bar.close()


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if any(a == "--compare" or a.startswith("--compare=") for a in argv):
        return compare.main(argv)  # a report over finished results, no model
    rank, world, local_rank = process_env()  # torchrun's environment, checked
    cfg = parse_args(argv)
    tune_cpu_memory()  # huge pages for large CPU tensors, before the first one
    try:
        check_config(cfg)
        device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda" and world > 1:  # torchrun: one GPU per process on each node
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        dtype = cfg.dtype or ("bfloat16" if device.type == "cuda" else "float32")
        join_processes(world)
        run = prepare_run(cfg, dtype, device, rank, world)
    except ValueError as e:  # CheckpointError and FileError are ValueErrors
        fail(str(e), every_rank=isinstance(e, DoesNotFit))  # this rank's GPU alone may be full
    except KeyboardInterrupt:
        fail("interrupted before the first cell; run the same command again to start it", 130)

    ropes = {L: rope_for_length(run.model.config, cfg, L) for L in sorted({c["length"] for c in run.cells})}
    estimate = describe_run(cfg, run, ropes, dtype, device, world) if rank == 0 else 0.0
    started, before = time.perf_counter(), len(run.finished())
    try:
        run_cells(cfg, run, ropes, device, rank)
    except KeyboardInterrupt:
        fail(f"interrupted; the finished cells are in {run.folder}: run the same command again "
             f"to continue", 130)
    except ValueError as e:  # NonFinite, or a FileError (a full disk, a read-only folder)
        fail(str(e), every_rank=True)  # what one rank met, the others may not have
    if world > 1:
        dist.destroy_process_group()
    if rank != 0:
        return
    ran, seconds = len(run.finished()) - before, time.perf_counter() - started
    if ran:
        print(f"ran {ran} cells in {duration(seconds)} ({ran / seconds:.3g} cells/s; estimated "
              f"{duration(estimate)})")
    found = read_results(run.folder, cfg.task, run.task.KEYS)
    mine = [cell for cell in found.values() if cell.get("settings") == run.settings]
    if len(mine) < len(found):
        print(f"({len(found) - len(mine)} cells in {run.folder} were made with other settings "
              f"and are left out)")
    print(run.task.report(mine, cfg, run.folder) if mine else "no results yet")


if __name__ == "__main__":
    main()
