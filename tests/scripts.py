"""Run the project's scripts as a user does, each in a process of its own, without paying for
Python and torch to start every time (about 2 s a script, and the bad-input tests run a
hundred): the processes are forked from a server that imported torch and the project once
(multiprocessing's forkserver), and each then runs the script's __main__ with its argv, its
environment, its working folder, its umask and its own stdout and stderr, and exits with its
code. A crash is printed as Python prints it, so "Traceback" in stderr means the same as in a
shell. `Started` leaves one running (to be signalled), `group` runs several as torchrun's ranks
would be. Tests of torchrun itself start real subprocesses."""
import multiprocessing
import os
import runpy
import shutil
import socket
import subprocess
import sys
import tempfile
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRELOAD = ["torch", "numpy", "train", "evaluate", "data", "masks", "rope", "model", "diffusion"]
_context = None


def _run(name: str, args: list[str], env: dict, out_path: str, err_path: str) -> None:
    """In the forked process: become `python name args...` run from ROOT with `env`."""
    os.chdir(ROOT)
    os.environ.clear()
    os.environ.update(env)
    os.umask(int(env.get("UMASK", "022"), 8))
    for fd, path in ((1, out_path), (2, err_path)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    import torch
    torch.set_num_threads(int(env.get("OMP_NUM_THREADS", "1")))
    sys.argv = [name, *args]
    code = 0
    try:
        if name.startswith("-m"):
            runpy.run_module(name[2:], run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(name, run_name="__main__")
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:  # sys.exit("message"), as Python does it
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class Started:
    """`python NAME ARGS` (or `python -m MODULE ARGS` with name "-mMODULE") running in a forked
    process of its own; finish() waits and returns what subprocess.run(capture_output=True,
    text=True) would."""

    def __init__(self, name: str, args, env: dict | None = None):
        global _context
        if _context is None:
            _context = multiprocessing.get_context("forkserver")
            _context.set_forkserver_preload(PRELOAD)
        self.args = [name, *map(str, args)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
        self.tmp = tempfile.mkdtemp()
        self.out, self.err = os.path.join(self.tmp, "out"), os.path.join(self.tmp, "err")
        self.process = _context.Process(target=_run, args=(name, self.args[1:], env, self.out,
                                                            self.err))
        self.process.start()
        self.pid = self.process.pid

    def finish(self, timeout: float = 600) -> subprocess.CompletedProcess:
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
            raise subprocess.TimeoutExpired(self.args, timeout)
        try:
            with open(self.out, errors="replace") as out, open(self.err, errors="replace") as err:
                return subprocess.CompletedProcess(self.args, self.process.exitcode, out.read(),
                                                   err.read())
        finally:
            shutil.rmtree(self.tmp)


def run(name: str, *args, env: dict | None = None, timeout: float = 600
        ) -> subprocess.CompletedProcess:
    return Started(name, args, env).finish(timeout)


def group(name: str, *args, world: int = 2, env: dict | None = None) -> list:
    """The script as `world` ranks of one run, with the environment torchrun gives them."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free now; the ranks' rendezvous takes it at once
    ranks = [Started(name, args, {**(env or {}), "RANK": str(r), "LOCAL_RANK": str(r),
                                  "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
                                  "MASTER_PORT": str(port)}) for r in range(world)]
    return [rank.finish() for rank in ranks]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def script(name: str, *args, check_code: int | None = None, env: dict | None = None
           ) -> subprocess.CompletedProcess:
    """The script in a process of its own, as a user runs it; check_code: its exit code."""
    r = run(name, *args, env=env)
    if check_code is not None:
        assert r.returncode == check_code, r.stderr[-2000:]
    return r


def one_line_error(r, *fragments: str, code: int = 2) -> str:
    """The run failed with `code` and said so in one line containing every fragment."""
    assert r.returncode == code, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, r.stderr[-2000:]
    for f in fragments:
        assert f in errors[0], errors[0]
    return errors[0]
