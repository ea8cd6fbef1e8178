"""
ppl.py: long-document perplexity, LongLLaDA's protocol.

Paper map: docs/paper.md sections 5.4 and 5.5. A long document (PG19 in the paper) is scored in
64-token chunks, each given all the text before it (the first chunk is context only, as in
LongLLaDA's get_ppl_llada.py): for chunk c >= 1 each of 8 draws masks
k ~ U{1..64} of its tokens and scores them with the masked-diffusion bound,

    NLL_c = mean over draws of (1/k) * sum over masked i of CE(x_i | text before the chunk, x_t)

(diffusion.chunk_nll), and the perplexity of the text up to chunk c is the running geometric
mean exp(mean of NLL_1..NLL_c). Reported at 128K: UltraLLaDA 10.45, LLaDA 343.88.

As in get_ppl_llada.py, which scores tokenizer(text), the document is preceded by the
tokenizer's BOS when it has one (LLaDA's; tiktoken has none), so every chunk starts one token
earlier in the text than without it. Which document the paper scored is not stated: by default
the longest documents of --data, or the one file --document names; each cell records its
document's name and token count.
"""
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from data import long_documents
from diffusion import chunk_nll, cumulative_perplexity
from harness.files import write_text
from harness.flags import count, count0, flag
from harness.prepare import CACHE_DIR, SPLITS, load_corpus, read_book
from harness.results import figure, forward_flops, markdown_table, short


KEYS = ("length", "doc", "rope", "chunk_nll")  # what a result needs for the report


@dataclass
class Options:
    """Perplexity's own flags (python evaluate.py --task ppl --help)."""
    data: str | None = flag(None, "folder of long .txt/.jsonl documents (default: the built-in "
                            "synthetic corpus)")
    split: str = flag("validation", "the split of the synthetic corpus or of a --data folder "
                      "with split folders; a plain folder uses every document",
                      choices=SPLITS)
    docs: int = flag(1, "documents per length, longest first", type=count, setting=False)
    document: str | None = flag(None, "score this one file of --data instead of the longest "
                                "documents: its path inside --data, e.g. test/BOOK.txt of "
                                "PG19 (the whole file is one document; --split does not apply)")
    chunk_size: int = flag(64, "tokens per chunk (paper: 64)", type=count)
    draws: int = flag(8, "Monte Carlo draws per chunk (paper: 8)", type=count)
    seed: int = flag(0, "seed of the masks", type=count0)
    cache_dir: str = flag(CACHE_DIR, "token cache of the corpus", setting=False)


def forward_tokens(cfg) -> int:
    """Tokens of the largest forward (the memory check): every draw of the last chunk at once,
    each row the whole text (and a BOS)."""
    return cfg.draws * (max(cfg.len) + 1)


def plan(cfg, tokenizer, counter) -> tuple[list[dict], dict, str]:
    """One cell per (length, document): the longest documents that have `length` tokens, BOS
    included, or the --document file, read and checked before any model work."""
    bad = [L for L in cfg.len if L % cfg.chunk_size or L < 2 * cfg.chunk_size]
    if bad:
        raise ValueError(f"--len {bad[0]} must be a whole number of --chunk-size {cfg.chunk_size} "
                         f"chunks, at least two (the first is context only); pass --len "
                         f"{max(2, bad[0] // cfg.chunk_size) * cfg.chunk_size}")
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    if cfg.document is not None:
        if cfg.data is None or cfg.docs != 1:
            raise ValueError("--document names one file inside --data: pass --data DIR, and "
                             "leave out --docs")
        name, tokens = cfg.document, named_document(cfg.data, cfg.document, tokenizer)
        beyond = [L for L in cfg.len if len(bos) + len(tokens) < L]
        if beyond:
            raise ValueError(f"--document {name} has {len(bos) + len(tokens):,} tokens"
                             f"{' with BOS' if bos else ''}, fewer than --len {max(beyond)}; "
                             f"pass a shorter --len")
        docs = {L: [(name, tokens)] for L in set(cfg.len)}
        source = f"{os.path.join(cfg.data, name)} ({len(tokens):,} tokens)"
    else:
        corpus = ppl_corpus(cfg, tokenizer)
        docs = {}
        for L in sorted(set(cfg.len)):
            found = long_documents(corpus, L - len(bos), limit=cfg.docs)
            if len(found) < cfg.docs:
                raise ValueError(f"--docs {cfg.docs}: only {len(found)} documents of {corpus.name} "
                                 f"have {L:,} tokens; pass --docs {len(found)} or a shorter --len")
            docs[L] = [(corpus.names[j], corpus.document(j)) for j in found]
        source = corpus.name
    cells = [dict(task="ppl", length=L, doc=j, rope=cfg.rope_label,
                  name=f"ppl_len{L}_doc{j}_rope-{cfg.rope_label}.json")
             for L in sorted(docs) for j in range(cfg.docs)]
    return cells, {"docs": docs, "bos": bos}, source


def ppl_corpus(cfg, tokenizer):
    has_splits = cfg.data is not None and any(os.path.isdir(os.path.join(cfg.data, s))
                                              for s in SPLITS)
    if cfg.data is None or has_splits:  # the synthetic corpus, or PG19's split folders
        return load_corpus(tokenizer, cfg.data, split=cfg.split, cache_dir=cfg.cache_dir)
    # a plain folder of evaluation texts: every document ("train" with nothing held out)
    return load_corpus(tokenizer, cfg.data, split="train", heldout=0.0, cache_dir=cfg.cache_dir)


def named_document(data: str, name: str, tokenizer) -> np.ndarray:
    """The tokens of one file, read as the corpus reads a .txt book (no BOS: plan adds it)."""
    text, wrong = read_book(os.path.join(data, name))
    if wrong:
        raise ValueError(f"--document {name}: {wrong}; pass a UTF-8 text file")
    return np.asarray(tokenizer.encode(text), dtype=np.int64)


def run_cell(model, tokenizer, cfg, cell, work, device) -> dict:
    name, document = work["docs"][cell["length"]][cell["doc"]]
    # (length,): BOS (if any) and the document's first tokens, as tokenizer(text)[:length]
    tokens = np.concatenate([np.asarray(work["bos"], dtype=np.int64), document])[:cell["length"]]
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + cell["doc"])  # same masks on rerun
    t = time.perf_counter()
    # Inner bar only on a terminal (disable=None): in a log file the cell bar says enough.
    with tqdm(total=cell["length"] // cfg.chunk_size - 1, desc="  chunks", unit="chunk",
              leave=False, dynamic_ncols=True, disable=None) as bar:
        nll = chunk_nll(model, torch.from_numpy(tokens).to(device),
                        cfg.chunk_size, cfg.draws, generator=generator,
                        on_chunk=lambda: bar.update(1))  # (length / chunk_size - 1,)
    ppl = cumulative_perplexity(nll.double())
    return {"document": name, "document_tokens": len(document),
            "bos": work["bos"][0] if work["bos"] else None, "perplexity": float(ppl[-1]),
            "chunk_nll": nll.tolist(), "cumulative_perplexity": ppl.tolist(),
            "seconds": round(time.perf_counter() - t, 3)}


def cell_flops(c, cfg, cell) -> float:
    """`draws` rows of every prefix that ends a chunk, about chunk/2 of them masked."""
    return sum(cfg.draws * forward_flops(c, end, end, (cfg.chunk_size + 1) / 2)
               for end in range(2 * cfg.chunk_size, cell["length"] + 1, cfg.chunk_size))


# ---------------------------------------------------------------------------------------------

def ppl_curves(cells: list[dict]) -> dict[tuple[str, int], tuple[int, np.ndarray]]:
    """Per (rope, length): documents and the running perplexity of their mean chunk NLL."""
    curves = {}
    for key in sorted({(c["rope"], c["length"]) for c in cells}):
        nll = [c["chunk_nll"] for c in cells if (c["rope"], c["length"]) == key]
        curves[key] = (len(nll), cumulative_perplexity(torch.from_numpy(np.mean(nll, axis=0))).numpy())
    return curves


def report(cells: list[dict], cfg, folder: str) -> str:
    curves = ppl_curves(cells)
    table = markdown_table(["length", "rope", "documents", "perplexity"],
                           [[f"{L:,}", rope, n, float(ppl[-1])] for (rope, L), (n, ppl) in curves.items()])
    title = f"perplexity, {os.path.basename(os.path.abspath(cfg.model))}"
    with figure(os.path.join(folder, "ppl_vs_position.png"), figsize=(7, 4)) as (fig, ax):
        for (rope, length), (n, ppl) in curves.items():
            ax.plot(np.arange(2, len(ppl) + 2) * cfg.chunk_size, ppl,  # chunk 0 is context only
                    label=f"rope {rope}, len {short(length)}")
        ax.set(yscale="log", xlabel="position (tokens)", ylabel="perplexity of the text so far")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    write_text(os.path.join(folder, "table_ppl.md"), f"# {title}\n\n{table}\n")
    return f"{title} ({folder}/ppl_vs_position.png)\n{table}"
