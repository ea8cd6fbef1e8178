"""
bench_main_job.py: the wall time of the README's commands, as a user on a fresh clone meets them.

Runs, one after the other and each in a fresh process: `python train.py` (the tiny preset on the
built-in corpus, into a temporary --out with an empty token cache, so the cache is built as on
a fresh clone), `python evaluate.py --task niah --len 2048` on the checkpoint it wrote, and the
`python diffusion.py` demo. Prints a markdown table of the times and what each ended with (the
last loss, the NIAH average, the demo's last line): docs/benchmarks.md, "Timings of the main
job". The tests' time is the last line `python -m pytest` prints. Nothing else should run
meanwhile: on 2 cores a second job doubles every time.

    python -m bench.bench_main_job
"""
import os
import re
import sys
import tempfile

from bench.child import best_time, parser, run_child


def minutes(seconds: float) -> str:
    whole, rest = divmod(round(seconds), 60)  # 119.6 s is 2 min 0 s, not 2 min 60 s
    return f"{whole} min {rest} s" if whole else f"{rest} s"


def main(argv=None):
    parser(__doc__).parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-main-") as tmp:
        out, cache = os.path.join(tmp, "out"), os.path.join(tmp, "cache")
        printed, seconds = best_time(lambda: run_child(
            [sys.executable, "train.py", "--out", out, "--cache-dir", cache], "train.py"))
        losses = re.findall(r"step +(\d+) \| loss ([\d.]+)", printed)
        rows.append(("`python train.py` (token cache built)", seconds,
                     f"loss {losses[-1][1]} at step {losses[-1][0]}" if losses else "-"))
        printed, seconds = best_time(lambda: run_child(
            [sys.executable, "evaluate.py", "--model", os.path.join(out, "checkpoint"), "--len",
             "2048", "--results", os.path.join(tmp, "results")], "evaluate.py"))
        average = re.search(r"rope \S+: average ([\d.]+)", printed)
        rows.append(("`python evaluate.py --task niah --len 2048`", seconds,
                     f"average {average.group(1)}" if average else "-"))
    printed, seconds = best_time(lambda: run_child([sys.executable, "diffusion.py"],
                                                   "the diffusion.py demo"))
    answer = re.findall(r"(?m)^.*->.*$", printed)
    rows.append(("`python diffusion.py` (the sampler's demo)", seconds,
                 answer[-1].strip() if answer else "-"))
    print("| command | wall time | ended with |\n|---|---:|---|")
    for command, seconds, result in rows:
        print(f"| {command} | {minutes(seconds)} | {result} |")


if __name__ == "__main__":
    main()
