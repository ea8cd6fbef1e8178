"""child.py: what the bench scripts share. Their flags (a mistake is one line), the commands they
run (one line for the user when one fails, its whole output kept in a log file), and a
measurement in a fresh process, so that its peak memory is its own."""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from harness.runtime import fail, tune_cpu_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]


def parser(doc: str) -> argparse.ArgumentParser:
    """The flags of a bench script whose docstring is `doc` (its --help); a bad one is one
    "error:" line and exit 2, not the usage block."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = fail
    return p


def last_line(text: str) -> str:
    """What a failed child said: its last "error:" line, else its last line (a traceback's
    exception)."""
    lines = [x.strip() for x in text.splitlines() if x.strip()]
    errors = [x for x in lines if x.startswith("error:")]
    return (errors or lines or ["(no output)"])[-1][:300]


def run_child(cmd: list[str], what: str, env: dict | None = None) -> str:
    """The stdout of `cmd` run from the repository's root; if it fails, exit with one line: the
    child's own "error:" line (or its last line, a traceback's exception) and where the rest of
    its output is."""
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if out.returncode == 0:
        return out.stdout
    with tempfile.NamedTemporaryFile("w", prefix="bench-", suffix=".log", delete=False) as log:
        log.write(f"$ {' '.join(cmd)}\n{out.stdout}{out.stderr}")
    said = last_line(out.stderr).removeprefix("error: ")
    fail(f"{what} failed (exit {out.returncode}): {said}; its output is in {log.name}")


def run_script(nproc: int, threads: int, args: list[str], what: str) -> str:
    """run_child of `python ARGS`, or of `torchrun ARGS` with nproc > 1 processes; each process
    `threads` threads."""
    cmd = [*TORCHRUN, str(nproc)] if nproc > 1 else [sys.executable]
    return run_child(cmd + args, what, env={**os.environ, "OMP_NUM_THREADS": str(threads)})


def measure(module: str, what: str, *args) -> dict:
    """`python -m module --child JSON` (see serve): the dict its case returned for `args`."""
    out = run_child([sys.executable, "-m", module, "--child", json.dumps(args)], what)
    return json.loads(out.strip().splitlines()[-1])


def serve(run_case) -> bool:
    """In a process started by measure: print run_case(*args) as JSON, run with huge pages for
    large tensors as train.py and evaluate.py run, and return True; elsewhere return False."""
    if sys.argv[1:2] != ["--child"]:
        return False
    tune_cpu_memory()
    print(json.dumps(run_case(*json.loads(sys.argv[2]))))
    return True


def memory_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset_peak) of this process, in MiB (Linux)."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def reset_peak() -> float:
    """Start a new peak (writing "5" to clear_refs resets VmHWM to the current RSS); returns
    the current RSS in MiB, the baseline of what a case adds."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return memory_mb("VmRSS")


def best_time(fn, repeats: int = 1) -> tuple:
    """(fn()'s result, the best wall time of `repeats` calls): the least disturbed run."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return out, best


def time_and_peak(fn, repeats: int = 1) -> dict:
    """The best time of fn (best_time) and the most memory it added to this process (MiB)."""
    base = reset_peak()
    return {"time": best_time(fn, repeats)[1], "peak_mb": memory_mb("VmHWM") - base}
