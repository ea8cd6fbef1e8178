"""
bench_eval.py: time and peak memory of one NIAH cell of evaluate.py, at 8K, 32K and 131072 tokens,
with exact decoding and with the prompt cache, on the CPU.

A cell is what `python evaluate.py --task niah` runs for one (length, depth, repeat): build the
prompt (synthetic haystack, needle at 50%, question; --len cl100k tokens) and decode 32 tokens in
one block with 16 steps. The model is the tiny preset with random weights (or --model DIR); the
timings do not depend on the weights. Each case runs in a fresh subprocess so that its peak
resident memory (VmHWM, reset by writing 5 to /proc/self/clear_refs) is its own.

Exact decoding runs 16 full forwards; with the prompt cache the first forward is full and the
other 15 run the 32 answer tokens against the cached keys (so "per step", the cell time / 16, is
an average). An exact forward at 131072 tokens takes minutes on a CPU, so the exact 131072 cell
runs only with --exact-131072. The estimate column scales the first row by FLOPs as evaluate.py
estimates a run (results.generation_flops). A load average above the core count means another
process shared the CPU and the times are inflated.

    python -m bench.bench_eval [--lengths 8192 32768 131072] [--exact-131072] [--model DIR]
"""
import os
import time

import torch

import evaluate
from bench.child import measure, memory_mb, parser, reset_peak, serve
from evaluations import niah
from harness.checkpoint import from_pretrained, read_config
from harness.flags import count
from harness.results import generation_flops
from harness.runtime import fail
from harness.tokenizer import tiktoken_tokenizer
from model import LLaDA, preset


def run_case(length: int, mode: str, model_dir: str) -> dict:
    """Runs in the child process: one NIAH cell, timed, with its peak memory."""
    torch.manual_seed(0)
    model = (from_pretrained(model_dir, dtype=torch.float32) if model_dir else LLaDA(preset("tiny"))).eval()
    counter = tiktoken_tokenizer()
    counter.decode([0])  # builds decode's table of known ids once, outside the measurement
    cfg = evaluate.task_config("niah")(len=[length], depths=[50], prompt_cache=mode == "prefix")
    with torch.no_grad():
        model(torch.zeros(1, 64, dtype=torch.long))  # warm-up: threads, allocator
    base = reset_peak()
    load, t = os.getloadavg()[0], time.perf_counter()
    cells, work, _ = niah.plan(cfg, counter, counter)
    cell = niah.run_cell(model, counter, cfg, cells[0], work, torch.device("cpu"))
    return {"build": time.perf_counter() - t - cell["seconds"],  # the rest is the prompt's
            "time": cell["seconds"], "peak_mb": memory_mb("VmHWM"),
            "above_mb": memory_mb("VmHWM") - base, "load": max(load, os.getloadavg()[0])}


def main(argv=None):
    if serve(run_case):
        return
    p = parser(__doc__)
    p.add_argument("--lengths", type=count, nargs="+", default=[8192, 32768, 131072],
                   help="context lengths in cl100k tokens (default 8192 32768 131072)")
    p.add_argument("--exact-131072", action="store_true",
                   help="also run the exact cell at lengths >= 131072 (about half an hour on 2 cores)")
    p.add_argument("--model", default=None, help="a checkpoint directory instead of random tiny weights")
    args = p.parse_args(argv)
    try:  # what evaluate.py checks before its first cell: the checkpoint, the needle fits
        config = read_config(args.model) if args.model else preset("tiny")
        niah.plan(evaluate.task_config("niah")(len=[min(args.lengths)], depths=[50]),
                  tiktoken_tokenizer(), tiktoken_tokenizer())
    except ValueError as e:
        fail(str(e))
    print(f"## One NIAH cell: {args.model or 'tiny preset, random weights'} ({config.n_layers} "
          f"layers, d_model {config.d_model}, {config.n_heads} heads), float32 on the CPU "
          f"({os.cpu_count()} cores, {torch.get_num_threads()} threads); 32 tokens, one block, "
          f"16 steps, needle at 50%\n")
    print("| length (cl100k) | decoding | prompt build (s) | cell time (s) | per step (s) "
          "| estimate from the first row (s) | peak RSS (MB) | above the loaded model (MB) "
          "| load average |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    first = None  # (seconds, FLOPs) of the first row: what evaluate.py's estimate scales from
    for length in args.lengths:
        for mode in ("exact", "prefix"):
            if mode == "exact" and length >= 131072 and not args.exact_131072:
                print(f"| {length:,} | exact | - | not run (pass --exact-131072; about 16 x the "
                      f"time of one forward) | | | | | |", flush=True)
                continue
            r = measure("bench.bench_eval", f"the {length} {mode} case", length, mode,
                        args.model or "")
            flops = generation_flops(config, length, 32, 32, 16, prompt_cache=mode == "prefix")
            first = first or (r["time"], flops)
            estimate = first[0] / first[1] * flops
            label = "exact" if mode == "exact" else "prompt cache"
            print(f"| {length:,} | {label} | {r['build']:.1f} | {r['time']:.1f} | {r['time'] / 16:.2f} "
                  f"| {estimate:.0f} | {r['peak_mb']:,.0f} | {r['above_mb']:,.0f} | {r['load']:.1f} |",
                  flush=True)


if __name__ == "__main__":
    main()
