"""
bench_model.py: how close the plain PyTorch model gets to the CPU's matrix-multiply peak.

For the `small` preset at a few sequence lengths, time the forward (hidden states and logits at
every position) and forward+backward (cross-entropy over every position), count the model's
FLOPs (2 per multiply-add of every weight matrix, plus 4 L d per token per layer for
bidirectional attention; backward = 2x forward) and compare with torch.mm on the model's own
shapes, measured in the same run. Prints a markdown table.

    python bench/bench_model.py [--preset small] [--lengths 256 1024 2048] [--dtype float32]
"""
import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import LLaDA, preset  # noqa: E402


def best_time(fn, repeats):
    fn()  # warm-up: allocator, threads, kernel selection
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def model_flops(cfg, tokens, seq_len):
    """Forward FLOPs: weight matmuls of the blocks and the head, and attention scores/values."""
    d, m = cfg.d_model, cfg.mlp_hidden_size
    per_layer = 4 * d * d + 3 * d * m
    weights = cfg.n_layers * per_layer + d * cfg.embedding_size
    return 2 * weights * tokens + 4 * seq_len * d * cfg.n_layers * tokens


def matmul_peak(cfg, tokens, dtype, repeats):
    """FLOP/s of torch.mm on the shapes the model multiplies (the best of them)."""
    d, m, v = cfg.d_model, cfg.mlp_hidden_size, cfg.embedding_size
    best = 0.0
    for k, n in ((d, d), (d, m), (m, d), (d, v)):
        a, b = torch.randn(tokens, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        best = max(best, 2 * tokens * k * n / best_time(lambda: torch.mm(a, b), repeats))
    return best


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small", help="model preset (default small)")
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 2048],
                   help="sequence lengths (batch 1)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions (best is kept)")
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    cfg = preset(args.preset)
    net = LLaDA(cfg).to(dtype)
    print(f"preset {args.preset}, {args.dtype}, {torch.get_num_threads()} threads, batch 1\n")
    print("| seq len | pass | time (s) | tokens/s | GFLOP/s | matmul peak GFLOP/s | fraction of peak |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for L in args.lengths:
        x = torch.randint(0, cfg.vocab_size, (1, L))
        peak = matmul_peak(cfg, L, dtype, args.repeats)

        def forward():
            with torch.no_grad():
                net.logits(x)

        def forward_backward():
            logits = net.logits(x)
            F.cross_entropy(logits.view(L, -1).float(), x.view(-1)).backward()

        flops = model_flops(cfg, L, L)
        for name, fn, mult in (("forward", forward, 1), ("forward+backward", forward_backward, 3)):
            t = best_time(fn, args.repeats)
            achieved = mult * flops / t
            print(f"| {L} | {name} | {t:.3f} | {L / t:,.0f} | {achieved / 1e9:.1f} | "
                  f"{peak / 1e9:.1f} | {achieved / peak:.0%} |")


if __name__ == "__main__":
    main()
