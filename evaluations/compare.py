"""
compare.py: the paper's tables, one row per model, from finished results folders.

Paper map: docs/paper.md section 6. `python evaluate.py --compare ULTRA=results/ultra
LLADA=results/base ...` writes, for every benchmark found in the folders, its tables in the
paper's layout (TABLES), a row per model (and per RoPE label, when a folder holds several)
beside the paper's published rows, as markdown and CSV, with heatmaps or curves. NIAH has a
table per grid: LongLLaDA's 2,000 to 32,000 tokens with 32 steps, where the LLaDA and LongLLaDA
rows were measured, and UltraLLaDA's 8K to 128K with 16 steps. RULER adds per length our four
categories and LongLLaDA's groups (NIAH, AGG = vt, cwe, fwe, QA). Each row says what it covers
against the paper's protocol; one that covers less starts "partial:", and its means are over
what it covers. A value that was not evaluated is shown as missing ("-" in markdown, an empty
CSV field), never as zero.
"""
import argparse
import csv
import io
import os
from collections import Counter

from evaluations import TASKS, longbench, needles, ppl, ruler
from harness.files import write_text
from harness.results import figure, markdown_table, nan_mean, read_results, short
from harness.runtime import fail

NIAH_LENGTHS = [8192 * k for k in range(1, 17)]  # UltraLLaDA's NeedleBench grid, 16 steps
GRIDS = {"2K-32K": [2000, 4000, 8000, 16000, 24000, 32000],  # LongLLaDA's, 32 steps
         "8K-128K": NIAH_LENGTHS}
NEEDLES = {"depths": 11, "repeats": 10}  # both grids: depths 0%, 10%, ..., 100%
NIAH = "NeedleBench (NIAH) on {}'s grid, mean per length and overall"
# (benchmark, grid) -> title, the paper's protocol (a count below it makes a row partial, a
# setting unlike it is named), the published rows (docs/paper.md section 6), the rest missing.
TABLES = {
    ("needlebench", "2K-32K"): (NIAH.format("LongLLaDA"), {"lengths": 6, **NEEDLES, "steps": "32"},
                                {"LLaDA (paper)": {"overall": 54.25},  # no scaling
                                 **{f"LongLLaDA lambda {f} (paper)": {"overall": v} for f, v in
                                    ((4, 71.33), (14, 82.33), (31, 82.33), (55, 75.43))}}),
    ("needlebench", "8K-128K"): (NIAH.format("UltraLLaDA"), {"lengths": 16, **NEEDLES, "steps": "16"},
                                 {"UltraLLaDA (paper)": {**{L: 100.0 for L in NIAH_LENGTHS},
                                                         "overall": 100.0}}),
    ("needlebench", "other"): ("NeedleBench (NIAH) at lengths of neither paper grid", {}, {}),
    ("niah", ""): ("NIAH (ours, synthetic), mean per length and overall", {}, {}),
    ("ruler", ""): ("RULER, per length the mean over the row's tasks",
                    {"tasks": 13, "samples": 100, "lengths": 4, "answer turn": "kept",
                     "wonderwords": ruler.WONDERWORDS},
                    {"UltraLLaDA (paper)": {4096: 88.37, 8192: 86.22, 16384: 77.51, 32768: 73.63}}),
    ("longbench", ""): ("LongBench, per category and averaged over the row's datasets",
                        {"datasets": 21, "max-len": 16000},
                        {"UltraLLaDA (paper)": {"average": 39.98}, "LLaDA (paper)": {"average": 31.56}}),
    ("ppl", ""): ("Perplexity per length (lower is better)", {},
                  {"UltraLLaDA (paper)": {131072: 10.45}, "LLaDA (paper)": {131072: 343.88}}),
}


def grid(cell: dict) -> str:
    """The NeedleBench grid a cell belongs to (its table); "" for the other benchmarks."""
    return "" if cell["task"] != "needlebench" else \
        next((g for g, lengths in GRIDS.items() if cell["length"] in lengths), "other")


def setting(cells: list[dict], key: str, show=str) -> str | None:
    """A flag's value as the cells recorded it, '/'-joined when they differ; None if none did."""
    return "/".join(sorted({show(c["settings"][key]) for c in cells
                            if key in c.get("settings", {})})) or None


def covers(want: dict, have: dict) -> str:
    """What a row holds against the paper's protocol: a count below the paper's reads "tasks
    3/13" and makes the row partial, a setting unlike the paper's "steps 16 (paper: 32)"."""
    less = [k for k, v in have.items() if isinstance(v, int) and want.get(k) and v < want[k]]
    parts = [f"{k} {v}/{want[k]}" if k in less else f"{k} {v}" + (
             f" (paper: {want[k]})" if want.get(k) not in (None, v) else "")
             for k, v in have.items() if v is not None]
    return ("partial: " if less else "") + ", ".join(parts)


# ---------------------------------------------------------------------------------------------
# Each benchmark's row: column -> value, from one model's cells, and what it covers.

def needle_row(cells: list[dict], want: dict) -> dict:
    depths, lengths, scores = needles.score_grid(cells)
    repeats = min(Counter((c["length"], c["depth"]) for c in cells).values())
    return {**{L: nan_mean(col) for L, col in zip(lengths, scores.T)},
            "overall": nan_mean(scores),
            "covers": covers(want, {"lengths": len(lengths), "depths": len(depths),
                                    "repeats": repeats, "steps": setting(cells, "steps")})}


LAYOUT = [*ruler.CATEGORIES, "category mean", *ruler.GROUPS]  # per length, a table apart


def ruler_rows(cells: list[dict], want: dict) -> dict:
    """{length: task mean}, {(length, category, their mean or LongLLaDA's group): value}."""
    row, samples = {}, Counter((c["length"], c["ruler_task"]) for c in cells)
    for (_, L), scores in ruler.score_table(cells).items():
        row[L] = scores["average"]
        row.update({(L, name): scores[name] for name in LAYOUT})
    row["covers"] = covers(want, {
        "tasks": min(Counter(L for L, _ in samples).values()), "samples": min(samples.values()),
        "lengths": len({L for L, _ in samples}),
        "answer turn": setting(cells, "answer_turn", lambda on: "kept" if on else "dropped"),
        "wonderwords": setting(cells, "wonderwords")})
    return row


def longbench_row(cells: list[dict], want: dict) -> dict:
    (scores,) = longbench.summary(cells).values()
    rows = {c["dataset"]: c.get("dataset_rows") for c in cells}  # each file's rows, if recorded
    return {**{k: scores[k] for k in [*longbench.CATEGORIES, "average", "category mean"]},
            "covers": covers({**want, "rows": None if None in rows.values() else sum(rows.values())},
                             {"datasets": len(rows), "rows": len(cells),
                              "max-len": min(c["length"] for c in cells)})}


def ppl_row(cells: list[dict], want: dict) -> dict:
    curves = ppl.ppl_curves(cells)
    return {**{L: float(curve[-1]) for (_, L), (_, curve) in curves.items()},
            "covers": covers(want, {"documents": min(n for n, _ in curves.values())})}


ROWS = {"needlebench": needle_row, "niah": needle_row, "ruler": ruler_rows,
        "longbench": longbench_row, "ppl": ppl_row}


def table(rows: dict[str, dict], wanted, out: str, stem: str) -> str:
    """The columns `wanted` picks, after what each row covers, as markdown (returned) and as
    STEM.csv in `out`; a missing value is '-' there and an empty field here."""
    found = {c for row in rows.values() for c in row if wanted(c)}
    columns = ["covers", *sorted(c for c in found if isinstance(c, int)),
               *sorted((c for c in found if isinstance(c, tuple)), key=lambda c: (c[0], LAYOUT.index(c[1]))),
               *[c for c in ["overall", *longbench.CATEGORIES, "average", "category mean"] if c in found]]
    header = ["model"] + [f"{short(c[0])} {c[1]}" if isinstance(c, tuple) else
                          short(c) if isinstance(c, int) else c for c in columns]
    fmt = lambda v: "" if v is None or v != v else v if isinstance(v, str) else f"{v:.2f}"  # noqa
    lines = [[name] + [fmt(row.get(c)) for c in columns] for name, row in rows.items()
             if any(c in row for c in columns[1:])]
    out_csv = io.StringIO()
    csv.writer(out_csv, lineterminator="\n").writerows([header] + lines)
    write_text(os.path.join(out, f"{stem}.csv"), out_csv.getvalue())
    return f"{markdown_table(header, [[v or '-' for v in line] for line in lines])}\n\nCSV: {stem}.csv"


def plot_curves(path: str, rows: dict[str, dict], ylabel: str, title: str, log: bool) -> None:
    """Each row across lengths, ticks 4K, 8K, ...; the paper's rows dashed, with square markers."""
    lengths = sorted({c for row in rows.values() for c in row if isinstance(c, int)})
    with figure(path, figsize=(7, 4)) as (fig, ax):
        for name, row in rows.items():
            points = sorted((c, v) for c, v in row.items() if isinstance(c, int))  # one or more
            ax.plot(*zip(*points), "s--" if name.endswith("(paper)") else "o-", label=name)
        ax.set(xscale="log", yscale="log" if log else "linear", xlabel="context length (tokens)",
               ylabel=ylabel)
        ax.set_xticks(lengths, [short(L) for L in lengths])
        ax.minorticks_off()
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)


def compare(folders: dict[str, str], out: str) -> str:
    """folders: model label -> results folder. Writes compare.md, compare_<benchmark>[_<grid>].csv
    and the figures into `out`; returns the markdown."""
    cells = {}  # (benchmark, grid) -> {row label: cells}
    for label, folder in folders.items():
        for bench, task in TASKS.items():  # a task's results folder, or a folder of them
            found = list((read_results(folder, bench, task.KEYS) or
                          read_results(os.path.join(folder, bench), bench, task.KEYS)).values())
            ropes = {c["rope"] for c in found}  # a row per RoPE label ("ckpt": as saved)
            for c in found:
                name = label if len(ropes) == 1 else f"{label} [rope {c['rope']}]"
                cells.setdefault((bench, grid(c)), {}).setdefault(name, []).append(c)
    if not cells:
        raise ValueError(f"no results in {', '.join(folders.values())}; pass the folders "
                         f"evaluate.py wrote (results/<model>/ or results/<model>/<task>/)")
    sections = []
    for (bench, g), (title, want, paper) in TABLES.items():
        if (bench, g) not in cells:
            continue
        rows = {name: ROWS[bench](c, want) for name, c in cells[bench, g].items()}
        rows.update({name: {**row, "covers": covers(want, want)} for name, row in paper.items()})
        stem = f"compare_{bench}" + (f"_{g}" if g else "")
        section = f"## {title}\n\n" + table(rows, lambda c: not isinstance(c, tuple), out, stem)
        if bench == "ruler":  # the categories per length, a table of their own
            section += ("\n\n### RULER per length: our four categories and their mean, and "
                        "LongLLaDA's groups NIAH, AGG (vt, cwe, fwe) and QA\n\n" +
                        table(rows, lambda c: isinstance(c, tuple), out, f"{stem}_categories"))
        png = os.path.join(out, f"{stem}.png")
        if bench in ("needlebench", "niah"):
            needles.plot_heatmaps(png, needles.needle_panels(cells[bench, g]), title)
        elif bench in ("ruler", "ppl"):
            plot_curves(png, rows, "perplexity" if bench == "ppl" else "score", title,
                        log=bench == "ppl")
        sections.append(section + (f"\n\n![{bench}]({stem}.png)" if bench != "longbench" else ""))
    text = ("# The paper's tables, side by side\n\nRows marked (paper) are the published "
            "numbers (docs/paper.md section 6); '-' was not evaluated or not published; 'covers' "
            "says what each row holds, 'partial:' less than the paper's row.\n\n"
            + "\n\n".join(sections) + "\n")
    write_text(os.path.join(out, "compare.md"), text)
    return text


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
        # results/<model>/ is labelled <model>; a benchmark's own folder, results/<model>/niah, too
        path = os.path.abspath(folder)
        name = name or os.path.basename(os.path.dirname(path) if os.path.basename(path) in TASKS
                                        else path)
        if name in folders:  # two rows of one name: one would silently replace the other
            fail(f"--compare: two folders are labelled {name!r} ({folders[name]}, {folder}); "
                 f"name them, e.g. --compare A={folders[name]} B={folder}")
        folders[name] = folder
    try:
        print(compare(folders, args.out))
    except ValueError as e:  # FileError too: a folder that cannot be written
        fail(str(e))
