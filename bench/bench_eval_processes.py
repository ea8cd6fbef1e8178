"""
bench_eval_processes.py: evaluation throughput, one process against several sharing the cells.

evaluate.py spreads a run's cells over every process it is started with (torchrun, or
independent jobs on one results folder: harness/results.py, claim). This times the same
NIAH grid on a random tiny checkpoint with one process and with N under torchrun, each process
pinned to one thread (OMP_NUM_THREADS=1), and reads the cells per second that evaluate.py
prints (from its first cell until every process's cells are in). Goal: two processes >= 1.8x
the cells per second of one. Prints a markdown table.

    python -m bench.bench_eval_processes [--processes 2] [--len 1024] [--depths 21] [--repeats 2]
"""
import os
import re
import tempfile

import torch

from bench.child import parser, run_script
from harness.checkpoint import save_pretrained
from harness.flags import count, number
from harness.tokenizer import TIKTOKEN_NAME
from model import LLaDA, preset


def tiny_checkpoint(path: str) -> str:
    """A random tiny-preset model on the cl100k tokenizer: the processes are measured, not it."""
    torch.manual_seed(0)
    config = preset("tiny")
    config.extra["tokenizer"] = TIKTOKEN_NAME
    save_pretrained(path, config, LLaDA(config).state_dict())
    return path


def cells_per_second(processes: int, ckpt: str, args, results: str) -> tuple[float, int]:
    """(cells per second, cells) of one evaluate.py run into a fresh results folder."""
    depths = [str(round(100 * i / (args.depths - 1))) for i in range(args.depths)]
    out = run_script(processes, 1, ["evaluate.py", "--model", ckpt, "--len", str(args.len),
                                    "--depths", *depths, "--repeats", str(args.repeats),
                                    "--results", results], f"evaluate.py on {processes} process(es)")
    found = re.search(r"ran (\d+) cells in .*?\(([\d.e+-]+) cells/s", out)
    return float(found.group(2)), int(found.group(1))


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--processes", type=count, default=2, help="processes of the second run "
                   "(default 2; one core each, so no more than the cores)")
    p.add_argument("--len", type=count, default=1024, help="context length of every cell "
                   "(default 1024)")
    p.add_argument("--depths", type=number(int, 2, True, 101), default=21,
                   help="needle depths, spread over 0..100 in whole percent (default 21)")
    p.add_argument("--repeats", type=count, default=2, help="haystacks per depth (default 2)")
    p.add_argument("--rounds", type=count, default=2, help="runs of each, best kept (default 2)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        ckpt = tiny_checkpoint(os.path.join(work, "tiny"))
        best = {}
        for r in range(args.rounds):
            for n in (1, args.processes):
                rate, cells = cells_per_second(n, ckpt, args, os.path.join(work, f"res{n}-{r}"))
                best[n] = max(best.get(n, 0.0), rate)
    print(f"NIAH on the tiny preset, {cells} cells of {args.len:,} tokens, one thread per "
          f"process, best of {args.rounds}; {os.cpu_count()} cores\n")
    print("| processes | cells/s | speed-up |\n|---:|---:|---:|")
    for n, rate in best.items():
        print(f"| {n} | {rate:.3f} | {rate / best[1]:.2f}x |")


if __name__ == "__main__":
    main()
