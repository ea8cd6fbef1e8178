"""
longbench.py: LongBench at 16K, the paper's third table (docs/paper.md section 5.3), as the authors
ran it: OpenCompass 0.4.2, their LLaDA wrapper (drop_middle=True, max_seq_len=16000), batch 1.

    data     the official THUDM files, <data>/<dataset>.jsonl, 21 datasets, every row
    prompt   OpenCompass's template for the dataset with {input}, then {context}, filled in
    tokens   the prompt encoded with the tokenizer's special tokens (BOS for LLaDA); if that is
             longer than 16,000 ids, the first 8,000 and the last 8,000 are kept (BOS counts and
             stays in the head). The cut is on ids: the text is never decoded and re-encoded.
    decode   max_out_len of the dataset rounded up to a whole 64-token block, as many steps as
             answer tokens, temperature 0 (the wrapper: 512 steps, lowered to the answer length)
    score    first line only for trec, triviaqa, samsum, lsht; the LongBench metric of the
             dataset against every reference answer, the best one counts; 0..100
    table    the mean per dataset; the paper's average is the mean over the 21 datasets

The metrics compute what OpenCompass's LongBench evaluators compute with the packages they
import (`rouge` 1.0.1, `fuzzywuzzy` with python-Levenshtein, jieba): ROUGE-L is written out
here, fuzz.ratio comes from rapidfuzz; both are imported only inside the metric functions.
"""
import logging
import math
import os
import re
import string
from collections import Counter
from dataclasses import dataclass

from evaluations import decoding
from harness import files, results
from harness.flags import count, flag, number
from harness.results import nan_mean  # the reports' mean: of the values that exist

MAX_LEN = 16000  # the wrapper's max_seq_len: model ids kept, BOS included
BLOCK_LENGTH = 64  # the config's diffusion_config block_length


@dataclass(frozen=True)
class Spec:
    template: str  # OpenCompass's prompt, {context} and {input} filled in
    max_out_len: int  # the dataset config's answer tokens, before rounding up to a block
    metric: str  # key of METRICS
    category: str  # the paper's (and OpenCompass's summarizer's) grouping
    language: str  # en, zh, or code


SINGLE, MULTI, SUMMARY = "Single-Document QA", "Multi-Document QA", "Summarization"
FEW_SHOT, SYNTHETIC, CODE = "Few-shot Learning", "Synthetic Tasks", "Code Completion"
CATEGORIES = [SINGLE, MULTI, SUMMARY, FEW_SHOT, SYNTHETIC, CODE]

# OpenCompass gives qasper the multi-document prompt (and 32 answer tokens), not LongBench's own.
PASSAGES_QA = ("Answer the question based on the given passages. Only give me the answer and do "
               "not output any other words.\n\nThe following are given passages.\n{context}\n\n"
               "Answer the question based on the given passages. Only give me the answer and do "
               "not output any other words.\n\nQuestion: {input}\nAnswer:")
CODE_PROMPT = "Please complete the code given below. \n{context}{input}Next line of code:\n"

DATASETS = {
    "narrativeqa": Spec(
        "You are given a story, which can be either a novel or a movie script, and a question. "
        "Answer the question as concisely as you can, using a single phrase if possible. Do not "
        "provide any explanation.\n\nStory: {context}\n\nNow, answer the question based on the "
        "story as concisely as you can, using a single phrase if possible. Do not provide any "
        "explanation.\n\nQuestion: {input}\n\nAnswer:", 128, "qa_f1", SINGLE, "en"),
    "qasper": Spec(PASSAGES_QA, 32, "qa_f1", SINGLE, "en"),
    "multifieldqa_en": Spec(
        "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following "
        "question based on the above text, only give me the answer and do not output any other "
        "words.\n\nQuestion: {input}\nAnswer:", 64, "qa_f1", SINGLE, "en"),
    "multifieldqa_zh": Spec(
        "阅读以下文字并用中文简短回答：\n\n{context}\n\n现在请基于上面的文章回答下面的问题，"
        "只告诉我答案，不要输出任何其他字词。\n\n问题：{input}\n回答：", 64, "qa_f1_zh", SINGLE, "zh"),
    "hotpotqa": Spec(PASSAGES_QA, 32, "qa_f1", MULTI, "en"),
    "2wikimqa": Spec(PASSAGES_QA, 32, "qa_f1", MULTI, "en"),
    "musique": Spec(PASSAGES_QA, 32, "qa_f1", MULTI, "en"),
    "dureader": Spec(
        "请基于给定的文章回答下述问题。\n\n文章：{context}\n\n请基于上述文章回答下面的问题。\n\n"
        "问题：{input}\n回答：", 128, "rouge_zh", MULTI, "zh"),
    "gov_report": Spec(
        "You are given a report by a government agency. Write a one-page summary of the report."
        "\n\nReport:\n{context}\n\nNow, write a one-page summary of the report.\n\nSummary:",
        512, "rouge", SUMMARY, "en"),
    "qmsum": Spec(
        "You are given a meeting transcript and a query containing a question or instruction. "
        "Answer the query in one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the "
        "query based on the above meeting transcript in one or more sentences.\n\nQuery: {input}"
        "\nAnswer:", 512, "rouge", SUMMARY, "en"),
    "multi_news": Spec(
        "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n"
        "{context}\n\nNow, write a one-page summary of all the news.\n\nSummary:\n",
        512, "rouge", SUMMARY, "en"),
    "vcsum": Spec(
        "下面有一段会议记录，请你阅读后，写一段总结，总结会议的内容。\n会议记录：\n{context}\n\n"
        "会议总结：", 512, "rouge_zh", SUMMARY, "zh"),
    "trec": Spec(
        "Please determine the type of the question below. Here are some examples of questions."
        "\n\n{context}\n{input}", 64, "classification", FEW_SHOT, "en"),
    "triviaqa": Spec(
        "Answer the question based on the given passage. Only give me the answer and do not "
        "output any other words. The following are some examples.\n\n{context}\n\n{input}",
        32, "qa_f1", FEW_SHOT, "en"),
    "samsum": Spec(
        "Summarize the dialogue into a few short sentences. The following are some examples."
        "\n\n{context}\n\n{input}", 128, "rouge", FEW_SHOT, "en"),
    "lsht": Spec("请判断给定新闻的类别，下面是一些例子。\n\n{context}\n{input}",
                 64, "classification", FEW_SHOT, "zh"),
    "passage_count": Spec(
        "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. "
        "Please carefully read these paragraphs and determine how many unique paragraphs there "
        "are after removing duplicates. In other words, how many non-repeating paragraphs are "
        "there in total?\n\n{context}\n\nPlease enter the final count of unique paragraphs after "
        "removing duplicates. The output format should only contain the number, such as 1, 2, 3, "
        "and so on.\n\nThe final answer is: ", 32, "count", SYNTHETIC, "en"),
    "passage_retrieval_en": Spec(
        "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which "
        "paragraph the abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}"
        "\n\nPlease enter the number of the paragraph that the abstract is from. The answer "
        "format must be like \"Paragraph 1\", \"Paragraph 2\", etc.\n\nThe answer is: ",
        32, "retrieval", SYNTHETIC, "en"),
    "passage_retrieval_zh": Spec(
        "以下是若干段落文字，以及其中一个段落的摘要。请确定给定的摘要出自哪一段。\n\n{context}\n\n"
        "下面是一个摘要\n\n{input}\n\n请输入摘要所属段落的编号。答案格式必须是\"段落1\"，\"段落2\"等格式"
        "\n\n答案是：", 32, "retrieval_zh", SYNTHETIC, "zh"),
    "lcc": Spec("Please complete the code given below. \n{context}Next line of code:\n",
                64, "code_sim", CODE, "code"),
    "repobench-p": Spec(CODE_PROMPT, 64, "code_sim", CODE, "code"),
}


KEYS = ("dataset", "index", "length", "rope", "score")  # what a result needs for the reports


@dataclass
class Options(decoding.PromptCache):
    """LongBench's own flags (python evaluate.py --task longbench --help). Decoding follows the
    authors' config per dataset: blocks of 64, as many steps as answer tokens."""
    data: str | None = flag(None, "the folder of LongBench's .jsonl files (THUDM/LongBench "
                            "data.zip)", required=True)
    datasets: list[str] | None = flag(None, f"datasets to run (default: all 21): "
                                      f"{', '.join(DATASETS)}", nargs="+", choices=list(DATASETS),
                                      metavar="NAME", setting=False)
    samples: int | None = flag(None, "the first N rows of each dataset (default: all)",
                               type=count, setting=False)
    max_len: int = flag(MAX_LEN, "model tokens a prompt is cut to, in the middle, a head and a "
                        "tail (paper: 16000)", type=number(int, 2, True))


FIRST_LINE = {"trec", "triviaqa", "samsum", "lsht"}  # few-shot: the answer ends at its first line


# ---------------------------------------------------------------------------------------------
# The prompt

def fill_template(row: dict, dataset: str) -> str:
    """The dataset's prompt with the row filled in, in OpenCompass's order: {input} is replaced
    first, then {context}, then the answer column's placeholder with '' (so a literal "{input}"
    inside a context stays, and a literal "{answers}" in it disappears)."""
    answer_column = "all_labels" if DATASETS[dataset].metric == "classification" else "answers"
    text = DATASETS[dataset].template.replace("{input}", str(row.get("input", "")))
    return text.replace("{context}", str(row["context"])).replace("{" + answer_column + "}", "")


def truncate_middle(ids: list[int], max_len: int) -> list[int]:
    """The wrapper's drop_middle: longer than max_len, keep the first max_len // 2 ids and the
    last max_len - max_len // 2; whatever the ids hold (BOS) counts."""
    if len(ids) <= max_len:
        return list(ids)
    head = max_len // 2
    return list(ids[:head]) + list(ids[len(ids) - (max_len - head):])


def build_prompt(row: dict, dataset: str, encode, decode, max_len: int = MAX_LEN) -> str:
    """The prompt as text, cut in the middle to max_len ids of `encode` as the wrapper cuts it.

    The authors' 16,000 counts the ids the model sees, BOS included: pass the tokenizer's
    prompt encoder (tokenizer.encode_prompt) as `encode` for that count; plain encode counts
    the text alone. Evaluation itself (run_cell) never goes back through text, since decoding
    a cut that splits a character and re-encoding it would not give the same ids.
    """
    text = fill_template(row, dataset)
    ids = encode(text)
    if len(ids) <= max_len:
        return text
    kept = truncate_middle(ids, max_len)
    return decode(kept[:max_len // 2]) + decode(kept[max_len // 2:])


def answer_tokens(dataset: str) -> int:
    """Tokens decoded: the wrapper rounds max_out_len up to whole blocks (32 -> 64) and keeps
    every decoded token; steps are then lowered from 512 to this number."""
    return math.ceil(DATASETS[dataset].max_out_len / BLOCK_LENGTH) * BLOCK_LENGTH


# ---------------------------------------------------------------------------------------------
# The metrics: each maps (prediction, the row's reference answers, all_classes) to 0..1

def first_line(text: str) -> str:
    return text.lstrip("\n").split("\n")[0]


EN_PUNCTUATION = set(string.punctuation)


def normalize_en(s: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    s = "".join(ch for ch in s.lower() if ch not in EN_PUNCTUATION)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", s).split())


# The official list (a space is also in OpenCompass's copy; whitespace is dropped anyway).
ZH_PUNCTUATION = set(string.punctuation + "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～"
                     "｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏.")


def normalize_zh(s: str) -> str:
    """Lower case, no English or Chinese punctuation, no whitespace at all."""
    return "".join("".join(ch for ch in s.lower() if ch not in ZH_PUNCTUATION).split())


def jieba_cut(text: str) -> list[str]:
    """jieba's accurate mode (cut_all=False), the segmentation every Chinese metric uses."""
    import jieba
    jieba.setLogLevel(logging.WARNING)  # not the dictionary-loading chatter on every run
    return list(jieba.cut(text, cut_all=False))


def token_f1(prediction: list[str], reference: list[str]) -> float:
    same = sum((Counter(prediction) & Counter(reference)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(prediction), same / len(reference)
    return (2 * precision * recall) / (precision + recall)


def qa_f1(prediction: str, reference: str) -> float:
    return token_f1(normalize_en(prediction).split(), normalize_en(reference).split())


def qa_f1_zh(prediction: str, reference: str) -> float:
    def words(text):
        return [w for w in (normalize_zh(t) for t in jieba_cut(text)) if w]
    return token_f1(words(prediction), words(reference))


def rouge_l(hypothesis: str, reference: str) -> float:
    """ROUGE-L F as the `rouge` package (1.0.1) computes it in get_scores(avg=True).

    Its summary-level ROUGE-L: sentences are the pieces between '.', words are split on single
    spaces, and words are counted as sets: the overlap is the number of distinct words in the
    union of the LCS of every (reference sentence, hypothesis sentence) pair, over the distinct
    words of each side. An empty side raises in the package, which the callers score 0. The
    package rebuilds each LCS recursively, so on a pair of sentences longer than about 1,000
    words together it raises RecursionError (also scored 0); here there is no such limit.
    """
    def sentences(text):
        return [" ".join(s.split()).split(" ") for s in text.split(".") if len(s) > 0]
    hyp, ref = sentences(hypothesis), sentences(reference)
    if not hyp or not ref:
        return 0.0
    overlap = set()
    for r in ref:
        for h in hyp:
            overlap |= lcs_words(r, h)
    m = len({w for s in ref for w in s})
    n = len({w for s in hyp for w in s})
    recall, precision = len(overlap) / m, len(overlap) / n
    return 2.0 * ((precision * recall) / (precision + recall + 1e-8))


def lcs_words(x: list[str], y: list[str]) -> set[str]:
    """The words of one longest common subsequence of x and y, the one the package's backtrack
    picks (on a tie it steps back in y), so the union of sets comes out the same."""
    table = [[0] * (len(y) + 1) for _ in range(len(x) + 1)]  # (len x + 1, len y + 1)
    for i in range(1, len(x) + 1):
        for j in range(1, len(y) + 1):
            table[i][j] = (table[i - 1][j - 1] + 1 if x[i - 1] == y[j - 1]
                           else max(table[i - 1][j], table[i][j - 1]))
    words, i, j = set(), len(x), len(y)
    while i > 0 and j > 0:
        if x[i - 1] == y[j - 1]:
            words.add(x[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return words


def classification(prediction: str, reference: str, all_classes: list[str]) -> float:
    matches = [c for c in all_classes if c in prediction]
    # A class that is only part of the reference's name does not count against it. The official
    # loop removes from the list it walks, which skips the match after each removal; kept so.
    for c in matches:
        if c in reference and c != reference:
            matches.remove(c)
    return 1.0 / len(matches) if reference in matches else 0.0


def share_of_numbers(prediction: str, number: str) -> float:
    """Of the numbers written in the prediction, the share that equal the right one."""
    numbers = re.findall(r"\d+", prediction)
    return numbers.count(number) / len(numbers) if numbers else 0.0


def retrieval(prediction: str, reference: str, pattern: str) -> float:
    found = re.search(pattern, reference)  # the reference names the paragraph
    return share_of_numbers(prediction, found.group(1)) if found else 0.0


def fuzz_ratio(a: str, b: str) -> int:
    """fuzzywuzzy's fuzz.ratio (with python-Levenshtein, as OpenCompass installs it): 100 for
    equal strings, 0 if either is empty, else round(100 * Indel similarity) to an integer."""
    from rapidfuzz.distance import Indel
    if a == b:
        return 100
    if not a or not b:
        return 0
    return int(round(100 * Indel.normalized_similarity(a, b)))


def code_sim(prediction: str, reference: str) -> float:
    """The first line that is not a comment or a code fence, against the reference line."""
    lines = [line for line in prediction.lstrip("\n").split("\n")
             if "`" not in line and "#" not in line and "//" not in line]
    return fuzz_ratio(lines[0] if lines else "", reference) / 100


def best_of(score_one):
    """Score against each reference answer; the best counts (0 with none)."""
    return lambda prediction, answers, all_classes: max(
        [0.0] + [score_one(prediction, a, all_classes) for a in answers])


def rouge_zh(prediction: str, answers: list[str], all_classes=None) -> float:
    best = 0.0
    for reference in answers:
        # OpenCompass segments the prediction again for every reference answer (the segmented
        # text is what it keeps), so with several answers the later ones see it re-segmented.
        prediction = " ".join(jieba_cut(prediction))
        best = max(best, rouge_l(prediction, " ".join(jieba_cut(reference))))
    return best


# OpenCompass adds up classification, retrieval and count over a row's answers where LongBench's
# eval.py takes the best; the rows of those datasets have one answer each, so the two agree.
METRICS = {
    "qa_f1": best_of(lambda p, a, _: qa_f1(p, a)),
    "qa_f1_zh": best_of(lambda p, a, _: qa_f1_zh(p, a)),
    "rouge": best_of(lambda p, a, _: rouge_l(p, a)),
    "rouge_zh": rouge_zh,
    "classification": best_of(lambda p, a, classes: classification(p, a, classes or [])),
    "retrieval": best_of(lambda p, a, _: retrieval(p, a, r"Paragraph (\d+)")),
    "retrieval_zh": best_of(lambda p, a, _: retrieval(p, a, r"段落(\d+)")),
    "count": best_of(lambda p, a, _: share_of_numbers(p, str(a))),
    "code_sim": best_of(lambda p, a, _: code_sim(p, a)),
}


def longbench_score(dataset: str, prediction: str, answers: list[str],
                    all_classes: list[str] | None = None) -> float:
    """One row's score, 0..100: the official post-processing, then the dataset's metric."""
    if dataset in FIRST_LINE:
        prediction = first_line(prediction)
    return 100 * METRICS[DATASETS[dataset].metric](prediction, answers, all_classes)


# ---------------------------------------------------------------------------------------------
# The data: the rows of one LongBench file, checked where the file is opened.

def load_rows(path: str, dataset: str) -> list[dict]:
    fields = {"context": str, "answers": list}
    if "{input}" in DATASETS[dataset].template:
        fields["input"] = str

    def check_row(row: dict) -> str | None:
        for name, kind in fields.items():
            if not isinstance(row.get(name), kind):
                return f"no {kind.__name__} field {name!r} (is it a LongBench file?)"
        if not row["answers"] or not all(isinstance(a, str) for a in row["answers"]):
            # without a reference every answer would score 0 (or break the best-of metrics)
            return "'answers' must be a non-empty list of strings"
        classes = row.get("all_classes")
        if DATASETS[dataset].metric == "classification" and not (
                isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
            return f"no 'all_classes', which {dataset} is scored with"
        return None

    rows = files.read_jsonl(path, "download LongBench's data (THUDM/LongBench, data.zip) and "
                            "pass the folder of its .jsonl files as --data", check=check_row)
    if not rows:
        raise files.FileError(f"{path} has no rows; re-download the file")
    return rows


# ---------------------------------------------------------------------------------------------
# The task, as evaluate.py runs it.

def forward_tokens(cfg) -> int:
    """Tokens of the largest forward (the memory check): a cut prompt and the longest answer."""
    return cfg.max_len + max(answer_tokens(d) for d in cfg.datasets or DATASETS)


def plan(cfg, tokenizer, counter) -> tuple[list[dict], dict, str]:
    """One cell per (dataset, row), the first cfg.samples rows of each dataset, every file
    checked before any model work. Lengths are in model tokens, so `counter` (the cl100k
    counter of the needle tasks) is not used."""
    if not os.path.isdir(cfg.data):
        raise ValueError(f"--data {cfg.data} is not a folder; LongBench needs the folder of its "
                         f".jsonl files (THUDM/LongBench data.zip)")
    work, cells = {}, []
    for name in dict.fromkeys(cfg.datasets or DATASETS):
        path = os.path.join(cfg.data, name + ".jsonl")
        nested = os.path.join(cfg.data, "data", name + ".jsonl")
        if not os.path.exists(path) and os.path.isfile(nested):
            raise ValueError(f"{path} does not exist but {nested} does; pass --data "
                             f"{os.path.join(cfg.data, 'data')}")
        work[name] = load_rows(path, name)  # all of them: a cell records how many there are
        cells += [{"task": "longbench", "dataset": name, "index": i, "length": cfg.max_len,
                   "rope": cfg.rope_label,
                   "name": f"longbench_{name}_{cfg.max_len}_{cfg.rope_label}_{i:04d}.json"}
                  for i in range(len(work[name][:cfg.samples]))]
    source = (f"LongBench, {len(work)} datasets from {cfg.data}, {len(cells)} rows, prompts cut "
              f"in the middle to {cfg.max_len:,} model tokens")
    return cells, work, source


def run_cell(model, tokenizer, cfg, cell: dict, work: dict, device) -> dict:
    dataset = cell["dataset"]
    row = work[dataset][cell["index"]]
    ids = tokenizer.encode_prompt(fill_template(row, dataset))
    gen_length = steps = answer_tokens(dataset)  # one step per answer token
    # The ids are cut, not the text (see build_prompt); BOS stays at the head. ids is kept
    # whole for the record of how long the prompt was.
    out = decoding.decode_answer(model, tokenizer, truncate_middle(ids, cfg.max_len),
                                 gen_length=gen_length, block_length=BLOCK_LENGTH,
                                 steps=steps, prompt_cache=cfg.prompt_cache, device=device,
                                 cut_at_eos=False)  # the wrapper decodes every token, no stop words
    return {"dataset": dataset, "index": cell["index"], "id": row.get("_id"),
            "dataset_rows": len(work[dataset]),
            "score": longbench_score(dataset, out["answer"], row["answers"],
                                     row.get("all_classes")),
            "answer": out["answer"], "answers": row["answers"],
            "prompt_tokens": len(ids), "model_tokens": out["model_tokens"],
            "gen_length": gen_length, "steps": steps, "block_length": BLOCK_LENGTH,
            "seconds": out["seconds"]}


def cell_flops(c, cfg, cell: dict) -> float:
    n = answer_tokens(cell["dataset"])
    return results.generation_flops(c, cfg.max_len, n, BLOCK_LENGTH, n, cfg.prompt_cache)


def summary(cells: list[dict]) -> dict[str, dict]:
    """rope -> {dataset: mean score, category: mean of its datasets, "average": mean over the
    datasets (the paper's), "category mean": mean over the categories (OpenCompass's
    `longbench` group)}; None where nothing was evaluated."""
    out = {}
    for rope in dict.fromkeys(c["rope"] for c in cells):
        mine = [c for c in cells if c["rope"] == rope]
        row = {d: nan_mean([c["score"] for c in mine if c["dataset"] == d]) for d in DATASETS}
        row.update({cat: nan_mean([row[d] for d in DATASETS if DATASETS[d].category == cat])
                    for cat in CATEGORIES})
        row["average"] = nan_mean([row[d] for d in DATASETS])
        row["category mean"] = nan_mean([row[cat] for cat in CATEGORIES])
        out[rope] = row
    return out


def report(cells: list[dict], cfg, folder: str) -> str:
    """longbench.md: the score per dataset and per category, one column per RoPE label, with the
    paper's average (over datasets) and OpenCompass's `longbench` group (over categories)."""
    scores = summary(cells)
    ropes = list(scores)
    names = [d for d in DATASETS if any(scores[r][d] is not None for r in ropes)]
    rows = Counter((c["rope"], c["dataset"]) for c in cells)
    table = results.markdown_table(
        ["dataset", "category", "metric", "rows"] + ropes,
        [[d, DATASETS[d].category, DATASETS[d].metric, max(rows[r, d] for r in ropes)]
         + [scores[r][d] for r in ropes] for d in names])
    groups = results.markdown_table(
        ["category", "datasets"] + ropes,
        [[cat, sum(DATASETS[d].category == cat for d in names)] + [scores[r][cat] for r in ropes]
         for cat in CATEGORIES]
        + [[what, len(names)] + [scores[r][key] for r in ropes]
           for what, key in (("**average over datasets** (the paper's)", "average"),
                             ("average over categories (OpenCompass)", "category mean"))])
    text = (f"# LongBench, prompts cut to {cfg.max_len:,} model tokens\n\n"
            f"Scores 0..100, the mean over rows; {len(names)} of {len(DATASETS)} datasets. "
            f"Blocks of {BLOCK_LENGTH}, steps = answer tokens, temperature 0.\n\n"
            f"{groups}\n\n{table}\n")
    path = os.path.join(folder, "longbench.md")
    files.write_text(path, text)
    averages = ", ".join(f"{r}: {scores[r]['average']:.2f}" for r in ropes)
    return (f"LongBench at {cfg.max_len:,} tokens, average over {len(names)} datasets: {averages} "
            f"(table in {path})")
