import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from scripts import ENV, one_line_error, script

import train
from harness.checkpoint import from_pretrained, save_pretrained, save_training_checkpoint
from harness.files import FileError
from harness.prepare import filler_text
from harness.tokenizer import tiktoken_tokenizer
from model import LLaDA, preset
from rope import scale_rope
from harness.checkpoint import find_training_checkpoint
from harness.files import lock_folder
from tiny import plant_code, tiny_checkpoint, write_books

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    """A small folder of books the tests write themselves (synthetic text, 120 documents)."""
    return write_books(tmp_path_factory.mktemp("books"), seed=7, n_docs=120)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def flags(corpus_dir, cache_dir, out, *extra):
    return ["--data", corpus_dir, "--cache-dir", cache_dir, "--out", str(out), "--seq-len", "128",
            "--batch-size", "1", "--log-every", "1", "--warmup", "2", *extra]


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


# Seen in about one suite run in three on this 2-core machine: a rank of a 2-process run aborts
# inside torch's gloo ("terminate called without an active exception"), with no error of ours.
# Cause not found (docs: the closing note of issues 21-24). Such a run is started once more when
# that is safe: before the rendezvous, or into a --out it created itself (removed first). A
# deterministic failure still fails, and the retry says that it happened.
GLOO_ABORT = "terminate called without an active exception"


def run(args, nproc=1, check=True):
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--standalone"] if nproc > 1 else [sys.executable]) + ["train.py", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    out = args[args.index("--out") + 1]
    fresh = not os.path.exists(out)
    for attempt in range(2):
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
        aborted = (nproc > 1 and r.returncode != 0 and GLOO_ABORT in r.stderr
                   and "error: " not in r.stderr and (fresh or "model: " not in r.stdout))
        if not aborted or attempt:
            break
        print(f"gloo aborted; started again: {' '.join(map(str, args))}")
        if fresh:
            shutil.rmtree(out, ignore_errors=True)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_loss_goes_down_on_the_builtin_corpus(tmp_path, cache_dir):
    # the default corpus (no --data) and the default strategy, just shorter and smaller
    train.main(["--cache-dir", cache_dir, "--out", str(tmp_path), "--seq-len", "256",
                "--batch-size", "4", "--max-steps", "25", "--warmup", "5", "--log-every", "100"])
    losses = [r["loss"] for r in read_log(tmp_path)]
    assert len(losses) == 25
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, (first, last)


@pytest.mark.parametrize("mask,rope", [("concat", "none"), ("eod", "ntk"), ("adaptive", "critical"),
                                       ("adaptive", "diffusion"), ("eod", "pi")])
def test_every_strategy_and_rope_method_trains(tmp_path, corpus_dir, cache_dir, mask, rope, capsys):
    train.main(flags(corpus_dir, cache_dir, tmp_path, "--mask", mask, "--rope", rope,
                     "--max-steps", "3", "--train-len", "64", "--lr", "3e-3"))
    # only pi's checkpoint gives the official modeling code other logits, and the run says so
    err = capsys.readouterr().err
    assert ("warning: --rope pi also scales positions" in err) == (rope == "pi")
    log = read_log(tmp_path)
    assert [r["step"] for r in log] == [1, 2, 3]
    assert all(0 < r["loss"] < 50 and r["grad_norm"] > 0 for r in log)
    cfg = json.loads((tmp_path / "checkpoint" / "config.json").read_text())
    expected = scale_rope(rope, 128, 64, 64, 10000.0)
    assert cfg["rope_scaling"]["method"] == rope
    assert cfg["rope_theta"] == pytest.approx(expected["rope_theta"])
    assert cfg["tokenizer"] == "cl100k_base"
    assert "auto_map" not in cfg  # a preset has no remote code to name
    state = json.loads((tmp_path / "checkpoint" / "train_state.json").read_text())
    assert state["step"] == 3 and state["config"]["mask"] == mask


def test_saved_checkpoint_gives_identical_logits(tmp_path):
    torch.manual_seed(0)
    model = LLaDA(preset("tiny"))
    cfg = train.TrainConfig(out=str(tmp_path), rope="diffusion", seq_len=2048)
    train.scale_model_rope(model, cfg)
    opt = train.make_optimizer(model, cfg, 1e-3)
    x = torch.randint(0, 5000, (1, 40))
    model.head(model(x)).sum().backward()  # give the optimizer some state to save
    opt.step()
    save_training_checkpoint(str(tmp_path / "checkpoint"), model, opt, 1, {}, {}, rank=0, world=1)
    loaded = from_pretrained(str(tmp_path / "checkpoint"))
    assert loaded.config.rope_theta == model.config.rope_theta != 10000.0
    with torch.no_grad():
        assert torch.equal(loaded.logits(x), model.logits(x))


# Remote code of our own, in the shape of the official files: configuration and modeling
# modules named by auto_map, a module the modeling one imports relatively, and one that
# nothing names (not carried).
REMOTE_CODE = {
    "configuration_toy.py": '"""A toy configuration module."""\n\n\nclass ToyConfig(dict):\n    model_type = "llada"\n',
    "modeling_toy.py": '"""A toy modeling module."""\nfrom .configuration_toy import ToyConfig\n'
                       'from .layers_toy import ToyLayer\n\n\nclass ToyModel(ToyLayer):\n    config_class = ToyConfig\n',
    "layers_toy.py": '"""Imported by modeling_toy only."""\n\n\nclass ToyLayer:\n    pass\n',
    "generation_config.json": '{"bos_token_id": 7, "eos_token_id": 8}\n',
    "notes_toy.py": '"""Named by nothing."""\n',
}
TOY_AUTO_MAP = {"AutoConfig": "configuration_toy.ToyConfig", "AutoModel": "modeling_toy.ToyModel",
                "AutoModelForCausalLM": "modeling_toy.ToyModel"}


def assert_auto_map_files_exist(ckpt):
    """No checkpoint's config.json names a module it does not hold."""
    auto_map = json.loads((ckpt / "config.json").read_text()).get("auto_map", {})
    for ref in auto_map.values():
        assert (ckpt / (ref.rsplit(".", 1)[0] + ".py")).is_file(), ref
    return auto_map


def test_a_checkpoint_carries_the_remote_code_of_its_init_folder(tmp_path, corpus_dir, cache_dir):
    code = tmp_path / "code"
    code.mkdir()
    for name, text in REMOTE_CODE.items():
        (code / name).write_text(text)
    init = tmp_path / "init"
    config = preset("tiny")
    config.extra.update(tokenizer="cl100k_base", auto_map=TOY_AUTO_MAP)
    save_pretrained(str(init), config, LLaDA(config).state_dict(),
                    extra_files={name: str(code / name) for name in REMOTE_CODE})
    out = tmp_path / "out"
    train.main(flags(corpus_dir, cache_dir, out, "--init", str(init), "--max-steps", "1"))
    train.main(flags(corpus_dir, cache_dir, out, "--init", str(init), "--max-steps", "2", "--resume"))
    ckpt = out / "checkpoint"
    for name, text in REMOTE_CODE.items():  # carried from --init, then from the resumed checkpoint
        assert (ckpt / name).is_file() == (name != "notes_toy.py"), name
        assert name == "notes_toy.py" or (ckpt / name).read_text() == text
    assert assert_auto_map_files_exist(ckpt) == TOY_AUTO_MAP


def wait_for_log_lines(p, log, n, seconds=300):
    """Until log.jsonl has n lines; fails (instead of hanging) if the run ends or time runs out."""
    deadline = time.time() + seconds
    while not (log.exists() and len(log.read_text().splitlines()) >= n):
        assert p.poll() is None, "the run ended early"
        assert time.time() < deadline, f"no {n} log lines after {seconds} s"
        time.sleep(0.02)


def test_resume_after_kill_repeats_the_uninterrupted_run(tmp_path, corpus_dir, cache_dir):
    base = ["--save-every", "2"]
    run(flags(corpus_dir, cache_dir, tmp_path / "a", "--max-steps", "8", *base))
    reference = read_log(tmp_path / "a")

    # The same run, but far longer (so it is still running whatever the machine's speed),
    # killed with SIGKILL (no chance to save) once step 5 is logged, then resumed to step 8:
    # the learning rate is constant after warm-up, so --max-steps changes nothing before it.
    out = tmp_path / "b"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "train.py", *flags(corpus_dir, cache_dir, out,
                                                             "--max-steps", "100000", *base)],
                         cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_log_lines(p, out / "log.jsonl", 5)
    finally:
        p.kill()
        p.wait()
    assert p.returncode == -signal.SIGKILL
    run(flags(corpus_dir, cache_dir, out, "--max-steps", "8", *base, "--resume"))
    resumed = read_log(out)
    assert [r["step"] for r in resumed] == list(range(1, 9))  # no step logged twice
    assert [r["loss"] for r in resumed] == [r["loss"] for r in reference]  # bit-identical


def test_two_processes_ddp_and_fsdp_agree_and_resume(tmp_path, corpus_dir, cache_dir):
    run(flags(corpus_dir, cache_dir, tmp_path / "ddp", "--max-steps", "4", "--save-every", "2"), nproc=2)
    ddp = read_log(tmp_path / "ddp")
    assert [r["step"] for r in ddp] == [1, 2, 3, 4]
    # FSDP to step 2, then resumed to 4: the same losses as DDP (same data, same noise)
    r = run(flags(corpus_dir, cache_dir, tmp_path / "fsdp", "--max-steps", "2", "--fsdp"), nproc=2)
    assert "FSDP" in r.stdout
    run(flags(corpus_dir, cache_dir, tmp_path / "fsdp", "--max-steps", "4", "--fsdp", "--resume"), nproc=2)
    fsdp = read_log(tmp_path / "fsdp")
    assert [r["step"] for r in fsdp] == [1, 2, 3, 4]
    for a, b in zip(ddp, fsdp):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    # the gathered checkpoint is a normal one
    assert from_pretrained(str(tmp_path / "fsdp" / "checkpoint")).config.rope_scaling["method"] == "diffusion"


def test_stop_request_saves_and_resumes(tmp_path, corpus_dir, cache_dir):
    out = tmp_path / "run"
    args = flags(corpus_dir, cache_dir, out, "--max-steps", "100000", "--save-every", "100000")
    p = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    wait_for_log_lines(p, out / "log.jsonl", 2)
    p.send_signal(signal.SIGINT)
    output, _ = p.communicate(timeout=120)
    assert p.returncode == 130  # 128 + SIGINT, after saving
    steps = len(read_log(out))
    assert f"stopped at step {steps}" in output
    state = json.loads((out / "checkpoint" / "train_state.json").read_text())
    assert state["step"] == steps < 100000


@pytest.mark.parametrize("extra,message", [
    (["--mask", "causal"], "invalid choice: 'causal'"),
    (["--rope", "yarn"], "invalid choice: 'yarn'"),
    (["--init", "/no/such/llada"], "neither a preset"),
    (["--seq-len", "10000000"], "packs into 0 sequences"),
    (["--resume"], "holds no complete checkpoint"),
    (["--dtype", "float16"], "training in float16 needs loss scaling"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, corpus_dir, cache_dir, extra, message):
    out = tmp_path / "out"
    r = run(flags(corpus_dir, cache_dir, out, "--max-steps", "1", *extra), check=False)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()


def test_more_processes_than_sequences(tmp_path, cache_dir):
    books = tmp_path / "books"
    books.mkdir()
    (books / "one.txt").write_text(filler_text(3000, tiktoken_tokenizer()))  # 1 sequence of 2048
    out = tmp_path / "out"
    r = run(flags(str(books), cache_dir, out, "--seq-len", "2048", "--max-steps", "1"), nproc=2, check=False)
    assert r.returncode != 0  # torchrun reports the workers' exit code 2 as a failure of its own
    assert r.stderr.count("error: ") == 1 and "one step needs 2" in r.stderr
    assert 'train.py", line' not in r.stderr  # no traceback from our code
    assert not out.exists()


def test_resume_with_a_different_model_is_refused(tmp_path, corpus_dir, cache_dir):
    out = tmp_path / "out"
    run(flags(corpus_dir, cache_dir, out, "--max-steps", "1"))
    r = run(flags(corpus_dir, cache_dir, out, "--max-steps", "2", "--resume", "--init", "small"), check=False)
    assert r.returncode == 2 and "--init tiny -> small" in r.stderr
    r = run(flags(corpus_dir, cache_dir, out, "--max-steps", "2", "--resume", "--init", "small",
                  "--allow-changes"), check=False)
    assert r.returncode == 2 and "do not match --init small" in r.stderr  # shapes are never allowed
    assert len(read_log(out)) == 1  # nothing written by the refused run


def test_memory_plan_for_llada_8b(capsys):
    train.main(["--init", "llada-8b", "--seq-len", "65536", "--memory-plan"])
    out = capsys.readouterr().out
    assert "8.02B parameters" in out
    rows = {int(line.split("|")[1]): line for line in out.splitlines() if line.startswith("| ") and line.split("|")[1].strip().isdigit()}
    # 16 bytes per parameter (bf16 weights and grads, fp32 master, Adam m and v) unsharded is
    # 119.4 GiB: one 80 GB GPU cannot hold it, 8 can
    assert f"| {8_015_581_184 * 16 / 2**30:.1f} |" in rows[1] and rows[1].rstrip().endswith("no |")
    assert rows[8].rstrip().endswith("yes |")


@pytest.mark.parametrize("failing_save, kept, again", [
    (1, "no checkpoint was saved yet", "fix that and run again"),  # nothing to --resume
    (2, "the last checkpoint is intact", "fix that and --resume"),
])
def test_a_save_that_fails_says_what_is_kept_and_how_to_go_on(
        corpus_dir, cache_dir, tmp_path, monkeypatch, capsys, failing_save, kept, again):
    saves = []

    def save(*args, **kwargs):  # a disk that fills up at the `failing_save`-th save
        saves.append(args[3])
        if len(saves) == failing_save:
            raise FileError(f"cannot write {args[0]}: No space left on device")
        return save_training_checkpoint(*args, **kwargs)

    monkeypatch.setattr(train, "save_training_checkpoint", save)
    with pytest.raises(SystemExit) as stop:
        train.main(flags(corpus_dir, cache_dir, tmp_path, "--max-steps", "3", "--save-every", "1"))
    assert stop.value.code == 2 and saves == list(range(1, failing_save + 1))
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: cannot write") and f"{kept}: {again}" in error, error
    ckpt = tmp_path / "checkpoint" / "train_state.json"
    assert ckpt.exists() == (failing_save > 1)
    if ckpt.exists():
        assert json.loads(ckpt.read_text())["step"] == failing_save - 1


@pytest.mark.parametrize("where, said", [
    ("start", "interrupted while starting; nothing was written"),  # reading the corpus, the model
    ("make_optimizer", "interrupted before the first step; no checkpoint was changed"),
])
def test_ctrl_c_before_the_first_step_is_one_line(corpus_dir, cache_dir, tmp_path, monkeypatch,
                                                   capsys, where, said):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, where, interrupted)
    with pytest.raises(SystemExit) as stop:
        train.main(flags(corpus_dir, cache_dir, tmp_path, "--max-steps", "2"))
    assert stop.value.code == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: {said}"
    assert not (tmp_path / "checkpoint").exists() and not (tmp_path / "log.jsonl").exists()


# ---------------------------------------------------------------------------------------------
# Bad input and faults, as a user meets them (moved from test_bad_input.py)

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

