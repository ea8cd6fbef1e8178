"""Tests for longbench.py: the 21 datasets as OpenCompass configured them, prompts and their cut
in the middle by tokens, every metric on hand-checked cases, equality with the official packages
(values hard-coded), the data checks, and one end-to-end cell with a tiny random model.
Every row below is invented in LongBench's format; no LongBench data is used."""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from evaluations import longbench as lb
from harness.tokenizer import tiktoken_tokenizer
from tiny import tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tok():
    return tiktoken_tokenizer()


def row(context="", input="", answers=("x",), all_classes=None, **extra):
    return {"input": input, "context": context, "answers": list(answers), "length": 0,
            "dataset": "", "language": "en", "all_classes": all_classes, "_id": "0", **extra}


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def config(data, **overrides):
    return SimpleNamespace(**{**dict(data=str(data), datasets=None, max_len=512, samples=None,
                                     prompt_cache=False, rope_label="none", seed=0), **overrides})


# --- the table ---------------------------------------------------------------------------------

# LongBench's eval.py dataset2metric (THUDM/LongBench), which OpenCompass's configs follow.
OFFICIAL_METRIC = {
    "narrativeqa": "qa_f1", "qasper": "qa_f1", "multifieldqa_en": "qa_f1",
    "multifieldqa_zh": "qa_f1_zh", "hotpotqa": "qa_f1", "2wikimqa": "qa_f1", "musique": "qa_f1",
    "dureader": "rouge_zh", "gov_report": "rouge", "qmsum": "rouge", "multi_news": "rouge",
    "vcsum": "rouge_zh", "trec": "classification", "triviaqa": "qa_f1", "samsum": "rouge",
    "lsht": "classification", "passage_retrieval_en": "retrieval", "passage_count": "count",
    "passage_retrieval_zh": "retrieval_zh", "lcc": "code_sim", "repobench-p": "code_sim"}
# max_out_len of the OpenCompass 0.4.2 dataset configs the authors' eval_llada_long.py imports.
OPENCOMPASS_MAX_OUT = {
    "narrativeqa": 128, "qasper": 32, "multifieldqa_en": 64, "multifieldqa_zh": 64,
    "hotpotqa": 32, "2wikimqa": 32, "musique": 32, "dureader": 128, "gov_report": 512,
    "qmsum": 512, "multi_news": 512, "vcsum": 512, "trec": 64, "triviaqa": 32, "samsum": 128,
    "lsht": 64, "passage_count": 32, "passage_retrieval_en": 32, "passage_retrieval_zh": 32,
    "lcc": 64, "repobench-p": 64}


def test_table_has_the_21_datasets_with_official_metric_length_and_category():
    assert list(lb.DATASETS) == [  # the paper's order, grouped by category
        "narrativeqa", "qasper", "multifieldqa_en", "multifieldqa_zh", "hotpotqa", "2wikimqa",
        "musique", "dureader", "gov_report", "qmsum", "multi_news", "vcsum", "trec", "triviaqa",
        "samsum", "lsht", "passage_count", "passage_retrieval_en", "passage_retrieval_zh", "lcc",
        "repobench-p"]
    assert {d: s.metric for d, s in lb.DATASETS.items()} == OFFICIAL_METRIC
    assert {d: s.max_out_len for d, s in lb.DATASETS.items()} == OPENCOMPASS_MAX_OUT
    assert set(s.metric for s in lb.DATASETS.values()) == set(lb.METRICS)
    groups = {cat: [d for d, s in lb.DATASETS.items() if s.category == cat]
              for cat in lb.CATEGORIES}
    assert groups == {
        lb.SINGLE: ["narrativeqa", "qasper", "multifieldqa_en", "multifieldqa_zh"],
        lb.MULTI: ["hotpotqa", "2wikimqa", "musique", "dureader"],
        lb.SUMMARY: ["gov_report", "qmsum", "multi_news", "vcsum"],
        lb.FEW_SHOT: ["trec", "triviaqa", "samsum", "lsht"],
        lb.SYNTHETIC: ["passage_count", "passage_retrieval_en", "passage_retrieval_zh"],
        lb.CODE: ["lcc", "repobench-p"]}
    assert [d for d, s in lb.DATASETS.items() if s.language == "zh"] == [
        "multifieldqa_zh", "dureader", "vcsum", "lsht", "passage_retrieval_zh"]
    assert all("{context}" in s.template for s in lb.DATASETS.values())


def test_answer_tokens_round_max_out_len_up_to_whole_64_token_blocks():
    assert {lb.answer_tokens(d) for d in lb.DATASETS} == {64, 128, 512}
    assert lb.answer_tokens("hotpotqa") == 64  # max_out_len 32 decodes one whole block
    assert lb.answer_tokens("narrativeqa") == 128 and lb.answer_tokens("vcsum") == 512


# --- prompts -----------------------------------------------------------------------------------

def test_prompts_fill_context_and_input_into_the_exact_templates():
    r = row(context="Passage 1:\nMira was born in Oslo.", input="Where was Mira born?")
    assert lb.fill_template(r, "hotpotqa") == (
        "Answer the question based on the given passages. Only give me the answer and do not "
        "output any other words.\n\nThe following are given passages.\nPassage 1:\nMira was born "
        "in Oslo.\n\nAnswer the question based on the given passages. Only give me the answer and "
        "do not output any other words.\n\nQuestion: Where was Mira born?\nAnswer:")
    code = row(context="def f(x):\n", input="    y = f(2)\n")
    assert lb.fill_template(code, "repobench-p") == (
        "Please complete the code given below. \ndef f(x):\n    y = f(2)\nNext line of code:\n")
    assert lb.fill_template(code, "lcc") == (
        "Please complete the code given below. \ndef f(x):\nNext line of code:\n")
    zh = row(context="会议在周一举行。", input="会议哪天举行？")
    assert lb.fill_template(zh, "dureader") == (
        "请基于给定的文章回答下述问题。\n\n文章：会议在周一举行。\n\n请基于上述文章回答下面的问题。"
        "\n\n问题：会议哪天举行？\n回答：")
    assert lb.fill_template(row(context="Dialogue: A: hi", input="Summary:"), "samsum").endswith(
        "examples.\n\nDialogue: A: hi\n\nSummary:")


def test_prompt_fills_input_before_context_as_opencompass_does():
    # {input} is replaced first, so a literal "{input}" inside the context survives.
    r = row(context="print('{input}')", input="Q")
    assert "print('{input}')" in lb.fill_template(r, "hotpotqa")
    assert "Question: Q\n" in lb.fill_template(r, "hotpotqa")


def test_truncate_middle_keeps_head_and_tail_exactly():
    ids = list(range(100))
    assert lb.truncate_middle(ids, 11) == list(range(5)) + list(range(94, 100))  # 5 + 6 = 11
    assert lb.truncate_middle(ids, 10) == list(range(5)) + list(range(95, 100))
    assert lb.truncate_middle(ids, 100) == ids and lb.truncate_middle(ids, 200) == ids


def test_prompt_is_cut_in_the_middle_by_model_tokens_within_the_budget(tok):
    context = " ".join(f"Sentence number {i} of the story." for i in range(400))
    r = row(context=context, input="Who?")
    full = tok.encode_prompt(lb.fill_template(r, "narrativeqa"))
    assert len(full) > 300
    ids = lb.truncate_middle(full, 300)
    assert len(ids) == 300 and ids[:150] == full[:150] and ids[150:] == full[-150:]
    text = lb.build_prompt(r, "narrativeqa", tok.encode_prompt, tok.decode, 300)
    assert text.startswith("You are given a story") and text.endswith("Question: Who?\n\nAnswer:")
    assert text == tok.decode(full[:150]) + tok.decode(full[-150:])
    assert "Sentence number 0 " in text and "Sentence number 200 " not in text
    assert len(tok.encode(text)) <= 300 + 1  # re-encoding may merge one pair at the seam
    short = row(context="Short.", input="Who?")
    assert lb.build_prompt(short, "narrativeqa", tok.encode, tok.decode, 300) == \
        lb.fill_template(short, "narrativeqa")


def test_prompt_budget_counts_the_bos_the_prompt_encoder_adds(tok):
    bos = SimpleNamespace(encode_prompt=lambda text: [7] + tok.encode(text))  # a LLaDA-like BOS
    r = row(context="word " * 500, input="Q")
    ids = lb.truncate_middle(bos.encode_prompt(lb.fill_template(r, "qasper")), 100)
    text_ids = tok.encode(lb.fill_template(r, "qasper"))
    assert len(ids) == 100 and ids[0] == 7 and ids[1:50] == text_ids[:49]
    assert ids[50:] == text_ids[-50:]


# --- metrics, hand-checked -----------------------------------------------------------------------

def test_qa_f1_english_normalises_case_punctuation_and_articles():
    assert lb.qa_f1("The Eiffel Tower!", "eiffel tower") == 1.0
    assert lb.qa_f1("a red car", "the blue car") == 0.5  # {red, car} vs {blue, car}
    assert lb.longbench_score("narrativeqa", "nothing", ["captain"]) == 0.0
    # best of the reference answers: "the old captain in 1850" vs "old captain": p 2/4, r 1
    assert lb.longbench_score("narrativeqa", "The old Captain, in 1850!",
                              ["captain", "an old captain"]) == pytest.approx(100 * 2 / 3)


def test_qa_f1_chinese_segments_with_jieba_and_drops_punctuation():
    # jieba: 北京大学/的/校长 vs 北京大学/校长/。 -> 2 shared of 3 and 2: F1 0.8
    assert lb.longbench_score("multifieldqa_zh", "北京大学的校长", ["北京大学校长。"]) == \
        pytest.approx(80.0)
    assert lb.qa_f1_zh("，。！", "北京") == 0.0


def test_rouge_l_english_on_a_hand_checked_pair():
    # words {the, cat, sat, on, mat} vs {the, cat, sat}, LCS the cat sat: r 1, p 3/5, F 0.75
    assert lb.rouge_l("the cat sat on the mat", "the cat sat") == pytest.approx(0.75)
    assert lb.rouge_l("", "the cat") == 0.0 and lb.rouge_l("...", "the cat") == 0.0


def test_classification_retrieval_and_count():
    classes = ["Food", "Date", "Order, rank"]
    assert lb.longbench_score("trec", "Date", ["Date"], classes) == 100.0
    assert lb.longbench_score("trec", "Food or Date", ["Date"], classes) == 50.0
    assert lb.longbench_score("trec", "Food", ["Date"], classes) == 0.0
    # a class that is part of the reference's name does not count against it
    assert lb.longbench_score("lsht", "体育新闻", ["体育新闻"], ["体育", "体育新闻", "军事"]) == 100.0
    assert lb.longbench_score("passage_retrieval_en", "Paragraph 7, maybe 17",
                              ["Paragraph 7"]) == 50.0
    assert lb.longbench_score("passage_retrieval_zh", "答案是段落3", ["段落3"]) == 100.0
    assert lb.longbench_score("passage_retrieval_zh", "没有", ["段落3"]) == 0.0
    assert lb.longbench_score("passage_count", "12 unique, not 11 or 12", ["12"]) == \
        pytest.approx(100 * 2 / 3)


def test_code_sim_scores_the_first_line_that_is_no_comment():
    prediction = "\n// helper\n# note\nreturn x;\nfoo()"
    assert lb.longbench_score("lcc", prediction, ["return x;"]) == 100.0
    assert lb.longbench_score("repobench-p", "```java", ["int a;"]) == 0.0  # no line left


def test_few_shot_tasks_score_only_the_first_line():
    classes = ["Food", "Date"]
    assert lb.longbench_score("trec", "\nFood\nDate", ["Food"], classes) == 100.0
    assert lb.longbench_score("triviaqa", "Paris\nQuestion: x\nAnswer: Rome", ["Paris"]) == 100.0
    assert lb.longbench_score("triviaqa", "\n\nParis\nRome", ["Rome"]) == 0.0
    # not a few-shot task: the whole text counts (hotpotqa: F1 of "paris rome" vs "paris")
    assert lb.longbench_score("hotpotqa", "Paris\nRome", ["Paris"]) == pytest.approx(100 * 2 / 3)
    summary = "\nAnna brings cake.\nTom brings tea."
    assert lb.longbench_score("samsum", summary, ["Tom brings tea."]) < \
        lb.longbench_score("gov_report", summary, ["Tom brings tea."])


# --- equality with the official packages ---------------------------------------------------------
# Expected values were computed once, outside the test suite, with the packages OpenCompass 0.4.2
# evaluates with: rouge==1.0.1 (Rouge().get_scores([h], [r], avg=True)["rouge-l"]["f"], 0 where it
# raises), fuzzywuzzy==0.18.0 with python-Levenshtein==0.27.5 (fuzz.ratio), jieba==0.42.1, and
# OpenCompass's LongBench evaluators.py itself run on one row (its "score"). Not needed here.

ROUGE_PACKAGE = [  # (hypothesis, reference, rouge 1.0.1's ROUGE-L F)
    ("The cat sat on the mat. The cat ran.", "the cat sat. A dog ran on the mat.",
     0.7999999950222222),
    ("b a. b", "a b", 0.4999999950000001),  # which LCS the backtrack picks changes the union
    (" ", "Hello. ", 0.6666666622222223),  # whitespace-only sentences become an empty word
    ("the the the cat", "the cat the", 0.4999999950000001),  # words counted as sets
    ("Revenue grew 3.5 percent in 2019. Costs fell", "Costs fell while revenue grew 3.5 percent",
     0.7058823479584776),
    ("...", "x", 0.0), ("", "x", 0.0)]  # the package raises ValueError
FUZZ_RATIO = [  # (a, b, fuzzywuzzy's fuzz.ratio, rapidfuzz.fuzz.ratio for contrast)
    ("abcdefgh", "abcdexyz", 62, 62.5),  # round half to even, as Python's round
    ("kitten", "sitting", 62, 61.53846153846154),
    ("return x + 1;", "return x+1;", 92, 91.66666666666666),
    ("x" * 39 + "a", "x" * 39 + "b", 98, 97.5),
    ("", "", 100, 100.0), ("", "a", 0, 0.0)]
OPENCOMPASS_ROWS = [  # (dataset, prediction, answers, all_classes, OpenCompass's score)
    ("vcsum", "我们今天开会讨论了项目进度，需要解决的问题很多。", ["今天的会议讨论了项目进度和需要解决的问题。"],
     None, 71.99999950079999),
    ("dureader", "项目进度需要讨论。问题很多", ["项目进度", "需要讨论的问题很多"], None, 66.66666618055555),
    ("dureader", "改住方王没", ["改住方王没"], None, 99.9999995),
    # the prediction is segmented again for the second answer, and jieba cuts 改住 apart then
    ("dureader", "改住方王没", ["今天", "改住方王没"], None, 57.14285665306124),
    ("trec", "News Today\nFood", ["News Today"], ["New", "News", "News Today", "Food"], 50.0),
    ("lsht", "体育新闻", ["体育"], ["体育", "体育新闻", "军事"], 50.0),
    ("lcc", "\n// helper\nreturn x + 1;\n", ["return x+1;"], None, 92.0),
    ("samsum", "\nAnna will bring the cake.\nTom agrees.", ["Anna is bringing a cake."], None,
     39.99999950000001),
    ("multifieldqa_zh", "北京大学的校长", ["北京大学校长。"], None, 80.0)]


@pytest.mark.parametrize("hypothesis,reference,expected", ROUGE_PACKAGE)
def test_rouge_l_equals_the_rouge_package(hypothesis, reference, expected):
    assert lb.rouge_l(hypothesis, reference) == expected


@pytest.mark.parametrize("a,b,expected,rapidfuzz_ratio", FUZZ_RATIO)
def test_fuzz_ratio_equals_fuzzywuzzy_not_plain_rapidfuzz(a, b, expected, rapidfuzz_ratio):
    from rapidfuzz import fuzz
    assert lb.fuzz_ratio(a, b) == expected
    assert fuzz.ratio(a, b) == pytest.approx(rapidfuzz_ratio)


@pytest.mark.parametrize("dataset,prediction,answers,classes,expected", OPENCOMPASS_ROWS)
def test_row_score_equals_opencompass_evaluators(dataset, prediction, answers, classes, expected):
    assert lb.longbench_score(dataset, prediction, answers, classes) == expected


def test_metric_packages_are_imported_lazily():
    code = ("import sys; from evaluations import longbench; bad = {'jieba', 'rapidfuzz'} & set(sys.modules); "
            "sys.exit(f'imported {bad}' if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-500:]


# --- plan, run_cell, report --------------------------------------------------------------------

@pytest.fixture
def data(tmp_path):
    write_jsonl(tmp_path / "hotpotqa.jsonl", [
        row(context="Passage 1:\nMira Holt was born in Oslo. " * 200, input="Where was Mira born?",
            answers=["Oslo"]),
        row(context="Passage 1:\nTom lives in Lima.", input="Where does Tom live?",
            answers=["Lima"])])
    write_jsonl(tmp_path / "trec.jsonl", [
        row(context="Question: Who wrote it ?\nType: Individual\n" * 50,
            input="Question: When was it ?\nType:", answers=["Date"],
            all_classes=["Individual", "Date", "Food"])])
    return tmp_path


def test_plan_names_the_folder_file_and_line_that_are_wrong(data):
    def says(cfg) -> str:
        with pytest.raises(ValueError) as e:
            lb.plan(cfg, None, None)
        assert "\n" not in str(e.value)
        return str(e.value)
    assert "is not a folder" in says(config(data / "nope"))
    assert "qasper.jsonl does not exist" in says(config(data, datasets=["qasper"]))
    with open(data / "musique.jsonl", "w") as f:
        f.write(json.dumps(row(context="c", input="q")) + "\n\n{not json\n")
    assert "musique.jsonl line 3: not JSON" in says(config(data, datasets=["musique"]))
    write_jsonl(data / "qasper.jsonl", [row(context="c", input="q"), {"context": "c", "input": "q"}])
    assert "qasper.jsonl line 2: no list field 'answers'" in says(config(data, datasets=["qasper"]))
    write_jsonl(data / "qasper.jsonl", [row(context="c", input="q", answers=())])
    assert "qasper.jsonl line 1: 'answers' must be a non-empty list" in \
        says(config(data, datasets=["qasper"]))  # nothing to score an answer against
    write_jsonl(data / "lsht.jsonl", [row(context="c", input="q", all_classes=None)])
    assert "lsht.jsonl line 1: no 'all_classes'" in says(config(data, datasets=["lsht"]))
    os.mkfifo(data / "triviaqa.jsonl")  # reading it would wait for a writer forever
    assert "triviaqa.jsonl does not exist or is not a file" in says(config(data, datasets=["triviaqa"]))
    os.makedirs(data / "nested" / "data")
    write_jsonl(data / "nested" / "data" / "trec.jsonl", [row(context="c", all_classes=["a"])])
    assert "pass --data" in says(config(data / "nested", datasets=["trec"]))


def test_plan_makes_a_cell_per_row_and_run_cell_decodes_the_cut_ids_as_the_authors(
        data, tok, monkeypatch):
    cells, work, source = lb.plan(config(data, datasets=["hotpotqa", "trec"], rope_label="critical"),
                                  tok, None)
    assert [(c["dataset"], c["index"]) for c in cells] == [("hotpotqa", 0), ("hotpotqa", 1), ("trec", 0)]
    assert all(c["task"] == "longbench" and c["length"] == 512 and c["rope"] == "critical" and
               c["name"].startswith("longbench_") and "critical" in c["name"] for c in cells)
    assert len({c["name"] for c in cells}) == 3 and json.loads(json.dumps(cells)) == cells
    assert work["hotpotqa"][1]["answers"] == ["Lima"] and "3 rows" in source
    assert len(lb.plan(config(data, datasets=["hotpotqa"], samples=1), tok, None)[0]) == 1
    seen = []

    def fake_decode(model, tokenizer, ids, **kwargs):
        seen.append((ids, kwargs))
        return {"answer": "Oslo\nmore", "model_tokens": len(ids), "seconds": 0.0}
    monkeypatch.setattr(lb.decoding, "decode_answer", fake_decode)
    write_jsonl(data / "narrativeqa.jsonl", [row(context="It was cold. " * 300, input="Who?")])
    cfg = config(data, datasets=["hotpotqa", "narrativeqa"], max_len=200, prompt_cache=True)
    cells, work, _ = lb.plan(cfg, tok, None)
    record = lb.run_cell(None, tok, cfg, cells[0], work, "cpu")
    full = tok.encode_prompt(lb.fill_template(work["hotpotqa"][0], "hotpotqa"))
    assert seen[0][0] == full[:100] + full[-100:]
    assert seen[0][1] == dict(gen_length=64, block_length=64, steps=64, prompt_cache=True,
                              device="cpu", cut_at_eos=False)  # all tokens, as the wrapper
    assert record["score"] == pytest.approx(100 * 2 / 3)  # "oslo more" vs "oslo", no first line
    lb.run_cell(None, tok, cfg, cells[2], work, "cpu")  # narrativeqa: 128 tokens, two blocks
    assert (seen[1][1]["gen_length"], seen[1][1]["steps"], seen[1][1]["block_length"]) == \
        (128, 128, 64)


def test_run_cell_and_report_with_a_tiny_random_model(data, tok, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model's matmuls are too small to split
    try:
        model = tiny_model().eval()
        cfg = config(data, datasets=["hotpotqa", "trec"], max_len=256, rope_label="none")
        cells, work, _ = lb.plan(cfg, tok, None)
        done = []
        for cell in (cells[0], cells[2]):  # a long QA prompt and a long few-shot prompt
            record = lb.run_cell(model, tok, cfg, cell, work, "cpu")
            r = work[cell["dataset"]][cell["index"]]
            assert record["prompt_tokens"] > 256 and record["model_tokens"] == 256  # cut to budget
            assert record["gen_length"] == record["steps"] == 64 and record["block_length"] == 64
            assert record["score"] == lb.longbench_score(cell["dataset"], record["answer"],
                                                         r["answers"], r.get("all_classes"))
            done.append({**cell, **record, "score": [40.0, 100.0][len(done)]})  # known scores
    finally:
        torch.set_num_threads(threads)
    summary = lb.report(done, cfg, str(tmp_path))
    table = open(tmp_path / "longbench.md", encoding="utf-8").read()
    assert "| hotpotqa | Multi-Document QA | qa_f1 | 1 | 40.00 |" in table
    assert "| trec | Few-shot Learning | classification | 1 | 100.00 |" in table
    assert "| **average over datasets** (the paper's) | 2 | 70.00 |" in table
    assert "| Multi-Document QA | 1 | 40.00 |" in table and "| Code Completion | 0 | - |" in table
    assert "70.00" in summary and "2 datasets" in summary
