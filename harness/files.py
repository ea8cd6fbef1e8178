"""
files.py: writing files so that an interruption never leaves a half-written one that looks
complete, and reading them with one-line errors that name the file.

Harness, not part of the paper. Every writer of the project goes through `write_atomic`: the
bytes go to a temporary name in the same folder and are renamed over the target when complete,
and a rename within one file system is atomic. A folder is published the same way, by one
rename (`publish_dir`). Files and folders get the user's umask, as any other program's. Every
reader goes through `open_regular`, which refuses named pipes and devices instead of blocking.
"""
import json
import os
import shutil
import socket
import stat
import sys
import tempfile
import time
from typing import Callable


class FileError(ValueError):
    """A file that cannot be read or written; the message names it and says what to do."""


def physical_memory() -> int:
    """The machine's memory in bytes, what a size check compares with before any work."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def default_mode(folder: bool = False) -> int:
    """The mode open() or mkdir() would give under the user's umask (0644 and 0755 under the
    usual 022): mkstemp and mkdtemp make private ones, which a colleague sharing a checkpoint
    could not read. os.umask can only be read by setting it, so it is set back at once."""
    mask = os.umask(0o022)
    os.umask(mask)
    return (0o777 if folder else 0o666) & ~mask


def write_atomic(path: str, write: Callable) -> None:
    """write(binary file object) into a temporary file, renamed over `path` when complete."""
    folder, tmp = os.path.dirname(path) or ".", None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
    except OSError as e:  # a full disk, a read-only folder, a path that is a folder
        raise FileError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
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


def publish_dir(src: str, dst: str) -> bool:
    """Move a finished folder `src` to `dst` by one rename, unless another process published
    `dst` first (whoever finishes first wins, the other copy is dropped). True if ours went in."""
    os.chmod(src, default_mode(folder=True))  # mkdtemp makes it private
    try:
        os.rename(src, dst)
        return True
    except OSError:
        if not os.path.isdir(dst):
            raise
        shutil.rmtree(src)
        return False


# ---------------------------------------------------------------------------------------------
# Reading.

def file_kind(mode: int) -> str:
    kinds = {stat.S_ISFIFO: "a named pipe", stat.S_ISCHR: "a character device",
             stat.S_ISBLK: "a block device", stat.S_ISSOCK: "a socket", stat.S_ISDIR: "a folder"}
    return next((kind for test, kind in kinds.items() if test(mode)), "not a file")


class NotRegularFile(OSError):
    """A named pipe, a device, a socket or a folder where a file was to be read."""


def open_if_regular(path: str):
    """`path` opened for binary reading if it is a regular file, else an OSError. Opening a
    named pipe waits for a writer forever, so the file is opened without waiting (O_NONBLOCK)
    and looked at before anything is read."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a pipe opens at once, unread
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFile(f"{file_kind(mode)}, not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def open_regular(path: str, advice: str = "put the file itself there"):
    """open_if_regular, with a FileError a user reads: a pipe or a device ends with `advice`."""
    try:
        return open_if_regular(path)
    except FileNotFoundError:
        raise FileError(f"{path} does not exist") from None
    except NotRegularFile as e:
        raise FileError(f"{path} is {e}; {advice}") from None
    except OSError as e:
        raise FileError(f"cannot read {path}: {e.strerror or e}") from None


def parse_json_line(line: bytes) -> tuple[dict | None, str | None]:
    """One JSON object: (the object, None), or (None, what is wrong with it)."""
    try:
        row = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        return None, "not UTF-8 text"
    except json.JSONDecodeError as e:
        return None, f"not JSON ({e.msg})"
    except RecursionError:  # json recurses once per [ or {: "[[[[..." breaks it
        return None, "not JSON (nested too deeply)"
    return (row, None) if isinstance(row, dict) else (None, "not a JSON object")


def read_json(path: str, missing_ok: bool = False):
    """The JSON object in `path`; {} for a missing file if missing_ok, else a FileError."""
    if missing_ok and not os.path.lexists(path):
        return {}
    with open_regular(path) as f:
        data = f.read()
    try:
        return json.loads(data.decode("utf-8"))
    except RecursionError:  # json recurses once per [ or {
        why = "nested too deeply"
    except (UnicodeDecodeError, ValueError) as e:
        why = f"{e.__class__.__name__}: {str(e).splitlines()[0][:80]}"
    raise FileError(f"{path} is not valid JSON ({why}); restore it from a copy")


def read_jsonl(path: str, hint: str, skip_blank: bool = True,
               check: Callable[[dict], str | None] | None = None) -> list[dict]:
    """Every line of a JSON-lines file, each a JSON object; anything else is a FileError that
    names the file and the line and ends with `hint`, what to pass instead. skip_blank=False
    refuses blank lines too; check(row) returns what is wrong with a row, or None."""
    try:
        with open_if_regular(path) as f:
            lines = f.read().split(b"\n")
    except OSError:  # missing, a folder, or a named pipe, which would block forever
        raise FileError(f"{path} does not exist or is not a file; {hint}") from None
    if lines and not lines[-1].strip():
        lines.pop()  # the file's final newline
    rows = []
    for number, line in enumerate(lines, 1):
        if skip_blank and not line.strip():
            continue
        row, wrong = parse_json_line(line)
        if wrong is None and check is not None:
            wrong = check(row)
        if wrong:
            raise FileError(f"{path} line {number}: {wrong}; {hint}")
        rows.append(row)
    return rows


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
