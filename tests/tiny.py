"""What many tests build for themselves, written once: the one-layer cl100k model that stands
in for a checkpoint, a folder of synthetic books that stands in for a corpus, and a pickle
crafted to run code when it is read."""
import os

import torch

from harness.checkpoint import save_pretrained
from harness.prepare import SyntheticConfig, synthetic_texts
from model import LLaDA, preset

TINY = dict(d_model=32, n_heads=2, n_kv_heads=2, mlp_hidden_size=64, n_layers=1)


def tiny_model(seed: int = 0, **overrides) -> LLaDA:
    """A random one-layer model on the cl100k tokenizer (`model.config` is its config)."""
    torch.manual_seed(seed)
    cfg = preset("tiny", **{**TINY, **overrides})
    cfg.extra["tokenizer"] = "cl100k_base"
    return LLaDA(cfg)


def tiny_checkpoint(path, seed: int = 0, scale: float = 1.0, **overrides) -> tuple[str, LLaDA]:
    """`tiny_model` saved the way train.py saves a preset, its weights multiplied by `scale`."""
    model = tiny_model(seed, **overrides)
    save_pretrained(str(path), model.config,
                    {k: v * scale for k, v in model.state_dict().items()})
    return str(path), model


def write_books(folder, seed: int, n_docs: int) -> str:
    """`n_docs` synthetic books, one .txt file each, in `folder` (a pathlib.Path)."""
    for i, text in enumerate(synthetic_texts(SyntheticConfig(seed=seed, n_docs=n_docs))):
        (folder / f"book{i:03d}.txt").write_text(text)
    return str(folder)


class Plant:
    """Unpickling this runs `touch MARKER`, as a crafted checkpoint would run anything."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)
