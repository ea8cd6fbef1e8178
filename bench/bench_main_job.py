"""
bench_main_job.py: the wall time of the README's commands, as a user on a fresh clone meets them.

Runs, one after the other and each in a fresh process: `python train.py` (the tiny preset on the
built-in corpus, into a temporary --out with an empty token cache, so the cache is built as on
a fresh clone), `python evaluate.py --task niah --len 2048` on the checkpoint it wrote, the
`python diffusion.py` demo and (with --tests) `python -m pytest`. Prints a markdown table of
the times and what each ended with (the last loss, the NIAH average, the demo's last line, the
tests passed): docs/benchmarks.md, "Timings of the
main job". Nothing else should run meanwhile: on 2 cores a second job doubles every time.

    python -m bench.bench_main_job [--tests]
"""
import argparse
import os
import re
import sys
import tempfile
import time

from bench.child import run_child
from harness.runtime import fail

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def timed(cmd: list[str], what: str) -> tuple[float, str]:
    """(seconds, what it printed) of one command run from the repository's root."""
    start = time.perf_counter()
    out = run_child(cmd, what, ROOT)
    return time.perf_counter() - start, out


def minutes(seconds: float) -> str:
    whole, rest = divmod(round(seconds), 60)  # 119.6 s is 2 min 0 s, not 2 min 60 s
    return f"{whole} min {rest} s" if whole else f"{rest} s"


def main(argv=None):
    p = argparse.ArgumentParser(description="Wall time of the README's main commands: train.py "
                                            "on the defaults (token cache built), evaluate.py "
                                            "--task niah --len 2048 on its checkpoint, the "
                                            "diffusion.py demo, and with --tests the tests. "
                                            "Run nothing else meanwhile.")
    p.error = fail  # one line, not the usage block
    p.add_argument("--tests", action="store_true",
                   help="also time `python -m pytest` (several minutes)")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-main-") as tmp:
        out, cache = os.path.join(tmp, "out"), os.path.join(tmp, "cache")
        seconds, printed = timed([sys.executable, "train.py", "--out", out, "--cache-dir", cache],
                                 "train.py")
        losses = re.findall(r"step +(\d+) \| loss ([\d.]+)", printed)
        rows.append(("`python train.py` (token cache built)", seconds,
                     f"loss {losses[-1][1]} at step {losses[-1][0]}" if losses else "-"))
        seconds, printed = timed([sys.executable, "evaluate.py", "--model",
                                  os.path.join(out, "checkpoint"), "--len", "2048",
                                  "--results", os.path.join(tmp, "results")], "evaluate.py")
        average = re.search(r"rope \S+: average ([\d.]+)", printed)
        rows.append(("`python evaluate.py --task niah --len 2048`", seconds,
                     f"average {average.group(1)}" if average else "-"))
    seconds, printed = timed([sys.executable, "diffusion.py"], "the diffusion.py demo")
    answer = re.findall(r"(?m)^.*->.*$", printed)
    rows.append(("`python diffusion.py` (the sampler's demo)", seconds,
                 answer[-1].strip() if answer else "-"))
    if args.tests:
        seconds, printed = timed([sys.executable, "-m", "pytest", "-p", "no:cacheprovider"],
                                 "the tests")  # pyproject's -q: the summary line stays
        passed = re.search(r"(\d+) passed", printed)
        rows.append(("`python -m pytest`", seconds, f"{passed.group(1)} passed" if passed else "-"))
    print("| command | wall time | ended with |\n|---|---:|---|")
    for command, seconds, result in rows:
        print(f"| {command} | {minutes(seconds)} | {result} |")


if __name__ == "__main__":
    main()
