"""
train.py: UltraLLaDA post-training, in one process or many (torchrun).

Paper map (shared/PAPER.md section 3). Start from LLaDA-8B-Base, replace its RoPE base by the
diffusion-aware NTK base for the target length (rope.py), and continue training with the
masked-diffusion loss (diffusion.py) on PG19 packed into 64K-token sequences (data.py), with
one of the three document strategies (masks.py). The paper: about 600 steps of 64 x 64K tokens,
AdamW; the learning rate is not given, we default to 2e-5 after a short warm-up.

    python train.py                                     # tiny preset, built-in corpus, CPU
    torchrun --nproc-per-node 2 train.py --mask eod     # the same on two processes (gloo)
    torchrun --nproc-per-node 8 train.py --init /path/LLaDA-8B-Base --data /path/pg19 \\
        --seq-len 65536 --target-len 131072 --fsdp --activation-checkpointing --dtype bfloat16

Every step is a pure function of (seed, step): the batches come from data.batch_for_step and
the diffusion noise from a generator seeded with (seed, step, micro step, rank). A resumed run
therefore repeats an uninterrupted one exactly, with only the model and optimizer to restore.
"""
import argparse
import ctypes
import json
import math
import os
import shutil
import signal
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from data import CACHE_DIR, Schedule, batch_for_step, load_corpus, load_tokenizer
from diffusion import diffusion_loss
from masks import STRATEGIES, document_positions, isolates_documents
from model import (PRESETS, LLaDA, from_pretrained, num_params, preset, read_config,
                   replace_dir, write_pretrained)
from rope import METHODS


@dataclass
class TrainConfig:
    init: str = "tiny"
    data: str | None = None
    seq_len: int = 2048
    train_len: int | None = None
    target_len: int | None = None
    rope: str = "diffusion"
    d_crit: int | None = None
    mask: str = "adaptive"
    positions: str = "continuous"
    batch_size: int = 1
    grad_accum: int = 1
    lr: float | None = None
    schedule: str = "constant"
    warmup: int = 10
    max_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    dtype: str | None = None
    compile: bool = False
    activation_checkpointing: bool = False
    fsdp: bool = False
    out: str = "out"
    resume: bool = False
    save_every: int = 50
    log_every: int = 10
    cache_dir: str = CACHE_DIR
    seed: int = 0
    memory_plan: bool = False


def parse_args(argv=None) -> TrainConfig:
    p = argparse.ArgumentParser(
        description="UltraLLaDA post-training: masked-diffusion training at a long context with "
                    "a scaled RoPE base and a document masking strategy. With no flags: the tiny "
                    "preset on the built-in synthetic corpus, on the CPU, in a few minutes.")
    a = p.add_argument
    a("--init", default="tiny", help=f"a preset ({', '.join(PRESETS)}; trained from scratch) or a "
      "LLaDA checkpoint directory such as LLaDA-8B-Base (default tiny)")
    a("--data", default=None, help="PG19-style folder of .txt books or .jsonl files with a 'text' "
      "field; default: the built-in synthetic corpus")
    a("--seq-len", type=int, default=2048, help="tokens per packed sequence (paper: 65536; default 2048)")
    a("--train-len", type=int, default=None, help="the context the model was pre-trained at, T_train "
      "(default: the checkpoint's max_sequence_length, 4096 for LLaDA, 512 for tiny)")
    a("--target-len", type=int, default=None, help="the context to extend RoPE to, T_target "
      "(default: --seq-len; the paper trains at 64K for a 128K target)")
    a("--rope", default="diffusion", choices=METHODS, help="RoPE scaling: none, ntk (plain NTK), "
      "critical (LongLLaDA), diffusion (UltraLLaDA, default) or pi (position interpolation)")
    a("--d-crit", type=int, default=None, help="override the critical dimension of critical/diffusion")
    a("--mask", default="adaptive", choices=list(STRATEGIES), help="document strategy: concat (full "
      "attention), eod (separator token, full attention) or adaptive (attention inside each "
      "document; default)")
    a("--positions", default="continuous", choices=("continuous", "document"),
      help="RoPE positions run over the packed sequence, or restart at each document")
    a("--batch-size", type=int, default=1, help="sequences per process per micro step (default 1)")
    a("--grad-accum", type=int, default=1, help="micro steps per optimizer step (default 1)")
    a("--lr", type=float, default=None, help="peak learning rate (default: 2e-5 from a checkpoint, "
      "1e-3 for a preset trained from scratch)")
    a("--schedule", default="constant", choices=("constant", "cosine"),
      help="after warm-up: constant, or cosine decay to 10%% at --max-steps (default constant)")
    a("--warmup", type=int, default=10, help="linear warm-up steps (default 10)")
    a("--max-steps", type=int, default=100, help="optimizer steps in total (paper: about 600; default 100)")
    a("--weight-decay", type=float, default=0.1, help="AdamW weight decay of matrices (default 0.1)")
    a("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this (0: off; default 1)")
    a("--dtype", default=None, choices=("float32", "bfloat16"), help="compute dtype: bfloat16 "
      "autocast (mixed precision under --fsdp), weights stay float32 (default: bfloat16 on CUDA, "
      "float32 on CPU)")
    a("--compile", action="store_true", help="torch.compile every transformer block")
    a("--activation-checkpointing", action="store_true", help="recompute each block in backward "
      "instead of storing its activations (needed at 64K tokens for the 8B model)")
    a("--fsdp", action="store_true", help="shard weights, gradients and optimizer state over the "
      "processes (FSDP2); default with several processes: replicate them (DDP)")
    a("--out", default="out", help="output folder: checkpoint/ and log.jsonl (default out)")
    a("--resume", action="store_true", help="continue from OUT/checkpoint (the latest complete save)")
    a("--save-every", type=int, default=50, help="save a checkpoint every N steps, and at the end (default 50)")
    a("--log-every", type=int, default=10, help="print a log line every N steps (default 10)")
    a("--cache-dir", default=CACHE_DIR, help=f"where tokenized corpora are cached (default {CACHE_DIR})")
    a("--seed", type=int, default=0, help="seed of the initial weights, data order and noise (default 0)")
    a("--memory-plan", action="store_true", help="print the per-GPU memory of this run for 1 to 128 "
      "GPUs (weights, gradients, optimizer, activations, loss) and exit; allocates nothing")
    args = p.parse_args(argv)
    cfg = TrainConfig(**vars(args))
    for name in ("seq_len", "batch_size", "grad_accum", "max_steps", "save_every", "log_every"):
        if getattr(cfg, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    return cfg


class UserError(Exception):
    """Bad input: reported as one line, exit code 2, nothing written."""


# ---------------------------------------------------------------------------------------------
# Processes and devices: the one place where CPU and GPU runs differ.

def setup_distributed(fsdp: bool) -> tuple[int, int, torch.device]:
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        keep_freed_memory()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if world > 1:
        dist.init_process_group(backend)  # rendezvous from torchrun's environment
    elif fsdp:  # fully_shard needs a process group, even a group of one
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return rank, world, device


def keep_freed_memory() -> bool:
    """Let this process reuse the memory it frees instead of handing it back (glibc only).

    glibc serves every block above 32 MB with its own mmap and unmaps it on free, so each step's
    large tensors (a chunk of logits is hundreds of MB) come back as fresh pages that the kernel
    zeroes again, a page fault at a time: on our 2-core machine that was most of the system time,
    and the default run took 91 s for 30 steps instead of 69 s. With this, large blocks come from
    the heap like small ones and the heap keeps up to 2 GB of free space; memory stays with the
    process at its peak, which training reaches in its first step anyway. Returns whether it
    applied (False where the C library is not glibc, e.g. macOS).
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4  # from glibc's malloc.h
    most = 2**31 - 1  # mallopt takes a C int
    return all([mallopt(M_MMAP_MAX, 0),  # no mmap: large blocks from the heap too
                mallopt(M_TRIM_THRESHOLD, most),  # give the heap's free top back only past 2 GB
                mallopt(M_TOP_PAD, most)])  # and then keep 2 GB of it


def all_ranks_agree(flag: bool, world: int) -> bool:
    """True if any rank says so (e.g. a stop was requested on one of them)."""
    if world == 1:
        return flag
    t = torch.tensor([float(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def mean_over_ranks(value: float, world: int) -> float:
    if world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return t.item() / world


def parallelize(model: LLaDA, cfg: TrainConfig, world: int, device: torch.device) -> LLaDA:
    """Activation checkpointing, torch.compile, then FSDP2 or DDP, in that order (torchtitan).
    Every wrapper works in place, so parameter names, and so the checkpoint, stay official."""
    from torch.distributed._composable import checkpoint, replicate
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    blocks = model.transformer.blocks
    if cfg.activation_checkpointing:
        for block in blocks:
            checkpoint(block)
    if cfg.compile:
        for block in blocks:
            block.compile()
    if cfg.fsdp:
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if cfg.dtype == "bfloat16" else MixedPrecisionPolicy()
        for block in blocks:
            fully_shard(block, mp_policy=mp)
        # The LM head is called outside forward (only at masked positions, in chunks): its own
        # unit gathers it once and keeps it until backward.
        fully_shard(model.transformer.ff_out, mp_policy=mp, reshard_after_forward=False)
        fully_shard(model, mp_policy=mp)
        return model
    model.to(device)
    if world > 1:
        replicate(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


# ---------------------------------------------------------------------------------------------
# The model at the start of training, and its RoPE base for the target length.

def initial_model(cfg: TrainConfig, ckpt: str) -> LLaDA:
    """The weights to start from: a complete checkpoint in OUT when resuming, else --init."""
    if cfg.resume:
        model = from_pretrained(ckpt, dtype=torch.float32)
        want = init_config(cfg)
        shapes = ("d_model", "n_layers", "n_heads", "mlp_hidden_size", "embedding_size")
        if any(getattr(model.config, s) != getattr(want, s) for s in shapes):
            got = {s: getattr(model.config, s) for s in shapes}
            raise UserError(f"{ckpt} has shapes {got}, which do not match --init {cfg.init}; "
                            f"pass the --init it was trained from or another --out")
        return model
    if cfg.init in PRESETS:
        model = LLaDA(preset(cfg.init))
        model.init_weights(cfg.seed)  # same seed on every rank: identical replicas
        return model
    return from_pretrained(cfg.init, dtype=torch.float32)  # float32 master weights


def init_config(cfg: TrainConfig):
    return preset(cfg.init) if cfg.init in PRESETS else read_config(cfg.init)


def scale_model_rope(model: LLaDA, cfg: TrainConfig) -> dict:
    """Set the RoPE base (and positions scale) for --target-len, from the pre-trained base."""
    s = model.config.scaled_rope(cfg.rope, cfg.target_len or cfg.seq_len, cfg.train_len, cfg.d_crit)
    model.config.set_rope(s)
    return s


# ---------------------------------------------------------------------------------------------
# Optimizer and learning rate.

def make_optimizer(model: LLaDA, cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    # Decay matrices only: norms' gains are scales, decaying them towards 0 would fight RMSNorm.
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    others = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": matrices, "weight_decay": cfg.weight_decay},
              {"params": others, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


def learning_rate(step: int, cfg: TrainConfig, peak: float) -> float:
    """Linear warm-up over cfg.warmup steps, then constant or cosine to 10% of the peak."""
    if step < cfg.warmup:
        return peak * (step + 1) / cfg.warmup
    if cfg.schedule == "constant":
        return peak
    progress = (step - cfg.warmup) / max(1, cfg.max_steps - cfg.warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def noise_generator(cfg: TrainConfig, step: int, micro: int, rank: int) -> torch.Generator:
    """The diffusion noise of one micro batch, a function of where it is in the run."""
    seed = np.random.SeedSequence([cfg.seed, step, micro, rank]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(seed))


# ---------------------------------------------------------------------------------------------
# Checkpoints: OUT/checkpoint holds the model in the official layout (evaluate.py and the
# official code load it) plus train_state/ (the optimizer, saved by every rank with
# torch.distributed.checkpoint) and train_state.json. The whole directory is written under a
# temporary name and renamed when complete.

def save_checkpoint(model, optimizer, cfg: TrainConfig, step: int, tokenizer_extra: dict,
                    rank: int, world: int):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    final = os.path.join(cfg.out, "checkpoint")
    tmp = final + ".tmp"
    if rank == 0 and os.path.exists(tmp):
        shutil.rmtree(tmp)  # left by a run killed mid-save
    barrier(world)
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)},
                 checkpoint_id=os.path.join(tmp, "train_state"), no_dist=not dist.is_initialized())
    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        write_pretrained(tmp, model.config, weights, extra_files=tokenizer_extra)
        state = {"step": step, "config": asdict(cfg), "world_size": world, "time": time.time()}
        with open(os.path.join(tmp, "train_state.json"), "w") as f:
            json.dump(state, f, indent=2)
        replace_dir(tmp, final)
    barrier(world)


def record_tokenizer(tokenizer, config) -> dict:
    """What a checkpoint needs to rebuild its tokenizer: tokenizer.json for LLaDA (the files to
    copy are returned), a marker in config.json for tiktoken (see data.load_tokenizer)."""
    if os.path.isdir(tokenizer.source):
        names = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
        return {n: os.path.join(tokenizer.source, n) for n in names
                if os.path.isfile(os.path.join(tokenizer.source, n))}
    config.extra["tokenizer"] = tokenizer.source
    return {}


def load_training_state(model, optimizer, ckpt: str) -> int:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=os.path.join(ckpt, "train_state"), no_dist=not dist.is_initialized())
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state["optimizer"])
    with open(os.path.join(ckpt, "train_state.json")) as f:
        return json.load(f)["step"]


def rank_zero_first(fn, rank: int, world: int):
    """fn() on rank 0, then on the others: rank 0 builds a cache once, the others read it.
    If rank 0 fails, every rank stops instead of waiting for it forever."""
    result, error = None, None
    if rank == 0:
        try:
            result = fn()
        except (UserError, ValueError) as e:
            error = e
    if all_ranks_agree(error is not None, world):
        raise error or UserError("rank 0 could not load the corpus")
    return result if rank == 0 else fn()


def barrier(world: int):
    if world > 1:
        dist.barrier()


def truncate_log(path: str, step: int) -> None:
    """Drop log lines past the checkpoint being resumed: those steps are about to be redone."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


# ---------------------------------------------------------------------------------------------

def check_inputs(cfg: TrainConfig) -> str:
    """Everything that can be checked before a file is written; returns the checkpoint path."""
    if cfg.init not in PRESETS and not os.path.isdir(cfg.init):
        raise UserError(f"--init {cfg.init} is neither a preset ({', '.join(PRESETS)}) nor a directory")
    ckpt = os.path.join(cfg.out, "checkpoint")
    has_ckpt = os.path.isfile(os.path.join(ckpt, "train_state.json"))
    if cfg.resume and not has_ckpt:
        raise UserError(f"--resume: {ckpt} holds no complete checkpoint; drop --resume to start a new run")
    if not cfg.resume and has_ckpt:
        raise UserError(f"{ckpt} already holds a checkpoint; pass --resume to continue it, or "
                        f"another --out")
    return ckpt


def main(argv=None):
    cfg = parse_args(argv)
    if cfg.memory_plan:
        print(memory_plan(init_config(cfg), cfg))
        return
    rank, world, device = setup_distributed(cfg.fsdp)
    if cfg.dtype is None:
        cfg.dtype = "bfloat16" if device.type == "cuda" else "float32"
    say = print if rank == 0 else (lambda *a, **k: None)
    try:
        ckpt = check_inputs(cfg)
        tokenizer = load_tokenizer(ckpt if cfg.resume else cfg.init)
        corpus = rank_zero_first(lambda: load_corpus(tokenizer, cfg.data, cache_dir=cfg.cache_dir,
                                                     progress=None if rank == 0 else False),
                                 rank, world)
        schedule = Schedule(corpus, cfg.seq_len, cfg.mask, cfg.batch_size, cfg.grad_accum, world, cfg.seed)
        model = initial_model(cfg, ckpt)
        if tokenizer.vocab_size > model.config.embedding_size or \
                tokenizer.mask_id != model.config.mask_token_id:
            raise UserError(f"the tokenizer ({tokenizer.name}, [MASK] {tokenizer.mask_id}) does not fit "
                            f"the model ([MASK] {model.config.mask_token_id}, "
                            f"{model.config.embedding_size} embeddings)")
    except (UserError, ValueError) as e:
        if rank == 0:  # the checks give every rank the same answer: say it once
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    tokenizer_extra = record_tokenizer(tokenizer, model.config)

    rope = model.config.rope_scaling if cfg.resume else scale_model_rope(model, cfg)
    peak_lr = cfg.lr or (1e-3 if cfg.init in PRESETS else 2e-5)
    say(f"model: {cfg.init}, {num_params(model.config):,} parameters; corpus: {corpus.name}, "
        f"{corpus.n_docs:,} documents, {corpus.n_tokens:,} tokens -> {schedule.n_sequences:,} "
        f"sequences of {cfg.seq_len:,}")
    say(f"rope: {rope['method']}, base {rope['original_rope_theta']:,.0f} -> {rope['rope_theta']:,.0f} "
        f"(lambda {rope['lambda']:.3f}, T_train {rope['train_len']:,} -> T_target {rope['target_len']:,}); "
        f"mask: {cfg.mask}; {world} process(es) on {device.type}, {cfg.dtype}, "
        f"{'FSDP' if cfg.fsdp else 'DDP' if world > 1 else 'single'}; lr {peak_lr:g}")

    model = parallelize(model, cfg, world, device)
    optimizer = make_optimizer(model, cfg, peak_lr)
    start = load_training_state(model, optimizer, ckpt) if cfg.resume else 0
    log_path = os.path.join(cfg.out, "log.jsonl")
    if rank == 0:
        os.makedirs(cfg.out, exist_ok=True)
        if cfg.resume:
            truncate_log(log_path, start)
        else:
            open(log_path, "w").close()
    if start >= cfg.max_steps:
        say(f"{ckpt} is already at step {start} of --max-steps {cfg.max_steps}: nothing to do")
        return

    # A stop request (Ctrl-C, or SIGTERM from a scheduler) ends the run after the current step,
    # with a checkpoint, instead of losing everything since the last save.
    stop = {"asked": False}
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.update(asked=True))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) \
        if cfg.dtype == "bfloat16" and not cfg.fsdp else nullcontext()
    isolate = isolates_documents(cfg.mask)
    # The bar only on a terminal (disable=None): in a log file the step lines say the same.
    bar = tqdm(total=cfg.max_steps, initial=start, disable=None if rank == 0 else True, unit="step",
               dynamic_ncols=True)
    tokens_seen = start * schedule.per_step * cfg.seq_len
    t_run = time.perf_counter()
    for step in range(start, cfg.max_steps):
        t0 = time.perf_counter()
        lr = learning_rate(step, cfg, peak_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_loss = 0.0
        for micro in range(cfg.grad_accum):
            input_ids, doc_lens = batch_for_step(schedule, step, micro, rank)
            positions = document_positions(doc_lens).to(device) if cfg.positions == "document" else None
            with autocast:
                loss = diffusion_loss(model, input_ids.to(device), noise_generator(cfg, step, micro, rank),
                                      doc_lens=doc_lens if isolate else None, positions=positions)
            (loss / cfg.grad_accum).backward()
            step_loss += loss.item() / cfg.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        loss_avg = mean_over_ranks(step_loss, world)
        dt = time.perf_counter() - t0
        tokens_seen += schedule.per_step * cfg.seq_len
        record = {"step": step + 1, "loss": loss_avg, "lr": lr, "grad_norm": float(grad_norm),
                  "tokens_per_s": schedule.per_step * cfg.seq_len / dt, "tokens": tokens_seen,
                  "elapsed_s": time.perf_counter() - t_run}
        if rank == 0:
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            bar.update(1)
            bar.set_postfix(loss=f"{loss_avg:.3f}")
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.max_steps:
                bar.write(f"step {step + 1:>5} | loss {loss_avg:.4f} | lr {lr:.2e} | "
                          f"{record['tokens_per_s']:,.0f} tokens/s | grad norm {record['grad_norm']:.2f}")
        stopping = all_ranks_agree(stop["asked"], world)
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.max_steps or stopping:
            save_checkpoint(model, optimizer, cfg, step + 1, tokenizer_extra, rank, world)
            if rank == 0:
                bar.write(f"saved {ckpt} at step {step + 1}")
        if stopping:
            say(f"stopped at step {step + 1}; continue with the same flags plus --resume")
            break
    bar.close()
    if world > 1:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------

def memory_plan(c, cfg: TrainConfig, gpu_gib: float = 80.0) -> str:
    """Per-GPU memory of FSDP training at cfg.seq_len tokens per GPU, in GiB, for 1..128 GPUs.

    Sharded over N GPUs: float32 weights, float32 gradients and AdamW's two float32 moments
    (16 bytes a parameter). Not sharded: the bf16 copy of the two blocks being gathered, the
    LM head kept gathered, activations (with checkpointing: every block's bf16 input, plus one
    block's activations while it is recomputed), and the loss, which holds the hidden states
    of the masked positions (at most all L) and one chunk of float32 logits with its gradient.
    """
    gib = 2**30
    P = num_params(c)
    L, d, m, V = cfg.seq_len, c.d_model, c.mlp_hidden_size, c.embedding_size
    block_params = 4 * d * d + 3 * d * m
    gathered = 2 * (2 * block_params + V * d) / gib
    saved_inputs = 2 * L * d * c.n_layers / gib
    # One block in backward: norms, q k v (and float32 rotated copies), attention output,
    # projections, and the four SwiGLU tensors, about 12 d + 4 m bf16 values per token.
    block_acts = 2 * L * (12 * d + 4 * m) / gib
    loss = (2 * L * d + 2 * 4 * 4096 * V) / gib
    rows = [f"Per-GPU memory for {c.n_layers} layers x d_model {d} ({P / 1e9:.2f}B parameters) at "
            f"{L:,} tokens per GPU, FSDP + bf16 mixed precision + activation checkpointing:",
            "", "| GPUs | weights+grads+AdamW (sharded) | gathered bf16 weights | activations | loss | "
            f"total | fits {gpu_gib:.0f} GB? |", "|---:|---:|---:|---:|---:|---:|---|"]
    for n in (1, 2, 4, 8, 16, 32, 64, 128):
        sharded = 16 * P / n / gib
        total = sharded + gathered + saved_inputs + block_acts + loss
        rows.append(f"| {n} | {sharded:.1f} | {gathered:.1f} | {saved_inputs + block_acts:.1f} | "
                    f"{loss:.1f} | {total:.1f} | {'yes' if total < 0.9 * gpu_gib else 'no'} |")
    rows.append("\n(without activation checkpointing every block keeps its activations: "
                f"{c.n_layers * block_acts:.0f} GiB more)")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
