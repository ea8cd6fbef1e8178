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
temporary name and swapped into place when complete (files.replace_dir). Reading one runs no
code from it: config.json is checked field by field, and the optimizer state is unpickled
admitting only the classes torch.distributed.checkpoint writes.
"""
import contextlib
import io
import json
import logging
import os
import pickle
import re
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, fields

import torch
import torch.distributed as dist

from harness.files import (FileError, default_mode, is_utf8, not_ours, open_regular,
                           parse_json_line, read_json, recover_dir, remove_dir, replace_dir,
                           write_atomic, write_json)
from harness.flags import finite_number, fits
from harness.runtime import rank_zero_first
from harness.tokenizer import (TIKTOKEN_NAME, Tokenizer, load_tokenizer, tiktoken_tokenizer,
                               uses_tiktoken)
from model import PRESETS, LLaDA, LLaDAConfig, preset

CONFIG, SINGLE, INDEX = "config.json", "model.safetensors", "model.safetensors.index.json"
GENERATION_CONFIG = "generation_config.json"  # read by transformers beside the remote code
STATE, OPTIMIZER = "train_state.json", "train_state"
# What every save writes itself: an old copy of these is never carried into a new checkpoint
# (a user's files are, files.replace_dir), so a layout of other shards cannot linger.
SAVED = re.compile(r"config\.json|model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json|"
                   r"train_state(\.json)?")

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
    return config_from_dict(config, os.path.join(path, CONFIG))


def config_from_dict(d: dict, where: str = CONFIG) -> LLaDAConfig:
    """config.json -> LLaDAConfig: the fields model.py uses, each checked (a CheckpointError
    naming the field and `where`), every other key kept in `extra`."""
    names = {f.name for f in fields(LLaDAConfig)} - {"extra"}
    known = {k: v for k, v in d.items() if k in names}
    config = LLaDAConfig(**known, extra={k: v for k, v in d.items() if k not in names})
    if problem := config_problem(config):
        raise CheckpointError(f"{where}: {problem}; restore the file from a copy")
    return config


BIGGEST = 2**31 - 1  # any size or id beyond this is a typo; tensors and tables index with it
SIZE = (lambda v: fits(v, int) and 1 <= v <= BIGGEST, f"a whole number in 1..{BIGGEST}")
ID = (lambda v: fits(v, int) and 0 <= v <= BIGGEST, f"a whole number in 0..{BIGGEST}")
BASE = (lambda v: finite_number(v) and v > 1, "a finite number above 1 (a RoPE base)")
RULES = {  # config.json's fields: what each must be for model.py's formulas to mean anything
    **dict.fromkeys(("d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden_size",
                     "vocab_size", "embedding_size", "max_sequence_length"), SIZE),
    **dict.fromkeys(("mask_token_id", "eos_token_id"), ID),
    "pad_token_id": (lambda v: v is None or ID[0](v), "a whole number or null"),
    "rope_theta": BASE,
    "rms_norm_eps": (lambda v: finite_number(v) and v > 0, "a finite number above 0"),
    "init_std": (lambda v: finite_number(v) and v >= 0, "a finite number, at least 0"),
    "include_bias": (lambda v: isinstance(v, bool), "true or false"),
    "weight_tying": (lambda v: isinstance(v, bool), "true or false"),
    "rope_scaling": (lambda v: v is None or isinstance(v, dict), "an object or null"),
}
SCALING_RULES = {  # rope.scale_rope's record, where present (other tools write other keys)
    "rope_theta": BASE, "original_rope_theta": BASE, "train_len": SIZE, "target_len": SIZE,
    "lambda": (lambda v: finite_number(v) and v > 0, "a finite number above 0"),
    "position_scale": (lambda v: finite_number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "d_crit": (lambda v: v is None or SIZE[0](v), "a whole number or null"),
    "method": (lambda v: isinstance(v, str), "a string"),
}


def config_problem(c: LLaDAConfig) -> str | None:
    """What makes a config impossible for model.py, in words; None if nothing does."""
    scaling = c.rope_scaling if isinstance(c.rope_scaling, dict) else {}
    for prefix, values, rules in (("", vars(c), RULES), ("rope_scaling.", scaling, SCALING_RULES)):
        for name, (ok, must) in rules.items():
            if name in values and not ok(values[name]):
                return f"{prefix}{name} is {json.dumps(values[name])[:40]}, it must be {must}"
    if c.d_model % c.n_heads:
        return f"n_heads {c.n_heads} does not divide d_model {c.d_model}"
    if c.head_dim % 2:  # RoPE rotates pairs of dimensions
        return f"the head size d_model / n_heads = {c.head_dim} must be even"
    for name in ("mask_token_id", "eos_token_id"):
        if getattr(c, name) >= c.embedding_size:
            return f"{name} {getattr(c, name)} has no embedding (embedding_size {c.embedding_size})"
    if not isinstance(c.extra.get("auto_map", {}), dict):  # every save reads it
        return f"auto_map is {json.dumps(c.extra['auto_map'])[:40]}, it must be an object"
    return None


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
        shards = list(index["weight_map"].values())
        if not all(isinstance(n, str) and n == os.path.basename(n) and n not in ("", ".", "..")
                   for n in shards):  # "../x" or "/x" would read a file of another folder
            raise CheckpointError(f"{os.path.join(path, INDEX)} names shards that are not files "
                                  f"of {path}; restore it from a copy")
        names = sorted(set(shards))
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
    if not is_utf8(path):
        raise CheckpointError(f"{path!r} is not valid UTF-8, and safetensors opens only such "
                              f"paths; rename the folder")
    with torch.device("meta"):
        model = LLaDA(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    state, wrong = {}, {}
    for file in checkpoint_files(path):
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                for name in f.keys():
                    if name not in expected:
                        state[name] = None  # reported below as unexpected
                        continue
                    t = f.get_tensor(name)
                    if t.shape != expected[name]:
                        wrong[name] = f"{name} is {tuple(t.shape)}, expected {tuple(expected[name])}"
                    elif not t.is_floating_point():  # would be cast to float silently
                        wrong[name] = f"{name} holds {str(t.dtype).removeprefix('torch.')}, not " \
                                      f"floating-point weights"
                    else:
                        state[name] = t.to(device=device or "cpu", dtype=dtype or t.dtype)
        except Exception as e:  # a truncated or zero-byte shard: safetensors has its own errors
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(f"{file} is damaged or not a safetensors file "
                                  f"({str(e).splitlines()[0][:80]}); copy it again") from None
    missing = sorted(set(expected) - set(state) - set(wrong))
    unexpected = sorted(k for k, v in state.items() if v is None)
    problems = ([f"wrong tensor: {w}" for w in wrong.values()] +
                [f"missing tensor: {m}" for m in missing] +
                [f"unexpected tensor: {u}" for u in unexpected])
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise CheckpointError(f"{path} does not match its config.json: " +
                              "; ".join(problems[:5]) + more)
    bad = [n for n, t in state.items() if not torch.isfinite(t).all()]
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
        os.chmod(tmp, default_mode(folder=True))  # mkdtemp makes it private
        replace_dir(tmp, path, CONFIG, SAVED.fullmatch)
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
        os.chmod(os.path.join(path, name), default_mode())  # safetensors writes it private
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
    files = [r.rsplit(".", 1)[0] + ".py" for r in refs if isinstance(r, str) and "--" not in r]
    return [f for f in files if f == os.path.basename(f)]  # "../x.C" would copy from elsewhere


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
    then swaps into place. A failure on rank 0 stops every rank (a FileError)."""
    import torch.distributed.checkpoint as dcp  # here: importing it takes seconds
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )
    tmp = path + ".tmp"

    def on_rank_zero(fn):  # the file system's work once; the other ranks learn how it went
        rank_zero_first(fn, rank, world, (OSError, FileError), "write the checkpoint", others=False)

    def clear_tmp():  # left by a run killed mid-save, if it is one (dcp makes train_state/ first)
        if problem := not_ours(tmp, OPTIMIZER):
            raise FileError(f"{problem}; move it away")
        if os.path.lexists(tmp):
            remove_dir(tmp, OPTIMIZER)

    on_rank_zero(clear_tmp)
    try:
        with warnings.catch_warnings(), quiet_root_logger():  # "assuming ... single process"
            warnings.simplefilter("ignore", UserWarning)
            dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)},
                     checkpoint_id=os.path.join(tmp, OPTIMIZER), no_dist=not dist.is_initialized())
    except CheckpointException as e:  # a BaseException: `except Exception` would miss it
        raise FileError(f"cannot write {os.path.join(tmp, OPTIMIZER)} ({reason(e)})") from None
    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                   cpu_offload=True))

    def publish():
        write_pretrained(tmp, model.config, weights, extra_files=extra_files)
        write_json(os.path.join(tmp, STATE), {"step": step, "config": run_config,
                                              "world_size": world, "time": time.time()})
        replace_dir(tmp, path, STATE, SAVED.fullmatch)

    on_rank_zero(publish)


def find_training_checkpoint(path: str) -> bool:
    """Whether `path` holds a complete training checkpoint, after repairing a save that was
    killed between the two renames of the swap (the previous checkpoint is then path.old).
    A FileError if a folder that saves replace or delete (path, path.old, path.tmp) exists and
    is not one a save wrote: a user's folder there is refused before any step, never lost."""
    recover_dir(path, STATE)
    for folder, marker in ((path, STATE), (path + ".old", STATE), (path + ".tmp", OPTIMIZER)):
        if problem := not_ours(folder, marker):
            raise FileError(f"{problem}; move it away or pass another --out")
    return os.path.isfile(os.path.join(path, STATE))


def read_training_state(path: str) -> dict:
    """train_state.json of a checkpoint: the step and the flags of the run that wrote it."""
    where = os.path.join(path, STATE)
    state = read_json(where)
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
        raise FileError(f"{where} is not a training state (no step and config); restore it or "
                        f"start a new run with another --out")
    if not fits(state.get("step"), int) or state["step"] < 1:  # a save comes after step 1
        raise FileError(f"{where}: step {state.get('step')!r} is not a step count (1, 2, ...); "
                        f"restore the file or start a new run with another --out")
    return state


# ---------------------------------------------------------------------------------------------
# The optimizer state, read without running code. torch.distributed.checkpoint unpickles
# train_state/.metadata with pickle.load and the non-tensor values (lr, betas, ...) with
# torch.load(weights_only=False): a crafted checkpoint would run any code on --resume. These
# two replacements admit only what a saved AdamW state holds.

METADATA_CLASSES = {("torch", "Size"), ("torch.serialization", "_get_layout"),
                    ("pathlib", "PosixPath"), ("pathlib._local", "PosixPath"),  # Python 3.13+
                    ("torch.distributed.checkpoint.filesystem", "_StorageInfo")} | {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "TensorStorageMetadata", "BytesStorageMetadata",
        "ChunkStorageMetadata", "TensorProperties", "StorageMeta", "_MEM_FORMAT_ENCODING")}


class MetadataUnpickler(pickle.Unpickler):
    """pickle.load for train_state/.metadata, admitting only METADATA_CLASSES and dtypes."""

    def find_class(self, module: str, name: str):
        if (module, name) in METADATA_CLASSES or \
                (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f".metadata names {module}.{name}, which no checkpoint "
                                     f"metadata holds (a file made to run code?); not run")


def safe_loaders(path: str):
    """The storage reader and planner of dcp.load for the folder `path`, reading the metadata
    with MetadataUnpickler and the plain values with torch.load(weights_only=True)."""
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    class MetadataReader(FileSystemReader):
        metadata = None

        def read_metadata(self) -> Metadata:  # no rank=: per-rank metadata is never written
            if self.metadata is None:  # read once, so that the caller sees its errors first
                with open_regular(os.path.join(self.path, ".metadata")) as f:
                    metadata = MetadataUnpickler(f).load()
                if not isinstance(metadata, Metadata):
                    raise pickle.UnpicklingError(".metadata holds no checkpoint metadata")
                for info in (metadata.storage_data or {}).values():  # the shards it names
                    name = getattr(info, "relative_path", None)
                    if not (isinstance(name, str) and name == os.path.basename(name) and
                            os.path.isfile(os.path.join(self.path, name))):  # not a pipe
                        raise FileError(f"{name!r}, named by .metadata, is not a file there")
                if getattr(metadata, "storage_meta", None) is None:  # as FileSystemReader does
                    metadata.storage_meta = StorageMeta()
                metadata.storage_meta.load_id = self.load_id
                self.metadata = metadata
            return self.metadata

    class PlainValuesPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            try:
                plain = torch.load(value, weights_only=True)
            except Exception:
                raise pickle.UnpicklingError(f"{read_item.dest_index.fqn} is not a plain value "
                                             f"(a file made to run code?); not run") from None
            again = io.BytesIO()  # what weights_only admitted, pickled again: harmless to load
            torch.save(plain, again)
            again.seek(0)
            super().load_bytes(read_item, again)

    return MetadataReader(path), PlainValuesPlanner()


def load_optimizer_state(path: str, model, optimizer) -> None:
    """The moments and step counts saved in `path`; the hyper-parameters (weight decay, betas)
    stay the optimizer's own, from the flags, which --allow-changes may have changed."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )
    where = os.path.join(path, OPTIMIZER)
    state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
    reader, planner = safe_loaders(where)
    try:
        reader.read_metadata()  # here, not inside dcp.load, which would hide why it failed
        with warnings.catch_warnings(), quiet_root_logger():
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, storage_reader=reader, planner=planner,
                     no_dist=not dist.is_initialized())
        flags = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        set_optimizer_state_dict(model, optimizer, optim_state_dict=state["optimizer"])
        for group, own in zip(optimizer.param_groups, flags):
            group.update(own)
    except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
        raise FileError(f"{where} cannot be read ({reason(e)}); resume from a copy of the "
                        f"checkpoint, or start a new run from its weights with --init {path} "
                        f"and another --out") from None


@contextlib.contextmanager
def quiet_root_logger():
    """torch.distributed.checkpoint logs every failure with its traceback to the root logger;
    the error that follows says it in one line instead."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def reason(e: BaseException) -> str:
    """The first line of what went wrong, unwrapped from torch.distributed.checkpoint's
    CheckpointException (which holds each rank's error)."""
    from torch.distributed.checkpoint.api import CheckpointException
    if isinstance(e, CheckpointException) and e.failures:
        e = next(iter(e.failures.values()))[0]
    text = str(e).splitlines()[0].split(". ")[0][:160] if str(e) else ""  # its first sentence
    return f"{e.__class__.__name__}: {text}" if text else e.__class__.__name__


# ---------------------------------------------------------------------------------------------
# log.jsonl: one record a step, written by train.py.

def read_log(path: str) -> list[tuple[int, bytes]]:
    """log.jsonl's records as (step, line), each checked to be one train.py writes; [] if
    there is no log. A last line cut off by a kill is dropped. A FileError otherwise: a file
    that is not ours is never truncated."""
    if not os.path.lexists(path):
        return []
    try:
        with open_regular(path, "move it away or pass another --out") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise FileError(f"cannot read {path}: {e.strerror or e}") from None
    records = []
    for number, line in enumerate(lines, 1):
        row, wrong = parse_json_line(line)
        if wrong and wrong.startswith("not JSON") and number == len(lines):
            continue  # the line being written when the run was killed
        if wrong is None and not (fits(row.get("step"), int) and row["step"] >= 1):
            wrong = f"not a step record (step {row.get('step')!r})"
        if wrong:
            raise FileError(f"{path} line {number}: {wrong}; it is not a log of train.py: move "
                            f"it away (a new one is started) or pass another --out")
        records.append((row["step"], line))
    return records


def truncate_log(path: str, step: int) -> None:
    """Keep log.jsonl's records up to `step` (those past it are about to be redone). A new
    run (step 0) starts an empty log."""
    kept = b"".join(line + b"\n" for s, line in read_log(path) if s <= step)
    write_atomic(path, lambda f: f.write(kept))
