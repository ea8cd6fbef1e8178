"""
train.py: UltraLLaDA post-training, in one process or many (torchrun).

Paper map: docs/paper.md section 3. Start from LLaDA-8B-Base, replace its RoPE
base b by the diffusion-aware NTK base b * lambda for the target length (rope.py)

    lambda = b^-1 * (2 T_target / 2pi)^(d / d_crit'),   d_crit' = 2 ceil(d/2 log_b(2 T_train / 2pi))

and continue training with the masked-diffusion loss (diffusion.py)

    loss = 1 / (B L) * sum_b sum_{i masked} CE(x_0[i] | x_t) / p_b

on PG19 packed into 64K-token sequences (data.py) with one of the three document strategies
(masks.py). The paper: about 600 steps of 64 x 64K tokens, AdamW; the learning rate is not
given, we default to 2e-5 after a short warm-up.

    python train.py                                     # tiny preset, built-in corpus, CPU
    torchrun --nproc-per-node 2 train.py --mask eod     # the same on two processes (gloo)
    torchrun --nproc-per-node 8 train.py --init /path/LLaDA-8B-Base --data /path/pg19 \\
        --seq-len 65536 --target-len 131072 --fsdp --activation-checkpointing --dtype bfloat16

Every step is a pure function of (seed, step): the batches come from data.batch_for_step and
the diffusion noise from a generator seeded with (seed, step, micro step, rank). A resumed run
therefore repeats an uninterrupted one exactly, with only the model and optimizer to restore.
"""
import argparse
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from data import Schedule, batch_for_step
from diffusion import diffusion_loss
from harness.checkpoint import (STATE, check_tokenizer_fits, find_training_checkpoint, from_pretrained,
                                load_optimizer_state, model_tokenizer, read_config, read_log,
                                read_training_state, record_remote_code, record_tokenizer,
                                save_training_checkpoint, truncate_log)
from harness.files import FileError, append_line, is_utf8, lock_folder
from harness.flags import (add_flags, count, count0, fits, flag, from_args, number, positive0,
                           setting_names)
from harness.prepare import CACHE_DIR, load_corpus
from harness.runtime import (any_rank, fail, mean_over_ranks, memory_plan, rank_zero_first,
                             setup_distributed, stop_on_signals, tune_cpu_memory)
from masks import STRATEGIES, document_positions, isolates_documents
from model import PRESETS, LLaDA, num_params, preset
from rope import METHODS, check_scaling_args


@dataclass
class TrainConfig:
    """Every flag of train.py, with its default (python train.py --help)."""
    init: str = flag("tiny", f"a preset ({', '.join(PRESETS)}; trained from scratch) or a LLaDA "
                     "checkpoint directory such as LLaDA-8B-Base")
    data: str | None = flag(None, "PG19-style folder of .txt books or .jsonl files with a 'text' "
                            "field (default: the built-in synthetic corpus)")
    seq_len: int = flag(2048, "tokens per packed sequence (paper: 65536)", type=count)
    train_len: int | None = flag(None, "the context the model was pre-trained at, T_train "
                                 "(default: the checkpoint's max_sequence_length, 4096 for "
                                 "LLaDA, 512 for tiny)", type=count)
    target_len: int | None = flag(None, "the context to extend RoPE to, T_target (default: "
                                  "--seq-len; the paper trains at 64K for a 128K target)",
                                  type=count)
    rope: str = flag("diffusion", "RoPE scaling: none, ntk (plain NTK), critical (LongLLaDA), "
                     "diffusion (UltraLLaDA) or pi (position interpolation)", choices=METHODS)
    d_crit: int | None = flag(None, "override the critical dimension of critical/diffusion "
                              "(1..head size; the paper's later version reports 73 for LLaDA)",
                              type=count)
    mask: str = flag("adaptive", "document strategy: concat (full attention), eod (separator "
                     "token, full attention) or adaptive (attention inside each document)",
                     choices=list(STRATEGIES))
    positions: str = flag("continuous", "RoPE positions run over the packed sequence, or "
                          "restart at each document", choices=("continuous", "document"))
    batch_size: int = flag(1, "sequences per process per micro step", type=count)
    grad_accum: int = flag(1, "micro steps per optimizer step", type=count)
    lr: float | None = flag(None, "peak learning rate, at most 1: AdamW moves each weight by "
                            "about lr a step (default: 2e-5 from a checkpoint, 1e-3 for a "
                            "preset trained from scratch)", type=number(float, 0, False, 1))
    schedule: str = flag("constant", "after warm-up: constant, or cosine decay to 10% at "
                         "--max-steps", choices=("constant", "cosine"))
    warmup: int = flag(10, "linear warm-up steps", type=count0)
    max_steps: int = flag(100, "optimizer steps in total (paper: about 600); may grow when "
                          "resuming", type=count, setting=False)
    weight_decay: float = flag(0.1, "AdamW weight decay of matrices", type=positive0)
    grad_clip: float = flag(1.0, "clip the gradient norm to this (0: off)", type=positive0)
    dtype: str | None = flag(None, "compute dtype: bfloat16 autocast (mixed precision under "
                             "--fsdp), weights stay float32 (default: bfloat16 on CUDA, float32 "
                             "on CPU). float16 is refused: without loss scaling its small "
                             "gradients underflow to 0, while bfloat16 has float32's range; the "
                             "authors' float16 is their evaluation's (evaluate.py --dtype "
                             "float16)", choices=("float32", "bfloat16", "float16"))
    compile: bool = flag(False, "torch.compile every transformer block", setting=False)
    activation_checkpointing: bool = flag(False, "recompute each block in backward instead of "
                                          "storing its activations (needed at 64K tokens for "
                                          "the 8B model)", setting=False)
    fsdp: bool = flag(False, "shard weights, gradients and optimizer state over the processes "
                      "(FSDP2); without it several processes replicate them (DDP)",
                      setting=False)
    out: str = flag("out", "output folder: checkpoint/ and log.jsonl; one run at a time may "
                    "use it", setting=False)
    resume: bool = flag(False, "continue from OUT/checkpoint (the latest complete save) with the "
                        "same flags; only --max-steps, --save-every, --log-every and how it runs "
                        "(--compile, --fsdp, --activation-checkpointing) may differ",
                        setting=False)
    allow_changes: bool = flag(False, "with --resume: accept other values of the run's defining "
                               "flags (--lr, --seq-len, ...) than the saved ones, e.g. to lower "
                               "the rate", setting=False)
    save_every: int = flag(50, "save a checkpoint every N steps, and at the end", type=count,
                           setting=False)
    log_every: int = flag(10, "print a log line every N steps", type=count, setting=False)
    cache_dir: str = flag(CACHE_DIR, "where tokenized corpora are cached", setting=False)
    seed: int = flag(0, "seed of the initial weights, data order and noise", type=count0)
    memory_plan: bool = flag(False, "print the per-GPU memory of this run for 1 to 128 GPUs "
                             "(weights, gradients, optimizer, activations, loss) and exit; "
                             "allocates nothing", setting=False)


# What a resumed run must share with the run it continues: the flags that shape the model, the
# data or the optimisation (the others say setting=False), so changing them silently would make
# the result neither run.
DEFINING = setting_names(TrainConfig)


def parse_args(argv=None) -> TrainConfig:
    p = argparse.ArgumentParser(
        description="UltraLLaDA post-training: masked-diffusion training at a long context with "
                    "a scaled RoPE base and a document masking strategy. With no flags: the tiny "
                    "preset on the built-in synthetic corpus, on the CPU, in a few minutes.")
    p.error = fail  # one line, not the usage block
    add_flags(p, TrainConfig)
    cfg = from_args(TrainConfig, p.parse_args(argv))
    if cfg.allow_changes and not cfg.resume:
        fail("--allow-changes only applies with --resume")
    if cfg.dtype == "float16":
        fail("--dtype float16 is for evaluation: training in float16 needs loss scaling, which "
             "this loop does not do (small gradients would underflow to 0); use --dtype bfloat16")
    return cfg


class UserError(Exception):
    """Bad input: reported as one line, exit code 2."""


# ---------------------------------------------------------------------------------------------
# Activation checkpointing, torch.compile, then FSDP2 or DDP, in that order (torchtitan).

def parallelize(model: LLaDA, cfg: TrainConfig, world: int, device: torch.device) -> LLaDA:
    """Every wrapper works in place, so parameter names, and so the checkpoint, stay official."""
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

def init_config(cfg: TrainConfig):
    return preset(cfg.init) if cfg.init in PRESETS else read_config(cfg.init)


def initial_model(cfg: TrainConfig, ckpt: str) -> LLaDA:
    """The weights to start from: the checkpoint in OUT when resuming, else --init."""
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


def scale_model_rope(model: LLaDA, cfg: TrainConfig) -> dict:
    """Set the RoPE base (and positions scale) for --target-len, from the pre-trained base."""
    s = model.config.scaled_rope(cfg.rope, cfg.target_len or cfg.seq_len, cfg.train_len, cfg.d_crit)
    model.config.set_rope(s)
    return s


# ---------------------------------------------------------------------------------------------
# Optimizer, learning rate, noise.

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


def train_step(model, optimizer, schedule: Schedule, cfg: TrainConfig, step: int, peak_lr: float,
               rank: int, world: int, device) -> dict:
    """One optimizer step over grad_accum micro batches; the step's log record. The update is
    skipped when the loss or the gradient is not finite, so the weights never become so."""
    t0 = time.perf_counter()
    lr = learning_rate(step, cfg, peak_lr)
    for group in optimizer.param_groups:
        group["lr"] = lr
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) \
        if cfg.dtype == "bfloat16" and not cfg.fsdp else nullcontext()
    step_loss = 0.0
    for micro in range(cfg.grad_accum):
        input_ids, doc_lens = batch_for_step(schedule, step, micro, rank)  # (B, L)
        positions = document_positions(doc_lens).to(device) if cfg.positions == "document" else None
        with autocast:
            loss = diffusion_loss(model, input_ids.to(device), noise_generator(cfg, step, micro, rank),
                                  doc_lens=doc_lens if isolates_documents(cfg.mask) else None,
                                  positions=positions)
        (loss / cfg.grad_accum).backward()
        step_loss += loss.item() / cfg.grad_accum
    grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf")))
    loss_avg = mean_over_ranks(step_loss, world)
    finite = math.isfinite(loss_avg) and math.isfinite(grad_norm)
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    dt = time.perf_counter() - t0
    return {"step": step + 1, "loss": loss_avg, "lr": lr, "grad_norm": grad_norm,
            "tokens_per_s": schedule.per_step * cfg.seq_len / dt, "finite": finite}


def weights_finite(model, world: int) -> bool:
    """Whether every weight is finite on every rank (each checks its own FSDP shard)."""
    local = all(bool(torch.isfinite(getattr(p, "to_local", lambda: p)()).all())
                for p in model.parameters())
    return not any_rank(not local, world)


# ---------------------------------------------------------------------------------------------
# Starting a run: every check that can fail happens before anything is written.

def check_inputs(cfg: TrainConfig) -> str:
    """Everything that can be checked before a file is written; returns the checkpoint path."""
    for name in ("out", "init"):
        if not is_utf8(getattr(cfg, name)):  # safetensors could not open the checkpoint
            raise UserError(f"--{name} {getattr(cfg, name)!r} is not valid UTF-8, which "
                            f"safetensors cannot open; pass another path")
    if cfg.init not in PRESETS and not os.path.isdir(cfg.init):
        raise UserError(f"--init {cfg.init} is neither a preset ({', '.join(PRESETS)}) nor a directory")
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise UserError(f"--out {cfg.out} is a file, not a folder; pass another --out")
    init = init_config(cfg)
    base, train_len = init.rope_origin(cfg.train_len)  # what scale_model_rope scales from
    check_scaling_args(cfg.target_len or cfg.seq_len, train_len, init.head_dim, cfg.d_crit, base,
                       cfg.rope)
    ckpt = os.path.join(cfg.out, "checkpoint")
    init = None if cfg.resume or cfg.init in PRESETS else cfg.init  # a resume reads the checkpoint
    for name, path in (("--init", init), ("--cache-dir", cfg.cache_dir)):
        if path and inside(path, (ckpt, ckpt + ".old", ckpt + ".tmp")):
            raise UserError(f"{name} {path} lies inside {ckpt}, which every save replaces; "
                            f"pass a folder elsewhere")
    has_ckpt = find_training_checkpoint(ckpt)
    if cfg.resume and not has_ckpt:
        raise UserError(f"--resume: {ckpt} holds no complete checkpoint; drop --resume to start a new run")
    if not cfg.resume and has_ckpt:
        raise UserError(f"{ckpt} already holds a checkpoint; pass --resume to continue it, or "
                        f"another --out")
    if cfg.resume:
        check_saved_run(cfg, ckpt)
    read_log(os.path.join(cfg.out, "log.jsonl"))  # ours, or a FileError before anything is written
    return ckpt


def check_saved_run(cfg: TrainConfig, ckpt: str) -> None:
    """What --resume continues: the saved flags (of the types of TrainConfig's fields, and the
    same as now unless --allow-changes) and a config.json written by a run of ours."""
    saved = read_training_state(ckpt)["config"]
    types = {f.name: f.type for f in fields(TrainConfig)}
    for k in DEFINING:
        if k in saved and not fits(saved[k], types[k]):
            raise UserError(f"{os.path.join(ckpt, 'train_state.json')}: --{k.replace('_', '-')} is "
                            f"saved as {saved[k]!r}, which it cannot be; restore the file")
    changed = [f"--{k.replace('_', '-')} {saved.get(k)} -> {getattr(cfg, k)}" for k in DEFINING
               if k in saved and saved[k] != getattr(cfg, k)]
    if changed and not cfg.allow_changes:
        raise UserError(f"--resume with other settings than the saved run ({', '.join(changed)});"
                        f" pass the saved values, or --allow-changes to change them on purpose")
    rope = read_config(ckpt).rope_scaling or {}  # the run's base, as main prints it
    missing = [k for k in ("method", "original_rope_theta", "rope_theta", "lambda", "train_len",
                           "target_len") if k not in rope]
    if missing:
        raise UserError(f"{os.path.join(ckpt, 'config.json')}: rope_scaling has no {missing[0]}, "
                        f"which train.py always saves; restore the file")


def inside(path: str, folders) -> bool:
    """Whether `path` is one of `folders` or lies within one (links resolved)."""
    real = os.path.realpath(path)
    return any(os.path.commonpath([real, os.path.realpath(f)]) == os.path.realpath(f)
               for f in folders)


def start(cfg: TrainConfig, rank: int, world: int):
    """The checkpoint path, tokenizer, schedule and model of a run, or a UserError."""
    ckpt = check_inputs(cfg)
    tokenizer = model_tokenizer(ckpt if cfg.resume else cfg.init)
    corpus = rank_zero_first(lambda: load_corpus(tokenizer, cfg.data, cache_dir=cfg.cache_dir,
                                                 progress=None if rank == 0 else False),
                             rank, world)
    schedule = Schedule(corpus, cfg.seq_len, cfg.mask, cfg.batch_size, cfg.grad_accum, world, cfg.seed)
    model = initial_model(cfg, ckpt)
    check_tokenizer_fits(tokenizer, model.config, ckpt if cfg.resume else cfg.init)
    return ckpt, tokenizer, corpus, schedule, model


def main(argv=None):
    cfg = parse_args(argv)
    if cfg.memory_plan:
        try:
            print(memory_plan(init_config(cfg), cfg.seq_len))
        except ValueError as e:  # an --init whose config.json is missing or impossible
            fail(str(e))
        return
    tune_cpu_memory(reuse_freed=True)  # before the first large tensor; nothing on GPUs
    rank, world, device = setup_distributed(cfg.fsdp)
    cfg.dtype = cfg.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    say = print if rank == 0 else (lambda *a, **k: None)
    try:
        ckpt, tokenizer, corpus, schedule, model = start(cfg, rank, world)
        lock = lock_folder(cfg.out) if rank == 0 else None  # held until the process ends
    except (UserError, ValueError) as e:  # CheckpointError and FileError are ValueErrors
        fail(str(e))
    except KeyboardInterrupt:
        fail("interrupted while starting; nothing was written", 130)
    try:
        # Copied into every checkpoint: the tokenizer, and the official modeling code of --init
        # (a resumed run's checkpoint carries both already)
        extra_files = {**record_tokenizer(tokenizer, model.config),
                       **record_remote_code(ckpt if cfg.resume else cfg.init)}
        rope = model.config.rope_scaling if cfg.resume else scale_model_rope(model, cfg)
        peak_lr = cfg.lr or (1e-3 if cfg.init in PRESETS else 2e-5)
        say(f"model: {cfg.init}, {num_params(model.config):,} parameters; corpus: {corpus.name}, "
            f"{corpus.n_docs:,} documents, {corpus.n_tokens:,} tokens -> {schedule.n_sequences:,} "
            f"sequences of {cfg.seq_len:,}")
        say(f"rope: {rope['method']}, base {rope['original_rope_theta']:,.0f} -> "
            f"{rope['rope_theta']:,.0f} (lambda {rope['lambda']:.3f}, T_train "
            f"{rope['train_len']:,} -> T_target {rope['target_len']:,}); mask: {cfg.mask}; "
            f"{world} process(es) on {device.type}, {cfg.dtype}, "
            f"{'FSDP' if cfg.fsdp else 'DDP' if world > 1 else 'single'}; lr {peak_lr:g}")
        if rope["method"] == "pi" and rank == 0:
            print("warning: --rope pi also scales positions, which only this repository's model.py "
                  "reads (rope_scaling in config.json): the official modeling_llada.py reads "
                  "rope_theta alone and gives this checkpoint other logits", file=sys.stderr)

        model = parallelize(model, cfg, world, device)
        optimizer = make_optimizer(model, cfg, peak_lr)
        first = 0
        if cfg.resume:
            first = read_training_state(ckpt)["step"]
            load_optimizer_state(ckpt, model, optimizer)
        if rank == 0:
            # the steps past the checkpoint are about to be redone
            truncate_log(os.path.join(cfg.out, "log.jsonl"), first)
    except ValueError as e:  # a FileError or CheckpointError
        fail(str(e))
    except KeyboardInterrupt:
        fail("interrupted before the first step; no checkpoint was changed", 130)
    if first >= cfg.max_steps:
        say(f"{ckpt} is already at step {first} of --max-steps {cfg.max_steps}: nothing to do")
        return

    try:
        run_steps(cfg, model, optimizer, schedule, first, peak_lr, ckpt, extra_files,
                  rank, world, device)
    except (FileError, OSError) as e:  # a full disk, a folder made read-only mid-run
        kept, again = what_is_kept(ckpt)
        problem = e if isinstance(e, FileError) else f"cannot write in {cfg.out}: {e.strerror or e}"
        fail(f"{problem}; {kept}: fix that and {again}")
    if world > 1:
        dist.destroy_process_group()
    del lock


def what_is_kept(ckpt: str, with_changes: bool = False) -> tuple[str, str]:
    """What a failed run leaves and how to go on: from the last checkpoint (with other flags:
    --allow-changes), or, when the run failed before its first save, from the start (there is
    nothing to --resume). A save cut between its two renames left the checkpoint in .old,
    which --resume puts back."""
    if any(os.path.isfile(os.path.join(p, STATE)) for p in (ckpt, ckpt + ".old")):
        return "the last checkpoint is intact", "--resume" + " --allow-changes" * with_changes
    return "no checkpoint was saved yet", "run again"


def run_steps(cfg: TrainConfig, model, optimizer, schedule: Schedule, first: int, peak_lr: float,
              ckpt: str, extra_files: dict, rank: int, world: int, device) -> None:
    """Steps first..max_steps: log each, save every save_every and at the end, stop cleanly."""
    stop = stop_on_signals()
    log_path = os.path.join(cfg.out, "log.jsonl")
    # The bar only on a terminal (disable=None): in a log file the step lines say the same.
    bar = tqdm(total=cfg.max_steps, initial=first, disable=None if rank == 0 else True,
               unit="step", dynamic_ncols=True)
    tokens_seen, t_run = first * schedule.per_step * cfg.seq_len, time.perf_counter()
    run_config = asdict(cfg)
    for step in range(first, cfg.max_steps):
        record = train_step(model, optimizer, schedule, cfg, step, peak_lr, rank, world, device)
        if not record.pop("finite"):
            bar.close()
            kept, again = what_is_kept(ckpt, with_changes=True)
            fail(f"step {step + 1}: the loss is {record['loss']} and the gradient norm "
                 f"{record['grad_norm']}; stopped without updating or saving ({kept}). Lower "
                 f"--lr or raise --warmup, then {again}", 1)
        tokens_seen += schedule.per_step * cfg.seq_len
        record.update(tokens=tokens_seen, elapsed_s=time.perf_counter() - t_run)
        if rank == 0:
            append_line(log_path, record)  # finite: a non-finite step stopped above
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}")
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.max_steps:
                bar.write(f"step {step + 1:>5} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
                          f"{record['tokens_per_s']:,.0f} tokens/s | grad norm {record['grad_norm']:.2f}")
        stopping = any_rank(stop["signal"] is not None, world)
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.max_steps or stopping:
            if not weights_finite(model, world):  # the last update overflowed
                kept, again = what_is_kept(ckpt, with_changes=True)
                fail(f"step {step + 1}: the update made weights non-finite; not saved ({kept}). "
                     f"Lower --lr or --weight-decay, then {again}", 1)
            save_training_checkpoint(ckpt, model, optimizer, step + 1, run_config,
                                     extra_files, rank, world)
            if rank == 0:
                bar.write(f"saved {ckpt} at step {step + 1}")
        if stopping:
            bar.close()
            if rank == 0:
                print(f"stopped at step {step + 1}; continue with the same flags plus --resume")
            sys.exit(128 + (stop["signal"] or signal.SIGTERM))
    bar.close()


if __name__ == "__main__":
    main()
