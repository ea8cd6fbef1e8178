"""
needles.py: what the two needle tasks share, niah.py (ours, for tiny models) and needlebench.py
(the authors' NeedleBench): the grid of cells, the score, the heatmaps (RULER's too).

Paper map: docs/paper.md section 5.1. A cell is one (length, depth, repeat): a needle sentence
hidden at depth% of a haystack of `length` cl100k tokens, one prompt decoded in one block of 32
tokens with 16 steps (UltraLLaDA's NIAH config; LongLLaDA's: 32), scored as NeedleBench scores

    score = 100                                            if the keyword is in the answer
          = 0.2 * 100 * (1 - edit_distance(a, n) / max(|a|, |n|))   otherwise

with a and n the answer and the needle without whitespace. A heatmap cell is the mean over
repeats, drawn depth x length from red through yellow to green.
"""
import os
import re
from dataclasses import dataclass

import numpy as np

from evaluations import decoding
from harness import results
from harness.files import write_text
from harness.flags import flag, number
from harness.results import nan_mean

KEYS = ("length", "depth", "repeat", "rope", "score")  # what a result needs for the report


@dataclass
class Options(decoding.decoding_flags(32, 32, 16, "the authors' NIAH config")):
    depths: list[int] = flag(list(range(0, 101, 10)), "needle depths in percent of the haystack",
                             type=number(int, 0, True, highest=100), nargs="+", setting=False)


def grid(cfg, task: str, prefix: str) -> list[dict]:
    """Every (length, depth, repeat) cell, a depth or length given twice once."""
    return [dict(task=task, length=L, depth=d, repeat=r, rope=cfg.rope_label,
                 name=f"{prefix}_len{L}_depth{d:03d}_rep{r}_rope-{cfg.rope_label}.json")
            for L in sorted(set(cfg.len)) for r in range(cfg.repeats)
            for d in dict.fromkeys(cfg.depths)]


# ---------------------------------------------------------------------------------------------
# The score: NeedleBenchOriginEvaluator with its defaults (use_trim=False; the prediction and
# dataset post-processors of the config return the text unchanged).

def edit_similarity(a: str, b: str) -> float:
    """100 * (1 - Levenshtein distance / longer length), 100 for two empty strings."""
    from rapidfuzz.distance import Levenshtein
    return 100 * Levenshtein.normalized_similarity(a, b)


def needle_score(prediction: str, reference: str, keyword: str) -> float:
    """100 if the keyword is in the raw answer, else 0.2 x edit similarity (0..100) between
    answer and reference with all whitespace removed."""
    if keyword in prediction:
        return 100.0
    return 0.2 * edit_similarity(re.sub(r"\s+", "", prediction), re.sub(r"\s+", "", reference))


# ---------------------------------------------------------------------------------------------
# The report: the mean over repeats per (depth, length), as a table and a heatmap.

def score_grid(cells: list[dict], depths=None, lengths=None) -> tuple[list, list, np.ndarray]:
    """Depths, lengths (the cells', unless given) and the mean score over repeats, (depths,
    lengths); NaN where missing."""
    depths = depths or sorted({c["depth"] for c in cells})
    lengths = lengths or sorted({c["length"] for c in cells})
    grid = np.full((len(depths), len(lengths)), np.nan)
    for i, d in enumerate(depths):
        for j, L in enumerate(lengths):
            grid[i, j] = nan_mean([c["score"] for c in cells if c["depth"] == d and c["length"] == L])
    return depths, lengths, grid


def plot_heatmaps(path: str, panels: dict[str, tuple], title: str, ylabel: str = "needle depth"):
    """Heatmaps side by side, {panel title: (row labels, lengths, scores (rows, lengths))}: NIAH's
    depths, RULER's tasks. Red 0, yellow 50, green 100 as the original NIAH pictures (gkamradt),
    grey where nothing was evaluated, each cell's value with two decimals, a colour bar each."""
    from matplotlib.colors import LinearSegmentedColormap
    cmap = LinearSegmentedColormap.from_list("niah", ["#F0496E", "#EBB839", "#0CD79F"]) \
        .with_extremes(bad="#dddddd")
    rows, lengths = max(len(p[0]) for p in panels.values()), max(len(p[1]) for p in panels.values())
    with results.figure(path, 1, len(panels), squeeze=False,
                        figsize=((3 + 0.8 * lengths) * len(panels), 1.8 + 0.4 * rows)) as (fig, axes):
        for ax, (name, (rows, lengths, grid)) in zip(axes[0], panels.items()):
            im = ax.imshow(grid, cmap=cmap, vmin=0, vmax=100, aspect="auto")
            for (i, j), v in np.ndenumerate(grid):
                if not np.isnan(v):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
            ax.set_xticks(range(len(lengths)), [results.short(L) for L in lengths])
            ax.set_yticks(range(len(rows)), rows)
            ax.set(xlabel="context length (cl100k tokens)", ylabel=ylabel)
            ax.set_title(name, fontsize=10)
            fig.colorbar(im, ax=ax, label="score")
        fig.suptitle(title)


def needle_panels(models: dict[str, list[dict]]) -> dict[str, tuple]:
    """plot_heatmaps' panels of each model's cells on one grid of all their depths and lengths,
    so that the pictures line up, titled with the Overall Score: the mean of the heatmap's
    cells, as OpenCompass's summarizer titles LongLLaDA's and UltraLLaDA's heatmaps."""
    depths = sorted({c["depth"] for cells in models.values() for c in cells})
    lengths = sorted({c["length"] for cells in models.values() for c in cells})
    grids = {name: score_grid(cells, depths, lengths)[2] for name, cells in models.items()}
    return {f"{name}\nOverall Score: {nan_mean(grid):.2f}": ([f"{d}%" for d in depths], lengths, grid)
            for name, grid in grids.items()}


def heatmap_report(cells: list[dict], folder: str, name: str, title: str) -> str:
    """Per rope label NAME_heatmap_rope-X.png and NAME_table_rope-X.md (depth x length, the
    mean over repeats, an average row per length); the overall score is the plain mean of the
    heatmap's cells with two decimals, as OpenCompass's summarizer averages its (length,
    depth) datasets. Returns the summary to print."""
    lines = []
    for rope in sorted({c["rope"] for c in cells}):
        mine = [c for c in cells if c["rope"] == rope]
        depths, lengths, grid = score_grid(mine)
        table = results.markdown_table(
            ["depth \\ length"] + [results.short(L) for L in lengths],
            [[f"{d}%", *row] for d, row in zip(depths, grid)]
            + [["**average**", *(f"**{nan_mean(col):.2f}**" for col in grid.T)]])
        heading = f"{title}, rope {rope}: average {nan_mean(grid):.2f}"
        png = os.path.join(folder, f"{name}_heatmap_rope-{rope}.png")
        plot_heatmaps(png, needle_panels({f"rope {rope}": mine}), title)
        write_text(os.path.join(folder, f"{name}_table_rope-{rope}.md"), f"# {heading}\n\n{table}\n")
        lines += [f"{heading} ({png})", table, ""]
    return "\n".join(lines)
