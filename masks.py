"""
masks.py: packing documents into one long sequence, and who may attend to whom.

Paper map: docs/paper.md section 3.1. Post-training data is PG19:
short books are concatenated up to 64K tokens, long books are cut into 64K chunks. A diffusion
LM attends in both directions, so in a packed sequence every document sees every other one,
before and after it. Three strategies:

    concat     documents back to back, full attention                     (baseline)
    eod        an end-of-document token after each document, full attention
    adaptive   attention only inside each document: block-diagonal mask

The layout of a packed batch is one thing: `doc_lens`, for each sequence the lengths of the
documents it holds, in order, summing to the sequence length. Everything else (cumulative
offsets for flash-attn, per-token document ids, per-document positions, padded batches) is
derived from it in `attention_plan` and the helpers below.

Adaptive attention never builds an L x L mask: at 131072 tokens that would be 17 billion
entries. It runs attention document by document (flash-attn varlen on CUDA, or documents of
similar length grouped into padded batches for scaled_dot_product_attention), so compute is
proportional to sum(doc_len^2) and memory to L.

This file imports no other project file: a student can copy it alone.
Run `python masks.py --plot` to draw the three strategies.
"""
import argparse
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

STRATEGIES = {
    # name:     (separator token after each document, attention restricted to the document)
    "concat": (False, False),
    "eod": (True, False),
    "adaptive": (False, True),
}


def uses_separator(strategy: str) -> bool:
    return STRATEGIES[strategy][0]  # a KeyError names an unknown strategy


def isolates_documents(strategy: str) -> bool:
    return STRATEGIES[strategy][1]


# ---------------------------------------------------------------------------------------------
# Packing. Documents form one stream (each followed by the separator under "eod"), and packed
# sequence n is stream tokens [n*L, (n+1)*L). Short documents therefore share a sequence, long
# ones are cut into L-token chunks, every token lands in exactly one sequence, and the length
# stays fixed because the separator belongs to the document it ends. The final partial sequence
# (fewer than L tokens) is dropped.

def stream_bounds(doc_offsets: np.ndarray, separator: bool) -> np.ndarray:
    """Where each document starts in the packed stream: (n_docs + 1,) offsets."""
    offsets = np.asarray(doc_offsets, dtype=np.int64)
    if separator:  # document j is followed by j+1 separators before it ends
        offsets = offsets + np.arange(len(offsets), dtype=np.int64)
    return offsets


def num_packed_sequences(doc_offsets: np.ndarray, seq_len: int, strategy: str) -> int:
    return int(stream_bounds(doc_offsets, uses_separator(strategy))[-1]) // seq_len


def pack_sequence(tokens: np.ndarray, doc_offsets: np.ndarray, index: int, seq_len: int,
                  strategy: str, eod_id: int | None = None) -> tuple[np.ndarray, list[int]]:
    """Packed sequence number `index`: its tokens (seq_len,) and its document lengths.

    `tokens` is every document back to back, `doc_offsets` (n_docs + 1,) where each starts.
    Random access, so any rank can build any sequence without reading the ones before it.
    """
    separator = uses_separator(strategy)
    assert eod_id is not None or not separator, "the eod strategy needs eod_id, the separator"
    bounds = stream_bounds(doc_offsets, separator)
    start, end = index * seq_len, (index + 1) * seq_len
    assert 0 <= index and end <= bounds[-1], f"packed sequence {index} is out of range " \
        f"({int(bounds[-1]) // seq_len} sequences of {seq_len} tokens)"
    out = np.empty(seq_len, dtype=np.int64)
    doc_lens = []
    j = int(np.searchsorted(bounds, start, side="right")) - 1  # document holding `start`
    pos = start
    while pos < end:
        piece_end = min(end, int(bounds[j + 1]))
        # The piece [pos, piece_end) of document j, in stream coordinates; its text is
        # tokens[doc_offsets[j] + (pos - bounds[j]) ...], plus the separator at the stream's end.
        text_end = int(bounds[j + 1]) - (1 if separator else 0)
        src = int(doc_offsets[j]) + (pos - int(bounds[j]))
        n_text = max(0, min(piece_end, text_end) - pos)
        out[pos - start: pos - start + n_text] = tokens[src: src + n_text]
        if piece_end > text_end:  # the piece includes the document's separator
            out[piece_end - 1 - start] = eod_id
        if piece_end > pos:  # an empty document takes no room and is no document
            doc_lens.append(piece_end - pos)
        pos, j = piece_end, j + 1
    return out, doc_lens


# ---------------------------------------------------------------------------------------------
# The layout, converted in one place.

def doc_ids(doc_lens: list[list[int]]) -> torch.Tensor:
    """(B, L) index of the document each token belongs to."""
    return torch.stack([torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
                        for lens in doc_lens])


def document_positions(doc_lens: list[list[int]]) -> torch.Tensor:
    """(B, L) positions restarting at 0 at the start of every document."""
    return torch.stack([torch.cat([torch.arange(n) for n in lens]) for lens in doc_lens])


def allowed(doc_lens: list[int], strategy: str) -> torch.Tensor:
    """(L, L) bool: may query i attend to key j. For tests and pictures of small examples only."""
    ids = doc_ids([doc_lens])[0]
    same = ids[:, None] == ids[None, :]
    return same if isolates_documents(strategy) else torch.ones_like(same)


@dataclass
class AttentionPlan:
    """How to run attention for one forward pass, derived once and shared by every layer."""
    kind: str  # "documents": queries and keys both span the sequence, attend within documents;
    #            "suffix": queries are the last positions of the keys (cached decoding)
    cu_seqlens: torch.Tensor | None = None  # (n_docs + 1,) int32 offsets over the flat batch
    max_len: int = 0
    buckets: list | None = None  # [(token index (n, P), key valid (n, 1, 1, P), real rows (n*P,))]
    inverse: torch.Tensor | None = None  # flat token t's row in the concatenated bucket outputs
    key_mask: torch.Tensor | None = None  # (B, 1, 1, Lk) bool, for "suffix"
    uniform: int = 0  # every document has this length: attention on a (B * L / n, n) view
    starts: torch.Tensor | None = None  # (n_docs,) where each document starts in the flat batch
    lens: torch.Tensor | None = None  # (n_docs,) their lengths

    def sdpa_buckets(self) -> tuple[list, torch.Tensor]:
        """The padded batches of SDPA, built on first use and then shared by every layer; a
        flash-attn run never needs them."""
        if self.buckets is None:
            self.buckets, self.inverse = document_buckets(self.starts, self.lens,
                                                          self.cu_seqlens.device)
        return self.buckets, self.inverse


def attention_plan(doc_lens: list[list[int]] | None, batch: int, seq_len: int,
                   device: torch.device, query_len: int | None = None) -> AttentionPlan | None:
    """Convert `doc_lens` into what the kernels need. None means full attention.

    query_len < seq_len is cached decoding: the queries are the last query_len keys and must all
    lie in each sequence's last document (the keys of earlier documents are hidden).
    """
    if doc_lens is None:
        return None
    assert len(doc_lens) == batch and all(sum(lens) == seq_len and min(lens) > 0
                                          for lens in doc_lens), \
        f"doc_lens must give {batch} rows of positive lengths summing to {seq_len}, got {doc_lens}"
    if query_len is not None and query_len != seq_len:
        assert all(lens[-1] >= query_len for lens in doc_lens), \
            f"cached decoding needs all {query_len} queries inside the last document: {doc_lens}"
        if all(len(lens) == 1 for lens in doc_lens):
            return None
        first_key = torch.tensor([seq_len - lens[-1] for lens in doc_lens], device=device)
        key_mask = torch.arange(seq_len, device=device)[None, :] >= first_key[:, None]
        return AttentionPlan("suffix", key_mask=key_mask[:, None, None, :])
    lens = torch.tensor([n for row in doc_lens for n in row], dtype=torch.int64)
    ends = torch.cumsum(lens, 0)  # offsets in the flattened (B * L) batch
    # equal documents (a long book's chunks) need no buckets: a plain reshape
    uniform = int(lens[0]) if bool((lens == lens[0]).all()) else 0
    return AttentionPlan("documents", cu_seqlens=F.pad(ends, (1, 0)).to(torch.int32).to(device),
                         max_len=int(lens.max()), uniform=uniform, starts=ends - lens, lens=lens)


def document_buckets(starts: torch.Tensor, lens: torch.Tensor, device: torch.device,
                     growth: float = 1.25) -> tuple[list, torch.Tensor]:
    """Group documents of similar length into padded batches.

    One kernel call per document is slow with a thousand short documents; one call over a batch
    of documents padded to the longest one wastes little compute when lengths are close. Sorted
    by length, a bucket closes when the next document is more than `growth` times the first, so
    padding costs at most growth^2 in attention FLOPs.
    """
    order = torch.argsort(lens, stable=True).tolist()
    buckets, groups, group = [], [], []
    for d in order:
        if group and lens[d] > growth * lens[group[0]]:
            groups.append(group)
            group = []
        group.append(d)
    groups.append(group)
    valid_rows = []
    for group in groups:
        g_starts, g_lens = starts[group], lens[group]
        width = int(g_lens.max())
        offs = torch.arange(width)
        valid = offs[None, :] < g_lens[:, None]  # (n, P)
        # Padding slots read the document's first token (any real index will do): they are
        # hidden as keys and their query outputs are dropped.
        index = torch.where(valid, g_starts[:, None] + offs[None, :], g_starts[:, None])
        if bool(valid.all()):  # equal lengths: no mask, so SDPA can use its fastest kernel
            buckets.append((index.to(device), None, None))
        else:
            buckets.append((index.to(device), valid[:, None, None, :].to(device),
                            valid.reshape(-1).to(device)))
        valid_rows.append(index[valid])
    flat = torch.cat(valid_rows)  # bucket outputs, concatenated, hold these flat tokens in order
    inverse = torch.empty_like(flat)
    inverse[flat] = torch.arange(len(flat))
    return buckets, inverse.to(device)


# ---------------------------------------------------------------------------------------------
# Attention. The one place where the CPU and GPU paths differ: flash-attn when it is installed
# and the tensors are on CUDA in half precision, scaled_dot_product_attention otherwise.

_flash = None


def flash_attn_available() -> bool:
    """True when flash-attn imports; only ever called for CUDA tensors, so CPU never imports it."""
    global _flash
    if _flash is None:
        try:
            import flash_attn
            _flash = flash_attn
        except ImportError:
            _flash = False
    return bool(_flash)


def attention_kernel(device: torch.device, dtype: torch.dtype) -> str:
    """The one place that picks the kernel: flash-attn for half precision on CUDA when it is
    installed (it has no float32 kernels), scaled_dot_product_attention for everything else."""
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and flash_attn_available():
        return "flash"
    return "sdpa"


def sdpa(q, k, v, mask=None):
    """scaled_dot_product_attention on (B, L, H, D) tensors, scale 1/sqrt(D), bidirectional."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask)
    return out.transpose(1, 2)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              plan: AttentionPlan | None = None) -> torch.Tensor:
    """Bidirectional attention. q (B, Lq, H, D), k and v (B, Lk, H, D) -> (B, Lq, H, D)."""
    flash = attention_kernel(q.device, q.dtype) == "flash"
    if plan is None:  # concat and eod: every token sees every token of its sequence
        if flash:
            return _flash.flash_attn_func(q, k, v, causal=False)
        return sdpa(q, k, v)
    if plan.kind == "suffix":
        return sdpa(q, k, v, plan.key_mask)
    B, L, H, D = q.shape
    if flash:  # adaptive on GPU: one varlen call over every document of the batch
        out = _flash.flash_attn_varlen_func(
            q.reshape(B * L, H, D), k.reshape(B * L, H, D), v.reshape(B * L, H, D),
            plan.cu_seqlens, plan.cu_seqlens, plan.max_len, plan.max_len, causal=False)
        return out.view(B, L, H, D)
    return bucketed_attention(q, k, v, plan)


def bucketed_attention(q, k, v, plan: AttentionPlan) -> torch.Tensor:
    """Attention inside each document, a padded batch of similar-length documents per call."""
    B, L, H, D = q.shape
    if plan.uniform:  # documents tile the batch evenly: each is a row of a view, no copies
        n = plan.uniform
        return sdpa(q.reshape(-1, n, H, D), k.reshape(-1, n, H, D), v.reshape(-1, n, H, D)).reshape(B, L, H, D)
    qf, kf, vf = (t.reshape(B * L, H, D) for t in (q, k, v))
    buckets, inverse = plan.sdpa_buckets()
    outs = []
    for index, key_valid, real_rows in buckets:
        o = sdpa(qf[index], kf[index], vf[index], key_valid).reshape(-1, H, D)  # (n * P, H, D)
        outs.append(o if real_rows is None else o[real_rows])
    return torch.cat(outs)[inverse].view(B, L, H, D)


# ---------------------------------------------------------------------------------------------

def plot_strategies(path: str, doc_lens=(5, 3, 6, 2), eod_id_label: str = "EOD") -> None:
    """Draw, for each strategy, which query may attend to which key in a small packed sequence."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4.6))
    for ax, strategy in zip(axes, STRATEGIES):
        # Under eod every document grows by its separator; the sequence length is kept by
        # letting the last document's separator fall into the next sequence (cut here).
        lens = [n + 1 for n in doc_lens] if uses_separator(strategy) else list(doc_lens)
        grid = allowed(lens, strategy).float().numpy()
        ids = doc_ids([lens])[0].numpy()
        colour = np.where(grid > 0, (ids[:, None] == ids[None, :]) * 1.0 + 1.0, 0.0)
        ax.imshow(colour, cmap=matplotlib.colors.ListedColormap(["#f4f4f4", "#f4a261", "#2a9d8f"]),
                  vmin=0, vmax=2)
        ends = np.cumsum(lens)
        for e in ends[:-1]:
            ax.axhline(e - 0.5, color="k", lw=0.8)
            ax.axvline(e - 0.5, color="k", lw=0.8)
        if uses_separator(strategy):
            for e in ends:
                ax.text(e - 1, -1.2, eod_id_label, ha="center", fontsize=7, rotation=90, color="#c0392b")
                ax.add_patch(plt.Rectangle((e - 1.5, -0.5), 1, len(ids), color="#c0392b",
                                           alpha=0.35, lw=0))
        ax.set_title(strategy, pad=26)
        ax.set(xlabel="key position", ylabel="query position", xticks=[], yticks=[])
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in ("#2a9d8f", "#f4a261", "#f4f4f4")]
    handles.append(plt.Rectangle((0, 0), 1, 1, color="#c0392b", alpha=0.35, lw=0))
    fig.legend(handles, ["same document", "other document (cross-document attention)", "blocked",
                         "end-of-document token (last token of its document)"],
               loc="lower center", ncol=4, frameon=False)
    fig.suptitle(f"Packed sequence of documents of lengths {list(doc_lens)}: "
                 "who may attend to whom", fontsize=11)
    fig.tight_layout(rect=(0, 0.07, 1, 0.95))
    fig.savefig(path, dpi=120)  # a picture for the docs: rerunning the command remakes it
    plt.close(fig)


def pairs_computed(doc_lens: list[int], strategy: str) -> int:
    """Query-key pairs a strategy's attention computes: sum(n^2) inside documents, L^2 across
    the whole sequence; counted, not drawn, so any length costs nothing."""
    return sum(n * n for n in doc_lens) if isolates_documents(strategy) else sum(doc_lens) ** 2


MAX_PLOT_TOKENS = 256  # --plot draws a cell per query-key pair: beyond this nobody can see one


def main(argv=None):
    p = argparse.ArgumentParser(description="Document masking strategies for packed sequences "
                                            "(concat, eod, adaptive).")
    p.error = lambda message: p.exit(2, f"error: {message}\n")  # one line, no usage block
    p.add_argument("--plot", action="store_true",
                   help="draw the three strategies for a small example into --out")
    p.add_argument("--out", default="docs/masks.png",
                   help="where --plot writes the picture (.png, .pdf, .svg, ...; default: %(default)s)")
    doc_lens = [5, 3, 6, 2]
    p.add_argument("--doc-lens", type=int, nargs="+", default=doc_lens,
                   help=f"document lengths of the example sequence (--plot: {MAX_PLOT_TOKENS} "
                        f"tokens at most; default: {' '.join(map(str, doc_lens))})")
    args = p.parse_args(argv)
    if any(n <= 0 for n in args.doc_lens):
        p.error(f"--doc-lens must all be positive, got {args.doc_lens}")
    if not args.plot:
        for strategy, (sep, iso) in STRATEGIES.items():
            lens = [n + sep for n in args.doc_lens]
            print(f"{strategy:<9} separator={'yes' if sep else 'no ':<3} attention="
                  f"{'inside each document' if iso else 'whole sequence':<21} "
                  f"query-key pairs computed: {pairs_computed(lens, strategy)} of {sum(lens) ** 2}")
        print("pass --plot to draw them")
        return
    # eod adds a separator to every document, and the picture has a cell per pair
    if sum(args.doc_lens) + len(args.doc_lens) > MAX_PLOT_TOKENS:
        p.error(f"--doc-lens sum to {sum(args.doc_lens)} tokens and --plot draws a cell per "
                f"query-key pair: pass at most {MAX_PLOT_TOKENS}, separators included")
    if not os.path.splitext(args.out)[1] or os.path.isdir(args.out):
        # without an extension matplotlib would append .png: --out /tmp would write /tmp.png
        p.error(f"--out {args.out!r} is not a picture's file name; pass one such as docs/masks.png")
    try:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        plot_strategies(args.out, tuple(args.doc_lens))
    except OSError as e:
        p.error(f"cannot write {args.out}: {e.strerror or e}")
    except ValueError as e:  # matplotlib: an extension it has no writer for
        p.error(f"cannot write {args.out}: {e}; pass a .png, .pdf or .svg file name")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
