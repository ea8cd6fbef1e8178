"""
compare.py: the paper's tables, one row per model, from finished results folders.

Paper map: docs/paper.md section 6. `python evaluate.py --compare ULTRA=results/ultra
LLADA=results/base ...` reads every benchmark found in each folder and writes, per benchmark,
one table in the paper's layout with a row per model (and per RoPE label, when a folder holds
several), the paper's published rows beside them for reference, as markdown and CSV, and a
figure where a picture reads better than numbers:

    needlebench, niah   the mean score per length and overall (two decimals, as OpenCompass);
                        heatmaps side by side
    ruler               the task mean per length, and per length each category and the
                        category mean; curves across lengths
    longbench           each category, the mean over datasets (the paper's) and over categories
    ppl                 the perplexity per length; curves across lengths

A value that was not evaluated is shown as missing ("-" in markdown, an empty CSV field),
never as zero.
"""
import argparse
import csv
import io
import os

import numpy as np

from evaluations import TASKS, longbench, needles, ppl, ruler
from harness.files import write_text
from harness.results import figure, markdown_table, read_results, short
from harness.runtime import fail

NIAH_LENGTHS = [8192 * k for k in range(1, 17)]
# The published rows (docs/paper.md section 6); only what the paper states, the rest missing.
PAPER = {
    "needlebench": {
        "UltraLLaDA (paper)": {**{L: 100.0 for L in NIAH_LENGTHS}, "overall": 100.0},
        "LongLLaDA, no scaling (paper)": {"overall": 54.25},
        **{f"LongLLaDA, lambda {f} (paper)": {"overall": v}
           for f, v in ((4, 71.33), (14, 82.33), (31, 82.33), (55, 75.43))},
    },
    "ruler": {"UltraLLaDA (paper)": {4096: 88.37, 8192: 86.22, 16384: 77.51, 32768: 73.63}},
    "longbench": {"UltraLLaDA (paper)": {"average": 39.98}, "LLaDA (paper)": {"average": 31.56}},
    "ppl": {"UltraLLaDA (paper)": {131072: 10.45}, "LLaDA (paper)": {131072: 343.88}},
}


def find_benchmarks(folder: str) -> dict[str, list[dict]]:
    """Benchmark -> its cells in `folder`: a task's results folder itself, or a folder of them
    (results/<model>/<task>/, evaluate.py's default)."""
    found = {}
    for b, task in TASKS.items():
        for path in (folder, os.path.join(folder, b)):
            if os.path.isdir(path) and (cells := read_results(path, b, task.KEYS)):
                found[b] = list(cells.values())
                break
    return found


def model_rows(label: str, cells: list[dict]) -> dict[str, list[dict]]:
    """Row label -> cells: one row per RoPE label the folder holds ("ckpt": as saved)."""
    ropes = sorted({c["rope"] for c in cells})
    return {label if len(ropes) == 1 else f"{label} [rope {r}]":
            [c for c in cells if c["rope"] == r] for r in ropes}


# ---------------------------------------------------------------------------------------------
# Each benchmark's row: column -> value, from one model's cells.

def needle_row(cells: list[dict]) -> dict:
    depths, lengths, grid = needles.score_grid(cells)
    return {**{L: needles.nan_mean(col) for L, col in zip(lengths, grid.T)},
            "overall": needles.nan_mean(grid)}


def ruler_rows(cells: list[dict]) -> dict:
    """{length: task mean} and {(length, category or "category mean"): value}."""
    row = {}
    for (_, L), scores in ruler.score_table(cells).items():
        row[L] = scores["average"]
        for name in [*ruler.CATEGORIES, "category mean"]:
            row[(L, name)] = scores[name]
    return row


def longbench_row(cells: list[dict]) -> dict:
    (scores,) = longbench.summary(cells).values()
    return {k: scores[k] for k in [*longbench.CATEGORIES, "average", "category mean"]}


def ppl_row(cells: list[dict]) -> dict:
    return {L: float(curve[-1]) for (_, L), (_, curve) in ppl.ppl_curves(cells).items()}


ROWS = {"needlebench": needle_row, "niah": needle_row, "ruler": ruler_rows,
        "longbench": longbench_row, "ppl": ppl_row}
TITLES = {"needlebench": "NeedleBench (NIAH), mean score per length",
          "niah": "NIAH (ours, synthetic), mean score per length",
          "ruler": "RULER, mean over the 13 tasks per length",
          "longbench": "LongBench at 16K, per category and average",
          "ppl": "Perplexity per length (lower is better)"}


def column_name(column) -> str:
    if isinstance(column, tuple):
        return f"{short(column[0])} {column[1]}"
    return short(column) if isinstance(column, int) else str(column)


def columns_of(rows: dict[str, dict], wanted=lambda c: True) -> list:
    found = {c for row in rows.values() for c in row if wanted(c)}
    lengths = sorted(c for c in found if isinstance(c, int))
    order = [*ruler.CATEGORIES, "category mean"]
    pairs = sorted((c for c in found if isinstance(c, tuple)), key=lambda c: (c[0], order.index(c[1])))
    named = [c for c in ["overall", *longbench.CATEGORIES, "average", "category mean"]
             if c in found]
    return lengths + pairs + named


def tables(rows: dict[str, dict], columns: list, decimals: int) -> tuple[str, str]:
    """The rows as a markdown table and as CSV; a missing value is '-' and an empty field."""
    fmt = lambda v: "-" if v is None or (isinstance(v, float) and np.isnan(v)) \
        else f"{v:.{decimals}f}"  # noqa: E731
    md = markdown_table(["model"] + [column_name(c) for c in columns],
                        [[name] + [fmt(row.get(c)) for c in columns] for name, row in rows.items()])
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["model"] + [column_name(c) for c in columns])
    for name, row in rows.items():
        writer.writerow([name] + ["" if fmt(row.get(c)) == "-" else fmt(row.get(c))
                                  for c in columns])
    return md, out.getvalue()


# ---------------------------------------------------------------------------------------------
# Figures.

def plot_heatmaps(path: str, models: dict[str, list[dict]], title: str) -> None:
    # One grid of depths x lengths for every model, so that the pictures line up; grey: missing
    all_depths = sorted({c["depth"] for cells in models.values() for c in cells})
    all_lengths = sorted({c["length"] for cells in models.values() for c in cells})
    with figure(path, 1, len(models), squeeze=False, figsize=(
            2 + 1.2 * len(all_lengths) * len(models), 1.6 + 0.4 * len(all_depths))) as (fig, axes):
        for ax, (name, cells) in zip(axes[0], models.items()):
            depths, lengths, grid = needles.score_grid(cells)
            full = np.full((len(all_depths), len(all_lengths)), np.nan)
            full[np.ix_([all_depths.index(d) for d in depths],
                        [all_lengths.index(L) for L in lengths])] = grid
            needles.draw_heatmap(ax, [f"{d}%" for d in all_depths], all_lengths, full, name)
        fig.suptitle(title)


def plot_curves(path: str, rows: dict[str, dict], ylabel: str, title: str, log: bool) -> None:
    with figure(path, figsize=(7, 4)) as (fig, ax):
        for name, row in rows.items():
            points = sorted((c, v) for c, v in row.items() if isinstance(c, int) and v is not None)
            if points:
                ax.plot([c for c, _ in points], [v for _, v in points], "o-", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log" if log else "linear")
        ax.set(xlabel="context length (tokens)", ylabel=ylabel)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)


# ---------------------------------------------------------------------------------------------

def compare(folders: dict[str, str], out: str) -> str:
    """folders: model label -> results folder. Writes compare.md, compare_<benchmark>.csv and
    the figures into `out`; returns the markdown."""
    cells = {}  # benchmark -> {row label: cells}
    for label, folder in folders.items():
        for bench, found in find_benchmarks(folder).items():
            cells.setdefault(bench, {}).update(model_rows(label, found))
    if not cells:
        raise ValueError(f"no results in {', '.join(folders.values())}; pass the folders "
                         f"evaluate.py wrote (results/<model>/ or results/<model>/<task>/)")
    sections = []
    for bench in TASKS:
        if bench not in cells:
            continue
        rows = {name: ROWS[bench](c) for name, c in cells[bench].items()}
        rows.update(PAPER.get(bench, {}))
        decimals = 3 if bench == "ppl" else 2
        columns = columns_of(rows, lambda c: not isinstance(c, tuple))
        md, text = tables(rows, columns, decimals)
        write_text(os.path.join(out, f"compare_{bench}.csv"), text)
        section = f"## {TITLES[bench]}\n\n{md}\n\nCSV: compare_{bench}.csv"
        if bench == "ruler":  # the categories per length, a table of their own
            cat_md, cat_text = tables(rows, columns_of(rows, lambda c: isinstance(c, tuple)), 2)
            write_text(os.path.join(out, "compare_ruler_categories.csv"), cat_text)
            section += (f"\n\n### RULER per length: the four categories and their mean\n\n"
                        f"{cat_md}\n\nCSV: compare_ruler_categories.csv")
        png = os.path.join(out, f"compare_{bench}.png")
        if bench in ("needlebench", "niah"):
            plot_heatmaps(png, cells[bench], TITLES[bench])
        elif bench in ("ruler", "ppl"):
            plot_curves(png, rows, "perplexity" if bench == "ppl" else "score", TITLES[bench],
                        log=bench == "ppl")
        picture = f"\n\n![{bench}](compare_{bench}.png)" if bench != "longbench" else ""
        sections.append(section + picture)
    text = ("# The paper's tables, side by side\n\nRows marked (paper) are the published "
            "numbers (docs/paper.md section 6); '-' was not evaluated or not published.\n\n"
            + "\n\n".join(sections) + "\n")
    write_text(os.path.join(out, "compare.md"), text)
    return text


def default_label(folder: str) -> str:
    """results/<model>/ is labelled <model>; a benchmark's own folder, results/<model>/niah,
    its parent's name too."""
    path = os.path.abspath(folder)
    return os.path.basename(os.path.dirname(path) if os.path.basename(path) in TASKS
                            else path)


def main(argv) -> None:
    p = argparse.ArgumentParser(
        description="The paper's tables side by side: one row per model, from the results "
                    "folders of finished evaluations, with the paper's published rows.")
    p.error = fail
    p.add_argument("--compare", nargs="+", metavar="[NAME=]DIR",
                   help="results folders, results/<model>/ (every benchmark in it) or one "
                        "benchmark's folder; NAME labels the row (default: the folder's name)")
    p.add_argument("--out", default=os.path.join("results", "compare"),
                   help="where the tables (markdown, CSV) and figures go (default: %(default)s)")
    args = p.parse_args(argv)
    folders = {}
    for item in args.compare:
        # NAME=DIR, split at the first "="; a folder whose own name holds one is taken whole
        name, _, folder = ("", "", item) if os.path.isdir(item) or "=" not in item \
            else item.partition("=")
        if not os.path.isdir(folder):
            fail(f"--compare {item}: {folder} is not a folder")
        name = name or default_label(folder)
        if name in folders:  # two rows of one name: one would silently replace the other
            fail(f"--compare: two folders are labelled {name!r} ({folders[name]}, {folder}); "
                 f"name them, e.g. --compare A={folders[name]} B={folder}")
        folders[name] = folder
    try:
        print(compare(folders, args.out))
    except ValueError as e:  # FileError too: a folder that cannot be written
        fail(str(e))
