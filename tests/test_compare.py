"""Tests for evaluations/compare.py (python evaluate.py --compare): tables in the paper's layout
from results folders, numbers equal to the cells', missing values shown as missing, the paper's
rows beside them, CSV and figures. The folders are written here as evaluate.py writes them."""
import csv
import json
import os
import shutil

import pytest

import evaluate
from evaluations import compare, longbench
from harness.files import write_json


def write_cells(folder, cells, **settings):
    os.makedirs(folder, exist_ok=True)
    for i, cell in enumerate(cells):  # as evaluate.py writes them, with the run's settings
        write_json(os.path.join(folder, f"{cell['task']}_{i:04d}.json"),
                   {**cell, "settings": {"model": str(folder), **settings}})


def needle_cells(task, scores_by_length: dict, rope="ckpt"):
    """Two depths x two repeats per length; scores[length] lists the four scores."""
    cells = []
    for L, scores in scores_by_length.items():
        for (depth, repeat), s in zip([(0, 0), (0, 1), (50, 0), (50, 1)], scores):
            cells.append(dict(task=task, length=L, depth=depth, repeat=repeat, rope=rope, score=s))
    return cells


@pytest.fixture
def folders(tmp_path):
    """Model A: NeedleBench at 8K and 16K and on LongLLaDA's grid at 2,000, RULER at 4K,
    LongBench, PPL at 256 (results/A/<task>); model B: NeedleBench at 8K only (a task folder
    passed directly)."""
    a, b = tmp_path / "A", tmp_path / "B" / "needlebench"
    write_cells(a / "needlebench", needle_cells("needlebench", {
        8192: [100, 0, 100, 100], 16384: [50, 50, 0, 0], 2000: [100] * 4}), steps=16)
    write_cells(a / "ruler", [dict(task="ruler", ruler_task=t, length=4096, index=0, rope="ckpt",
                                   score=s) for t, s in [("niah_single_1", 100.0), ("vt", 50.0),
                                                         ("niah_single_2", 100.0), ("cwe", 20.0),
                                                         ("qa_squad", 0.0)]],
                answer_turn=False, wonderwords="2.2.0")
    write_cells(a / "longbench", [dict(task="longbench", dataset=d, index=i, rope="ckpt", score=s,
                                       length=1000, dataset_rows=200)
                                  for d, i, s in [("hotpotqa", 0, 40.0), ("hotpotqa", 1, 20.0),
                                                  ("trec", 0, 60.0)]])
    write_cells(a / "ppl", [dict(task="ppl", length=256, doc=0, rope="ckpt",
                                 chunk_nll=[1.0, 2.0, 3.0])])
    write_cells(b, needle_cells("needlebench", {8192: [0, 0, 0, 100]}))
    return {"A": str(a), "B": str(b)}


def test_the_tables_hold_the_cells_means_and_the_papers_rows_on_their_grids(folders, tmp_path):
    out = tmp_path / "cmp"
    text = compare.compare(folders, str(out))
    tables = {part.split("\n")[0]: part for part in text.split("\n## ")[1:]}
    longllada, ultra = (next(t for title, t in tables.items() if f"on {who}'s grid" in title)
                        for who in ("LongLLaDA", "UltraLLaDA"))
    # LLaDA and LongLLaDA were measured on LongLLaDA's 2K-32K grid, with 32 steps: there alone
    assert "| LLaDA (paper) | lengths 6, depths 11, repeats 10, steps 32 | - | 54.25 |" in longllada
    assert "| LongLLaDA lambda 14 (paper) |" in longllada and "82.33" in longllada
    assert "| A | partial: lengths 1/6, depths 2/11, repeats 2/10, steps 16 (paper: 32) | " \
           "100.00 | 100.00 |" in longllada
    assert "UltraLLaDA" not in longllada and "| B |" not in longllada
    # NeedleBench at 8K: per depth the mean over repeats (50 and 100), then over depths: 75
    assert "| model | covers | 8K | 16K | 24K |" in ultra  # the paper's row adds lengths
    assert "| A | partial: lengths 2/16, depths 2/11, repeats 2/10, steps 16 | 75.00 | 25.00 | - |" in ultra
    row_b = next(line for line in ultra.splitlines() if line.startswith("| B |"))
    assert "| 25.00 | - |" in row_b and row_b.endswith("| 25.00 |")  # no 16K: missing, not zero
    assert "| UltraLLaDA (paper) | lengths 16, depths 11, repeats 10, steps 16 | 100.00 |" in ultra
    assert "LLaDA (paper)" not in ultra.replace("UltraLLaDA (paper)", "")
    # RULER at 4K: 5 of 13 tasks, the task mean 54; apart, the categories 100 / 50 / 20 / 0,
    # their mean 42.5 and LongLLaDA's AGG, the mean of vt and cwe: 35
    assert "| A | partial: tasks 5/13, samples 1/100, lengths 1/4, answer turn dropped (paper: " \
           "kept), wonderwords 2.2.0 | 54.00 | - | - | - |" in text
    assert "| 88.37 | 86.22 | 77.51 | 73.63 |" in text
    rows = {r[0]: r for r in csv.reader(open(out / "compare_ruler_categories.csv"))}
    cats = dict(zip(rows["model"], rows["A"]))
    assert cats["4K retrieval"] == cats["4K NIAH"] == "100.00" and cats["4K aggregation"] == "20.00"
    assert cats["4K question answering"] == "0.00" and cats["4K category mean"] == "42.50"
    assert cats["4K AGG"] == "35.00" and cats["covers"].startswith("partial: tasks 5/13")
    # LongBench: hotpotqa 30, trec 60; Multi-Document QA 30, Few-shot 60, average 45
    lb = {r[0]: r for r in csv.reader(open(out / "compare_longbench.csv"))}
    header = lb["model"]
    assert lb["A"][header.index("covers")] == \
        "partial: datasets 2/21, rows 3/400, max-len 1000/16000"
    assert lb["A"][header.index(longbench.MULTI)] == "30.00"
    assert lb["A"][header.index(longbench.FEW_SHOT)] == "60.00"
    assert lb["A"][header.index(longbench.SINGLE)] == ""  # nothing evaluated: an empty field
    assert lb["A"][header.index("average")] == "45.00"
    assert lb["LLaDA (paper)"][header.index("average")] == "31.56"
    assert "| A | partial: datasets 2/21, rows 3/400, max-len 1000/16000 |" in text
    # PPL: exp of the mean chunk NLL, exp(2), with two decimals
    ppl = {r[0]: r for r in csv.reader(open(out / "compare_ppl.csv"))}
    assert ppl["A"][ppl["model"].index("256")] == "7.39"
    assert ppl["UltraLLaDA (paper)"][ppl["model"].index("128K")] == "10.45"
    for picture in ("compare_needlebench_2K-32K.png", "compare_needlebench_8K-128K.png",
                    "compare_ruler.png", "compare_ppl.png"):
        assert (out / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "compare.md").read_text() == text


def test_a_folder_with_two_rope_labels_gives_two_rows(tmp_path):
    folder = tmp_path / "m" / "needlebench"
    write_cells(folder, needle_cells("needlebench", {8192: [100] * 4}, rope="ckpt")
                + needle_cells("needlebench", {8192: [0] * 4}, rope="factor4"))
    text = compare.compare({"m": str(tmp_path / "m")}, str(tmp_path / "out"))
    assert "| m [rope ckpt] | partial: lengths 1/16, depths 2/11, repeats 2/10 | 100.00 |" in text
    assert "| m [rope factor4] | partial: lengths 1/16, depths 2/11, repeats 2/10 | 0.00 |" in text


def test_the_command_line_reports_and_refuses_empty_or_missing_folders(folders, tmp_path,
                                                                      capsys):
    out = tmp_path / "cmp"
    assert evaluate.main(["--compare", f"ultra={folders['A']}", folders["B"], "--out",
                          str(out)]) is None
    printed = capsys.readouterr().out
    a_row = "| partial: lengths 2/16, depths 2/11, repeats 2/10, steps 16 | 75.00 | 25.00 |"
    assert f"| ultra {a_row}" in printed and "| B | partial: lengths 1/16" in printed
    # NAME=DIR splits at the first "=": a folder's name may hold one
    odd = tmp_path / "run=2"
    shutil.copytree(folders["A"], odd)
    assert evaluate.main([f"--compare=a={odd}", "--out", str(out)]) is None
    assert f"| a {a_row}" in capsys.readouterr().out
    assert evaluate.main(["--compare", str(odd), "--out", str(out)]) is None  # unnamed: whole
    assert f"| run=2 {a_row}" in capsys.readouterr().out
    for argv, says in [(["--compare", str(tmp_path / "nowhere")], "is not a folder"),
                       (["--compare", str(tmp_path)], "no results in"),
                       (["--compare", folders["B"], folders["B"]], "two folders are labelled 'B'")]:
        with pytest.raises(SystemExit) as e:
            evaluate.main(argv + ["--out", str(out)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and says in err and err.count("\n") == 1


def test_a_damaged_result_is_left_out_not_shown_as_a_number(tmp_path):
    folder = tmp_path / "m" / "needlebench"
    good = needle_cells("needlebench", {8192: [100, 100, 100, 100]})
    write_cells(folder, good + [{**good[0], "length": 16384, "score": "x"},
                                {k: v for k, v in good[0].items() if k != "depth"}])
    with open(folder / "needlebench_nan.json", "w") as f:  # Python's json writes NaN
        json.dump({**good[0], "length": 24576, "score": float("nan"), "settings": {}}, f)
    text = compare.compare({"m": str(tmp_path / "m")}, str(tmp_path / "out"))
    assert "repeats 2/10 | 100.00 | - | - |" in text  # 16K and 24K shown as missing
