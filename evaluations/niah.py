"""
niah.py: needle in a haystack, our synthetic version for tiny models (the default NIAH task).

Paper map: docs/paper.md section 5.1. The protocol of LongLLaDA and UltraLLaDA: a needle
sentence is hidden at depths 0%, 10%, ..., 100% of a long haystack, a question about it is
appended, and the model decodes 32 tokens in one block with 16 steps. The score is
OpenCompass NeedleBench's

    score = 100                                            if the keyword is in the answer
          = 0.2 * 100 * (1 - edit_distance(a, n) / max(|a|, |n|))   otherwise

with a and n the answer and the needle without whitespace. Lengths are counted in tiktoken
cl100k_base tokens; the picture is a depth x length heatmap in red-yellow-green.
needlebench.py runs the authors' exact NeedleBench prompts for LLaDA-8B; this file keeps the
needle in the synthetic corpus's format, which is what a tiny model can learn.

What --len counts: the whole prompt, haystack + needle + separator + question, is exactly
--len cl100k tokens; the answer's tokens come on top. The haystack window ends at a sentence
end (so at depth 100% the needle is the last sentence before the question) and starts wherever
--len places it. The needle goes to the last sentence boundary at or before depth% of it.
"""
import os
import re

import numpy as np

from harness.files import write_atomic, write_text
from harness.prepare import filler_text
from harness.results import decode_answer, short
from harness.tokenizer import TIKTOKEN_NAME

# A fact in the format of the synthetic corpus (prepare.py), which is what our tiny models
# learn; for LLaDA-8B use needlebench.py, or pass a needle, question and keyword.
DEFAULT_NEEDLE = "The secret code of Mira Holt is 417."
DEFAULT_QUESTION = "What is the secret code of Mira Holt? It is"
DEFAULT_KEYWORD = "417"
# What a result depends on besides its cell and the model: a rerun with other values starts over.
SETTINGS = ("needle", "question", "keyword", "separator", "gen_length", "block_length", "steps",
            "prompt_cache", "seed", "haystack")

SENTENCE_END = re.compile(r"[.!?][\"')\]]*$")  # a sentence's last token, closing quotes allowed


def haystack_pool(cfg, counter, need: int) -> tuple[np.ndarray, str]:
    """cl100k token ids to cut haystacks from, (n,) int64, and a name for the results.

    Enough for every repeat to read a different stretch where the texts allow it (repeats x
    need tokens); at least `need`, or a one-line error: a haystack is never silently shorter.
    """
    want = (need + 256) * cfg.repeats  # 256: room to end each window at a sentence end
    if cfg.haystack is None:
        # prepare.py's filler sentences, without the corpus's facts: its secret codes would be
        # competing needles.
        return np.asarray(counter.encode(filler_text(want, counter, seed=cfg.seed)), np.int64), \
            "synthetic filler (prepare.py)"
    files = sorted(os.path.join(root, n) for root, _, names in os.walk(cfg.haystack)
                   for n in names if n.endswith(".txt"))
    if not files:
        raise ValueError(f"--haystack {cfg.haystack} has no .txt files; pass a folder of long texts")
    pieces, total = [], 0
    for path in files:  # only as many files as needed: a PG19 folder holds billions of tokens
        try:
            with open(path, encoding="utf-8-sig") as f:
                text = f.read().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read {path} as UTF-8 text ({e.__class__.__name__}); remove it "
                            f"from --haystack") from None
        ids = counter.encode(text + "\n\n")  # the blank line keeps two texts apart
        pieces.append(np.asarray(ids, np.int64))
        total += len(ids)
        if total >= want:
            break
    if total < need:
        raise ValueError(f"--len {max(cfg.len):,} needs {need:,} haystack tokens, but --haystack "
                        f"{cfg.haystack} holds only {total:,} cl100k tokens in {len(files)} .txt "
                        f"files; add texts or pass a shorter --len")
    return np.concatenate(pieces), os.path.abspath(cfg.haystack)


def sentence_boundaries(ids: np.ndarray, counter) -> np.ndarray:
    """(n + 1,) bool: True at j when the needle may go just before token j.

    Inside the text: a token ending with . ! or ? followed by one that starts with whitespace,
    so that " The needle ... 417." and the text after it tokenize apart exactly as together
    ("417.A" or "417.." would merge into other tokens). The start qualifies when the first token
    starts with whitespace; the end always does (the separator follows).
    """
    text = {int(i): counter.decode([int(i)]) for i in np.unique(ids)}
    ends = np.array([bool(SENTENCE_END.search(text[int(i)])) for i in ids])  # (n,)
    spaced = np.array([text[int(i)][:1].isspace() for i in ids])  # (n,)
    bounds = np.ones(len(ids) + 1, dtype=bool)  # (n + 1,)
    bounds[1:-1] = ends[:-1] & spaced[1:]
    bounds[0] = spaced[0]
    return bounds


def haystack_window(pool: np.ndarray, bounds: np.ndarray, n: int, repeat: int) -> np.ndarray:
    """n haystack tokens (n,) that end at a sentence end and start wherever that puts them.

    Repeat r reads from r * n tokens into the pool (wrapping around when the texts are
    short), so repeats read different text, and a cell's haystack does not depend on the
    other lengths of the run. bounds: sentence_boundaries(pool).
    """
    start = repeat * n % len(pool)
    ids = np.roll(pool, -start)  # (N,): the pool read from `start`, wrapping around
    b = np.append(np.roll(bounds[:-1], -start), True)  # (N + 1,): the pool's end is one too
    end = int(np.flatnonzero(b[n:])[0]) + n  # the first sentence end at or after n tokens
    return ids[end - n:end]


def needle_position(bounds: np.ndarray, depth: int) -> int:
    """The last boundary at or before depth% of the haystack (OpenCompass rounds down), or the
    first one when the haystack starts mid-sentence and the depth lies before it."""
    n = len(bounds) - 1
    before = np.flatnonzero(bounds[:n * depth // 100 + 1])
    return int(before[-1]) if len(before) else int(np.flatnonzero(bounds)[0])


def niah_pieces(cfg, counter) -> tuple[list[int], list[int]]:
    """The needle (with its leading space) and the tail (separator + question), in cl100k ids."""
    return counter.encode(" " + cfg.needle.strip()), counter.encode(cfg.separator + cfg.question)


def niah_prompt(window: np.ndarray, bounds: np.ndarray, needle: list[int], tail: list[int],
                depth: int) -> tuple[list[int], int]:
    """haystack[:p] + needle + haystack[p:] + separator + question, and p."""
    p = needle_position(bounds, depth)
    return window[:p].tolist() + needle + window[p:].tolist() + tail, p


def levenshtein(a: str, b: str) -> int:
    """Edit distance: insertions, deletions and substitutions of one character each."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def niah_score(answer: str, needle: str, keyword: str) -> float:
    """OpenCompass NeedleBench: 100 if the keyword is in the answer, otherwise 0.2 x the edit
    similarity 100 * (1 - distance / longer length) of answer and needle without whitespace."""
    if keyword in answer:
        return 100.0
    a, n = re.sub(r"\s+", "", answer), re.sub(r"\s+", "", needle)
    longest = max(len(a), len(n))
    similarity = 100.0 * (1 - levenshtein(a, n) / longest) if longest else 100.0
    return 0.2 * similarity




def model_prompt(ids: list[int], tokenizer, counter) -> list[int]:
    """The prompt in the model's tokens: the counted ids themselves for a cl100k model, so it
    reads exactly --len tokens; otherwise the prompt's text encoded by its own tokenizer, with
    its special tokens (BOS for LLaDA), as the official evaluation wrapper encodes prompts."""
    if tokenizer.source == TIKTOKEN_NAME:
        return ids
    return tokenizer.encode_prompt(counter.decode(ids))



# ---------------------------------------------------------------------------------------------
# Reports: the mean over repeats per (depth, length), as a table and a heatmap.

def score_grid(cells: list[dict]) -> tuple[list, list, np.ndarray]:
    """Depths, lengths and the mean score over repeats, (depths, lengths); NaN where missing."""
    depths = sorted({c["depth"] for c in cells})
    lengths = sorted({c["length"] for c in cells})
    grid = np.full((len(depths), len(lengths)), np.nan)
    for i, d in enumerate(depths):
        for j, L in enumerate(lengths):
            scores = [c["score"] for c in cells if c["depth"] == d and c["length"] == L]
            if scores:
                grid[i, j] = sum(scores) / len(scores)
    return depths, lengths, grid


def niah_grids(cells: list[dict]) -> dict[str, tuple[list, list, np.ndarray]]:
    """score_grid per rope label."""
    return {rope: score_grid([c for c in cells if c["rope"] == rope])
            for rope in sorted({c["rope"] for c in cells})}


def niah_table(depths, lengths, grid) -> str:
    rows = ["| depth \\ length | " + " | ".join(short(L) for L in lengths) + " |",
            "|---:|" + "---:|" * len(lengths)]
    for d, row in zip(depths, grid):
        rows.append(f"| {d}% | " + " | ".join("-" if np.isnan(v) else f"{v:.1f}" for v in row) + " |")
    means = [np.nanmean(col) if not np.all(np.isnan(col)) else np.nan for col in grid.T]
    rows.append("| **average** | " + " | ".join("-" if np.isnan(v) else f"**{v:.1f}**" for v in means)
                + " |")
    return "\n".join(rows)


def plot_heatmap(path: str, depths, lengths, grid, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LinearSegmentedColormap

    # The colours of the original NIAH pictures (gkamradt): red 0, yellow 50, green 100.
    cmap = LinearSegmentedColormap.from_list("niah", ["#F0496E", "#EBB839", "#0CD79F"]) \
        .with_extremes(bad="#dddddd")  # grey: cells not evaluated
    fig, ax = plt.subplots(figsize=(2.5 + 0.9 * len(lengths), 1.6 + 0.4 * len(depths)))
    im = ax.imshow(grid, cmap=cmap, vmin=0, vmax=100, aspect="auto")
    for (i, j), v in np.ndenumerate(grid):
        if not np.isnan(v):
            ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(lengths)), [short(L) for L in lengths])
    ax.set_yticks(range(len(depths)), [f"{d}%" for d in depths])
    ax.set_xlabel("context length (cl100k tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label="score")
    fig.tight_layout()
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)



# ---------------------------------------------------------------------------------------------
# The task, as evaluate.py runs it.

def check(cfg) -> None:
    bad = [d for d in cfg.depths if not 0 <= d <= 100]
    if bad:
        raise ValueError(f"--depths must lie in 0..100 (percent of the haystack), got {bad[0]}")
    if not cfg.keyword or cfg.keyword not in cfg.needle:
        raise ValueError(f"--keyword {cfg.keyword!r} does not occur in --needle {cfg.needle!r}; "
                         f"no answer could find it")
    if cfg.haystack is not None and not os.path.isdir(cfg.haystack):
        raise ValueError(f"--haystack {cfg.haystack} is not a folder; pass a folder of .txt "
                         f"texts, or leave it out for the synthetic haystack")


def plan(cfg, tokenizer, counter) -> tuple[list[dict], dict, str]:
    """Every cell, and the pieces its prompt is made of; every length is checked against the
    needle, the question and the haystack before anything runs."""
    needle, tail = niah_pieces(cfg, counter)
    shortest = len(needle) + len(tail) + 1
    if min(cfg.len) < shortest:
        raise ValueError(f"--len {min(cfg.len)} cannot hold the needle ({len(needle)} tokens) and "
                         f"the question ({len(tail)} tokens); pass --len {shortest} or more")
    pool, source = haystack_pool(cfg, counter, max(cfg.len) - len(needle) - len(tail))
    cells = [dict(task="niah", length=L, depth=d, repeat=r, rope=cfg.rope_label,
                  name=f"niah_len{L}_depth{d:03d}_rep{r}_rope-{cfg.rope_label}.json")
             for L in sorted(set(cfg.len)) for r in range(cfg.repeats) for d in cfg.depths]
    work = {"pool": pool, "bounds": sentence_boundaries(pool, counter), "needle": needle,
            "tail": tail, "counter": counter, "windows": {}}
    return cells, work, source


def run_cell(model, tokenizer, cfg, cell, work, device) -> dict:
    L, counter = cell["length"], work["counter"]
    key = (L, cell["repeat"])
    if key not in work["windows"]:  # the same haystack for every depth of a (length, repeat)
        n = L - len(work["needle"]) - len(work["tail"])
        window = haystack_window(work["pool"], work["bounds"], n, cell["repeat"])
        work["windows"] = {key: (window, sentence_boundaries(window, counter))}
    window, bounds = work["windows"][key]
    ids, p = niah_prompt(window, bounds, work["needle"], work["tail"], cell["depth"])
    out = decode_answer(model, tokenizer, model_prompt(ids, tokenizer, counter), cfg.gen_length,
                        cfg.block_length, cfg.steps, cfg.prompt_cache, device)
    return {"needle_position": p, "needle_depth_actual": round(100 * p / len(window), 2),
            "context_tokens": len(ids), **out, "keyword_found": cfg.keyword in out["answer"],
            "score": niah_score(out["answer"], cfg.needle, cfg.keyword)}


def report(cells: list[dict], cfg, folder: str) -> str:
    """A heatmap and a markdown table per RoPE label; the summary to print."""
    lines = []
    model_name = os.path.basename(os.path.abspath(cfg.model))
    for rope, (depths, lengths, grid) in niah_grids(cells).items():
        title = f"NIAH, {model_name}, rope {rope}: average {float(np.nanmean(grid)):.1f}"
        table = niah_table(depths, lengths, grid)
        plot_heatmap(os.path.join(folder, f"heatmap_rope-{rope}.png"), depths, lengths, grid, title)
        write_text(os.path.join(folder, f"table_rope-{rope}.md"), f"# {title}\n\n{table}\n")
        lines += [f"{title} ({folder}/heatmap_rope-{rope}.png)", table, ""]
    return "\n".join(lines)
