"""Tests for evaluate.py: needle placement and exact lengths, scoring, resuming, the heatmap,
RoPE overrides, a trained tiny model finding its needle, exact perplexity, and bad input.
CPU only; models are built here and saved as checkpoints in temporary folders."""
import dataclasses
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers

import evaluate
from evaluations import niah
from evaluations.needlebench import needle_score, needlebench_score
from harness import prepare, results
from harness.checkpoint import read_config, save_pretrained
from harness.tokenizer import tiktoken_tokenizer
from model import LLaDA, preset
from rope import scale_rope
from harness.files import lock_folder
from scripts import one_line_error, script
from tiny import tiny_checkpoint


@pytest.fixture(scope="module")
def tok():
    return tiktoken_tokenizer()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")[0]


def run(argv) -> int:
    """evaluate.main in-process; the exit code (0 when it returns)."""
    try:
        evaluate.main(argv)
    except SystemExit as e:
        return e.code
    return 0


def cells(folder):
    """Every result JSON of a results folder, by file name."""
    found = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".json") and not name.startswith("."):  # not the folder's own records
            with open(os.path.join(folder, name)) as f:
                found[name] = json.load(f)
    return found


def fake_generate(answers, calls):
    """Stands in for diffusion.generate: answers[i % len] as the decoded text of call i, and a
    record of what each call was given (prompt, keyword arguments, the model's RoPE base)."""
    counter = tiktoken_tokenizer()

    def generate(model, prompt, **kw):
        ids = counter.encode(answers[len(calls) % len(answers)])[:kw["gen_length"]]
        ids += [counter.eos_id] * (kw["gen_length"] - len(ids))
        calls.append(dict(prompt=prompt.clone(), rope_theta=model.config.rope_theta, **kw))
        return torch.cat([prompt, torch.tensor([ids])], 1)
    return generate


# ---------------------------------------------------------------------------------------------
# Needle placement

def is_sentence_end(tok, ids, j):
    """What the prompt builder promises at a boundary j: '.', '!' or '?' before, a space after."""
    return tok.decode([ids[j - 1]]).rstrip("\"')]")[-1:] in ".!?" and tok.decode([ids[j]])[:1].isspace()


def check_prompt(tok, cfg, L, depth, window, ids, p):
    needle, tail = niah.niah_pieces(cfg, tok)
    n = len(window)
    assert len(ids) == L == n + len(needle) + len(tail)  # --len counts the whole prompt
    assert ids[p:p + len(needle)] == needle and ids[-len(tail):] == tail
    assert ids[:p] == window[:p].tolist() and ids[p + len(needle):-len(tail)] == window[p:].tolist()
    # the haystack ends at a sentence end, so at 100% the needle is the last sentence
    assert tok.decode([int(window[-1])]).rstrip("\"')]")[-1] in ".!?"
    target = n * depth // 100
    first = 0 if tok.decode([int(window[0])])[:1].isspace() else \
        next(j for j in range(1, n) if is_sentence_end(tok, window, j))
    assert p <= max(target, first)
    if 0 < p < n:
        assert is_sentence_end(tok, window, p)
    # ... and it is the last boundary at or before the depth
    assert not any(is_sentence_end(tok, window, j) for j in range(p + 1, min(target, n - 1) + 1))
    text = tok.decode(ids)
    assert len(tok.encode(text)) == L  # the text itself is L cl100k tokens, not just the ids
    assert text.count(cfg.needle) == 1 and text.endswith(cfg.separator + cfg.question)


def flag_names(config_class) -> set[str]:
    return {"--" + f.name.replace("_", "-") for f in dataclasses.fields(config_class) if f.init}


@pytest.mark.parametrize("task", list(evaluate.TASKS))
def test_each_task_help_lists_its_own_and_the_shared_flags_only(task, capsys):
    with pytest.raises(SystemExit) as e:
        evaluate.parse_args(["--task", task, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    # listed as an option (its line starts with it); prose may name another task's flag
    shown = lambda flag: re.search(rf"(?m)^ +{re.escape(flag)}(?![\w-])", text) is not None
    shared, own = flag_names(evaluate.EvalConfig), flag_names(evaluate.TASKS[task].Options)
    others = set().union(*(flag_names(t.Options) for name, t in evaluate.TASKS.items()
                           if name != task)) - own - shared
    assert own - shared and others  # the check below has something to find on both sides
    assert [f for f in sorted(shared | own) if not shown(f)] == []
    assert [f for f in sorted(others) if shown(f)] == []


@pytest.mark.parametrize("L", [200, 1000, 4096])
def test_needle_sits_at_each_depth_and_the_prompt_has_exactly_len_tokens(tok, L):
    cfg = evaluate.task_config("niah")(len=[L])
    needle, tail = niah.niah_pieces(cfg, tok)
    n = L - len(needle) - len(tail)
    pool, _ = niah.haystack_pool(cfg, tok, n)
    window = niah.haystack_window(pool, niah.sentence_boundaries(pool, tok), n, 0)
    bounds = niah.sentence_boundaries(window, tok)
    positions = []
    for depth in range(0, 101, 10):
        ids, p = niah.niah_prompt(window, bounds, needle, tail, depth)
        check_prompt(tok, cfg, L, depth, window, ids, p)
        positions.append(p)
    assert positions[0] < 20 and positions[-1] == n  # first and last sentence of the haystack
    assert positions == sorted(positions) and len(set(positions)) == 11
    # filler sentences are at most ~15 tokens: the needle is never far from its depth
    assert all(abs(n * d // 100 - p) < 20 for d, p in zip(range(0, 101, 10), positions))


def test_a_haystack_folder_is_read_in_order_and_repeats_read_different_text(tok, tmp_path):
    books = tmp_path / "books"
    books.mkdir()
    rng = random.Random(0)
    for i in range(3):  # sentences ending in . ! ? and closing quotes, as in real books
        sents = [prepare.filler_sentence(rng)[:-1] + rng.choice([".", "!", "?", '."', "?'"])
                 for _ in range(80)]  # about 700 tokens each: all three are needed
        (books / f"book{i}.txt").write_text(" ".join(sents))
    cfg = evaluate.task_config("niah")(len=[600], haystack=str(books), repeats=3, needle="Zara keeps a red kite.",
                              question="What does Zara keep?", keyword="red kite", separator="\n\n")
    needle, tail = niah.niah_pieces(cfg, tok)
    n = 600 - len(needle) - len(tail)
    pool, name = niah.haystack_pool(cfg, tok, n)
    texts = [(books / f"book{i}.txt").read_text() for i in range(3)]
    assert name == str(books) and pool.tolist() == sum((tok.encode(t + "\n\n") for t in texts), [])
    bounds = niah.sentence_boundaries(pool, tok)
    windows = []
    for r in range(3):
        window = niah.haystack_window(pool, bounds, n, r)
        wb = niah.sentence_boundaries(window, tok)
        windows.append(tok.decode(window.tolist()))
        for depth in (0, 30, 70, 100):
            ids, p = niah.niah_prompt(window, wb, needle, tail, depth)
            assert len(ids) == 600 and ids[p:p + len(needle)] == needle
            assert p == 0 or p == n or is_sentence_end(tok, window, p)
            text = tok.decode(ids)
            assert text.count(cfg.needle) == 1 and text.endswith("\n\n" + cfg.question)
    assert len(set(windows)) == 3
    assert 0 <= texts[0].find(windows[0]) < 100  # repeat 0 reads from the first sentence


# ---------------------------------------------------------------------------------------------
# Scoring

def test_score_is_100_with_the_keyword_else_a_fifth_of_the_edit_similarity():
    needle = "The secret code of Mira Holt is 417."
    assert needle_score(" 417. The farmer", needle, "417") == 100
    assert needle_score("it is 4 17", needle, "417") < 100  # the raw answer must hold it
    stripped = "ThesecretcodeofMiraHoltis417."
    # one substitution; whitespace does not count
    assert needle_score("The secret code of  Mira Holt is 418.", needle, "417") == \
        pytest.approx(0.2 * 100 * (1 - 1 / len(stripped)))
    # one deletion and nothing else: distance 1 over the longer string (the needle)
    assert needle_score("ThesecretcodeofMiraHoltis41.", needle, "417") == \
        pytest.approx(20 * (1 - 1 / 29))
    assert needle_score("", needle, "417") == 0
    # a long wrong answer: distance = its length minus the shared prefix, over its length
    answer = "The" + "x" * 97
    assert needle_score(answer, needle, "417") == pytest.approx(20 * (1 - 97 / 100))
    # niah's needle is the user's sentence, "*" included (NeedleBench's gold string cuts there)
    assert needle_score("It is 28.", "The code is 4*7.", "28") == 100
    assert needlebench_score("It is 28.", "The code is 4*7.", "28") == 0


# ---------------------------------------------------------------------------------------------
# Resuming, the heatmap, RoPE overrides

def test_the_time_estimate_never_runs_a_long_forward_and_is_compared_at_the_end(
        ckpt, tmp_path, monkeypatch, capsys):
    # At 131072 tokens one forward takes minutes on a CPU: the estimate times a short input
    # and scales it by FLOPs, so the only forwards before the first cell are short ones.
    lengths = []
    real_forward = LLaDA.forward

    def spy(self, input_ids, *a, **kw):
        lengths.append(input_ids.shape[1])
        return real_forward(self, input_ids, *a, **kw)
    monkeypatch.setattr(LLaDA, "forward", spy)
    monkeypatch.setattr(results, "generate", fake_generate([" 417."], []))  # no forwards at all
    assert run(["--model", ckpt, "--len", "8192", "--depths", "50",
                "--results", str(tmp_path / "res")]) == 0
    assert lengths and max(lengths) <= 1024
    printed = capsys.readouterr().out
    assert re.search(r"1 cells to run \(0 already done\); estimate \d+ s", printed)
    assert re.search(r"ran 1 cells in \d+ s \([\d.e+-]+ cells/s; estimated \d+ s\)", printed)


def test_resume_skips_finished_cells_and_overwrite_redoes_them(ckpt, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "res")
    argv = ["--model", ckpt, "--len", "200", "300", "--depths", "0", "100", "--results", out]
    calls = []
    generate = fake_generate([" 417."], calls)

    def interrupted(*a, **kw):
        if len(calls) == 2:
            raise KeyboardInterrupt
        return generate(*a, **kw)
    monkeypatch.setattr(results, "generate", interrupted)
    assert run(argv) == 130  # stopped during the third cell
    first = cells(out)
    assert len(first) == 2 and not [n for n in os.listdir(out) if n.endswith(".tmp")]
    stamps = {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in first}
    assert "4 cells to run (0 already done)" in capsys.readouterr().out

    monkeypatch.setattr(results, "generate", generate)
    assert run(argv) == 0
    assert len(calls) == 2 + 2  # only the two missing cells ran
    assert len(cells(out)) == 4
    assert {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in first} == stamps
    printed = capsys.readouterr().out
    assert "2 cells to run (2 already done)" in printed and "estimate" in printed

    assert run(argv) == 0 and len(calls) == 4
    assert "all 4 cells are done" in capsys.readouterr().out
    assert run(argv + ["--overwrite"]) == 0 and len(calls) == 8
    capsys.readouterr()

    # different settings in the same folder are refused, naming the difference
    assert run(argv + ["--steps", "8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "steps 16 there, 8 here" in err and "\n" not in err
    # --overwrite replaces them: every planned cell is one of the other settings' (removed once)
    assert run(argv + ["--steps", "8", "--overwrite"]) == 0 and len(calls) == 12
    assert {c["settings"]["steps"] for c in cells(out).values()} == {8}
    capsys.readouterr()

    # a folder set up by a run that wrote no cell: refused as set up, not as holding results
    fresh = str(tmp_path / "fresh")
    def interrupted_at_once(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(results, "generate", interrupted_at_once)
    assert run([*argv[:-1], fresh]) == 130 and not cells(fresh)
    capsys.readouterr()
    assert run([*argv[:-1], fresh, "--steps", "8"]) == 2
    err = capsys.readouterr().err.strip()
    assert "was set up by a run with other settings" in err and "steps 16 there, 8 here" in err


def test_heatmap_and_table_are_made_from_every_cell(ckpt, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "res")
    # repeat 0 finds the keyword, repeat 1 answers nonsense: every cell averages the two
    calls = []
    # (cells run length by length, repeat by repeat, depth by depth)
    monkeypatch.setattr(results, "generate", fake_generate([" 417.", " 417.", "", ""], calls))
    assert run(["--model", ckpt, "--len", "200", "--depths", "0", "50", "--repeats", "2",
                "--results", out]) == 0
    monkeypatch.setattr(results, "generate", fake_generate([" 417."], calls))
    assert run(["--model", ckpt, "--len", "1024", "--depths", "0", "50", "--results", out]) == 0
    png = os.path.join(out, "niah_heatmap_rope-ckpt.png")
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(png) > 5000
    table = (tmp_path / "res" / "niah_table_rope-ckpt.md").read_text()
    assert "| depth \\ length | 200 | 1K |" in table
    assert "| 0% | 50.00 | 100.00 |" in table and "| 50% | 50.00 | 100.00 |" in table
    assert "| **average** | **50.00** | **100.00** |" in table
    assert "rope ckpt: average 75.00" in table  # two decimals, as OpenCompass's summarizer
    assert "| 0% | 50.00 | 100.00 |" in capsys.readouterr().out  # and the summary shows it


def test_rope_override_is_applied_per_length_and_the_cache_is_opt_in(ckpt, tmp_path, monkeypatch):
    out = str(tmp_path / "res")
    calls = []
    monkeypatch.setattr(results, "generate", fake_generate([" 417."], calls))
    assert run(["--model", ckpt, "--len", "200", "2048", "--depths", "50", "--rope", "diffusion",
                "--train-len", "128", "--prompt-cache", "--results", out]) == 0
    base = read_config(ckpt).rope_theta
    found = cells(out)
    assert sorted(found) == ["niah_len200_depth050_rep0_rope-diffusion-train128.json",
                             "niah_len2048_depth050_rep0_rope-diffusion-train128.json"]
    for call in calls:
        L = call["prompt"].shape[1]
        want = scale_rope("diffusion", L, 128, 16, base)
        assert call["rope_theta"] == pytest.approx(want["rope_theta"])  # what the model ran with
        assert call["cache"] == "prefix" and call["steps"] == 16 and call["gen_length"] == 32
        cell = found[f"niah_len{L}_depth050_rep0_rope-diffusion-train128.json"]
        assert cell["rope_scaling"]["lambda"] == pytest.approx(want["lambda"])
        assert cell["settings"]["prompt_cache"] is True and cell["score"] == 100
    assert calls[1]["rope_theta"] > 10 * calls[0]["rope_theta"]  # lambda grows with the length
    # without --rope the checkpoint's base is used as saved, and decoding is exact
    calls.clear()
    assert run(["--model", ckpt, "--len", "200", "--depths", "50", "--results", str(tmp_path / "b")]) == 0
    assert calls[0]["rope_theta"] == base and calls[0]["cache"] is None


def test_rope_factor_multiplies_the_saved_base_by_one_factor_at_every_length(ckpt, tmp_path,
                                                                             monkeypatch):
    calls = []
    monkeypatch.setattr(results, "generate", fake_generate([" 417."], calls))
    out = str(tmp_path / "res")
    assert run(["--model", ckpt, "--len", "200", "2048", "--depths", "50", "--rope-factor", "14",
                "--results", out]) == 0
    base = read_config(ckpt).rope_theta
    assert [call["rope_theta"] for call in calls] == [base * 14, base * 14]  # the authors' rule
    found = cells(out)
    assert sorted(found) == ["niah_len200_depth050_rep0_rope-factor14.json",
                             "niah_len2048_depth050_rep0_rope-factor14.json"]
    assert all(c["rope_theta"] == base * 14 and c["rope_scaling"]["lambda"] == 14
               for c in found.values())


@pytest.mark.parametrize("argv, says", [
    (["--rope-factor", "4", "--rope", "critical"], "--rope-factor and --rope both"),
    (["--rope-factor", "0"], "must be above 0"),
    (["--rope-factor", "nan"], "must be above 0"),
])
def test_rope_factor_is_refused_with_rope_and_when_not_positive(ckpt, argv, says, capsys):
    assert run(["--model", ckpt, "--len", "200", *argv]) == 2
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1 and "Traceback" not in err


def test_float16_runs_on_the_cpu_and_decodes_what_float32_decodes(ckpt, tmp_path):
    """The authors' wrapper loads LLaDA in float16; a tiny model decodes the same answer."""
    answers = {}
    for dtype in ("float32", "float16"):
        out = str(tmp_path / dtype)
        assert run(["--model", ckpt, "--len", "300", "--depths", "50", "--dtype", dtype,
                    "--results", out]) == 0
        (cell,) = cells(out).values()
        assert cell["settings"]["dtype"] == dtype
        answers[dtype] = cell["answer"]
    assert answers["float16"] == answers["float32"]


# ---------------------------------------------------------------------------------------------
# A tiny model trained on the needle finds it. It gets a word-level tokenizer.json (the path
# LLaDA-8B's tokenizer takes: the cl100k prompt's text re-encoded by the model's own tokenizer):
# with cl100k's 100K-row head each step costs ~50x more and the model does not learn in time.

NEEDLE, QUESTION = "The secret code of Mira Holt is 417.", "What is the secret code of Mira Holt? It is"


def word_checkpoint(path):
    words = sorted({w for ws in prepare.WORDS.values() for w in ws} | set(
        "The In A Nobody the was saw that What is secret code of Mira Holt It".split()))
    vocab = {w: i for i, w in enumerate(["[UNK]", ".", "?", "417", "582"] + words)}
    eos, mask = len(vocab), len(vocab) + 1
    hf = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    os.makedirs(path)
    hf.save(os.path.join(path, "tok.json"))
    cfg = preset("tiny", d_model=64, n_heads=2, n_kv_heads=2, mlp_hidden_size=128,
                 vocab_size=len(vocab) + 2, embedding_size=len(vocab) + 2, eos_token_id=eos,
                 pad_token_id=eos, mask_token_id=mask)
    return cfg, hf, os.path.join(path, "tok.json")


def train_on_the_needle(cfg, hf, steps=200, batch=8, gen=32, seed=0):
    """Answer-only masked-diffusion training (LLaDA's SFT loss) on haystack + needle + question
    -> "417" and EOS padding; haystacks of 64 to 448 tokens, the needle at any sentence end."""
    enc = lambda text: hf.encode(text, add_special_tokens=False).ids
    needle, question, dot = enc(NEEDLE), enc(QUESTION), hf.token_to_id(".")
    answer = enc("417") + [cfg.eos_token_id] * (gen - 1)
    rng, g = random.Random(seed), torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = LLaDA(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        n, rows = rng.choice([64, 128, 256, 448]), []
        for _ in range(batch):
            hay = []
            while len(hay) < n:
                hay += enc(prepare.filler_sentence(rng))
            hay = hay[len(hay) - n:]  # ends at a sentence end, starts anywhere (as evaluate does)
            cut = rng.choice([0] + [i + 1 for i, t in enumerate(hay) if t == dot])
            rows.append(hay[:cut] + needle + hay[cut:] + question + answer)
        x = torch.tensor(rows)  # (B, L)
        p = torch.rand(batch, 1, generator=g) * 0.999 + 0.001
        masked = torch.zeros_like(x, dtype=torch.bool)
        masked[:, -gen:] = torch.rand(batch, gen, generator=g) < p
        hidden = model(torch.where(masked, cfg.mask_token_id, x))
        ce = F.cross_entropy(model.head(hidden[masked]), x[masked], reduction="none")
        loss = (ce / p.expand_as(masked)[masked]).sum() / (batch * gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def test_a_model_trained_on_the_needle_finds_it_at_every_depth_and_length(tmp_path, capsys):
    cfg, hf, tok_file = word_checkpoint(str(tmp_path / "tok"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small ops: one thread is as fast, and steady when cores are shared
    try:
        model = train_on_the_needle(cfg, hf)
        ckpt = str(tmp_path / "trained")
        save_pretrained(ckpt, cfg, model.state_dict(), extra_files={"tokenizer.json": tok_file})
        out = str(tmp_path / "res")
        depths = ["0", "25", "50", "75", "100"]
        assert run(["--model", ckpt, "--len", "256", "512", "--depths", *depths, "--results", out]) == 0
        found = cells(out)
        assert len(found) == 10
        assert all(c["score"] == 100 and c["answer"].strip() == "417" for c in found.values())
        assert {c["needle_position"] for c in found.values() if c["depth"] == 100} != {0}
        # Control: with another code in the needle the same model still says 417 (it learned
        # the answer, not to copy), so the keyword is missing and the score falls below 20,
        # the edit-similarity fifth. The 100s above are earned by the answer, not the scorer.
        other = str(tmp_path / "other")
        assert run(["--model", ckpt, "--len", "256", "--depths", "0", "100", "--results", other,
                    "--needle", NEEDLE.replace("417", "582"), "--keyword", "582"]) == 0
        assert all(c["score"] < 20 and c["answer"].strip() == "417" for c in cells(other).values())
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# Perplexity

def test_ppl_of_a_model_with_a_known_distribution_is_exact(tmp_path, tok):
    """With attn_out and the blocks' ff_out at zero every block is the identity, so the hidden
    state of a masked position is ln_f(wte[MASK]) whatever the context: the model predicts one
    fixed distribution q. A document whose 64-token chunks each repeat one token then has the
    exact per-chunk NLL -log q[token] for every Monte Carlo draw, and the exact perplexity."""
    path, model = tiny_checkpoint(tmp_path / "const", seed=1, init_std=0.5)
    sd, q = constant_model(model)
    save_pretrained(path, model.config, sd)
    words = [" apple", " river", " stone", " cloud"]
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "long.txt").write_text("".join(w * 64 for w in words))  # 4 chunks of 64
    (docs / "short.txt").write_text(" lamp" * 64)  # too short for --len 256
    ids = [tok.encode(w)[0] for w in words]
    assert tok.encode("".join(w * 64 for w in words)) == [i for i in ids for _ in range(64)]
    out = str(tmp_path / "res")
    assert run(["--task", "ppl", "--model", path, "--len", "256", "--data", str(docs),
                "--cache-dir", str(tmp_path / "cache"), "--results", out]) == 0
    cell = cells(out)["ppl_len256_doc0_rope-ckpt.json"]
    assert (cell["document"], cell["document_tokens"], cell["bos"]) == ("long.txt", 256, None)
    exact = [-math.log(q[i]) for i in ids]
    assert cell["chunk_nll"] == pytest.approx(exact[1:], rel=1e-4)  # chunk 0 is context only
    assert cell["perplexity"] == pytest.approx(math.exp(sum(exact[1:]) / 3), rel=1e-4)
    assert cell["cumulative_perplexity"][1] == pytest.approx(math.exp(sum(exact[1:3]) / 2), rel=1e-4)
    assert len(set(np.round(exact, 3))) == 4  # q is far from uniform: a wrong chunk would show
    with open(os.path.join(out, "ppl_vs_position.png"), "rb") as f:
        assert f.read(4) == b"\x89PNG"
    assert f"| 256 | ckpt | 1 | {cell['perplexity']:.3f} |" in (tmp_path / "res" / "table_ppl.md").read_text()


def constant_model(model):
    """The weights of `model` with attn_out and the blocks' ff_out at zero, and the one
    distribution q it then predicts at every masked position (see the test above)."""
    sd = model.state_dict()
    for name in sd:
        if name.endswith("attn_out.weight") or (".blocks." in name and name.endswith("ff_out.weight")):
            sd[name] = torch.zeros_like(sd[name])
    model.load_state_dict(sd)
    mask = model.config.mask_token_id
    with torch.no_grad():
        q = torch.softmax(model.head(model.transformer.ln_f(model.transformer.wte.weight[mask])).double(), 0)
    return sd, q


def test_ppl_puts_the_tokenizers_bos_first_and_scores_the_chosen_document(tmp_path):
    """LongLLaDA scores tokenizer(text), which starts with BOS for a tokenizer that adds one.
    With BOS first, a document of 63 + 64 + 64 + 64 repeated words fills chunk 0 with BOS and
    the 63, and chunks 1-3 with one word each: their NLLs are exactly -log q[word]. Without
    the BOS every chunk would straddle two words and come out a random mix. The default is the
    longest document; --document names another, and each cell says which it scored."""
    words = ["<s>", "</s>", "[UNK]", "apple", "river", "stone", "cloud", "lamp", "[MASK]"]
    vocab = {w: i for i, w in enumerate(words)}
    path = tmp_path / "bos"
    hf = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    path.mkdir()
    hf.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True, "bos_token": "<s>"}))
    torch.manual_seed(1)
    cfg = preset("tiny", d_model=32, n_heads=2, n_kv_heads=2, mlp_hidden_size=64, n_layers=1,
                 init_std=0.5, vocab_size=len(words), embedding_size=len(words), eos_token_id=1,
                 pad_token_id=1, mask_token_id=vocab["[MASK]"])
    sd, q = constant_model(LLaDA(cfg))
    ckpt = str(tmp_path / "ckpt")
    save_pretrained(ckpt, cfg, sd, extra_files={n: str(path / n) for n in
                                                 ("tokenizer.json", "tokenizer_config.json")})
    docs = tmp_path / "docs"
    docs.mkdir()
    text = lambda runs: " ".join(" ".join([w] * n) for w, n in runs)
    (docs / "book.txt").write_text(text([("apple", 63), ("river", 64), ("stone", 64), ("cloud", 64)]))
    (docs / "longest.txt").write_text(text([("lamp", 63), ("cloud", 64), ("river", 64), ("apple", 64),
                                            ("stone", 10)]))
    nll = lambda w: -math.log(q[vocab[w]])
    assert len({round(nll(w), 3) for w in ("apple", "river", "stone", "cloud")}) == 4
    common = ["--task", "ppl", "--model", ckpt, "--len", "256", "--data", str(docs),
              "--cache-dir", str(tmp_path / "cache")]
    for extra, name, tokens, scored in [([], "longest.txt", 265, ["cloud", "river", "apple"]),
                                        (["--document", "book.txt"], "book.txt", 255,
                                         ["river", "stone", "cloud"])]:
        out = str(tmp_path / f"res-{name}")
        assert run(common + extra + ["--results", out]) == 0
        cell = cells(out)["ppl_len256_doc0_rope-ckpt.json"]
        assert (cell["document"], cell["document_tokens"], cell["bos"]) == (name, tokens, 0)
        assert cell["chunk_nll"] == pytest.approx([nll(w) for w in scored], rel=1e-4)
        assert cell["perplexity"] == pytest.approx(math.exp(sum(nll(w) for w in scored) / 3), rel=1e-4)


# ---------------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit code 2, no results folder.

@pytest.fixture(scope="module")
def no_tokenizer_ckpt(tmp_path_factory):
    # special ids that are not cl100k's reserved ones, no tokenizer.json, no marker
    path, _ = tiny_checkpoint(tmp_path_factory.mktemp("bare") / "m", vocab_size=300,
                              embedding_size=320, eos_token_id=298, pad_token_id=298,
                              mask_token_id=299)
    config = os.path.join(path, "config.json")
    with open(config) as f:
        cfg = json.load(f)
    cfg.pop("tokenizer")
    with open(config, "w") as f:
        json.dump(cfg, f)
    return path


@pytest.fixture(scope="module")
def small_haystack(tmp_path_factory):
    d = tmp_path_factory.mktemp("hay")
    (d / "essay.txt").write_text("The farmer walked near the hill. " * 40)  # about 280 tokens
    return str(d)


BAD = [
    (["--len", "4096"], "no checkpoint in out/checkpoint; run train.py first, or pass --model DIR"),
    (["--model", "{ckpt}", "--len", "300", "--depths", "0", "110"], "--depths must lie in 0..100"),
    (["--model", "{ckpt}", "--len", "300", "--depths", "-10"], "--depths must lie in 0..100"),
    (["--model", "{ckpt}", "--len", "300", "--haystack", "{tmp}/nowhere"], "is not a folder"),
    (["--model", "{ckpt}", "--len", "131072", "--haystack", "{hay}"],
     "holds only"),
    (["--model", "{ckpt}", "--len", "20"], "cannot hold the needle"),
    (["--model", "{bare}", "--len", "300"], "has no tokenizer"),
    (["--model", "{ckpt}", "--len", "300", "--keyword", "418"], "does not occur in --needle"),
    (["--model", "{ckpt}", "--len", "300", "--train-len", "128"], "only apply with --rope"),
    (["--model", "{ckpt}", "--len", "300", "--steps", "0"], "--steps: must be above 0"),
    (["--model", "{ckpt}"], "--task niah needs --len"),
    (["--model", "{ckpt}", "--task", "ppl", "--len", "100"], "not a multiple of --chunk-size 64"),
    (["--model", "{ckpt}", "--task", "ppl", "--len", "1024", "--data", "{hay}", "--cache-dir",
      "{tmp}/cache"], "has 1024 tokens (the longest has"),
    (["--model", "{ckpt}", "--task", "ppl", "--len", "128", "--document", "x.txt"],
     "--document names a file inside --data; pass --data DIR too"),
    (["--model", "{ckpt}", "--task", "ppl", "--len", "128", "--data", "{hay}", "--document",
      "x.txt"], "--document x.txt: no such file in"),
    (["--model", "{ckpt}", "--task", "ppl", "--len", "1024", "--data", "{hay}", "--document",
      "essay.txt"], "fewer than --len 1024"),
    # sizes that cannot exist are refused before any work (a typo away from 1,000,000)
    (["--model", "{ckpt}", "--len", "1000000000"],
     "this run's largest forward (1,000,000,032 tokens) needs at least"),
    (["--model", "{ckpt}", "--task", "ppl", "--len", "1000000000"], "GiB available"),
    (["--model", "{ckpt}", "--len", "300", "--gen-length", "1000000000", "--block-length",
      "1000000000", "--steps", "1"], "needs at least"),
    (["--model", "{ckpt}", "--len", "300", "--repeats", "1000000000"],
     "would have 11,000,000,000 cells"),
    (["--model", "{ckpt}", "--task", "ruler", "--len", "1024", "--samples", "1000000000"],
     "pass fewer --len, --ruler-tasks or --samples"),
    # inputs that would make a score meaningless
    (["--model", "{ckpt}", "--len", "300", "--keyword", " "], "is blank: every answer"),
]


@pytest.mark.parametrize("argv, message", BAD, ids=[m for _, m in BAD])
def test_bad_input_is_one_line_and_writes_nothing(argv, message, ckpt, no_tokenizer_ckpt,
                                                   small_haystack, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # so that the default out/checkpoint and results/ are here
    fill = dict(ckpt=ckpt, bare=no_tokenizer_ckpt, hay=small_haystack, tmp=str(tmp_path))
    out = str(tmp_path / "res")
    argv = [a.format(**fill) for a in argv]
    assert run(argv + (["--results", out] if "--model" in argv else [])) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not os.path.exists(out) and not os.path.exists(tmp_path / "results")


def test_a_full_disk_is_one_line_naming_the_result_file_and_leaves_nothing_half_written(
        ckpt, tmp_path, monkeypatch, capsys):
    import errno

    from harness import files

    writes = []

    def full(fd):  # the folder's settings record goes in; the disk is full by the first cell
        writes.append(fd)
        if len(writes) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(results, "generate", fake_generate([" 417."], []))
    monkeypatch.setattr(files.os, "fsync", full)  # every atomic write fails at its flush
    out = tmp_path / "res"
    assert run(["--model", ckpt, "--len", "300", "--depths", "50", "--results", str(out)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(err) == 1 and err[0].startswith("error: cannot write ") and \
        "No space left on device" in err[0] and "niah_len300_depth050" in err[0]
    assert "Traceback" not in err[0]
    assert not [n for n in os.listdir(out) if n.endswith(".tmp") or
                (n.endswith(".json") and not n.startswith("."))]


def huge_weights_checkpoint(path) -> str:
    """A checkpoint whose weights are finite but whose forward overflows to inf and NaN, as a
    broken one does (a NaN norm, rope_theta 0): finite weights pass the loader's checks."""
    path, model = tiny_checkpoint(path)
    # the gated MLP multiplies two 1e20-scaled branches: 1e40 overflows float32
    state = {k: v * (1e20 if "up_proj" in k or "ff_proj" in k else 1)
             for k, v in model.state_dict().items()}
    config = read_config(path)
    save_pretrained(path, config, state)
    return path


@pytest.mark.parametrize("task", [["--task", "niah", "--len", "300", "--depths", "50"],
                                  ["--task", "ppl", "--len", "128", "--cache-dir", "{tmp}"]],
                         ids=["niah", "ppl"])
def test_a_non_finite_forward_stops_the_run_naming_the_cell(task, tmp_path, capsys):
    ckpt = huge_weights_checkpoint(tmp_path / "broken")
    out = tmp_path / "res"
    task = [a.format(tmp=tmp_path / "cache") for a in task]
    assert run(["--model", ckpt, *task, "--results", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("error: ") == 1 and "Traceback" not in err
    assert "hidden states are not finite" in err and f"cell {task[1]}_len" in err
    assert not cells(out)  # no score of 0 written for a broken model


def test_damaged_result_files_are_done_again(ckpt, tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(results, "generate", fake_generate([" 417."], calls))
    out = tmp_path / "res"
    argv = ["--model", ckpt, "--len", "300", "--depths", "0", "50", "100", "--results", str(out)]
    assert run(argv) == 0 and len(calls) == 3
    names = sorted(cells(out))
    (out / names[0]).write_text(json.dumps({**cells(out)[names[0]], "score": "x"}))
    (out / names[1]).write_text(json.dumps({**cells(out)[names[1]], "score": float("nan")}))
    os.remove(out / names[2])
    os.mkfifo(out / names[2])  # opening it would wait for a writer forever
    capsys.readouterr()
    assert run(argv) == 0
    assert "3 cells to run (0 already done)" in capsys.readouterr().out and len(calls) == 6
    assert all(isinstance(c["score"], float) and c["score"] == 100 for c in cells(out).values())
    assert all(os.path.isfile(out / n) for n in names)


def test_a_named_pipe_in_the_haystack_folder_is_refused_not_opened(ckpt, tmp_path, capsys):
    hay = tmp_path / "hay"
    hay.mkdir()
    (hay / "b.txt").write_text("The farmer walked near the hill. " * 400)
    os.mkfifo(hay / "a.txt")  # sorts first: it would be opened first
    assert run(["--model", ckpt, "--len", "300", "--haystack", str(hay), "--results",
                str(tmp_path / "res")]) == 2
    err = capsys.readouterr().err
    assert f"{hay / 'a.txt'} is a named pipe, not a regular file" in err and err.count("\n") == 1


def test_a_results_folder_inside_a_checkpoint_is_refused(ckpt, tmp_path, capsys):
    inside = os.path.join(ckpt, "evals")
    assert run(["--model", ckpt, "--len", "300", "--results", inside]) == 2
    err = capsys.readouterr().err
    assert "lies inside the checkpoint folder" in err and err.count("\n") == 1
    assert not os.path.exists(inside)


def test_a_depth_given_twice_is_one_cell(ckpt, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(results, "generate", fake_generate([" 417."], calls))
    assert run(["--model", ckpt, "--len", "300", "--depths", "50", "50", "50", "--results",
                str(tmp_path / "res")]) == 0
    assert len(calls) == 1 and len(cells(tmp_path / "res")) == 1


# ---------------------------------------------------------------------------------------------
# Many processes on one results folder: torchrun, independent jobs, a process killed mid-cell.

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}  # one thread each
GRID = ["--len", "256", "320", "--depths", *map(str, range(0, 101, 10)), "--repeats", "2"]


def launch(ckpt, results_folder, processes=1):
    """evaluate.py as a user starts it, alone or under torchrun (gloo on the CPU)."""
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
            str(processes)] if processes > 1 else [sys.executable])
    return subprocess.Popen(cmd + ["evaluate.py", "--model", ckpt, *GRID, "--results",
                                   str(results_folder)], cwd=ROOT, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(p, timeout=600) -> str:
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, err[-3000:]
    return out


def comparable(folder) -> dict:
    """Every cell without the fields that say when and where it ran."""
    return {name: {k: v for k, v in cell.items() if k not in ("seconds", "finished", "process")}
            for name, cell in cells(folder).items()}


def journal(folder) -> list[dict]:
    with open(os.path.join(folder, ".journal-niah.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def one_process(ckpt, tmp_path_factory):
    """The reference: the whole grid in one plain process."""
    folder = tmp_path_factory.mktemp("one") / "res"
    finish(launch(ckpt, folder))
    return folder


def test_torchrun_spreads_the_cells_and_gives_what_one_process_gives(ckpt, one_process, tmp_path):
    folder = tmp_path / "res"
    printed = finish(launch(ckpt, folder, processes=2))
    reference = comparable(one_process)
    assert len(reference) == 2 * 11 * 2 and comparable(folder) == reference
    assert (folder / "niah_table_rope-ckpt.md").read_text() == \
        (one_process / "niah_table_rope-ckpt.md").read_text()
    done = journal(folder)
    assert sorted(d["cell"] for d in done) == sorted(reference)  # each cell computed once
    assert {d["process"].split(" rank ")[1] for d in done} == {"0 on cpu", "1 on cpu"}  # both
    assert printed.count("rope ckpt: average") == 1  # rank 0 alone reports
    assert "2 processes" in printed and "44 cells to run" in printed


def test_a_process_killed_mid_run_leaves_its_cell_to_the_next_run(ckpt, one_process, tmp_path):
    folder = tmp_path / "res"
    p = launch(ckpt, folder)
    deadline = time.monotonic() + 300
    while len(cells(folder) if folder.exists() else {}) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.communicate()
    before = len(cells(folder))
    assert 3 <= before < 44
    printed = finish(launch(ckpt, folder))
    assert f"{44 - before} cells to run ({before} already done)" in printed
    assert comparable(folder) == comparable(one_process)
    assert os.listdir(folder / ".claims") == []  # the killed process's claim went with its cell
    assert (folder / "niah_table_rope-ckpt.md").read_text() == \
        (one_process / "niah_table_rope-ckpt.md").read_text()


def test_two_independent_processes_share_a_folder_without_repeating_a_cell(ckpt, one_process,
                                                                          tmp_path):
    folder = tmp_path / "res"
    first, second = launch(ckpt, folder), launch(ckpt, folder)
    printed = [finish(first), finish(second)]
    assert comparable(folder) == comparable(one_process)
    done = journal(folder)
    assert sorted(d["cell"] for d in done) == sorted(comparable(one_process))  # once each
    assert len({d["process"] for d in done}) == 2  # both worked
    assert all("rope ckpt: average" in text for text in printed)  # each waited, then reported


def test_a_second_process_with_other_settings_is_refused(ckpt, one_process, tmp_path):
    r = subprocess.run([sys.executable, "evaluate.py", "--model", ckpt, *GRID, "--needle",
                        "The secret code of Mira Holt is 418.", "--keyword", "418",
                        "--results", str(one_process)], cwd=ROOT, env=ENV, text=True,
                       capture_output=True, timeout=300)
    assert r.returncode == 2 and "holds results made with other settings" in r.stderr
    assert "needle" in r.stderr and r.stderr.count("\n") == 1


def test_a_cell_finished_elsewhere_meanwhile_is_not_redone_and_leaves_no_claim(tmp_path):
    """claim_cells lists the folder, then walks the cells: one written by another process in
    between is skipped, and its claim file goes like any other."""
    folder = str(tmp_path)
    names = ["niah_a.json", "niah_b.json"]
    calls = []

    def evaluate_one(name):
        calls.append(name)
        results.write_json(os.path.join(folder, "niah_b.json"), {"score": 1.0, "by": "other"})
        return {"score": 2.0}

    heard = []
    results.claim_cells(folder, "niah", names, evaluate_one, wait=False,
                        progress=lambda n, waiting: heard.append(n))
    assert calls == ["niah_a.json"]
    assert cells(folder)["niah_b.json"]["by"] == "other"  # not redone
    assert os.listdir(os.path.join(folder, ".claims")) == []
    assert heard[0] == 0 and heard[-1] == 2  # the bar hears the finished count


# ---------------------------------------------------------------------------------------------
# evaluate.py

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


