import math

import pytest
import torch

from rope import METHODS, apply_rope, critical_dim, main, rope_lambda, rope_tables, scale_rope
from scripts import one_line_error, script

def rotate_half(x):
    """The reference's layout (GPT-NeoX): (x1, x2) -> (-x2, x1) on the two halves."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def test_published_critical_dimensions_and_lambdas():
    """LongLLaDA's critical-dimension lambdas and UltraLLaDA's diffusion-aware ones for LLaDA."""
    assert critical_dim(128, 500000.0, 4096) == 64
    assert critical_dim(128, 500000.0, 2 * 4096) == 70  # the doubled bidirectional capacity
    lengths = [8192, 16384, 24576, 32768]
    for length, expected in zip(lengths, [3.400, 13.599, 30.598, 54.396]):
        assert rope_lambda("critical", length) == pytest.approx(expected, abs=6e-4)
    for length, expected in zip(lengths + [65536, 131072],
                                [3.531, 12.541, 26.322, 44.543, 158.21, 561.94]):
        assert rope_lambda("diffusion", length) == pytest.approx(expected, rel=2e-4)
    s = scale_rope("diffusion", 131072, 4096, 128, 500000.0)
    assert s["rope_theta"] == pytest.approx(2.81e8, rel=1e-3)
    assert s["d_crit"] == 70 and s["position_scale"] == 1.0
    assert rope_lambda("ntk", 16384) == pytest.approx(4 ** (128 / 126))  # plain NTK


def test_no_scaling_inside_the_training_window_and_never_a_smaller_base():
    for method in METHODS:
        for target in (1024, 4095, 4096):
            s = scale_rope(method, target, 4096, 128, 500000.0)
            assert s["lambda"] == 1.0 and s["position_scale"] == 1.0
    # just past T_train the critical formula dips below 1 (0.85 at 4097): clamped
    assert rope_lambda("critical", 4097) == 1.0
    assert rope_lambda("critical", 8192) > 1.0


def test_d_crit_override_and_position_interpolation():
    assert rope_lambda("diffusion", 32768, d_crit=70) == rope_lambda("diffusion", 32768)
    lam73 = rope_lambda("diffusion", 32768, d_crit=73)
    assert lam73 == pytest.approx(500000.0 ** -1 * (2 * 32768 / (2 * math.pi)) ** (128 / 73))
    assert scale_rope("critical", 32768, 4096, 128, 5e5, d_crit=66)["d_crit"] == 66
    assert scale_rope("ntk", 32768, 4096, 128, 5e5, d_crit=66)["d_crit"] is None  # has none
    s = scale_rope("pi", 32768, 4096, 128, 5e5)
    assert s["lambda"] == 1.0 and s["position_scale"] == 0.125
    cos, _ = rope_tables(torch.tensor([800]), 8, 10000.0, pos_scale=0.125)
    assert torch.allclose(cos, rope_tables(torch.tensor([100]), 8, 10000.0)[0])


def test_impossible_combinations_are_value_errors_that_name_the_values():
    # The tiny preset's head (64) and base (10000): the critical dimension, 2 ceil(32 log_b(T_cap
    # / 2pi)), is in 2..64 exactly for 2pi < T_cap <= 2pi b, T_cap = T_train or 2 T_train.
    for method, lowest, highest in [("critical", 7, 62831), ("diffusion", 4, 31415)]:
        assert scale_rope(method, 8192, lowest, 64, 1e4)["d_crit"] == 2
        assert scale_rope(method, 8192, highest, 64, 1e4)["d_crit"] == 64
        for train_len in (1, 2, lowest - 1, highest + 1):  # negative dimensions, 0 (a division by 0)
            with pytest.raises(ValueError, match=f"T_train {train_len} gives the {method} rope a "
                                                 f"critical dimension of .* it needs a T_train in "
                                                 f"{lowest}..{highest}$"):
                scale_rope(method, 4096, train_len, 64, 1e4)  # refused even with nothing to extend
        assert scale_rope(method, 4096, 3, 64, 1e4, d_crit=32)["d_crit"] == 32  # an override
    assert scale_rope("ntk", 4096, 3, 64, 1e4)["lambda"] > 1  # a method without one does not care
    with pytest.raises(ValueError, match="outside 2..128; it needs another base$"):
        scale_rope("critical", 8192, 4096, 128, 1.001)  # no T_train has a turn in 2..128
    for method, d_crit in (("critical", 65), ("none", 0)):  # checked whatever the method
        with pytest.raises(ValueError, match=f"critical dimension of {d_crit} is outside 1..64"):
            scale_rope(method, 8192, 512, 64, 1e4, d_crit)
    for method in ("ntk", "critical", "diffusion"):  # was an OverflowError
        with pytest.raises(ValueError, match=f"the {method} rope at T_target 1000000000 scales "
                                             f"the base 1e\\+308 past the float range"):
            scale_rope(method, 10**9, 4096, 128, 1e308)
    with pytest.raises(ValueError, match="unknown rope method 'yarn'"):
        rope_lambda("yarn", 8192)


def test_rotate_half_layout_pairs_i_with_i_plus_half():
    d = 8
    x = torch.arange(1.0, d + 1)[None, None, None]  # (1, 1, 1, D)
    cos, sin = rope_tables(torch.tensor([[3]]), d, 100.0)
    q, _ = apply_rope(x, x, cos, sin)
    for i in range(d // 2):
        angle = 3 * 100.0 ** (-2 * i / d)
        a, b = x[0, 0, 0, i], x[0, 0, 0, i + d // 2]
        assert q[0, 0, 0, i] == pytest.approx(float(a * math.cos(angle) - b * math.sin(angle)), abs=1e-5)
        assert q[0, 0, 0, i + d // 2] == pytest.approx(float(b * math.cos(angle) + a * math.sin(angle)), abs=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_rope_is_bit_identical_to_the_reference_rotate_half_formula(dtype):
    # The reference computes q * cos + rotate_half(q) * sin in float32 and rounds once to the
    # model's dtype; apply_rope works per half to skip a copy and must round exactly the same.
    q = torch.randn(2, 300, 4, 64, generator=torch.Generator().manual_seed(0)).to(dtype)
    cos, sin = rope_tables(torch.arange(300)[None] * 997, 64, 5e5)
    assert cos.dtype == sin.dtype == torch.float32
    ours, _ = apply_rope(q, q, cos, sin)
    c, s, wide = cos.unsqueeze(-2), sin.unsqueeze(-2), q.float()
    assert ours.dtype == dtype
    assert torch.equal(ours, ((wide * c) + (rotate_half(wide) * s)).to(dtype))


@pytest.mark.parametrize("base,pos_scale", [(10000.0, 1.0), (500000.0, 1.0),
                                            (500000.0 * 561.94, 1.0), (500000.0, 0.125)])
def test_scores_depend_only_on_the_offset(base, pos_scale):
    g = torch.Generator().manual_seed(0)
    d = 64
    q = torch.randn(d, dtype=torch.float64, generator=g)
    k = torch.randn(d, dtype=torch.float64, generator=g)

    def score(m, n):
        cos, sin = rope_tables(torch.tensor([m, n]), d, base, pos_scale, dtype=torch.float64)
        qm, _ = apply_rope(q.view(1, 1, 1, d), q.view(1, 1, 1, d), cos[:1], sin[:1])
        kn, _ = apply_rope(k.view(1, 1, 1, d), k.view(1, 1, 1, d), cos[1:], sin[1:])
        return float((qm * kn).sum())

    for offset in (0, 1, 7, 300, 4095, -50, -4000):
        ref = score(100 + offset, 100)
        for shift in (0, 1, 1000, 60000, 131000):
            assert score(100 + offset + shift, 100 + shift) == pytest.approx(ref, abs=1e-9)
    # and it does depend on the offset: otherwise the test above would prove nothing
    assert abs(score(107, 100) - score(100, 100)) > 1e-3


def test_cli_prints_the_table_or_answers_bad_input_in_one_line(capsys):
    main(["--target-len", "8192", "131072"])
    out = capsys.readouterr().out
    for value in ("3.400", "3.531", "561.938", "280,968,986"):
        assert value in out
    for method in METHODS:
        assert f" {method} " in out
    for args, fragment in [
        (["--head-dim", "7"], "argument --head-dim: must be an even number above 2, got 7"),
        (["--target-len", "0"], "argument --target-len: must be a number of tokens in 1..2^53"),
        (["--target-len", "x"], "argument --target-len: invalid int value: 'x'"),
        (["--base", "nan"], "argument --base: must be a finite number above 1, got nan"),
        (["--d-crit", "0"], "argument --d-crit: must be a positive number, got 0"),
        (["--d-crit", "129"], "a critical dimension of 129 is outside 1..128 (head size)"),
        (["--train-len", "3"], "T_train 3 gives the critical rope a critical dimension of -6 "
                               "(head size 128, base 500000), outside 2..128; it needs a T_train "
                               "in 7..3141592"),
        (["--base", "1e308", "--target-len", "1000000000"], "past the float range"),
    ]:
        r = script("rope.py", *args)
        one_line_error(r, fragment)
        assert "usage:" not in r.stderr and r.stdout == ""  # refused before any line of the table
