"""
gloo_abort_repro.py: a 2-process gloo job that has finished its work can still die at
interpreter exit with "terminate called without an active exception" (SIGABRT, exit -6). Needs
torch only (no other file); seen with torch 2.13 on CPU and Python 3.11 (pytorch/pytorch#190489).

    python gloo_abort_repro.py [--runs 20] [--exit]

runs `torchrun --standalone --nproc-per-node 2 gloo_abort_repro.py --worker` --runs times under
load, each run's gloo threads reniced to +19 while two busy loops fill two cores, and prints how
many runs exited 0 and how many aborted. Each worker wraps a small model in replicate (DDP),
runs a forward and backward, all_reduces a tensor it then drops, destroys the process group and
returns: nothing is left but to exit. With --exit the workers flush stdout and stderr and leave
with os._exit(0), skipping interpreter finalization: no run aborts. (On 2 cores: 6 of 10 runs
aborted; with --exit none of 10.)

Why: gloo's worker thread (pt_gloo_runloop) frees a finished work item that holds the last
reference to a tensor with a Python object, which needs the GIL. If the main thread is already
in Py_FinalizeEx, Python 3.11 ends a thread that takes the GIL with pthread_exit, whose forced
unwinding runs through a noexcept destructor: std::terminate. Once a replicate/DDP model has
run a forward, the threads outlive destroy_process_group(), `del model` and gc.collect().
"""
import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time

import torch
import torch.distributed as dist

ABORT = "terminate called without an active exception"


def worker(exit_at_once: bool) -> None:
    from torch.distributed._composable import replicate
    dist.init_process_group("gloo")
    model = replicate(torch.nn.Linear(64, 64))
    model(torch.randn(8, 64)).sum().backward()
    dist.all_reduce(torch.ones(1024))
    dist.destroy_process_group()
    if exit_at_once:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def renice_gloo_threads(pid: int) -> None:
    """pid's children's threads named *gloo* (pt_gloo_runloop, gloo_tcp_loop) to nice +19, so
    that gloo's work ends late, while Python finalizes (Linux: setpriority takes a thread id)."""
    for child in open(f"/proc/{pid}/task/{pid}/children").read().split():
        for tid in os.listdir(f"/proc/{child}/task"):
            if "gloo" in open(f"/proc/{child}/task/{tid}/comm").read():
                os.setpriority(os.PRIO_PROCESS, int(tid), 19)


def run_under_load(cmd: list[str], **popen) -> tuple[int, str]:
    """(exit code, stderr) of cmd, its children's gloo threads reniced every 10 ms."""
    with tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen(cmd, **{"stdout": subprocess.DEVNULL, **popen}, stderr=err)
        while p.poll() is None:
            try:
                renice_gloo_threads(p.pid)
            except OSError:  # a process or thread ended between two reads
                pass
            time.sleep(0.01)
        err.seek(0)
        return p.returncode, err.read()


@contextlib.contextmanager
def busy_cores(n: int = 2):
    """n processes that keep n cores busy while the block runs."""
    loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield
    finally:
        for loop in loops:
            loop.kill()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=20, help="torchrun launches (default 20)")
    p.add_argument("--exit", action="store_true", help="workers leave with os._exit(0)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args.exit)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           os.path.abspath(__file__), "--worker"] + ["--exit"] * args.exit
    with busy_cores():
        runs = [run_under_load(cmd) for _ in range(args.runs)]
    aborted = sum(ABORT in err for _, err in runs)
    print(f"torch {torch.__version__}, Python {sys.version.split()[0]}, --exit {args.exit}: "
          f"{sum(code == 0 for code, _ in runs)} of {args.runs} runs exited 0; {aborted} "
          f"aborted with \"{ABORT}\"")


if __name__ == "__main__":
    main()
