"""Tests for runtime.py: the CPU memory settings are explicit (nothing happens on import) and
do what they say, a second interrupt exits at once, a script leaves with its own exit code on
every path (exit_after), and torchrun's environment and rendezvous are said in one line."""
import ctypes
import os
import subprocess
import sys

import pytest

from scripts import ENV, ROOT, one_line_error, script


def fresh_python(code: str, env_extra: dict | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout.strip()


def test_importing_the_project_changes_no_allocator_setting():
    code = ("import os, model, train, evaluate; from harness import runtime; "
            "print(os.environ.get('THP_MEM_ALLOC_ENABLE'))")
    assert fresh_python(code) == "None"


@pytest.mark.parametrize("user_value, expected", [(None, "1"), ("0", "0")])
def test_tune_cpu_memory_turns_on_huge_pages_unless_the_user_said_no(user_value, expected):
    code = ("import os; from harness import runtime; applied = runtime.tune_cpu_memory(); "
            "print(os.environ['THP_MEM_ALLOC_ENABLE'], applied['huge_pages'])")
    env = {} if user_value is None else {"THP_MEM_ALLOC_ENABLE": user_value}
    assert fresh_python(code, env) == f"{expected} {expected == '1'}"


# glibc's mallinfo2: hblkhd is the number of bytes held in blocks that have their own mmap.
MMAPPED_BYTES = """
import ctypes, sys, torch
from harness import runtime
if sys.argv[1] == "reuse":
    assert runtime.tune_cpu_memory(reuse_freed=True)["reuse_freed"]
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks",
                "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
x = torch.empty(16 * 2**20)  # 64 MB, far above glibc's mmap threshold
print(libc.mallinfo2().hblkhd)
"""


def glibc_has_mallinfo2() -> bool:
    try:
        return hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")
    except OSError:
        return False


@pytest.mark.skipif(not glibc_has_mallinfo2(), reason="needs glibc 2.33+ (mallinfo2)")
def test_reuse_freed_serves_large_blocks_from_the_heap_instead_of_their_own_mmap():
    off = {"THP_MEM_ALLOC_ENABLE": "0"}  # PyTorch's huge-page allocator would bypass malloc
    default = int(fresh_python(MMAPPED_BYTES.replace("sys.argv[1]", "'default'"), off))
    reused = int(fresh_python(MMAPPED_BYTES.replace("sys.argv[1]", "'reuse'"), off))
    assert default >= 64 * 2**20  # glibc's default: the block is its own mapping, unmapped on free
    assert reused < 64 * 2**20  # with reuse: from the heap, whose freed space is kept


def test_a_second_interrupt_exits_at_once_without_waiting_for_the_step():
    """stop_on_signals: the first Ctrl-C only asks to stop after the step; the second exits at
    once with 130. Signalled to itself, so the order never depends on the machine's speed."""
    code = ("import os, signal, time; from harness.runtime import stop_on_signals; "
            "stop = stop_on_signals(); os.kill(os.getpid(), signal.SIGINT); "
            "print('asked', stop['signal'] == signal.SIGINT, flush=True); "
            "os.kill(os.getpid(), signal.SIGINT); time.sleep(60); print('not reached')")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 130
    assert r.stdout.split() == ["asked", "True"]
    assert r.stderr.strip() == "second interrupt: exiting without saving"


EXITS = {  # what main() does -> exit code, what stderr ends with
    "returns": ("pass", 0, ""),
    "exits": ("sys.exit(3)", 3, ""),
    "fails": ("fail('bad --x')", 2, "error: bad --x"),
    "disk full": ("raise FileError('cannot write x: No space left on device')", 2,
                  "error: cannot write x: No space left on device"),
    "interrupted": ("raise KeyboardInterrupt", 130, "error: interrupted"),
    "bug": ("1 / 0", 1, "ZeroDivisionError: division by zero"),
}


@pytest.mark.parametrize("case", EXITS)
def test_a_script_leaves_with_its_own_code_after_its_output_is_flushed(case):
    body, code, said = EXITS[case]
    program = ("import sys\nfrom harness.files import FileError\n"
               "from harness.runtime import exit_after, fail\n"
               f"def main():\n    print('output', end='')\n    {body}\nexit_after(main)\n"
               "print('finalized')")
    r = subprocess.run([sys.executable, "-c", program], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert (r.returncode, r.stdout) == (code, "output")  # flushed, and nothing ran after it
    last = (r.stderr.strip().splitlines() or [""])[-1]
    assert last.startswith(said) and (said or not r.stderr), r.stderr
    assert ("Traceback" in r.stderr) == (case == "bug")


def train_flags(books, cache, out, *extra):
    return ["--data", books, "--cache-dir", cache, "--out", str(out), "--seq-len", "128",
            "--warmup", "1", "--log-every", "1", *extra]


@pytest.mark.parametrize("env, fragment", [
    ({"WORLD_SIZE": "abc"}, "WORLD_SIZE='abc'"), ({"RANK": "1"}, "RANK='1', WORLD_SIZE='1'"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK='2', WORLD_SIZE='2'"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "x"}, "LOCAL_RANK='x'"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}, "LOCAL_RANK='1' in the environment name no process"),
])
def test_a_stale_torchrun_environment_is_one_line(tmp_path, books, cache, tiny_ckpt, env,
                                                  fragment):
    r = script("train.py", *train_flags(books, cache, tmp_path / "out", "--max-steps", "1"),
               env=env)
    one_line_error(r, fragment)
    assert not (tmp_path / "out").exists()
    r = script("evaluate.py", "--model", tiny_ckpt, "--len", "256", "--results",
               str(tmp_path / "results"), env=env)
    one_line_error(r, fragment)
    assert not (tmp_path / "results").exists()


def test_a_rendezvous_says_what_it_waits_for(tmp_path, books, cache):
    """WORLD_SIZE=2 with no second process: the wait is said before it starts (it would
    otherwise be 30 minutes of silence)."""
    env = {**ENV, "WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29577"}
    p = subprocess.Popen([sys.executable, "train.py", *train_flags(books, cache, tmp_path / "out",
                                                                   "--max-steps", "1")],
                         cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    try:
        line = p.stderr.readline()  # blocks until the first line; the test's time limit bounds it
    finally:
        p.kill()
        p.wait()
    assert line.startswith("waiting for the other 1 process(es) at 127.0.0.1:29577 to start "
                           "(torchrun rendezvous, timeout ") and line.endswith(" min)\n")

