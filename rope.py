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
import math

import torch


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
    """UltraLLaDA: the critical-dimension formula with the bidirectional capacity 2T, both sides."""
    return critical_lambda(2 * target_len, 2 * train_len, head_dim, base, d_crit)


METHODS = {  # name: what it does (the last column of `python rope.py`'s table)
    "none": "the pre-trained base; positions past the window are out of distribution",
    "ntk": "plain NTK: base grows by (T/T_train)^(d/(d-2))",
    "critical": "LongLLaDA: periods up to d_crit stretched to cover T (training-free)",
    "diffusion": "UltraLLaDA: as critical, with capacity 2T (offsets go both ways)",
    "pi": "interpolation: positions squeezed by T_train/T, base unchanged",
}


def rope_lambda(method: str, target_len: int, train_len: int = 4096, head_dim: int = 128,
                base: float = 500000.0, d_crit: int | None = None) -> float:
    """The base scale factor lambda of `method` (scale_rope); the new base is base * lambda."""
    return scale_rope(method, target_len, train_len, head_dim, base, d_crit)["lambda"]


def scale_rope(method: str, target_len: int, train_len: int, head_dim: int, base: float,
               d_crit: int | None = None) -> dict:
    """Everything a model needs to run `method` at target_len, as recorded in config.json; a
    ValueError naming the values if the formulas cannot take them.

    lambda is 1 when target_len <= train_len, and never below 1: just past T_train the
    critical-dimension formulas dip under 1, which would shrink the base instead of extending
    it. The critical dimension only means something in 2..head size: below 2 (a capacity under
    2pi tokens) no pair completes a turn and lambda divides by zero or, negative, silently shrinks
    to 1; above it (a capacity over 2pi b) every pair does."""
    if method not in METHODS:
        raise ValueError(f"unknown rope method {method!r}; choose one of {', '.join(METHODS)}")
    if d_crit is not None and not 1 <= d_crit <= head_dim:
        raise ValueError(f"a critical dimension of {d_crit} is outside 1..{head_dim} (head size)")
    capacity = {"critical": 1, "diffusion": 2}.get(method)  # T_cap = capacity * T_train
    if capacity is not None and d_crit is None:
        d_crit = critical_dim(head_dim, base, capacity * train_len)
        if not 2 <= d_crit <= head_dim:  # 2 needs T_cap > 2pi, head_dim needs T_cap <= 2pi b
            lo, hi = -(-7 // capacity), math.floor(2 * math.pi * base) // capacity  # T_cap 7..2pi b
            hint = f"a T_train in {lo}..{hi}" if lo <= hi else "another base"
            raise ValueError(f"T_train {train_len} gives the {method} rope a critical dimension of "
                             f"{d_crit} (head size {head_dim}, base {base:.10g}), outside "
                             f"2..{head_dim}; it needs {hint}")
    lam = 1.0
    try:  # float ** float raises where float * float gives inf; NTK's d/(d-2) is infinite at d = 2
        if target_len > train_len and method == "ntk":
            lam = ntk_lambda(target_len, train_len, head_dim)
        elif target_len > train_len and capacity is not None:
            formula = critical_lambda if method == "critical" else diffusion_aware_lambda
            lam = max(1.0, formula(target_len, train_len, head_dim, base, d_crit))
    except (OverflowError, ZeroDivisionError):
        lam = math.inf
    if not math.isfinite(base * lam):
        raise ValueError(f"the {method} rope at T_target {target_len} scales the base {base:.10g} "
                         f"past the float range (lambda {lam:.3g})")
    return {
        "method": method,
        "target_len": target_len,
        "train_len": train_len,
        "original_rope_theta": base,
        "lambda": lam,
        "rope_theta": base * lam,
        "d_crit": d_crit if capacity else None,  # only the critical-dimension methods have one
        # position interpolation squeezes k into the trained range; every other method keeps k
        "position_scale": (train_len / target_len if method == "pi" and target_len > train_len
                           else 1.0),
    }


# ---------------------------------------------------------------------------------------------
# The rotation itself, matching LLaDA's arithmetic: tables in float32 from integer positions,
# rotate-half (GPT-NeoX) layout, q and k upcast to float32 for the rotation.

def rope_tables(positions: torch.Tensor, head_dim: int, base: float, pos_scale: float = 1.0,
                dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every angle, (..., L, head_dim), for integer positions (..., L): float32
    whatever the model's dtype, like the reference (float64 only for exactness tests)."""
    # inv_freq written as 1 / b^(2i/d), the way the reference computes it, so the float32
    # rounding is the same and logits match the official model bit for bit.
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=dtype,
                                             device=positions.device) / head_dim))
    pos = positions.to(dtype) * pos_scale  # exact when 1: integer positions stay integers
    angles = pos[..., None] * inv_freq  # (..., L, D/2)
    angles = torch.cat((angles, angles), dim=-1)  # (..., L, D): both halves share angle i
    return angles.cos(), angles.sin()


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k, (B, L, H, D), by tables (B or 1, L, D); rotation in float32 at least."""
    half = cos.shape[-1] // 2  # both halves of a table hold the same angles
    c, s = cos[..., None, :half], sin[..., None, :half]  # (B, L, 1, D/2): same for every head

    def rotate(t):
        # bf16 has 8 bits of mantissa: rotating in it would blur positions that differ by
        # less than 1/256 of the angle, so the reference upcasts.
        x1, x2 = t.to(torch.promote_types(t.dtype, cos.dtype)).chunk(2, dim=-1)
        # The reference's t * cos + rotate_half(t) * sin, rotate_half(t) = (-x2, x1), written per
        # half: the same roundings (x1*c + (-x2)*s is x1*c - x2*s exactly), without the copy.
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(t.dtype)

    return rotate(q), rotate(k)


# ---------------------------------------------------------------------------------------------

def print_table(target_lens: list[int], train_len: int, head_dim: int, base: float,
                d_crit: int | None) -> None:
    rows = [scale_rope(m, t, train_len, head_dim, base, d_crit)  # any ValueError before a line
            for t in target_lens for m in METHODS]
    print(f"RoPE scaling for a model trained at T_train = {train_len:,} tokens "
          f"(head dim d = {head_dim}, base b = {base:,.0f})")
    first_unseen = min(critical_dim(head_dim, base, train_len), head_dim)  # no more pairs than d/2
    print(f"critical dimension at T_train: {first_unseen} (pairs below it complete a full turn "
          f"inside the window); at the bidirectional capacity 2*T_train: "
          f"{critical_dim(head_dim, base, 2 * train_len)}")
    header = (f"{'T_target':>9} {'method':<10} {'lambda':>10} {'new base b*lambda':>18} "
              f"{'d_crit':>6} {'pos scale':>9} {'period@' + str(first_unseen):>13}  what it does")
    print(header)
    print("-" * len(header))
    for s in rows:
        # tokens that the pair at dimension first_unseen (i = d/2) needs for one full turn
        turn = 2 * math.pi * s["rope_theta"] ** (first_unseen / head_dim) / s["position_scale"]
        print(f"{s['target_len']:>9,} {s['method']:<10} {s['lambda']:>10.3f} "
              f"{s['rope_theta']:>18,.0f} {s['d_crit'] or '-':>6} {s['position_scale']:>9.4f} {turn:>13,.0f}  "
              f"{METHODS[s['method']]}")
    print(f"\nlambda = 1 whenever T_target <= T_train. period@{first_unseen}: tokens for one turn "
          f"of the pair at dimension {first_unseen},\nthe first that never turned in pre-training; "
          f"the NTK family stretches it towards the new window.")


def number(kind, ok, what: str):
    """An argparse type: the text as `kind`, refused in one line unless ok(value)."""
    def parse(text: str):
        value = kind(text)  # not a number: argparse says "invalid int value: 'x'"
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


def main(argv=None):
    p = argparse.ArgumentParser(description="Print the RoPE base and scale factor lambda of "
                                            "every context-extension method for a target length.")
    p.error = lambda message: p.exit(2, f"error: {message}\n")  # one line, no usage block
    length = number(int, lambda n: 0 < n <= 2**53, "a number of tokens in 1..2^53")
    p.add_argument("--target-len", type=length, nargs="+", default=[131072],
                   help="context length(s) to extend to, in tokens (default: 131072)")
    p.add_argument("--train-len", type=length, default=4096,
                   help="context length the model was pre-trained at (default: %(default)s)")
    p.add_argument("--head-dim", type=number(int, lambda d: d > 2 and d % 2 == 0,
                                             "an even number above 2"), default=128,
                   help="attention head size d (default: LLaDA's %(default)s)")
    p.add_argument("--base", type=number(float, lambda b: math.isfinite(b) and b > 1,
                                         "a finite number above 1"), default=500000.0,
                   help="pre-trained rope base (default: LLaDA's %(default).0f)")
    p.add_argument("--d-crit", type=number(int, lambda d: d > 0, "a positive number"),
                   help="override the critical dimension of 'critical' and 'diffusion', "
                        "1..--head-dim (default: from --train-len; 73 worked best for LLaDA)")
    args = p.parse_args(argv)
    try:
        print_table(args.target_len, args.train_len, args.head_dim, args.base, args.d_crit)
    except ValueError as e:  # a combination the formulas cannot take, in the values' words
        p.error(str(e))


if __name__ == "__main__":
    main()
