"""
bench_diffusion.py: memory of the chunked masked loss (diffusion.masked_cross_entropy) against the
naive one that holds every position's float32 logits. Prints a markdown table.

Forward+backward through the LM head alone, on a random hidden (tokens, d) with a head of
vocab x d (defaults: 65536 tokens, all of them masked, LLaDA's 126464-token vocabulary, d = 64,
float32). Each case runs in a fresh subprocess and reports its peak resident memory above what
its inputs take. The naive loss would need 33 GB at 65536 tokens, so it is measured at a few
short lengths and scaled by tokens from the longest; those rows say so. (The sampler's speed with
and without the prompt cache is measured as evaluate.py runs it: bench_eval.py.)

    python -m bench.bench_diffusion [--tokens 65536] [--chunk-size 4096]
"""
from bench.child import measure, parser, serve, time_and_peak
from harness.flags import count


def loss_case(method: str, tokens: int, vocab: int, d: int, chunk_size: int) -> dict:
    """Runs in the child process: one forward+backward of the masked loss through the head."""
    import torch
    import torch.nn.functional as F

    from diffusion import masked_cross_entropy

    torch.manual_seed(0)
    head = torch.nn.Linear(d, vocab, bias=False)
    hidden = torch.randn(tokens, d, requires_grad=True)  # (N, d): every position masked
    targets = torch.randint(0, vocab, (tokens,))
    weights = torch.rand(tokens) + 1  # 1/p of each position's sequence

    def loss():
        if method == "chunked":
            return masked_cross_entropy(head, hidden, targets, weights, chunk_size)
        logits = head(hidden).float()  # (N, V): all of them at once
        return (F.cross_entropy(logits, targets, reduction="none") * weights).sum()

    return time_and_peak(lambda: loss().backward())


def main(argv=None):
    if serve(loss_case):
        return
    p = parser(__doc__)
    p.add_argument("--tokens", type=count, default=65536, help="masked tokens of the loss case")
    p.add_argument("--vocab", type=count, default=126464, help="vocabulary of the loss case")
    p.add_argument("--d", type=count, default=64, help="hidden size of the loss case")
    p.add_argument("--chunk-size", type=count, default=4096, help="rows per chunk of the chunked loss")
    p.add_argument("--naive-tokens", type=count, nargs="+", default=[1024, 2048, 4096],
                   help="lengths at which the naive loss is measured (the longest is extrapolated)")
    p.add_argument("--chunked-tokens", type=count, nargs="+", default=[8192, 65536],
                   help="lengths at which the chunked loss is measured")
    args = p.parse_args(argv)

    def measure_loss(method, tokens) -> dict:
        return measure("bench.bench_diffusion", f"the {method} loss at {tokens} tokens", method,
                       tokens, args.vocab, args.d, args.chunk_size)

    T, V, gib = args.tokens, args.vocab, 1024
    print(f"## Masked loss, forward+backward through the head only: hidden ({T}, {args.d}) float32, "
          f"head {V} x {args.d}, every position masked, chunk_size {args.chunk_size}\n")
    print("| loss | tokens | peak memory above inputs (GiB) | time (s) | how |")
    print("|---|---:|---:|---:|---|")
    for n in sorted(args.naive_tokens):
        r = measure_loss("naive", n)
        print(f"| naive (full logits) | {n:,} | {r['peak_mb'] / gib:.2f} | {r['time']:.1f} | measured |",
              flush=True)
    # The peak is the logits, their softmax and gradient: N x V, so it scales with the tokens.
    print(f"| naive (full logits) | {T:,} | {r['peak_mb'] * T / n / gib:.1f} | - | "
          f"**extrapolated** from {n:,} tokens (x {T / n:g}), not run |")
    print(f"| naive, float32 logits alone | {T:,} | {T * V * 4 / 2**30:.1f} | - | "
          f"**computed**: N x V x 4 bytes ({T * V * 4 / 1e9:.1f} GB) |")
    for n in args.chunked_tokens:
        r = measure_loss("chunked", n)
        print(f"| chunked + checkpointed (diffusion.masked_cross_entropy) | {n:,} | "
              f"{r['peak_mb'] / gib:.2f} | {r['time']:.1f} | measured |", flush=True)
    print(f"\nOne chunk of float32 logits is {args.chunk_size} x {V} x 4 bytes = "
          f"{args.chunk_size * V * 4 / 2**30:.2f} GiB; the chunked peak is a few of those "
          f"(logits, their softmax, their gradient) whatever the number of tokens.")


if __name__ == "__main__":
    main()
