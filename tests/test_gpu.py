"""The GPU paths of the project, as tests that skip without CUDA: adaptive attention's three
paths against float32, one FSDP training step of LLaDA-8B's blocks against runtime.memory_plan,
torchrun train.py --fsdp resumed, a NIAH cell at twice the training length, and evaluate.py
with one process per GPU. On a GPU machine (a few minutes on one H100; -s shows the numbers):

    python -m pytest tests/test_gpu.py -s

GPU_TEST_SEQ_LEN sets the tokens of the training step and of each attention sequence (default
32768; NIAH runs at twice this), GPU_TEST_LAYERS the cut-down model's blocks (default 2). The
paper's sizes, 64K training and 128K NIAH, fit one 80 GB GPU: GPU_TEST_SEQ_LEN=65536
GPU_TEST_LAYERS=4. Without CUDA, attention, the training step, the FLOP count and the memory
plan run at small CPU shapes (gloo), so that a GPU's minutes are not spent finding a typo here.
"""
import importlib.util
import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.utils import benchmark

import evaluate
import masks
import train
from diffusion import diffusion_loss, forward_process
from harness import runtime
from harness.checkpoint import save_pretrained
from harness.results import forward_flops
from harness.tokenizer import TIKTOKEN_NAME, TIKTOKEN_VOCAB
from model import LLaDA, num_params, preset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ_LEN = int(os.environ.get("GPU_TEST_SEQ_LEN", "32768"))
LAYERS = int(os.environ.get("GPU_TEST_LAYERS", "2"))
DOCUMENTS = 16  # per packed sequence, as 64K tokens of PG19 books cut into 4K pieces
GIB = 2**30
CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
# LLaDA-8B's blocks (d_model 4096, 32 heads, SwiGLU 12288, vocabulary 126464) on a GPU; on the
# CPU narrower ones, and shorter sequences
SHAPE, LENGTH = ({}, SEQ_LEN) if CUDA else (
    dict(d_model=64, n_heads=2, n_kv_heads=2, mlp_hidden_size=128), 256)
# Scaled error (max |x - ref| / max |ref|), forward and backward, a correct result stays under:
# bf16 rounds to 8 bits of mantissa (2^-8 = 0.004) and its gradients add the rounding of the
# probabilities and of dO; float32 kernels differ only in the order of their sums.
TOLERANCE = {torch.bfloat16: (2e-2, 5e-2), torch.float32: (1e-4, 1e-3)}


def cut_down(shape: dict, layers: int):
    """LLaDA-8B with these shapes and layers, and cl100k_base's special ids so that evaluate.py
    runs it with tiktoken (126464 embeddings hold cl100k's 100279 ids with room to spare)."""
    c = preset("llada-8b", n_layers=layers, **shape, eos_token_id=TIKTOKEN_VOCAB,
               pad_token_id=TIKTOKEN_VOCAB, mask_token_id=TIKTOKEN_VOCAB + 1)
    c.extra["tokenizer"] = TIKTOKEN_NAME
    return c


# ---------------------------------------------------------------------------------------------
# Adaptive attention: one packed batch, three ways of running it, one float32 reference.

def packed_doc_lens(seq_len: int, n_docs: int, seed: int) -> list[int]:
    """A one-token document first (the smallest bucket), then random cuts: buckets hold
    documents of different lengths and need padding."""
    cuts = np.random.default_rng(seed).choice(np.arange(2, seq_len), n_docs - 2, replace=False)
    bounds = [0, 1, *sorted(int(c) for c in cuts), seq_len]
    return [b - a for a, b in zip(bounds, bounds[1:])]


def separate_documents(q, k, v, plan, doc_lens: list[list[int]]) -> torch.Tensor:
    """The definition of adaptive attention: each document alone through SDPA, concatenated;
    none of masks.py's plan (cu_seqlens, buckets)."""
    rows = []
    for b, lens in enumerate(doc_lens):
        bounds = np.cumsum([0, *lens])
        rows.append(torch.cat([masks.sdpa(q[b:b + 1, s:e], k[b:b + 1, s:e], v[b:b + 1, s:e])
                               for s, e in zip(bounds, bounds[1:])], 1))
    return torch.cat(rows)  # (B, L, H, D)


PATHS = {  # name -> fn(q, k, v, plan, doc_lens): the ways of computing the same attention
    "attention": lambda q, k, v, plan, _: masks.attention(q, k, v, plan),  # the model's
    "buckets": lambda q, k, v, plan, _: masks.bucketed_attention(q, k, v, plan),
    "separate": separate_documents}


def forward_backward(fn, q, k, v, grad_out, plan, doc_lens) -> list[torch.Tensor]:
    """[out, dq, dk, dv] of fn, with the same upstream gradient for every path."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, plan, doc_lens)
    out.backward(grad_out)
    return [out.detach(), q.grad, k.grad, v.grad]


def scaled_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x - ref| / max |ref|; NaN when x holds a NaN, and NaN passes no tolerance."""
    return float((x.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def attention_errors(dtype: torch.dtype, batch: int = 2) -> dict:
    """path -> (forward error, worst backward error) against the documents run one by one in
    float32 on the same inputs (bf16 inputs are exact in float32)."""
    c = cut_down(SHAPE, 1)
    doc_lens = [packed_doc_lens(LENGTH, DOCUMENTS, seed=b) for b in range(batch)]
    plan = masks.attention_plan(doc_lens, batch, LENGTH, DEVICE)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    q, k, v, grad_out = (torch.randn(batch, LENGTH, c.n_heads, c.head_dim, generator=g,
                                     device=DEVICE).to(dtype) for _ in range(4))  # (B, L, H, D)
    reference = forward_backward(PATHS["separate"], *(t.float() for t in (q, k, v, grad_out)),
                                 plan, doc_lens)
    errors = {}
    for path, fn in PATHS.items():  # one path at a time: only its errors are kept
        result = forward_backward(fn, q, k, v, grad_out, plan, doc_lens)
        errors[path] = (scaled_error(result[0], reference[0]),
                        max(scaled_error(x, r) for x, r in zip(result[1:], reference[1:])))
    return errors


@pytest.mark.parametrize("dtype, kernel", [
    (torch.bfloat16, "flash" if CUDA else "sdpa"), (torch.float32, "sdpa"),  # no float32 flash
    pytest.param(torch.bfloat16, "no flash-attn", marks=needs_cuda)])
def test_adaptive_attention_three_ways_agree_with_float32(monkeypatch, dtype, kernel):
    """The kernel masks.attention_kernel picks, then masks.attention (on CUDA in bf16 that is
    flash-attn's varlen kernel), SDPA on padded buckets and the documents one by one, forward
    and backward, each against a float32 run of the same inputs."""
    if kernel == "no flash-attn":  # bf16 goes through SDPA too
        monkeypatch.setitem(sys.modules, "flash_attn", None)  # `import flash_attn` raises ImportError
        monkeypatch.setattr(masks, "_flash", None)  # masks.py looks for it again
        kernel = "sdpa"
    elif kernel == "flash" and importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash-attn is not installed (pip install flash-attn)")
    assert masks.attention_kernel(DEVICE, dtype) == kernel
    errors, (forward, backward) = attention_errors(dtype), TOLERANCE[dtype]
    print(f"\n{dtype} error vs float32 (forward/backward), {LENGTH:,} tokens: " + ", ".join(
        f"{p} {f:.1e}/{b:.1e}" for p, (f, b) in errors.items()))
    assert all(f <= forward and b <= backward for f, b in errors.values()), errors


# ---------------------------------------------------------------------------------------------
# Training: the model's FLOPs, and runtime.memory_plan's prediction of a step's memory.

def training_flops(c, doc_lens: list[int], masked: int) -> float:
    """Model FLOPs of a step, forward + backward = 3 forwards: results.forward_flops of each
    document alone (attention stays inside it) and of the LM head at the masked positions.
    Checkpointing's recomputation is not counted: MFU counts the model's work."""
    return 3 * (sum(forward_flops(c, n, n, 0) for n in doc_lens) + forward_flops(c, 0, 0, masked))


def planned(c, seq_len: int, gpus: int = 1) -> dict:
    return next(r for r in runtime.memory_plan(c, seq_len) if r["gpus"] == gpus)


def test_flops_and_memory_plan_of_a_step_at_the_papers_shape():
    # 4 blocks of 8B shapes at 64K in 16 documents of 4K, half masked: about 8 PFLOP a step
    block = 2 * (4 * 4096**2 + 3 * 4096 * 12288) * 65536 + 4 * 4096 * 16 * 4096**2
    assert training_flops(cut_down({}, 4), [4096] * 16, 32768) == \
        3 * (4 * block + 2 * 4096 * 126464 * 32768)
    plan = planned(preset("llada-8b"), 65536)  # docs/benchmarks.md's table
    parts = ("sharded", "gathered", "activations", "loss")
    assert {k: round(plan[k], 1) for k in (*parts, "total")} == {
        "sharded": 119.4, "gathered": 1.8, "activations": 28.0, "loss": 4.4, "total": 153.6}
    assert plan["total"] == pytest.approx(sum(plan[k] for k in parts))
    assert plan["sharded"] == 16 * num_params(preset("llada-8b")) / GIB  # AdamW in float32
    eight = planned(preset("llada-8b"), 65536, gpus=8)
    assert not plan["fits"] and eight["fits"] and round(eight["total"], 1) == 49.1
    # the paper's sizes of the training test fit one 80 GB GPU, with room for what it misses
    assert planned(cut_down({}, 4), 65536)["total"] < 60


def test_one_fsdp_step_of_the_8b_blocks_stays_within_the_memory_plan():
    """train.py's set-up at full width and few layers (small shapes on the CPU): FSDP in a group
    of one, bf16 mixed precision, activation checkpointing, AdamW; random tokens in DOCUMENTS
    documents. Three steps: the first allocates AdamW's moments and is not measured."""
    c = cut_down(SHAPE, LAYERS)
    start = torch.cuda.memory_allocated() if CUDA else 0
    _, world, device = runtime.setup_distributed(fsdp=True)  # NCCL on a GPU, gloo on the CPU
    try:
        cfg = train.TrainConfig(fsdp=True, dtype="bfloat16", activation_checkpointing=True)
        torch.manual_seed(0)
        with torch.device(device):  # built where it runs: no 8B-shaped pass through the CPU
            model = LLaDA(c)
        model = train.parallelize(model, cfg, world, device)
        optimizer = train.make_optimizer(model, cfg, lr=1e-5)
        doc_lens = packed_doc_lens(LENGTH, DOCUMENTS, seed=0)
        ids = torch.randint(0, TIKTOKEN_VOCAB, (1, LENGTH),
                            generator=torch.Generator().manual_seed(0)).to(device)  # (1, L)
        for step in range(3):
            if CUDA:
                torch.cuda.synchronize()
                if step == 1:
                    torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            loss = diffusion_loss(model, ids, torch.Generator().manual_seed(step),
                                  doc_lens=[doc_lens])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if CUDA:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t
    finally:
        dist.destroy_process_group()
    assert math.isfinite(loss.item())
    if not CUDA:
        return
    peak = (torch.cuda.max_memory_allocated() - start) / GIB
    masked = int(forward_process(ids, c.mask_token_id, torch.Generator().manual_seed(2))[1].sum())
    flops = training_flops(c, doc_lens, masked) / seconds
    plan = planned(c, LENGTH)
    print(f"\n{LAYERS} layers, {LENGTH:,} tokens: peak {peak:.1f} GiB vs plan {plan['total']:.1f} "
          f"GiB ({', '.join(f'{k} {plan[k]:.1f}' for k in ('sharded', 'gathered', 'activations', 'loss'))}); "
          f"step {seconds:.2f} s, {flops / 1e12:.0f} TFLOP/s = MFU {flops / matmul_peak():.0%} of "
          f"a bf16 matmul; attention on {masks.attention_kernel(device, torch.bfloat16)}")
    # the measured peak may exceed the plan by 10%: under-predicting fails
    assert peak <= 1.10 * plan["total"], "runtime.memory_plan under-predicts"


def matmul_peak(n: int = 8192) -> float:
    """FLOP/s of an n x n x n bf16 matmul: the GPU's peak as this process sees it (clocks,
    power limits and the cuBLAS version included); the Timer synchronizes the GPU."""
    a, b = (torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
    timer = benchmark.Timer("torch.mm(a, b)", globals={"torch": torch, "a": a, "b": b})
    return 2 * n**3 / timer.blocked_autorange(min_run_time=1).median


# ---------------------------------------------------------------------------------------------
# The scripts under torchrun and evaluate.py at twice the training length.

def torchrun(nproc: int, *args) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc-per-node", str(nproc), *map(str, args)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@needs_cuda
def test_torchrun_fsdp_resume_equals_a_straight_run(tmp_path):
    """float32, so that kernel non-determinism stays far below the tolerance. Two steps after
    the resume: the first sees the restored weights, the second the optimizer too."""
    def run(out, *extra) -> list[dict]:
        torchrun(1, "train.py", "--init", "tiny", "--seq-len", 256, "--batch-size", 2,
                 "--warmup", 2, "--log-every", 1, "--fsdp", "--dtype", "float32",
                 "--cache-dir", tmp_path / "cache", "--out", out, *extra)
        return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]

    straight = run(tmp_path / "straight", "--max-steps", 4)
    run(tmp_path / "resumed", "--max-steps", 2)
    resumed = run(tmp_path / "resumed", "--max-steps", 4, "--resume")
    assert [r["step"] for r in resumed] == [r["step"] for r in straight] == [1, 2, 3, 4]
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in straight], rel=1e-4)


@needs_cuda
def test_a_niah_cell_at_twice_the_training_length(tmp_path):
    """Random weights (time and memory do not depend on them) saved in bf16, then evaluate.py
    as a user calls it, in this process so that its CUDA memory statistics cover it."""
    c, path = cut_down({}, LAYERS), str(tmp_path / "model")
    with torch.device(DEVICE):  # built where it runs: no 8B-shaped pass through the CPU
        weights = LLaDA(c).to(torch.bfloat16).state_dict()
    save_pretrained(path, c, weights)
    del weights  # the peaks below are evaluate.py's alone
    torch.cuda.empty_cache()
    for mode, extra in (("exact", []), ("prompt-cache", ["--prompt-cache"])):
        torch.cuda.reset_peak_memory_stats()
        evaluate.main(["--model", path, "--task", "niah", "--len", str(2 * SEQ_LEN), "--depths",
                       "50", "--results", str(tmp_path / mode), *extra])
        [cell] = [json.loads(p.read_text()) for p in (tmp_path / mode).glob("niah_*.json")]
        print(f"\nNIAH {mode}, {cell.get('model_tokens')} tokens, {LAYERS} layers: "
              f"{cell.get('seconds', float('nan')):.1f} s, peak "
              f"{torch.cuda.max_memory_allocated() / GIB:.1f} GiB")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two or more GPUs")
def test_evaluate_with_one_process_per_gpu_computes_each_cell_once(tmp_path, tiny_ckpt):
    gpus, folder = torch.cuda.device_count(), tmp_path / "results"
    torchrun(gpus, "evaluate.py", "--model", tiny_ckpt, "--len", 1024, "--depths",
             *range(0, 101, 10), "--results", folder)
    journal = [json.loads(line) for line in (folder / ".journal-niah.jsonl").read_text().splitlines()]
    cells = [j["cell"] for j in journal]
    assert len(list(folder.glob("niah_*.json"))) == 11 and sorted(cells) == sorted(set(cells)), cells
    assert {j["process"].split(" on ")[-1] for j in journal} == {f"cuda:{i}" for i in range(gpus)}
