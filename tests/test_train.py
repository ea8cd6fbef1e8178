import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import train
from harness.checkpoint import from_pretrained, save_pretrained, save_training_checkpoint
from harness.files import FileError
from harness.prepare import filler_text
from harness.tokenizer import tiktoken_tokenizer
from model import LLaDA, preset
from rope import scale_rope
from tiny import write_books

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
