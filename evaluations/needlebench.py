"""
needlebench.py: the NIAH numbers of UltraLLaDA (docs/paper.md section 5.1), made the way the
authors made them: OpenCompass NeedleBench "origin", single needle, English.

Source of every rule below: Relaxed-System-Lab/UltraLLaDA, eval/opencompass-0.4.2/opencompass,
files eval/niah/128k/eval_llada_niah.py, configs/datasets/needlebench/needlebench/
needlebench_single.py, datasets/needlebench/origin.py (as patched by the authors) and
models/llada/llada_wrapper.py. For one (length, depth, repeat) cell:

    haystack  the lines of en_un_asr.jsonl (field "text"). Repeat r shuffles them with
              random.seed(r), on top of the shuffles of repeats 0..r-1 (one list, shuffled again).
    needle    random.seed(r); random.choice(the needles.jsonl entries of the language), wrapped in
              "\n"; its keyword is the entry's "arg2".
    length    counted in cl100k tokens (tiktoken `encode`, special-token text refused). Each line
              is encoded alone and the ids concatenated until length - 600 - needle tokens, then
              cut there; the needle's ids go in at int(n * (depth / 100)) and the whole is decoded.
    prompt    the English instruction template around the text, then the question with a guide
              sentence, its answer format cut off so the prompt ends where the answer starts.
    answer    32 tokens, one block of 32, 16 steps; the prompt tokenised with BOS; all 32 tokens
              decoded with special tokens dropped (no stop words), as their wrapper does.
    score     100 if the keyword is in the answer, else 0.2 * 100 * (1 - edit distance / longer
              length) between answer and needle, whitespace removed; the mean over 10 repeats is
              one heatmap cell, depths 0, 10, ..., 100.

Where this differs from the authors' run: a haystack too short for --len is an error here,
where origin.py silently builds a shorter prompt.

    python evaluate.py --task needlebench --len 8192 16384 \
        --haystack needlebench/en_un_asr.jsonl --needles needlebench/needles.jsonl
"""
import functools
import os
import random
import re
from dataclasses import dataclass

import numpy as np

from harness import results
from harness.files import FileError, read_jsonl, write_atomic, write_text
from harness.flags import count, count0, flag
from harness.tokenizer import cl100k


KEYS = ("length", "depth", "repeat", "rope", "score")  # what a result needs for the report


@dataclass
class Options(results.decoding_flags(32, 32, 16, "the authors' NIAH config")):
    """NeedleBench's own flags (python evaluate.py --task needlebench --help)."""
    haystack: str | None = flag(None, "NeedleBench's en_un_asr.jsonl (JSON lines with a \"text\" "
                                "field; required)")
    needles: str | None = flag(None, "NeedleBench's needles.jsonl (fields needle, "
                               "retrieval_question, arg2 = keyword, language; required)")
    depths: list[int] = flag(list(range(0, 101, 10)), "needle depths in percent of the haystack",
                             type=int, nargs="+", setting=False)
    repeats: int = flag(10, "haystacks per (length, depth), each a different shuffle of the "
                        "lines (paper: 10)", type=count, setting=False)
    length_buffer: int = flag(600, "cl100k tokens of each length kept free of haystack for the "
                              "template and question (OpenCompass: 600 for English)", type=count0)
    guide: bool = flag(True, "the question with OpenCompass's guide sentence, as the authors "
                       "ran it")
    language: str = flag("English", "needle language (Chinese needs NeedleBench's Chinese "
                         "haystack)", choices=("English", "Chinese"))

# ---------------------------------------------------------------------------------------------
# The prompt. Template strings are origin.py's (position "End"), character for character.

TEMPLATE = {  # (text before the document, text between document and question)
    "English": ("You are an intelligent AI assistant skilled in answering user questions.\n"
                "Please keep your answers concise and clear. Do not talk about irrelevant topics "
                "or repeat your answers.\nThe document given to you by the user is ",
                "\n\nNow, the question is: "),
    "Chinese": ("你是一个善于回答用户问题的智能AI助手\n"
                "请保持你的回答简洁清楚。不要说和下面文档中的无关的话，或重复你的回答\n"
                "用户现在给你的文档是",
                "\n\n现在请问："),
}

# A needle's question ends "... Please answer in the format 'The X is________.'". origin.py
# puts the guide sentence before the format request, then deletes the format's opening words
# and its closing blank (8 underscores and ".'" in English, 16 characters in Chinese), so the
# prompt ends "The X is" and a base model continues it.
QUESTION = {  # (where the format request starts, the guide sentence, its opening, blank length)
    "English": ("Please answer in the format",
                "Before answering, please consider what in the document is most relevant to "
                "this question. ",
                "Please answer in the format '", 10),
    "Chinese": ("请按照", "在回答之前，请思考文档中与此问题最相关的内容是什么。", "请按照'", 16),
}


def rewrite_question(question: str, language: str, guide: bool) -> str:
    """The question as it ends the prompt (origin.py's _generate_prompt, position "End")."""
    marker, guide_sentence, opening, blank = QUESTION[language]
    parts = question.split(marker)
    # Both of origin.py's branches (guide and "for_base") add the guide sentence; parts beyond
    # the second are dropped there too.
    question = parts[0] + guide_sentence + marker + parts[1]
    # The "End" position cuts the format once; guide=False has already cut it once itself, so
    # the cut runs twice and 10 (16) more characters of the question go.
    for _ in range(1 if guide else 2):
        question = question.replace(opening, "")[:-blank]
    return question


def haystack_order(n_lines: int, repeat: int) -> list[int]:
    """Line order of a repeat: origin.py shuffles one list with seeds 0, 1, ..., repeat in turn
    (random.seed(r); random.shuffle). A private Random(r) draws the same permutation."""
    order = list(range(n_lines))
    for r in range(repeat + 1):
        random.Random(r).shuffle(order)
    return order


def pick_needle(needles: list[dict], repeat: int) -> dict:
    """random.seed(repeat); random.choice(entries of the language), as origin.py draws it."""
    return random.Random(repeat).choice(needles)


def make_sample(line_ids: list[list[int]], needles: list[dict], length: int, depth: int,
                repeat: int, length_buffer: int, guide: bool, language: str) -> dict:
    """One prompt from the haystack lines (already in cl100k ids, file order) and the needles
    of the language."""
    enc = cl100k()
    entry = pick_needle(needles, repeat)
    needle_ids = enc.encode("\n" + entry["needle"] + "\n")
    # The buffer leaves room for template, question and a model tokenizer longer than cl100k.
    n = max(length - length_buffer - len(needle_ids), 0)
    haystack = []
    for i in haystack_order(len(line_ids), repeat):
        haystack += line_ids[i]
        if len(haystack) >= n:
            break
    haystack = haystack[:n]  # cut inside a line, even inside a character (decode repairs it)
    at = int(len(haystack) * (depth / 100))  # origin.py's float order: len * (depth / 100)
    context = enc.decode(haystack[:at] + needle_ids + haystack[at:])
    question = rewrite_question(entry["retrieval_question"], language, guide)
    before, between = TEMPLATE[language]
    return {"prompt": before + context + between + question, "needle": entry["needle"],
            "keyword": entry["arg2"], "question": question,
            "retrieval_question": entry["retrieval_question"], "insert_at": at,
            "haystack_tokens": len(haystack), "needle_tokens": len(needle_ids)}


def needlebench_sample(haystack_file: str, needle_file: str, length: int, depth: int, repeat: int,
                       length_buffer: int = 600, guide: bool = True,
                       language: str = "English") -> dict:
    """The prompt OpenCompass builds for these arguments, its needle and keyword (and the
    question, insertion index and token counts, for readers)."""
    return make_sample(encode_lines(read_haystack(haystack_file), haystack_file),
                       read_needles(needle_file, language), length, depth, repeat,
                       length_buffer, guide, language)


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


def needlebench_score(prediction: str, needle: str, keyword: str) -> float:
    """needle_score as OpenCompass reads its gold answer: it stores "\n" + needle + "\n*" +
    keyword and splits it at "*", so a needle that itself holds a "*" is cut there (kept, to
    score the authors' rows as they were scored)."""
    reference, keyword = ("\n" + needle + "\n*" + keyword).split("*")[:2]
    return needle_score(prediction, reference, keyword)


# ---------------------------------------------------------------------------------------------
# Reading the data files, with one-line errors that name the file and line.

def read_rows(path: str | None, flag: str) -> list[dict]:
    """origin.py reads every line with json.loads(line.strip()): a blank line is an error too."""
    official = {"--haystack": "en_un_asr.jsonl", "--needles": "needles.jsonl"}[flag]
    if path is None:
        raise FileError(f"needlebench needs {flag} FILE, OpenCompass NeedleBench's {official}")
    return read_jsonl(path, f"pass OpenCompass NeedleBench's {official} as {flag}",
                      skip_blank=False)


def require_text(row: dict, keys: tuple, path: str, number: int, flag: str) -> None:
    for key in keys:
        if not isinstance(row.get(key), str):
            raise FileError(f"{flag} {path} line {number} has no text field {key!r}")
        if not row[key].strip():  # an empty keyword is "found" in every answer: a score of 100
            raise FileError(f"{flag} {path} line {number}: {key!r} is empty")


def read_haystack(path: str) -> list[str]:
    rows = read_rows(path, "--haystack")
    for number, row in enumerate(rows, 1):
        require_text(row, ("text",), path, number, "--haystack")
    if not rows:
        raise FileError(f"--haystack {path} is empty")
    return [row["text"] for row in rows]


def read_needles(path: str, language: str) -> list[dict]:
    """The entries of one language, in file order (the order random.choice draws from)."""
    if language not in QUESTION:
        raise ValueError(f"--language {language!r} is not one of {', '.join(QUESTION)}")
    rows = read_rows(path, "--needles")
    needles = []
    for number, row in enumerate(rows, 1):
        require_text(row, ("language",), path, number, "--needles")
        if row["language"] != language:
            continue
        require_text(row, ("needle", "retrieval_question", "arg2"), path, number, "--needles")
        if QUESTION[language][0] not in row["retrieval_question"]:  # origin.py would crash
            raise FileError(f"--needles {path} line {number}: the retrieval_question lacks "
                            f"{QUESTION[language][0]!r}, where the guide sentence goes")
        needles.append(row)
    if not needles:
        raise FileError(f"--needles {path} has no entry with language {language!r}")
    return needles


def haystack_ids(path: str) -> list[list[int]]:
    """The haystack's lines in cl100k ids, read and encoded once per file version: check() and
    plan() both need them, and 128K-token haystacks take seconds to encode."""
    stamp = None
    if path is not None and os.path.isfile(path):
        st = os.stat(path)
        stamp = (st.st_mtime_ns, st.st_size)
    return _haystack_ids(path, stamp)


@functools.lru_cache(maxsize=2)
def _haystack_ids(path: str, stamp) -> list[list[int]]:
    return encode_lines(read_haystack(path), path)


def encode_lines(texts: list[str], path: str) -> list[list[int]]:
    """cl100k ids of each line, with OpenCompass's call: tiktoken `encode` with its defaults,
    which refuses special-token text such as "<|endoftext|>" (our tokenizer's encode would not)."""
    enc = cl100k()
    ids = []
    for number, text in enumerate(texts, 1):
        try:
            ids.append(enc.encode(text))
        except ValueError:
            raise FileError(f"--haystack {path} line {number} contains special-token text "
                            f"('<|endoftext|>' or the like), which OpenCompass's tiktoken call "
                            f"refuses") from None
    return ids


# ---------------------------------------------------------------------------------------------
# The task protocol evaluate.py runs: check, plan, run_cell, report.

def forward_tokens(cfg) -> int:
    """Tokens of the largest forward (the memory check): the longest prompt and its answer."""
    return max(cfg.len) + cfg.gen_length


def check(cfg) -> None:
    """Every flag and both data files, before any model work; a one-line error otherwise."""
    def positive_int(name, value):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"--{name} {value!r}: must be a whole number of 1 or more")
    if not cfg.len:
        raise ValueError("--len: give at least one context length (cl100k tokens)")
    for value in cfg.len:
        positive_int("len", value)
    positive_int("repeats", cfg.repeats)
    results.check_decoding(cfg)
    results.check_cell_count(len(set(cfg.len)) * len(set(cfg.depths)) * cfg.repeats,
                             "pass fewer --len, --depths or --repeats")
    bad = [d for d in cfg.depths if not isinstance(d, int) or not 0 <= d <= 100]
    if not cfg.depths or bad:
        raise ValueError(f"--depths {bad or '(none)'}: a depth is a whole percentage 0..100")
    if not isinstance(cfg.length_buffer, int) or cfg.length_buffer < 0:
        raise ValueError(f"--length-buffer {cfg.length_buffer}: must be 0 or more tokens")
    if not isinstance(cfg.guide, bool):
        raise ValueError(f"guide {cfg.guide!r}: must be True or False")
    if min(cfg.len) <= cfg.length_buffer:
        raise ValueError(f"--len {min(cfg.len)} leaves no haystack after the "
                         f"{cfg.length_buffer}-token --length-buffer; pass a longer --len")
    needles = read_needles(cfg.needles, cfg.language)
    total = sum(map(len, haystack_ids(cfg.haystack)))
    # A short haystack would silently give a shorter prompt in origin.py; here it is an error.
    for r in range(cfg.repeats):
        needle = pick_needle(needles, r)["needle"]
        need = max(cfg.len) - cfg.length_buffer - len(cl100k().encode("\n" + needle + "\n"))
        if total < need:
            raise ValueError(f"--len {max(cfg.len)} needs {need:,} haystack tokens (repeat {r}) "
                             f"but --haystack {cfg.haystack} holds {total:,} cl100k tokens; "
                             f"pass a shorter --len or a longer haystack")


def cell_name(cfg, length: int, depth: int, repeat: int) -> str:
    lang = cfg.language[:2].lower()
    return f"needlebench_{lang}_len{length}_depth{depth:03d}_rep{repeat}_rope-{cfg.rope_label}.json"


def plan(cfg, tokenizer, counter) -> tuple[list[dict], dict, str]:
    """Every (length, depth, repeat) cell, the haystack in cl100k ids and the needles.
    Lengths are counted with OpenCompass's own tiktoken call, not with `counter`."""
    line_ids = haystack_ids(cfg.haystack)
    needles = read_needles(cfg.needles, cfg.language)
    cells = [dict(task="needlebench", length=L, depth=d, repeat=r, rope=cfg.rope_label,
                  name=cell_name(cfg, L, d, r))
             for L in sorted(set(cfg.len)) for r in range(cfg.repeats)
             for d in dict.fromkeys(cfg.depths)]
    source = (f"NeedleBench origin: {cfg.haystack} ({len(line_ids)} lines, "
              f"{sum(map(len, line_ids)):,} cl100k tokens), {len(needles)} {cfg.language} needles "
              f"from {cfg.needles}")
    return cells, {"line_ids": line_ids, "needles": needles}, source


def run_cell(model, tokenizer, cfg, cell: dict, work: dict, device) -> dict:
    sample = make_sample(work["line_ids"], work["needles"], cell["length"], cell["depth"],
                         cell["repeat"], cfg.length_buffer, cfg.guide, cfg.language)
    # OpenCompass fills its "{prompt}" template with str.replace and then blanks the output
    # column the same way, so a literal "{answer}" in the text vanishes before the model.
    text = sample["prompt"].replace("{answer}", "")
    ids = tokenizer.encode_prompt(text)  # BOS first, as the wrapper's add_special_tokens=True
    out = results.decode_answer(model, tokenizer, ids, gen_length=cfg.gen_length,
                                block_length=cfg.block_length, steps=cfg.steps,
                                prompt_cache=cfg.prompt_cache, device=device,
                                cut_at_eos=False)  # the wrapper decodes all 32, no stop words
    return {"score": needlebench_score(out["answer"], sample["needle"], sample["keyword"]),
            "answer": out["answer"], "keyword": sample["keyword"], "needle": sample["needle"],
            "question": sample["question"], "insert_at": sample["insert_at"],
            "haystack_tokens": sample["haystack_tokens"], "model_tokens": out["model_tokens"],
            "seconds": out["seconds"]}


def cell_flops(c, cfg, cell: dict) -> float:
    return results.generation_flops(c, cell["length"], cfg.gen_length, cfg.block_length,
                                    cfg.steps, cfg.prompt_cache)


# ---------------------------------------------------------------------------------------------
# Reports: the mean over repeats per (depth, length), as a table and a heatmap. NIAH (niah.py)
# draws the same pictures.

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


def nan_mean(values) -> float | None:
    """The mean of the values that exist (not NaN), None if there are none."""
    values = np.asarray(values, dtype=float)
    return None if np.all(np.isnan(values)) else float(np.nanmean(values))


def draw_heatmap(ax, depths, lengths, grid, title: str):
    """A depth x length heatmap on matplotlib axes `ax`; returns the image (for a colour bar)."""
    from matplotlib.colors import LinearSegmentedColormap

    # The colours of the original NIAH pictures (gkamradt): red 0, yellow 50, green 100.
    cmap = LinearSegmentedColormap.from_list("niah", ["#F0496E", "#EBB839", "#0CD79F"]) \
        .with_extremes(bad="#dddddd")  # grey: cells not evaluated
    im = ax.imshow(grid, cmap=cmap, vmin=0, vmax=100, aspect="auto")
    for (i, j), v in np.ndenumerate(grid):
        if not np.isnan(v):
            ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(lengths)), [results.short(L) for L in lengths])
    ax.set_yticks(range(len(depths)), [f"{d}%" for d in depths])
    ax.set_xlabel("context length (cl100k tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(title, fontsize=10)
    return im


def plot_heatmap(path: str, depths, lengths, grid, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2.5 + 0.9 * len(lengths), 1.6 + 0.4 * len(depths)))
    fig.colorbar(draw_heatmap(ax, depths, lengths, grid, title), ax=ax, label="score")
    fig.tight_layout()
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)


def heatmap_report(cells: list[dict], folder: str, name: str, title: str) -> str:
    """Per rope label NAME_heatmap_rope-X.png and NAME_table_rope-X.md (depth x length, the
    mean over repeats, an average row per length); the overall score is the plain mean of the
    heatmap's cells with two decimals, as OpenCompass's summarizer averages its (length,
    depth) datasets. Returns the summary to print."""
    lines = []
    for rope in sorted({c["rope"] for c in cells}):
        depths, lengths, grid = score_grid([c for c in cells if c["rope"] == rope])
        fmt = lambda v: "-" if v is None or np.isnan(v) else f"{v:.2f}"  # noqa: E731
        rows = [[f"{d}%"] + [fmt(v) for v in row] for d, row in zip(depths, grid)]
        rows.append(["**average**"] + [f"**{fmt(nan_mean(col))}**" for col in grid.T])
        table = results.markdown_table(["depth \\ length"] + [results.short(L) for L in lengths],
                                       rows)
        heading = f"{title}, rope {rope}: average {fmt(nan_mean(grid))}"
        png = os.path.join(folder, f"{name}_heatmap_rope-{rope}.png")
        plot_heatmap(png, depths, lengths, grid, heading)
        write_text(os.path.join(folder, f"{name}_table_rope-{rope}.md"), f"# {heading}\n\n{table}\n")
        lines += [f"{heading} ({png})", table, ""]
    return "\n".join(lines)


def report(cells: list[dict], cfg, folder: str) -> str:
    return heatmap_report(cells, folder, "needlebench", f"NeedleBench origin ({cfg.language})")
