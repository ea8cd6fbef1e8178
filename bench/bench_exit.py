"""
bench_exit.py: do 2-process torchrun runs of train.py and evaluate.py exit 0 once they finish?

A finished run could die at interpreter exit with "terminate called without an active exception"
(torchrun then returns 1); bench/gloo_abort_repro.py shows why with torch alone, and
harness/runtime.exit_after leaves before finalization. Every run is under the repro's load (its
gloo threads reniced, two cores busy). A round trains the tiny preset for 4 steps of 128 tokens
on 2 processes (gloo, CPU), saving at the end, then evaluates that checkpoint (NIAH, 512
tokens, one depth) on 2 processes. Prints how many runs of each exited 0, and each failure's
exit code and last line.

    python -m bench.bench_exit [--runs 40] [--data DIR] [--cache-dir DIR]
"""
import os
import sys
import tempfile

from bench.child import ROOT, TORCHRUN, last_line, parser
from bench.gloo_abort_repro import ABORT, busy_cores, run_under_load
from harness.flags import count


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--runs", type=count, default=40, help="rounds of one train.py and one "
                   "evaluate.py run (default 40)")
    p.add_argument("--data", help="train.py's corpus (default: its built-in synthetic one)")
    p.add_argument("--cache-dir", help="train.py's token cache (default: a temporary folder)")
    args = p.parse_args(argv)
    data = ["--data", args.data] if args.data else []
    runs = {"train.py": [], "evaluate.py": []}  # each run's exit code and what it said last
    with busy_cores(), tempfile.TemporaryDirectory(prefix="bench-exit-") as tmp:
        for i in range(args.runs):
            out = os.path.join(tmp, f"run{i}")
            for script, flags in (
                    ("train.py", ["--out", out, *data, "--cache-dir", args.cache_dir or
                                  os.path.join(tmp, "cache"), "--seq-len", "128", "--max-steps",
                                  "4", "--warmup", "2"]),
                    ("evaluate.py", ["--model", os.path.join(out, "checkpoint"), "--len", "512",
                                     "--depths", "50", "--results", out + "-results"])):
                code, err = run_under_load([*TORCHRUN, "2", script, *flags], cwd=ROOT)
                runs[script].append((code, ABORT if ABORT in err else last_line(err)))
            print(f"round {i + 1}/{args.runs}: exit codes {runs['train.py'][-1][0]}, "
                  f"{runs['evaluate.py'][-1][0]}", file=sys.stderr, flush=True)
    print(f"2-process torchrun (gloo) on {os.cpu_count()} cores, gloo threads at nice +19, two "
          f"busy loops\n\n| script | runs | exited 0 | aborted at exit |\n|---|---:|---:|---:|")
    for script, ends in runs.items():
        print(f"| torchrun {script} | {len(ends)} | {sum(code == 0 for code, _ in ends)} | "
              f"{sum(code != 0 and said == ABORT for code, said in ends)} |")
    print("".join(f"\n- {script}, run {i + 1}: exit {code}: {said}" for script, ends in runs.items()
                  for i, (code, said) in enumerate(ends) if code))

if __name__ == "__main__":
    main()
