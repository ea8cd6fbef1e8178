"""Tests for bench/gpu_check.py on the CPU: --help and the clean refusal without CUDA, and the
logic of its checks on small tensors and fakes: tolerances (a wrong attention fails), FLOPs and
MFU, the memory plan it compares against, skipping what a missing package needs, the table."""
import importlib.abc
import importlib.machinery
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import masks
from bench import gpu_check as g
from harness import results
from harness.checkpoint import config_to_dict
from harness.tokenizer import TIKTOKEN_VOCAB, uses_tiktoken
from model import num_params, preset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Small heads so that the attention checks take a fraction of a second on the CPU.
SMALL = dict(d_model=64, n_heads=2, n_kv_heads=2, mlp_hidden_size=128, vocab_size=126464,
             embedding_size=126464)


def small(**kw) -> g.Settings:
    return g.Settings(device="cpu", seq_len=256, shape=SMALL, **kw)


def script(*args):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU, even on a machine that has one
    return subprocess.run([sys.executable, "-m", "bench.gpu_check", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120)


# ---------------------------------------------------------------------------------------------
# The command line: what CI runs on machines without a GPU.

def test_help_works_without_a_gpu():
    r = script("--help")
    assert r.returncode == 0, r.stderr
    for flag in ("--only", "--seq-len", "--layers", "--timeout", "--out"):
        assert flag in r.stdout
    for name in g.CHECKS:
        assert name in r.stdout


def test_refuses_without_cuda_in_one_line():
    r = script()
    lines = (r.stdout + r.stderr).strip().splitlines()
    assert r.returncode == 2
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: no CUDA device: gpu_check.py needs a GPU")
    assert "Traceback" not in r.stderr


def test_bad_flags_are_one_line_errors(capsys):
    with pytest.raises(SystemExit) as e:
        g.main(["--only", "bogus"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [err[0]] and err[0].startswith("error: --only bogus matches no check")
    with pytest.raises(SystemExit):
        g.main(["--seq-len", "100"])
    assert "pass 256 or more" in capsys.readouterr().err


def test_only_selects_by_name_or_prefix():
    assert g.select(["attention"]) == ["attention-bf16", "attention-fp32", "attention-no-flash"]
    assert g.select(["niah", "train-step"]) == ["train-step", "niah"]  # the table's order
    assert g.select(None) == list(g.CHECKS)
    with pytest.raises(ValueError, match="atten matches no check"):
        g.select(["atten"])  # a prefix must end at a '-'


# ---------------------------------------------------------------------------------------------
# Attention: the comparisons, and that a wrong result fails.

def test_packed_documents_have_different_lengths_and_fill_the_sequence():
    lens = g.packed_doc_lens(256, 16, seed=0)
    assert sum(lens) == 256 and len(lens) == 16 and lens[0] == 1 and min(lens) >= 1
    assert len(set(lens)) > 4  # buckets will need padding
    assert g.packed_doc_lens(256, 16, seed=1) != lens


def test_scaled_error():
    ref = torch.tensor([1.0, -2.0, 0.5])
    assert g.scaled_error(ref.clone(), ref) == 0.0
    assert g.scaled_error(ref + torch.tensor([0.0, 0.02, 0.0]), ref) == pytest.approx(0.01)
    nan = g.scaled_error(torch.tensor([1.0, float("nan"), 0.5]), ref)
    assert math.isnan(nan)
    assert not g.within({"forward": nan, "backward": 0.0}, g.TOLERANCE[torch.bfloat16])
    assert g.within({"forward": 1e-3, "backward": 1e-2}, g.TOLERANCE[torch.bfloat16])
    assert not g.within({"forward": 1e-3, "backward": 1e-2}, g.TOLERANCE[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adaptive_attention_agrees_on_the_cpu(dtype):
    row = g.adaptive_attention(small(), dtype, "sdpa", "x")
    assert row.status == "pass", row
    assert "attention (sdpa)" in row.numbers and "32 documents" in row.numbers


def test_a_wrong_attention_fails():
    # the classic bug: documents of a packed sequence attending to each other
    cross = dict(g.PATHS, attention=lambda q, k, v, plan, doc_lens: masks.sdpa(q, k, v))
    row = g.adaptive_attention(small(), torch.float32, "sdpa", "x", paths=cross)
    assert row.status == "fail" and "attention is outside tolerance" in row.note
    # ... and a kernel that returns NaN, in bf16
    nan = dict(g.PATHS, buckets=lambda q, k, v, plan, doc_lens: q * float("nan"))
    row = g.adaptive_attention(small(), torch.bfloat16, "sdpa", "x", paths=nan)
    assert row.status == "fail" and "buckets is outside tolerance" in row.note


def test_the_wrong_kernel_fails():
    row = g.adaptive_attention(small(), torch.bfloat16, "flash", "x")  # the CPU has no flash
    assert row.status == "fail"
    assert "masks.attention_kernel chose sdpa, expected flash" in row.note


def test_hiding_flash_attn_sends_bf16_to_sdpa(monkeypatch):
    cuda = torch.device("cuda")  # attention_kernel only looks at the device type
    monkeypatch.setattr(masks, "_flash", object())  # as if flash-attn had been imported
    monkeypatch.setitem(sys.modules, "flash_attn", "restored after the test")
    assert masks.attention_kernel(cuda, torch.bfloat16) == "flash"
    g.hide_flash_attn()
    assert sys.modules["flash_attn"] is None
    assert masks.flash_attn_available() is False
    assert masks.attention_kernel(cuda, torch.bfloat16) == "sdpa"
    assert masks.attention_kernel(cuda, torch.float32) == "sdpa"


# ---------------------------------------------------------------------------------------------
# The training step: the model, its FLOPs, MFU, and the memory plan it is held to.

def test_cut_down_model_keeps_the_8b_shapes_and_fits_cl100k():
    c = g.cut_down_config(g.Settings(layers=4))
    assert (c.d_model, c.n_heads, c.mlp_hidden_size, c.embedding_size, c.n_layers) == \
        (4096, 32, 12288, 126464, 4)
    assert c.mask_token_id == TIKTOKEN_VOCAB + 1 and c.eos_token_id == TIKTOKEN_VOCAB
    assert uses_tiktoken(config_to_dict(c)) and config_to_dict(c)["tokenizer"] == "cl100k_base"
    assert c.embedding_size >= TIKTOKEN_VOCAB + 2


def test_flops_match_the_evaluation_estimate_and_count_documents():
    c = g.cut_down_config(g.Settings(layers=4))
    # one document: the same FLOPs as results.forward_flops, which evaluate.py estimates with
    assert g.forward_flops(c, [[1000]], 37) == results.forward_flops(c, 1000, 1000, 37)
    # two documents: attention shrinks by 4 d (1000^2 - 2 x 500^2) per layer, nothing else
    saved = g.forward_flops(c, [[1000]], 37) - g.forward_flops(c, [[500, 500]], 37)
    assert saved == c.n_layers * 4 * c.d_model * (1000**2 - 2 * 500**2)
    assert g.training_flops(c, [[500, 500]], 37) == 3 * g.forward_flops(c, [[500, 500]], 37)
    # 8B shapes at 64K in 16 documents of 4K, half the tokens masked: about 8 PFLOP a step
    step = g.training_flops(c, [[4096] * 16], 32768)
    block = 2 * (4 * 4096**2 + 3 * 4096 * 12288) * 65536 + 4 * 4096 * 16 * 4096**2
    assert step == 3 * (4 * block + 2 * 4096 * 126464 * 32768)


def test_mfu_and_the_matmul_peak():
    assert g.mfu(1e15, 2.0, 1e15) == 0.5
    assert g.mfu(3e12, 1.0, 1e12) == 3.0
    peak = g.matmul_flops_per_second(torch.device("cpu"), 64, torch.float32, repeats=2)
    assert math.isfinite(peak) and peak > 1e6


def test_planned_memory_reads_the_printed_plan():
    # the table of docs/benchmarks.md for LLaDA-8B at 64K tokens
    plan = g.planned_memory(preset("llada-8b"), 65536)
    assert plan == {"sharded": 119.4, "gathered": 1.8, "activations": 28.0, "loss": 4.4,
                    "total": 153.6}
    assert g.planned_memory(preset("llada-8b"), 65536, gpus=8)["total"] == 49.1
    # the cut-down model: the same terms computed here from runtime.memory_plan's docstring
    c = g.cut_down_config(g.Settings(layers=4))
    plan = g.planned_memory(c, 65536)
    gib, L, d, m = 2**30, 65536, 4096, 12288
    sharded = 16 * num_params(c) / gib
    acts = (2 * L * d * 4 + 2 * L * (12 * d + 4 * m)) / gib
    assert plan["sharded"] == pytest.approx(sharded, abs=0.05)
    assert plan["activations"] == pytest.approx(acts, abs=0.05)
    assert plan["total"] == pytest.approx(sharded + acts + plan["gathered"] + plan["loss"], abs=0.2)
    assert 40 < plan["total"] < 60  # fits an 80 GB GPU with room for the measured overheads
    with pytest.raises(ValueError, match="no row for 3"):
        g.planned_memory(c, 65536, gpus=3)


def test_judge_train():
    plan = {"total": 40.0}
    assert g.judge_train(2.5, 43.9, plan) == ("pass", "")
    status, note = g.judge_train(2.5, 44.5, plan)
    assert status == "fail" and "under-predicts" in note
    assert g.judge_train(float("nan"), 30.0, plan)[0] == "fail"
    assert g.judge_train(2.5, float("nan"), plan)[0] == "fail"


# ---------------------------------------------------------------------------------------------
# torchrun and evaluate.py: the verdicts on what the subprocesses wrote.

def test_compare_losses():
    ref = [{"step": s, "loss": l} for s, l in zip((1, 2, 3, 4), (10.9, 10.7, 10.4, 10.1))]
    assert g.compare_losses(ref, [dict(r) for r in ref]) == (True, 0.0, "")
    close = [dict(r, loss=r["loss"] * (1 + 1e-6)) for r in ref]
    assert g.compare_losses(ref, close)[0]
    off = [dict(r) for r in ref]
    off[3]["loss"] = 10.11  # the optimizer state was not restored: the fourth step drifts
    ok, worst, note = g.compare_losses(ref, off)
    assert not ok and worst == pytest.approx(0.01 / 10.1) and "losses differ" in note
    ok, _, note = g.compare_losses(ref, ref[:2] + ref[3:])  # a step lost in the resume
    assert not ok and "logged steps differ" in note
    assert not g.compare_losses([], [])[0]


def test_judge_niah():
    runs = {"exact": {"code": 0, "error": "", "seconds": 50.0},
            "prompt cache": {"code": 0, "error": "", "seconds": 5.0}}
    assert g.judge_niah(runs) == ("pass", "")
    slow = {**runs, "prompt cache": {"code": 0, "error": "", "seconds": 60.0}}
    assert g.judge_niah(slow)[0] == "fail"
    broken = {**runs, "exact": {"code": 2, "error": "error: out of memory", "seconds": None}}
    status, note = g.judge_niah(broken)
    assert status == "fail" and "exact: evaluate.py exited 2: error: out of memory" in note


# ---------------------------------------------------------------------------------------------
# Running checks: skips, child processes, the table.

def test_a_missing_package_skips_its_check_without_running_it():
    ran = []
    checks = {"needs-pkg": g.Check(None, ("pkg",)), "plain": g.Check(None, ())}
    requirements = {"pkg": (lambda: False, "pkg is not installed (pip install pkg)")}

    def run_one(name):
        ran.append(name)
        return g.Row(name, "pass")

    rows = g.run_checks(list(checks), run_one, requirements, checks)
    assert ran == ["plain"]
    assert (rows[0].status, rows[0].note) == ("skip", "pkg is not installed (pip install pkg)")
    assert g.exit_code(rows) == 0  # a skip is not a failure
    requirements["pkg"] = (lambda: True, "")
    assert [r.status for r in g.run_checks(list(checks), run_one, requirements, checks)] == \
        ["pass", "pass"]


class LoudLoader(importlib.abc.Loader):
    """An installed flash-attn as far as the finders can tell, whose import fails the test."""
    def create_module(self, spec):
        raise AssertionError("flash_attn was imported")

    def exec_module(self, module):
        raise AssertionError("flash_attn was imported")


class InstalledFlashAttn(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "flash_attn":
            return importlib.machinery.ModuleSpec("flash_attn", LoudLoader())
        return None


@pytest.mark.parametrize("installed", [True, False])
def test_flash_attn_is_probed_without_importing_it(monkeypatch, installed):
    if installed:
        monkeypatch.delitem(sys.modules, "flash_attn", raising=False)
        monkeypatch.setattr(sys, "meta_path", [InstalledFlashAttn(), *sys.meta_path])
    else:
        monkeypatch.setitem(sys.modules, "flash_attn", None)  # what hide_flash_attn does
    reason = g.skip_reason(g.CHECKS["attention-bf16"].needs)
    assert reason == (None if installed else "flash-attn is not installed (pip install flash-attn)")
    assert sys.modules.get("flash_attn") is None  # found or not, never imported
    assert g.skip_reason(g.CHECKS["attention-fp32"].needs) is None


def test_run_check(tmp_path):
    row_file, log = str(tmp_path / "row.json"), str(tmp_path / "log")
    write = (f"import json; print('working'); json.dump({{'name': 'x', 'status': 'pass', "
             f"'numbers': '1.0 s', 'note': ''}}, open({row_file!r}, 'w'))")
    row = g.run_check([sys.executable, "-c", write], row_file, log, 30, "x")
    assert (row.status, row.numbers) == ("pass", "1.0 s")
    os.remove(row_file)
    row = g.run_check([sys.executable, "-c", "print('boom'); raise SystemExit(3)"], row_file, log,
                      30, "x")
    assert row.status == "fail" and "exited 3" in row.note and "boom" in row.note
    row = g.run_check([sys.executable, "-c", "import time; time.sleep(60)"], row_file, log, 1, "x")
    assert row.status == "fail" and "timed out after 1 s" in row.note


def test_markdown_table():
    rows = [g.Row("attention-bf16", "pass", "error 1e-3 | 2e-3", "", 12.3),
            g.Row("train-step", "fail", "peak 50 GiB", "plan\nunder-predicts", 40.0),
            g.Row("niah", "skip", "", "tiktoken is not installed", None)]
    table = g.markdown_table(rows).splitlines()
    assert table[0] == "| check | status | numbers | note | time (s) |"
    cells = [line.replace("\\|", "").count("|") for line in table]
    assert len(table) == 5 and len(set(cells)) == 1  # escaped pipes and newlines keep 5 columns
    assert "| train-step | FAIL |" in table[3] and "plan under-predicts" in table[3]
    assert table[2].endswith("| 12 |") and table[4].endswith("|  |")
    assert g.summary(rows) == "1 passed, 1 failed, 1 skipped"
    assert g.exit_code(rows) == 1
    assert g.exit_code(rows[:1] + rows[2:]) == 0


def test_a_child_writes_its_row_even_when_the_check_raises(tmp_path, monkeypatch):
    def broken(s):
        raise RuntimeError("CUDA error: an illegal memory access\nsecond line")
    monkeypatch.setitem(g.CHECKS, "attention-fp32", g.Check(broken))
    row_file = str(tmp_path / "row.json")
    g.child("attention-fp32", small(), row_file, 60)
    with open(row_file) as f:
        row = json.load(f)
    assert row["status"] == "fail"
    assert row["note"] == "RuntimeError: CUDA error: an illegal memory access"


def test_the_no_flash_check_hides_flash_attn_and_passes(monkeypatch):
    monkeypatch.setattr(masks, "_flash", object())  # as if flash-attn had been imported
    monkeypatch.setitem(sys.modules, "flash_attn", "restored after the test")
    row = g.check_attention_no_flash(small())
    assert row.name == "attention-no-flash" and row.status == "pass", row
    assert masks.flash_attn_available() is False  # the check ran with flash-attn hidden


def test_the_eval_processes_check_passes_on_the_cpu_with_two_processes():
    """The check a GPU node runs, here with two CPU processes (gloo): it must find both ranks
    at work and every cell computed once."""
    row = g.check_eval_processes(small(), timeout=300)
    assert row.status == "pass", row.note
    assert "2 processes, 11 cells on cpu" in row.numbers
