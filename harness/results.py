"""
results.py: what every evaluation run shares: what it must not do (score a broken model, start
what cannot fit), the results folder, report helpers and the run-time estimate.

Harness, not part of the paper: the tasks (evaluations/) hold the protocols; evaluate.py runs
them. The results folder holds one JSON file per cell, written atomically, so a file is either
a finished cell or damaged from outside; a process computes a cell while it holds the cell's
claim, a lock the operating system gives up when the process ends, however it ends.
"""
import contextlib
import hashlib
import os
import time

import numpy as np
import torch

from harness.files import FileError, physical_memory, read_json, release, try_lock, \
    wait_for_lock, write_atomic, write_json
from harness.flags import finite_number


# ---------------------------------------------------------------------------------------------
# What a run must not do: score a broken model, or start what cannot fit.

@contextlib.contextmanager
def finite_outputs(model, what: str):
    """A ValueError as soon as a forward of `model` gives a NaN or an infinity. A model whose
    weights or config are broken decodes "!!!!" with a confident score of 0 otherwise; one
    check of the final hidden states per forward costs nothing beside the forward itself."""
    def check(module, inputs, output):
        if not bool(torch.isfinite(output).all()):
            raise ValueError(f"{what}: the model's hidden states are not finite (NaN or inf); its "
                             f"weights or config.json (rope_theta, rms_norm_eps) are broken, or "
                             f"{str(output.dtype).removeprefix('torch.')} overflows; nothing was "
                             f"written for this cell")
    hook = model.transformer.ln_f.register_forward_hook(check)
    try:
        yield
    finally:
        hook.remove()


class DoesNotFit(ValueError):
    """check_fits' refusal: about this process's own device, which the others do not share."""


def check_fits(c, tokens: int, dtype: str, device) -> None:
    """One line before any work when a forward over `tokens` tokens (all rows together) cannot
    fit. A lower bound: the weights, and per token the residual stream, q, k, v, the attention
    output and the float32 RoPE tables (the SwiGLU intermediates run in slices of tokens)."""
    size = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    weights = size * (2 * c.embedding_size * c.d_model +
                      c.n_layers * (4 * c.d_model ** 2 + 3 * c.d_model * c.mlp_hidden_size))
    need = weights + tokens * (6 * c.d_model * size + 2 * c.head_dim * 4)
    if device.type == "cuda":
        have = torch.cuda.mem_get_info(device)[0]
    else:
        have = physical_memory()
        with contextlib.suppress(OSError), open("/proc/meminfo") as f:  # Linux: MemAvailable
            have = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    if need > have:
        raise DoesNotFit(f"this run's largest forward ({tokens:,} tokens) needs at least "
                         f"{need / 2**30:,.1f} GiB for one forward of this model in {dtype}, but "
                         f"{device.type} has {have / 2**30:,.1f} GiB available; pass a shorter "
                         f"length or use a bigger machine")


def short(length: int) -> str:
    """8192 -> '8K', for table headers."""
    return f"{length // 1024}K" if length % 1024 == 0 else f"{length:,}"


@contextlib.contextmanager
def figure(path: str, *grid, **options):
    """`with figure(path, 1, 2, figsize=(8, 3)) as (fig, axes):` a matplotlib figure drawn
    off-screen, written atomically as a PNG at `path` when the block ends."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(*grid, **options)
    try:
        yield fig, axes
        fig.tight_layout()
        write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=110))
    finally:
        plt.close(fig)


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A markdown table; floats with two decimals (as OpenCompass rounds), None and NaN as '-'."""
    def cell(v):
        return "-" if v is None or v != v else f"{v:.2f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows])


def nan_mean(values) -> float | None:
    """The mean of the values that exist (not None or NaN), None if there are none: every
    report's mean (a task not run, a length not evaluated is left out, never counted as 0)."""
    values = np.asarray(values, dtype=float)
    return None if np.all(np.isnan(values)) else float(np.nanmean(values))


# ---------------------------------------------------------------------------------------------
# The results folder: one JSON per cell, named by the task's plan.

def results_dir(model: str, task: str, results: str | None = None) -> str:
    """results/<model name>/<task>/ unless --results says otherwise; train.py's OUT/checkpoint
    is named by OUT, which says more."""
    path = os.path.abspath(model)
    name = os.path.basename(os.path.dirname(path) if os.path.basename(path) == "checkpoint" else path)
    return results or os.path.join("results", name, task)


def checkpoint_fingerprint(path: str) -> str:
    """Changes when the checkpoint does (retrained in place), so old results are not reused."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        if name == "config.json" or name.endswith(".safetensors"):
            st = os.stat(os.path.join(path, name))
            h.update(f"{name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


def sound(cell, task: str, keys: tuple) -> bool:
    """A result its task's report can use: the report's keys there, the score and the chunk
    NLLs (where the cell has them) finite numbers."""
    if not (isinstance(cell, dict) and cell.get("task") == task and all(k in cell for k in keys)):
        return False
    nll = cell.get("chunk_nll", [0.0])
    return isinstance(nll, list) and len(nll) > 0 and \
        all(map(finite_number, [cell.get("score", 0.0), *nll]))


def scan_results(folder: str, task: str, keys: tuple) -> tuple[dict[str, dict], list[str]]:
    """The sound results of `task` by file name, and the names of its other result files:
    damaged from outside (not JSON, a named pipe, a number missing or NaN). One listing gives
    both, so a cell another process writes meanwhile is in neither."""
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    found, damaged = {}, []
    for name in (n for n in names if n.startswith(task + "_") and n.endswith(".json")):
        try:
            cell = read_json(os.path.join(folder, name))  # refuses a named pipe, never opens it
        except FileError:
            cell = None
        if sound(cell, task, keys):
            found[name] = cell
        else:
            damaged.append(name)
    return found, damaged


def read_results(folder: str, task: str, keys: tuple = ()) -> dict[str, dict]:
    return scan_results(folder, task, keys)[0]


def prepare_folder(folder: str, task: str, keys: tuple, current: dict, planned: set,
                   overwrite: bool) -> None:
    """Make the folder ready for a run with settings `current`, under its lock, so that
    processes starting together see one another: results of other settings are refused (with
    --overwrite they are deleted, and so are the planned cells), damaged result files are
    deleted to be run again, and the settings are recorded, so that a process started at the
    same time with other settings is refused too. Afterwards a cell is finished exactly when
    its file exists. A folder inside a checkpoint is refused: a training run's save replaces
    the checkpoint's folder, and the results with it."""
    path = os.path.abspath(folder)
    while path != os.path.dirname(path):
        if os.path.isfile(os.path.join(path, "config.json")) and any(os.path.exists(
                os.path.join(path, n)) for n in ("model.safetensors", "model.safetensors.index.json")):
            raise ValueError(f"--results {folder} lies inside the checkpoint folder {path}, "
                             f"which a training run rewrites at every save; pass a folder "
                             f"outside it")
        path = os.path.dirname(path)
    lock = wait_for_lock(os.path.join(folder, ".lock"), "setting up the results folder")
    try:
        done, damaged = scan_results(folder, task, keys)
        other = [n for n, c in done.items() if c.get("settings") != current]
        record = os.path.join(folder, f".settings-{task}.json")
        recorded = read_json(record, missing_ok=True)
        old = recorded if recorded and recorded != current else \
            (done[other[0]].get("settings") or {}) if other else None
        if old is not None and not overwrite:
            diff = [f"{k} {old.get(k)!r} there, {current.get(k)!r} here"
                    for k in sorted(set(old) | set(current)) if old.get(k) != current.get(k)]
            # no result yet: a run with those settings set the folder up, and runs or died
            what = "holds results made" if other else "was set up by a run"
            raise ValueError(f"{folder} {what} with other settings ({'; '.join(diff[:2])}); "
                             f"pass --results DIR for this run, or --overwrite to replace them")
        redo = set(other) | (planned & set(done)) if overwrite else set()
        for name in sorted(redo | set(damaged)):
            os.remove(os.path.join(folder, name))  # a named pipe too: remove() never opens it
        write_json(record, current)
    finally:
        release(lock)


@contextlib.contextmanager
def claim(folder: str, name: str):
    """True while this process holds cell `name`, which has no result yet; False when another
    process holds it or its result is there. The claim is a lock on .claims/NAME; its file
    goes only once the result is there: a process that opened it just before could otherwise
    lock the removed file while another locks a new one, and both would compute the cell."""
    path, result = os.path.join(folder, ".claims", name), os.path.join(folder, name)
    lock = try_lock(path)
    if lock is None:
        yield False
        return
    try:
        yield not os.path.exists(result)  # written by another process since the listing
    finally:
        release(lock, path if os.path.exists(result) else None)


# ---------------------------------------------------------------------------------------------
# Estimating a run: one short timed forward, scaled to every cell by its FLOPs.

def forward_flops(c, q_len: int, k_len: int, head_tokens: float) -> float:
    """Multiply-adds x 2 of a forward: linear layers grow with q_len, attention with q_len x
    k_len, the LM head with the positions it is asked for."""
    linear = 2 * (4 * c.d_model ** 2 + 3 * c.d_model * c.mlp_hidden_size)
    attention = 4 * k_len * c.d_model
    return c.n_layers * q_len * (linear + attention) + 2 * c.d_model * c.embedding_size * head_tokens


def generation_flops(c, prompt_len: int, gen_length: int, block_length: int, steps: int,
                     prompt_cache: bool) -> float:
    """FLOPs of diffusion.generate: a full forward per step, or with the prefix cache a full
    forward at each block's first step and the blocks after the prefix at the others."""
    L = prompt_len + gen_length
    full = forward_flops(c, L, L, block_length)
    if not prompt_cache:
        return steps * full
    blocks = gen_length // block_length
    suffix = sum(forward_flops(c, gen_length - b * block_length, L, block_length)
                 for b in range(blocks))
    return blocks * full + (steps // blocks - 1) * suffix


@torch.no_grad()
def flops_per_second(model, device, length: int = 1024) -> float:
    """The model's speed on a short input: a few seconds even where a 128K forward takes
    minutes. Attention's share grows with length, so long cells are estimated roughly."""
    c = model.config
    x = torch.randint(0, min(c.eos_token_id, c.mask_token_id), (1, length), device=device)
    times = []
    for _ in range(2):  # the first warms up threads and the allocator
        t = time.perf_counter()
        model.head(model(x)[:, -32:])
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the model's GPU, which need not be the current one
        times.append(time.perf_counter() - t)
    return forward_flops(c, length, length, 32) / times[-1]


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"
