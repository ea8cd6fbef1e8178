"""
niah.py: needle in a haystack, our synthetic version for tiny models (the default NIAH task).

Paper map: docs/paper.md section 5.1. The protocol of LongLLaDA and UltraLLaDA (needles.py: a
needle at depths 0%, 10%, ..., 100% of a long haystack, 32 answer tokens, NeedleBench's score,
a depth x length heatmap); needlebench.py runs the authors' exact prompts for LLaDA-8B. This
file keeps the needle in the synthetic corpus's format (harness/prepare.py), which is what a
tiny model can learn, and its haystack is that corpus's filler sentences without the facts.

What --len counts: the whole prompt, haystack + needle + separator + question, is exactly
--len cl100k tokens; the answer's tokens come on top. The haystack window ends at a sentence
end (so at depth 100% the needle is the last sentence before the question) and starts wherever
--len places it. The needle goes to the last sentence boundary at or before depth% of it.
"""
import os
import re
from dataclasses import dataclass

import numpy as np

from evaluations import decoding, needles
from harness.flags import count0, flag, number
from harness.prepare import filler_text, read_book
from harness.tokenizer import TIKTOKEN_NAME


@dataclass
class Options(needles.Options):
    """NIAH's own flags (python evaluate.py --task niah --help)."""
    repeats: int = flag(1, "haystacks per (length, depth), each a different stretch of text",
                        type=number(int, 0, False, highest=1000), setting=False)
    haystack: str | None = flag(None, "folder of long .txt texts (PG19 books, essays), read in "
                                "name order (default: filler sentences of the synthetic corpus, "
                                "without its facts)")
    # A fact in the format of the synthetic corpus (prepare.py), which is what our tiny models
    # learn; for LLaDA-8B use needlebench, or pass a needle, question and keyword.
    needle: str = flag("The secret code of Mira Holt is 417.", "the sentence hidden in the "
                       "haystack")
    question: str = flag("What is the secret code of Mira Holt? It is", "appended after the "
                         "haystack")
    keyword: str = flag("417", "an answer containing it scores 100; it must occur in the needle")
    separator: str = flag(" ", "text between the haystack and the question (a space, as in the "
                          "synthetic corpus; for LLaDA-8B e.g. $'\\n\\n')")
    seed: int = flag(0, "seed of the synthetic haystack", type=count0)


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
    if not os.path.isdir(cfg.haystack):
        raise ValueError(f"--haystack {cfg.haystack} is not a folder; pass a folder of .txt "
                         f"texts, or leave it out for the synthetic haystack")
    files = sorted(os.path.join(root, n) for root, _, names in os.walk(cfg.haystack)
                   for n in names if n.endswith(".txt"))
    pieces, total = [], 0
    for path in files:  # only as many files as needed: a PG19 folder holds billions of tokens
        text, wrong = read_book(path)  # as the corpus reads a book: a named pipe is refused
        if wrong:
            raise ValueError(f"--haystack {path}: {wrong}; remove it from --haystack")
        pieces.append(np.asarray(counter.encode(text.strip() + "\n\n"), np.int64))  # kept apart
        total += len(pieces[-1])
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


def niah_prompt(window: np.ndarray, bounds: np.ndarray, needle: list[int], tail: list[int],
                depth: int) -> tuple[list[int], int]:
    """haystack[:p] + needle + haystack[p:] + separator + question, and p: the last boundary
    at or before depth% of the haystack (OpenCompass rounds down), or the first one when the
    haystack starts mid-sentence and the depth lies before it."""
    before = np.flatnonzero(bounds[:(len(bounds) - 1) * depth // 100 + 1])
    p = int(before[-1]) if len(before) else int(np.flatnonzero(bounds)[0])
    return window[:p].tolist() + needle + window[p:].tolist() + tail, p


# ---------------------------------------------------------------------------------------------
# The task, as evaluate.py runs it; its size, cost and key fields are NeedleBench's.

KEYS, forward_tokens, cell_flops = needles.KEYS, decoding.forward_tokens, decoding.cell_flops


def plan(cfg, tokenizer, counter) -> tuple[list[dict], dict, str]:
    """Every cell, and the pieces its prompt is made of: the needle (with its leading space)
    and the tail (separator + question) in cl100k ids. The needle, question and haystack are
    checked against every length before anything runs."""
    if not cfg.keyword.strip():
        raise ValueError(f"--keyword {cfg.keyword!r} is blank: every answer would hold it and "
                         f"score 100; pass the word the answer must contain")
    if cfg.keyword not in cfg.needle:
        raise ValueError(f"--keyword {cfg.keyword!r} does not occur in --needle {cfg.needle!r}; "
                         f"no answer could find it")
    needle = counter.encode(" " + cfg.needle.strip())
    tail = counter.encode(cfg.separator + cfg.question)
    if min(cfg.len) <= len(needle) + len(tail):
        raise ValueError(f"--len {min(cfg.len)} cannot hold the needle ({len(needle)} tokens) and "
                         f"the question ({len(tail)} tokens); pass --len "
                         f"{len(needle) + len(tail) + 1} or more")
    pool, source = haystack_pool(cfg, counter, max(cfg.len) - len(needle) - len(tail))
    work = {"pool": pool, "bounds": sentence_boundaries(pool, counter), "needle": needle,
            "tail": tail, "counter": counter, "windows": {}}
    return needles.grid(cfg, "niah", "niah"), work, source


def run_cell(model, tokenizer, cfg, cell, work, device) -> dict:
    L, counter = cell["length"], work["counter"]
    key = (L, cell["repeat"])
    if key not in work["windows"]:  # the same haystack for every depth of a (length, repeat)
        n = L - len(work["needle"]) - len(work["tail"])
        window = haystack_window(work["pool"], work["bounds"], n, cell["repeat"])
        work["windows"] = {key: (window, sentence_boundaries(window, counter))}
    window, bounds = work["windows"][key]
    ids, p = niah_prompt(window, bounds, work["needle"], work["tail"], cell["depth"])
    # The prompt in the model's tokens: the counted ids themselves for a cl100k model, so it
    # reads exactly --len tokens; otherwise its text encoded by the model's own tokenizer with
    # its special tokens (BOS for LLaDA), as the official evaluation wrapper encodes prompts.
    prompt = ids if tokenizer.source == TIKTOKEN_NAME else \
        tokenizer.encode_prompt(counter.decode(ids))
    out = decoding.decode_answer(model, tokenizer, prompt, cfg.gen_length, cfg.block_length,
                                 cfg.steps, cfg.prompt_cache, device, cut_at_eos=True)
    return {"needle_position": p, "needle_depth_actual": round(100 * p / len(window), 2),
            "context_tokens": len(ids), **out, "keyword_found": cfg.keyword in out["answer"],
            # the user's needle whole: NeedleBench's gold string cuts at a "*"
            "score": needles.needle_score(out["answer"], cfg.needle, cfg.keyword)}


def report(cells: list[dict], cfg, folder: str) -> str:
    return needles.heatmap_report(cells, folder, "niah",
                                  f"NIAH, {os.path.basename(os.path.abspath(cfg.model))}")
