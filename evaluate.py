"""
evaluate.py: the evaluation runner: a checkpoint, a task, lengths; one result file per cell.

Paper map: docs/paper.md section 5. The tasks, each in evaluations/: niah (needle in a haystack,
our synthetic version for tiny models), needlebench (NeedleBench "origin", the authors' NIAH to
128K), ruler (RULER's 13 tasks), longbench (LongBench's 21 datasets at 16K) and ppl
(long-document perplexity, LongLLaDA's protocol). A task holds its flags (`Options`), the keys
its results need (`KEYS`) and five functions: forward_tokens(cfg) sizes its largest forward (the
memory check), plan(cfg, tokenizer, counter) opens and checks its data and lists the cells,
run_cell(...) evaluates one, cell_flops(...) says what it costs, and report(cells, cfg, folder)
writes tables and pictures. This runner owns the shared flags, the model and the cell loop.
--rope re-scales the checkpoint's RoPE base for each evaluated length, the paper's
training-free comparison; --rope-factor multiplies it by one factor, as the authors' wrapper
did; without either it runs as saved.

Every cell is one JSON file in the results folder, written atomically: a rerun skips finished
cells, an interrupted run loses at most the cell in progress, and any number of processes can
share a folder (torchrun, or separate jobs), each computing the cells it can claim.

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

from diffusion import check_schedule
from evaluations import TASKS, compare
from harness.checkpoint import check_tokenizer_fits, from_pretrained, model_tokenizer, read_config
from harness.files import append_line, write_json
from harness.flags import add_flags, count, flag, from_args, positive, settings_of
from harness.results import (DoesNotFit, check_fits, checkpoint_fingerprint, claim, duration,
                             finite_outputs, flops_per_second, prepare_folder, read_results,
                             results_dir)
from harness.runtime import (exit_after, fail, join_processes, process_env, rank_zero_first,
                             tune_cpu_memory)
from harness.tokenizer import tiktoken_tokenizer
from rope import METHODS

DEFAULT_MODEL = os.path.join("out", "checkpoint")  # where train.py writes


def device_name(text: str) -> str:
    if text.split(":")[0] not in ("cpu", "cuda") or text.startswith("cuda") and not \
            torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: pass cpu, or cuda where a GPU is available")
    return text


@dataclass
class EvalConfig:
    """The flags every task shares; each task adds its own (evaluations/<task>.py, Options). The
    rope choice is in each cell's name; the rest say where and how a run goes."""
    task: str = flag("niah", "niah (our synthetic needles, for tiny models), needlebench (the "
                     "authors' NIAH), ruler, longbench or ppl (long-document perplexity); "
                     "`--task NAME --help` lists that task's own flags", choices=list(TASKS))
    model: str = flag(DEFAULT_MODEL, "checkpoint directory (train.py writes out/checkpoint)")
    len: list[int] | None = flag(None, "context length(s), e.g. --len 8192 16384 131072 (not "
                                 "longbench: --max-len): the prompt in cl100k tokens for niah, "
                                 "needlebench and ruler, as the authors' configs count; the first "
                                 "L model tokens of each document for ppl", type=count, nargs="+")
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
    device: str | None = flag(None, "cuda or cpu (default: cuda when available)", type=device_name)
    dtype: str | None = flag(None, "the model's dtype (default: bfloat16 on CUDA, float32 on "
                             "CPU; the authors' wrapper loads LLaDA in float16)",
                             choices=("float32", "bfloat16", "float16"))
    rope_label: str = field(default="ckpt", init=False)  # how the base was chosen, in file names


def task_config(task: str) -> type:
    """The shared flags plus the task's own, as one dataclass; its defaults are its Options'."""
    return make_dataclass(f"{task}_config", [], bases=(TASKS[task].Options, EvalConfig))


def parse_args(argv=None):
    """The flags, each checked by its parser; then the rules that tie several together."""
    first = argparse.ArgumentParser(add_help=False)  # the task decides which flags exist
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
    if (cfg.train_len is not None or cfg.d_crit is not None) and not cfg.rope:
        fail("--train-len and --d-crit only apply with --rope METHOD")
    if cfg.rope_factor is not None and cfg.rope:
        fail("--rope-factor and --rope both set the RoPE base; pass one of them")
    if hasattr(cfg, "steps"):  # a task that decodes answers: the sampler's one rule
        try:
            check_schedule(cfg.gen_length, cfg.block_length, cfg.steps)
        except ValueError as e:
            fail(f"{e}; pass other --gen-length, --block-length or --steps")
    cfg.rope_label = f"factor{cfg.rope_factor:g}" if cfg.rope_factor is not None else \
        cfg.rope + (f"-train{cfg.train_len}" if cfg.train_len else "") + \
        (f"-dcrit{cfg.d_crit}" if cfg.d_crit else "") if cfg.rope else "ckpt"
    return cfg


def rope_for_length(config, cfg, length: int) -> dict:
    """The rope_scaling for `length` tokens: the checkpoint's own, its base times --rope-factor
    (as the authors' wrapper), or --rope re-scaled from the pre-trained base and window."""
    if cfg.rope_factor is not None:
        return {**(config.rope_scaling or {}), "method": "factor", "lambda": cfg.rope_factor,
                "original_rope_theta": config.rope_theta,
                "rope_theta": config.rope_theta * cfg.rope_factor}
    if not cfg.rope:
        return {**(config.rope_scaling or {}), "rope_theta": config.rope_theta}
    return config.scaled_rope(cfg.rope, length, cfg.train_len, cfg.d_crit)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if any(a == "--compare" or a.startswith("--compare=") for a in argv):
        return compare.main(argv)  # a report over finished results, no model
    rank, world, local_rank = process_env()  # torchrun's environment, checked
    cfg = parse_args(argv)
    task = TASKS[cfg.task]
    tune_cpu_memory()  # huge pages for large CPU tensors, before the first one
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and world > 1:  # torchrun: one GPU per process on each node
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
    dtype = cfg.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    if cfg.model == DEFAULT_MODEL and not os.path.isdir(DEFAULT_MODEL):
        fail(f"no checkpoint in {DEFAULT_MODEL}; run train.py first, or pass --model DIR")
    try:  # what a user can get wrong fails here, before any work
        join_processes(world)
        config = read_config(cfg.model)
        ropes = {L: rope_for_length(config, cfg, L) for L in sorted(set(cfg.len))}
        check_fits(config, task.forward_tokens(cfg), dtype, device)  # before a haystack is built
        tokenizer = model_tokenizer(cfg.model)
        check_tokenizer_fits(tokenizer, config, cfg.model)
        # NIAH and RULER lengths are cl100k tokens whatever the model's tokenizer
        cells, work, source = task.plan(cfg, tokenizer, tiktoken_tokenizer())
        folder = results_dir(cfg.model, cfg.task, cfg.results)
        # what a result depends on besides its cell: other settings in one folder are refused
        settings = {"model": os.path.abspath(cfg.model), "dtype": dtype, "checkpoint":
                    checkpoint_fingerprint(cfg.model), **settings_of(task.Options, cfg)}
        model = from_pretrained(cfg.model, dtype=getattr(torch, dtype), device=device).eval()
        names = [cell["name"] for cell in cells]  # the folder is set up once the run can start
        rank_zero_first(lambda: prepare_folder(folder, cfg.task, task.KEYS, settings, set(names),
                                               cfg.overwrite),  # before anyone starts a cell
                        rank, world, what="prepare the results folder", others=False)
    except ValueError as e:  # CheckpointError and FileError are ValueErrors
        fail(str(e), every_rank=isinstance(e, DoesNotFit))  # this rank's GPU alone may be full

    def finished() -> set:  # the cells with a result, whichever process wrote it
        return set(os.listdir(folder)).intersection(names)
    started, before = time.perf_counter(), len(finished())
    if rank == 0:  # what is about to run
        c = model.config
        print(f"model: {cfg.model} ({c.n_layers} layers, d_model {c.d_model}, trained context "
              f"{c.max_sequence_length:,}), tokenizer {tokenizer.name}, {dtype} on {device.type}"
              + (f", {world} processes" if world > 1 else ""))
        print(f"data: {source}; results: {folder}")
        saved = (c.rope_scaling or {}).get("target_len", c.max_sequence_length)
        for L, rope in ropes.items():
            how = f"{rope['method']}, lambda {rope['lambda']:.3f}" if cfg.rope or cfg.rope_factor \
                else f"as saved ({rope.get('method', 'none')} for {saved:,})"
            print(f"rope at {L:,}: base {rope['rope_theta']:,.0f} ({how})")
        if not cfg.rope and cfg.rope_factor is None and max(ropes) > saved:
            print("note: lengths beyond the checkpoint's context run with its base unchanged; "
                  "--rope diffusion (or critical, ntk, pi) re-scales it for each length")
        pending = [cell for cell in cells if cell["name"] not in finished()]
        estimate = sum(task.cell_flops(config, cfg, cell) for cell in pending) / \
            (flops_per_second(model, device) * world) if pending else 0.0  # the processes share
        print(f"{len(pending)} cells to run ({before} already done); estimate {duration(estimate)}"
              f"{f' on {world} processes' if world > 1 else ''} (from a short timed forward "
              f"scaled by FLOPs: rough at long lengths, where attention's share grows)"
              if pending else f"all {len(cells)} cells are done; --overwrite redoes them")
    # Every process walks the cells and computes those it can claim; rank 0 (or a process on
    # its own) then waits for the cells other processes hold, taking over any they abandon.
    process = f"{socket.gethostname()} pid {os.getpid()} rank {rank} on {device}"
    journal = os.path.join(folder, f".journal-{cfg.task}.jsonl")  # who computed each cell
    try:
        with tqdm(total=len(cells), desc=cfg.task, unit="cell", dynamic_ncols=True,
                  disable=rank != 0) as bar:  # closed before an error is said
            while len(done := finished()) < len(cells):
                bar.update(len(done) - bar.n)
                took = False
                for cell in (cell for cell in cells if cell["name"] not in done):
                    with claim(folder, cell["name"]) as mine:
                        if not mine:
                            continue
                        rope = ropes[cell["length"]]
                        model.config.set_rope(rope)
                        with finite_outputs(model, f"cell {cell['name']}"):
                            record = task.run_cell(model, tokenizer, cfg, cell, work, device)
                        record = {**{k: v for k, v in cell.items() if k != "name"}, **record,
                                  "rope_theta": rope["rope_theta"], "rope_scaling": rope,
                                  "settings": settings, "process": process,
                                  "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
                        write_json(os.path.join(folder, cell["name"]), record)
                        append_line(journal, {"cell": cell["name"], "process": process})
                    took = True
                    bar.update(1)
                    if "score" in record:
                        bar.set_postfix(score=f"{record['score']:.0f}")
                if not took:  # what is left is held by other processes
                    if rank != 0:
                        break
                    bar.set_postfix_str("waiting for the other processes' cells")
                    time.sleep(1)
    except KeyboardInterrupt:
        fail(f"interrupted; the finished cells are in {folder}: run the same command again to "
             f"continue", 130)
    except ValueError as e:  # a non-finite forward, or a FileError (a full disk, say)
        fail(str(e), every_rank=True)  # what one rank met, the others may not have
    if world > 1:
        dist.destroy_process_group()
    if rank != 0:
        return
    ran, seconds = len(finished()) - before, time.perf_counter() - started
    if ran:
        print(f"ran {ran} cells in {duration(seconds)} ({ran / seconds:.3g} cells/s; estimated "
              f"{duration(estimate)})")
    found = read_results(folder, cfg.task, task.KEYS).values()
    mine = [cell for cell in found if cell.get("settings") == settings]
    if len(mine) < len(found):  # written by a run whose settings an --overwrite replaced
        print(f"({len(found) - len(mine)} cells of other settings in {folder} are left out)")
    print(task.report(mine, cfg, folder) if mine else "no results yet")


if __name__ == "__main__":
    exit_after(main)
