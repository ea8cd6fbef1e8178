import math

import pytest
import torch

from rope import (METHODS, apply_rope, check_scaling_args, critical_dim, main,
                  method_critical_dim, position_scale, rope_lambda, rope_tables, rotate_half,
                  scale_rope)
from scripts import one_line_error, script

LENGTHS = [8192, 16384, 24576, 32768]


def test_critical_dimension_of_llada():
    assert critical_dim(128, 500000.0, 4096) == 64
    # the doubled bidirectional capacity moves it to 70 (docs/paper.md section 2)
    assert critical_dim(128, 500000.0, 2 * 4096) == 70


@pytest.mark.parametrize("length,expected", zip(LENGTHS, [3.400, 13.599, 30.598, 54.396]))
def test_longllada_published_lambdas(length, expected):
    assert rope_lambda("critical", length) == pytest.approx(expected, abs=6e-4)


@pytest.mark.parametrize("length,expected", zip(LENGTHS + [65536, 131072],
                                                [3.531, 12.541, 26.322, 44.543, 158.21, 561.94]))
def test_diffusion_aware_published_lambdas(length, expected):
    assert rope_lambda("diffusion", length) == pytest.approx(expected, rel=2e-4)


def test_diffusion_aware_base_at_128k():
    s = scale_rope("diffusion", 131072, 4096, 128, 500000.0)
    assert s["rope_theta"] == pytest.approx(2.81e8, rel=1e-3)
    assert s["d_crit"] == 70 and s["position_scale"] == 1.0


def test_plain_ntk_formula():
    assert rope_lambda("ntk", 16384) == pytest.approx(4 ** (128 / 126))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("target", [1024, 4095, 4096])
def test_no_scaling_inside_the_training_window(method, target):
    assert rope_lambda(method, target) == 1.0
    assert position_scale(method, target, 4096) == 1.0


def test_lambda_never_shrinks_the_base():
    # just past T_train the critical formula dips below 1 (0.85 at 4097): clamped
    assert rope_lambda("critical", 4097) == 1.0
    assert rope_lambda("critical", 8192) > 1.0


def test_d_crit_override():
    assert rope_lambda("diffusion", 32768, d_crit=70) == rope_lambda("diffusion", 32768)
    lam73 = rope_lambda("diffusion", 32768, d_crit=73)
    assert lam73 == pytest.approx(500000.0 ** -1 * (2 * 32768 / (2 * math.pi)) ** (128 / 73))
    assert scale_rope("critical", 32768, 4096, 128, 5e5, d_crit=66)["d_crit"] == 66


def test_position_interpolation():
    assert rope_lambda("pi", 32768) == 1.0
    assert position_scale("pi", 32768, 4096) == 0.125
    cos, _ = rope_tables(torch.tensor([800]), 8, 10000.0, pos_scale=0.125)
    cos_ref, _ = rope_tables(torch.tensor([100]), 8, 10000.0)
    assert torch.allclose(cos, cos_ref)


def test_unknown_method_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown rope method 'yarn'"):
        rope_lambda("yarn", 8192)


def test_rotate_half_layout_pairs_i_with_i_plus_half():
    d = 8
    x = torch.arange(1.0, d + 1)[None, None, None]  # (1, 1, 1, D)
    pos = torch.tensor([[3]])
    cos, sin = rope_tables(pos, d, 100.0)
    q, _ = apply_rope(x, x, cos, sin)
    for i in range(d // 2):
        angle = 3 * 100.0 ** (-2 * i / d)
        a, b = x[0, 0, 0, i], x[0, 0, 0, i + d // 2]
        assert q[0, 0, 0, i] == pytest.approx(float(a * math.cos(angle) - b * math.sin(angle)), abs=1e-5)
        assert q[0, 0, 0, i + d // 2] == pytest.approx(float(b * math.cos(angle) + a * math.sin(angle)), abs=1e-5)
    assert torch.equal(rotate_half(torch.tensor([1.0, 2, 3, 4])), torch.tensor([-3.0, -4, 1, 2]))


def test_tables_are_float32_and_rotation_returns_input_dtype():
    cos, sin = rope_tables(torch.arange(5)[None], 16, 5e5)
    assert cos.dtype == sin.dtype == torch.float32
    q = torch.randn(1, 5, 2, 16, dtype=torch.bfloat16)
    q2, k2 = apply_rope(q, q, cos, sin)
    assert q2.dtype == torch.bfloat16
    # the rotation is done in float32 and rounded once: equal to rotating the float32 copy
    ref, _ = apply_rope(q.float(), q.float(), cos, sin)
    assert torch.equal(q2, ref.to(torch.bfloat16))


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


def test_cli_table(capsys):
    main(["--target-len", "8192", "131072"])
    out = capsys.readouterr().out
    for value in ("3.400", "3.531", "561.938", "280,968,986"):
        assert value in out
    for method in METHODS:
        assert f" {method} " in out


@pytest.mark.parametrize("args, message", [
    (["--head-dim", "7"], "--head-dim must be an even number above 2, got 7"),
    (["--train-len", "3"], "T_train 3 gives the critical rope a critical dimension of -6"),
    (["--base", "inf"], "--base must be a finite number above 1, got inf"),
    (["--target-len", "1000000000", "--base", "1e308"], "scales the base 1e+308 past the float"),
    (["--target-len", "x"], "argument --target-len: invalid int value: 'x'"),
])
def test_cli_errors_are_one_line_without_usage(capsys, args, message):
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [captured.err.splitlines()[0]]  # no usage block
    assert captured.err.startswith("error: ") and message in captured.err
    assert captured.out == ""  # refused before any row of the table


# The tiny preset's head (64) and base (10000): the critical dimension is 2 ceil(32 log_b(T_cap /
# 2pi)), in 2..64 exactly for 2pi < T_cap <= 2pi b, T_cap = T_train (critical), 2 T_train (diffusion).
@pytest.mark.parametrize("method, lowest, highest", [("critical", 7, 62831),
                                                     ("diffusion", 4, 31415)])
def test_a_critical_dimension_outside_2_to_the_head_size_is_refused(method, lowest, highest):
    assert method_critical_dim(method, lowest, 64, 1e4) == 2
    assert method_critical_dim(method, highest, 64, 1e4) == 64
    for train_len in (1, 2, lowest - 1, highest + 1):  # 1 and 2 gave negative dimensions
        with pytest.raises(ValueError, match=f"T_train {train_len} gives the {method} rope a "
                                             f"critical dimension of .* it needs a T_train in "
                                             f"{lowest}..{highest}"):
            scale_rope(method, 4096, train_len, 64, 1e4)
    # an override takes the formula's place, and methods without one do not care
    assert scale_rope(method, 4096, 3, 64, 1e4, d_crit=32)["d_crit"] == 32
    assert scale_rope("ntk", 4096, 3, 64, 1e4)["lambda"] > 1


def test_check_scaling_args_refuses_derived_values_before_any_work():
    check_scaling_args(8192, 512, 64, None, 1e4, "diffusion")  # the tiny model's own window
    with pytest.raises(ValueError, match="critical dimension of 0"):
        check_scaling_args(8192, 3, 64, None, 1e4, "diffusion")  # was a ZeroDivisionError
    with pytest.raises(ValueError, match="finite number above 1, got inf"):
        check_scaling_args(8192, 512, 64, None, float("inf"), "critical")
    with pytest.raises(ValueError, match="past the float range"):
        check_scaling_args(10**9, 4096, 128, None, 1e308, "critical")  # was an OverflowError
    with pytest.raises(ValueError, match="--d-crit must be in 1..64"):
        check_scaling_args(8192, 512, 64, 65, 1e4, "critical")
    check_scaling_args(8192, 3, 64, None)  # without base and method: the flags alone


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_rope_is_bit_identical_to_the_reference_rotate_half_formula(dtype):
    # The reference computes q * cos + rotate_half(q) * sin in float32; apply_rope works per
    # half to skip a copy and a negation, and must round exactly the same way.
    q = torch.randn(2, 300, 4, 64, generator=torch.Generator().manual_seed(0)).to(dtype)
    cos, sin = rope_tables(torch.arange(300)[None] * 997, 64, 5e5)
    ours, _ = apply_rope(q, q, cos, sin)
    c, s, wide = cos.unsqueeze(-2), sin.unsqueeze(-2), q.float()
    assert torch.equal(ours, ((wide * c) + (rotate_half(wide) * s)).to(dtype))


@pytest.mark.parametrize("args, fragment", [
    (["rope.py", "--target-len", "0"], "must be positive"),
    (["rope.py", "--base", "nan"], "--base must be a finite number above 1"),
    (["rope.py", "--base", "inf"], "--base must be a finite number above 1"),
    (["rope.py", "--train-len", "3"], "critical dimension of -6 (head size 128, base 500000)"),
    (["rope.py", "--base", "1e308", "--target-len", "1000000000"], "past the float range"),
])
def test_rope_cli_answers_bad_input_in_one_line(args, fragment):
    r = script(*args)
    one_line_error(r, fragment)
    assert "usage:" not in r.stderr and r.stdout == ""
