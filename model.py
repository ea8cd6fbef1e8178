"""
model.py: the LLaDA transformer, with the official checkpoint's tensor names.

Paper map: docs/paper.md section 1. LLaDA-8B is a Llama-style transformer without a causal
mask; a block computes

    h = x + attn_out(Attention(rope(q_proj(n)), rope(k_proj(n)), v_proj(n)))      n = attn_norm(x)
    y = h + ff_out(silu(ff_proj(m)) * up_proj(m))                                 m = ff_norm(h)

with RMSNorm, rotate-half RoPE (rope.py) and bidirectional attention (masks.py). Module names
are chosen so that state_dict() keys are the official tensor names
(`model.transformer.blocks.{i}.q_proj.weight`, ...): the official checkpoint loads with no
renaming, and what we save loads in the official code (checkpoint.py reads and writes that
layout). The arithmetic follows the reference (float32 RoPE tables and rotation, RMSNorm in
float32 cast back before the weight multiply).

The model returns hidden states; `head` turns any subset of them into logits, because a 64K
sequence with LLaDA's 126464-token vocabulary would need 33 GB of float32 logits.

Run `python model.py --preset llada-8b` for the parameter count and memory, allocating nothing.
"""
import argparse
import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from masks import attention, attention_plan
from rope import apply_rope, rope_tables, scale_rope


@dataclass
class LLaDAConfig:
    """The fields of LLaDA's config.json that this implementation uses, under the same names."""
    d_model: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    mlp_hidden_size: int = 12288
    vocab_size: int = 126464
    embedding_size: int = 126464
    rope_theta: float = 500000.0
    max_sequence_length: int = 4096
    rms_norm_eps: float = 1e-5
    include_bias: bool = False
    weight_tying: bool = False
    mask_token_id: int = 126336
    eos_token_id: int = 126081
    pad_token_id: int = 126081
    init_std: float = 0.02
    # Ours: how rope_theta was scaled for context extension (rope.scale_rope), None if it wasn't.
    rope_scaling: dict | None = None
    # Every other key of the checkpoint's config.json, kept verbatim (harness/checkpoint.py).
    extra: dict = field(default_factory=dict)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def position_scale(self) -> float:
        return (self.rope_scaling or {}).get("position_scale", 1.0)

    def scaled_rope(self, method: str, target_len: int, train_len: int | None = None,
                    d_crit: int | None = None) -> dict:
        """rope.scale_rope for `target_len`, always from the pre-trained base and window, which
        a post-trained checkpoint records in rope_scaling; train_len, if given, is the window."""
        saved = self.rope_scaling or {}
        base = saved.get("original_rope_theta", self.rope_theta)
        train_len = train_len or saved.get("train_len") or self.max_sequence_length
        return scale_rope(method, target_len, train_len, self.head_dim, base, d_crit)

    def set_rope(self, scaling: dict) -> None:
        """Use a scale_rope result: the model builds its RoPE tables from these on every forward."""
        self.rope_theta, self.rope_scaling = scaling["rope_theta"], scaling


TIKTOKEN_VOCAB = 100277  # tiktoken cl100k_base's vocabulary size (its n_vocab)
# Small presets use tiktoken cl100k_base; EOS and [MASK] are the two ids after its vocabulary.
# Their RoPE base is 10000: at the tiny model's 512-token window that puts the critical
# dimension at half the head (32 of 64), where LLaDA's sits at 4096 tokens (64 of 128), so
# context extension stresses the same share of dimensions.
SMALL_VOCAB = dict(vocab_size=TIKTOKEN_VOCAB + 2, embedding_size=100352,
                   eos_token_id=TIKTOKEN_VOCAB, pad_token_id=TIKTOKEN_VOCAB,
                   mask_token_id=TIKTOKEN_VOCAB + 1, rope_theta=10000.0)
PRESETS = {
    "llada-8b": LLaDAConfig(),
    # Two layers of width 128 and a 512-token window: trains in minutes on a laptop CPU.
    "tiny": LLaDAConfig(d_model=128, n_layers=2, n_heads=2, n_kv_heads=2, mlp_hidden_size=384,
                        max_sequence_length=512, **SMALL_VOCAB),
    # About 58M parameters (51M of them the two 100K-token embeddings), for benchmarks.
    "small": LLaDAConfig(d_model=256, n_layers=8, n_heads=4, n_kv_heads=4, mlp_hidden_size=768,
                         max_sequence_length=1024, **SMALL_VOCAB),
}


def preset(name: str, **overrides) -> LLaDAConfig:
    """A copy of PRESETS[name] with `overrides`; callers may edit the copy's extra keys."""
    return replace(PRESETS[name], extra=dict(PRESETS[name].extra), **overrides)


# ---------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in float32 and cast back before the weight multiply, as the reference does
        # (so under bf16 the multiply itself is a bf16 product).
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


@dataclass
class PrefixCache:
    """Keys and values of the first `length` positions, one (k, v) pair per layer.

    Approximate prompt caching for the sampler (Fast-dLLM's prefix cache): a bidirectional
    model's prompt keys depend on the tokens being decoded, so reusing them while a block is
    denoised is an approximation that trades a little agreement for a lot of speed.
    """
    length: int
    kv: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)

    def filled(self, n_layers: int) -> bool:
        """Whether the first n_layers layers have stored their keys and values."""
        return len(self.kv) >= n_layers


TOKEN_SLICE = 4096  # tokens per slice of the token-wise work in inference (Block.forward)


class Block(nn.Module):
    def __init__(self, c: LLaDAConfig):
        super().__init__()
        self.n_heads, self.head_dim = c.n_heads, c.head_dim
        self.attn_norm = RMSNorm(c.d_model, c.rms_norm_eps)
        self.q_proj = nn.Linear(c.d_model, c.d_model, bias=False)
        self.k_proj = nn.Linear(c.d_model, c.d_model, bias=False)
        self.v_proj = nn.Linear(c.d_model, c.d_model, bias=False)
        self.attn_out = nn.Linear(c.d_model, c.d_model, bias=False)
        self.ff_norm = RMSNorm(c.d_model, c.rms_norm_eps)
        self.ff_proj = nn.Linear(c.d_model, c.mlp_hidden_size, bias=False)  # SiLU-gated branch
        self.up_proj = nn.Linear(c.d_model, c.mlp_hidden_size, bias=False)  # linear branch
        self.ff_out = nn.Linear(c.mlp_hidden_size, c.d_model, bias=False)

    def forward(self, x, cos, sin, plan=None, cache=None, layer=0):
        B, L, _ = x.shape
        # Everything but attention treats each token alone. Without gradients nothing needs its
        # intermediates afterwards, so a long input runs it a slice of tokens at a time:
        # LLaDA-8B's three 12288-wide SwiGLU intermediates never exist for all 128K tokens at
        # once (3 GB each in bf16), and on a CPU a slice stays in cache.
        sliced = not torch.is_grad_enabled() and L > TOKEN_SLICE
        slices = [slice(s, s + TOKEN_SLICE) for s in range(0, L, TOKEN_SLICE)]
        if sliced:
            q, k, v = (torch.cat(t, 1) for t in zip(*(self.rotated_qkv(x[:, s], cos[:, s], sin[:, s])
                                                     for s in slices)))
        else:
            q, k, v = self.rotated_qkv(x, cos, sin)
        if cache is not None:
            if cache.filled(layer + 1):  # decoding: prepend the prompt's stored keys and values
                pk, pv = cache.kv[layer]
                k, v = torch.cat((pk, k), 1), torch.cat((pv, v), 1)
            else:  # first pass of a block: remember the prefix
                cache.kv.append((k[:, :cache.length], v[:, :cache.length]))
        a = attention(q, k, v, plan).reshape(B, L, -1)
        if not sliced:
            return self.after_attention(x, a)
        out = torch.empty_like(x)
        for s in slices:
            out[:, s] = self.after_attention(x[:, s], a[:, s])
        return out

    def rotated_qkv(self, x, cos, sin):
        """q, k and v of each token, (B, L, H, D), q and k rotated by their positions."""
        B, L, _ = x.shape
        n = self.attn_norm(x)
        q, k, v = (proj(n).view(B, L, self.n_heads, self.head_dim)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        return (*apply_rope(q, k, cos, sin), v)

    def after_attention(self, x, a):
        h = x + self.attn_out(a)
        m = self.ff_norm(h)
        return h + self.ff_out(F.silu(self.ff_proj(m)) * self.up_proj(m))


class LLaDA(nn.Module):
    def __init__(self, config: LLaDAConfig):
        super().__init__()
        # LLaDA's layout only (harness/checkpoint.py refuses other configs when it reads them)
        assert not config.include_bias and not config.weight_tying, "no biases, untied embeddings"
        assert config.n_kv_heads == config.n_heads, f"n_kv_heads {config.n_kv_heads} != n_heads"
        self.config = config
        # Two plain containers, only so that state_dict() keys read "model.transformer.*".
        self.model = nn.Module()
        self.model.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.embedding_size, config.d_model),
            blocks=nn.ModuleList(Block(config) for _ in range(config.n_layers)),
            ln_f=RMSNorm(config.d_model, config.rms_norm_eps),
            ff_out=nn.Linear(config.d_model, config.embedding_size, bias=False),
        ))
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    @property
    def transformer(self):
        return self.model.transformer

    @torch.no_grad()
    def init_weights(self, seed: int | None = None):
        """Normal(0, init_std); the projections that write into the residual stream are scaled
        down by sqrt(2 * n_layers) so its variance does not grow with depth (from scratch only)."""
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        for name, p in self.named_parameters():
            if name.endswith("norm.weight") or name.endswith("ln_f.weight"):
                nn.init.ones_(p)
                continue
            std = self.config.init_std
            if name.endswith("attn_out.weight") or (".blocks." in name and name.endswith("ff_out.weight")):
                std /= math.sqrt(2 * self.config.n_layers)
            p.copy_(torch.randn(p.shape, generator=g) * std)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                doc_lens: list[list[int]] | None = None,
                cache: PrefixCache | None = None) -> torch.Tensor:
        """Final hidden states (B, L, d_model), after ln_f.

        positions (B or 1, L) integer positions, default 0..L-1. doc_lens: the documents of each
        sequence (masks.py); None is full attention. With a filled `cache`, input_ids are the
        positions after the cached prefix, and doc_lens describes the whole sequence.
        """
        B, L = input_ids.shape
        start = cache.length if cache is not None and cache.filled(self.config.n_layers) else 0
        if positions is None:
            positions = torch.arange(start, start + L, device=input_ids.device)[None]
        cos, sin = rope_tables(positions, self.config.head_dim, self.config.rope_theta,
                               self.config.position_scale)
        plan = attention_plan(doc_lens, B, start + L, input_ids.device, query_len=L)
        x = self.transformer.wte(input_ids)  # (B, L, d)
        for i, block in enumerate(self.transformer.blocks):
            x = block(x, cos, sin, plan, cache, i)
        return self.transformer.ln_f(x)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Logits for hidden states of any shape (..., d_model) -> (..., embedding_size)."""
        return self.transformer.ff_out(h)

    def logits(self, input_ids, **kw) -> torch.Tensor:
        """Full logits, (B, L, embedding_size): convenient for short inputs and tests only."""
        return self.head(self(input_ids, **kw))


def num_params(config: LLaDAConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in LLaDA(config).parameters())


# ---------------------------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description="Describe a LLaDA model preset without allocating it.")
    p.error = lambda message: p.exit(2, f"error: {message}\n")  # one line, no usage block
    p.add_argument("--preset", default="llada-8b", choices=PRESETS, help="(default: %(default)s)")
    args = p.parse_args(argv)
    c = PRESETS[args.preset]
    n, emb = num_params(c), c.embedding_size * c.d_model
    print(f"preset {args.preset}")
    print(f"parameters: {n:,} ({n / 1e9:.2f}B; embeddings {2 * emb:,}, "
          f"blocks {n - 2 * emb - c.d_model:,})")
    print(f"weights in bf16: {2 * n / 2**30:.2f} GiB, in fp32: {4 * n / 2**30:.2f} GiB")
    print(f"shape: {c.n_layers} layers, d_model {c.d_model}, {c.n_heads} heads of {c.head_dim}, "
          f"SwiGLU hidden {c.mlp_hidden_size}, vocabulary {c.vocab_size}")
    print(f"rope base {c.rope_theta:,.0f}, trained context {c.max_sequence_length} tokens")
    print(f"full float32 logits for 65536 tokens would take "
          f"{65536 * c.embedding_size * 4 / 1e9:.1f} GB: the loss computes them only where masked")


if __name__ == "__main__":
    main()
