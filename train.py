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
therefore repeats an uninterrupted one exactly, with only the model and optimizer to restore
(harness/checkpoint.py: how a checkpoint is published so that a kill never loses one).
"""
import argparse
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from data import Schedule, batch_for_step
from diffusion import diffusion_loss
from harness.checkpoint import (carried_files, check_tokenizer_fits, from_pretrained,
                                load_optimizer_state, model_tokenizer, open_run, read_config,
                                record_tokenizer, save_training_checkpoint, truncate_log,
                                what_is_kept)
from harness.files import append_line, lock_folder
from harness.flags import (add_flags, count, count0, flag, from_args, number, positive0,
                           setting_names, utf8_path)
from harness.prepare import CACHE_DIR, load_corpus
from harness.runtime import (any_rank, exit_after, fail, mean_over_ranks, memory_plan_text,
                             rank_zero_first, setup_distributed, stop_on_signals, tune_cpu_memory)
from masks import STRATEGIES, document_positions, isolates_documents
from model import PRESETS, LLaDA, num_params, preset
from rope import METHODS


def preset_or_folder(text: str) -> str:
    """--init's type: the name of a preset or a folder (a checkpoint, read later)."""
    if text not in PRESETS and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} is neither a preset ({', '.join(PRESETS)}) "
                                         f"nor a directory")
    return utf8_path(text)


@dataclass
class TrainConfig:
    """Every flag of train.py, with its default (python train.py --help)."""
    init: str = flag("tiny", f"a preset ({', '.join(PRESETS)}; trained from scratch) or a LLaDA "
                     "checkpoint directory such as LLaDA-8B-Base", type=preset_or_folder)
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
                             "on CPU); not float16, whose small gradients underflow without loss "
                             "scaling", choices=("float32", "bfloat16", "float16"))
    compile: bool = flag(False, "torch.compile every transformer block", setting=False)
    activation_checkpointing: bool = flag(False, "recompute each block in backward instead of "
                                          "storing its activations (needed at 64K tokens for "
                                          "the 8B model)", setting=False)
    fsdp: bool = flag(False, "shard weights, gradients and optimizer state over the processes "
                      "(FSDP2); without it several processes replicate them (DDP)",
                      setting=False)
    out: str = flag("out", "output folder, train.py's own: checkpoint/ and log.jsonl; a new "
                    "or empty folder, or one of an earlier run; one run at a time may use it",
                    type=utf8_path, setting=False)
    resume: bool = flag(False, "continue OUT/checkpoint with the same flags, on any number of "
                        "processes; only --max-steps, --save-every, --log-every and how it runs "
                        "(--compile, --fsdp, --activation-checkpointing) may differ", setting=False)
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


def check_resumable(cfg: TrainConfig, saved: dict) -> None:
    """A resumed run continues the saved one: the same model, and the same value of every
    defining flag unless --allow-changes."""
    changed = [k for k in DEFINING if k in saved and saved[k] != getattr(cfg, k)]
    if "init" in changed:
        raise ValueError(f"--resume continues the model trained from --init {saved['init']}, not "
                         f"{cfg.init}; pass that --init, or another --out for a new run")
    if changed and not cfg.allow_changes:
        said = [f"--{k.replace('_', '-')} {json.dumps(saved[k])} -> {json.dumps(getattr(cfg, k))}"
                for k in changed]
        raise ValueError(f"--resume with other settings than the saved run ({', '.join(said)}); "
                         f"pass the saved values, or --allow-changes to change them on purpose")


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

def initial_model(cfg: TrainConfig, source: str) -> LLaDA:
    """A checkpoint's weights (float32 master weights), or a preset initialised from --seed,
    the same on every rank."""
    if source not in PRESETS:
        return from_pretrained(source, dtype=torch.float32)
    model = LLaDA(preset(source))
    model.init_weights(cfg.seed)
    return model


def scale_model_rope(model: LLaDA, cfg: TrainConfig) -> dict:
    """Set the RoPE base (and positions scale) for --target-len, from the pre-trained base."""
    s = model.config.scaled_rope(cfg.rope, cfg.target_len or cfg.seq_len, cfg.train_len, cfg.d_crit)
    model.config.set_rope(s)
    return s


# ---------------------------------------------------------------------------------------------
# Optimizer, learning rate, noise, one step.

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

def main(argv=None):
    cfg = parse_args(argv)
    if cfg.memory_plan:
        try:
            print(memory_plan_text(preset(cfg.init) if cfg.init in PRESETS else
                                   read_config(cfg.init), cfg.seq_len))
        except ValueError as e:  # an --init whose config.json is missing or impossible
            fail(str(e))
        return
    tune_cpu_memory(reuse_freed=True)  # before the first large tensor; nothing on GPUs
    rank, world, device = setup_distributed(cfg.fsdp)
    cfg.dtype = cfg.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    say = print if rank == 0 else (lambda *a, **k: None)

    # The run, the data and the model: every check of the input happens here, before anything
    # is written into --out, so a mistake is one line and leaves the folder as it was.
    try:
        # rank 0 first: it alone finishes a save cut short (recover), the others then read
        ckpt, first, saved = rank_zero_first(lambda: open_run(cfg.out, cfg.resume), rank, world,
                                             what="open the run")
        check_resumable(cfg, saved)
        source = ckpt if cfg.resume else cfg.init  # where the weights and tokenizer come from
        tokenizer = model_tokenizer(source)
        corpus = rank_zero_first(lambda: load_corpus(tokenizer, cfg.data, cache_dir=cfg.cache_dir,
                                                     progress=None if rank == 0 else False),
                                 rank, world)
        schedule = Schedule(corpus, cfg.seq_len, cfg.mask, cfg.batch_size, cfg.grad_accum, world,
                            cfg.seed)
        model = initial_model(cfg, source)
        check_tokenizer_fits(tokenizer, model.config, source)
        rope = model.config.rope_scaling if cfg.resume else scale_model_rope(model, cfg)
        lock = lock_folder(cfg.out) if rank == 0 else None  # one run at a time, until it exits
    except ValueError as e:  # FileError and CheckpointError are ValueErrors
        fail(str(e))
    record_tokenizer(tokenizer, model.config)
    extra_files = carried_files(source)  # the tokenizer and the official modeling code
    peak_lr = cfg.lr or (1e-3 if cfg.init in PRESETS else 2e-5)
    say(f"model: {cfg.init}, {num_params(model.config):,} parameters; corpus: {corpus.name}, "
        f"{corpus.n_docs:,} documents, {corpus.n_tokens:,} tokens -> {schedule.n_sequences:,} "
        f"sequences of {cfg.seq_len:,}")
    say(f"rope: {rope.get('method')}, base {model.config.rope_theta:,.0f} (lambda "
        f"{rope.get('lambda', 1):.3f} for {rope.get('target_len', 0):,} tokens); mask: {cfg.mask};"
        f" {world} process(es) on {device.type}, {cfg.dtype}, "
        f"{'FSDP' if cfg.fsdp else 'DDP' if world > 1 else 'single'}; lr {peak_lr:g}")
    if rope.get("method") == "pi" and rank == 0:
        print("warning: --rope pi also scales positions, which only this repository's model.py "
              "reads (rope_scaling in config.json): the official modeling_llada.py reads "
              "rope_theta alone and gives this checkpoint other logits", file=sys.stderr)

    model = parallelize(model, cfg, world, device)
    optimizer = make_optimizer(model, cfg, peak_lr)
    if cfg.resume:
        load_optimizer_state(ckpt, model, optimizer, rank, world)
    log = os.path.join(cfg.out, "log.jsonl")  # its steps after the checkpoint are to be redone
    rank_zero_first(lambda: truncate_log(log, first), rank, world, what="start the log", others=False)

    # The loop. Ctrl-C or SIGTERM finishes the step, saves and exits 130 or 143.
    stop = stop_on_signals()
    # The bar only on a terminal (disable=None): in a log file the step lines say the same.
    bar = tqdm(total=cfg.max_steps, initial=first, disable=None if rank == 0 else True,
               unit="step", dynamic_ncols=True)
    t_run = time.perf_counter()
    for step in range(first, cfg.max_steps):
        record = train_step(model, optimizer, schedule, cfg, step, peak_lr, rank, world, device)
        if not record.pop("finite"):
            bar.close()
            fail(f"step {step + 1}: the loss is {record['loss']} and the gradient norm "
                 f"{record['grad_norm']}; stopped without updating or saving; "
                 f"{what_is_kept(ckpt, '--resume --allow-changes')} (lower --lr or raise "
                 f"--warmup)", 1)
        record.update(tokens=(step + 1) * schedule.per_step * cfg.seq_len,
                      elapsed_s=time.perf_counter() - t_run)
        if rank == 0:
            append_line(log, record)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}")
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.max_steps:
                bar.write(f"step {step + 1:>5} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
                          f"{record['tokens_per_s']:,.0f} tokens/s | grad norm {record['grad_norm']:.2f}")
        stopping = any_rank(stop["signal"] is not None, world)
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.max_steps or stopping:
            if not weights_finite(model, world):  # the last update overflowed
                bar.close()
                fail(f"step {step + 1}: the update made weights non-finite; not saved; "
                     f"{what_is_kept(ckpt, '--resume --allow-changes')} (lower --lr or "
                     f"--weight-decay)", 1)
            save_training_checkpoint(ckpt, model, optimizer, step + 1, asdict(cfg), extra_files,
                                     rank, world)
            if rank == 0:
                bar.write(f"saved {ckpt} at step {step + 1}")
        if stopping:
            bar.close()
            say(f"stopped at step {step + 1}; continue with the same flags plus --resume")
            sys.exit(128 + stop["signal"])
    bar.close()
    if first >= cfg.max_steps:
        say(f"{ckpt} is already at step {first} of --max-steps {cfg.max_steps}: nothing to do")
    if world > 1:
        dist.destroy_process_group()
    del lock


if __name__ == "__main__":
    exit_after(main)
