"""The bench scripts as a careless user runs them (python -m bench.X): every bad flag is one
"error:" line and exit 2, before any measurement; a failed measurement process is one line too.
The measurements themselves are benchmarks, run by hand (docs/benchmarks.md)."""
import importlib
import os
import subprocess
import sys

import pytest

from bench.child import run_child

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}

CASES = [  # (script, flags, what the one line says)
    ("estimate_paper", ["--peak-tflops", "inf"], "--peak-tflops: must be above 0, got inf"),  # 0 hours
    ("estimate_paper", ["--mfu", "2"], "--mfu is a share of the peak, in (0, 1]; got 2.0"),
    ("bench_model", ["--preset", "nope"], "--preset: invalid choice: 'nope'"),
    ("bench_model", ["--lengths", "0"], "--lengths: must be above 0, got 0"),
    ("bench_model", ["--lengths", "-5"], "--lengths: must be above 0, got -5"),
    ("bench_model", ["--rounds", "0"], "--rounds: must be above 0, got 0"),  # ZeroDivisionError
    ("bench_train", ["--preset", "nope"], "--preset: invalid choice: 'nope'"),
    ("bench_train", ["--steps", "2", "--warmup-steps", "5"],
     "--warmup-steps 5 leaves none of --steps 2 to measure"),  # ZeroDivisionError
    ("bench_attention", ["--lengths", "128", "--doc-len", "0"], "--doc-len: must be above 0"),
    ("bench_attention", ["--lengths", "128", "--repeats", "0"], "--repeats: must be above 0"),
    ("bench_attention", ["--lengths", "-1"], "--lengths: must be above 0, got -1"),
    ("bench_attention", ["--lengths", "100", "--doc-len", "64"],
     "--lengths 100 must all be multiples of --doc-len 64"),  # a child's traceback
    ("bench_data", ["--mb", "0"], "--mb: must be above 0, got 0"),  # blamed a temporary folder
    ("bench_data", ["--mb", "1e12"], "--mb 1e+12 needs about"),
    ("bench_diffusion", ["--parts", "loss", "--vocab", "0"], "--vocab: must be above 0"),
    ("bench_diffusion", ["--parts", "loss", "--chunk-size", "0"], "--chunk-size: must be above 0"),
    ("bench_diffusion", ["--parts", "loss", "--naive-tokens", "64", "64"],
     "--naive-tokens needs at least two different lengths"),  # ZeroDivisionError
    ("bench_diffusion", ["--parts", "sampler", "--steps", "0"], "--steps: must be above 0"),
    ("bench_diffusion", ["--parts", "sampler", "--gen-length", "32", "--block-length", "16",
                         "--steps", "3"], "--steps 3 must be a multiple of the number of blocks 2"),
    ("bench_diffusion", ["--parts", "sampler", "--model", "{empty}"], "has no config.json"),
    ("bench_eval", ["--model", "{empty}"], "has no config.json"),  # a CheckpointError traceback
    ("bench_eval", ["--lengths", "10"], "--len 10 cannot hold the needle"),
    ("bench_eval_processes", ["--depths", "1"], "--depths must be in 2..101"),  # ZeroDivisionError
    ("bench_main_job", ["--tests=1"], "--tests: ignored explicit argument '1'"),
]


@pytest.mark.parametrize("name, flags, fragment", CASES,
                         ids=[f"{n}{' '.join(f)}" for n, f, _ in CASES])
def test_bad_flags_are_one_line_before_any_work(tmp_path, monkeypatch, capsys, name, flags,
                                                fragment):
    flags = [f.replace("{empty}", str(tmp_path)) for f in flags]  # an existing folder, no checkpoint
    monkeypatch.setattr(subprocess, "run", None)  # no measurement process may start
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "1")  # what tune_cpu_memory sets, undone after
    with pytest.raises(SystemExit) as e:
        importlib.import_module(f"bench.{name}").main(flags)
    captured = capsys.readouterr()
    assert e.value.code == 2, captured.err[-2000:]
    assert captured.err.count("\n") == 1 and captured.err.startswith("error: "), captured.err
    assert fragment in captured.err, captured.err
    assert "|" not in captured.out  # no table was started


@pytest.mark.parametrize("flags, fragment", [(["--rounds", "0"], "--rounds: must be above 0"),
                                             (["--preset", "nope"], "invalid choice: 'nope'")])
def test_as_a_user_runs_it(flags, fragment):
    r = subprocess.run([sys.executable, "-m", "bench.bench_model", *flags], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr[-2000:]
    assert r.stderr.startswith("error: ") and fragment in r.stderr and r.stdout == ""


def test_a_failed_measurement_is_one_line_with_its_log(capsys):
    child = "import sys; print('Traceback (most recent call last):\\nboom', file=sys.stderr); sys.exit(3)"
    with pytest.raises(SystemExit) as e:
        run_child([sys.executable, "-c", child], "the test case", ROOT)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith("error: the test case failed (exit 3): boom; its output is in ")
    log = err.rstrip().rsplit(" ", 1)[-1]
    with open(log) as f:
        assert "Traceback (most recent call last):\nboom" in f.read()  # the whole story is kept
    os.remove(log)
    said = "import sys; print('error: --len 5 is too short', file=sys.stderr); print('x'); sys.exit(2)"
    with pytest.raises(SystemExit):
        run_child([sys.executable, "-c", said], "evaluate.py", ROOT)
    err = capsys.readouterr().err
    assert err.startswith("error: evaluate.py failed (exit 2): --len 5 is too short; its output")
    os.remove(err.rstrip().rsplit(" ", 1)[-1])
    assert run_child([sys.executable, "-c", "print('fine')"], "ok", ROOT) == "fine\n"
