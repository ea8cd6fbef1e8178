"""child.py: a bench measurement in a fresh process (its peak memory is its own), and one line
for the user when it fails, with its whole output kept in a log file."""
import subprocess
import tempfile

from harness.runtime import fail


def last_line(text: str) -> str:
    """What a failed child said: its last "error:" line, else its last line (a traceback's
    exception)."""
    lines = [x.strip() for x in text.splitlines() if x.strip()]
    errors = [x for x in lines if x.startswith("error:")]
    return (errors or lines or ["(no output)"])[-1][:300]


def run_child(cmd: list[str], what: str, cwd: str, env: dict | None = None) -> str:
    """The stdout of `cmd`; if it fails, exit with one line: the child's own "error:" line (or
    its last line, a traceback's exception) and where the rest of its output is."""
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env)
    if out.returncode == 0:
        return out.stdout
    with tempfile.NamedTemporaryFile("w", prefix="bench-", suffix=".log", delete=False) as log:
        log.write(f"$ {' '.join(cmd)}\n{out.stdout}{out.stderr}")
    said = last_line(out.stderr).removeprefix("error: ")
    fail(f"{what} failed (exit {out.returncode}): {said}; its output is in {log.name}")
