import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import train
from data import SyntheticConfig, filler_text, synthetic_texts, tiktoken_tokenizer
from model import LLaDA, from_pretrained, preset
from rope import scale_rope

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    """A small folder of books the tests write themselves (synthetic text, 120 documents)."""
    d = tmp_path_factory.mktemp("books")
    for i, text in enumerate(synthetic_texts(SyntheticConfig(seed=7, n_docs=120))):
        (d / f"book{i:03d}.txt").write_text(text)
    return str(d)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def flags(corpus_dir, cache_dir, out, *extra):
    return ["--data", corpus_dir, "--cache-dir", cache_dir, "--out", str(out), "--seq-len", "128",
            "--batch-size", "1", "--log-every", "1", "--warmup", "2", *extra]


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def run(args, nproc=1, check=True):
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--standalone"] if nproc > 1 else [sys.executable]) + ["train.py", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
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
def test_every_strategy_and_rope_method_trains(tmp_path, corpus_dir, cache_dir, mask, rope):
    train.main(flags(corpus_dir, cache_dir, tmp_path, "--mask", mask, "--rope", rope,
                     "--max-steps", "3", "--train-len", "64", "--lr", "3e-3"))
    log = read_log(tmp_path)
    assert [r["step"] for r in log] == [1, 2, 3]
    assert all(0 < r["loss"] < 50 and r["grad_norm"] > 0 for r in log)
    cfg = json.loads((tmp_path / "checkpoint" / "config.json").read_text())
    expected = scale_rope(rope, 128, 64, 64, 10000.0)
    assert cfg["rope_scaling"]["method"] == rope
    assert cfg["rope_theta"] == pytest.approx(expected["rope_theta"])
    assert cfg["tokenizer"] == "cl100k_base"
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
    train.save_checkpoint(model, opt, cfg, 1, {}, rank=0, world=1)
    loaded = from_pretrained(str(tmp_path / "checkpoint"))
    assert loaded.config.rope_theta == model.config.rope_theta != 10000.0
    with torch.no_grad():
        assert torch.equal(loaded.logits(x), model.logits(x))


def test_resume_after_kill_repeats_the_uninterrupted_run(tmp_path, corpus_dir, cache_dir):
    base = ["--max-steps", "8", "--save-every", "2"]
    run(flags(corpus_dir, cache_dir, tmp_path / "a", *base))
    reference = read_log(tmp_path / "a")

    # The same run, killed with SIGKILL (no chance to save) once step 5 is logged.
    out = tmp_path / "b"
    args = flags(corpus_dir, cache_dir, out, *base)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = out / "log.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= 5:
            p.kill()
            break
        time.sleep(0.02)
    p.wait()
    assert p.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert len(read_log(out)) < 8
    run(args + ["--resume"])
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
    args = flags(corpus_dir, cache_dir, out, "--max-steps", "500", "--save-every", "1000")
    p = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    log = out / "log.jsonl"
    while not (log.exists() and log.read_text().count("\n") >= 2):
        time.sleep(0.05)
        assert p.poll() is None
    p.send_signal(signal.SIGINT)
    output, _ = p.communicate(timeout=120)
    assert p.returncode == 0
    steps = len(read_log(out))
    assert f"stopped at step {steps}" in output
    state = json.loads((out / "checkpoint" / "train_state.json").read_text())
    assert state["step"] == steps < 500


@pytest.mark.parametrize("extra,message", [
    (["--mask", "causal"], "invalid choice: 'causal'"),
    (["--rope", "yarn"], "invalid choice: 'yarn'"),
    (["--init", "/no/such/llada"], "neither a preset"),
    (["--seq-len", "10000000"], "packs into 0 sequences"),
    (["--resume"], "holds no complete checkpoint"),
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
    assert r.returncode == 2 and "do not match --init small" in r.stderr
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


FAULTS_OF_REALLOCATIONS = """
import resource, sys, torch
import train
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
if sys.argv[1] == "keep":
    assert train.keep_freed_memory()
counts = []
for _ in range(10):  # 64 MB, allocated, written and freed, ten times
    before = faults()
    torch.empty(16 * 2**20).fill_(1.0)
    counts.append(faults() - before)
print(sum(counts[1:]))  # after the first
"""


def test_keep_freed_memory_reuses_pages_instead_of_faulting_them_in_again():
    # Fresh processes, 4 KB pages (no huge pages) so that faults count pages: glibc's default
    # unmaps a freed 64 MB block, and writing the next one faults all 16,384 pages again.
    env = {**os.environ, "THP_MEM_ALLOC_ENABLE": "0"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def faults(mode):
        return int(subprocess.run([sys.executable, "-c", FAULTS_OF_REALLOCATIONS, mode], env=env,
                                  capture_output=True, text=True, check=True, cwd=root).stdout)

    default, kept = faults("default"), faults("keep")
    assert default > 9 * 15_000  # every reallocation is new pages
    # Kept in the heap, a block lands on pages an earlier one touched. Not always the same ones:
    # small objects can settle in a freed block, so the next 64 MB goes higher up the heap once
    # (seen here: at most one more block's worth of faults, then none); allow three blocks'
    # worth, a third of the default.
    assert kept <= 3 * 16_384
