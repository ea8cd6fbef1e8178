"""
runtime.py: where a run executes: devices and processes, CPU memory settings, and the GPU
memory plan of a training run.

Harness, not part of the paper. This is the one place where a CPU run and a GPU run differ in
set-up: the device, the process-group backend (gloo or NCCL) and the allocator settings. The
attention kernel is the other such point, in masks.py.
"""
import ctypes
import os
import signal
import sys

import torch
import torch.distributed as dist

from harness.files import FileError
from model import num_params


def tune_cpu_memory(reuse_freed: bool = False) -> dict:
    """Allocator settings that make large CPU tensors cheap; call before the first large tensor.
    Every fresh page of a tensor is a page fault in which the kernel zeroes it, and training
    makes tensors of hundreds of MB every step (a chunk of logits over a 100K vocabulary):
    - huge pages (PyTorch's THP_MEM_ALLOC_ENABLE, unless the user set it to 0): CPU tensors of
      2 MB and more on transparent huge pages, 512 times fewer faults;
    - reuse_freed (training): glibc serves and keeps blocks above 32 MB from its heap instead of
      mapping and unmapping each one, so the next step reuses them. Memory then stays at its
      peak, so the evaluation and bench scripts, which report peaks, leave it off.
    docs/benchmarks.md has the measured gains. Returns what was applied."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    applied = {"huge_pages": os.environ["THP_MEM_ALLOC_ENABLE"] == "1", "reuse_freed": False}
    if reuse_freed:
        try:
            mallopt = ctypes.CDLL("libc.so.6").mallopt
        except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to tune
            return applied
        M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4  # from glibc's malloc.h
        most = 2**31 - 1  # mallopt takes a C int
        applied["reuse_freed"] = all([mallopt(M_MMAP_MAX, 0),  # large blocks from the heap too
                                      mallopt(M_TRIM_THRESHOLD, most),  # keep the heap's free top
                                      mallopt(M_TOP_PAD, most)])
    return applied


def fail(message: str, code: int = 2, every_rank: bool = False):
    """A user's mistake or a file problem: one line, no traceback, and an exit code (2 for bad
    input)."""
    sys.exit(say_error(message, code, every_rank))


def say_error(message: str, code: int, every_rank: bool = False) -> int:
    """Print `error: message` and return code. Under torchrun every rank usually gets the same
    answer, so only rank 0 says it; every_rank=True for what happened to one rank alone (a cell
    it was computing), and a process whose RANK names no other rank's place says it too."""
    rank, world = os.environ.get("RANK", "0"), os.environ.get("WORLD_SIZE", "1")
    if every_rank or not (rank.isdigit() and world.isdigit() and 0 < int(rank) < int(world)):
        print(f"error: {message}", file=sys.stderr)
    return code


def exit_after(main, leave=os._exit) -> None:
    """Run a script's main() and leave the process with its exit code: 0, SystemExit's code,
    2 with one line for a FileError (a disk that filled up mid-run), 130 with one line for a
    Ctrl-C that nothing else handled, 1 after printing any other exception's traceback. The
    process leaves without interpreter finalization.

    Why: under torchrun a gloo worker thread can free the last reference to a tensor while
    Python finalizes; taking the GIL then ends the thread with pthread_exit, whose unwinding
    through a destructor calls std::terminate, and a run that saved everything exits -6
    (pytorch/pytorch#190489). By now every file is written and closed; the kernel releases
    the flock locks with the process. Remove this (call main() directly) once torch joins its
    process-group threads before finalization."""
    import traceback
    try:
        main()
        code = 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:  # sys.exit("message"), as Python does it
            print(e.code, file=sys.stderr)
            code = 1
    except FileError as e:
        code = say_error(str(e), 2)
    except KeyboardInterrupt:
        code = say_error("interrupted; nothing half-written was left: run the same command "
                         "again to go on", 130)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    leave(code)  # tests pass sys.exit


def stop_on_signals() -> dict:
    """The first Ctrl-C or SIGTERM (a scheduler's) ends the run after the current step, with a
    checkpoint, instead of losing everything since the last save; a second one exits at once
    (a checkpoint being written stays the previous complete one: saves are atomic)."""
    stop = {"signal": None}

    def handler(sig, _frame):
        if stop["signal"] is not None:
            print("\nsecond interrupt: exiting without saving", file=sys.stderr)
            os._exit(128 + sig)
        stop["signal"] = sig

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)
    return stop


# ---------------------------------------------------------------------------------------------
# Processes: torchrun's environment says how many there are and which one this is.

def process_env() -> tuple[int, int, int]:
    """(rank, world size, local rank: this process's GPU on its machine) from torchrun's
    environment, checked: a variable left over from a scheduler or a shell would otherwise fail
    deep inside, or wait for processes that never come."""
    env = {name: os.environ.get(name, default) for name, default in
           (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"))}
    if int(env["WORLD_SIZE"] if env["WORLD_SIZE"].isdigit() else 0) <= 1:
        env["LOCAL_RANK"] = "0"  # one process: GPU 0, whatever a stale variable says
    rank, world, local = (int(v) if v.isdigit() else -1 for v in env.values())
    # torchrun numbers the processes 0..WORLD_SIZE-1, and a machine's from 0
    if not 0 <= local <= rank < world:
        fail(f"RANK={env['RANK']!r}, WORLD_SIZE={env['WORLD_SIZE']!r} and LOCAL_RANK="
             f"{env['LOCAL_RANK']!r} in the environment name no process of this run (left over "
             f"from another job?); unset them, or start several processes with torchrun")
    return rank, world, local


def say_waiting(world: int, what: str, backend: str) -> None:
    """On rank 0, before a rendezvous: a process that never starts would otherwise hold the
    others without a word until the process group's timeout."""
    if os.environ.get("RANK", "0") == "0":
        from torch.distributed import constants
        timeout = (backend == "nccl" and getattr(constants, "default_pg_nccl_timeout", None)) \
            or constants.default_pg_timeout
        print(f"waiting for the other {world - 1} process(es) at "
              f"{os.environ.get('MASTER_ADDR', 'localhost')}:{os.environ.get('MASTER_PORT')} "
              f"to {what} (torchrun rendezvous, timeout {timeout.total_seconds() / 60:.0f} min)",
              file=sys.stderr)


def setup_distributed(fsdp: bool) -> tuple[int, int, torch.device]:
    """(rank, world size, device); starts the process group (NCCL on GPUs, gloo on CPUs)."""
    rank, world, local_rank = process_env()
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if world > 1:
        say_waiting(world, "start", backend)
        dist.init_process_group(backend)  # rendezvous from torchrun's environment
    elif fsdp:  # fully_shard needs a process group, even a group of one
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return rank, world, device


def join_processes(world: int) -> None:
    """Evaluation's processes under torchrun meet in a gloo group: no tensors travel, it only
    lets them wait for one another, on GPUs too."""
    if world > 1:
        say_waiting(world, "meet", "gloo")
        dist.init_process_group("gloo")


def collective_device() -> torch.device:
    """Where a small collective's tensor must live: NCCL moves CUDA tensors only."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def any_rank(flag: bool, world: int) -> bool:
    """True if any rank says so (e.g. a stop was requested on one of them)."""
    if world == 1:
        return flag
    t = torch.tensor([float(flag)], device=collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def mean_over_ranks(value: float, world: int) -> float:
    if world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=collective_device())
    dist.all_reduce(t)
    return t.item() / world


def rank_zero_first(fn, rank: int, world: int, errors=(ValueError,), what: str = "load the corpus",
                    others: bool = True):
    """fn() on rank 0, then (others=True) on the others: rank 0 builds a cache once, the others
    read it; others=False: rank 0 alone (writes a checkpoint). If rank 0 fails with one of
    `errors`, every rank raises (the others errors[-1], pointing at rank 0's) instead of
    waiting for it until a timeout."""
    result, error = None, None
    if rank == 0:
        try:
            result = fn()
        except errors as e:
            error = e
    if any_rank(error is not None, world):
        raise error or errors[-1](f"rank 0 could not {what}; its error is above")
    return result if rank == 0 or not others else fn()


# ---------------------------------------------------------------------------------------------

GPU_COUNTS = (1, 2, 4, 8, 16, 32, 64, 128)


def memory_plan(c, seq_len: int, gpu_gib: float = 80.0) -> list[dict]:
    """Per-GPU memory of FSDP training at seq_len tokens per GPU, in GiB: one row per GPU count
    (GPU_COUNTS), the numbers `train.py --memory-plan` prints and tests/test_gpu.py holds a
    measured step to.

    Sharded over N GPUs: float32 weights, float32 gradients and AdamW's two float32 moments
    (16 bytes a parameter). Not sharded: the bf16 copy of the two blocks being gathered, the
    LM head kept gathered, activations (with checkpointing: every block's bf16 input, plus one
    block's activations while it is recomputed), and the loss, which holds the hidden states
    of the masked positions (at most all L) and one chunk of float32 logits with its gradient.
    """
    gib = 2**30
    L, d, m, V = seq_len, c.d_model, c.mlp_hidden_size, c.embedding_size
    block_params = 4 * d * d + 3 * d * m
    gathered = 2 * (2 * block_params + V * d) / gib
    # One block in backward: norms, q k v (and float32 rotated copies), attention output,
    # projections, and the four SwiGLU tensors, about 12 d + 4 m bf16 values per token.
    block_acts = 2 * L * (12 * d + 4 * m) / gib
    activations = 2 * L * d * c.n_layers / gib + block_acts
    loss = (2 * L * d + 2 * 4 * 4096 * V) / gib
    rows = []
    for n in GPU_COUNTS:
        sharded = 16 * num_params(c) / n / gib
        total = sharded + gathered + activations + loss
        rows.append({"gpus": n, "sharded": sharded, "gathered": gathered,
                     "activations": activations, "loss": loss, "total": total,
                     "fits": total < 0.9 * gpu_gib,  # room for the allocator and CUDA's own
                     "more_without_checkpointing": c.n_layers * block_acts})
    return rows


def memory_plan_text(c, seq_len: int, gpu_gib: float = 80.0) -> str:
    """memory_plan as the table `train.py --memory-plan` prints."""
    rows = memory_plan(c, seq_len, gpu_gib)
    lines = [f"Per-GPU memory for {c.n_layers} layers x d_model {c.d_model} "
             f"({num_params(c) / 1e9:.2f}B parameters) at {seq_len:,} tokens per GPU, FSDP + "
             f"bf16 mixed precision + activation checkpointing:", "",
             "| GPUs | weights+grads+AdamW (sharded) | gathered bf16 weights | activations | loss | "
             f"total | fits {gpu_gib:.0f} GB? |", "|---:|---:|---:|---:|---:|---:|---|"]
    lines += [f"| {r['gpus']} | {r['sharded']:.1f} | {r['gathered']:.1f} | {r['activations']:.1f} "
              f"| {r['loss']:.1f} | {r['total']:.1f} | {'yes' if r['fits'] else 'no'} |"
              for r in rows]
    lines.append("\n(without activation checkpointing every block keeps its activations: "
                 f"{rows[0]['more_without_checkpointing']:.0f} GiB more)")
    return "\n".join(lines)
