"""
bench_exit.py: do 2-process torchrun runs of train.py and evaluate.py exit 0 once they finish?

A finished run could die at interpreter exit with "terminate called without an active exception"
(torchrun then returns 1): a gloo worker thread freeing a tensor met Python's finalization
(bench/gloo_abort_repro.py shows it with torch alone; harness/runtime.exit_after leaves before
finalization). The race is rare on an idle machine, so every run is loaded as in the repro: its
processes' gloo threads reniced to +19 while two busy loops fill two cores. A round trains the
tiny preset for 4 steps of 128 tokens on 2 processes (gloo, CPU), saving at the end, then
evaluates that checkpoint (NIAH, 512 tokens, one depth) on 2 processes. Prints how many runs of
each exited 0, and each failure's exit code and last line.

    python -m bench.bench_exit [--runs 40]
"""
import argparse
import os
import sys
import tempfile

from bench.child import ROOT, last_line
from bench.gloo_abort_repro import ABORT, busy_loops, run_under_load
from harness.flags import count
from harness.runtime import fail

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def main(argv=None):
    p = argparse.ArgumentParser(description="Exit codes of 2-process torchrun train.py and "
                                            "evaluate.py runs under load (gloo, CPU).")
    p.error = fail  # one line, not the usage block
    p.add_argument("--runs", type=count, default=40, help="rounds of one train.py and one "
                   "evaluate.py run (default 40)")
    args = p.parse_args(argv)
    exits, failures = {"train.py": [], "evaluate.py": []}, []
    loops = busy_loops()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-exit-") as tmp:
            for i in range(args.runs):
                out = os.path.join(tmp, f"run{i}")
                for script, flags in (
                        ("train.py", ["--out", out, "--cache-dir", os.path.join(tmp, "cache"),
                                      "--seq-len", "128", "--max-steps", "4", "--warmup", "2"]),
                        ("evaluate.py", ["--model", os.path.join(out, "checkpoint"), "--len", "512",
                                         "--depths", "50", "--results", out + "-results"])):
                    code, err = run_under_load(TORCHRUN + [script, *flags], cwd=ROOT)
                    exits[script].append(code)
                    if code:
                        failures.append((script, f"- {script}, run {i + 1}: exit {code}: "
                                                 f"{ABORT if ABORT in err else last_line(err)}"))
                print(f"round {i + 1}/{args.runs}: exit codes {exits['train.py'][-1]}, "
                      f"{exits['evaluate.py'][-1]}", file=sys.stderr, flush=True)
    finally:
        for loop in loops:
            loop.kill()
    print(f"2-process torchrun (gloo) on {os.cpu_count()} cores, gloo threads at nice +19, two "
          f"busy loops\n\n| script | runs | exited 0 | aborted at exit |\n|---|---:|---:|---:|")
    for script, codes in exits.items():
        aborted = sum(s == script and ABORT in line for s, line in failures)
        print(f"| torchrun {script} | {len(codes)} | {codes.count(0)} | {aborted} |")
    print("".join(f"\n{line}" for _, line in failures))


if __name__ == "__main__":
    main()
