"""
checkpoint.py: the official Hugging Face checkpoint layout, and the training state beside it.

Harness, not part of the paper. LLaDA-8B-Base is a directory holding `config.json`,
`model.safetensors` or shards `model-0000N-of-0000M.safetensors` with
`model.safetensors.index.json`, `tokenizer.json`, and the official modeling code that
`transformers` runs with trust_remote_code (`configuration_llada.py`, `modeling_llada.py`,
named by config.json's `auto_map`). The tensor names are model.py's state_dict() keys, so
loading needs no renaming and what we save loads in the official code. A checkpoint carries
the modeling code of the directory it was trained from, and its `auto_map` names only files
it holds (the small presets have none).

A training checkpoint (train.py's OUT/checkpoint) is such a directory plus `train_state/`
(the optimizer, written by every rank with torch.distributed.checkpoint) and
`train_state.json` (the step and the run's flags). Every directory is written under a
temporary name and swapped into place when complete (files.replace_dir).
"""
import json
import os
import re
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, fields

import torch
import torch.distributed as dist

from harness.files import FileError, read_json, recover_dir, replace_dir, write_json, write_text
from harness.tokenizer import (TIKTOKEN_NAME, Tokenizer, load_tokenizer, tiktoken_tokenizer,
                               uses_tiktoken)
from model import PRESETS, LLaDA, LLaDAConfig, preset

CONFIG, SINGLE, INDEX = "config.json", "model.safetensors", "model.safetensors.index.json"
GENERATION_CONFIG = "generation_config.json"  # read by transformers beside the remote code
STATE = "train_state.json"

# Keys the official code reads beyond LLaDAConfig's, with LLaDA-8B's values (all dropouts 0).
OFFICIAL_CONFIG = {
    "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0,
    "architectures": ["LLaDAModelLM"], "attention_dropout": 0.0, "attention_layer_norm": False,
    "attention_layer_norm_with_affine": True,
    "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig",
                 "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
                 "AutoModel": "modeling_llada.LLaDAModelLM"},
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


def read_config(path: str) -> LLaDAConfig:
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    if not os.path.isfile(os.path.join(path, CONFIG)):
        raise CheckpointError(f"{path} has no {CONFIG}: not a LLaDA checkpoint directory")
    config = read_json(os.path.join(path, CONFIG))
    if not isinstance(config, dict):
        raise CheckpointError(f"{os.path.join(path, CONFIG)} is not a JSON object")
    return config_from_dict(config)


def config_from_dict(d: dict) -> LLaDAConfig:
    """config.json -> LLaDAConfig: the fields model.py uses, every other key kept in `extra`."""
    names = {f.name for f in fields(LLaDAConfig)} - {"extra"}
    known = {k: v for k, v in d.items() if k in names}
    return LLaDAConfig(**known, extra={k: v for k, v in d.items() if k not in names})


def config_to_dict(config: LLaDAConfig) -> dict:
    """LLaDAConfig -> config.json, complete enough for the official modeling_llada.py."""
    d = {**OFFICIAL_CONFIG, **config.extra, **asdict(config)}
    d.pop("extra")
    if d["rope_scaling"] is None:
        d.pop("rope_scaling")
    return dict(sorted(d.items()))


def checkpoint_files(path: str) -> list[str]:
    """The safetensors files of a checkpoint directory, checked to exist."""
    if os.path.isfile(os.path.join(path, INDEX)):
        index = read_json(os.path.join(path, INDEX))
        if not isinstance(index.get("weight_map") if isinstance(index, dict) else None, dict):
            raise CheckpointError(f"{os.path.join(path, INDEX)} has no weight_map")
        names = sorted(set(index["weight_map"].values()))
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
    """Load an official-layout checkpoint. The model is built on the meta device and the
    tensors are read memory-mapped and assigned, so the weights never exist twice in memory."""
    from safetensors import safe_open

    config = read_config(path)
    with torch.device("meta"):
        model = LLaDA(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    state, wrong = {}, []
    for file in checkpoint_files(path):
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                for name in f.keys():
                    if name not in expected:
                        state[name] = None  # reported below as unexpected
                        continue
                    t = f.get_tensor(name)
                    if t.shape != expected[name]:
                        wrong.append(f"{name} is {tuple(t.shape)}, expected {tuple(expected[name])}")
                        continue
                    state[name] = t.to(device=device or "cpu", dtype=dtype or t.dtype)
        except Exception as e:  # a truncated or zero-byte shard: safetensors has its own errors
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(f"{file} is damaged or not a safetensors file "
                                  f"({str(e).splitlines()[0][:80]}); copy it again") from None
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(k for k, v in state.items() if v is None)
    problems = ([f"wrong shape: {w}" for w in wrong] + [f"missing tensor: {m}" for m in missing[:5]]
                + [f"unexpected tensor: {u}" for u in unexpected[:5]])
    if problems:
        more = len(missing) + len(unexpected) - len(missing[:5]) - len(unexpected[:5])
        raise CheckpointError(f"{path} does not match its config.json: " + "; ".join(problems)
                              + (f" (and {more} more)" if more > 0 else ""))
    bad = [n for n, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise CheckpointError(f"{path} holds non-finite weights ({bad[0]}); it came from a "
                              f"diverged run: use an earlier checkpoint")
    model.load_state_dict(state, assign=True)
    return model


def save_pretrained(path: str, config: LLaDAConfig, state_dict: dict[str, torch.Tensor],
                    max_shard_bytes: int = 5 * 10**9, extra_files: dict[str, str] | None = None):
    """Write the official layout atomically: into a temporary directory renamed when complete,
    so a crash mid-save never leaves a directory that looks complete."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(path) + ".tmp-", dir=parent)
    try:
        write_pretrained(tmp, config, state_dict, max_shard_bytes, extra_files)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a checkpoint is for everyone to read
        replace_dir(tmp, path)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)


def write_pretrained(path: str, config: LLaDAConfig, state_dict: dict[str, torch.Tensor],
                     max_shard_bytes: int = 5 * 10**9, extra_files: dict[str, str] | None = None):
    """config.json and safetensors shards (at most max_shard_bytes each, with an index when
    there are several) into the folder `path`, which the caller swaps into place; extra_files
    maps names to files copied alongside (e.g. tokenizer.json)."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    shards, current, size = [], {}, 0
    for name, t in state_dict.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t.detach().to("cpu").contiguous()
        size += nbytes
    shards.append(current)
    names = ([SINGLE] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for name, shard in zip(names, shards):
        save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in state_dict.values())
        write_json(os.path.join(path, INDEX), {"metadata": {"total_size": total},
                                               "weight_map": {k: n for n, s in zip(names, shards)
                                                              for k in s}})
    for name, src in (extra_files or {}).items():
        shutil.copyfile(src, os.path.join(path, name))
    d = config_to_dict(config)
    # An auto_map class whose module is not in the folder would make transformers fail on a
    # missing file; without the entry it says the model needs trust_remote_code files instead.
    auto_map = {k: v for k, v in d.pop("auto_map", {}).items()
                if all(os.path.isfile(os.path.join(path, f)) for f in auto_map_files(v))}
    dtype = next(iter(state_dict.values())).dtype
    write_json(os.path.join(path, CONFIG), {**d, **({"auto_map": auto_map} if auto_map else {}),
                                            "torch_dtype": str(dtype).removeprefix("torch.")})


def auto_map_files(ref) -> list[str]:
    """The local files an auto_map entry names: "modeling_llada.LLaDAModelLM" needs
    modeling_llada.py; a tokenizer entry is a list (slow, fast; None for none); "org/repo--x.C"
    lives in another repository."""
    refs = ref if isinstance(ref, list) else [ref]
    return [r.rsplit(".", 1)[0] + ".py" for r in refs if isinstance(r, str) and "--" not in r]


def record_remote_code(init: str) -> dict:
    """The files of `init` that transformers' trust_remote_code loading reads, to copy into
    every checkpoint (as record_tokenizer's): the modules its config.json's auto_map names,
    the modules those import relatively (from .configuration_llada import ...), and
    generation_config.json. A preset, or a directory without them, has none."""
    if not os.path.isdir(init):
        return {}
    config = read_json(os.path.join(init, CONFIG), missing_ok=True)
    auto_map = config.get("auto_map") if isinstance(config, dict) else None
    todo = [f for ref in (auto_map.values() if isinstance(auto_map, dict) else [])
            for f in auto_map_files(ref)]
    files = {}
    while todo:
        name = todo.pop()
        src = os.path.join(init, name)
        if name in files or not os.path.isfile(src):
            continue
        files[name] = src
        with open(src, encoding="utf-8", errors="replace") as f:
            todo += [m + ".py" for m in re.findall(r"^\s*from\s+\.(\w+)\s+import", f.read(), re.M)]
    if os.path.isfile(os.path.join(init, GENERATION_CONFIG)):
        files[GENERATION_CONFIG] = os.path.join(init, GENERATION_CONFIG)
    return files


# ---------------------------------------------------------------------------------------------
# The tokenizer a checkpoint was trained with: LLaDA's tokenizer.json copied alongside, or, for
# our small presets, "tokenizer": "cl100k_base" in config.json.

def model_tokenizer(init: str) -> Tokenizer:
    """The tokenizer of `init`: a preset name (the small ones use cl100k_base), "cl100k_base",
    or a checkpoint directory (tokenizer.load_tokenizer)."""
    if init in PRESETS:
        if not uses_tiktoken(config_to_dict(preset(init))):
            raise ValueError(f"preset {init} uses LLaDA's tokenizer.json; pass the checkpoint "
                             f"directory that holds it instead of the preset name")
        return tiktoken_tokenizer()
    if init != TIKTOKEN_NAME and not os.path.isdir(init):
        raise ValueError(f"{init!r} is neither a preset ({', '.join(PRESETS)}) "
                         f"nor a checkpoint directory")
    return load_tokenizer(init)


def check_tokenizer_fits(tokenizer: Tokenizer, config: LLaDAConfig, where: str) -> None:
    """The tokenizer's [MASK] is the model's and its ids have embeddings."""
    if tokenizer.mask_id != config.mask_token_id or tokenizer.vocab_size > config.embedding_size:
        raise CheckpointError(f"the tokenizer of {where} ({tokenizer.name}, [MASK] "
                              f"{tokenizer.mask_id}) does not fit the model ([MASK] "
                              f"{config.mask_token_id}, {config.embedding_size} embeddings)")


def record_tokenizer(tokenizer: Tokenizer, config: LLaDAConfig) -> dict:
    """What a checkpoint needs to rebuild its tokenizer: tokenizer.json for LLaDA (the files to
    copy are returned), a marker in config.json for tiktoken (tokenizer.load_tokenizer)."""
    if os.path.isdir(tokenizer.source):
        names = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
        return {n: os.path.join(tokenizer.source, n) for n in names
                if os.path.isfile(os.path.join(tokenizer.source, n))}
    config.extra["tokenizer"] = tokenizer.source
    return {}


# ---------------------------------------------------------------------------------------------
# Training checkpoints: the model in the official layout plus the optimizer and the step.

def save_training_checkpoint(path: str, model, optimizer, step: int, run_config: dict,
                             extra_files: dict, rank: int, world: int) -> None:
    """Every rank writes its optimizer shard, rank 0 the gathered weights and train_state.json
    (and copies extra_files: the tokenizer, the remote code), all into path.tmp, which rank 0
    then swaps into place."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )
    tmp = path + ".tmp"
    if rank == 0 and os.path.exists(tmp):
        shutil.rmtree(tmp)  # left by a run killed mid-save
    _barrier(world)
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)},
                 checkpoint_id=os.path.join(tmp, "train_state"), no_dist=not dist.is_initialized())
    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                   cpu_offload=True))
    if rank == 0:
        write_pretrained(tmp, model.config, weights, extra_files=extra_files)
        write_json(os.path.join(tmp, STATE), {"step": step, "config": run_config,
                                              "world_size": world, "time": time.time()})
        replace_dir(tmp, path)
    _barrier(world)


def find_training_checkpoint(path: str) -> bool:
    """Whether `path` holds a complete training checkpoint, after repairing a save that was
    killed between the two renames of the swap (the previous checkpoint is then path.old)."""
    recover_dir(path)
    return os.path.isfile(os.path.join(path, STATE))


def read_training_state(path: str) -> dict:
    """train_state.json of a checkpoint: the step and the flags of the run that wrote it."""
    state = read_json(os.path.join(path, STATE))
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) \
            or not isinstance(state.get("config"), dict):
        raise FileError(f"{os.path.join(path, STATE)} is not a training state (no step and "
                        f"config); restore it or start a new run with another --out")
    return state


def load_optimizer_state(path: str, model, optimizer) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )
    state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, checkpoint_id=os.path.join(path, "train_state"),
                     no_dist=not dist.is_initialized())
    except Exception as e:  # torch.distributed.checkpoint wraps every failure in its own type
        raise FileError(f"{os.path.join(path, 'train_state')} cannot be read "
                        f"({str(e).splitlines()[0][:80]}); resume from another checkpoint") from None
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state["optimizer"])


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def truncate_log(path: str, step: int) -> None:
    """Keep log.jsonl's records up to `step` (those past it are about to be redone); a last
    line cut off by a kill is dropped. A new run (step 0) starts an empty log."""
    kept = []
    if step > 0 and os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise FileError(f"cannot read {path} ({e.__class__.__name__}); move it away to "
                            f"resume with a new log") from None
        for i, line in enumerate(lines):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if i == len(lines) - 1:  # the line being written when the run was killed
                    continue
                raise FileError(f"{path} line {i + 1} is not JSON; move the file away to resume "
                                f"with a new log") from None
            if record.get("step", 0) <= step:
                kept.append(line + "\n")
    write_text(path, "".join(kept))
