"""
gpu_check.py: is a GPU machine ready for UltraLLaDA? One command, one table, a few minutes.

    python -m bench.gpu_check                          # every check, on one 80-140 GB GPU
    python -m bench.gpu_check --only attention         # the three attention rows
    python -m bench.gpu_check --seq-len 8192 --layers 2 --out gpu_check.md

Each GPU path of the project (flash-attn, SDPA in bf16 and float32, FSDP with NCCL, the memory
plan, evaluation at 128K) runs once, in a check that is a function returning one row (name,
status, numbers, note):

    attention-bf16      adaptive attention three ways, forward and backward, in bf16: flash-attn
                        varlen (masks.attention on CUDA), SDPA on padded buckets
                        (masks.bucketed_attention) and the documents run one by one; each must
                        match a float32 run of the same inputs within bf16 tolerance
    attention-fp32      the same in float32, which masks.attention_kernel must send to SDPA
                        (flash-attn has no float32 kernels)
    attention-no-flash  flash-attn hidden (its import blocked): the bf16 check passes through SDPA
    train-step          LLaDA-8B's block shapes (d_model 4096, 32 heads, SwiGLU 12288, vocabulary
                        126464) cut to --layers layers, one bf16 FSDP step with activation
                        checkpointing at --seq-len tokens, as train.py runs it: peak memory next to
                        runtime.memory_plan's prediction, tokens/s, and MFU against a bf16 matmul
                        timed in the same process
    torchrun-resume     torchrun --nproc-per-node 1 train.py --fsdp (an NCCL group of one): two
                        steps, save, resume to four; the losses must equal a straight four-step run
    niah                evaluate.py on the cut-down model: one NIAH cell at 2 x --seq-len tokens,
                        exact and with --prompt-cache, wall time and peak memory
    eval-processes      torchrun evaluate.py with one process per GPU (at least two): the cells
                        are shared, each computed once, and every GPU computes some

Each check runs in a child process of its own: its CUDA memory statistics are its own, a crash
or a hang costs one row, and --timeout kills it. A check that needs a package that is not
installed (flash-attn, NCCL) is skipped, not failed. The cut-down model keeps the 8B shapes,
vocabulary included, but takes cl100k_base's special ids and "tokenizer": "cl100k_base" in its
config, so evaluate.py runs it with tiktoken (in requirements.txt); LLaDA's tokenizer.json is not
needed. Without a CUDA device the script refuses in one line (exit 2); --help works anywhere.
"""
import argparse
import importlib.metadata
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from contextlib import redirect_stderr
from dataclasses import asdict, dataclass, field
from io import StringIO

import numpy as np
import torch

import masks
from bench.bench_eval_processes import tiny_checkpoint
from bench.child import last_line
from harness import runtime
from harness.runtime import fail
from harness.flags import count, positive
from harness.tokenizer import TIKTOKEN_NAME, TIKTOKEN_VOCAB
from model import LLaDA, LLaDAConfig, preset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

GIB = 2**30
# Scaled error (max |x - ref| / max |ref|) a correct result stays under. A bf16 result is the
# exact one rounded to 8 bits of mantissa (2^-8 = 0.004), and its gradients add the rounding of
# the probabilities and of dO; float32 kernels differ only in the order of their sums.
TOLERANCE = {torch.bfloat16: {"forward": 2e-2, "backward": 5e-2},
             torch.float32: {"forward": 1e-4, "backward": 1e-3}}
MEMORY_MARGIN = 1.10  # the measured peak may exceed runtime.memory_plan's total by 10% at most
RESUME_TOLERANCE = 1e-4  # relative loss difference allowed between a resumed and a straight run


@dataclass
class Row:
    """One line of the table."""
    name: str
    status: str  # "pass", "fail" or "skip"
    numbers: str = ""
    note: str = ""
    seconds: float | None = None  # wall time of the check, child process included


@dataclass
class Settings:
    """What the checks run at; the command line sets seq_len and layers, tests shrink the rest."""
    device: str = "cuda"
    seq_len: int = 65536
    layers: int = 4
    # LLaDA-8B's block and vocabulary shapes (model.PRESETS["llada-8b"]).
    shape: dict = field(default_factory=lambda: dict(
        d_model=4096, n_heads=32, n_kv_heads=32, mlp_hidden_size=12288, vocab_size=126464,
        embedding_size=126464))
    documents: int = 16  # per packed sequence, as 64K of PG19 books cut into 4K-token pieces
    matmul_size: int = 8192  # n of the n x n x n bf16 matmul that measures the GPU's peak
    train_steps: int = 3  # the first allocates AdamW's moments and is not timed


# ---------------------------------------------------------------------------------------------
# Adaptive attention: one packed batch, three ways of running it, one float32 reference.

def packed_doc_lens(seq_len: int, n_docs: int, seed: int) -> list[int]:
    """Document lengths of one packed sequence: a one-token document first (the smallest bucket),
    then random cuts, so buckets hold documents of different lengths and need padding."""
    rng = np.random.default_rng(seed)
    n_cuts = max(0, min(n_docs - 2, seq_len - 2))
    cuts = rng.choice(np.arange(2, seq_len), size=n_cuts, replace=False)
    bounds = [0, 1, *sorted(int(c) for c in cuts), seq_len]
    return [b - a for a, b in zip(bounds, bounds[1:])]


def separate_documents(q, k, v, doc_lens: list[list[int]]) -> torch.Tensor:
    """The definition of adaptive attention: each document alone through SDPA, concatenated.
    Uses doc_lens directly, none of masks.py's plan (cu_seqlens, buckets)."""
    rows = []
    for b, lens in enumerate(doc_lens):
        start, pieces = 0, []
        for n in lens:
            pieces.append(masks.sdpa(q[b:b + 1, start:start + n], k[b:b + 1, start:start + n],
                                     v[b:b + 1, start:start + n]))
            start += n
        rows.append(torch.cat(pieces, 1))
    return torch.cat(rows)  # (B, L, H, D)


# name -> fn(q, k, v, plan, doc_lens): the ways of computing the same adaptive attention.
PATHS = {
    "attention": lambda q, k, v, plan, doc_lens: masks.attention(q, k, v, plan),  # the model's
    "buckets": lambda q, k, v, plan, doc_lens: masks.bucketed_attention(q, k, v, plan),
    "separate": lambda q, k, v, plan, doc_lens: separate_documents(q, k, v, doc_lens),
}


def forward_backward(fn, q, k, v, grad_out, plan, doc_lens) -> tuple[torch.Tensor, ...]:
    """(out, dq, dk, dv) of fn, with the same upstream gradient for every path."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, plan, doc_lens)
    out.backward(grad_out)
    # a path that ignores an input gives it no gradient: zeros, which the comparison then rejects
    return out.detach(), *(torch.zeros_like(t) if t.grad is None else t.grad for t in (q, k, v))


def scaled_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x - ref| / max |ref|: 0 when equal, about 2^-8 for a correct bf16 result; NaN when x
    holds a NaN (and NaN passes no tolerance)."""
    ref = ref.float()
    return float((x.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def path_errors(result: tuple, reference: tuple) -> dict:
    """Forward error of the output, backward error the worst of dq, dk, dv."""
    return {"forward": scaled_error(result[0], reference[0]),
            "backward": max(scaled_error(g, r) for g, r in zip(result[1:], reference[1:]))}


def within(errors: dict, tolerance: dict) -> bool:
    return all(errors[p] <= tolerance[p] for p in tolerance)  # NaN <= x is False: NaN fails


def adaptive_attention(s: Settings, dtype: torch.dtype, expect_kernel: str, name: str,
                       paths: dict = PATHS, batch: int = 2) -> Row:
    """Every path of `paths` against the documents run one by one in float32 on the same
    inputs (bf16 inputs are exact in float32), forward and backward. Passes when
    masks.attention_kernel picks `expect_kernel` and every path is within TOLERANCE[dtype]."""
    device = torch.device(s.device)
    heads, head_dim = s.shape["n_heads"], s.shape["d_model"] // s.shape["n_heads"]
    kernel = masks.attention_kernel(device, dtype)
    doc_lens = [packed_doc_lens(s.seq_len, s.documents, seed=b) for b in range(batch)]
    plan = masks.attention_plan(doc_lens, batch, s.seq_len, device)
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v, grad_out = (torch.randn(batch, s.seq_len, heads, head_dim, generator=g, device=device)
                         .to(dtype) for _ in range(4))  # (B, L, H, D)
    reference = forward_backward(PATHS["separate"], *(t.float() for t in (q, k, v, grad_out)),
                                 plan, doc_lens)
    errors = {}
    for path, fn in paths.items():  # one path at a time: only its errors are kept
        result = forward_backward(fn, q, k, v, grad_out, plan, doc_lens)
        errors[path] = path_errors(result, reference)
        del result
    tol = TOLERANCE[dtype]
    bad = [p for p, e in errors.items() if not within(e, tol)]
    problems = ([f"masks.attention_kernel chose {kernel}, expected {expect_kernel}"]
                if kernel != expect_kernel else []) + [f"{p} is outside tolerance" for p in bad]
    label = {"attention": f"attention ({kernel})"}
    numbers = ("fwd/bwd error vs float32: " + ", ".join(
        f"{label.get(p, p)} {e['forward']:.1e}/{e['backward']:.1e}" for p, e in errors.items())
        + f" (tol {tol['forward']:.0e}/{tol['backward']:.0e}); {batch} x {s.seq_len:,} tokens, "
          f"{sum(map(len, doc_lens))} documents, {heads} heads of {head_dim}")
    return Row(name, "fail" if problems else "pass", numbers, "; ".join(problems))


def hide_flash_attn() -> None:
    """Make this process behave as if flash-attn were not installed: `import flash_attn` raises
    ImportError (a None entry in sys.modules), and masks.py looks for it again."""
    sys.modules["flash_attn"] = None
    masks._flash = None


def check_attention_bf16(s: Settings) -> Row:
    row = adaptive_attention(s, torch.bfloat16, "flash", "attention-bf16")
    if not masks.flash_attn_available():  # installed (the check is skipped otherwise), but broken
        try:
            import flash_attn  # noqa: F401
        except ImportError as e:
            row.note += f" (import flash_attn fails: {str(e).splitlines()[0][:150]})"
    return row


def check_attention_fp32(s: Settings) -> Row:
    return adaptive_attention(s, torch.float32, "sdpa", "attention-fp32")


def check_attention_no_flash(s: Settings) -> Row:
    installed = module_found("flash_attn")
    hide_flash_attn()
    row = adaptive_attention(s, torch.bfloat16, "sdpa", "attention-no-flash")
    if not installed:
        row.note = "; ".join(filter(None, [row.note, "flash-attn is not installed here anyway"]))
    return row


# ---------------------------------------------------------------------------------------------
# The training step: FLOPs, the matmul peak, and runtime.memory_plan's prediction.

def cut_down_config(s: Settings) -> LLaDAConfig:
    """LLaDA-8B's shapes with s.layers blocks, and cl100k_base's special ids so that evaluate.py
    runs it with tiktoken (the 126464 embeddings hold cl100k's 100279 ids with room to spare)."""
    c = preset("llada-8b", n_layers=s.layers, **s.shape, eos_token_id=TIKTOKEN_VOCAB,
               pad_token_id=TIKTOKEN_VOCAB, mask_token_id=TIKTOKEN_VOCAB + 1)
    c.extra["tokenizer"] = TIKTOKEN_NAME
    return c


def forward_flops(c: LLaDAConfig, doc_lens: list[list[int]], head_tokens: int) -> float:
    """2 FLOPs per multiply-add of a forward over packed sequences: every weight matrix of every
    block for every token, attention 4 d n^2 per document of n tokens and layer (scores and
    values), and the LM head at the head_tokens positions it runs on (the masked ones)."""
    d, m = c.d_model, c.mlp_hidden_size
    tokens = sum(sum(lens) for lens in doc_lens)
    pairs = sum(n * n for lens in doc_lens for n in lens)
    per_layer = 2 * (4 * d * d + 3 * d * m) * tokens + 4 * d * pairs
    return c.n_layers * per_layer + 2 * d * c.embedding_size * head_tokens


def training_flops(c: LLaDAConfig, doc_lens: list[list[int]], head_tokens: int) -> float:
    """Model FLOPs of a training step: forward + backward = 3 forwards. The recomputation of
    activation checkpointing is not counted (MFU counts the model's work, not the machine's)."""
    return 3 * forward_flops(c, doc_lens, head_tokens)


def mfu(flops: float, seconds: float, peak_flops_per_s: float) -> float:
    """Model FLOPs utilisation: the fraction of the peak the step achieved."""
    return flops / seconds / peak_flops_per_s


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_flops_per_second(device: torch.device, n: int, dtype=torch.bfloat16,
                            repeats: int = 10) -> float:
    """The GPU's bf16 peak as this process sees it: the best of three rounds of n x n x n
    matmuls (clocks, power limits and the cuBLAS version all included)."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    out = torch.empty(n, n, device=device, dtype=dtype)
    torch.mm(a, b, out=out)  # warm-up: cuBLAS picks its kernel
    best = float("inf")
    for _ in range(3):
        synchronize(device)
        t = time.perf_counter()
        for _ in range(repeats):
            torch.mm(a, b, out=out)
        synchronize(device)
        best = min(best, (time.perf_counter() - t) / repeats)
    return 2 * n**3 / best


def planned_memory(c: LLaDAConfig, seq_len: int, gpus: int = 1) -> dict:
    """runtime.memory_plan's row for `gpus` GPUs in GiB, read from the table it prints for
    `train.py --memory-plan`, so this check compares against exactly what users are shown."""
    names = ("sharded", "gathered", "activations", "loss", "total")
    for line in runtime.memory_plan(c, seq_len).splitlines():
        cells = [x.strip() for x in line.strip().strip("|").split("|")]
        if len(cells) >= 6 and cells[0] == str(gpus):
            return dict(zip(names, map(float, cells[1:6])))
    raise ValueError(f"runtime.memory_plan printed no row for {gpus} GPU(s)")


def judge_train(loss: float, peak_gib: float, plan: dict) -> tuple[str, str]:
    """pass when the loss is finite and the measured peak is within MEMORY_MARGIN of the plan
    (the plan is what users size their GPUs by: under-predicting is the failure)."""
    problems = []
    if not math.isfinite(loss):
        problems.append(f"the loss is {loss}")
    if not peak_gib <= MEMORY_MARGIN * plan["total"]:
        problems.append(f"peak {peak_gib:.1f} GiB exceeds the plan's {plan['total']:.1f} GiB by "
                        f"more than {MEMORY_MARGIN - 1:.0%}: runtime.memory_plan under-predicts")
    return ("fail" if problems else "pass"), "; ".join(problems)


def check_train_step(s: Settings) -> Row:
    """train.py's 8B set-up at full width and few layers: FSDP (a group of one), bf16 mixed
    precision, activation checkpointing, AdamW; random tokens in s.documents documents."""
    import torch.distributed as dist

    import train
    from diffusion import diffusion_loss, forward_process

    c = cut_down_config(s)
    _, world, device = runtime.setup_distributed(fsdp=True)  # as train.py --fsdp: NCCL on GPUs
    try:
        matmul_peak = matmul_flops_per_second(device, s.matmul_size)  # FLOP/s
        cfg = train.TrainConfig(fsdp=True, dtype="bfloat16", activation_checkpointing=True)
        torch.manual_seed(0)
        with torch.device(device):  # initialised where it runs: no 8 GB pass through the CPU
            model = LLaDA(c)
        model = train.parallelize(model, cfg, world, device)
        optimizer = train.make_optimizer(model, cfg, lr=1e-5)
        doc_lens = [packed_doc_lens(s.seq_len, s.documents, seed=0)]
        ids = torch.randint(0, TIKTOKEN_VOCAB, (1, s.seq_len),
                            generator=torch.Generator().manual_seed(0)).to(device)  # (1, L)
        times, losses, flops = [], [], []
        for step in range(s.train_steps):
            if step == 1:  # AdamW's moments now exist: measure the steady state
                torch.cuda.reset_peak_memory_stats(device)
            masked = forward_process(ids, c.mask_token_id, torch.Generator().manual_seed(step))[1]
            synchronize(device)
            t = time.perf_counter()
            noise = torch.Generator().manual_seed(step)  # the same draws as `masked` above
            loss = diffusion_loss(model, ids, noise, doc_lens=doc_lens)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            synchronize(device)
            times.append(time.perf_counter() - t)
            flops.append(training_flops(c, doc_lens, int(masked.sum())))
        peak_gib = torch.cuda.max_memory_allocated(device) / GIB
        reserved_gib = torch.cuda.max_memory_reserved(device) / GIB
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    seconds = float(np.median(times[1:]))
    achieved = float(np.median([f / t for f, t in zip(flops[1:], times[1:])]))  # FLOP/s
    utilisation = float(np.median([mfu(f, t, matmul_peak) for f, t in zip(flops[1:], times[1:])]))
    plan = planned_memory(c, s.seq_len)
    status, note = judge_train(losses[-1], peak_gib, plan)
    kernel = masks.attention_kernel(device, torch.bfloat16)
    if kernel != "flash":
        note = "; ".join(filter(None, [note, "attention ran on SDPA (no flash-attn)"]))
    numbers = (f"{s.layers} layers, {s.seq_len:,} tokens: peak {peak_gib:.1f} GiB (reserved "
               f"{reserved_gib:.1f}) vs plan {plan['total']:.1f} GiB = "
               f"{peak_gib / plan['total']:.2f}x (weights+grads+AdamW {plan['sharded']:.1f}, "
               f"gathered {plan['gathered']:.1f}, activations {plan['activations']:.1f}, loss "
               f"{plan['loss']:.1f}); step {seconds:.2f} s, {s.seq_len / seconds:,.0f} tokens/s, "
               f"{achieved / 1e12:.0f} TFLOP/s = MFU {utilisation:.0%} of the "
               f"{matmul_peak / 1e12:.0f} TFLOP/s bf16 matmul; loss {losses[-1]:.3f}")
    return Row("train-step", status, numbers, note)


# ---------------------------------------------------------------------------------------------
# torchrun: two steps, save, resume; the same losses as a run that was never interrupted.

def compare_losses(reference: list[dict], resumed: list[dict],
                   tolerance: float = RESUME_TOLERANCE) -> tuple[bool, float, str]:
    """(ok, largest relative difference, problem) between two log.jsonl's records."""
    steps = [r["step"] for r in reference]
    if [r["step"] for r in resumed] != steps or not steps:
        return False, float("nan"), (f"logged steps differ: {[r['step'] for r in resumed]} "
                                     f"after resuming, {steps} straight")
    worst = max(abs(a["loss"] - b["loss"]) / max(abs(a["loss"]), 1e-12)
                for a, b in zip(reference, resumed))
    if not worst <= tolerance:
        return False, worst, f"losses differ by up to {worst:.1e} (tolerance {tolerance:.0e})"
    return True, worst, ""


def run_bounded(cmd: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    """subprocess.run in a session of its own; on timeout SIGTERM lets torchrun stop its
    workers (they live in sessions of their own), then SIGKILL."""
    p = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, **kw)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_group(p)
        out, err = p.communicate()
        raise TimeoutError(f"{' '.join(cmd[:6])} ... did not finish in {timeout:.0f} s") from None
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def stop_group(p: subprocess.Popen, grace: float = 15.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
        try:
            p.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def read_log(out: str) -> list[dict]:
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def check_torchrun_resume(s: Settings, timeout: float = 240.0) -> Row:
    """The tiny preset on the built-in corpus, in float32 (so kernel non-determinism stays far
    below the tolerance). --fsdp because one process without it starts no process group at
    all (runtime.setup_distributed): with it, NCCL carries FSDP and the checkpoint's collectives.
    The straight run goes to step 4; the other stops at 2 (saving) and resumes to 4. Two steps
    after the resume: the first only sees the restored weights, the second the optimizer too."""
    deadline = time.monotonic() + timeout
    device = torch.device(s.device)
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        common = ["--init", "tiny", "--seq-len", "256", "--batch-size", "2", "--warmup", "2",
                  "--log-every", "1", "--fsdp", "--dtype", "float32",
                  "--cache-dir", os.path.join(tmp, "cache")]
        straight, resumed = os.path.join(tmp, "straight"), os.path.join(tmp, "resumed")
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc-per-node", "1", "train.py"]
        runs = [("straight", straight, ["--max-steps", "4"]),
                ("first two steps", resumed, ["--max-steps", "2"]),
                ("resume", resumed, ["--max-steps", "4", "--resume"])]
        started = time.perf_counter()
        for label, out, extra in runs:
            r = run_bounded(launcher + common + ["--out", out] + extra, deadline - time.monotonic(),
                            cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            if r.returncode:
                return Row("torchrun-resume", "fail", note=f"{label} run exited {r.returncode}: "
                           f"{last_line(r.stderr or r.stdout)}")
            if f"on {device.type}" not in r.stdout or "FSDP" not in r.stdout:
                return Row("torchrun-resume", "fail", note=f"{label} run did not say it ran "
                           f"FSDP on {device.type}: {last_line(r.stdout)}")
        seconds = time.perf_counter() - started
        ok, worst, problem = compare_losses(read_log(straight), read_log(resumed))
        losses = " ".join(f"{r['loss']:.4f}" for r in read_log(resumed))
    same = "bitwise identical" if worst == 0 else f"largest relative difference {worst:.1e}"
    backend = "NCCL" if device.type == "cuda" else "gloo"
    return Row("torchrun-resume", "pass" if ok else "fail",
               f"losses {losses}: {same}; 3 launches ({backend}, FSDP, 1 process) in "
               f"{seconds:.0f} s", problem)


# ---------------------------------------------------------------------------------------------
# evaluate.py on the cut-down model: one NIAH cell, exact and with the prompt cache.

def run_main(main, argv: list[str]) -> tuple[int, str]:
    """A script's main() in this process: (exit code, its stderr), so that this process's CUDA
    memory statistics cover it."""
    err = StringIO()
    code = 0
    with redirect_stderr(err):
        try:
            main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    sys.stderr.write(err.getvalue())  # into the check's log
    return code, err.getvalue()


def judge_niah(runs: dict) -> tuple[str, str]:
    """pass when both decodings produced their cell and the prompt cache was the faster."""
    problems = [f"{mode}: evaluate.py exited {r['code']}: {r['error']}"
                for mode, r in runs.items() if r["code"] or r.get("seconds") is None]
    if not problems and not runs["prompt cache"]["seconds"] < runs["exact"]["seconds"]:
        problems.append("the prompt cache was not faster than exact decoding")
    return ("fail" if problems else "pass"), "; ".join(problems)


def read_cells(folder: str) -> list[dict]:
    """The NIAH result files evaluate.py wrote into its --results folder."""
    if not os.path.isdir(folder):
        return []
    cells = []
    for name in sorted(os.listdir(folder)):
        if name.startswith("niah_") and name.endswith(".json"):
            with open(os.path.join(folder, name)) as f:
                cells.append(json.load(f))
    return cells


def check_niah(s: Settings) -> Row:
    """Random weights (the timing and memory do not depend on them), saved in bf16 with
    checkpoint.save_pretrained, then evaluate.py's main as a user calls it, once per decoding."""
    import evaluate
    from harness.checkpoint import save_pretrained

    device = torch.device(s.device)
    length = 2 * s.seq_len  # the paper trains at 64K and evaluates at 128K
    c = cut_down_config(s)
    runs = {}
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        torch.manual_seed(0)
        with torch.device(device):
            model = LLaDA(c)
        path = os.path.join(tmp, "model")
        save_pretrained(path, c, {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()})
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        for mode, extra in (("exact", []), ("prompt cache", ["--prompt-cache"])):
            folder = os.path.join(tmp, mode.replace(" ", "-"))
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t = time.perf_counter()
            code, err = run_main(evaluate.main, ["--model", path, "--task", "niah", "--len",
                                                 str(length), "--depths", "50", "--results",
                                                 folder, *extra])
            wall = time.perf_counter() - t
            peak = (torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda"
                    else float("nan"))
            cells = read_cells(folder)
            runs[mode] = {"code": code, "error": last_line(err), "wall": wall, "peak": peak,
                          "seconds": cells[0]["seconds"] if cells else None,
                          "tokens": cells[0]["model_tokens"] if cells else None}
    status, note = judge_niah(runs)
    numbers = f"{length:,} tokens, {s.layers} layers: " + "; ".join(
        f"{mode} cell {r['seconds'] or float('nan'):.1f} s (evaluate.py {r['wall']:.0f} s), "
        f"peak {r['peak']:.1f} GiB" for mode, r in runs.items())
    return Row("niah", status, numbers, note)


def check_eval_processes(s: Settings, timeout: float = 240.0) -> Row:
    """torchrun evaluate.py with one process per GPU (at least two, sharing a GPU if there is
    one): every process claims cells (harness/results.py, claim_cells), every cell is computed
    once, and every GPU computes some. A tiny random cl100k model, so the check is about the
    processes, not the model."""
    gpus = torch.cuda.device_count() if torch.device(s.device).type == "cuda" else 0
    processes = max(2, gpus)
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        tiny_checkpoint(os.path.join(tmp, "tiny"))
        folder = os.path.join(tmp, "results")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
               str(processes), "evaluate.py", "--model", os.path.join(tmp, "tiny"), "--len",
               "1024", "--depths", *map(str, range(0, 101, 10)), "--results", folder]
        started = time.perf_counter()
        r = run_bounded(cmd, timeout, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        seconds = time.perf_counter() - started
        if r.returncode:
            return Row("eval-processes", "fail", note=f"evaluate.py exited {r.returncode}: "
                       f"{last_line(r.stderr or r.stdout)}")
        cells = read_cells(folder)
        with open(os.path.join(folder, ".journal-niah.jsonl")) as f:
            journal = [json.loads(line)["cell"] for line in f]
    devices = {cell["process"].split(" on ")[-1] for cell in cells}
    ranks = {cell["process"].split(" rank ")[1].split()[0] for cell in cells}
    problems = []
    if len(cells) != 11 or sorted(journal) != sorted(set(journal)) or len(journal) != 11:
        problems.append(f"{len(cells)} cells, {len(journal)} computations for 11 cells")
    if gpus and devices != {f"cuda:{i}" for i in range(gpus)}:
        problems.append(f"cells ran on {sorted(devices)}, not on every one of {gpus} GPUs")
    if len(ranks) < 2:
        problems.append("one process computed every cell")
    return Row("eval-processes", "fail" if problems else "pass",
               f"{processes} processes, {len(cells)} cells on {', '.join(sorted(devices))} in "
               f"{seconds:.0f} s", "; ".join(problems))


# ---------------------------------------------------------------------------------------------
# The checks, what they need, and running them.

def module_found(name: str) -> bool:
    """Installed, without importing it (the CPU never imports flash-attn)."""
    try:
        return importlib.util.find_spec(name) is not None
    except ValueError:  # already in sys.modules without a spec (put there by hand)
        return sys.modules.get(name) is not None


def nccl_found() -> bool:
    import torch.distributed as dist
    return dist.is_available() and dist.is_nccl_available()


# requirement -> (probe, what to tell the user when it is missing)
REQUIREMENTS = {
    "flash_attn": (lambda: module_found("flash_attn"),
                   "flash-attn is not installed (pip install flash-attn)"),
    "nccl": (nccl_found, "this PyTorch build has no NCCL"),
    "tiktoken": (lambda: module_found("tiktoken"),
                 "tiktoken is not installed (pip install -r requirements.txt)"),
    "safetensors": (lambda: module_found("safetensors"),
                    "safetensors is not installed (pip install -r requirements.txt)"),
}


@dataclass
class Check:
    run: object  # Settings -> Row (the torchrun checks also take the timeout)
    needs: tuple = ()
    summary: str = ""


CHECKS = {
    "attention-bf16": Check(check_attention_bf16, ("flash_attn",),
                            "flash varlen vs SDPA buckets vs separate documents, bf16, fwd+bwd"),
    "attention-fp32": Check(check_attention_fp32, (), "the same in float32 (must go through SDPA)"),
    "attention-no-flash": Check(check_attention_no_flash, (), "flash-attn hidden: bf16 via SDPA"),
    "train-step": Check(check_train_step, (), "8B shapes, --layers, bf16 FSDP + checkpointing: "
                        "peak memory vs the plan, tokens/s, MFU"),
    "torchrun-resume": Check(check_torchrun_resume, ("nccl", "tiktoken", "safetensors"),
                             "torchrun, NCCL: 2 steps, save, resume, identical losses"),
    "niah": Check(check_niah, ("tiktoken", "safetensors"),
                  "evaluate.py, one NIAH cell at 2 x --seq-len, exact and --prompt-cache"),
    "eval-processes": Check(check_eval_processes, ("tiktoken", "safetensors"),
                            "torchrun evaluate.py, one process per GPU: every GPU computes "
                            "cells, each cell once"),
}


def skip_reason(needs, requirements: dict = REQUIREMENTS) -> str | None:
    """Why a check cannot run here (its missing requirements), or None."""
    missing = [requirements[n][1] for n in needs if not requirements[n][0]()]
    return "; ".join(missing) or None


def select(only: list[str] | None, names=CHECKS) -> list[str]:
    """--only: names, or prefixes before a '-' ("attention" is the three attention checks)."""
    if not only:
        return list(names)
    unknown = [x for x in only if not any(n == x or n.startswith(x + "-") for n in names)]
    if unknown:
        raise ValueError(f"--only {unknown[0]} matches no check; choose from {', '.join(names)}")
    return [n for n in names if any(n == x or n.startswith(x + "-") for x in only)]


def run_check(cmd: list[str], row_file: str, log: str, timeout: float, name: str) -> Row:
    """A check in its own process: its row from row_file, or a failed row that says why."""
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                             start_new_session=True)
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_group(p)
            return Row(name, "fail", note=f"timed out after {timeout:.0f} s (log {log})")
    if os.path.isfile(row_file):
        with open(row_file) as f:
            return Row(**json.load(f))
    with open(log, errors="replace") as f:
        return Row(name, "fail", note=f"exited {p.returncode} without a row: {last_line(f.read())} "
                                      f"(log {log})")


def child(name: str, s: Settings, row_file: str, timeout: float) -> None:
    """The child process: run one check, write its row; an exception is a failed row."""
    fn = CHECKS[name].run
    try:
        # torchrun-resume stops its launches itself, before the parent kills this process
        row = fn(s, 0.9 * timeout) if fn in (check_torchrun_resume, check_eval_processes) else fn(s)
    except torch.cuda.OutOfMemoryError as e:
        traceback.print_exc()
        row = Row(name, "fail", note=f"out of GPU memory: {str(e).splitlines()[0][:200]}")
    except Exception as e:  # the table reports it; the traceback goes to the log
        traceback.print_exc()
        first = (str(e).splitlines() or [""])[0][:200]
        row = Row(name, "fail", note=f"{type(e).__name__}: {first}")
    with open(row_file, "w") as f:
        json.dump(asdict(row), f)


def run_checks(names: list[str], run_one, requirements: dict = REQUIREMENTS,
               checks: dict = CHECKS, progress=lambda line: None) -> list[Row]:
    """Every named check: skipped when a requirement is missing, else run_one(name) -> Row."""
    rows = []
    for i, name in enumerate(names):
        reason = skip_reason(checks[name].needs, requirements)
        t = time.perf_counter()
        row = Row(name, "skip", note=reason) if reason else run_one(name)
        row.seconds = row.seconds if row.seconds is not None else time.perf_counter() - t
        rows.append(row)
        progress(f"[{i + 1}/{len(names)}] {name}: {row.status} ({row.seconds:.0f} s)")
    return rows


# ---------------------------------------------------------------------------------------------
# The table.

def markdown_table(rows: list[Row]) -> str:
    def cell(text) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")
    lines = ["| check | status | numbers | note | time (s) |", "|---|---|---|---|---:|"]
    for r in rows:
        status = r.status.upper() if r.status == "fail" else r.status
        lines.append(f"| {cell(r.name)} | {status} | {cell(r.numbers)} | {cell(r.note)} | "
                     f"{'' if r.seconds is None else f'{r.seconds:.0f}'} |")
    return "\n".join(lines)


def summary(rows: list[Row]) -> str:
    counts = {k: sum(r.status == k for r in rows) for k in ("pass", "fail", "skip")}
    return f"{counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped"


def exit_code(rows: list[Row]) -> int:
    return 1 if any(r.status == "fail" for r in rows) else 0


def machine() -> str:
    """The GPU and the software, for the table's title."""
    props = torch.cuda.get_device_properties(0)
    try:
        flash = "flash-attn " + importlib.metadata.version("flash_attn")
    except importlib.metadata.PackageNotFoundError:
        flash = "no flash-attn"
    return (f"{props.name} ({props.total_memory / GIB:.0f} GiB), torch {torch.__version__}, "
            f"CUDA {torch.version.cuda}, {flash}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="GPU readiness of UltraLLaDA in one run: every check below prints one row "
                    "(pass, FAIL or skip, with its numbers). Needs a CUDA GPU; expected to take "
                    "about 5 minutes on one 80-140 GB H100/H200 with the defaults.",
        epilog="checks:\n" + "\n".join(f"  {n:<20}{c.summary}" for n, c in CHECKS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = fail  # one line, not the usage block
    p.add_argument("--only", nargs="+", metavar="NAME", default=None,
                   help="run these checks only: names, or a prefix such as 'attention'")
    p.add_argument("--seq-len", type=count, default=65536, help="tokens of the training step and "
                   "of each attention sequence; NIAH runs at twice this (default 65536)")
    p.add_argument("--layers", type=count, default=4, help="blocks of the cut-down 8B-shaped "
                   "model of train-step and niah (default 4)")
    p.add_argument("--timeout", type=positive, default=300.0,
                   help="seconds each check may take before it is killed and fails (default 300)")
    p.add_argument("--out", default=None, help="also write the table as markdown to this file")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: one check
    p.add_argument("--row-file", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.seq_len < 256:
        fail(f"--seq-len {args.seq_len} is too short for the packed documents; pass 256 or more")
    try:
        args.names = select(args.only)
    except ValueError as e:
        fail(str(e))
    return args


def main(argv=None):
    args = parse_args(argv)
    s = Settings(seq_len=args.seq_len, layers=args.layers)
    if args.child:
        child(args.child, s, args.row_file, args.timeout)
        return
    with warnings.catch_warnings():  # an old driver warns here; the one line below says it all
        warnings.simplefilter("ignore")
        has_cuda = torch.cuda.is_available()
    if not has_cuda:
        fail("no CUDA device: gpu_check.py needs a GPU (it checks flash-attn, NCCL, bf16 kernels "
             "and GPU memory); run it on a CUDA machine, or see --help")
    logs = tempfile.mkdtemp(prefix="gpu_check-logs-")
    started = time.perf_counter()

    def run_one(name: str) -> Row:
        row_file = os.path.join(logs, f"{name}.json")
        cmd = [sys.executable, "-m", "bench.gpu_check", "--child", name, "--row-file", row_file,
               "--seq-len", str(args.seq_len), "--layers", str(args.layers),
               "--timeout", str(args.timeout)]
        return run_check(cmd, row_file, os.path.join(logs, f"{name}.log"), args.timeout, name)

    rows = run_checks(args.names, run_one,
                      progress=lambda line: print(line, file=sys.stderr, flush=True))
    title = (f"#### GPU check: {machine()}; --seq-len {args.seq_len} --layers {args.layers}; "
             f"{time.strftime('%Y-%m-%d')}")
    text = (f"{title}\n\n{markdown_table(rows)}\n\n{summary(rows)} in "
            f"{time.perf_counter() - started:.0f} s; logs of each check in {logs}\n")
    print(text, end="")
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    sys.exit(exit_code(rows))


if __name__ == "__main__":
    main()
