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
import random
from dataclasses import dataclass

from evaluations import decoding, needles
from harness.files import FileError, read_jsonl
from harness.flags import count0, flag, number
from harness.tokenizer import cl100k


@dataclass
class Options(needles.Options):
    """NeedleBench's own flags (python evaluate.py --task needlebench --help)."""
    haystack: str | None = flag(None, "NeedleBench's en_un_asr.jsonl (JSON lines with a \"text\" "
                                "field)", required=True)
    needles: str | None = flag(None, "NeedleBench's needles.jsonl (fields needle, "
                               "retrieval_question, arg2 = keyword, language)", required=True)
    repeats: int = flag(10, "haystacks per (length, depth), each a different shuffle of the "
                        "lines (paper: 10)", type=number(int, 0, False, highest=1000),
                        setting=False)
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
# The score, NeedleBench's (needles.py), on OpenCompass's gold string.

def needlebench_score(prediction: str, needle: str, keyword: str) -> float:
    """needles.needle_score as OpenCompass reads its gold answer: it stores "\n" + needle +
    "\n*" + keyword and splits it at "*", so a needle that itself holds a "*" is cut there
    (kept, to score the authors' rows as they were scored)."""
    reference, keyword = ("\n" + needle + "\n*" + keyword).split("*")[:2]
    return needles.needle_score(prediction, reference, keyword)


# ---------------------------------------------------------------------------------------------
# Reading the data files, with one-line errors that name the file and line. origin.py reads
# every line with json.loads(line.strip()): a blank line is an error too.

def text_fields(row: dict, keys: tuple) -> str | None:
    """What is wrong with a row's text fields; an empty keyword is found in every answer."""
    for key in keys:
        if not isinstance(row.get(key), str):
            return f"no text field {key!r}"
        if not row[key].strip():
            return f"{key!r} is empty"
    return None


HINT = "pass OpenCompass NeedleBench's {} as {}"


def read_haystack(path: str) -> list[str]:
    rows = read_jsonl(path, HINT.format("en_un_asr.jsonl", "--haystack"), skip_blank=False,
                      check=lambda row: text_fields(row, ("text",)))
    if not rows:
        raise FileError(f"--haystack {path} is empty; {HINT.format('en_un_asr.jsonl', '--haystack')}")
    return [row["text"] for row in rows]


def read_needles(path: str, language: str) -> list[dict]:
    """The entries of one language, in file order (the order random.choice draws from)."""
    marker = QUESTION[language][0]

    def check(row: dict) -> str | None:
        if row.get("language") != language:
            return text_fields(row, ("language",))
        if wrong := text_fields(row, ("needle", "retrieval_question", "arg2")):
            return wrong
        if marker not in row["retrieval_question"]:  # origin.py would crash
            return f"the retrieval_question lacks {marker!r}, where the guide sentence goes"
        return None
    entries = [row for row in read_jsonl(path, HINT.format("needles.jsonl", "--needles"),
                                         skip_blank=False, check=check)
               if row["language"] == language]
    if not entries:
        raise FileError(f"--needles {path} has no entry with language {language!r}")
    return entries


def encode_lines(texts: list[str], path: str) -> list[list[int]]:
    """cl100k ids of each line, with OpenCompass's call: tiktoken `encode` with its defaults,
    which refuses special-token text such as "<|endoftext|>" (our tokenizer's encode would not)."""
    enc = cl100k()
    ids = []
    for line, text in enumerate(texts, 1):
        try:
            ids.append(enc.encode(text))
        except ValueError:
            raise FileError(f"--haystack {path} line {line} contains special-token text "
                            f"('<|endoftext|>' or the like), which OpenCompass's tiktoken call "
                            f"refuses") from None
    return ids


# ---------------------------------------------------------------------------------------------
# The task, as evaluate.py runs it; its size, cost and key fields are NIAH's.

KEYS, forward_tokens, cell_flops = needles.KEYS, decoding.forward_tokens, decoding.cell_flops


def plan(cfg, tokenizer, counter) -> tuple[list[dict], dict, str]:
    """Every (length, depth, repeat) cell, the haystack in cl100k ids and the needles, both
    files checked. Lengths are counted with OpenCompass's own tiktoken call, not `counter`."""
    if min(cfg.len) <= cfg.length_buffer:
        raise ValueError(f"--len {min(cfg.len)} leaves no haystack after the "
                         f"{cfg.length_buffer}-token --length-buffer; pass a longer --len")
    entries = read_needles(cfg.needles, cfg.language)
    line_ids = encode_lines(read_haystack(cfg.haystack), cfg.haystack)
    total = sum(map(len, line_ids))
    for r in range(cfg.repeats):  # origin.py would silently build a shorter prompt
        needle = pick_needle(entries, r)["needle"]
        need = max(cfg.len) - cfg.length_buffer - len(cl100k().encode("\n" + needle + "\n"))
        if total < need:
            raise ValueError(f"--len {max(cfg.len)} needs {need:,} haystack tokens (repeat {r}) "
                             f"but --haystack {cfg.haystack} holds {total:,} cl100k tokens; "
                             f"pass a shorter --len or a longer haystack")
    source = (f"NeedleBench origin: {cfg.haystack} ({len(line_ids)} lines, {total:,} cl100k "
              f"tokens), {len(entries)} {cfg.language} needles from {cfg.needles}")
    cells = needles.grid(cfg, "needlebench", f"needlebench_{cfg.language[:2].lower()}")
    return cells, {"line_ids": line_ids, "needles": entries}, source


def run_cell(model, tokenizer, cfg, cell: dict, work: dict, device) -> dict:
    sample = make_sample(work["line_ids"], work["needles"], cell["length"], cell["depth"],
                         cell["repeat"], cfg.length_buffer, cfg.guide, cfg.language)
    # OpenCompass fills its "{prompt}" template with str.replace and then blanks the output
    # column the same way, so a literal "{answer}" in the text vanishes before the model.
    text = sample["prompt"].replace("{answer}", "")
    ids = tokenizer.encode_prompt(text)  # BOS first, as the wrapper's add_special_tokens=True
    out = decoding.decode_answer(model, tokenizer, ids, cfg.gen_length, cfg.block_length,
                                 cfg.steps, cfg.prompt_cache, device)  # all 32, as the wrapper
    return {"score": needlebench_score(out["answer"], sample["needle"], sample["keyword"]),
            **out, **{k: sample[k] for k in ("keyword", "needle", "question", "insert_at",
                                             "haystack_tokens")}}


def report(cells: list[dict], cfg, folder: str) -> str:
    return needles.heatmap_report(cells, folder, "needlebench",
                                  f"NeedleBench origin ({cfg.language})")
