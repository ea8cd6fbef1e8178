"""Bad input and faults, as a user meets them: each case runs the script in a subprocess and
asserts a one-line error (no traceback), the exit code, and that nothing was corrupted, lost
or run (a checkpoint crafted to run code, folders train.py did not write)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

import scripts
from harness.checkpoint import find_training_checkpoint, from_pretrained
from harness.files import lock_folder
from harness.prepare import load_corpus
from harness.tokenizer import tiktoken_tokenizer
from tiny import plant_code, tiny_checkpoint, write_books

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def script(name: str, *args, check_code: int | None = None, env: dict | None = None
           ) -> subprocess.CompletedProcess:
    """The script in a process of its own, as a user runs it (forked: tests/scripts.py)."""
    r = scripts.run(name, *args, env=env)
    if check_code is not None:
        assert r.returncode == check_code, r.stderr[-2000:]
    return r


def one_line_error(r, *fragments: str, code: int = 2) -> str:
    """The run failed with `code` and said so in one line containing every fragment."""
    assert r.returncode == code, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, r.stderr[-2000:]
    for f in fragments:
        assert f in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def books(tmp_path_factory):
    return write_books(tmp_path_factory.mktemp("books"), seed=3, n_docs=60)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def train_flags(books, cache, out, *extra):
    return ["--data", books, "--cache-dir", cache, "--out", str(out), "--seq-len", "128",
            "--warmup", "1", "--log-every", "1", *extra]


def strict_log(out) -> list[dict]:
    """log.jsonl as strict JSON: NaN and Infinity are not JSON and fail here."""
    def refuse(name):
        raise ValueError(f"{name} in log.jsonl")
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line, parse_constant=refuse) for line in f]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, books, cache):
    """A finished 2-step run to resume, copy and damage."""
    out = tmp_path_factory.mktemp("trained") / "run"
    script("train.py", *train_flags(books, cache, out, "--max-steps", "2"), check_code=0)
    return out


def copy_run(trained, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(trained, dst)
    return dst


def snapshot(folder) -> dict:
    """Every entry under `folder` with what would change if it were rewritten, moved or
    deleted (named pipes are listed, never opened); not .lock, which each run rewrites."""
    return {str(p.relative_to(folder)): (p.lstat().st_ino, p.lstat().st_size,
                                         p.lstat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.name != ".lock"}


# ---------------------------------------------------------------------------------------------
# train.py: flags

@pytest.mark.parametrize("flag, value, fragment", [
    ("--lr", "nan", "--lr: must be above 0"), ("--lr", "0", "--lr: must be above 0"),
    ("--lr", "-1e-3", "--lr: must be above 0"), ("--grad-clip", "-1", "--grad-clip: must be at least 0"),
    ("--weight-decay", "-1", "--weight-decay: must be at least 0"),
    ("--target-len", "-4", "--target-len: must be above 0"),
    ("--train-len", "-1", "--train-len: must be above 0"), ("--seq-len", "0", "--seq-len"),
    ("--warmup", "-2", "--warmup"), ("--max-steps", "two", "--max-steps: 'two' is not an integer"),
    ("--d-crit", "65", "--d-crit must be in 1..64"), ("--mask", "causal", "invalid choice"),
    ("--lr", "1e308", "--lr: must be above 0 and at most 1, got 1e308"),
])
def test_train_flags_are_checked_before_any_work(tmp_path, books, cache, flag, value, fragment):
    out = tmp_path / "out"
    r = script("train.py", *train_flags(books, cache, out, "--max-steps", "1", f"{flag}={value}"))
    one_line_error(r, fragment)
    assert not out.exists()


def test_a_non_finite_loss_stops_the_run_before_it_updates_or_saves(tmp_path, books, cache):
    init = tiny_checkpoint(tmp_path / "huge", scale=1e20)[0]  # finite, but attention overflows
    out = tmp_path / "out"
    r = script("train.py", *train_flags(books, cache, out, "--init", init, "--max-steps", "3",
                                        "--save-every", "1"))
    one_line_error(r, "step 1: the loss is nan", "without updating or saving",
                   "no checkpoint was saved yet", "then run again", code=1)
    assert "--resume" not in r.stderr  # there is nothing to resume
    assert strict_log(out) == [] and not (out / "checkpoint").exists()


def test_an_update_that_makes_weights_non_finite_is_never_saved(tmp_path, trained, books, cache):
    out = copy_run(trained, tmp_path)  # saved at step 2
    r = script("train.py", *train_flags(books, cache, out, "--max-steps", "4", "--save-every", "1",
                                        "--resume", "--weight-decay", "1e300", "--allow-changes"))
    one_line_error(r, "step 3: the update made weights non-finite; not saved",
                   "the last checkpoint is intact", "then --resume --allow-changes", code=1)
    assert [rec["step"] for rec in strict_log(out)] == [1, 2, 3]  # step 3's loss was finite
    assert json.loads((out / "checkpoint" / "train_state.json").read_text())["step"] == 2
    assert all(torch.isfinite(p).all() for p in from_pretrained(str(out / "checkpoint")).parameters())


def test_resume_refuses_other_settings_unless_allowed(tmp_path, trained, books, cache):
    out = copy_run(trained, tmp_path)
    r = script("train.py", *train_flags(books, cache, out, "--max-steps", "3", "--resume",
                                        "--seq-len", "256", "--lr", "5e-4"))
    one_line_error(r, "--seq-len 128 -> 256", "--lr None -> 0.0005", "--allow-changes")
    assert len(strict_log(out)) == 2  # nothing written by the refused run
    r = script("train.py", *train_flags(books, cache, out, "--max-steps", "3", "--resume"))
    assert r.returncode == 0 and [x["step"] for x in strict_log(out)] == [1, 2, 3]
    r = script("train.py", *train_flags(books, cache, out, "--max-steps", "4", "--resume",
                                        "--lr", "5e-4", "--allow-changes"))
    assert r.returncode == 0 and strict_log(out)[-1]["lr"] == 5e-4


def test_a_kill_between_the_two_renames_of_a_save_resumes_from_the_previous_checkpoint(
        tmp_path, trained, books, cache):
    out = copy_run(trained, tmp_path)
    ckpt = out / "checkpoint"
    # The state after the first rename (checkpoint -> checkpoint.old) of the next save, with
    # its new checkpoint.tmp still beside it.
    os.replace(ckpt, str(ckpt) + ".old")
    shutil.copytree(str(ckpt) + ".old", str(ckpt) + ".tmp")
    r = script("train.py", *train_flags(books, cache, out, "--max-steps", "3", "--resume"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "delete" not in r.stdout + r.stderr
    assert [x["step"] for x in strict_log(out)] == [1, 2, 3]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint"]


def test_a_cut_off_last_log_line_is_dropped_on_resume(tmp_path, trained, books, cache):
    out = copy_run(trained, tmp_path)
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 4.')  # the line being written when the run was killed
    r = script("train.py", *train_flags(books, cache, out, "--max-steps", "3", "--resume"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert [x["step"] for x in strict_log(out)] == [1, 2, 3]


def edit_json(path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("damage, fragment", [
    ("state-json", "train_state.json is not valid JSON"),
    ("state-fields", "train_state.json is not a training state"),
    ("step-negative", "train_state.json: step -3 is not a step count"),  # emptied the log
    ("step-bool", "train_state.json: step True is not a step count"),  # resumed from step 1
    ("flag-string", "train_state.json: --seq-len is saved as '128', which it cannot be"),
    ("shard-truncated", "model.safetensors is damaged"),
    ("shard-empty", "model.safetensors is damaged"),
    ("config-json", "config.json is not valid JSON"),
    ("config-nan", "config.json: rope_theta is NaN, it must be a finite number above 1"),
    ("optimizer-truncated", "train_state cannot be read (RuntimeError: PytorchStreamReader"),
    ("log-list", "log.jsonl line 3: not a JSON object"),
    ("log-string-step", "log.jsonl line 3: not a step record (step 'x')"),
    ("log-pipe", "log.jsonl is a named pipe, not a regular file"),  # blocked forever
])
def test_a_damaged_checkpoint_or_log_is_named_in_one_line_and_nothing_is_written(
        tmp_path, trained, books, cache, damage, fragment):
    out = copy_run(trained, tmp_path)
    ckpt = out / "checkpoint"
    if damage == "state-json":
        (ckpt / "train_state.json").write_text('{"step": 2, "con')
    elif damage == "state-fields":
        (ckpt / "train_state.json").write_text('{"steps": 2}')
    elif damage.startswith("step-"):
        edit_json(ckpt / "train_state.json",
                  lambda s: s.update(step=-3 if damage == "step-negative" else True))
    elif damage == "flag-string":
        edit_json(ckpt / "train_state.json", lambda s: s["config"].update(seq_len="128"))
    elif damage == "shard-truncated":
        data = (ckpt / "model.safetensors").read_bytes()
        (ckpt / "model.safetensors").write_bytes(data[:len(data) // 2])
    elif damage == "shard-empty":
        (ckpt / "model.safetensors").write_bytes(b"")
    elif damage == "config-json":
        (ckpt / "config.json").write_text("{")
    elif damage == "config-nan":
        edit_json(ckpt / "config.json", lambda c: c.update(rope_theta=float("nan")))
    elif damage == "optimizer-truncated":  # CheckpointException, a BaseException
        os.truncate(ckpt / "train_state" / "__0_0.distcp", 100_000)
    elif damage == "log-pipe":
        os.remove(out / "log.jsonl")
        os.mkfifo(out / "log.jsonl")
    else:  # a complete line that is not a step record, before the last one
        with open(out / "log.jsonl", "a") as f:
            f.write(('[1, 2]' if damage == "log-list" else '{"step": "x"}') + '\n{"step": 1}\n')
    before = snapshot(out)
    r = script("train.py", *train_flags(books, cache, out, "--max-steps", "3", "--resume"))
    one_line_error(r, fragment)
    assert snapshot(out) == before


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
@pytest.mark.parametrize("vector", ["metadata", "plain-value"])
def test_resuming_a_checkpoint_crafted_to_run_code_runs_nothing(tmp_path, trained, books, cache,
                                                                 vector):
    """Both ways torch.distributed.checkpoint unpickles: train_state/.metadata (pickle.load),
    and each non-tensor value of the optimizer (torch.load with weights_only=False)."""
    out = copy_run(trained, tmp_path)
    state = out / "checkpoint" / "train_state"
    marker = tmp_path / "ran"
    model = opt = None
    if vector == "plain-value":  # the run's own optimizer state, saved again with one value replaced
        import train
        from harness.checkpoint import load_optimizer_state
        model = from_pretrained(str(out / "checkpoint"))
        opt = train.make_optimizer(model, train.TrainConfig(), 1e-3)
        load_optimizer_state(str(out / "checkpoint"), model, opt)
    plant_code(state, vector, marker, model, opt)
    assert not marker.exists()
    before = snapshot(out)
    r = script("train.py", *train_flags(books, cache, out, "--max-steps", "3", "--resume"))
    one_line_error(r, "train_state cannot be read", "not run", "resume from a copy")
    assert not marker.exists() and snapshot(out) == before


def test_out_that_is_a_file_or_cannot_be_created(tmp_path, books, cache):
    (tmp_path / "file").write_text("x")
    one_line_error(script("train.py", *train_flags(books, cache, tmp_path / "file", "--max-steps", "1")),
                   "is a file")
    r = script("train.py", *train_flags(books, cache, "/proc/ultrallada-out", "--max-steps", "1"))
    one_line_error(r, "/proc/ultrallada-out")


@pytest.mark.parametrize("case, fragment", [
    ("foreign-checkpoint", "checkpoint was not written here (it is not a folder holding "
                           "train_state.json); move it away or pass another --out"),
    ("foreign-log", "log.jsonl line 1: not a step record (step None)"),
    ("init-inside-out", "model lies inside"),
    ("cache-inside-out", "cache lies inside"),
    ("foreign-old", "checkpoint.old was not written here"),
    ("file-as-tmp", "checkpoint.tmp was not written here"),
    ("linked-checkpoint", "checkpoint is a symbolic link"),
    ("out-not-utf8", "is not valid UTF-8"),
])
def test_what_train_py_did_not_write_is_refused_up_front_and_kept(tmp_path, books, cache, case,
                                                                  fragment):
    """A new run in an --out that holds someone else's files: refused before any step (a save
    would have replaced or deleted them), and every file is left as it was."""
    out = tmp_path / "out"
    out.mkdir()
    extra = []
    if case == "foreign-checkpoint":  # e.g. notes, or an exported model
        (out / "checkpoint").mkdir()
        (out / "checkpoint" / "notes.txt").write_text("mine")
    elif case == "foreign-log":
        (out / "log.jsonl").write_text('{"my": "log"}\n')
    elif case == "init-inside-out":  # training from the model it would overwrite
        extra = ["--init", tiny_checkpoint(out / "checkpoint" / "model")[0]]
    elif case == "cache-inside-out":  # the first save would refuse the folder the cache made
        extra = ["--cache-dir", str(out / "checkpoint" / "cache")]
    elif case == "foreign-old":  # a save would rename it back as a checkpoint, then delete it
        (out / "checkpoint.old").mkdir()
        (out / "checkpoint.old" / "precious.txt").write_text("mine")
    elif case == "file-as-tmp":  # the first save would fail, its steps lost
        (out / "checkpoint.tmp").write_text("mine")
    elif case == "linked-checkpoint":  # a save would replace the link, not write where it points
        (tmp_path / "elsewhere").mkdir()
        os.symlink(tmp_path / "elsewhere", out / "checkpoint")
    else:  # safetensors could never open the checkpoint written there
        out = tmp_path / os.fsdecode(b"bad\xffname")
    before = snapshot(tmp_path)
    r = script("train.py", *train_flags(books, cache, out, "--max-steps", "1", *extra))
    one_line_error(r, fragment)
    assert snapshot(tmp_path) == before


def test_a_results_folder_put_inside_a_checkpoint_survives_the_next_save(tmp_path, trained, books,
                                                                         cache):
    out = copy_run(trained, tmp_path)
    evals = out / "checkpoint" / "evals"  # e.g. evaluate.py --results OUT/checkpoint/evals
    evals.mkdir()
    (evals / "niah_len512.json").write_text('{"score": 100}')
    r = script("train.py", *train_flags(books, cache, out, "--max-steps", "3", "--resume"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((out / "checkpoint" / "train_state.json").read_text())["step"] == 3
    assert (evals / "niah_len512.json").read_text() == '{"score": 100}'
    assert sorted(p.name for p in out.iterdir()) == [".lock", "checkpoint", "log.jsonl"]


@pytest.mark.parametrize("mask, file_mode, folder_mode", [(0o022, 0o644, 0o755),
                                                          (0o077, 0o600, 0o700)])
def test_a_run_writes_with_the_users_umask(tmp_path, books, mask, file_mode, folder_mode):
    """Checkpoints readable as a Hugging Face one's under 022 (a colleague can load them), and
    nothing published under 077: the token cache, the checkpoint and the log alike."""
    out, cache = tmp_path / "out", tmp_path / "cache"
    r = subprocess.run([sys.executable, "train.py", *train_flags(books, cache, out, "--max-steps",
                                                                 "1")],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600,
                       preexec_fn=lambda: os.umask(mask))
    assert r.returncode == 0, r.stderr[-2000:]
    modes = {p: p.stat().st_mode & 0o777 for p in [*out.rglob("*"), *cache.rglob("*")]}
    assert (out / "checkpoint" / "model.safetensors") in modes and (out / "log.jsonl") in modes
    assert {str(p): m for p, m in modes.items()} == {
        str(p): folder_mode if p.is_dir() else file_mode for p in modes}


@pytest.mark.parametrize("env, fragment", [
    ({"WORLD_SIZE": "abc"}, "WORLD_SIZE='abc' in the environment is not a process count"),
    ({"RANK": "1"}, "RANK=1 with WORLD_SIZE=unset in the environment names no process"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2 with WORLD_SIZE=2"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "x"}, "LOCAL_RANK='x' with RANK=0"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}, "LOCAL_RANK='1' with RANK=0"),
])
def test_a_stale_torchrun_environment_is_one_line(tmp_path, books, cache, tiny_ckpt, env,
                                                  fragment):
    r = script("train.py", *train_flags(books, cache, tmp_path / "out", "--max-steps", "1"),
               env=env)
    one_line_error(r, fragment)
    assert not (tmp_path / "out").exists()
    r = script("evaluate.py", "--model", tiny_ckpt, "--len", "256", "--results",
               str(tmp_path / "results"), env=env)
    one_line_error(r, fragment)
    assert not (tmp_path / "results").exists()


def test_a_rendezvous_says_what_it_waits_for(tmp_path, books, cache):
    """WORLD_SIZE=2 with no second process: the wait is said before it starts (it would
    otherwise be 30 minutes of silence)."""
    env = {**ENV, "WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29577"}
    p = subprocess.Popen([sys.executable, "train.py", *train_flags(books, cache, tmp_path / "out",
                                                                   "--max-steps", "1")],
                         cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    try:
        line = p.stderr.readline()  # blocks until the first line; the test's time limit bounds it
    finally:
        p.kill()
        p.wait()
    assert line.startswith("waiting for the other 1 process(es) at 127.0.0.1:29577 to start "
                           "(torchrun rendezvous, timeout ") and line.endswith(" min)\n")


@pytest.mark.parametrize("args, fragment", [
    (["--memory-plan", "--init", "/no/such/llada"], "checkpoint directory /no/such/llada does not exist"),
    (["--memory-plan", "--init", "ZEROHEADS"], "config.json: n_heads is 0"),
    (["--init", "ZEROTHETA"], "config.json: rope_theta is 0.0, it must be a finite number above 1"),
])
def test_an_impossible_init_is_refused_when_its_config_is_read(tmp_path, books, cache, args,
                                                                fragment):
    init = tiny_checkpoint(tmp_path / "init")[0]
    path = tmp_path / "init" / "config.json"
    if "ZEROHEADS" in args:
        edit_json(path, lambda c: c.update(n_heads=0))
    else:
        edit_json(path, lambda c: c.update(rope_theta=0.0))
    args = [init if a in ("ZEROHEADS", "ZEROTHETA") else a for a in args]
    r = script("train.py", *train_flags(books, cache, tmp_path / "out", "--max-steps", "1", *args))
    one_line_error(r, fragment)
    assert not (tmp_path / "out").exists()


def test_an_output_folder_has_one_writer_and_a_stale_lock_does_not_block(tmp_path, books, cache):
    out = tmp_path / "out"
    held = lock_folder(str(out))  # another process's run, as far as train.py can tell
    try:
        r = script("train.py", *train_flags(books, cache, out, "--max-steps", "1"))
        one_line_error(r, "is in use by process", "another")
        assert not (out / "log.jsonl").exists()
    finally:
        held.close()
    # a .lock left by a killed run (its content says who, but nobody holds it)
    assert (out / ".lock").exists()
    script("train.py", *train_flags(books, cache, out, "--max-steps", "1"), check_code=0)


def test_a_second_interrupt_exits_at_once_and_leaves_no_half_checkpoint(tmp_path, books, cache):
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "train.py", *train_flags(books, cache, out, "--max-steps",
                                                                   "100000", "--save-every", "100000")],
                         cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out / "log.jsonl").exists() or not (out / "log.jsonl").read_text():
        assert p.poll() is None and time.time() < deadline
        time.sleep(0.02)
    p.send_signal(signal.SIGINT)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 130 and "Traceback" not in err
    # Whether the second signal cut the save short (the order of the two is the machine's:
    # test_runtime.py tests it deterministically) or came after it, the next run continues.
    saved = find_training_checkpoint(str(out / "checkpoint"))
    assert saved or not (out / "checkpoint").exists()
    steps = json.loads((out / "checkpoint" / "train_state.json").read_text())["step"] if saved else 0
    r = script("train.py", *train_flags(books, cache, out, "--max-steps", str(steps + 1),
                                        *(["--resume"] if saved else [])))
    assert r.returncode == 0, r.stderr[-2000:]
    assert [rec["step"] for rec in strict_log(out)] == list(range(1, steps + 2))
    assert sorted(p.name for p in out.iterdir()) == [".lock", "checkpoint", "log.jsonl"]


# ---------------------------------------------------------------------------------------------
# evaluate.py

@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")[0]


@pytest.mark.parametrize("args, fragment", [
    (["--len", "-1"], "--len: must be above 0"),
    (["--len", "512", "--task", "sudoku"], "invalid choice: 'sudoku'"),
    (["--len", "512", "--d-crit", "8"], "--train-len and --d-crit only apply with --rope"),
    (["--len", "512", "--rope", "diffusion", "--d-crit", "99"], "--d-crit must be in 1..16"),
    (["--len", "512", "--depths", "120"], "--depths must lie in 0..100"),
    (["--len", "512", "--gen-length", "30"], "multiple of --block-length"),
    (["--len", "100", "--task", "ppl"], "not a multiple of --chunk-size"),
    (["--len", "512", "--device", "tpu"], "--device tpu"),
    (["--task", "needlebench", "--len", "8192"], "needlebench needs --needles FILE"),
    (["--task", "ruler", "--len", "100"], "--len 100 is too small for RULER"),
    (["--task", "ruler", "--len", "4096", "--ruler-tasks", "qa_squad"], "qa_squad needs --squad FILE"),
    (["--task", "longbench"], "LongBench needs --data DIR"),
    (["--task", "longbench", "--len", "4096"], "--len does not apply to longbench"),
    (["--task", "longbench", "--data", "/proc/self"], "narrativeqa.jsonl does not exist"),
])
def test_evaluate_flags_are_checked_before_any_work(tmp_path, tiny_ckpt, args, fragment):
    results = tmp_path / "res"
    one_line_error(script("evaluate.py", "--model", tiny_ckpt, "--results", results, *args), fragment)
    assert not results.exists()


def test_evaluate_names_a_damaged_shard(tmp_path, tiny_ckpt):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_ckpt, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[:100])
    r = script("evaluate.py", "--model", bad, "--len", "512", "--results", tmp_path / "res")
    one_line_error(r, "model.safetensors is damaged")


def test_evaluate_waits_for_a_folder_being_set_up_and_says_for_whom(tmp_path, tiny_ckpt):
    results = tmp_path / "res"
    held = lock_folder(str(results))  # another process setting the folder up, as far as it knows
    p = subprocess.Popen([sys.executable, "evaluate.py", "--model", tiny_ckpt, "--len", "256",
                          "--depths", "50", "--results", results], cwd=ROOT, env=ENV,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    said = []
    silent = threading.Timer(120, p.kill)  # a silent wait ends readline with "", failing below
    silent.start()
    try:
        # it says why it waits after 2 s of waiting, however long its start took
        while not said or "waiting for process" not in said[-1]:
            said.append(p.stderr.readline())
            assert said[-1], "".join(said)  # it ended without saying it waits
        silent.cancel()
        assert p.poll() is None  # still waiting
        assert not [n for n in os.listdir(results) if n.endswith(".json")]
    finally:
        held.close()
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-2000:]
    assert f"waiting for process {os.getpid()}" in said[-1]
    assert "setting up the results folder" in said[-1]
    assert os.path.exists(results / "niah_len256_depth050_rep0_rope-ckpt.json")


# ---------------------------------------------------------------------------------------------
# The other scripts: the same rule.

@pytest.mark.parametrize("args, fragment", [
    (["data.py", "--synthetic-docs", "0"], "--synthetic-docs: must be above 0"),
    (["data.py", "--synthetic-docs", "1000000000000"], "needs about 3,300,000.0 GB of token cache"),
    (["data.py", "--workers", "0"], "--workers: must be above 0"),
    (["data.py", "--data", "/no/such/books"], "--data /no/such/books does not exist"),
    (["data.py", "--heldout", "2"], "--heldout must be in [0, 1)"),
    (["data.py", "--cache-dir", "/proc/ultrallada-cache"], "cannot write the token cache"),
    (["data.py", "--split", "dev"], "argument --split: invalid choice: 'dev'"),
    (["masks.py", "--plot", "--out", "/proc/ultrallada/masks.png"], "cannot write /proc/ultrallada"),
    (["masks.py", "--plot", "--out", "/tmp"], "--out '/tmp' is not a picture's file name"),
    (["masks.py", "--plot", "--doc-lens", "100000", "100000"], "--doc-lens sum to 200000 tokens"),
    (["masks.py", "--doc-lens", "0"], "--doc-lens must all be positive"),
    (["model.py", "--preset", "huge"], "unknown preset 'huge'"),
    (["model.py", "--size", "8b"], "unrecognized arguments: --size 8b"),
    (["rope.py", "--target-len", "0"], "must be positive"),
    (["rope.py", "--base", "nan"], "--base must be a finite number above 1"),
    (["rope.py", "--base", "inf"], "--base must be a finite number above 1"),
    (["rope.py", "--train-len", "3"], "critical dimension of -6 (head size 128, base 500000)"),
    (["rope.py", "--base", "1e308", "--target-len", "1000000000"], "past the float range"),
    (["diffusion.py", "--steps", "-1"], "--steps must be 0 or more, got -1"),
    (["diffusion.py", "--seed", "-1"], "--seed must be in 0..2^63-1, got -1"),
])
def test_the_other_scripts_answer_bad_input_in_one_line(args, fragment):
    r = script(*args)
    one_line_error(r, fragment)
    assert "usage:" not in r.stderr and r.stdout == ""


def test_train_len_without_a_critical_dimension_is_refused_before_any_work(tmp_path, books, cache,
                                                                          tiny_ckpt):
    # T_train 3 made the critical dimension 0 (ZeroDivisionError), 1 and 2 a negative one (the
    # run trained unscaled); evaluate.py failed the same way after loading the model
    out = tmp_path / "out"
    r = script("train.py", *train_flags(books, cache, out, "--max-steps", "1", "--train-len", "3"))
    one_line_error(r, "T_train 3 gives the diffusion rope a critical dimension of 0 (head size 64, "
                      "base 10000), outside 2..64; it needs a T_train in 4..31415")
    assert not out.exists()
    results = tmp_path / "res"
    r = script("evaluate.py", "--model", tiny_ckpt, "--len", "512", "--rope", "critical",
               "--train-len", "1", "--results", results)
    one_line_error(r, "T_train 1 gives the critical rope a critical dimension of -2 (head size 16")
    assert not results.exists()


def test_a_token_cache_damaged_from_outside_is_named_before_training(tmp_path, books):
    cache = tmp_path / "cache"
    corpus = load_corpus(tiktoken_tokenizer(), books, cache_dir=str(cache), workers=1)
    tokens = np.memmap(os.path.join(corpus.path, "tokens.bin"), dtype=np.uint32, mode="r+")
    tokens[:] = 4_000_000_000  # past any vocabulary: the embedding would fail mid-step
    tokens.flush()
    out = tmp_path / "out"
    r = script("train.py", *train_flags(books, cache, out, "--max-steps", "1"))
    one_line_error(r, f"cache {corpus.path} is damaged (token id 4000000000 in tokens.bin, past "
                      f"the tokenizer's 100279 ids); delete it and run again")
    assert not out.exists()


def test_a_named_pipe_in_the_data_is_skipped_by_ppl(tmp_path, books, tiny_ckpt):
    data = tmp_path / "books"
    shutil.copytree(books, data)
    os.mkfifo(data / "aaa.txt")  # read first, it blocked the run forever
    r = script("evaluate.py", "--task", "ppl", "--model", tiny_ckpt, "--len", "128", "--draws",
               "1", "--data", data, "--cache-dir", tmp_path / "cache", "--results", tmp_path / "res")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "skipped 1 documents: aaa.txt (a named pipe, not a regular file)" in r.stderr
    assert os.listdir(tmp_path / "cache")[0].startswith("books-") and \
        len(os.listdir(tmp_path / "cache")) == 1  # no temporary folder left


def test_an_unwritable_token_cache_is_named(tmp_path, books):
    r = script("train.py", *train_flags(books, "/proc/ultrallada-cache", tmp_path / "out",
                                        "--max-steps", "1"))
    one_line_error(r, "cannot write the token cache in /proc/ultrallada-cache")
