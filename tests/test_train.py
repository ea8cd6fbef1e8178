"""Tests for train.py as a user runs it: it trains, every strategy and RoPE method saves a
checkpoint the official layout can load, a run killed at any moment resumes bit for bit on any
number of processes, a stop request saves, and every mistake or fault is one line that leaves
the output folder as it was and runs nothing from a checkpoint."""
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import train
from bench.gloo_abort_repro import busy_cores, run_under_load
from harness.checkpoint import from_pretrained, save_pretrained
from harness.files import lock_folder
from harness.prepare import filler_text
from harness.runtime import exit_after, memory_plan_text
from harness.tokenizer import tiktoken_tokenizer
from model import LLaDA, preset
from rope import scale_rope
from scripts import ENV, ROOT, Started, group, one_line_error, script
from tiny import Plant, tiny_checkpoint


INIT = []  # ["--init", the one-layer checkpoint of tests/tiny.py]: quick to save and load


@pytest.fixture(scope="module", autouse=True)
def one_layer_model(tiny_ckpt):
    INIT[:] = ["--init", tiny_ckpt]


def flags(books, cache, out, *extra):
    """A run here: the test corpus, the one-layer model unless `extra` says another --init."""
    return ["--data", books, "--cache-dir", cache, "--out", str(out), "--seq-len", "128",
            "--warmup", "2", "--log-every", "1", *INIT, *extra]


def read_log(out) -> list[dict]:
    """log.jsonl as strict JSON: NaN and Infinity are not JSON and fail here."""
    def refuse(name):
        raise ValueError(f"{name} in log.jsonl")
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line, parse_constant=refuse) for line in f]


def saved_step(out) -> int:
    return json.loads((out / "checkpoint" / "train_state.json").read_text())["step"]


def snapshot(folder) -> dict:
    """Every entry under `folder` with what would change if it were rewritten, moved or
    deleted (named pipes are listed, never opened); not .lock, which each run rewrites."""
    return {str(p.relative_to(folder)): (p.lstat().st_ino, p.lstat().st_size,
                                         p.lstat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.name != ".lock"}


def torchrun(args, nproc=2, check=True, load=False) -> subprocess.CompletedProcess:
    """train.py under torchrun; load=True as bench/bench_exit.py runs it (issue 30: its gloo
    threads reniced while two busy loops fill the cores, where a run used to abort at exit)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--standalone", "train.py", *map(str, args)]
    if load:
        with busy_cores():
            code, err = run_under_load(cmd, cwd=ROOT, env=ENV)
        r = subprocess.CompletedProcess(cmd, code, "", err)
    else:
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=600)
    assert not check or r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def trained(tmp_path_factory, books, cache):
    """A finished 2-step run to resume, copy and damage."""
    out = tmp_path_factory.mktemp("trained") / "run"
    script("train.py", *flags(books, cache, out, "--max-steps", "2"), check_code=0)
    return out


def copy_run(trained, tmp_path):
    return shutil.copytree(trained, tmp_path / "run")


# ---------------------------------------------------------------------------------------------
# Training

def test_loss_goes_down_on_the_builtin_corpus(tmp_path, cache):
    # the default corpus (no --data) and the default strategy, just shorter and smaller
    train.main(["--cache-dir", cache, "--out", str(tmp_path), "--seq-len", "256",
                "--batch-size", "4", "--max-steps", "25", "--warmup", "5", "--log-every", "100"])
    losses = [r["loss"] for r in read_log(tmp_path)]
    assert len(losses) == 25
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, (first, last)


@pytest.mark.parametrize("mask,rope", [("concat", "none"), ("eod", "ntk"), ("adaptive", "critical"),
                                       ("adaptive", "diffusion"), ("eod", "pi")])
def test_every_strategy_and_rope_method_trains(tmp_path, books, cache, mask, rope, capsys):
    train.main(flags(books, cache, tmp_path, "--mask", mask, "--rope", rope, "--max-steps", "3",
                     "--train-len", "64", "--lr", "3e-3"))
    # only pi's checkpoint gives the official modeling code other logits, and the run says so
    assert ("warning: --rope pi also scales positions" in capsys.readouterr().err) == (rope == "pi")
    log = read_log(tmp_path)
    assert [r["step"] for r in log] == [1, 2, 3]
    assert all(0 < r["loss"] < 50 and r["grad_norm"] > 0 for r in log)
    cfg = json.loads((tmp_path / "checkpoint" / "config.json").read_text())
    expected = scale_rope(rope, 128, 64, 16, 10000.0)  # the one-layer model's heads of 16
    assert cfg["rope_scaling"]["method"] == rope
    assert cfg["rope_theta"] == pytest.approx(expected["rope_theta"])
    assert cfg["tokenizer"] == "cl100k_base" and "auto_map" not in cfg  # no remote code to name
    state = json.loads((tmp_path / "checkpoint" / "train_state.json").read_text())
    assert state["step"] == 3 and state["config"]["mask"] == mask


def test_a_checkpoint_carries_the_remote_code_of_its_init_folder(tmp_path, books, cache):
    """As the official directory: modeling code named by config.json's auto_map (and a module
    it imports) plus generation_config.json, carried from --init into every checkpoint, from
    the first run and from a resumed one."""
    code = {"modeling_toy.py": '"""A toy."""\nfrom .layers_toy import ToyLayer\n',
            "layers_toy.py": '"""Imported by modeling_toy."""\n',
            "generation_config.json": '{"bos_token_id": 7, "eos_token_id": 8}\n'}
    auto_map = {"AutoModel": "modeling_toy.ToyModel"}
    for name, text in code.items():
        (tmp_path / name).write_text(text)
    config = preset("tiny", n_layers=1)
    config.extra.update(tokenizer="cl100k_base", auto_map=auto_map)
    save_pretrained(str(tmp_path / "init"), config, LLaDA(config).state_dict(),
                    extra_files={name: str(tmp_path / name) for name in code})
    out = tmp_path / "out"
    train.main(flags(books, cache, out, "--init", str(tmp_path / "init"), "--max-steps", "1"))
    train.main(flags(books, cache, out, "--init", str(tmp_path / "init"), "--max-steps", "2",
                     "--resume"))
    ckpt = out / "checkpoint"
    assert {name: (ckpt / name).read_text() for name in code} == code
    assert json.loads((ckpt / "config.json").read_text())["auto_map"] == auto_map


def wait_for_log_lines(p, log, n, seconds=300):
    """Until log.jsonl has n lines; fails (instead of hanging) if the run ends or time runs out."""
    deadline = time.time() + seconds
    while not (log.exists() and len(log.read_text().splitlines()) >= n):
        assert p.process.is_alive(), "the run ended early"
        assert time.time() < deadline, f"no {n} log lines after {seconds} s"
        time.sleep(0.02)


def test_resume_after_kill_repeats_the_uninterrupted_run(tmp_path, books, cache):
    base = ["--save-every", "2"]
    script("train.py", *flags(books, cache, tmp_path / "a", "--max-steps", "6", *base), check_code=0)
    reference = read_log(tmp_path / "a")

    # The same run, but far longer (so it is still running whatever the machine's speed),
    # killed with SIGKILL (no chance to save) once step 3 is logged, then resumed to step 6:
    # the learning rate is constant after warm-up, so --max-steps changes nothing before it.
    out = tmp_path / "b"
    p = Started("train.py", flags(books, cache, out, "--max-steps", "100000", *base))
    try:
        wait_for_log_lines(p, out / "log.jsonl", 3)
    finally:
        os.kill(p.pid, signal.SIGKILL)
        assert p.finish().returncode == -signal.SIGKILL
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 4.')  # as if killed while writing a line
    script("train.py", *flags(books, cache, out, "--max-steps", "6", *base, "--resume"),
           check_code=0)
    resumed = read_log(out)
    assert [r["step"] for r in resumed] == list(range(1, 7))  # no step logged twice
    assert [r["loss"] for r in resumed] == [r["loss"] for r in reference]  # bit-identical


def ranks(args, world=2) -> list:
    """train.py as the ranks of a 2-process run (tests/scripts.py: forked, as torchrun's)."""
    done = group("train.py", *args, world=world)
    assert all(r.returncode == 0 for r in done), [r.stderr[-2000:] for r in done]
    return done


def test_processes_ddp_and_fsdp_agree_and_resume_on_any_number(tmp_path, books, cache):
    ranks(flags(books, cache, tmp_path / "ddp", "--max-steps", "4"))
    assert "FSDP" in ranks(flags(books, cache, tmp_path / "straight", "--max-steps", "4",
                                 "--fsdp"))[0].stdout
    # FSDP to step 2, then resumed to 4 on two processes: the straight run, bit for bit
    fsdp = tmp_path / "fsdp"
    ranks(flags(books, cache, fsdp, "--max-steps", "2", "--fsdp"))
    ranks(flags(books, cache, fsdp, "--max-steps", "4", "--fsdp", "--resume"))
    assert [r["loss"] for r in read_log(fsdp)] == [r["loss"] for r in read_log(tmp_path / "straight")]
    for a, b in zip(read_log(tmp_path / "ddp"), read_log(fsdp)):  # DDP and FSDP agree
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    # written by 2 processes, resumed by 1, then by 2 again: the gathered state fits any number;
    # the last by torchrun under load, where a finished run used to abort at exit (issue 30),
    # from a save killed between its two renames (rank 0 alone puts checkpoint.old back)
    script("train.py", *flags(books, cache, fsdp, "--max-steps", "5", "--resume"), check_code=0)
    os.replace(fsdp / "checkpoint", fsdp / "checkpoint.old")
    torchrun(flags(books, cache, fsdp, "--max-steps", "6", "--resume"), load=True)
    assert [r["step"] for r in read_log(fsdp)] == [1, 2, 3, 4, 5, 6]
    assert from_pretrained(str(fsdp / "checkpoint")).config.rope_scaling["method"] == "diffusion"


def test_stop_request_saves_and_resumes(tmp_path, books, cache):
    """Ctrl-C finishes the step, saves and exits 130; the run goes on with --resume. (A second
    Ctrl-C exits at once: test_runtime.py; a kill inside a save loses nothing: below.)"""
    out = tmp_path / "run"
    p = Started("train.py", flags(books, cache, out, "--max-steps", "100000", "--save-every",
                                  "100000"))
    wait_for_log_lines(p, out / "log.jsonl", 2)
    os.kill(p.pid, signal.SIGINT)
    r = p.finish()
    assert r.returncode == 130  # 128 + SIGINT, after saving
    steps = len(read_log(out))
    assert f"stopped at step {steps}" in r.stdout and saved_step(out) == steps
    script("train.py", *flags(books, cache, out, "--max-steps", str(steps + 1), "--resume"),
           check_code=0)
    assert [r["step"] for r in read_log(out)] == list(range(1, steps + 2))


def test_memory_plan_for_llada_8b(capsys):
    """The plan's numbers are tested in test_gpu.py; here: the flag prints it for --init."""
    train.main(["--init", "llada-8b", "--seq-len", "65536", "--memory-plan"])
    assert capsys.readouterr().out == memory_plan_text(preset("llada-8b"), 65536) + "\n"


# ---------------------------------------------------------------------------------------------
# Mistakes and faults: one line, exit code 2 (1 for a diverged run), the folder as it was.

@pytest.mark.parametrize("extra, fragment", [
    (["--lr", "nan"], "--lr: must be above 0"), (["--lr", "1e308"], "at most 1, got 1e308"),
    (["--grad-clip", "-1"], "--grad-clip: must be at least 0"),
    (["--target-len", "-4"], "--target-len: must be above 0"),
    (["--max-steps", "two"], "--max-steps: 'two' is not an integer"),
    (["--mask", "causal"], "invalid choice: 'causal'"), (["--rope", "yarn"], "invalid choice"),
    (["--d-crit", "17"], "critical dimension of 17 is outside 1..16 (head size)"),
    (["--train-len", "3"], "T_train 3 gives the diffusion rope a critical dimension of 0"),
    (["--init", "/no/such/llada"], "neither a preset"),
    (["--seq-len", "10000000"], "packs into 0 sequences"),
    (["--resume"], "holds no complete checkpoint"), (["--allow-changes"], "only applies with"),
    (["--dtype", "float16"], "training in float16 needs loss scaling"),
    (["--out", os.fsdecode(b"/tmp/bad\xffname")], "is not valid UTF-8"),
    (["--cache-dir", "/proc/ultrallada-cache"], "cannot write the token cache"),
])
def test_a_mistake_is_one_line_before_any_work(tmp_path, books, cache, extra, fragment):
    out = tmp_path / "out"
    one_line_error(script("train.py", *flags(books, cache, out, "--max-steps", "1"), *extra),
                   fragment)
    assert not out.exists()


@pytest.mark.parametrize("case, fragment", [
    ("file", "is a file, not a folder"), ("foreign", "holds files that train.py did not write"),
    ("proc", "cannot write in /proc"), ("locked", "is in use by process"),
    ("checkpoint", "already holds a checkpoint; pass --resume"),
])
def test_an_output_folder_is_train_pys_own_and_one_runs_writer(tmp_path, trained, books, cache,
                                                                 case, fragment):
    """A new run refuses a folder it did not make (a save would replace what is there), one
    that another run is using, or one that already holds a checkpoint; nothing is changed."""
    out = tmp_path / "out"
    if case == "file":
        out.write_text("mine")
    elif case == "foreign":  # notes, a model of one's own, a link: not train.py's folder
        out.mkdir()
        (out / "checkpoint").mkdir()
        (out / "checkpoint" / "notes.txt").write_text("mine")
    elif case == "proc":
        out = "/proc/ultrallada-out"
    elif case == "checkpoint":
        out = copy_run(trained, tmp_path)
    held = lock_folder(str(out)) if case == "locked" else None
    before = snapshot(tmp_path)
    one_line_error(script("train.py", *flags(books, cache, out, "--max-steps", "1")), fragment)
    assert snapshot(tmp_path) == before
    if held:  # the lock's file stays behind; held by nobody, it blocks nobody
        held.close()
        script("train.py", *flags(books, cache, out, "--max-steps", "1"), check_code=0)


def test_a_diverging_run_stops_before_it_updates_or_saves(tmp_path, trained, books, cache):
    init = tiny_checkpoint(tmp_path / "huge", scale=1e20)[0]  # finite, but attention overflows
    out = tmp_path / "out"
    r = script("train.py", *flags(books, cache, out, "--init", init, "--max-steps", "3"))
    one_line_error(r, "step 1: the loss is nan", "without updating or saving",
                   "no checkpoint was saved yet: fix that and run again", code=1)
    assert read_log(out) == [] and not (out / "checkpoint").exists()

    out = copy_run(trained, tmp_path)  # saved at step 2; an update that overflows the weights
    r = script("train.py", *flags(books, cache, out, "--max-steps", "4", "--save-every", "1",
                                  "--resume", "--weight-decay", "1e300", "--allow-changes"))
    one_line_error(r, "step 3: the update made weights non-finite; not saved",
                   "the last checkpoint is intact: fix that and --resume --allow-changes", code=1)
    assert [rec["step"] for rec in read_log(out)] == [1, 2, 3] and saved_step(out) == 2
    assert all(torch.isfinite(p).all() for p in from_pretrained(str(out / "checkpoint")).parameters())


def test_resume_refuses_other_settings_unless_allowed_and_never_another_model(
        tmp_path, trained, books, cache):
    out = copy_run(trained, tmp_path)
    r = script("train.py", *flags(books, cache, out, "--max-steps", "3", "--resume",
                                  "--seq-len", "256", "--lr", "5e-4"))
    one_line_error(r, "--seq-len 128 -> 256", "--lr null -> 0.0005", "--allow-changes")
    r = script("train.py", *flags(books, cache, out, "--max-steps", "3", "--resume", "--init",
                                  "small", "--allow-changes"))
    one_line_error(r, "continues the model trained from --init", "not small")
    assert len(read_log(out)) == 2  # nothing written by the refused runs
    script("train.py", *flags(books, cache, out, "--max-steps", "3", "--resume", "--lr", "5e-4",
                              "--allow-changes"), check_code=0)
    assert [x["step"] for x in read_log(out)] == [1, 2, 3] and read_log(out)[-1]["lr"] == 5e-4


def test_a_kill_inside_a_save_loses_no_checkpoint(tmp_path, trained, books, cache):
    """Killed between the two renames of a save: the last checkpoint is checkpoint.old, beside
    a half-written checkpoint.tmp; a user's results folder inside the checkpoint survives."""
    out = copy_run(trained, tmp_path)
    ckpt = out / "checkpoint"
    (ckpt / "evals").mkdir()
    (ckpt / "evals" / "cell.json").write_text('{"score": 100}')
    os.replace(ckpt, str(ckpt) + ".old")
    shutil.copytree(str(ckpt) + ".old", str(ckpt) + ".tmp")
    os.remove(ckpt.with_name("checkpoint.tmp") / "train_state.json")
    script("train.py", *flags(books, cache, out, "--max-steps", "3", "--resume"), check_code=0)
    assert [x["step"] for x in read_log(out)] == [1, 2, 3] and saved_step(out) == 3
    assert (ckpt / "evals" / "cell.json").read_text() == '{"score": 100}'
    assert sorted(p.name for p in out.iterdir()) == [".lock", "checkpoint", "log.jsonl"]


def edit_json(path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("damage, fragment", [
    ("state-json", "train_state.json is not valid JSON"),
    ("state-fields", "train_state.json is not a training state"),
    ("step-negative", "train_state.json is not a training state"),
    ("flag-string", '--seq-len "128" -> 128'),
    ("shard-truncated", "model.safetensors is damaged"),
    ("config-nan", "config.json: rope_theta is NaN, it must be a finite number above 1"),
    ("optimizer-truncated", "optimizer.safetensors cannot be read"),
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
    elif damage == "step-negative":
        edit_json(ckpt / "train_state.json", lambda s: s.update(step=-3))
    elif damage == "flag-string":
        edit_json(ckpt / "train_state.json", lambda s: s["config"].update(seq_len="128"))
    elif damage.endswith("-truncated"):
        file = ckpt / ("model.safetensors" if damage == "shard-truncated" else "optimizer.safetensors")
        file.write_bytes(file.read_bytes()[:100_000])
    elif damage == "config-nan":
        edit_json(ckpt / "config.json", lambda c: c.update(rope_theta=float("nan")))
    elif damage == "log-pipe":
        os.remove(out / "log.jsonl")
        os.mkfifo(out / "log.jsonl")
    else:  # a complete line that is not a step record, before the last one
        with open(out / "log.jsonl", "a") as f:
            f.write(('[1, 2]' if damage == "log-list" else '{"step": "x"}') + '\n{"step": 1}\n')
    before = snapshot(out)
    one_line_error(script("train.py", *flags(books, cache, out, "--max-steps", "3", "--resume")),
                   fragment)
    assert snapshot(out) == before


def test_no_file_of_a_checkpoint_is_read_with_pickle(tmp_path, trained, books, cache, monkeypatch):
    """Safetensors and JSON only: a resume reads every file of the checkpoint without pickle
    (checked by making pickle fail), and a pickle planted in place of any of them runs nothing."""
    out = copy_run(trained, tmp_path)
    ckpt = out / "checkpoint"
    names = sorted(os.listdir(ckpt))
    assert names == ["config.json", "model.safetensors", "optimizer.safetensors", "train_state.json"]
    for name in names:
        planted = copy_run(trained, tmp_path / name)
        marker = tmp_path / f"ran-{name}"
        (planted / "checkpoint" / name).write_bytes(pickle.dumps(Plant(marker)))
        r = script("train.py", *flags(books, cache, planted, "--max-steps", "3", "--resume"))
        one_line_error(r, name)
        assert not marker.exists()

    def no_pickle(*args, **kwargs):
        raise AssertionError("a checkpoint was read with pickle")
    for module, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"),
                         (torch, "load")):
        monkeypatch.setattr(module, name, no_pickle)
    train.main(flags(books, cache, out, "--max-steps", "3", "--resume"))
    assert saved_step(out) == 3


def test_a_save_that_fails_says_what_is_kept_and_how_to_go_on(tmp_path, books, cache,
                                                               monkeypatch, capsys):
    import safetensors.torch
    real, saves = safetensors.torch.save_file, []

    def full_disk(tensors, filename, *args, **kwargs):  # fills up at the second checkpoint
        saves.append(filename)
        if len(saves) == 3:  # its weights: the first checkpoint wrote two files
            raise OSError(28, "No space left on device")
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(SystemExit) as stop:
        exit_after(lambda: train.main(flags(books, cache, tmp_path, "--max-steps", "3",
                                            "--save-every", "1")), leave=sys.exit)
    monkeypatch.undo()
    assert stop.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: cannot write") and "No space left on device" in error
    assert "the last checkpoint is intact: fix that and --resume" in error
    assert saved_step(tmp_path) == 1 and sorted(os.listdir(tmp_path)) == [
        ".lock", "checkpoint", "log.jsonl"]


def test_ctrl_c_before_the_first_step_is_one_line(books, cache, tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "make_optimizer", interrupted)
    with pytest.raises(SystemExit) as stop:
        exit_after(lambda: train.main(flags(books, cache, tmp_path, "--max-steps", "2")),
                   leave=sys.exit)
    assert stop.value.code == 130
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: interrupted")
    assert not (tmp_path / "checkpoint").exists() and not (tmp_path / "log.jsonl").exists()


@pytest.mark.parametrize("mask, file_mode, folder_mode", [(0o022, 0o644, 0o755),
                                                          (0o077, 0o600, 0o700)])
def test_a_run_writes_with_the_users_umask(tmp_path, mask, file_mode, folder_mode):
    """Checkpoints readable as a Hugging Face one's under 022 (a colleague can load them), and
    nothing published under 077: the token cache, the checkpoint and the log alike."""
    out, cache = tmp_path / "out", tmp_path / "cache"
    (tmp_path / "books").mkdir()
    (tmp_path / "books" / "one.txt").write_text(filler_text(300, tiktoken_tokenizer()))
    books = str(tmp_path / "books")  # one book: tokenized without worker processes
    script("train.py", *flags(books, cache, out, "--max-steps", "1"), env={"UMASK": f"{mask:o}"},
           check_code=0)
    modes = {p: p.stat().st_mode & 0o777 for p in [*out.rglob("*"), *cache.rglob("*")]}
    assert (out / "checkpoint" / "optimizer.safetensors") in modes and (out / "log.jsonl") in modes
    assert {str(p): m for p, m in modes.items()} == {
        str(p): folder_mode if p.is_dir() else file_mode for p in modes}


@pytest.mark.parametrize("edit, fragment", [
    ({"n_heads": 0}, "config.json: n_heads is 0"),
    ({"rope_theta": 0.0}, "config.json: rope_theta is 0.0, it must be a finite number above 1"),
])
def test_an_impossible_init_is_refused_when_its_config_is_read(tmp_path, books, cache, edit,
                                                                fragment):
    init = tiny_checkpoint(tmp_path / "init")[0]
    edit_json(tmp_path / "init" / "config.json", lambda c: c.update(edit))
    for extra in (["--memory-plan"], []):
        r = script("train.py", *flags(books, cache, tmp_path / "out", "--init", init, *extra))
        one_line_error(r, fragment)
    assert not (tmp_path / "out").exists()


def test_more_processes_than_sequences(tmp_path, cache):
    books = tmp_path / "books"
    books.mkdir()
    (books / "one.txt").write_text(filler_text(3000, tiktoken_tokenizer()))  # 1 sequence of 2048
    out = tmp_path / "out"
    r = torchrun(flags(str(books), cache, out, "--seq-len", "2048", "--max-steps", "1"), check=False)
    assert r.returncode != 0  # torchrun reports the workers' exit code 2 as a failure of its own
    assert r.stderr.count("error: ") == 1 and "one step needs 2" in r.stderr
    assert 'train.py", line' not in r.stderr  # no traceback from our code
    assert not out.exists()
