"""Tests for evaluate.py and harness/results.py, run as a user runs them: our NIAH's prompts
(needle placement, exact lengths), resuming and sharing a results folder (processes, torchrun,
jobs, a kill), RoPE per length, a trained tiny model finding its needle, exact perplexity, and
every bad input answered in one line before any work. CPU only; checkpoints are made here."""
import dataclasses
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers

import evaluate
from bench.gloo_abort_repro import busy_cores, run_under_load
from evaluations import decoding, niah
from harness import prepare, results
from harness.checkpoint import read_config, save_pretrained
from harness.files import lock_folder
from harness.tokenizer import tiktoken_tokenizer
from model import LLaDA, preset
from rope import scale_rope
from scripts import ENV, ROOT
from tiny import tiny_checkpoint


@pytest.fixture(scope="module")
def tok():
    return tiktoken_tokenizer()


def run(argv) -> int:
    """evaluate.main in-process; the exit code (0 when it returns)."""
    try:
        evaluate.main([str(a) for a in argv])
    except SystemExit as e:
        return e.code
    return 0


def cells(folder):
    """Every result JSON of a results folder, by file name."""
    return {name: json.load(open(os.path.join(folder, name))) for name in sorted(os.listdir(folder))
            if name.endswith(".json") and not name.startswith(".")}  # not the folder's records


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


def one_line(capsys, *fragments) -> str:
    """The run said one line, `error: ...` holding every fragment (progress bars aside)."""
    err = capsys.readouterr().err
    errors = [line for line in err.split("\n") if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert all(f in errors[0] for f in fragments), err
    return errors[0]


# ---------------------------------------------------------------------------------------------
# The flags and our NIAH's prompts

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


def is_sentence_end(tok, ids, j):
    """What the prompt builder promises at a boundary j: '.', '!' or '?' before, a space after."""
    return tok.decode([ids[j - 1]]).rstrip("\"')]")[-1:] in ".!?" and tok.decode([ids[j]])[:1].isspace()


def prompts(tok, cfg, length, repeat=0):
    """The haystack window of a cell and its prompt at each depth 0, 10, ..., 100."""
    _, work, _ = niah.plan(cfg, tok, tok)
    n = length - len(work["needle"]) - len(work["tail"])
    window = niah.haystack_window(work["pool"], work["bounds"], n, repeat)
    bounds = niah.sentence_boundaries(window, tok)
    return work, window, [niah.niah_prompt(window, bounds, work["needle"], work["tail"], d)
                          for d in range(0, 101, 10)]


@pytest.mark.parametrize("L", [200, 1000, 4096])
def test_needle_sits_at_each_depth_and_the_prompt_has_exactly_len_tokens(tok, L):
    cfg = evaluate.task_config("niah")(len=[L])
    work, window, made = prompts(tok, cfg, L)
    needle, tail, n = work["needle"], work["tail"], len(window)
    # the haystack ends at a sentence end, so at 100% the needle is the last sentence
    assert tok.decode([int(window[-1])]).rstrip("\"')]")[-1] in ".!?"
    for depth, (ids, p) in zip(range(0, 101, 10), made):
        assert len(ids) == L == n + len(needle) + len(tail)  # --len counts the whole prompt
        assert ids[p:p + len(needle)] == needle and ids[-len(tail):] == tail
        assert ids[:p] + ids[p + len(needle):-len(tail)] == window.tolist()
        target = n * depth // 100  # the last sentence boundary at or before the depth
        assert 0 < p < n and is_sentence_end(tok, window, p) or p in (0, n)
        assert p <= target or p == int(np.flatnonzero(niah.sentence_boundaries(window, tok))[0])
        assert not any(is_sentence_end(tok, window, j) for j in range(p + 1, min(target, n - 1) + 1))
        text = tok.decode(ids)
        assert len(tok.encode(text)) == L  # the text itself is L cl100k tokens, not just the ids
        assert text.count(cfg.needle) == 1 and text.endswith(cfg.separator + cfg.question)
    positions = [p for _, p in made]
    assert positions[0] < 20 and positions[-1] == n  # first and last sentence of the haystack
    assert positions == sorted(positions) and len(set(positions)) == 11
    # filler sentences are at most ~15 tokens: the needle is never far from its depth
    assert all(abs(n * d // 100 - p) < 20 for d, p in zip(range(0, 101, 10), positions))


def test_a_haystack_folder_is_read_in_order_and_repeats_read_different_text(tok, tmp_path):
    rng = random.Random(0)
    for i in range(3):  # sentences ending in . ! ? and closing quotes, as in real books
        sents = [prepare.filler_sentence(rng)[:-1] + rng.choice([".", "!", "?", '."', "?'"])
                 for _ in range(80)]  # about 700 tokens each: all three are needed
        (tmp_path / f"book{i}.txt").write_text(" ".join(sents))
    cfg = evaluate.task_config("niah")(len=[600], haystack=str(tmp_path), repeats=3,
                                       needle="Zara keeps a red kite.", keyword="red kite",
                                       question="What does Zara keep?", separator="\n\n")
    texts = [(tmp_path / f"book{i}.txt").read_text() for i in range(3)]
    _, work, source = niah.plan(cfg, tok, tok)
    assert source == str(tmp_path)
    assert work["pool"].tolist() == sum((tok.encode(t + "\n\n") for t in texts), [])
    windows = []
    for r in range(3):
        work, window, made = prompts(tok, cfg, 600, repeat=r)
        windows.append(tok.decode(window.tolist()))
        for ids, p in made:
            assert len(ids) == 600 and ids[p:p + len(work["needle"])] == work["needle"]
            assert p in (0, len(window)) or is_sentence_end(tok, window, p)
            assert tok.decode(ids).count(cfg.needle) == 1
    assert len(set(windows)) == 3
    assert 0 <= texts[0].find(windows[0]) < 100  # repeat 0 reads from the first sentence


# ---------------------------------------------------------------------------------------------
# One results folder: resuming, settings, reports, RoPE per length

def test_a_rerun_does_only_what_is_missing_or_damaged_and_other_settings_are_refused(
        tiny_ckpt, tmp_path, monkeypatch, capsys):
    out = tmp_path / "res"
    argv = ["--model", tiny_ckpt, "--len", 200, 300, "--depths", 0, 100, 100, "--results", out]
    calls = []
    generate = fake_generate([" 417."], calls)

    def interrupted(*a, **kw):
        if len(calls) == 2:
            raise KeyboardInterrupt
        return generate(*a, **kw)
    monkeypatch.setattr(decoding, "generate", interrupted)
    assert run(argv) == 130  # stopped during the third cell
    first = cells(out)
    assert len(first) == 2 and not [n for n in os.listdir(out) if n.endswith(".tmp")]
    stamps = {n: os.stat(out / n).st_mtime_ns for n in first}
    assert "4 cells to run (0 already done)" in capsys.readouterr().out  # a depth given twice: once

    monkeypatch.setattr(decoding, "generate", generate)
    assert run(argv) == 0 and len(calls) == 2 + 2  # only the two missing cells ran
    assert len(cells(out)) == 4 and {n: os.stat(out / n).st_mtime_ns for n in first} == stamps
    assert "2 cells to run (2 already done)" in capsys.readouterr().out
    assert run(argv) == 0 and len(calls) == 4
    assert "all 4 cells are done" in capsys.readouterr().out
    assert run(argv + ["--overwrite"]) == 0 and len(calls) == 8
    # damaged result files are done again: not a number, NaN, a named pipe (opening it would
    # wait for a writer forever)
    names = sorted(cells(out))
    (out / names[0]).write_text(json.dumps({**cells(out)[names[0]], "score": "x"}))
    (out / names[1]).write_text(json.dumps({**cells(out)[names[1]], "score": math.nan}))
    os.remove(out / names[2])
    os.mkfifo(out / names[2])
    capsys.readouterr()
    assert run(argv) == 0 and len(calls) == 11
    assert "3 cells to run (1 already done)" in capsys.readouterr().out
    assert all(c["score"] == 100.0 for c in cells(out).values())

    # other settings in the same folder are refused, naming the difference, and --overwrite
    # replaces them (every planned cell is one of the other settings': removed once)
    assert run(argv + ["--steps", 8]) == 2
    one_line(capsys, "holds results made with other settings", "steps 16 there, 8 here")
    assert run(argv + ["--steps", 8, "--overwrite"]) == 0 and len(calls) == 15
    assert {c["settings"]["steps"] for c in cells(out).values()} == {8}
    capsys.readouterr()

    # a folder set up by a run that wrote no cell: refused as set up, not as holding results
    monkeypatch.setattr(decoding, "generate", lambda *a, **kw: (_ for _ in ()).throw(KeyboardInterrupt))
    assert run([*argv[:-1], tmp_path / "fresh"]) == 130 and not cells(tmp_path / "fresh")
    capsys.readouterr()
    assert run([*argv[:-1], tmp_path / "fresh", "--keyword", "Holt"]) == 2
    one_line(capsys, "was set up by a run with other settings", "keyword '417' there, 'Holt' here")


def test_heatmap_and_table_are_made_from_every_cell(tiny_ckpt, tmp_path, monkeypatch, capsys):
    # repeat 0 finds the keyword, repeat 1 answers nonsense: every cell averages the two
    # (cells run length by length, repeat by repeat, depth by depth)
    monkeypatch.setattr(decoding, "generate", fake_generate([" 417.", " 417.", "", ""], []))
    assert run(["--model", tiny_ckpt, "--len", 200, "--depths", 0, 50, "--repeats", 2,
                "--results", tmp_path]) == 0
    monkeypatch.setattr(decoding, "generate", fake_generate([" 417."], []))
    assert run(["--model", tiny_ckpt, "--len", 1024, "--depths", 0, 50, "--results", tmp_path]) == 0
    assert (tmp_path / "niah_heatmap_rope-ckpt.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (tmp_path / "niah_table_rope-ckpt.md").read_text()
    assert "| depth \\ length | 200 | 1K |" in table
    assert "| 0% | 50.00 | 100.00 |" in table and "| 50% | 50.00 | 100.00 |" in table
    assert "| **average** | **50.00** | **100.00** |" in table
    assert "rope ckpt: average 75.00" in table  # two decimals, as OpenCompass's summarizer
    assert "| 0% | 50.00 | 100.00 |" in capsys.readouterr().out  # and the summary shows it


def test_the_rope_base_is_rescaled_per_length_multiplied_by_a_factor_or_kept(
        tiny_ckpt, tmp_path, monkeypatch, capsys):
    calls, forwards = [], []
    monkeypatch.setattr(decoding, "generate", fake_generate([" 417."], calls))  # no forwards
    real_forward = LLaDA.forward
    monkeypatch.setattr(LLaDA, "forward", lambda self, x, *a, **kw:
                        forwards.append(x.shape[1]) or real_forward(self, x, *a, **kw))
    base = read_config(tiny_ckpt).rope_theta
    common = ["--model", tiny_ckpt, "--len", 200, 8192, "--depths", 50]
    assert run(common + ["--rope", "diffusion", "--train-len", 128, "--prompt-cache",
                         "--results", tmp_path / "diffusion"]) == 0
    found = cells(tmp_path / "diffusion")
    for call in calls:
        L = call["prompt"].shape[1]
        want = scale_rope("diffusion", L, 128, 16, base)
        assert call["rope_theta"] == pytest.approx(want["rope_theta"])  # what the model ran with
        assert call["cache"] == "prefix" and call["steps"] == 16 and call["gen_length"] == 32
        cell = found[f"niah_len{L}_depth050_rep0_rope-diffusion-train128.json"]
        assert cell["rope_scaling"]["lambda"] == pytest.approx(want["lambda"])
        assert cell["settings"]["prompt_cache"] is True and cell["score"] == 100
    assert calls[1]["rope_theta"] > 10 * calls[0]["rope_theta"]  # lambda grows with the length
    # The run-time estimate times a short input and scales it by FLOPs (one forward at 128K
    # takes minutes on a CPU), and the end of the run compares it with the time taken.
    assert forwards and max(forwards) <= 1024
    printed = capsys.readouterr().out
    assert re.search(r"2 cells to run \(0 already done\); estimate \d+ s", printed)
    assert re.search(r"ran 2 cells in \d+ s \([\d.e+-]+ cells/s; estimated \d+ s\)", printed)
    # --rope-factor: the authors' rule, the saved base times one factor at every length
    calls.clear()
    assert run(common + ["--rope-factor", 14, "--results", tmp_path / "factor"]) == 0
    assert [call["rope_theta"] for call in calls] == [base * 14, base * 14]
    assert sorted(cells(tmp_path / "factor")) == ["niah_len200_depth050_rep0_rope-factor14.json",
                                                  "niah_len8192_depth050_rep0_rope-factor14.json"]
    # neither: the checkpoint's base as saved, and exact decoding
    calls.clear()
    assert run(common + ["--results", tmp_path / "saved"]) == 0
    assert [c["rope_theta"] for c in calls] == [base, base] and calls[0]["cache"] is None


# ---------------------------------------------------------------------------------------------
# A tiny model trained on the needle finds it. It gets a word-level tokenizer.json (the path
# LLaDA-8B's tokenizer takes: the cl100k prompt's text re-encoded by the model's own tokenizer):
# with cl100k's 100K-row head each step costs ~50x more and the model does not learn in time.

NEEDLE, QUESTION = "The secret code of Mira Holt is 417.", "What is the secret code of Mira Holt? It is"


def train_on_the_needle(path, steps=200, batch=8, gen=32, seed=0):
    """A word-level model trained with answer-only masked diffusion (LLaDA's SFT loss) on
    haystack + needle + question -> "417" and EOS padding; haystacks of 64 to 448 tokens, the
    needle at any sentence end. Saved at `path` with its tokenizer."""
    words = sorted({w for ws in prepare.WORDS.values() for w in ws} | set(
        "The In A Nobody the was saw that What is secret code of Mira Holt It".split()))
    vocab = {w: i for i, w in enumerate(["[UNK]", ".", "?", "417", "582"] + words)}
    hf = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    os.makedirs(path)
    hf.save(os.path.join(path, "tok.json"))
    cfg = preset("tiny", d_model=64, n_heads=2, n_kv_heads=2, mlp_hidden_size=128,
                 vocab_size=len(vocab) + 2, embedding_size=len(vocab) + 2, eos_token_id=len(vocab),
                 pad_token_id=len(vocab), mask_token_id=len(vocab) + 1)
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
    save_pretrained(os.path.join(path, "ckpt"), cfg, model.state_dict(),
                    extra_files={"tokenizer.json": os.path.join(path, "tok.json")})
    return os.path.join(path, "ckpt")


def test_a_model_trained_on_the_needle_finds_it_at_every_depth_and_length(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small ops: one thread is as fast, and steady when cores are shared
    try:
        ckpt = train_on_the_needle(str(tmp_path / "trained"))
        assert run(["--model", ckpt, "--len", 256, 512, "--depths", 0, 25, 50, 75, 100,
                    "--results", tmp_path / "res"]) == 0
        found = cells(tmp_path / "res")
        assert len(found) == 10
        assert all(c["score"] == 100 and c["answer"].strip() == "417" for c in found.values())
        assert {c["needle_position"] for c in found.values() if c["depth"] == 100} != {0}
        # Control: with another code in the needle the same model still says 417 (it learned
        # the answer, not to copy), so the keyword is missing and the score falls below 20,
        # the edit-similarity fifth. The 100s above are earned by the answer, not the scorer.
        assert run(["--model", ckpt, "--len", 256, "--depths", 0, 100, "--results", tmp_path / "other",
                    "--needle", NEEDLE.replace("417", "582"), "--keyword", "582"]) == 0
        assert all(c["score"] < 20 and c["answer"].strip() == "417"
                   for c in cells(tmp_path / "other").values())
        # float16, as the authors' wrapper loads LLaDA: the same answers, on the CPU too
        assert run(["--model", ckpt, "--len", 256, "--depths", 0, 100, "--dtype", "float16",
                    "--results", tmp_path / "half"]) == 0
        assert [c["answer"] for c in cells(tmp_path / "half").values()] == \
            [found[n]["answer"] for n in sorted(cells(tmp_path / "half"))]
        assert {c["settings"]["dtype"] for c in cells(tmp_path / "half").values()} == {"float16"}
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# Perplexity

def constant_model(model):
    """The weights of `model` with attn_out and the blocks' ff_out at zero, and the one
    distribution q it then predicts at every masked position (see the test below)."""
    sd = model.state_dict()
    for name in sd:
        if name.endswith("attn_out.weight") or (".blocks." in name and name.endswith("ff_out.weight")):
            sd[name] = torch.zeros_like(sd[name])
    model.load_state_dict(sd)
    mask = model.config.mask_token_id
    with torch.no_grad():
        q = torch.softmax(model.head(model.transformer.ln_f(model.transformer.wte.weight[mask])).double(), 0)
    return sd, q


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
    out = tmp_path / "res"
    assert run(["--task", "ppl", "--model", path, "--len", 256, "--data", docs,
                "--cache-dir", tmp_path / "cache", "--results", out]) == 0
    cell = cells(out)["ppl_len256_doc0_rope-ckpt.json"]
    assert (cell["document"], cell["document_tokens"], cell["bos"]) == ("long.txt", 256, None)
    exact = [-math.log(q[i]) for i in ids]
    assert cell["chunk_nll"] == pytest.approx(exact[1:], rel=1e-4)  # chunk 0 is context only
    assert cell["perplexity"] == pytest.approx(math.exp(sum(exact[1:]) / 3), rel=1e-4)
    assert cell["cumulative_perplexity"][1] == pytest.approx(math.exp(sum(exact[1:3]) / 2), rel=1e-4)
    assert len(set(np.round(exact, 3))) == 4  # q is far from uniform: a wrong chunk would show
    assert (out / "ppl_vs_position.png").read_bytes()[:4] == b"\x89PNG"
    assert f"| 256 | ckpt | 1 | {cell['perplexity']:.2f} |" in (out / "table_ppl.md").read_text()


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
    common = ["--task", "ppl", "--model", ckpt, "--len", 256, "--data", docs,
              "--cache-dir", tmp_path / "cache"]
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
# Bad input and broken runs: one line on stderr, and nothing written.

@pytest.fixture(scope="module")
def odd(tmp_path_factory, tiny_ckpt):
    """Inputs a user gets wrong: a checkpoint without a tokenizer, a short haystack folder, one
    holding a named pipe, a checkpoint whose shard is cut short."""
    d = tmp_path_factory.mktemp("odd")
    path, _ = tiny_checkpoint(d / "bare", vocab_size=300, embedding_size=320, eos_token_id=298,
                              pad_token_id=298, mask_token_id=299)
    config = json.load(open(d / "bare" / "config.json"))
    config.pop("tokenizer")
    json.dump(config, open(d / "bare" / "config.json", "w"))
    (d / "hay").mkdir()
    (d / "hay" / "essay.txt").write_text("The farmer walked near the hill. " * 40)  # ~280 tokens
    (d / "pipe").mkdir()
    (d / "pipe" / "b.txt").write_text("The farmer walked near the hill. " * 400)
    os.mkfifo(d / "pipe" / "a.txt")  # sorts first: it would be opened first
    tiny_checkpoint(d / "cut")
    data = (d / "cut" / "model.safetensors").read_bytes()
    (d / "cut" / "model.safetensors").write_bytes(data[:100])
    return d


BAD = [  # arguments ({ckpt}, {odd}: the fixtures), and a fragment of the one line
    (["--len", 4096, "--model", "out/checkpoint"], "no checkpoint in out/checkpoint; run train.py first"),
    (["--len", 512, "--model", "{odd}/cut"], "model.safetensors is damaged"),
    (["--len", 300, "--model", "{odd}/bare"], "has no tokenizer"),
    (["--model", "{ckpt}"], "--task niah needs --len"),
    (["--len", -1], "--len: must be above 0"),
    (["--len", 512, "--task", "sudoku"], "invalid choice: 'sudoku'"),
    (["--len", 512, "--device", "tpu"], "--device: 'tpu': pass cpu, or cuda"),
    (["--len", 300, "--depths", 0, 110], "--depths: must be at least 0 and at most 100"),
    (["--len", 300, "--steps", 0], "--steps: must be above 0"),
    (["--len", 512, "--gen-length", 30], "pass other --gen-length, --block-length or --steps"),
    (["--len", 300, "--keyword", "418"], "does not occur in --needle"),
    (["--len", 300, "--keyword", " "], "is blank: every answer"),
    (["--len", 20], "cannot hold the needle"),
    (["--len", 300, "--haystack", "{odd}/nowhere"], "is not a folder"),
    (["--len", 131072, "--haystack", "{odd}/hay"], "holds only"),
    (["--len", 300, "--haystack", "{odd}/pipe"], "a.txt: unreadable: a named pipe, not a regular file"),
    (["--len", 300, "--results", "{ckpt}/evals"], "lies inside the checkpoint folder"),
    # RoPE: flags that need one another, and a T_train whose critical dimension is no dimension
    (["--len", 512, "--d-crit", 8], "--train-len and --d-crit only apply with --rope"),
    (["--len", 512, "--rope-factor", 4, "--rope", "critical"], "--rope-factor and --rope both"),
    (["--len", 512, "--rope-factor", "nan"], "--rope-factor: must be above 0"),
    (["--len", 512, "--rope", "diffusion", "--d-crit", 99], "critical dimension of 99"),
    (["--len", 512, "--rope", "critical", "--train-len", 2], "T_train 2"),
    # sizes that cannot exist are refused before any work (a typo away from 1,000,000)
    (["--len", 1_000_000_000], "largest forward (1,000,000,032 tokens) needs at least"),
    (["--len", 1_000_000_000, "--task", "ppl"], "GiB available"),
    (["--len", 300, "--repeats", 1_000_000_000], "--repeats: must be above 0 and at most 1000"),
    (["--len", 1024, "--task", "ruler", "--samples", 1_000_000_000], "at most 100000"),
    # perplexity's flags and documents
    (["--len", 100, "--task", "ppl"], "must be a whole number of --chunk-size 64 chunks"),
    (["--len", 1024, "--task", "ppl", "--data", "{odd}/hay", "--cache-dir", "{odd}/cache"],
     "has 1024 tokens (the longest has"),
    (["--len", 128, "--task", "ppl", "--document", "x.txt"], "--document names one file inside --data"),
    (["--len", 128, "--task", "ppl", "--data", "{odd}/hay", "--document", "x.txt"], "x.txt: unreadable"),
    (["--len", 1024, "--task", "ppl", "--data", "{odd}/hay", "--document", "essay.txt"],
     "fewer than --len 1024"),
    # the other tasks' own flags (their data files: test_needlebench, test_ruler, test_longbench)
    (["--task", "needlebench", "--len", 8192], "required: --haystack, --needles"),
    (["--task", "ruler", "--len", 1024, "--ruler-tasks", "vt", "--gen-length", 30], "block_length 64"),
    (["--task", "longbench"], "required: --data"),
    (["--task", "longbench", "--len", 4096, "--data", "."], "--len does not apply to longbench"),
]


@pytest.mark.parametrize("argv, says", BAD, ids=[says for _, says in BAD])
def test_bad_input_is_one_line_before_any_work_and_writes_nothing(argv, says, tiny_ckpt, odd,
                                                                   tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # so that the default out/checkpoint and results/ are here
    argv = [str(a).format(ckpt=tiny_ckpt, odd=odd) for a in argv]
    if "--model" not in argv:
        argv += ["--model", tiny_ckpt]
    out = argv[argv.index("--results") + 1] if "--results" in argv else str(tmp_path / "res")
    assert run(argv + ["--results", out]) == 2
    one_line(capsys, says)
    assert not os.path.exists(out) and not os.path.exists(tmp_path / "results")


def test_a_full_disk_is_one_line_naming_the_result_file_and_leaves_nothing_half_written(
        tiny_ckpt, tmp_path, monkeypatch, capsys):
    import errno

    from harness import files

    def full(fd):  # the folder's settings record goes in; the disk is full by the first cell
        writes.append(fd)
        if len(writes) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    writes = []
    monkeypatch.setattr(decoding, "generate", fake_generate([" 417."], []))
    monkeypatch.setattr(files.os, "fsync", full)  # every atomic write fails at its flush
    assert run(["--model", tiny_ckpt, "--len", 300, "--depths", 50, "--results", tmp_path]) == 2
    one_line(capsys, "error: cannot write ", "No space left on device", "niah_len300_depth050")
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp") or
                (n.endswith(".json") and not n.startswith("."))]


@pytest.mark.parametrize("task", [["--task", "niah", "--len", 300, "--depths", 50],
                                  ["--task", "ppl", "--len", 128, "--data", "{tmp}/docs",
                                   "--cache-dir", "{tmp}/cache"]],
                         ids=["niah", "ppl"])
def test_a_non_finite_forward_stops_the_run_naming_the_cell(task, tmp_path, capsys):
    """Finite weights whose forward overflows to inf and NaN, as a broken checkpoint's does (a
    NaN norm, rope_theta 0): the gated MLP multiplies two 1e20-scaled branches."""
    path, model = tiny_checkpoint(tmp_path / "broken")
    save_pretrained(path, read_config(path), {k: v * (1e20 if "up_proj" in k or "ff_proj" in k else 1)
                                              for k, v in model.state_dict().items()})
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "book.txt").write_text("The farmer walked near the hill. " * 40)
    task = [str(a).format(tmp=tmp_path) for a in task]
    assert run(["--model", path, *task, "--results", tmp_path / "res"]) == 2
    one_line(capsys, "hidden states are not finite", f"cell {task[1]}_len")
    assert not cells(tmp_path / "res")  # no score of 0 written for a broken model


def test_evaluate_waits_for_a_folder_being_set_up_and_says_for_whom(tmp_path, tiny_ckpt):
    folder = tmp_path / "res"
    held = lock_folder(str(folder))  # another process setting the folder up, as far as it knows
    p = subprocess.Popen([sys.executable, "evaluate.py", "--model", tiny_ckpt, "--len", "256",
                          "--depths", "50", "--results", folder], cwd=ROOT, env=ENV,
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
        assert p.poll() is None and not cells(folder)  # still waiting
    finally:
        held.close()
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-2000:]
    assert f"waiting for process {os.getpid()}" in said[-1] and "setting up the results folder" in said[-1]
    assert os.path.exists(folder / "niah_len256_depth050_rep0_rope-ckpt.json")


# ---------------------------------------------------------------------------------------------
# Many processes on one results folder: torchrun, independent jobs, a process killed mid-cell.

# 12 cells, two forwards each: the cells are quick, the processes' start is what takes time
GRID = ["--len", "256", "--depths", *map(str, range(0, 101, 20)), "--repeats", "2",
        "--gen-length", "8", "--block-length", "8", "--steps", "2"]


def launch(ckpt, folder, processes=1):
    """evaluate.py as a user starts it, alone or under torchrun (gloo on the CPU)."""
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
            str(processes)] if processes > 1 else [sys.executable])
    return subprocess.Popen(cmd + ["evaluate.py", "--model", ckpt, *GRID, "--results", str(folder)],
                            cwd=ROOT, env=ENV, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def finish(p) -> str:
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    return out


def comparable(folder) -> dict:
    """Every cell without the fields that say when and where it ran."""
    return {name: {k: v for k, v in cell.items() if k not in ("seconds", "finished", "process")}
            for name, cell in cells(folder).items()}


def journal(folder) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(folder, ".journal-niah.jsonl"))]


@pytest.fixture(scope="module")
def one_process(tiny_ckpt, tmp_path_factory):
    """The reference: the whole grid in one process."""
    folder = tmp_path_factory.mktemp("one") / "res"
    assert run(["--model", tiny_ckpt, *GRID, "--results", folder]) == 0
    return folder


def test_torchrun_spreads_the_cells_and_gives_what_one_process_gives(tiny_ckpt, one_process, tmp_path):
    # under bench/bench_exit.py's load, where a finished run used to abort at exit (issue 30)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "evaluate.py", "--model", tiny_ckpt, *GRID, "--results", str(tmp_path)]
    with tempfile.TemporaryFile("w+") as out, busy_cores():
        code, err = run_under_load(cmd, stdout=out, text=True, cwd=ROOT, env=ENV)
        out.seek(0)
        printed = out.read()
    assert code == 0, err[-3000:]
    assert len(comparable(one_process)) == 12 and comparable(tmp_path) == comparable(one_process)
    done = journal(tmp_path)
    assert sorted(d["cell"] for d in done) == sorted(cells(one_process))  # each computed once
    assert {d["process"].split(" rank ")[1] for d in done} == {"0 on cpu", "1 on cpu"}  # both
    assert printed.count("rope ckpt: average") == 1 and "2 processes" in printed  # rank 0 reports


def test_two_independent_jobs_share_a_folder_without_repeating_a_cell(tiny_ckpt, one_process,
                                                                      tmp_path):
    first, second = launch(tiny_ckpt, tmp_path), launch(tiny_ckpt, tmp_path)
    printed = [finish(first), finish(second)]
    assert comparable(tmp_path) == comparable(one_process)
    done = journal(tmp_path)
    assert sorted(d["cell"] for d in done) == sorted(cells(one_process))  # once each
    assert all("rope ckpt: average" in text for text in printed)  # each waited, then reported


def test_a_process_killed_mid_run_leaves_its_cell_to_the_next_run(tiny_ckpt, one_process, tmp_path):
    p = launch(tiny_ckpt, tmp_path)
    deadline = time.monotonic() + 300
    while len(cells(tmp_path)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.communicate()
    before = len(cells(tmp_path))
    assert 2 <= before < 12
    assert f"{12 - before} cells to run ({before} already done)" in finish(launch(tiny_ckpt, tmp_path))
    assert comparable(tmp_path) == comparable(one_process)
    assert os.listdir(tmp_path / ".claims") == []  # the killed process's claim went with its cell


def test_a_claim_on_a_cell_finished_elsewhere_meanwhile_is_given_up_and_leaves_no_file(tmp_path):
    """The loop lists the folder, then claims: a cell written by another process in between is
    not computed again, and its claim file goes like any other."""
    with results.claim(str(tmp_path), "niah_a.json") as mine:
        assert mine
        with results.claim(str(tmp_path), "niah_a.json") as again:
            assert not again  # held by this claim (another process, as far as locks go)
        results.write_json(str(tmp_path / "niah_a.json"), {"score": 1.0})
    (tmp_path / "niah_b.json").write_text("{}")
    with results.claim(str(tmp_path), "niah_b.json") as mine:
        assert not mine  # the result is there
    assert os.listdir(tmp_path / ".claims") == []
