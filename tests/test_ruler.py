"""RULER (ruler.py): prompts, the cl100k fit, determinism, OpenCompass's scoring, the runner
protocol. Data files are small invented fixtures in the official formats."""
import bisect
import json
import os
import random
import re

import pytest

import evaluate
from evaluations import ruler
from harness.flags import settings_of
from harness.tokenizer import cl100k, tiktoken_tokenizer

L = 2048  # small enough for CPU tests, big enough for one 500-word step of essay haystack

NAMES = ["Orla", "Bexley", "Tamsin", "Quill", "Marrow", "Fenwick", "Idris", "Calloway"]
THINGS = ["lantern", "harbour", "orchard", "ledger", "compass", "furnace", "meadow", "tower",
          "kettle", "bridge", "archive", "garden", "market", "river", "quarry", "engine"]
DOINGS = ["repaired", "painted", "measured", "visited", "described", "forgot", "admired",
          "rebuilt", "counted", "sold"]
PLACES = ["Dunmore", "Ashgrove", "Pelling", "Norwick", "Saltmarsh", "Kirkby"]


def sentence(rng: random.Random) -> str:
    return (f"{rng.choice(NAMES)} {rng.choice(DOINGS)} the {rng.choice(THINGS)} of "
            f"{rng.choice(PLACES)} in {rng.randint(1800, 1999)}")


def write_fixtures(folder: str) -> dict:
    """Invented rows in the official formats: PaulGrahamEssays.jsonl ({"text"} per line),
    SQuAD v2 dev (data/paragraphs/qas with is_impossible), HotpotQA dev (a list of question,
    answer, context [[title, sentences]])."""
    rng = random.Random(7)
    os.makedirs(folder, exist_ok=True)
    paths = {k: os.path.join(folder, f) for k, f in
             [("essays", "PaulGrahamEssays.jsonl"), ("squad", "dev-v2.0.json"),
              ("hotpot", "hotpotqa.json")]}
    with open(paths["essays"], "w") as f:
        for e in range(8):
            text = ". ".join(sentence(rng) for _ in range(150)) + ".\n\n"
            f.write(json.dumps({"title": f"Essay {e}", "text": text}) + "\n")
    articles = []
    for a in range(10):
        paragraphs = []
        for p in range(6):
            year = 1700 + 10 * a + p
            context = (f"The {THINGS[(a + p) % 16]} of {PLACES[a % 6]} was built in {year}. " +
                       ". ".join(sentence(rng) for _ in range(4)) + ".")
            qas = [{"question": f"When was the {THINGS[(a + p) % 16]} of {PLACES[a % 6]} built?",
                    "id": f"q{a}-{p}", "answers": [{"text": str(year), "answer_start": 0},
                                                   {"text": f"in {year}", "answer_start": 0}],
                    "is_impossible": False},
                   {"question": f"Who sold the moon in {year}?", "id": f"i{a}-{p}",
                    "answers": [], "plausible_answers": [{"text": "Orla", "answer_start": 0}],
                    "is_impossible": True}]
            paragraphs.append({"context": context, "qas": qas})
        articles.append({"title": f"Article {a}", "paragraphs": paragraphs})
    with open(paths["squad"], "w") as f:
        json.dump({"version": "v2.0", "data": articles}, f)
    hotpot = []
    for q in range(8):
        titles = [f"{PLACES[(q + i) % 6]} {THINGS[(3 * q + i) % 16].title()} {q}-{i}"
                  for i in range(10)]
        context = [[t, [f"{t} is a place. ", sentence(rng) + ". ", sentence(rng) + "."]]
                   for t in titles]
        hotpot.append({"_id": f"h{q}", "question": f"Which town holds {titles[0]}?",
                       "answer": PLACES[q % 6], "type": "bridge", "level": "easy",
                       "supporting_facts": [[titles[0], 0]], "context": context})
    with open(paths["hotpot"], "w") as f:
        json.dump(hotpot, f)
    return paths


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_fixtures(str(tmp_path_factory.mktemp("ruler")))


def sample(task, index, data, length=L):
    return ruler.ruler_sample(task, length, index, data)


def config(data, **kw):
    """evaluate.py's configuration of a RULER run (the shared flags and RULER's own)."""
    rope_label = kw.pop("rope_label", "none")
    cfg = evaluate.task_config("ruler")(**{**dict(len=[L], samples=2, model="tiny", **data), **kw})
    cfg.rope_label = rope_label
    return cfg


# ---------------------------------------------------------------------------------------------

def test_thirteen_tasks_in_four_categories_with_authors_settings():
    assert len(ruler.TASKS) == 13
    assert {c: len(t) for c, t in ruler.CATEGORIES.items()} == {
        "retrieval": 8, "multi-hop tracing": 1, "aggregation": 2, "question answering": 2}
    o = ruler.Options()  # the model config: max_out_len 64, block_length 64, steps 64
    assert (o.gen_length, o.block_length, o.steps, o.samples) == (64, 64, 64, 100)
    reserves = {n: t.reserve for n, t in ruler.TASKS.items()}
    assert reserves["niah_single_1"] == 128 and reserves["cwe"] == 120
    assert reserves["fwe"] == reserves["qa_squad"] == 50 and reserves["vt"] == 30
    assert [n for n, t in ruler.TASKS.items() if t.metric == ruler.PART] == ["qa_squad", "qa_hotpotqa"]


@pytest.mark.parametrize("task", list(ruler.TASKS))
def test_prompt_holds_template_and_answers_and_fits_length(task, data):
    s = sample(task, 0, data)
    p, answers = s["prompt"], s["answers"]
    n = len(cl100k().encode_ordinary(p))
    t = ruler.TASKS[task]
    # the fit: prompt + reserve within the length (fwe: the prompt alone), and close to it
    budget = L if task == "fwe" else L - t.reserve
    assert n <= budget
    assert n >= budget * (0.75 if task in ("fwe", "qa_squad", "qa_hotpotqa") else 0.85), n
    assert answers and all(isinstance(a, str) and a for a in answers)
    head = {"niah": "special magic", "vt": "Memorize and track the chain(s) of variable assignment",
            "cwe": "Below is a numbered list of words.", "fwe": "Read the following coded text",
            "qa": "Answer the question based on the given documents."}[t.family]
    assert p.startswith(head.replace("special", "A special" if t.options.get("q", 1) *
                                     t.options.get("v", 1) == 1 else "Some special"))
    if t.metric == ruler.PART:
        assert any(a in p for a in answers)
    else:
        assert all(a in p for a in answers)
    if t.family == "niah":
        for a in answers:
            assert f"is: {a}." in p  # the needle sentence carries the value
        assert len(answers) == t.options["v"] * t.options["q"]
        assert p.endswith("mentioned in the provided text " + ("is" if len(answers) == 1 else "are"))
    if t.family == "vt":
        assert len(answers) == 5 and p.endswith("they are: ")
        for a, b in zip(answers, answers[1:]):
            assert f"VAR {b} = VAR {a}" in p  # the chain is in the context
    if t.family == "cwe":
        assert len(answers) == 10
        body = p.split("\n")[-2]  # the list the question is about, after the worked example
        items = re.split(r" ?\d+\. ", body)[1:]
        assert all(items.count(a) == 6 for a in answers)  # below 4K: 6 repeats each
        assert max(items.count(w) for w in set(items) - set(answers)) == 1  # the rest once
    if t.family == "fwe":
        words = p.split("coded words. ")[1].split("\nQuestion")[0].split()
        top = sorted(set(words), key=words.count, reverse=True)
        assert top[0] == "..." and top[1:4] == answers
    if t.family == "qa":
        assert "Document 1:\n" in p and p.endswith(" Answer:")


@pytest.mark.parametrize("task", list(ruler.TASKS))
def test_same_index_same_prompt_other_index_other_prompt(task, data):
    a, b, c = sample(task, 1, data), sample(task, 1, data), sample(task, 2, data)
    assert a == b
    assert a["prompt"] != c["prompt"]


def test_sample_does_not_depend_on_what_was_drawn_before(data):
    ruler.stream.cache_clear()
    late_first = sample("niah_single_2", 3, data)
    ruler.stream.cache_clear()
    for i in range(4):
        in_order = sample("niah_single_2", i, data)
    assert late_first == in_order


def test_single_needle_template_is_singular_and_multi_is_plural(data):
    one = sample("niah_single_1", 0, data)["prompt"]
    assert one.startswith("A special magic number is hidden within the following text. Make "
                          "sure to memorize it. I will quiz you about the number afterwards.\n")
    assert "\nWhat is the special magic number for " in one
    many = sample("niah_multiquery", 0, data)["prompt"]
    assert many.startswith("Some special magic numbers are hidden")
    assert "\nWhat are all the special magic numbers for " in many and ", and " in many


def test_uuid_needles_and_word_keys_have_their_shapes(data):
    s = sample("niah_multikey_3", 0, data)
    assert len(s["answers"][0]) == 36 and s["answers"][0][14] == "4"  # uuid4
    w = sample("niah_single_1", 0, data)["prompt"]
    key = w.split("special magic number for ")[1].split(" mentioned")[0]
    words = ruler.needle_words()  # sorted: a binary search finds the adjective-noun pair
    assert "-" in key and words[bisect.bisect_left(words, key)] == key
    assert sample("niah_single_1", 0, data)["answers"][0].isdigit()


def test_adj_noun_words_equal_sorted_set_with_hyphens_spaces_duplicates():
    adjs = ["old", "old-fashioned", "ad hoc", "ad", "x-rated", "x", "blue", "blue-eyed", "old",
            "teeny-tiny", "a-b"]
    nouns = ["cat", "ATM", "back-up", "contact lens", "eyed-cat", "b-c", "zoo", "fashioned-x", "c"]
    expected = sorted({f"{a}-{n}" for a in adjs for n in nouns})
    words = ruler.AdjNounWords(adjs, nouns)
    assert len(words) == len(expected) and list(words) == expected


def test_word_keyed_rows_are_those_of_wonderwords_2_2_0(recwarn):
    """Pins the word-list version, so these are literals by design: the rows below were computed
    with wonderwords 2.2.0, the release the authors' 2025-10-23 evaluation could install. Under
    3.0.1, which drops four nouns, the same seeds give other keys (e.g. wandering-loneliness)
    and other cwe words, and the sizes below fail. No data file is needed for these two tasks."""
    nouns, adjs, verbs = ruler.wonderwords_lists()
    assert (len(nouns), len(adjs), len(verbs)) == (6786, 912, 1042)
    assert len({a.rstrip() for a in adjs}) == 910 and "abortion" in nouns
    assert len(ruler.needle_words()) == 910 * 6786 == 6_175_260
    assert len(ruler.cwe_words(ruler.RULER_SEED)) == 8169
    rows = {0: ("wandering-age", ["8090293"]), 1: ("determined-consignment", ["4612365"])}
    for index, (key, answers) in rows.items():
        s = ruler.ruler_sample("niah_single_1", 4096, index)
        assert f"special magic number for {key} mentioned" in s["prompt"]
        assert s["answers"] == answers
    assert ruler.ruler_sample("cwe", 4096, 0)["answers"] == [
        "appliance", "meter", "forest", "ferret", "kilt", "behalf", "fire", "activity", "arthur",
        "authenticity"]
    # 2.2.0's deprecated, unclosed file reading warns; those warnings stay inside
    recwarn.clear()
    ruler.wonderwords_lists.__wrapped__()  # uncached: read the files again
    assert not recwarn.list, [str(w.message) for w in recwarn]


@pytest.mark.parametrize("prediction,answers,score", [
    ("The numbers are 123 and 456.", ["123", "456"], 100.0),
    ("only 123", ["123", "456", "789", "000"], 25.0),
    ("ABLE-CAT and Zoo", ["able-cat", "zoo"], 100.0),  # case-insensitive
    ("12 3", ["123"], 0.0),  # substring, no normalisation
    ("", ["x"], 0.0),
])
def test_string_match_all_is_fraction_of_references_found(prediction, answers, score):
    assert ruler.ruler_score("niah_multivalue", prediction, answers) == score
    assert ruler.ruler_score("cwe", prediction, answers) == score


@pytest.mark.parametrize("prediction,answers,score", [
    ("It was in 1703.", ["1703", "in 1703"], 100.0),
    ("Dunmore", ["dunmore town", "DUNMORE"], 100.0),  # any reference, case-insensitive
    ("Dun more", ["Dunmore"], 0.0),
])
def test_string_match_part_is_any_reference_found(prediction, answers, score):
    assert ruler.ruler_score("qa_squad", prediction, answers) == score


def one_line_error(cfg, *words):
    with pytest.raises(ValueError) as e:
        ruler.plan(cfg, None, None)
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_plan_refuses_a_small_length_and_bad_files_naming_them(data, tmp_path):
    one_line_error(config(data, len=[512]), "--len 512")
    missing = str(tmp_path / "nope.jsonl")
    one_line_error(config(data, essays=missing), missing)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\nnot json\n')
    one_line_error(config(data, essays=str(bad)), str(bad), "line 2")
    v1 = tmp_path / "squad1.json"
    v1.write_text(json.dumps({"data": [{"paragraphs": [{"context": "c", "qas": [
        {"question": "q", "answers": [{"text": "c"}]}]}]}]}))  # SQuAD 1.1: no is_impossible
    one_line_error(config(data, squad=str(v1)), str(v1), "SQuAD v2")
    broken = tmp_path / "hotpot.json"
    broken.write_text("[{\"question\": ")
    one_line_error(config(data, hotpot=str(broken)), str(broken))
    one_line_error(config(data, squad=None, ruler_tasks=["qa_squad"]), "--squad")
    one_line_error(config(data, samples=500, ruler_tasks=["qa_hotpotqa"]), "--samples 500")
    # A blank reference is found in every prediction (100), a missing one breaks scoring.
    for kind, edit in [("squad", lambda d: d["data"][0]["paragraphs"][0]["qas"][0].update(answers=[])),
                       ("squad", lambda d: d["data"][0]["paragraphs"][0]["qas"][0]["answers"][0]
                        .update(text=" ")),
                       ("hotpot", lambda d: d[0].update(answer="")),
                       ("hotpot", lambda d: d[0].update(answer=None))]:
        content = json.load(open(data[kind]))
        edit(content)
        path = tmp_path / f"{kind}-{len(os.listdir(tmp_path))}.json"
        path.write_text(json.dumps(content))
        task = "qa_squad" if kind == "squad" else "qa_hotpotqa"
        one_line_error(config({**data, kind: str(path)}, ruler_tasks=[task], samples=1),
                       str(path), "answerable question 1")


def test_the_default_list_skips_tasks_without_files_and_says_so(data):
    cells, work, source = ruler.plan(config(data, essays=None, squad=None, hotpot=None, samples=1),
                                     None, None)
    assert {c["ruler_task"] for c in cells} == {"niah_single_1", "niah_multikey_2",
                                                "niah_multikey_3", "vt", "fwe", "cwe"}
    assert "skipped: niah_single_2" in source and "qa_hotpotqa" in source
    assert "--essays" in source and "--squad" in source and "--hotpot" in source
    cells, work, source = ruler.plan(config(data, rope_label="ntk-4", samples=2), None, None)
    assert len(cells) == 13 * 2 and len({c["name"] for c in cells}) == len(cells)
    for c in cells:
        assert set(c) == {"task", "ruler_task", "length", "index", "rope", "name"}
        assert c["task"] == "ruler" and c["rope"] == "ntk-4"
        assert c["name"].startswith("ruler_") and c["name"].endswith(".json") and "ntk-4" in c["name"]
    assert work["seed"] == 42 and "skipped" not in source


def test_another_wonderwords_is_one_line_before_any_model_work(data, tiny_ckpt, tmp_path,
                                                               monkeypatch, capsys):
    monkeypatch.setattr(ruler.metadata, "version", lambda name: "3.0.1")
    monkeypatch.setattr(evaluate, "from_pretrained", lambda *a, **kw: pytest.fail("model loaded"))
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--task", "ruler", "--model", tiny_ckpt, "--len", str(L), "--results",
                       str(tmp_path / "res"), "--essays", data["essays"]])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and not (tmp_path / "res").exists()
    assert "3.0.1 is installed: pip install wonderwords==2.2.0" in err
    cfg = config(data, wonderwords="3.0.1", ruler_tasks=["vt"], samples=1)  # accepted by name:
    assert ruler.plan(cfg, None, None)[0] and settings_of(ruler.Options, cfg)["wonderwords"] == "3.0.1"
    monkeypatch.setattr(ruler.metadata, "version", lambda name: (_ for _ in ()).throw(
        ruler.metadata.PackageNotFoundError(name)))
    one_line_error(config(data), "none is installed: pip install wonderwords==2.2.0")


def test_no_answer_turn_ends_the_prompt_where_longllada_did_and_changes_nothing_else(
        data, monkeypatch):
    seen = []
    monkeypatch.setattr(ruler.decoding, "decode_answer", lambda model, tok, ids, *a: seen.append(ids)
                        or {"answer": "VAR X", "model_tokens": len(ids), "seconds": 0.0})
    tok, cell = tiktoken_tokenizer(), dict(ruler_task="vt", length=L, index=0)
    on, off = (ruler.run_cell(None, tok, config(data, answer_turn=turn), cell,
                              {"seed": 42, "files": data}, None) for turn in (True, False))
    prompt = sample("vt", 0, data)["prompt"]
    assert seen == [tok.encode_prompt(prompt + "\n\n"), tok.encode_prompt(prompt)]
    assert {**on, "model_tokens": 0} == {**off, "model_tokens": 0}
    assert settings_of(ruler.Options, config(data, answer_turn=False))["answer_turn"] is False


def test_run_cell_with_tiny_model_and_report_writes_table_and_png(data, tmp_path):
    import torch

    from tiny import tiny_model

    model = tiny_model().eval()
    tok = tiktoken_tokenizer()
    cfg = config(data, samples=1, gen_length=8, block_length=8, steps=16,
                 ruler_tasks=["niah_single_1", "qa_squad"])
    cells, work, _ = ruler.plan(cfg, tok, tok)
    done = []
    for cell in cells:
        record = ruler.run_cell(model, tok, cfg, cell, work, torch.device("cpu"))
        s = sample(cell["ruler_task"], 0, data)
        assert record["answers"] == s["answers"] and record["steps"] == 8  # the wrapper's cap
        assert record["model_tokens"] == len(tok.encode(s["prompt"] + "\n\n"))
        assert record["score"] == ruler.ruler_score(cell["ruler_task"], record["answer"], s["answers"])
        done.append({**cell, **record})
    done.append({**done[0], "rope": "none", "length": 4096, "score": 50.0})  # a second column
    summary = ruler.report(done, cfg, str(tmp_path))
    table = (tmp_path / "table_ruler.md").read_text()
    assert "| niah_single_1 | retrieval |" in table and "**average**" in table
    assert "| 2K | 4K |" in table and "50.00" in table and "**category mean**" in table
    assert "**question answering**" in table and "2K" in summary
    assert "| **AGG** | LongLLaDA's group: vt, cwe, fwe |" in table and "**NIAH**" in table
    assert "mean over 1..1 samples per task and length" in table  # each (task, length, rope) once
    assert (tmp_path / "ruler_scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_score_table_averages_categories_and_tasks():
    cells = [dict(rope="r", length=L, ruler_task=t, score=s) for t, s in
             [("niah_single_1", 100.0), ("niah_single_1", 50.0), ("niah_multikey_2", 25.0),
              ("vt", 40.0), ("qa_squad", 0.0)]]
    row = ruler.score_table(cells)["r", L]
    assert row["niah_single_1"] == 75.0 and row["retrieval"] == 50.0
    assert row["multi-hop tracing"] == 40.0 and row["aggregation"] is None
    assert row["NIAH"] == 50.0 and row["AGG"] == 40.0 and row["QA"] == 0.0  # LongLLaDA's groups
    assert row["average"] == pytest.approx((75 + 25 + 40 + 0) / 4)
    # retrieval 50, tracing 40, QA 0; aggregation has no task here and does not count
    assert row["category mean"] == pytest.approx((50 + 40 + 0) / 3)
