"""
bench_model.py: how close the plain PyTorch model gets to the CPU's matrix-multiply peak.

For the `small` preset at a few sequence lengths, time the forward (hidden states and logits at
every position) and the forward+backward, count the model's FLOPs (results.forward_flops, the
cost model evaluate.py estimates with; backward = 2x forward) and compare with torch.mm on the
model's own shapes, measured in the same run. Prints a markdown table.

The backward is seeded with a fixed gradient of the logits, so the goal row times the model and
nothing else: no loss over every position, which training never computes (diffusion.py runs the
head at masked positions, in chunks; bench_diffusion.py measures that loss against the naive one).

The matmuls and the model passes are timed in interleaved rounds and each keeps its best time:
a slow spell of a shared machine then slows every measurement alike.

    python -m bench.bench_model [--preset small] [--lengths 256 1024 2048] [--rounds 8]
"""
import time

import torch

from bench.child import parser
from harness.flags import count
from harness.files import physical_memory
from harness.results import forward_flops
from harness.runtime import fail, tune_cpu_memory
from model import PRESETS, LLaDA, num_params, preset


def best_times(cases: dict, rounds: int) -> dict:
    """Best wall time of each case (name -> (function, FLOPs)), calling them in turn `rounds`
    times after a warm-up."""
    for fn, _ in cases.values():
        fn()  # warm-up: allocator, threads, kernel selection
    best = dict.fromkeys(cases, float("inf"))
    for _ in range(rounds):
        for name, (fn, _) in cases.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    return best


def matmuls(cfg, tokens, dtype) -> dict:
    """torch.mm on the shapes the model multiplies: name -> (function, FLOPs)."""
    d, m, v = cfg.d_model, cfg.mlp_hidden_size, cfg.embedding_size
    out = {}
    for k, n in ((d, d), (d, m), (m, d), (d, v)):
        a, b = torch.randn(tokens, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        out[f"mm {k}x{n}"] = ((lambda a=a, b=b: torch.mm(a, b)), 2 * tokens * k * n)
    return out


def peak(mms: dict, best: dict) -> float:
    """FLOP/s of the fastest matmul, given best times by name."""
    return max(flops / best[name] for name, (_, flops) in mms.items())


def matmul_peak(cfg, tokens, dtype, rounds) -> float:
    """The torch.mm peak on the model's shapes, on its own (bench_train.py)."""
    mms = matmuls(cfg, tokens, dtype)
    return peak(mms, best_times(mms, rounds))


def main(argv=None):
    tune_cpu_memory()  # huge pages for large tensors, as train.py and evaluate.py run
    p = parser(__doc__)
    p.add_argument("--preset", default="small", choices=list(PRESETS), help="model preset (default small)")
    p.add_argument("--lengths", type=count, nargs="+", default=[256, 1024, 2048],
                   help="sequence lengths, batch 1 (default 256 1024 2048)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="dtype of the model and the matmuls (default float32; the goal is float32)")
    p.add_argument("--rounds", type=count, default=8,
                   help="timed rounds; every matmul and pass runs once per round, best is kept "
                        "(default 8)")
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    cfg = preset(args.preset)
    need = 2 * num_params(cfg) * dtype.itemsize  # the weights and their gradients
    memory = physical_memory()
    if need > 0.8 * memory:
        fail(f"--preset {args.preset} needs {need / 1e9:.0f} GB for its weights and gradients "
             f"alone, and this machine has {memory / 1e9:.0f} GB; pass a smaller preset")
    net = LLaDA(cfg).to(dtype)
    print(f"preset {args.preset}, {args.dtype}, {torch.get_num_threads()} threads, batch 1, "
          f"best of {args.rounds} interleaved rounds\n")
    print("| seq len | pass | time (s) | tokens/s | GFLOP/s | matmul peak GFLOP/s | fraction of peak |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for L in args.lengths:
        x = torch.randint(0, cfg.vocab_size, (1, L))
        # Any loss ends in some gradient of the logits; a fixed one isolates the model's work.
        seed = torch.randn(1, L, cfg.embedding_size, dtype=dtype) / L

        def forward():
            with torch.no_grad():
                net.logits(x)

        def forward_backward():
            net.logits(x).backward(seed)

        flops = forward_flops(cfg, L, L, L)  # logits at every position
        passes = {"forward": (forward, flops), "forward+backward": (forward_backward, 3 * flops)}
        mms = matmuls(cfg, L, dtype)
        best = best_times({**mms, **passes}, args.rounds)
        top = peak(mms, best)
        for name, (_, f) in passes.items():
            t = best[name]
            print(f"| {L} | {name} | {t:.3f} | {L / t:,.0f} | {f / t / 1e9:.1f} | "
                  f"{top / 1e9:.1f} | {f / t / top:.0%} |")


if __name__ == "__main__":
    main()
