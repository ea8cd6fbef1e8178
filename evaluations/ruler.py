"""
ruler.py: RULER's 13 synthetic long-context tasks as UltraLLaDA ran them (docs/paper.md section 5:
RULER 88.37 / 86.22 / 77.51 / 73.63 at 4K / 8K / 16K / 32K), offline.

The authors ran RULER through OpenCompass 0.4.2 (eval/.../ruler/<len>/eval_llada_ruler.py in
Relaxed-System-Lab/UltraLLaDA, with configs/datasets/ruler/ and datasets/ruler/). Protocol:
- 13 tasks in 4 categories: retrieval (8 needle-in-a-haystack variants), multi-hop tracing
  (variable tracking), aggregation (common / frequent words), question answering (SQuAD v2,
  HotpotQA); 100 samples per task and length.
- Lengths are cl100k_base tokens. Each task grows its haystack in fixed steps until prompt plus
  answer (plus a per-task reserve, tokens_to_generate) would pass the length; every sample then
  uses that size, one step smaller for a sample that still does not fit.
- The model reads the prompt followed by "\n\n" (OpenCompass's HUMAN/BOT round with an empty
  answer and no meta template; LongLLaDA removed the BOT turn: --no-answer-turn), with BOS, and
  decodes 64 tokens in one 64-token block with 64 steps at temperature 0, for every task.
- A sample scores the percentage of its reference strings found in the answer, ignoring case
  (string_match_all); QA scores 100 if any reference is found (string_match_part). A task's
  score is the mean over samples; a length's score the unweighted mean over the 13 tasks
  (LongLLaDA's Avg; its Table 2 groups them as NIAH, AGG = vt, cwe, fwe, and QA).
Random draws replay OpenCompass's: one stream per (task, length) seeded 42 (+ --seed), used
first by the haystack-size search, then by sample 0, 1, 2, ... So sample `index` equals row
`index` of the dataset OpenCompass builds, and depends on nothing but (task, length, index).
"""
import bisect
import copy
import functools
import math
import os
import random
import re
import string
import uuid
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from importlib import metadata
from typing import NamedTuple

import numpy as np

from evaluations import decoding, needles  # needles: NIAH's heatmaps
from harness import files, results
from harness.flags import count0, flag, number
from harness.tokenizer import cl100k

RULER_SEED = 42  # random_seed of every OpenCompass RULER dataset
WONDERWORDS = "2.2.0"  # the word lists RULER draws from (wonderwords_lists)
ROUND_SUFFIX = "\n\n"  # HUMAN '{prompt}' + '\n' + BOT '{answer}\n' with the answer left empty
MIN_LENGTH = 1024  # below this the answer reserve and templates leave (almost) no haystack
ALL, PART = "string_match_all", "string_match_part"
# The data files, each under the name of the flag that passes it.
DATA_FILES = {"essays": "PaulGrahamEssays.jsonl", "squad": "SQuAD v2 dev-v2.0.json",
              "hotpot": "HotpotQA hotpot_dev_distractor_v1.json"}


@dataclass(frozen=True)
class RulerTask:
    family: str  # the generator that builds it: niah, vt, cwe, fwe, qa (FAMILIES below)
    category: str  # RULER's grouping, for the per-category averages
    metric: str  # ALL or PART
    reserve: int  # tokens_to_generate of the dataset config: kept free when fitting the prompt
    data: str | None = None  # the file it needs: a key of DATA_FILES
    options: dict = field(default_factory=dict)  # the family's settings for this task
    name: str = ""  # its key in TASKS, for messages


def _niah(haystack, key, value, k=1, v=1, q=1):
    return RulerTask("niah", "retrieval", ALL, 128, "essays" if haystack == "essay" else None,
                     dict(haystack=haystack, key=key, value=value, k=k, v=v, q=q))


# configs/datasets/ruler/ruler_{niah,vt,cwe,fwe,qa}_gen.py, in the order of OpenCompass's summary.
TASKS = {name: replace(t, name=name) for name, t in {
    "niah_single_1": _niah("repeat", "words", "numbers"),
    "niah_single_2": _niah("essay", "words", "numbers"),
    "niah_single_3": _niah("essay", "words", "uuids"),
    "niah_multikey_1": _niah("essay", "words", "numbers", k=4),
    "niah_multikey_2": _niah("needle", "words", "numbers"),
    "niah_multikey_3": _niah("needle", "uuids", "uuids"),
    "niah_multivalue": _niah("essay", "words", "numbers", v=4),
    "niah_multiquery": _niah("essay", "words", "numbers", q=4),
    # vt sets no tokens_to_generate: the dataset's default 30 applies
    "vt": RulerTask("vt", "multi-hop tracing", ALL, 30, options=dict(chains=1, hops=4)),
    "fwe": RulerTask("fwe", "aggregation", ALL, 50, options=dict(alpha=2.0, coded_wordlen=6)),
    "cwe": RulerTask("cwe", "aggregation", ALL, 120, options=dict(freq_cw=30, freq_ucw=3, num_cw=10)),
    "qa_squad": RulerTask("qa", "question answering", PART, 50, "squad"),
    "qa_hotpotqa": RulerTask("qa", "question answering", PART, 50, "hotpot"),
}.items()}
CATEGORIES = {c: [n for n, t in TASKS.items() if t.category == c]
              for c in ("retrieval", "multi-hop tracing", "aggregation", "question answering")}
GROUPS = {"NIAH": CATEGORIES["retrieval"], "AGG": ["vt", "cwe", "fwe"],  # LongLLaDA's Table 2
          "QA": CATEGORIES["question answering"]}


KEYS = ("ruler_task", "length", "index", "rope", "score")  # what the report reads


@dataclass
class Options(decoding.decoding_flags(64, 64, 64, "the authors' RULER config, every task")):
    """RULER's own flags (python evaluate.py --task ruler --help)."""
    ruler_tasks: list[str] | None = flag(None, "tasks to run (default: all 13, less those whose "
                                         f"data file is not given): {', '.join(TASKS)}",
                                         nargs="+", choices=list(TASKS), metavar="TASK",
                                         setting=False)
    samples: int = flag(100, "samples per task and length (paper: 100)",
                        type=number(int, 0, False, highest=100_000), setting=False)
    essays: str | None = flag(None, "Paul Graham's essays, PaulGrahamEssays.jsonl (the essay "
                              "haystack of five NIAH tasks)")
    squad: str | None = flag(None, "SQuAD v2 dev set, dev-v2.0.json (qa_squad)")
    hotpot: str | None = flag(None, "HotpotQA dev set, hotpot_dev_distractor_v1.json "
                              "(qa_hotpotqa)")
    seed: int = flag(0, "added to OpenCompass's random_seed 42 (0: the authors' samples)",
                     type=count0)
    answer_turn: bool = flag(True, "end the prompt with the empty answer turn \"\\n\\n\", as "
                             "UltraLLaDA's configs; --no-answer-turn: as LongLLaDA ran RULER")
    wonderwords: str = flag(WONDERWORDS, "the wonderwords release the word needles and cwe's "
                            "words come from (others draw other words; the authors': 2.2.0)")


def ruler_score(task: str, prediction: str, answers: list[str]) -> float:
    """OpenCompass's RULER evaluators for one sample, 0..100: substring, case-insensitive, no
    other normalisation (the decoded answer is used as it is)."""
    found = [1.0 if a.lower() in prediction.lower() else 0.0 for a in answers]
    return 100.0 * (sum(found) / len(found) if TASKS[task].metric == ALL else max(found))


def count_tokens(text: str) -> int:
    # OpenCompass calls encode(), which refuses text holding "<|endoftext|>"; encode_ordinary
    # gives the same ids for every other text.
    return len(cl100k().encode_ordinary(text))


# ---------------------------------------------------------------------------------------------
# Fitting a prompt to the length: the search and the retry every task but fwe shares.

@dataclass
class Draw:
    """What a task's builder draws with: the stream's generators (random and numpy, as
    OpenCompass seeds both), the seed (some shuffles use it afresh), the task's data file and
    the index of the sample being built (QA takes its question by index)."""
    rng: random.Random
    nprng: np.random.RandomState
    seed: int
    path: str | None
    index: int = 0


def grow(build, measure, length: int, reserve: int, step: int, task: str,
         cap: int | None = None, cap_next: bool = False) -> int:
    """OpenCompass's size search: try step, 2 step, ... until measure(prompt, answers) plus the
    reserve passes the length, and keep the last size that fitted. A haystack with a finite
    supply stops at `cap` (essay words once the size passes it; cwe words and qa documents once
    the next size would)."""
    size, total = step, 0
    while total + reserve < length:
        prompt, answers = build(size)
        total = count_tokens(measure(prompt, answers))
        if total + reserve > length:
            size -= step
            break
        if cap is not None and size + step * cap_next > cap:  # this size, or the next, passes it
            size = cap
            break
        size += step
    if size < step:
        raise ValueError(f"--len {length} is too small for RULER task {task}: its smallest "
                         f"haystack with template, answer and {reserve}-token reserve takes "
                         f"{total + reserve} cl100k tokens; pass a longer --len")
    return size


def shrink(build, length: int, reserve: int, size: int, step: int, task: str):
    """One sample at the fitted size, one step smaller (new draws) while it does not fit."""
    while True:
        prompt, answers = build(size)
        if count_tokens(prompt) + reserve <= length:
            return prompt, answers
        if size <= step:  # OpenCompass would retry at this size forever
            raise ValueError(f"--len {length} is too small for RULER task {task}; pass a longer --len")
        size -= step


# ---------------------------------------------------------------------------------------------
# Needle in a haystack (ruler_niah.py): 8 variants of key/value needles in 3 haystacks.

NIAH_TEMPLATE = ("Some special magic {type_needle_v} are hidden within the following text. "
                 "Make sure to memorize it. I will quiz you about the {type_needle_v} afterwards."
                 "\n{context}\nWhat are all the special magic {type_needle_v} for {query} "
                 "mentioned in the provided text? The special magic {type_needle_v} for {query} "
                 "mentioned in the provided text are")
NIAH_NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
DEPTHS = np.round(np.linspace(0, 100, num=40, endpoint=True)).astype(int).tolist()  # percent


class AdjNounWords(Sequence):
    """sorted(set(f"{adj}-{noun}")) over wonderwords' lists, OpenCompass's word needles, without
    its 6.2 million strings. "a-n" can only interleave with or equal "b-m" when b = a + "-" + more,
    so adjectives are grouped under their shortest such root; a group of one is the block
    adj + "-" + each noun in order, larger groups are sorted outright, and the blocks, which no
    longer interleave, are ordered by their first word."""

    def __init__(self, adjs: list[str], nouns: list[str]):
        adjs, self.nouns = sorted(set(adjs)), sorted(set(nouns))
        known, groups = set(adjs), {}
        for a in adjs:
            roots = [a[:i] for i, c in enumerate(a) if c == "-" and a[:i] in known]
            groups.setdefault(roots[0] if roots else a, []).append(a)
        blocks = []  # (first word, the adjective or the group's sorted words)
        for members in groups.values():
            if len(members) == 1:
                blocks.append((f"{members[0]}-{self.nouns[0]}", members[0]))
            else:
                words = sorted({f"{a}-{n}" for a in members for n in self.nouns})
                blocks.append((words[0], words))
        blocks.sort(key=lambda b: b[0])
        self.blocks = [b for _, b in blocks]
        sizes = [len(self.nouns) if isinstance(b, str) else len(b) for b in self.blocks]
        self.starts = [0] + list(np.cumsum(sizes)[:-1].tolist())
        self.size = sum(sizes)

    def __len__(self):
        return self.size

    def __getitem__(self, i: int) -> str:
        if not 0 <= i < self.size:
            raise IndexError(i)
        j = bisect.bisect_right(self.starts, i) - 1
        block, k = self.blocks[j], i - self.starts[j]
        return f"{block}-{self.nouns[k]}" if isinstance(block, str) else block[k]


@functools.cache
def wonderwords_lists() -> tuple[list[str], list[str], list[str]]:
    """wonderwords' nouns, adjectives, verbs, read by the private reader OpenCompass uses.
    Pinned to 2.2.0, the release the authors' 2025-10-23 evaluation could install: 3.0.1
    (2025-10-30) drops four nouns, which changes the seeded word needles and cwe's words."""
    # 2.2.0 reads its files with a deprecated importlib call it never closes: warnings about
    # the library, not about the user's run, so they stay here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", ResourceWarning)
        from wonderwords import random_word  # plan() has checked the release
        read = random_word._get_words_from_text_file
        return read("nounlist.txt"), read("adjectivelist.txt"), read("verblist.txt")


@functools.cache
def needle_words() -> AdjNounWords:
    nouns, adjs, _ = wonderwords_lists()
    return AdjNounWords(adjs, nouns)


@functools.cache
def essay_words(path: str) -> list[str]:
    """The essays joined and split on single spaces, as OpenCompass does: the essay haystack is
    a prefix of this word list."""
    hint = f"pass {DATA_FILES['essays']} as --essays"
    texts = [row.get("text", "") for row in files.read_jsonl(path, hint)]
    if not all(isinstance(text, str) for text in texts):
        raise files.FileError(f"{path}: every line's 'text' must be a string; {hint}")
    texts = [text.strip() + " " for text in texts]
    words = re.sub(r"\s+", " ", "".join(texts)).split(" ")
    if len(words) < 2:
        raise files.FileError(f"{path} holds no essay text; pass {DATA_FILES['essays']}")
    return words


NEEDLE_VALUES = {
    "numbers": lambda rng: str(rng.randint(10 ** 6, 10 ** 7 - 1)),  # 7 digits
    "words": lambda rng: rng.choice(needle_words()),
    "uuids": lambda rng: str(uuid.UUID(int=rng.getrandbits(128), version=4)),
}


def niah_context(o, size, needles, path, rng) -> str:
    if o["haystack"] == "essay":  # needles between sentences at random depths of 40 choices
        text = " ".join(essay_words(path)[:size])
        sents = [s.strip() for s in text.split(". ") if s]
        cuts = [0] + sorted(int(len(sents) * (d / 100)) for d in rng.sample(DEPTHS, len(needles)))
        cuts.append(len(sents))
        parts = []
        for i in range(1, len(cuts)):
            parts.append(" ".join(sents[cuts[i - 1]:cuts[i]]))
            if i - 1 < len(needles):
                parts.append(needles[i - 1])
        return " ".join(parts)
    if o["haystack"] == "repeat":
        lines = [NOISE] * size
    else:  # "needle": the haystack is distractor needles with other keys
        lines = [NIAH_NEEDLE.format(type_needle_v=o["value"], key=NEEDLE_VALUES[o["key"]](rng),
                                    value=NEEDLE_VALUES[o["value"]](rng)) for _ in range(size)]
    for i, needle in zip(sorted(rng.sample(range(size), len(needles)), reverse=True), needles):
        lines.insert(i, needle)
    return "\n".join(lines)


def niah_build(t: RulerTask, length: int, size: int, d: Draw):
    o, rng = t.options, d.rng
    keys, values, needles = [], [], []
    for _ in range(max(o["k"], o["q"])):
        keys.append(NEEDLE_VALUES[o["key"]](rng))
        values.append([])
        for _ in range(o["v"]):
            values[-1].append(NEEDLE_VALUES[o["value"]](rng))
            needles.append(NIAH_NEEDLE.format(type_needle_v=o["value"], key=keys[-1],
                                              value=values[-1][-1]))
    random.Random(d.seed).shuffle(needles)  # the fixed seed, not the stream: OpenCompass's
    context = niah_context(o, size, needles, d.path, rng)
    asked = rng.sample(range(len(keys)), o["q"])
    queries = [keys[i] for i in asked]
    answers = [v for i in asked for v in values[i]]
    query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
    template, kind = NIAH_TEMPLATE, o["value"]
    if o["q"] * o["v"] == 1:  # one answer: the template in the singular
        template = (template.replace("Some", "A").replace("are all", "is").replace("are", "is")
                    .replace("answers", "answer"))
        kind = kind[:-1]
    return template.format(type_needle_v=kind, context=context, query=query), answers


def niah_step(t: RulerTask, length: int) -> int:
    if t.options["haystack"] == "essay":
        return 500  # words
    return 25 if length >= 4096 else 5  # sentences


# ---------------------------------------------------------------------------------------------
# Variable tracking (ruler_vt.py): a chain VAR B = VAR A ... hidden in repeated noise.

VT_TEMPLATE = ("Memorize and track the chain(s) of variable assignment hidden in the following "
               "text.\n\n{context}\nQuestion: Find all variables that are assigned the value "
               "{query} in the text above. Answer: According to the chain(s) of variable "
               "assignment in the text above, {num_v} variables are assigned the value {query}, "
               "they are: ")


def vt_build(t: RulerTask, length: int, size: int, d: Draw):
    chains, hops, rng = t.options["chains"], t.options["hops"], d.rng
    names = ["".join(rng.choices(string.ascii_uppercase, k=5)) for _ in range((hops + 1) * chains)]
    while len(set(names)) < chains * (hops + 1):
        names.append("".join(rng.choices(string.ascii_uppercase, k=5)))
    variables, links = [], []
    for i in range(0, len(names), hops + 1):
        v = names[i:i + hops + 1]
        variables.append(v)
        links.append([f"VAR {v[0]} = {d.nprng.randint(10000, 99999)}"] +
                     [f"VAR {v[j + 1]} = VAR {v[j]} " for j in range(hops)])
    # OpenCompass splits the noise into sentences when it has no more lines than a chain has
    # links; sizes here are at least VT_STEP = 10 > 5 links, so that branch never runs.
    lines = [NOISE + "\n"] * size
    for chain in links:
        at = sorted(rng.sample(range(len(lines)), len(chain)))
        for j, p in enumerate(at):
            lines.insert(p + j, chain[j])
    context = " ".join(lines).replace(". \n", ".\n")
    value = links[0][0].split("=")[-1].strip()
    return VT_TEMPLATE.format(context=context, query=value, num_v=hops + 1), variables[0]


# ---------------------------------------------------------------------------------------------
# Common words extraction (ruler_cwe.py): 10 words repeated often among words repeated rarely.

CWE_TEMPLATE = ("Below is a numbered list of words. In these words, some appear more often than "
                "others. Memorize the ones that appear most often.\n{context}\nQuestion: What are "
                "the 10 most common words in the above list? Answer: The top 10 words that appear "
                "most often in the list are:")


@functools.cache
def cwe_words(seed: int) -> list[str]:
    nouns, adjs, verbs = wonderwords_lists()
    words = sorted(set(nouns + adjs + verbs))
    random.Random(seed).shuffle(words)
    return words


def numbered(words: list[str]) -> str:
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))


def cwe_list(n, common_repeats, rare_repeats, n_common, seed, rng):
    picked = rng.sample(cwe_words(seed), n)
    common, rare = picked[:n_common], picked[n_common:]
    listed = common * common_repeats + rare * rare_repeats
    random.Random(seed).shuffle(listed)
    return numbered(listed), common


def cwe_build(t: RulerTask, length: int, size: int, d: Draw):
    o = t.options
    # below 4K an example of 20 words (3:1 repeats) and 6:1 repeats, else 40 words (10:3) and 30:3
    example, repeats = ((20, 3, 1), (6, 1)) if length < 4096 else ((40, 10, 3),
                                                                     (o["freq_cw"], o["freq_ucw"]))
    example_list, example_answer = cwe_list(*example, o["num_cw"], d.seed, d.rng)
    context, answers = cwe_list(size, *repeats, o["num_cw"], d.seed, d.rng)
    shown = CWE_TEMPLATE.format(context=example_list) + numbered(example_answer)
    return shown + "\n" + CWE_TEMPLATE.format(context=context), answers


# ---------------------------------------------------------------------------------------------
# Frequent words extraction (ruler_fwe.py): coded words with Zipf counts, the top one is noise.

FWE_TEMPLATE = ("Read the following coded text and track the frequency of each coded word. Find "
                "the three most frequently appeared coded words. {context}\nQuestion: Do not "
                "provide any explanation. Please ignore the dots '....'. What are the three most "
                "frequently appeared words in the above coded text? Answer: According to the "
                "coded text above, the three most frequently appeared words are:")
ZETA = {2.0: math.pi ** 2 / 6}  # zeta(2), bit-identical to scipy.special.zeta(2.0); config alpha 2


def fwe_vocab(o, length, seed, rng) -> list[str]:
    n, k = length // 50, o["coded_wordlen"]  # vocab_size -1 means length // 50
    vocab = ["".join(rng.choices(string.ascii_lowercase, k=k)) for _ in range(n)]
    while len(set(vocab)) < n:
        vocab.append("".join(rng.choices(string.ascii_lowercase, k=k)))
    vocab = sorted(set(vocab))
    random.Random(seed).shuffle(vocab)
    vocab[0] = "..."  # the most frequent word is noise the prompt says to ignore
    return vocab


def fwe_text(o, vocab, n, seed):
    rank = np.arange(1, len(vocab) + 1)
    counts = (n * (rank ** -o["alpha"]) / ZETA[o["alpha"]]).astype(int)  # Zipf: n / zeta / k^a
    words = [w for w, c in zip(vocab, counts) for _ in range(c)]
    random.Random(seed).shuffle(words)
    return FWE_TEMPLATE.format(context=" ".join(words)), vocab[1:4]


def fwe_fit(t: RulerTask, length: int, d: Draw) -> int:
    # fwe fits the prompt alone to the whole length (its reserve is computed but unused there),
    # growing from length / 6 words in steps of length / 32 while it is shorter than the length
    o, step = t.options, length // 32
    vocab = fwe_vocab(o, length, d.seed, d.rng)
    n = length // o["coded_wordlen"]
    while count_tokens(fwe_text(o, vocab, n, d.seed)[0]) < length:
        n += step
    return n - step


def fwe_sample(t: RulerTask, length: int, size: int, d: Draw):
    o, step = t.options, length // 32
    vocab = fwe_vocab(o, length, d.seed, d.rng)  # a fresh vocabulary, the same counts and order
    prompt, answers = fwe_text(o, vocab, size, d.seed)
    while count_tokens(prompt) > length:
        size -= step
        prompt, answers = fwe_text(o, vocab, size, d.seed)
    return prompt, answers


# ---------------------------------------------------------------------------------------------
# Question answering (ruler_qa.py): the gold paragraphs among distractor paragraphs.

QA_TEMPLATE = ("Answer the question based on the given documents. Only give me the answer and do "
               "not output any other words.\n\nThe following are given documents.\n\n{context}\n\n"
               "Answer the question based on the given documents. Only give me the answer and do "
               "not output any other words.\n\nQuestion: {query} Answer:")
QA_DOCUMENT = "Document {i}:\n{document}"


def read_squad(path: str):
    data = files.read_json(path)
    try:
        docs = sorted({p["context"] for d in data["data"] for p in d["paragraphs"]})
        where = {c: i for i, c in enumerate(docs)}
        qas = []
        for d in data["data"]:
            article = [where[p["context"]] for p in d["paragraphs"]]  # same-article distractors first
            for p in d["paragraphs"]:
                own = where[p["context"]]
                qas += [{"query": q["question"], "outputs": [a["text"] for a in q["answers"]],
                         "context": [own], "more_context": [i for i in article if i != own]}
                        for q in p["qas"] if not q["is_impossible"]]
    except (KeyError, TypeError):
        raise files.FileError(f"{path} is not SQuAD v2 (data[].paragraphs[] with context and "
                              f"qas[] with is_impossible, answers); pass {DATA_FILES['squad']}") from None
    return qas, docs


def read_hotpot(path: str):
    data = files.read_json(path)
    try:
        paragraph = lambda title, sents: f"{title}\n{''.join(sents)}"
        docs = sorted({paragraph(t, s) for d in data for t, s in d["context"]})
        where = {c: i for i, c in enumerate(docs)}
        qas = [{"query": d["question"], "outputs": [d["answer"]],
                "context": [where[paragraph(t, s)] for t, s in d["context"]]} for d in data]
    except (KeyError, TypeError, ValueError):
        raise files.FileError(f"{path} is not HotpotQA (a list of question, answer, context "
                              f"[[title, sentences]]); pass {DATA_FILES['hotpot']}") from None
    return qas, docs


@functools.cache
def qa_data(kind: str, path: str):
    qas, docs = {"squad": read_squad, "hotpot": read_hotpot}[kind](path)
    if not qas:
        raise files.FileError(f"{path} has no answerable question; pass {DATA_FILES[kind]}")
    for i, q in enumerate(qas):
        # An empty reference is "found" in every answer (a score of 100), a missing one in none.
        if not (isinstance(q["query"], str) and q["outputs"] and
                all(isinstance(a, str) and a.strip() for a in q["outputs"])):
            raise files.FileError(f"{path}: answerable question {i + 1} "
                                  f"({str(q['query'])[:40]!r}) has no answer text, or an empty "
                                  f"one; pass {DATA_FILES[kind]}")
    return qas, docs


def qa_build(t: RulerTask, length: int, size: int, d: Draw):
    qas, docs = qa_data(t.data, d.path)
    q = qas[d.index]  # plan() refuses more samples than answerable questions
    own, more = q["context"], q.get("more_context", [])
    if size < len(docs):  # the gold paragraphs, then the article's, then random others
        if size - len(own) > len(more):
            taken = set(own + more)
            others = [i for i in range(len(docs)) if i not in taken]
            chosen = own + more + d.rng.sample(others, max(0, size - len(own) - len(more)))
        else:
            chosen = own + d.rng.sample(more, size - len(own))
        chosen = [docs[i] for i in chosen]
    else:  # every document; OpenCompass shuffles its DOCS list itself here, we shuffle a copy
        chosen = list(docs)
    random.Random(d.seed).shuffle(chosen)
    context = "\n\n".join(QA_DOCUMENT.format(i=i + 1, document=d) for i, d in enumerate(chosen))
    return QA_TEMPLATE.format(context=context, query=q["query"]), q["outputs"]


class Sizing(NamedTuple):
    fit: Callable  # (task, length, draw) -> the haystack size every sample of the length uses
    sample: Callable  # (task, length, size, draw) -> (prompt, answers) that fit the length


def haystack_sizing(build: Callable, step: Callable, measure: Callable,
                    cap: Callable | None = None, cap_next: bool = False) -> Sizing:
    """The sizing of every family but fwe: grow() finds the size with sample 0's draws, shrink()
    makes each sample fit. step(task, length): units per step; measure(prompt, answers): the
    text OpenCompass counts while growing; cap(task, draw): the data's supply (None: endless)."""
    def fit(t: RulerTask, length: int, d: Draw) -> int:
        return grow(lambda n: build(t, length, n, d), measure, length, t.reserve,
                    step(t, length), t.name, cap(t, d) if cap else None, cap_next)

    def sample(t: RulerTask, length: int, size: int, d: Draw):
        return shrink(lambda n: build(t, length, n, d), length, t.reserve, size, step(t, length),
                      t.name)
    return Sizing(fit, sample)


TEN = lambda t, length: 10  # noqa: E731  (vt: noise lines, cwe: words, qa: documents)
FAMILIES = {
    "niah": haystack_sizing(niah_build, niah_step, lambda p, a: p + " ".join(a),
                            cap=lambda t, d: len(essay_words(d.path))
                            if t.options["haystack"] == "essay" else None),
    "vt": haystack_sizing(vt_build, TEN, lambda p, a: p + f" {a}"),
    "cwe": haystack_sizing(cwe_build, TEN, lambda p, a: p + " " + numbered(a),
                           cap=lambda t, d: len(cwe_words(d.seed)), cap_next=True),
    "fwe": Sizing(fwe_fit, fwe_sample),  # Zipf-distributed words: grows and shrinks its own way
    "qa": haystack_sizing(qa_build, TEN, lambda p, a: p + f" {a}",  # question 0 sizes them all
                          cap=lambda t, d: len(qa_data(t.data, d.path)[1]), cap_next=True),
}


# ---------------------------------------------------------------------------------------------
# One random stream per (task, length), replayed so that sample `index` is OpenCompass's row.

@functools.cache
def stream(task: str, length: int, seed: int, path: str | None) -> dict:
    """The fitted size and the stream as it was before each sample drawn so far: OpenCompass
    seeds random and numpy with 42 at the start of load(), sizes the haystack, then draws the
    samples in order, so reaching sample i means replaying samples 0..i-1 once."""
    d = Draw(random.Random(seed), np.random.RandomState(seed), seed, path)
    size = FAMILIES[TASKS[task].family].fit(TASKS[task], length, d)
    return {"size": size, "states": [copy.deepcopy(d)]}


def data_path(task: str, data_files: dict) -> str | None:
    """The file `task` reads, from {"essays": path, "squad": path, "hotpot": path}."""
    kind = TASKS[task].data
    if kind and data_files.get(kind) is None:
        raise ValueError(f"RULER task {task} needs --{kind} FILE ({DATA_FILES[kind]})")
    return data_files.get(kind) if kind else None


def ruler_sample(task: str, length: int, index: int, data_files: dict | None = None,
                 seed: int = RULER_SEED) -> dict:
    """Sample `index` of a task at `length` cl100k tokens: {"prompt", "answers"}. The prompt is
    OpenCompass's dataset prompt; the model reads prompt + ROUND_SUFFIX (the prompt alone with
    --no-answer-turn). data_files: the files by DATA_FILES key, as far as the task needs one."""
    t, path = TASKS[task], data_path(task, data_files or {})
    s, draw = stream(task, length, seed, path), FAMILIES[t.family].sample
    while len(s["states"]) <= index:
        d = copy.deepcopy(s["states"][-1])
        draw(t, length, s["size"], d)
        d.index += 1
        s["states"].append(d)
    prompt, answers = draw(t, length, s["size"], copy.deepcopy(s["states"][index]))
    return {"prompt": prompt, "answers": list(answers)}


# ---------------------------------------------------------------------------------------------
# The task, as evaluate.py runs it.

forward_tokens, cell_flops = decoding.forward_tokens, decoding.cell_flops  # NIAH's as well


def plan(cfg, tokenizer, counter) -> tuple[list[dict], dict, str]:
    """Every cell (task x length x sample) and the data they share. Each file is read and
    checked where it is opened, and every haystack sized now, so a length too small for a
    task fails before the model loads. The default list skips the tasks whose file was not
    passed, and `source` says so; a task asked for by name without its file is an error."""
    try:  # the word lists are data: another release draws other needles and cwe words
        installed = metadata.version("wonderwords")
    except metadata.PackageNotFoundError:
        installed = "none"
    if installed != cfg.wonderwords:
        raise ValueError(f"RULER's word lists need wonderwords {cfg.wonderwords}, {installed} is "
                         f"installed: pip install wonderwords=={WONDERWORDS} (or pass --wonderwords "
                         f"VERSION to run with another release)")
    if min(cfg.len) < MIN_LENGTH:
        raise ValueError(f"--len {min(cfg.len)} is too small for RULER; pass --len {MIN_LENGTH} "
                         f"or more")
    files_ = {kind: getattr(cfg, kind) for kind in DATA_FILES}
    named = cfg.ruler_tasks is not None
    tasks = [n for n in dict.fromkeys(cfg.ruler_tasks or TASKS)
             if named or not TASKS[n].data or files_[TASKS[n].data] is not None]
    seed = RULER_SEED + cfg.seed  # --seed 0 is OpenCompass's random_seed 42
    for name in tasks:
        t, path = TASKS[name], data_path(name, files_)
        if t.family == "qa" and cfg.samples > len(qa_data(t.data, path)[0]):
            raise ValueError(f"--samples {cfg.samples} exceeds the {len(qa_data(t.data, path)[0])} "
                             f"answerable questions of {path}")
        for L in sorted(set(cfg.len)):
            stream(name, L, seed, path)
    cells = [dict(task="ruler", ruler_task=name, length=L, index=i, rope=cfg.rope_label,
                  name=f"ruler_{name}_len{L}_idx{i}_rope-{cfg.rope_label}.json")
             for L in sorted(set(cfg.len)) for name in tasks for i in range(cfg.samples)]
    used = [f"{k} {v}" for k, v in files_.items() if v is not None]
    source = f"RULER {len(tasks)} tasks, seed {seed}" + (f"; {', '.join(used)}" if used else "")
    if skipped := [n for n in TASKS if n not in tasks and not named]:
        wanted = sorted({"--" + TASKS[n].data for n in skipped})
        source += f"; skipped: {', '.join(skipped)} (pass {' and '.join(wanted)})"
    return cells, {"seed": seed, "files": files_}, source


def run_cell(model, tokenizer, cfg, cell, work, device) -> dict:
    task = cell["ruler_task"]
    s = ruler_sample(task, cell["length"], cell["index"], work["files"], seed=work["seed"])
    # BOS for LLaDA, as the wrapper; the empty answer turn unless LongLLaDA's prompt is asked for
    ids = tokenizer.encode_prompt(s["prompt"] + ROUND_SUFFIX * cfg.answer_turn)
    out = decoding.decode_answer(model, tokenizer, ids, cfg.gen_length, cfg.block_length,
                                 cfg.steps, cfg.prompt_cache, device)
    return {**out, "answers": s["answers"], "score": ruler_score(task, out["answer"], s["answers"]),
            "prompt_cl100k": count_tokens(s["prompt"]), "gen_length": cfg.gen_length,
            "block_length": cfg.block_length}


def score_table(cells: list[dict]) -> dict:
    """(rope, length) -> {task: mean score, category or LongLLaDA's group: mean of its tasks,
    "average": mean of the tasks, "category mean": mean of the categories}. The paper does not
    say which of the two averages its RULER numbers are, so both are reported."""
    scores = {}
    for c in cells:
        scores.setdefault((c["rope"], c["length"]), {}).setdefault(c["ruler_task"], []).append(c["score"])
    table = {}
    for key, by_task in scores.items():
        row = {t: results.nan_mean(v) for t, v in by_task.items()}
        row.update({name: results.nan_mean([row.get(t) for t in members])
                    for name, members in {**CATEGORIES, **GROUPS}.items()})
        row["average"] = results.nan_mean([row[t] for t in by_task])
        row["category mean"] = results.nan_mean([row[cat] for cat in CATEGORIES])
        table[key] = row
    return table


def report(cells: list[dict], cfg, folder: str) -> str:
    """table_ruler.md (task x length, our categories, LongLLaDA's groups, both averages) and
    ruler_scores.png."""
    table = score_table(cells)
    tasks = [t for t in TASKS if any(t in row for row in table.values())]
    # samples behind each number: one task at one length and rope
    counts = Counter((c["rope"], c["length"], c["ruler_task"]) for c in cells).values()
    rows = [(t, TASKS[t].category) for t in tasks] + \
        [(f"**{cat}**", "mean of its tasks") for cat in CATEGORIES] + \
        [(f"**{g}**", "LongLLaDA's group: " + (", ".join(m) if g == "AGG" else TASKS[m[0]].category))
         for g, m in GROUPS.items()] + \
        [("**average**", f"{len(tasks)} tasks (LongLLaDA's Avg)"),
         ("**category mean**", "mean of the categories")]
    sections, panels = [], {}
    for rope in sorted({r for r, _ in table}):
        lengths = sorted(L for r, L in table if r == rope)
        values = [[table[rope, L].get(name.strip("*")) for L in lengths] for name, _ in rows]
        sections.append(f"## rope {rope}\n\n" + results.markdown_table(
            ["task", "category"] + [results.short(L) for L in lengths],
            [[*row, *v] for row, v in zip(rows, values)]))
        panels[f"rope {rope}"] = (tasks, lengths, np.array(values[:len(tasks)], dtype=float))
    title = f"RULER, {os.path.basename(os.path.abspath(getattr(cfg, 'model', '') or '.'))}"
    note = (f"Scores 0..100 per task (mean over {min(counts)}..{max(counts)} samples per task and "
            f"length), string_match_all except QA (string_match_part); average = unweighted mean "
            f"over the tasks, as OpenCompass's ruler_<len> group and LongLLaDA's Avg; category "
            f"mean = the mean of the category rows (the paper does not say which it reports).")
    files.write_text(os.path.join(folder, "table_ruler.md"),
                     f"# {title}\n\n{note}\n\n" + "\n\n".join(sections) + "\n")
    path = os.path.join(folder, "ruler_scores.png")
    needles.plot_heatmaps(path, panels, title, ylabel="task")
    return f"{title} ({folder}/table_ruler.md, {path})\n" + "\n\n".join(sections)
