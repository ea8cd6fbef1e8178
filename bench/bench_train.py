"""
bench_train.py: training throughput on the CPU, one process and two (torchrun, gloo).

Runs train.py for a few steps of the `small` preset at two sequence lengths and reads the
tokens/s that its log.jsonl records (the first steps, which warm up, are left out). Model FLOP
utilisation counts the FLOPs the model needs, not the ones spent recomputing (results.forward_flops
x 3 for forward and backward, the LM head on the masked half of the tokens), divided by the
torch.mm peak of this machine's cores, measured in the same run. Prints a markdown table.

    python -m bench.bench_train [--lengths 256 1024] [--steps 8] [--preset small]
"""
import json
import os
import tempfile

import torch

from bench.bench_model import matmul_peak
from bench.child import parser, run_script
from harness.flags import count, count0
from harness.results import forward_flops
from harness.runtime import fail
from model import PRESETS, preset


def run(nproc: int, seq_len: int, args, out: str) -> float:
    """Mean tokens/s of the steps after the warm-up ones."""
    run_script(nproc, max(1, torch.get_num_threads() // nproc),
               ["train.py", "--init", args.preset, "--seq-len", str(seq_len), "--batch-size", "1",
                "--max-steps", str(args.steps), "--save-every", "100000", "--log-every", "100000",
                "--out", out, "--seed", "0"], f"train.py at {seq_len} tokens on {nproc} process(es)")
    with open(os.path.join(out, "log.jsonl")) as f:
        rates = [json.loads(line)["tokens_per_s"] for line in f][args.warmup_steps:]
    return sum(rates) / len(rates)


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--preset", default="small", choices=list(PRESETS), help="model preset (default small)")
    p.add_argument("--lengths", type=count, nargs="+", default=[256, 1024],
                   help="sequence lengths, each run with 1 and 2 processes (default 256 1024)")
    p.add_argument("--steps", type=count, default=8, help="optimizer steps per run (default 8)")
    p.add_argument("--warmup-steps", type=count0, default=3, help="first steps left out (default 3)")
    args = p.parse_args(argv)
    if args.warmup_steps >= args.steps:
        fail(f"--warmup-steps {args.warmup_steps} leaves none of --steps {args.steps} to measure; "
             f"pass more --steps")
    cfg = preset(args.preset)
    peak = matmul_peak(cfg, 1024, torch.float32, 5)
    print(f"preset {args.preset}, float32, {torch.get_num_threads()} cores, batch 1 per process, "
          f"torch.mm peak {peak / 1e9:.1f} GFLOP/s\n")
    print("| seq len | processes | tokens/s | model GFLOP/s | MFU (of mm peak) |")
    print("|---:|---:|---:|---:|---:|")
    for L in args.lengths:
        for nproc in (1, 2):
            with tempfile.TemporaryDirectory() as out:
                tps = run(nproc, L, args, out)
            # forward + backward = 3 forwards of a token attending to L, the head on half of them
            flops = tps * 3 * forward_flops(cfg, 1, L, 0.5)
            print(f"| {L} | {nproc} | {tps:,.0f} | {flops / 1e9:.1f} | {flops / peak:.0%} |", flush=True)


if __name__ == "__main__":
    main()
