"""
results.py: the evaluation harness shared by every task: decoding an answer, the results
folder (one JSON file per cell, so an interrupted run resumes), and report helpers.

Harness, not part of the paper: the tasks themselves (niah.py, needlebench.py, ruler.py,
longbench.py, ppl.py) hold the protocols; evaluate.py runs them.
"""
import contextlib
import hashlib
import math
import os
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from diffusion import generate
from harness.files import (FileError, append_line, physical_memory, read_json, release, try_lock,
                           wait_for_lock, write_json)
from harness.flags import count, finite_number, flag


# ---------------------------------------------------------------------------------------------
# The sampler's flags, for the tasks that decode answers; each task gives its own defaults.

@dataclass
class PromptCache:
    prompt_cache: bool = flag(False, "reuse the prompt's keys and values while the answer is "
                              "decoded (diffusion.py's approximate prefix cache): approaching "
                              "--steps times faster as the context grows; exact decoding is "
                              "the paper's protocol")


def decoding_flags(gen: int, block: int, n_steps: int, source: str) -> type:
    """--gen-length, --block-length, --steps (and --prompt-cache) with a task's defaults."""
    @dataclass
    class Decoding(PromptCache):
        gen_length: int = flag(gen, f"answer tokens ({source})", type=count)
        block_length: int = flag(block, f"tokens per decoding block ({source})", type=count)
        steps: int = flag(n_steps, f"decoding steps ({source})", type=count)
    return Decoding


def check_decoding(cfg) -> None:
    """The sampler's own rules (diffusion.check_generate_args), before any model work."""
    if cfg.gen_length % cfg.block_length:
        raise ValueError(f"--gen-length {cfg.gen_length} must be a multiple of --block-length "
                         f"{cfg.block_length}")
    if cfg.steps % (cfg.gen_length // cfg.block_length):
        raise ValueError(f"--steps {cfg.steps} must be a multiple of the number of blocks "
                         f"{cfg.gen_length // cfg.block_length}")


def decode_answer(model, tokenizer, prompt_ids: list[int], gen_length: int, block_length: int,
                  steps: int, prompt_cache: bool, device, cut_at_eos: bool = True) -> dict:
    """LLaDA's sampler at temperature 0 on one prompt (model token ids, BOS included when the
    tokenizer has one): the answer's text, and how long decoding took.

    cut_at_eos: keep the text before the first EOS (what follows is padding to a diffusion
    model). False decodes all gen_length tokens with the special tokens dropped, as the
    authors' OpenCompass wrapper does (no stop words), for the paper's benchmarks."""
    prompt = torch.tensor([prompt_ids], device=device)  # (1, Lp)
    # Inner bar only on a terminal (disable=None): in a log file the cell bar says enough.
    bar = tqdm(total=steps, desc="  decoding", unit="step", leave=False, dynamic_ncols=True,
               disable=None)
    t = time.perf_counter()
    try:
        out = generate(model, prompt, steps=steps, gen_length=gen_length,
                       block_length=block_length, temperature=0.0,
                       cache="prefix" if prompt_cache else None,
                       on_step=lambda: bar.update(1))  # (1, Lp + gen_length)
    finally:
        bar.close()
    answer = out[0, len(prompt_ids):].tolist()
    if cut_at_eos and tokenizer.eos_id in answer:  # after the first EOS comes padding
        answer = answer[:answer.index(tokenizer.eos_id)]
    return {"answer": tokenizer.decode(answer), "model_tokens": len(prompt_ids),
            "seconds": round(time.perf_counter() - t, 3)}


# ---------------------------------------------------------------------------------------------
# What a run must not do: score a broken model, or start what cannot fit.

class NonFinite(ValueError):
    """The model's hidden states stopped being finite numbers."""


@contextlib.contextmanager
def finite_outputs(model, what: str):
    """Raise NonFinite as soon as a forward of `model` gives a NaN or an infinity. A model whose
    weights or config are broken (rope_theta 0, a NaN norm) decodes "!!!!" with a confident
    score of 0 otherwise; one check of the final hidden states per forward costs nothing
    beside the forward itself."""
    def check(module, inputs, output):
        if not bool(torch.isfinite(output).all()):
            raise NonFinite(f"{what}: the model's hidden states are not finite (NaN or inf); its "
                            f"weights or config.json (rope_theta, rms_norm_eps) are broken, or "
                            f"{str(output.dtype).removeprefix('torch.')} overflows; nothing was "
                            f"written for this cell")
    hook = model.transformer.ln_f.register_forward_hook(check)
    try:
        yield
    finally:
        hook.remove()


def available_memory(device) -> int:
    """Bytes this process may still allocate: the GPU's free memory, or MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return physical_memory()


def inference_bytes(c, tokens: int, dtype_bytes: int) -> int:
    """A lower bound on the memory of one forward without gradients over `tokens` tokens (all
    rows together): the weights, and per token the residual stream, q, k, v, the attention
    output and the float32 RoPE tables (the SwiGLU intermediates run in slices of tokens)."""
    weights = dtype_bytes * (2 * c.embedding_size * c.d_model +
                             c.n_layers * (4 * c.d_model ** 2 + 3 * c.d_model * c.mlp_hidden_size))
    per_token = 6 * c.d_model * dtype_bytes + 2 * c.head_dim * 4
    return weights + tokens * per_token


class DoesNotFit(ValueError):
    """check_fits' refusal: about this process's own device, which the others do not share."""


def check_fits(c, tokens: int, dtype: str, device, what: str) -> None:
    """One line before any work when a forward over `tokens` tokens cannot fit in memory."""
    need = inference_bytes(c, tokens, torch.empty((), dtype=getattr(torch, dtype)).element_size())
    have = available_memory(device)
    if need > have:
        raise DoesNotFit(f"{what} needs at least {need / 2**30:,.1f} GiB for one forward of this "
                         f"model ({tokens:,} tokens in {dtype}), but {device.type} has "
                         f"{have / 2**30:,.1f} GiB available; pass a shorter length or use a "
                         f"bigger machine")


MAX_CELLS = 1_000_000  # a plan beyond this is a typo: its list alone fills memory


def check_cell_count(n: int, hint: str) -> None:
    if n > MAX_CELLS:
        raise ValueError(f"this run would have {n:,} cells (more than {MAX_CELLS:,}); {hint}")


def short(length: int) -> str:
    """8192 -> '8K', for table headers."""
    return f"{length // 1024}K" if length % 1024 == 0 else f"{length:,}"


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A markdown table; floats with one decimal, None as '-'."""
    def cell(v):
        return "-" if v is None else f"{v:.1f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The results folder: one JSON per cell, named by the task's plan; a rerun skips the cells that
# have a result made with the same settings.

def results_dir(model: str, task: str, results: str | None = None) -> str:
    """results/<model name>/<task>/ unless --results says otherwise."""
    if results:
        return results
    path = os.path.abspath(model)
    name = os.path.basename(path)
    if name == "checkpoint":  # train.py's OUT/checkpoint: OUT says more
        name = os.path.basename(os.path.dirname(path))
    return os.path.join("results", name, task)


def checkpoint_fingerprint(path: str) -> str:
    """Changes when the checkpoint does (retrained in place), so old results are not reused."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        if name == "config.json" or name.endswith(".safetensors"):
            st = os.stat(os.path.join(path, name))
            h.update(f"{name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


def result_files(folder: str, task: str) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.startswith(task + "_") and n.endswith(".json")) \
        if os.path.isdir(folder) else []


def non_finite(value) -> bool:
    """Whether a JSON value holds a NaN or an infinity anywhere (Python's json reads them)."""
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(non_finite(v) for v in value.values())
    return isinstance(value, list) and any(non_finite(v) for v in value)


def sound(record, task: str, keys: tuple) -> bool:
    """A result its task's report can use: the task's keys are there, the score a number, the
    perplexity's chunk NLLs numbers, and nothing NaN or infinite."""
    return (isinstance(record, dict) and record.get("task") == task
            and isinstance(record.get("settings"), dict) and all(k in record for k in keys)
            and (finite_number(record["score"]) if "score" in keys else True)
            and (isinstance(record["chunk_nll"], list) and len(record["chunk_nll"]) > 0
                 and all(map(finite_number, record["chunk_nll"])) if "chunk_nll" in keys else True)
            and not non_finite(record))


def scan_results(folder: str, task: str, keys: tuple = ()) -> tuple[dict[str, dict], list[str]]:
    """The finished cells of `task` in the folder by file name, and the names of the files
    that are not sound (not JSON, a named pipe, a key or number missing or NaN): damaged from
    outside, since writes are atomic. One listing gives both, so a cell another process writes
    meanwhile is in neither."""
    found, damaged = {}, []
    for name in result_files(folder, task):
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
    """The finished, sound cells of `task` in the folder (scan_results); the next run redoes
    the damaged ones."""
    return scan_results(folder, task, keys)[0]


def finished_cells(folder: str, task: str, names: list[str]) -> set:
    """The names among `names` with a result file, whichever process wrote it."""
    return set(result_files(folder, task)) & set(names)


def claim_cells(folder: str, task: str, names: list[str], evaluate_one, wait: bool,
                progress=None) -> None:
    """evaluate_one(name) -> record for each cell without a result, written to folder/name.
    Any number of processes may share a folder: each walks the same list and takes the cells
    nobody holds. A claim is a lock on .claims/NAME, given up by a killed process, so its cell
    goes to whoever comes next; a journal line says who computed each cell. When nothing is
    left to claim, wait=True waits for the cells that other processes hold (taking over any
    they abandon); wait=False returns. progress(finished, waiting), where given, hears how many
    cells are done (a listing of the folder each time: only the process that shows a bar)."""
    while len(finished := finished_cells(folder, task, names)) < len(names):
        if progress:
            progress(len(finished), False)
        took = False
        for name in names:
            claim_path = os.path.join(folder, ".claims", name)
            if name in finished or (claim := try_lock(claim_path)) is None:
                continue
            result_there = False
            try:
                if os.path.exists(os.path.join(folder, name)):
                    result_there = True  # written by another process since the listing
                    continue
                record = {**evaluate_one(name), "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
                write_json(os.path.join(folder, name), record)
                result_there = took = True
                append_line(os.path.join(folder, f".journal-{task}.jsonl"),
                            {"cell": name, "process": record.get("process"),
                             "finished": record["finished"]})
                if progress:
                    progress(len(finished_cells(folder, task, names)), False)
            finally:
                # The claim file goes only once the result is there: a process that opened it
                # just before could lock the removed file while another locks a new one, and
                # both would compute a cell that has no result yet.
                release(claim, claim_path if result_there else None)
        if not took:  # what is left is held by other processes
            if not wait:
                break
            if progress:
                progress(len(finished), True)
            time.sleep(2)
    if progress:
        progress(len(finished_cells(folder, task, names)), False)


def check_outside_checkpoints(folder: str) -> None:
    """A results folder inside a checkpoint folder would be lost the next time a training run
    saves that checkpoint (train.py swaps the whole folder)."""
    path = os.path.abspath(folder)
    while path != os.path.dirname(path):
        if os.path.isfile(os.path.join(path, "config.json")) and any(
                os.path.exists(os.path.join(path, n)) for n in (
                    "model.safetensors", "model.safetensors.index.json", "train_state.json")):
            raise ValueError(f"--results {folder} lies inside the checkpoint folder {path}, "
                             f"which a training run rewrites at every save (while one saves, "
                             f"a cell written there fails); pass a folder outside it")
        path = os.path.dirname(path)


def prepare_folder(folder: str, task: str, keys: tuple, current: dict, cells: list[dict],
                   overwrite: bool) -> None:
    """Make the results folder ready for a run with settings `current`, under its lock, so that
    processes starting together see one another: results made with other settings are refused
    (with --overwrite they are deleted, and so are this plan's finished cells), damaged result
    files are deleted to be run again, and the settings are recorded, so that a process started
    at the same time with other settings is refused too. Afterwards a cell is finished exactly
    when its file exists."""
    check_outside_checkpoints(folder)
    lock = wait_for_lock(os.path.join(folder, ".lock"), "setting up the results folder")
    try:
        recorded = read_json(os.path.join(folder, f".settings-{task}.json"), missing_ok=True)
        done, damaged = scan_results(folder, task, keys)
        other = [n for n, c in done.items() if c.get("settings") != current]
        old = recorded if recorded and recorded != current else \
            (done[other[0]].get("settings") or {}) if other else None
        if old is not None and not overwrite:
            diff = [f"{k} {old.get(k)!r} there, {current.get(k)!r} here"
                    for k in sorted(set(old) | set(current)) if old.get(k) != current.get(k)]
            # no result yet: a run with those settings set the folder up, and runs or died
            what = "holds results made" if other else "was set up by a run"
            raise ValueError(f"{folder} {what} with other settings ({'; '.join(diff[:2])}); "
                             f"pass --results DIR for this run, or --overwrite to replace them")
        planned = {c["name"] for c in cells}
        # a set: a cell of other settings that this plan also names is removed once
        for name in sorted({*damaged, *(other + [n for n in done if n in planned]
                                        if overwrite else [])}):
            os.remove(os.path.join(folder, name))  # a named pipe too: remove() never opens it
        write_json(os.path.join(folder, f".settings-{task}.json"), current)
    finally:
        release(lock)


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
    model(torch.zeros(1, 64, dtype=torch.long, device=device))  # warm-up: threads, allocator
    x = torch.randint(0, min(c.eos_token_id, c.mask_token_id), (1, length), device=device)
    times = []
    while len(times) < 3 and sum(times) < 5.0:
        t = time.perf_counter()
        model.head(model(x)[:, -32:])
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the model's GPU, which need not be the current one
        times.append(time.perf_counter() - t)
    return forward_flops(c, length, length, 32) / min(times)


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
