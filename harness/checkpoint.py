"""
checkpoint.py: the official Hugging Face checkpoint layout, and the training state beside it.

Harness, not part of the paper. LLaDA-8B-Base is a directory holding `config.json`,
`model.safetensors` (or shards with `model.safetensors.index.json`), `tokenizer.json`, and the
official modeling code that `transformers` runs with trust_remote_code. The tensor names are
model.py's state_dict() keys: loading needs no renaming and what we save loads in the official
code. A training checkpoint (train.py's OUT/checkpoint) adds `optimizer.safetensors` (AdamW's
moments under the same names) and `train_state.json` (the step and the run's flags):
safetensors and JSON only, so reading a checkpoint cannot run code. It is published one way:

    1. every file is written into OUT/checkpoint.tmp/;
    2. OUT/checkpoint is renamed OUT/checkpoint.old, then checkpoint.tmp is renamed checkpoint;
    3. what only the old folder holds (a user's files) moves into the new one; the old goes.

A kill during 1 leaves checkpoint.tmp, which the next save deletes; between the renames it
leaves checkpoint.old alone, which `recover` renames back; during 3, `recover` finishes it.
OUT is train.py's own: a run starts only in a new or empty folder or one an earlier run
locked (it holds .lock), so every name a save replaces is its own.
"""
import json
import os
import shutil
from dataclasses import asdict, fields

import torch

from harness.files import FileError, default_mode, open_regular, parse_json_line, read_json, \
    write_atomic, write_json
from harness.flags import finite_number, fits
from harness.runtime import rank_zero_first
from harness.tokenizer import TIKTOKEN_NAME, Tokenizer, load_tokenizer, tiktoken_tokenizer
from model import PRESETS, LLaDA, LLaDAConfig

CONFIG, SINGLE, INDEX = "config.json", "model.safetensors", "model.safetensors.index.json"
STATE, OPTIMIZER = "train_state.json", "optimizer.safetensors"

# Keys the official code reads beyond LLaDAConfig's, with LLaDA-8B's values (all dropouts 0).
# Not auto_map: a checkpoint names modeling code only when --init brought some (carried_files).
OFFICIAL_CONFIG = {
    "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0,
    "architectures": ["LLaDAModelLM"], "attention_dropout": 0.0, "attention_layer_norm": False,
    "attention_layer_norm_with_affine": True,
    "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama",
    "embedding_dropout": 0.0, "flash_attention": False, "include_qkv_bias": False,
    "init_cutoff_factor": None, "init_device": "meta", "init_fn": "mitchell",
    "input_emb_norm": False, "layer_norm_type": "rms", "layer_norm_with_affine": True,
    "mlp_ratio": 4, "model_type": "llada", "multi_query_attention": None,
    "precision": "amp_bf16", "residual_dropout": 0.0, "rope": True, "rope_full_precision": True,
    "scale_logits": False, "use_cache": False,
}


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded; the message says what is wrong."""


# ---------------------------------------------------------------------------------------------
# config.json: read once, checked where it is read.

def read_config(path: str) -> LLaDAConfig:
    d = read_json(os.path.join(path, CONFIG))  # "does not exist": not a checkpoint directory
    if not isinstance(d, dict):
        raise CheckpointError(f"{os.path.join(path, CONFIG)} is not a JSON object")
    names = {f.name for f in fields(LLaDAConfig)} - {"extra"}
    config = LLaDAConfig(**{k: v for k, v in d.items() if k in names},
                         extra={k: v for k, v in d.items() if k not in names})
    if problem := config_problem(config):
        raise CheckpointError(f"{os.path.join(path, CONFIG)}: {problem}; restore it from a copy")
    return config


BIGGEST = 2**31 - 1  # any size or id beyond this is a typo; tensors and tables index with it


def config_problem(c: LLaDAConfig) -> str | None:
    """What makes a config impossible for model.py's formulas, in words; None if nothing does.
    Each field is checked by its type in LLaDAConfig: a switch is true or false, a size a whole
    number from 1 and an id from 0, a float finite and above 0 (a RoPE base above 1)."""
    scaling = c.rope_scaling if isinstance(c.rope_scaling, dict) else {}
    values = [(f.name, f.type, getattr(c, f.name)) for f in fields(LLaDAConfig)
              if f.type in (bool, int, float) and not (f.name == "pad_token_id" and c.pad_token_id is None)]
    values += [(f"rope_scaling.{k}", float, scaling[k]) for k in
               ("rope_theta", "original_rope_theta", "lambda", "position_scale") if k in scaling]
    for name, kind, v in values:
        if kind is bool:
            ok, must = isinstance(v, bool), "true or false"
        elif kind is int:
            low = 0 if name.endswith("_id") else 1
            ok, must = fits(v, int) and low <= v <= BIGGEST, f"a whole number in {low}..{BIGGEST}"
        else:
            low = 1 if name.endswith("rope_theta") else 0
            ok, must = finite_number(v) and v > low, f"a finite number above {low}"
        if not ok:
            return f"{name} is {json.dumps(v)[:40]}, it must be {must}"
    if c.rope_scaling is not None and not isinstance(c.rope_scaling, dict):
        return f"rope_scaling is {json.dumps(c.rope_scaling)[:40]}, it must be an object or null"
    if c.d_model % c.n_heads:
        return f"n_heads {c.n_heads} does not divide d_model {c.d_model}"
    if c.head_dim % 2:  # RoPE rotates pairs of dimensions
        return f"the head size d_model / n_heads = {c.head_dim} must be even"
    if c.include_bias or c.weight_tying or c.n_kv_heads != c.n_heads:
        return "model.py implements LLaDA's layout only: include_bias false, weight_tying " \
               "false, n_kv_heads = n_heads"
    for name in ("mask_token_id", "eos_token_id"):
        if getattr(c, name) >= c.embedding_size:
            return f"{name} {getattr(c, name)} has no embedding (embedding_size {c.embedding_size})"
    return None


def config_to_dict(config: LLaDAConfig) -> dict:
    """LLaDAConfig -> config.json, complete enough for the official modeling_llada.py."""
    d = {**OFFICIAL_CONFIG, **config.extra, **asdict(config)}
    d.pop("extra")
    if d["rope_scaling"] is None:
        d.pop("rope_scaling")
    return dict(sorted(d.items()))


# ---------------------------------------------------------------------------------------------
# Weights.

def weight_files(path: str) -> list[str]:
    """The safetensors files of a checkpoint directory, checked to exist there."""
    if os.path.isfile(os.path.join(path, INDEX)):
        index = read_json(os.path.join(path, INDEX))
        shards = index.get("weight_map") if isinstance(index, dict) else None
        names = list(shards.values()) if isinstance(shards, dict) else [None]
        if not all(isinstance(n, str) and n == os.path.basename(n) not in ("", ".", "..")
                   for n in names):  # "../x" or "/x" would read a file of another folder
            raise CheckpointError(f"{os.path.join(path, INDEX)} names shards that are not files "
                                  f"of {path}; restore it from a copy")
        names = sorted(set(names))
    elif os.path.isfile(os.path.join(path, SINGLE)):
        names = [SINGLE]
    else:
        raise CheckpointError(f"{path} has neither {SINGLE} nor {INDEX}")
    missing = [n for n in names if not os.path.isfile(os.path.join(path, n))]
    if missing:
        raise CheckpointError(f"{path} is incomplete: missing {', '.join(missing)}")
    return [os.path.join(path, n) for n in names]


def from_pretrained(path: str, dtype: torch.dtype | None = None,
                    device: str | torch.device | None = None) -> LLaDA:
    """Load an official-layout checkpoint as gpt-fast does: the model is built on the meta
    device and the tensors are assigned (load_state_dict(assign=True), which names missing,
    unexpected and misshapen tensors), so the weights never exist twice in memory."""
    from safetensors import safe_open

    config = read_config(path)
    with torch.device("meta"):
        model = LLaDA(config)
    state = {}
    for file in weight_files(path):
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                for name in f.keys():
                    state[name] = f.get_tensor(name)
        except Exception as e:  # a truncated or zero-byte shard: safetensors has its own errors
            raise CheckpointError(f"{file} is damaged or not a safetensors file "
                                  f"({str(e).splitlines()[0][:80]}); copy it again") from None
    for name, t in state.items():
        if not t.is_floating_point():  # .to(float) would run integers as if they were weights
            raise CheckpointError(f"{path}: {name} holds {t.dtype}, not floating-point weights")
        if not torch.isfinite(t).all():
            raise CheckpointError(f"{path} holds non-finite weights ({name}); it came from a "
                                  f"diverged run: use an earlier checkpoint")
        state[name] = t.to(device=device or "cpu", dtype=dtype or t.dtype)
    try:
        model.load_state_dict(state, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path} does not match its config.json: "
                              f"{' '.join(str(e).split())[:400]}") from None
    return model


def save_pretrained(path: str, config: LLaDAConfig, state_dict: dict[str, torch.Tensor],
                    max_shard_bytes: int = 5 * 10**9, extra_files: dict[str, str] | None = None):
    """Write the official layout into path.tmp and publish it as `path`."""
    publish(path, lambda tmp: write_pretrained(tmp, config, state_dict, max_shard_bytes,
                                               extra_files))


def write_pretrained(path: str, config: LLaDAConfig, state_dict: dict[str, torch.Tensor],
                     max_shard_bytes: int = 5 * 10**9, extra_files: dict[str, str] | None = None):
    """config.json and safetensors shards of at most max_shard_bytes (with an index when there
    are several) into the new folder `path`; extra_files maps names to files copied alongside
    (the tokenizer, the official modeling code)."""
    from safetensors.torch import save_file

    os.makedirs(path)
    shards, size = [{}], 0
    for name, t in state_dict.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.detach().to("cpu").contiguous()
        size += nbytes
    names = ([SINGLE] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for name, shard in zip(names, shards):
        save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
        os.chmod(os.path.join(path, name), default_mode())  # safetensors writes it private
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in state_dict.values())
        write_json(os.path.join(path, INDEX), {"metadata": {"total_size": total},
                                               "weight_map": {k: n for n, s in zip(names, shards)
                                                              for k in s}})
    for name, src in (extra_files or {}).items():
        shutil.copyfile(src, os.path.join(path, name))
    dtype = str(next(iter(state_dict.values())).dtype).removeprefix("torch.")
    write_json(os.path.join(path, CONFIG), {**config_to_dict(config), "torch_dtype": dtype})


def publish(path: str, write) -> None:
    """write(folder) fills the new folder path.tmp, which then takes the place of `path` (the
    module docstring's protocol); a write that fails leaves nothing half-done."""
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # left by a save that was killed
    try:
        write(tmp)
        recover(path)
        if os.path.lexists(path):
            os.replace(path, path + ".old")
        os.replace(tmp, path)
        recover(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def recover(path: str) -> None:
    """Finish a publish cut short: path.old alone (killed between the two renames) is the last
    checkpoint, renamed back; beside a new path (killed after them) it gives the new folder
    what only it holds, then is deleted."""
    old = path + ".old"
    if not os.path.isdir(old):
        return
    if not os.path.lexists(path):
        os.replace(old, path)
        return
    for name in os.listdir(old):
        if not os.path.lexists(os.path.join(path, name)):
            os.replace(os.path.join(old, name), os.path.join(path, name))
    shutil.rmtree(old)


def carried_files(init: str) -> dict:
    """What every checkpoint copies from the folder it was trained from: the tokenizer's files
    and the official modeling code (its Python files and generation_config.json, which
    transformers reads with trust_remote_code), so that the auto_map its config.json carries
    names files it holds. A preset has none."""
    names = sorted(os.listdir(init)) if os.path.isdir(init) else []
    kept = ("generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json")
    return {n: os.path.join(init, n) for n in names if os.path.isfile(os.path.join(init, n))
            and (n.endswith(".py") or n in kept)}


# ---------------------------------------------------------------------------------------------
# The tokenizer a checkpoint was trained with: LLaDA's tokenizer.json copied alongside, or, for
# our small presets, "tokenizer": "cl100k_base" in config.json.

def model_tokenizer(init: str) -> Tokenizer:
    """The tokenizer of a preset (the small ones use cl100k_base) or a checkpoint directory."""
    if init in PRESETS:
        if PRESETS[init].mask_token_id != tiktoken_tokenizer().mask_id:
            raise ValueError(f"preset {init} uses LLaDA's tokenizer.json; pass the checkpoint "
                             f"directory that holds it instead of the preset name")
        return tiktoken_tokenizer()
    return load_tokenizer(init)


def check_tokenizer_fits(tokenizer: Tokenizer, config: LLaDAConfig, where: str) -> None:
    """The tokenizer's [MASK] is the model's and its ids have embeddings."""
    if tokenizer.mask_id != config.mask_token_id or tokenizer.vocab_size > config.embedding_size:
        raise CheckpointError(f"the tokenizer of {where} ({tokenizer.name}, [MASK] "
                              f"{tokenizer.mask_id}) does not fit the model ([MASK] "
                              f"{config.mask_token_id}, {config.embedding_size} embeddings)")


def record_tokenizer(tokenizer: Tokenizer, config: LLaDAConfig) -> None:
    """A small preset's tokenizer is tiktoken's: its config.json says so (load_tokenizer reads
    it); LLaDA's tokenizer.json travels with carried_files."""
    if tokenizer.source == TIKTOKEN_NAME:
        config.extra["tokenizer"] = TIKTOKEN_NAME


# ---------------------------------------------------------------------------------------------
# Training checkpoints and the run's folder.

def open_run(out: str, resume: bool) -> tuple[str, int, dict]:
    """Where a run in `out` starts: (its checkpoint folder, the step it resumes after, the
    saved run's flags), (folder, 0, {}) for a new run. Writes nothing but what `recover`
    finishes of a save cut short."""
    ckpt = os.path.join(out, "checkpoint")
    if os.path.lexists(out) and not os.path.isdir(out):
        raise FileError(f"{out} is a file, not a folder; pass another output folder")
    if os.path.isdir(out) and os.listdir(out) and not os.path.exists(os.path.join(out, ".lock")):
        raise FileError(f"{out} holds files that train.py did not write (it has no .lock); pass "
                        f"a new or empty output folder")
    recover(ckpt)
    state = os.path.join(ckpt, STATE)
    if resume != os.path.isfile(state):
        raise FileError(f"{ckpt} holds no complete checkpoint; drop --resume to start a new run"
                        if resume else f"{ckpt} already holds a checkpoint; pass --resume to "
                        f"continue it, or another output folder")
    if not resume:
        return ckpt, 0, {}
    saved = read_json(state)
    if not (isinstance(saved, dict) and isinstance(saved.get("config"), dict)
            and fits(saved.get("step"), int) and saved["step"] >= 1):  # a save follows a step
        raise FileError(f"{state} is not a training state (a step count and the run's flags); "
                        f"restore it, or start a new run from the weights with --init {ckpt}")
    return ckpt, saved["step"], saved["config"]


def what_is_kept(ckpt: str, again: str = "--resume") -> str:
    """What a failed run leaves and how to go on."""
    if os.path.isfile(os.path.join(ckpt, STATE)):
        return f"the last checkpoint is intact: fix that and {again}"
    return "no checkpoint was saved yet: fix that and run again"


def save_training_checkpoint(path: str, model, optimizer, step: int, run_config: dict,
                             extra_files: dict, rank: int, world: int) -> None:
    """Every rank takes part in gathering the full weights and optimizer state (a collective
    under FSDP); rank 0 writes and publishes them. A failed write is one FileError on every
    rank, saying what is kept."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)  # on rank 0; {} elsewhere
    weights = get_model_state_dict(model, options=full)
    moments = get_optimizer_state_dict(model, optimizer, options=full).get("state", {})

    def fill(tmp: str) -> None:
        write_pretrained(tmp, model.config, weights, extra_files=extra_files)
        save_file({f"{name}:{k}": t.contiguous() for name, s in moments.items()
                   for k, t in s.items()}, os.path.join(tmp, OPTIMIZER))
        os.chmod(os.path.join(tmp, OPTIMIZER), default_mode())
        write_json(os.path.join(tmp, STATE), {"step": step, "config": run_config,
                                              "world_size": world})

    def write():
        try:
            publish(path, fill)
        except (OSError, FileError) as e:
            problem = e if isinstance(e, FileError) else f"cannot write {path}: {e.strerror or e}"
            raise FileError(f"{problem}; {what_is_kept(path)}") from None

    rank_zero_first(write, rank, world, (FileError,), "write the checkpoint", others=False)


def load_optimizer_state(path: str, model, optimizer, rank: int = 0, world: int = 1) -> None:
    """AdamW's moments and step counts, on any number of processes: rank 0 reads the whole
    state and each rank takes its share. The hyper-parameters (weight decay, betas) stay the
    optimizer's own, from the flags, which --allow-changes may have changed."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_optimizer_state_dict)
    groups = get_optimizer_state_dict(model, optimizer)["param_groups"]

    def read() -> dict:
        from safetensors.torch import load_file
        file, state = os.path.join(path, OPTIMIZER), {}
        try:
            flat = load_file(file)
        except Exception as e:  # missing, truncated: safetensors and OSError have their own types
            raise FileError(f"{file} cannot be read ({str(e).splitlines()[0][:80]}); resume from "
                            f"a copy, or start a new run from the weights with --init {path}") from None
        for key, t in flat.items():
            name, what = key.rsplit(":", 1)
            state.setdefault(name, {})[what] = t
        if set(state) != {n for g in groups for n in g["params"]}:
            raise FileError(f"{file} does not hold the state of this model's parameters")
        return state

    state = rank_zero_first(read, rank, world, (FileError,), "read the optimizer state",
                            others=False) or {}
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": groups},
                             options=StateDictOptions(full_state_dict=True,
                                                      broadcast_from_rank0=world > 1))


def truncate_log(path: str, step: int) -> None:
    """Keep log.jsonl's records up to `step` (those after it are about to be redone; a new run
    keeps none). Every line must be a record train.py wrote, but a last one cut off by a kill:
    a file that is not its log is a FileError, never truncated."""
    lines = []
    if os.path.lexists(path):
        with open_regular(path, "move it away or pass another output folder") as f:
            lines = f.read().splitlines()
    kept = []
    for number, line in enumerate(lines, 1):
        row, wrong = parse_json_line(line)
        if wrong and wrong.startswith("not JSON") and number == len(lines):
            continue  # the line being written when the run was killed
        if not wrong and not (fits(row.get("step"), int) and row["step"] >= 1):
            wrong = f"not a step record (step {row.get('step')!r})"
        if wrong:
            raise FileError(f"{path} line {number}: {wrong}; it is not a log of train.py: move "
                            f"it away or pass another output folder")
        kept += [line] if row["step"] <= step else []
    write_atomic(path, lambda f: f.write(b"".join(line + b"\n" for line in kept)))
