"""The bench scripts as a careless user runs them (python -m bench.X): a bad flag is one "error:"
line and exit 2 before any measurement starts; a failed measurement process is one line too."""
import importlib
import os
import subprocess
import sys

import pytest

from bench.child import run_child

CASES = [  # (script, flags, what the one line says): each script's own checks, and its parser
    ("estimate_paper", ["--mfu", "2"], "--mfu: must be above 0 and at most 1, got 2"),
    ("bench_model", ["--rounds", "0"], "--rounds: must be above 0, got 0"),  # ZeroDivisionError
    ("bench_train", ["--steps", "2", "--warmup-steps", "5"],
     "--warmup-steps 5 leaves none of --steps 2 to measure"),  # ZeroDivisionError
    ("bench_attention", ["--lengths", "100", "--doc-len", "64"],
     "--lengths 100 must all be multiples of --doc-len 64"),  # a child's traceback
    ("bench_data", ["--mb", "1e12"], "--mb: must be above 0 and at most"),  # memory
    ("bench_diffusion", ["--chunk-size", "0"], "--chunk-size: must be above 0, got 0"),
    ("bench_eval", ["--model", "{empty}"], "config.json"),  # a CheckpointError traceback
    ("bench_eval", ["--lengths", "10"], "--len 10 cannot hold the needle"),
    ("bench_eval_processes", ["--depths", "1"], "--depths: must be at least 2 and at most 101"),
    ("bench_main_job", ["--tests"], "unrecognized arguments: --tests"),
    ("bench_exit", ["--runs", "0"], "--runs: must be above 0, got 0"),
]


@pytest.mark.parametrize("name, flags, fragment", CASES,
                         ids=[f"{n}{' '.join(f)}" for n, f, _ in CASES])
def test_bad_flags_are_one_line_before_any_work(tmp_path, monkeypatch, capsys, name, flags,
                                                fragment):
    flags = [f.replace("{empty}", str(tmp_path)) for f in flags]  # an existing folder, no checkpoint
    for start in ("run", "Popen"):  # no measurement process may start
        monkeypatch.setattr(subprocess, start, None)
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "1")  # what tune_cpu_memory sets, undone after
    with pytest.raises(SystemExit) as e:
        importlib.import_module(f"bench.{name}").main(flags)
    captured = capsys.readouterr()
    assert e.value.code == 2, captured.err[-2000:]
    assert captured.err.count("\n") == 1 and captured.err.startswith("error: "), captured.err
    assert fragment in captured.err, captured.err
    assert "|" not in captured.out  # no table was started


@pytest.mark.parametrize("child, said, kept", [
    ("print('Traceback (most recent call last):\\nboom', file=sys.stderr); sys.exit(3)",
     "(exit 3): boom", "Traceback (most recent call last):\nboom"),
    ("print('error: --len 5 is short', file=sys.stderr); print('x'); sys.exit(2)",
     "(exit 2): --len 5 is short", "x\nerror: --len 5 is short")], ids=["crash", "error line"])
def test_a_failed_measurement_is_one_line_with_its_log(capsys, child, said, kept):
    assert run_child([sys.executable, "-c", "print('fine')"], "ok") == "fine\n"
    with pytest.raises(SystemExit) as e:
        run_child([sys.executable, "-c", "import sys; " + child], "the case")
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: the case failed {said}; its output is in "), err
    with open(err.rstrip().rsplit(" ", 1)[-1]) as f:
        assert kept in f.read()  # the whole story is kept
    os.remove(f.name)
