"""child.py: a bench measurement in a fresh process, so that its peak memory is its own, and one
line for the user when it fails, with its whole output kept in a log file."""
import json
import os
import subprocess
import sys
import tempfile

from harness.runtime import fail

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def measure(module: str, what: str, *args) -> dict:
    """`python -m module --child ARGS` (see serve): the dict its case returned."""
    out = run_child([sys.executable, "-m", module, "--child", *map(str, args)], what)
    return json.loads(out.strip().splitlines()[-1])


def serve(run_case) -> bool:
    """In a process started by measure: print run_case(*ARGS) as JSON and return True; in any
    other process return False."""
    if sys.argv[1:2] != ["--child"]:
        return False
    print(json.dumps(run_case(*sys.argv[2:])))
    return True


def memory_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset_peak) of this process, in MiB (Linux)."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def reset_peak() -> None:
    """Start a new peak: writing "5" to clear_refs resets VmHWM to the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
