"""
data.py: the post-training corpus as the model sees it: 64K-token packed sequences and the
batches each rank trains on.

Paper map: docs/paper.md section 3. UltraLLaDA post-trains on PG19 books: short
documents are concatenated up to 64K tokens and long ones cut into 64K chunks. With the
corpus tokenized into one stream (prepare.py), packed sequence n is simply stream tokens
[n*L, (n+1)*L): short books share a sequence, long ones span several, and every token lands in
exactly one (masks.pack_sequence, which also puts the EOS separator after each document under
the eod strategy and returns each sequence's document lengths for the attention mask).

Training visits the packed sequences in a seeded permutation per epoch, split across ranks and
micro steps, so the batch of (step, micro step, rank) is a pure function of those numbers and a
resumed run sees exactly the batches an uninterrupted one would.

Run `python data.py` to build the synthetic corpus and print how it packs; `--data DIR` for yours.
"""
import argparse
import functools
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from harness.flags import add_flags, count, flag, from_args, number
from harness.prepare import CACHE_DIR, SPLITS, Corpus, SyntheticConfig, load_corpus, printable
from harness.runtime import exit_after, fail
from harness.tokenizer import TIKTOKEN_NAME, load_tokenizer
from masks import STRATEGIES, num_packed_sequences, pack_sequence

# ---------------------------------------------------------------------------------------------
# Packing and batches (the stream's last partial sequence is dropped). Global slot g of an
# epoch's permutation belongs to step g // G, where G = world_size * grad_accum * batch_size;
# the n_sequences % G sequences left over at its end are skipped that epoch (different ones
# every epoch).

def packed_sequence(corpus: Corpus, index: int, seq_len: int,
                    strategy: str) -> tuple[np.ndarray, list[int]]:
    """Tokens (seq_len,) int64 and document lengths of packed sequence `index`."""
    return pack_sequence(corpus.tokens, corpus.offsets, index, seq_len, strategy, corpus.eos_id)


@dataclass
class Schedule:
    """Which packed sequences every rank reads at every step of one training run."""
    corpus: Corpus
    seq_len: int
    strategy: str = "adaptive"
    batch_size: int = 1  # sequences per rank per micro step
    grad_accum: int = 1  # micro steps per optimizer step
    world_size: int = 1
    seed: int = 0
    n_sequences: int = field(init=False)  # packed sequences in the corpus
    per_step: int = field(init=False)  # sequences one optimizer step consumes, all ranks together
    steps_per_epoch: int = field(init=False)

    def __post_init__(self):
        assert min(self.seq_len, self.batch_size, self.grad_accum, self.world_size) >= 1
        self.n_sequences = num_packed_sequences(self.corpus.offsets, self.seq_len, self.strategy)
        self.per_step = self.world_size * self.grad_accum * self.batch_size
        self.steps_per_epoch = self.n_sequences // self.per_step
        if self.steps_per_epoch == 0:  # a property of the data, so an error, not an assert
            raise ValueError(
                f"{self.corpus.name} packs into {self.n_sequences} sequences of {self.seq_len} "
                f"tokens ({self.corpus.n_tokens} tokens), but one step needs {self.per_step} "
                f"({self.world_size} processes x {self.grad_accum} accumulation x "
                f"{self.batch_size} batch): shorter sequences, a smaller batch, or more data")


@functools.lru_cache(maxsize=4)
def epoch_order(n_sequences: int, epoch: int, seed: int) -> np.ndarray:
    """The seeded permutation of packed sequences for one epoch."""
    return np.random.default_rng([seed, epoch]).permutation(n_sequences)


def sequence_indices(s: Schedule, step: int, micro_step: int = 0, rank: int = 0) -> list[int]:
    """The packed sequences of (step, micro_step, rank): a pure function, so resuming works.

    Within a step, micro steps and ranks take consecutive slices, so 2 ranks x 1 micro step
    and 1 rank x 2 micro steps train on the same sequences.
    """
    assert 0 <= micro_step < s.grad_accum and 0 <= rank < s.world_size and step >= 0
    epoch, step_in_epoch = divmod(step, s.steps_per_epoch)
    first = step_in_epoch * s.per_step + (micro_step * s.world_size + rank) * s.batch_size
    return epoch_order(s.n_sequences, epoch, s.seed)[first: first + s.batch_size].tolist()


def batch_for_step(s: Schedule, step: int, micro_step: int = 0,
                   rank: int = 0) -> tuple[torch.Tensor, list[list[int]]]:
    """input_ids (B, L) int64 and doc_lens (for masks.py) of one rank's micro batch."""
    rows = [packed_sequence(s.corpus, index, s.seq_len, s.strategy)
            for index in sequence_indices(s, step, micro_step, rank)]
    return torch.from_numpy(np.stack([tokens for tokens, _ in rows])), [lens for _, lens in rows]


def long_documents(corpus: Corpus, min_tokens: int, limit: int | None = None) -> list[int]:
    """The indices of the documents of at least min_tokens tokens, longest first (ties in
    corpus order), for perplexity."""
    lengths = corpus.doc_lengths()
    order = [int(j) for j in np.argsort(-lengths, kind="stable") if lengths[j] >= min_tokens]
    if not order:
        raise ValueError(f"no document of {corpus.name} has {min_tokens} tokens (the longest "
                         f"has {int(lengths.max())}): a shorter length, or longer documents")
    return order[:limit]


# ---------------------------------------------------------------------------------------------

def describe(corpus: Corpus, seq_len: int, strategy: str) -> str:
    lengths = corpus.doc_lengths()
    n_seq = num_packed_sequences(corpus.offsets, seq_len, strategy)
    stream = corpus.n_tokens + (corpus.n_docs if strategy == "eod" else 0)
    p = np.percentile(lengths, [10, 50, 90]).astype(int)
    lines = [
        f"corpus: {corpus.name}",
        f"cache: {printable(corpus.path)} ({'reused' if corpus.reused else 'built now'})",
        f"documents: {corpus.n_docs:,}, tokens: {corpus.n_tokens:,}, skipped: {corpus.n_skipped:,}",
        f"document length: min {lengths.min():,}, p10 {p[0]:,}, median {p[1]:,}, mean "
        f"{lengths.mean():,.0f}, p90 {p[2]:,}, max {lengths.max():,}",
        f"documents of at least {seq_len:,} tokens: {int((lengths >= seq_len).sum()):,} "
        f"(cut into chunks of {seq_len:,})",
        f"packed sequences of {seq_len:,} ({strategy}): {n_seq:,}, dropped tail: "
        f"{stream - n_seq * seq_len:,} tokens",
        "length histogram (tokens: documents):",
    ]
    edges = 2 ** np.arange(int(np.log2(max(1, lengths.min()))), int(np.log2(lengths.max())) + 2)
    counts, _ = np.histogram(lengths, bins=edges)
    for lo, hi, c in zip(edges, edges[1:], counts):
        lines.append(f"  {lo:>8,} - {hi - 1:>8,}: {c:>7,} {'#' * math.ceil(40 * c / counts.max())}")
    return "\n".join(lines)


@dataclass
class DataConfig:
    data: str | None = flag(None, "a folder of .txt books or .jsonl files with a \"text\" field, "
                            "optionally in train/ validation/ test/; default: the synthetic corpus")
    split: str = flag("train", "the split folder, or without them the (not) held-out documents",
                      choices=SPLITS)
    heldout: float = flag(0.02, "the fraction held out for validation without split folders",
                          type=number(float, 0, inclusive=True, highest=0.5))
    tokenizer: str = flag(TIKTOKEN_NAME, "a checkpoint directory with tokenizer.json, or tiktoken's")
    seq_len: int = flag(2048, "packed sequence length for the packing statistics", type=count)
    strategy: str = flag("adaptive", "document masking strategy", choices=list(STRATEGIES))
    cache_dir: str = flag(CACHE_DIR, "where token caches live")
    workers: int | None = flag(None, "processes that tokenize (default: every core)", type=count)
    synthetic_seed: int = flag(0, "seed of the synthetic corpus", type=int)
    synthetic_docs: int = flag(SyntheticConfig.n_docs, "synthetic corpus size, at most a million "
                               "documents (800M tokens, a 3 GB cache)",
                               type=number(int, 0, inclusive=False, highest=10**6))


def main(argv=None):
    p = argparse.ArgumentParser(description="Build or reuse a corpus's token cache; show it.")
    p.error = fail  # one line, not the usage block
    add_flags(p, DataConfig)
    cfg = from_args(DataConfig, p.parse_args(argv))
    try:
        tokenizer = load_tokenizer(cfg.tokenizer)
        synthetic = SyntheticConfig(seed=cfg.synthetic_seed, n_docs=cfg.synthetic_docs)
        corpus = load_corpus(tokenizer, cfg.data, cfg.split, cfg.heldout, synthetic,
                             cfg.cache_dir, cfg.workers)
    except ValueError as e:
        fail(str(e))
    print(f"tokenizer: {tokenizer.name} (EOS {tokenizer.eos_id}, [MASK] {tokenizer.mask_id})")
    print(describe(corpus, cfg.seq_len, cfg.strategy))


if __name__ == "__main__":
    exit_after(main)  # Ctrl-C: one line (the cache's temporary folder is already removed)
