"""
files.py: writing files so that an interruption never leaves a half-written one that looks
complete, and reading them with one-line errors that name the file.

Harness, not part of the paper. Every writer of the project (checkpoints, token caches, logs,
evaluation results, pictures) goes through `write_atomic` or `replace_dir`: the bytes go to a
temporary name in the same folder and are renamed over the target when complete, and a rename
within one file system is atomic. Every JSON reader goes through `read_json`.
"""
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from typing import Callable


class FileError(ValueError):
    """A file that cannot be read or written; the message names it and says what to do."""


def write_atomic(path: str, write: Callable) -> None:
    """write(binary file object) into a temporary file, renamed over `path` when complete."""
    folder = os.path.dirname(path) or "."
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    except OSError as e:
        raise FileError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.chmod(tmp, 0o644)  # mkstemp makes it private; results are for everyone to read
        os.replace(tmp, path)
    except OSError as e:  # a full disk, a read-only folder, a path that is a folder
        raise FileError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path: str, text: str) -> None:
    write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def write_json(path: str, obj) -> None:
    # allow_nan=False: NaN and Infinity are not JSON, and a reader of ours would reject them
    write_text(path, json.dumps(obj, indent=1, allow_nan=False) + "\n")


def append_line(path: str, obj) -> None:
    """One JSON line added to a log; a single write in append mode, so lines that several
    processes add at once do not interleave (on a local file system)."""
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(obj) + "\n")
    except OSError as e:
        raise FileError(f"cannot write {path}: {e.strerror or e}") from None


def read_json(path: str, missing_ok: bool = False):
    """The JSON object in `path`; {} for a missing file if missing_ok, else a FileError."""
    if missing_ok and not os.path.exists(path):
        return {}
    try:
        with open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        raise FileError(f"{path} does not exist") from None
    except IsADirectoryError:
        raise FileError(f"{path} is a folder, not a JSON file") from None
    except OSError as e:
        raise FileError(f"cannot read {path}: {e.strerror or e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FileError(f"{path} is not valid JSON ({e.__class__.__name__}: "
                        f"{str(e).splitlines()[0][:80]}); restore it from a copy") from None


def parse_json_line(line: bytes) -> tuple[dict | None, str | None]:
    """One line of a JSON-lines file: (the object, None), or (None, what is wrong with it)."""
    try:
        row = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        return None, "not UTF-8 text"
    except json.JSONDecodeError as e:
        return None, f"not JSON ({e.msg})"
    if not isinstance(row, dict):
        return None, "not a JSON object"
    return row, None


def read_jsonl(path: str, hint: str, skip_blank: bool = True,
               check: Callable[[dict], str | None] | None = None) -> list[dict]:
    """Every line of a JSON-lines file, each a JSON object; anything else is a FileError that
    names the file and the line and ends with `hint`, what to pass instead. skip_blank=False
    refuses blank lines too (readers that would crash on them); check(row) returns what is
    wrong with a row, or None."""
    if not os.path.isfile(path):  # also a folder or a named pipe, which would block forever
        raise FileError(f"{path} does not exist or is not a file; {hint}")
    rows = []
    try:
        with open(path, "rb") as f:
            for number, line in enumerate(f, 1):
                if skip_blank and not line.strip():
                    continue
                row, wrong = parse_json_line(line)
                if wrong is None and check is not None:
                    wrong = check(row)
                if wrong:
                    raise FileError(f"{path} line {number}: {wrong}; {hint}")
                rows.append(row)
    except OSError as e:
        raise FileError(f"cannot read {path}: {e.strerror or e}") from None
    return rows


def replace_dir(src: str, dst: str) -> None:
    """Move a finished folder `src` into place at `dst`.

    Two renames, so a crash can fall between them: the old folder is first renamed to
    `dst.old`, then `src` to `dst`. `recover_dir(dst)` repairs either half-way state, and the
    old folder is deleted only once the new one is in place.
    """
    recover_dir(dst)
    old = dst + ".old"
    if os.path.exists(dst):
        if os.path.exists(old):
            shutil.rmtree(old)
        os.replace(dst, old)
    os.replace(src, dst)
    if os.path.exists(old):
        shutil.rmtree(old)


def publish_dir(src: str, dst: str) -> bool:
    """Move a finished folder `src` to `dst` unless another process published `dst` first
    (caches: whoever finishes first wins, the other copy is dropped). True if ours went in."""
    os.chmod(src, 0o755)  # mkdtemp makes it private; a cache is shared by every user's runs
    try:
        os.rename(src, dst)
        return True
    except OSError:
        if not os.path.isdir(dst):
            raise
        shutil.rmtree(src)
        return False


def recover_dir(dst: str) -> None:
    """After a crash inside replace_dir: if `dst` is gone but `dst.old` exists, put it back."""
    old = dst + ".old"
    if not os.path.exists(dst) and os.path.isdir(old):
        os.replace(old, dst)


# ---------------------------------------------------------------------------------------------
# Locks between processes: advisory locks (flock) on small files. The operating system releases
# a lock when its process ends, however it ends, so a killed run never leaves a stale one.

def try_lock(path: str):
    """Lock `path` (created if needed) for this process: the open file while it holds the
    lock, None if another process holds it. Keep the file object as long as the lock matters."""
    import fcntl
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        f = open(path, "a+")
    except OSError as e:
        raise FileError(f"cannot write in {os.path.dirname(path)}: {e.strerror or e}") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    f.seek(0)
    f.truncate()
    f.write(f"process {os.getpid()} on {socket.gethostname()}")  # for the next one's message
    f.flush()
    return f


def lock_owner(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip() or "another process"
    except OSError:
        return "another process"


def lock_folder(folder: str):
    """Claim `folder` for this process until it exits: a second writer gets a FileError."""
    path = os.path.join(folder, ".lock")
    f = try_lock(path)
    if f is None:
        raise FileError(f"{folder} is in use by {lock_owner(path)}; wait for it to finish or "
                        f"pass another folder")
    return f


def wait_for_lock(path: str, what: str, poll_s: float = 0.5):
    """Lock `path`, waiting while another process holds it (saying so once, after 2 s)."""
    started, said = time.monotonic(), False
    while (f := try_lock(path)) is None:
        if not said and time.monotonic() - started > 2:
            print(f"waiting for {lock_owner(path)} to finish {what}", file=sys.stderr)
            said = True
        time.sleep(poll_s)
    return f


def release(lock, path: str | None = None) -> None:
    """Give a lock up; with `path`, remove its file first (a claim whose work is done)."""
    if path is not None and os.path.exists(path):
        os.remove(path)
    lock.close()
