"""
rope.py: rotary position embeddings (RoPE) and how to stretch them to a longer context.

Paper map: docs/paper.md section 2. Pair i of a head of size d, at position k, is rotated by

    angle_i(k) = k * b^(-2i/d)            b = rope base (500000 for LLaDA), i = 0 .. d/2-1

Context extension changes b to b' = b * lambda (NTK family) or squeezes k (interpolation):

    ntk        plain NTK-aware          lambda = (T_target / T_train)^(d / (d-2))
    critical   LongLLaDA, training-free d_crit = 2 * ceil(d/2 * log_b(T_train / 2pi))
                                        lambda = b^-1 * (T_target / 2pi)^(d / d_crit)
    diffusion  UltraLLaDA               the same formula fed T_cap = 2 T_train, T_Ecap = 2 T_target
    pi         position interpolation   k -> k * T_train / T_target, base unchanged

Why "diffusion-aware": an autoregressive model trained on T_train tokens only ever sees relative
offsets in [-(T_train-1), 0]; a bidirectional diffusion model sees [-(T_train-1), T_train-1], so
the range of rotations it learned is twice as wide. Counting that doubled capacity on both sides
gives a slightly larger critical dimension (70 instead of 64 for LLaDA) and the UltraLLaDA base.

This file imports no other project file: a student can copy it alone.
Run `python rope.py --target-len 131072` for a table of every method.
"""
import argparse
import itertools
import math

import torch

METHODS = ("none", "ntk", "critical", "diffusion", "pi")


def critical_dim(head_dim: int, base: float, train_len: int) -> int:
    """Dimensions whose RoPE period fits inside the training window (LongLLaDA eq. 3).

    Pair i completes a full turn within T tokens when 2pi * b^(2i/d) <= T; the pairs that do were
    trained on every angle they can take, the rest never saw a full period and extrapolate badly.
    """
    return 2 * math.ceil(head_dim / 2 * math.log(train_len / (2 * math.pi), base))


def ntk_lambda(target_len: int, train_len: int, head_dim: int) -> float:
    """Plain NTK-aware scaling: extrapolate high frequencies, interpolate the lowest one."""
    return (target_len / train_len) ** (head_dim / (head_dim - 2))


def critical_lambda(target_len: int, train_len: int, head_dim: int, base: float,
                    d_crit: int | None = None) -> float:
    """LongLLaDA: stretch the base until the critical dimension's period covers T_target."""
    d_crit = d_crit or critical_dim(head_dim, base, train_len)
    return base ** -1 * (target_len / (2 * math.pi)) ** (head_dim / d_crit)


def diffusion_aware_lambda(target_len: int, train_len: int, head_dim: int, base: float,
                           d_crit: int | None = None) -> float:
    """UltraLLaDA: the critical-dimension formula with the bidirectional capacity 2T on both sides."""
    return critical_lambda(2 * target_len, 2 * train_len, head_dim, base, d_crit)


def method_critical_dim(method: str, train_len: int, head_dim: int, base: float,
                        d_crit: int | None = None) -> int | None:
    """The critical dimension a method uses (None for methods that have none), computed at the
    method's capacity: T_train for critical, 2 T_train for diffusion.

    The formula only means something between 2 and the head size: below 2 (a capacity under
    2pi tokens) no pair completes a turn and lambda divides by zero or, negative, silently
    shrinks to 1; above the head size (a capacity over 2pi b) every pair does. Either is a
    ValueError that says which T_train would work.
    """
    if method not in ("critical", "diffusion"):
        return None
    if d_crit:
        return d_crit
    scale = 1 if method == "critical" else 2  # T_cap = scale * T_train
    d = critical_dim(head_dim, base, scale * train_len)
    if not 2 <= d <= head_dim:
        # d >= 2 needs T_cap > 2pi; d <= head_dim needs T_cap <= 2pi b
        lo, hi = math.floor(2 * math.pi) // scale + 1, math.floor(2 * math.pi * base) // scale
        fix = f"it needs a T_train in {lo}..{hi}: pass another --train-len, or --d-crit" \
            if lo <= hi else "no T_train gives one at this base: pass --d-crit"
        raise ValueError(f"T_train {train_len} gives the {method} rope a critical dimension of "
                         f"{d} (head size {head_dim}, base {base:.10g}), outside 2..{head_dim}; "
                         f"{fix}")
    return d


def rope_lambda(method: str, target_len: int, train_len: int = 4096, head_dim: int = 128,
                base: float = 500000.0, d_crit: int | None = None) -> float:
    """The base scale factor lambda of `method`; the new base is base * lambda.

    lambda is 1 when target_len <= train_len (nothing to extend), and never below 1: near
    T_train the critical-dimension formulas dip slightly under 1, which would shrink the base and
    shorten every wavelength, the opposite of what extension needs.
    """
    if method not in METHODS:
        raise ValueError(f"unknown rope method {method!r}; choose one of {', '.join(METHODS)}")
    if target_len <= train_len or method in ("none", "pi"):
        return 1.0
    if method == "ntk" and head_dim <= 2:
        raise ValueError(f"plain NTK needs a head size above 2, got {head_dim}")
    d_crit = method_critical_dim(method, train_len, head_dim, base, d_crit)  # checked; None for ntk
    try:
        if method == "ntk":
            lam = ntk_lambda(target_len, train_len, head_dim)
        elif method == "critical":
            lam = max(1.0, critical_lambda(target_len, train_len, head_dim, base, d_crit))
        else:
            lam = max(1.0, diffusion_aware_lambda(target_len, train_len, head_dim, base, d_crit))
    except OverflowError:  # float ** float raises where float * float gives inf
        lam = math.inf
    if not math.isfinite(base * lam):
        raise ValueError(f"the {method} rope at T_target {target_len} scales the base {base:.10g} "
                         f"past the float range (lambda {lam:.3g}); pass a smaller --base or "
                         f"--target-len")
    return lam


def position_scale(method: str, target_len: int, train_len: int) -> float:
    """Position interpolation squeezes k into the trained range; every other method keeps k."""
    if method == "pi" and target_len > train_len:
        return train_len / target_len
    return 1.0


def scale_rope(method: str, target_len: int, train_len: int, head_dim: int, base: float,
               d_crit: int | None = None) -> dict:
    """Everything a model needs to run `method` at target_len, as recorded in config.json."""
    lam = rope_lambda(method, target_len, train_len, head_dim, base, d_crit)
    return {
        "method": method,
        "target_len": target_len,
        "train_len": train_len,
        "original_rope_theta": base,
        "lambda": lam,
        "rope_theta": base * lam,
        "d_crit": method_critical_dim(method, train_len, head_dim, base, d_crit),
        "position_scale": position_scale(method, target_len, train_len),
    }


def check_scaling_args(target_len: int, train_len: int | None, head_dim: int,
                       d_crit: int | None = None, base: float | None = None,
                       method: str | None = None) -> None:
    """One-line errors (ValueError) for lengths, critical dimensions and bases the formulas
    above cannot take. With base and method, also every value derived from them: the critical
    dimension at the method's capacity and the new base (scale_rope, which checks them)."""
    if target_len <= 0 or (train_len is not None and train_len <= 0):
        raise ValueError(f"context lengths must be positive token counts, got target "
                         f"{target_len}, train {train_len}")
    if d_crit is not None and not 0 < d_crit <= head_dim:
        raise ValueError(f"--d-crit must be in 1..{head_dim} (the head size), got {d_crit}")
    if method is None or base is None or train_len is None:
        return
    if not (math.isfinite(base) and base > 1):  # nan fails both
        raise ValueError(f"the RoPE base must be a finite number above 1, got {base}")
    scale_rope(method, target_len, train_len, head_dim, base, d_crit)


# ---------------------------------------------------------------------------------------------
# The rotation itself, matching LLaDA's arithmetic: tables in float32 from integer positions,
# rotate-half (GPT-NeoX) layout, q and k upcast to float32 for the rotation.

def rope_tables(positions: torch.Tensor, head_dim: int, base: float, pos_scale: float = 1.0,
                dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every angle, (..., L, head_dim), for integer positions (..., L).

    float32 whatever the model's dtype, like the reference (float64 only for exactness tests).
    """
    # inv_freq written as 1 / b^(2i/d), the way the reference computes it, so the float32
    # rounding is the same and logits match the official model bit for bit.
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=dtype,
                                             device=positions.device) / head_dim))
    pos = positions.to(dtype)
    if pos_scale != 1.0:
        pos = pos * pos_scale
    angles = pos[..., None] * inv_freq  # (..., L, D/2)
    angles = torch.cat((angles, angles), dim=-1)  # (..., L, D): both halves share angle i
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k, (B, L, H, D), by tables (B or 1, L, D); rotation in float32 at least."""
    half = cos.shape[-1] // 2  # both halves of a table hold the same angles
    c, s = cos[..., None, :half], sin[..., None, :half]  # (B, L, 1, D/2): same for every head

    def rotate(t):
        # bf16 has 8 bits of mantissa: rotating in it would blur positions that differ by
        # less than 1/256 of the angle, so the reference upcasts.
        x1, x2 = t.to(torch.promote_types(t.dtype, cos.dtype)).chunk(2, dim=-1)
        # t * cos + rotate_half(t) * sin, written per half: the same roundings (x1*c + (-x2)*s
        # is x1*c - x2*s exactly), without building rotate_half's copy and the negation.
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(t.dtype)

    return rotate(q), rotate(k)


# ---------------------------------------------------------------------------------------------

WHAT_IT_DOES = {
    "none": "the pre-trained base; positions past the window are out of distribution",
    "ntk": "plain NTK: base grows by (T/T_train)^(d/(d-2))",
    "critical": "LongLLaDA: periods up to d_crit stretched to cover T (training-free)",
    "diffusion": "UltraLLaDA: as critical, with capacity 2T (offsets go both ways)",
    "pi": "interpolation: positions squeezed by T_train/T, base unchanged",
}


def period(base: float, head_dim: int, dim: int, pos_scale: float = 1.0) -> float:
    """Tokens that the pair at dimension `dim` (i = dim/2) needs for one full turn."""
    return 2 * math.pi * base ** (dim / head_dim) / pos_scale


def print_table(target_lens: list[int], train_len: int, head_dim: int, base: float,
                d_crit: int | None) -> None:
    print(f"RoPE scaling for a model trained at T_train = {train_len:,} tokens "
          f"(head dim d = {head_dim}, base b = {base:,.0f})")
    first_unseen = critical_dim(head_dim, base, train_len)
    print(f"critical dimension at T_train: {first_unseen} (pairs below it complete a full turn "
          f"inside the window); at the bidirectional capacity 2*T_train: "
          f"{critical_dim(head_dim, base, 2 * train_len)}")
    header = (f"{'T_target':>9} {'method':<10} {'lambda':>10} {'new base b*lambda':>18} "
              f"{'d_crit':>6} {'pos scale':>9} {'period@' + str(first_unseen):>13}  what it does")
    print(header)
    print("-" * len(header))
    for target_len in target_lens:
        for method in METHODS:
            s = scale_rope(method, target_len, train_len, head_dim, base, d_crit)
            crit = "-" if s["d_crit"] is None else str(s["d_crit"])
            turn = period(s["rope_theta"], head_dim, first_unseen, s["position_scale"])
            print(f"{target_len:>9,} {method:<10} {s['lambda']:>10.3f} {s['rope_theta']:>18,.0f} "
                  f"{crit:>6} {s['position_scale']:>9.4f} {turn:>13,.0f}  {WHAT_IT_DOES[method]}")
    print(f"\nlambda = 1 whenever T_target <= T_train. period@{first_unseen}: tokens that the pair at "
          f"dimension {first_unseen}\n(the first one that never completed a turn in pre-training) "
          f"needs for one turn once scaled;\nthe NTK family stretches it towards the new window.")


def main(argv=None):
    p = argparse.ArgumentParser(
        description="Print the RoPE base and scale factor lambda of every context-extension "
                    "method (none, ntk, critical, diffusion, pi) for a target length.")
    target = [131072]
    p.add_argument("--target-len", type=int, nargs="+", default=target,
                   help=f"context length(s) to extend to, in tokens (default: {target[0]})")
    p.add_argument("--train-len", type=int, default=4096,
                   help="context length the model was pre-trained at (default: LLaDA's %(default)s)")
    p.add_argument("--head-dim", type=int, default=128,
                   help="attention head size d (default: LLaDA's %(default)s)")
    p.add_argument("--base", type=float, default=500000.0,
                   help="pre-trained rope base (default: LLaDA's %(default).0f)")
    p.add_argument("--d-crit", type=int, default=None,
                   help="override the critical dimension of 'critical' and 'diffusion', "
                        "1..--head-dim (default: computed from --train-len; the paper's later "
                        "version reports 73 worked best for LLaDA)")
    p.error = lambda message: p.exit(2, f"error: {message}\n")  # one line, no usage block
    args = p.parse_args(argv)
    if args.head_dim <= 2 or args.head_dim % 2:
        p.error(f"--head-dim must be an even number above 2, got {args.head_dim}")
    if not (math.isfinite(args.base) and args.base > 1):  # nan fails both
        p.error(f"--base must be a finite number above 1, got {args.base}")
    try:
        for target_len, method in itertools.product(args.target_len, METHODS):
            check_scaling_args(target_len, args.train_len, args.head_dim, args.d_crit, args.base,
                               method)
    except ValueError as e:
        p.error(str(e))
    print_table(args.target_len, args.train_len, args.head_dim, args.base, args.d_crit)


if __name__ == "__main__":
    main()
