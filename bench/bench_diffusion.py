"""
bench_diffusion.py: memory of the chunked masked loss, and the sampler's speed with and without
the prefix cache. Prints markdown tables.

Loss: forward+backward through the LM head alone, on a random hidden (tokens, d) with a head of
vocab x d (defaults: 65536 tokens, all of them masked, LLaDA's 126464-token vocabulary, d = 64,
float32). Each case runs in a fresh subprocess and reports its peak resident memory above what
its inputs take. The naive loss (full float32 logits) would need 33 GB at 65536 tokens, so it is
measured at a few short lengths and extrapolated linearly; those rows say so.

Sampler: the tiny preset (random weights, or --model DIR) decodes gen_length tokens after a
random prompt of each --lengths, exactly (cache=None) and with cache="prefix"; tokens/s, the
speed-up and the share of generated tokens on which the two agree. On 2 CPU cores everything
takes about 10 minutes with the defaults (the sampler at 4K and 32K prompts, 32 tokens in one
block, 8 steps: about 4 of them); a 131072-token prompt costs about 6 minutes per exact step
there, so ask for it with fewer steps: `--parts sampler --lengths 131072 --steps 2`.

    python -m bench.bench_diffusion [--parts loss sampler] [--lengths 4096 32768]
                                    [--steps 8] [--gen-length 32] [--block-length 32]
"""
import argparse
import json
import os
import sys
import time

from bench.child import run_child
from bench.memory import memory_mb, reset_peak
from harness.flags import count, positive
from harness.results import check_decoding
from harness.runtime import fail

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def loss_case(method: str, tokens: int, vocab: int, d: int, chunk_size: int) -> dict:
    """Runs in the child process: one forward+backward of the masked loss through the head."""
    import torch

    from harness.runtime import tune_cpu_memory
    tune_cpu_memory()  # huge pages for large tensors, as train.py and evaluate.py run
    import torch.nn.functional as F

    from diffusion import masked_cross_entropy

    torch.manual_seed(0)
    head = torch.nn.Linear(d, vocab, bias=False)
    hidden = torch.randn(tokens, d, requires_grad=True)  # (N, d): every position masked
    targets = torch.randint(0, vocab, (tokens,))
    weights = torch.rand(tokens) + 1  # 1/p of each position's sequence

    def naive():
        logits = head(hidden).float()  # (N, V): all of them at once
        return (F.cross_entropy(logits, targets, reduction="none") * weights).sum()

    def chunked():
        return masked_cross_entropy(head, hidden, targets, weights, chunk_size)

    loss_fn = {"naive": naive, "chunked": chunked}[method]
    base = memory_mb("VmRSS")
    reset_peak()
    t = time.perf_counter()
    loss_fn().backward()
    return {"time": time.perf_counter() - t, "peak_mb": memory_mb("VmHWM") - base}


def measure_loss(method, tokens, args) -> dict:
    cmd = [sys.executable, "-m", "bench.bench_diffusion", "--child", method, str(tokens),
           str(args.vocab), str(args.d), str(args.chunk_size)]
    out = run_child(cmd, f"the {method} loss at {tokens} tokens", ROOT)
    return json.loads(out.strip().splitlines()[-1])


def bench_loss(args) -> None:
    T, V, gib = args.tokens, args.vocab, 1024
    print(f"## Masked loss, forward+backward through the head only: hidden ({T}, {args.d}) float32, "
          f"head {V} x {args.d}, every position masked, chunk_size {args.chunk_size}\n")
    print("| loss | tokens | peak memory above inputs (GiB) | time (s) | how |")
    print("|---|---:|---:|---:|---|")
    naive = []
    for n in args.naive_tokens:
        r = measure_loss("naive", n, args)
        naive.append((n, r["peak_mb"]))
        print(f"| naive (full logits) | {n:,} | {r['peak_mb'] / gib:.2f} | {r['time']:.1f} | measured |",
              flush=True)
    # Least-squares line through the measured points: the peak grows with the logits, N x V.
    mx = sum(n for n, _ in naive) / len(naive)
    my = sum(m for _, m in naive) / len(naive)
    slope = sum((n - mx) * (m - my) for n, m in naive) / sum((n - mx) ** 2 for n, _ in naive)
    print(f"| naive (full logits) | {T:,} | {(my + slope * (T - mx)) / gib:.1f} | - | "
          f"**extrapolated** linearly from the rows above, not run |")
    print(f"| naive, float32 logits alone | {T:,} | {T * V * 4 / 2**30:.1f} | - | "
          f"**computed**: N x V x 4 bytes ({T * V * 4 / 1e9:.1f} GB) |")
    for n in args.chunked_tokens:
        r = measure_loss("chunked", n, args)
        print(f"| chunked + checkpointed (diffusion.masked_cross_entropy) | {n:,} | "
              f"{r['peak_mb'] / gib:.2f} | {r['time']:.1f} | measured |", flush=True)
    print(f"\nOne chunk of float32 logits is {args.chunk_size} x {V} x 4 bytes = "
          f"{args.chunk_size * V * 4 / 2**30:.2f} GiB; the chunked peak is a few of those "
          f"(logits, their softmax, their gradient) whatever the number of tokens.\n")


def bench_sampler(args) -> None:
    import torch

    from harness.runtime import tune_cpu_memory
    tune_cpu_memory()  # huge pages for large tensors, as train.py and evaluate.py run
    from diffusion import generate
    from harness.checkpoint import from_pretrained
    from model import LLaDA, PrefixCache, preset

    torch.manual_seed(0)
    try:
        model = from_pretrained(args.model) if args.model else LLaDA(preset("tiny", init_std=args.init_std))
    except ValueError as e:  # CheckpointError: no config.json, damaged weights
        fail(str(e))
    model = model.to(getattr(torch, args.dtype)).eval()
    name = args.model or f"tiny preset, random weights (std {args.init_std})"
    print(f"## Sampler: {name} ({model.config.n_layers} layers, d_model {model.config.d_model}), "
          f"{args.dtype}, {torch.get_num_threads()} threads, batch 1; gen_length {args.gen_length}, "
          f"block_length {args.block_length}, steps {args.steps}, temperature 0, low_confidence\n")
    print("| prompt tokens | exact: time (s) | exact: tokens/s | prefix cache: time (s) "
          "| prefix cache: tokens/s | speed-up | tokens agreeing |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    kw = dict(steps=args.steps, gen_length=args.gen_length, block_length=args.block_length)
    vocab = model.config.vocab_size
    generate(model, torch.randint(0, vocab - 2, (1, 64)), **kw)  # warm-up: threads, allocator
    for L in args.lengths:
        prompt = torch.randint(0, vocab - 2, (1, L), generator=torch.Generator().manual_seed(L))
        out, times = {}, {}
        for mode, cache in (("exact", None), ("prefix", "prefix")):
            t = time.perf_counter()
            out[mode] = generate(model, prompt, cache=cache, **kw)[0, L:]
            times[mode] = time.perf_counter() - t
        agree = (out["exact"] == out["prefix"]).float().mean().item()
        n, te, tp = args.gen_length, times["exact"], times["prefix"]
        print(f"| {L:,} | {te:.1f} | {n / te:.2f} | {tp:.1f} | {n / tp:.2f} | {te / tp:.1f}x "
              f"| {agree:.1%} |", flush=True)
    # The cache is approximate only because decoding changes the tokens after the prefix; with
    # those unchanged, cached and full forwards must agree to rounding.
    x = torch.randint(0, vocab - 2, (1, 256))
    with torch.no_grad():
        cache = PrefixCache(200)
        full = model(x, cache=cache)
        gap = (model(x[:, 200:], cache=cache) - full[:, 200:]).abs().max().item()
    print(f"\nCache self-check: an unchanged suffix run against a freshly filled PrefixCache differs "
          f"from the full forward by at most {gap:.1e} (rounding is about 1e-6; much more means the "
          f"cache is not being read, and the agreement column measures that instead).\n")


def main(argv=None):
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        method, tokens, vocab, d, chunk = sys.argv[2], *map(int, sys.argv[3:7])
        print(json.dumps(loss_case(method, tokens, vocab, d, chunk)))
        return
    p = argparse.ArgumentParser(description="Chunked-loss memory and sampler speed (diffusion.py).")
    p.error = fail  # one line, not the usage block
    p.add_argument("--parts", nargs="+", default=["loss", "sampler"], choices=["loss", "sampler"],
                   help="which measurements to run (default both)")
    p.add_argument("--tokens", type=count, default=65536, help="masked tokens of the loss case")
    p.add_argument("--vocab", type=count, default=126464, help="vocabulary of the loss case")
    p.add_argument("--d", type=count, default=64, help="hidden size of the loss case")
    p.add_argument("--chunk-size", type=count, default=4096, help="rows per chunk of the chunked loss")
    p.add_argument("--naive-tokens", type=count, nargs="+", default=[1024, 2048, 4096],
                   help="lengths at which the naive loss is measured (then extrapolated)")
    p.add_argument("--chunked-tokens", type=count, nargs="+", default=[8192, 65536],
                   help="lengths at which the chunked loss is measured")
    p.add_argument("--lengths", type=count, nargs="+", default=[4096, 32768],
                   help="prompt lengths of the sampler (131072 is slow on a CPU)")
    p.add_argument("--gen-length", type=count, default=32, help="tokens the sampler generates (default 32)")
    p.add_argument("--block-length", type=count, default=32, help="tokens per decoding block (default 32)")
    p.add_argument("--steps", type=count, default=8, help="decoding steps; at 131072 use 2 (default 8)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="dtype of the sampler's model (default float32)")
    p.add_argument("--model", default=None, help="a checkpoint directory instead of random tiny weights")
    p.add_argument("--init-std", type=positive, default=0.02,
                   help="std of the random tiny weights; larger makes tokens depend more on context")
    args = p.parse_args(argv)
    if len(set(args.naive_tokens)) < 2:
        fail("--naive-tokens needs at least two different lengths to extrapolate from")
    try:
        check_decoding(args)  # evaluate.py's rule for the same three flags
    except ValueError as e:
        fail(str(e))
    if args.model and not os.path.isdir(args.model):
        fail(f"--model {args.model} is not a directory; pass a checkpoint saved by train.py")
    if "loss" in args.parts:
        bench_loss(args)
    if "sampler" in args.parts:
        bench_sampler(args)


if __name__ == "__main__":
    main()
