"""Tests for needlebench.py: OpenCompass NeedleBench "origin" prompts (template, token budget,
needle index, the accumulating shuffles), its evaluator, the one-line errors of its plan, and one
cell end to end with a tiny random model. The data files are invented here, in the official
formats (en_un_asr.jsonl: {"title", "text"}; needles.jsonl: {"needle", "retrieval_question",
"gold_standard_answer", "arg1", "arg2", "type", "language"})."""
import json
import os
import random
from types import SimpleNamespace

import pytest
import torch

from evaluations import needlebench, needles
from evaluations.needlebench import needlebench_sample, needlebench_score
from harness.files import FileError
from harness.tokenizer import cl100k, tiktoken_tokenizer
from tiny import tiny_model

# Multi-byte words too, so that cuts fall inside characters as they do in real text.
WORDS = ("harbor lantern council meadow orbit ledger quarry violet summit ferry canal delegate "
         "resolution assembly weather market bridge river treaty farmer engine signal garden "
         "winter archive velvet pilot census cargo naïve café façade Zürich 東京 会议 🚢 —").split()

NEEDLES = [
    {"needle": "The secret ingredient of Captain Marlow's stew is smoked paprika.",
     "retrieval_question": "What is the secret ingredient of Captain Marlow's stew? Please "
                           "answer in the format 'The secret ingredient of Captain Marlow's "
                           "stew is________.'",
     "arg2": "smoked paprika", "language": "English"},
    {"needle": "The lighthouse on Brindle Point was painted by Ada Fenwick.",
     "retrieval_question": "Who painted the lighthouse on Brindle Point? Please answer in the "
                           "format 'The lighthouse on Brindle Point was painted by________.'",
     "arg2": "Ada Fenwick", "language": "English"},
    {"needle": "青石镇的守护神兽是白泽。",
     "retrieval_question": "青石镇的守护神兽是什么？请按照'青石镇的守护神兽是________。'的格式回答。",
     "arg2": "白泽", "language": "Chinese"},
    {"needle": "The password to the Copper Vault is heliotrope-42.",
     "retrieval_question": "What is the password to the Copper Vault? Please answer in the format "
                           "'The password to the Copper Vault is________.'",
     "arg2": "heliotrope-42", "language": "English"},
]


def haystack_rows(n: int = 300, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        sentences = [" ".join(rng.choices(WORDS, k=rng.randint(4, 14))).capitalize() + "."
                     for _ in range(rng.randint(1, 6))]
        rows.append({"title": f"Invented report {i}", "text": " ".join(sentences)})
    return rows


def write_fixtures(folder) -> tuple[str, str]:
    """en_un_asr.jsonl and needles.jsonl in `folder`, named as OpenCompass expects them."""
    os.makedirs(folder, exist_ok=True)
    haystack = os.path.join(folder, "en_un_asr.jsonl")
    needles = os.path.join(folder, "needles.jsonl")
    with open(haystack, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in haystack_rows())
    with open(needles, "w", encoding="utf-8") as f:
        for row in NEEDLES:
            full = {**row, "gold_standard_answer": row["needle"], "arg1": "", "type": 0}
            f.write(json.dumps(full, ensure_ascii=False) + "\n")
    return haystack, needles


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return write_fixtures(tmp_path_factory.mktemp("needlebench"))


def make_cfg(haystack, needles, **overrides):
    cfg = dict(len=[1024], depths=list(range(0, 101, 10)), repeats=10, haystack=haystack,
               needles=needles, length_buffer=600, guide=True, language="English",
               gen_length=32, block_length=32, steps=16, prompt_cache=False, rope_label="ckpt",
               seed=0)
    return SimpleNamespace(**{**cfg, **overrides})


def reference_haystack(length: int, repeat: int, needle: str, buffer: int = 600) -> list[int]:
    """OpenCompass's rule written out plainly: one list shuffled with seeds 0..repeat in turn,
    each line encoded alone, cut at length - buffer - needle tokens."""
    enc = cl100k()
    lines = haystack_rows()
    for r in range(repeat + 1):
        random.seed(r)
        random.shuffle(lines)
    target = length - buffer - len(enc.encode("\n" + needle + "\n"))
    ids = []
    for row in lines:
        ids += enc.encode(row["text"])
        if len(ids) >= target:
            break
    return ids[:target]


def context_of(prompt: str) -> str:
    before, between = needlebench.TEMPLATE["English"]
    assert prompt.startswith(before)
    return prompt[len(before):prompt.rindex(between)]


def test_prompt_has_template_needle_and_question_cut_at_the_answer(paths):
    s = needlebench_sample(*paths, length=2048, depth=50, repeat=0)
    p = s["prompt"]
    assert p.startswith("You are an intelligent AI assistant skilled in answering user questions.\n"
                        "Please keep your answers concise and clear. Do not talk about irrelevant "
                        "topics or repeat your answers.\nThe document given to you by the user is ")
    assert "\n" + s["needle"] + "\n" in p
    entry = next(n for n in NEEDLES if n["needle"] == s["needle"])
    asked = entry["retrieval_question"].split(" Please answer")[0]
    ending = entry["retrieval_question"].split("format '")[1][:-len("________.'")]  # "The X is"
    assert p.endswith(f"\n\nNow, the question is: {asked} Before answering, please consider what "
                      f"in the document is most relevant to this question. {ending}")
    assert s["keyword"] == entry["arg2"]


def test_guide_false_cuts_the_question_twice_as_opencompass_does(paths):
    guided = needlebench_sample(*paths, length=2048, depth=50, repeat=0)["question"]
    base = needlebench_sample(*paths, length=2048, depth=50, repeat=0, guide=False)["question"]
    assert base == guided[:-10] and "Before answering" in base


def test_chinese_prompt_uses_the_chinese_template_and_16_character_cut(paths):
    s = needlebench_sample(*paths, length=1024, depth=0, repeat=3, length_buffer=200,
                           language="Chinese")
    assert s["needle"] == "青石镇的守护神兽是白泽。"  # the only Chinese entry
    assert s["prompt"].startswith("你是一个善于回答用户问题的智能AI助手\n")
    assert s["prompt"].endswith("现在请问：青石镇的守护神兽是什么？在回答之前，请思考文档中与此问题"
                                "最相关的内容是什么。青石镇的守护神兽是")


@pytest.mark.parametrize("length,repeat", [(1024, 0), (3000, 4)])
def test_haystack_is_exactly_length_minus_buffer_minus_needle_tokens(paths, length, repeat):
    s = needlebench_sample(*paths, length=length, depth=30, repeat=repeat)
    needle_tokens = len(cl100k().encode("\n" + s["needle"] + "\n"))
    assert s["haystack_tokens"] == length - 600 - needle_tokens
    assert s["needle_tokens"] == needle_tokens
    ref = reference_haystack(length, repeat, s["needle"])
    assert len(ref) == s["haystack_tokens"]
    at = int(len(ref) * (30 / 100))
    assert context_of(s["prompt"]) == cl100k().decode(ref[:at] + cl100k().encode(
        "\n" + s["needle"] + "\n") + ref[at:])


@pytest.mark.parametrize("depth", [0, 50, 100])
def test_needle_sits_at_int_len_times_depth_over_100(paths, depth):
    s = needlebench_sample(*paths, length=1500, depth=depth, repeat=1)
    enc = cl100k()
    ref = reference_haystack(1500, 1, s["needle"])
    at = int(len(ref) * (depth / 100))
    assert s["insert_at"] == at
    context = context_of(s["prompt"])
    needle = "\n" + s["needle"] + "\n"
    assert context.startswith(enc.decode(ref[:at]) + needle)
    assert context.endswith(needle + enc.decode(ref[at:]))
    if depth == 0:
        assert context.startswith(needle)
    if depth == 100:
        assert context.endswith(needle)


def test_needle_index_keeps_opencompass_float_order(paths):
    # int(100 * (29 / 100)) is 28, while int(100 * 29 / 100) would be 29
    probe = needlebench_sample(*paths, length=1024, depth=29, repeat=0)
    s = needlebench_sample(*paths, length=600 + probe["needle_tokens"] + 100, depth=29, repeat=0)
    assert s["haystack_tokens"] == 100 and s["insert_at"] == 28


def test_same_arguments_give_the_same_prompt_and_repeats_differ(paths):
    a = needlebench_sample(*paths, length=1024, depth=40, repeat=2)
    b = needlebench_sample(*paths, length=1024, depth=40, repeat=2)
    c = needlebench_sample(*paths, length=1024, depth=40, repeat=3)
    assert a == b
    assert context_of(a["prompt"])[:200] != context_of(c["prompt"])[:200]


def test_shuffles_accumulate_across_repeats(paths):
    rows = haystack_rows()
    alone = list(range(len(rows)))
    random.Random(2).shuffle(alone)  # seed 2 alone: what a fresh shuffle per repeat would give
    together = list(range(len(rows)))
    for r in range(3):
        random.Random(r).shuffle(together)
    assert alone[0] != together[0]
    assert needlebench.haystack_order(len(rows), 2) == together
    context = context_of(needlebench_sample(*paths, length=1024, depth=100, repeat=2)["prompt"])
    first = rows[together[0]]["text"]
    assert context.startswith(first[:100])
    assert not context.startswith(rows[alone[0]]["text"][:100])


def test_needle_is_drawn_with_random_seed_repeat_among_the_language(paths):
    english = [n for n in NEEDLES if n["language"] == "English"]
    for repeat in range(10):
        s = needlebench_sample(*paths, length=1024, depth=0, repeat=repeat)
        random.seed(repeat)
        assert s["needle"] == random.choice(english)["needle"]


def test_score_is_100_when_the_raw_answer_holds_the_keyword():
    assert needlebench_score("It is smoked paprika, I think", "A needle.", "smoked paprika") == 100
    # the keyword is searched in the raw answer, whitespace kept
    assert needlebench_score("smokedpaprika", "Some needle.", "smoked paprika") < 100


def test_score_is_a_fifth_of_the_edit_similarity_without_whitespace():
    assert needlebench_score("", "abc", "zz") == 0.0
    assert needlebench_score("abd", "abc", "zz") == pytest.approx(0.2 * 100 * (1 - 1 / 3))
    assert needlebench_score("a b\n c", "ab c", "zz") == pytest.approx(20.0)  # equal once stripped
    # "kitten" -> "sitting": 3 edits over 7 characters
    assert needlebench_score("kitten", "sitting", "zz") == pytest.approx(0.2 * 100 * (4 / 7))
    assert needlebench_score("Paprika", "x", "paprika") == pytest.approx(0.0)  # case matters


def test_only_needlebench_cuts_the_gold_answer_at_a_star():
    """OpenCompass stores "\n" + needle + "\n*" + keyword and splits it at "*"; our NIAH scores
    the user's needle whole (needles.needle_score)."""
    assert needles.needle_score("It is 28.", "The code is 4*7.", "28") == 100
    assert needlebench_score("It is 28.", "The code is 4*7.", "28") == 0


@pytest.mark.parametrize("a, b, distance", [("kitten", "sitting", 3), ("sitting", "kitten", 3),
                                            ("", "abc", 3), ("abc", "abc", 0), ("", "", 0),
                                            ("flaw", "lawn", 2), ("日本語", "日本", 1)])
def test_edit_similarity_is_one_minus_levenshtein_over_the_longer_length(a, b, distance):
    longest = max(len(a), len(b))
    expected = 100 * (1 - distance / longest) if longest else 100
    assert needles.edit_similarity(a, b) == pytest.approx(expected)


def one_line_error(call, *fragments, kind=ValueError) -> str:
    with pytest.raises(kind) as e:
        call()
    assert "\n" not in str(e.value) and all(f in str(e.value) for f in fragments), str(e.value)
    return str(e.value)


def test_plan_refuses_bad_files_and_a_length_they_cannot_fill(paths, tmp_path):
    """Each refusal names the file and, where there is one, the line."""
    def plan(haystack=paths[0], needles=paths[1], **overrides):
        return lambda: needlebench.plan(make_cfg(haystack, needles, **overrides), None, None)
    missing = str(tmp_path / "nowhere.jsonl")
    one_line_error(plan(haystack=missing), missing, "--haystack")
    one_line_error(plan(needles=missing), missing, "--needles")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"text": broken\n', encoding="utf-8")
    one_line_error(plan(haystack=str(bad)), str(bad), "line 3", kind=FileError)
    bad.write_text('{"title": "x"}\n', encoding="utf-8")
    one_line_error(plan(haystack=str(bad)), "line 1", "'text'", kind=FileError)
    one_line_error(plan(len=[1024, 1_000_000]), "--len 1000000", paths[0])
    one_line_error(plan(len=[500]), "--len 500")  # nothing left after the 600-token buffer
    english = tmp_path / "needles_en.jsonl"
    english.write_text("".join(json.dumps(n) + "\n" for n in NEEDLES if n["language"] == "English"))
    one_line_error(plan(needles=str(english), language="Chinese", length_buffer=200),
                   "'Chinese'", str(english))
    # An empty keyword is found in every answer: an untrained model would score 100.
    for field, value in [("arg2", ""), ("arg2", "  "), ("needle", "")]:
        rows = [dict(row) for row in NEEDLES]
        rows[1][field] = value  # the second line, an English entry
        bad.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        one_line_error(plan(needles=str(bad)), f"line 2: {field!r} is empty", str(bad), kind=FileError)


def test_plan_run_cell_and_report_end_to_end(paths, tmp_path):
    tok = tiktoken_tokenizer()
    cfg = make_cfg(*paths, len=[2048, 1024], depths=[0, 50, 100], repeats=2, rope_label="ntk4")
    cells, work, source = needlebench.plan(cfg, tok, tok)
    assert len(cells) == 2 * 3 * 2 and len({c["name"] for c in cells}) == len(cells)
    assert all(c["name"].startswith("needlebench_en_") and c["name"].endswith("_rope-ntk4.json")
               and c["task"] == "needlebench" and c["rope"] == "ntk4" for c in cells)
    assert {(c["length"], c["depth"], c["repeat"]) for c in cells} == \
        {(L, d, r) for L in (1024, 2048) for d in (0, 50, 100) for r in range(2)}
    assert paths[0] in source and len(work["line_ids"]) == 300 and len(work["needles"]) == 3
    cfg = make_cfg(*paths, len=[1024], depths=[0, 100], repeats=1)  # 32 tokens, 1 block, 16 steps
    cells, work, _ = needlebench.plan(cfg, tok, tok)
    cell = cells[0]
    record = needlebench.run_cell(tiny_model().eval(), tok, cfg, cell, work, torch.device("cpu"))
    s = needlebench_sample(*paths, length=1024, depth=cell["depth"], repeat=cell["repeat"])
    assert record["model_tokens"] == len(tok.encode_prompt(s["prompt"]))
    assert record["score"] == needlebench_score(record["answer"], s["needle"], s["keyword"])
    assert 0 <= record["score"] <= 100 and record["keyword"] == s["keyword"]
    # the report: a second rope label, made-up scores where no model ran
    done = [{**cell, **record}, {**cells[1], "score": 100.0},
            {**cells[0], "rope": "ntk4", "score": 50.0}, {**cells[1], "rope": "ntk4", "score": 0.0}]
    summary = needlebench.report(done, cfg, str(tmp_path))
    for rope in ("ckpt", "ntk4"):
        png = tmp_path / f"needlebench_heatmap_rope-{rope}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (tmp_path / f"needlebench_table_rope-{rope}.md").read_text().count("| 100% |") == 1
    # OpenCompass's summarizer prints two decimals
    assert "rope ntk4: average 25.00" in summary
    assert "| **average** | **25.00** |" in summary
