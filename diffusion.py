"""
diffusion.py: the masked-diffusion objective, LLaDA's sampler, and likelihood estimates.

Paper map: docs/paper.md section 4. The forward process masks a clean sequence x_0; for
sequence b of a batch

    t_b ~ U(0, 1),   p_b = (1 - eps) t_b + eps   (eps = 1e-3),   x_t[i] = [MASK] w.p. p_b

and the model predicts the original token at every masked position. The training loss is

    loss = 1 / (B * L) * sum_b sum_{i masked} CE(x_0[i] | x_t) / p_b

Sampling is LLaDA's generate.py: the answer starts as gen_length masks and is decoded in blocks
of block_length, left to right; each step of a block unmasks a scheduled number of tokens, the
most confident predictions ("low_confidence") or random ones, optionally with Gumbel noise and
classifier-free guidance  logits = un + (cfg + 1) * (cond - un).
Likelihood is LLaDA's get_log_likelihood.py: the same loss, with the answer masked and the
prompt clean, averaged over Monte Carlo draws; minus it bounds log p(answer | prompt) from below.
Long-document perplexity is LongLLaDA's: that estimate for each 64-token chunk given all the
text before it, accumulated into a running geometric mean.

Logits are only ever computed where they are needed (masked positions, the block being
decoded): with LLaDA's 126464-token vocabulary the logits of a 64K sequence are 33 GB in float32.
"""
import argparse
import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from model import PrefixCache


def rng_device(generator: torch.Generator | None, device: torch.device) -> torch.device:
    """Random numbers are drawn where the generator lives (so a CPU generator also serves a
    CUDA model), then moved to `device`."""
    return generator.device if generator is not None else device


# ---------------------------------------------------------------------------------------------
# Training.

def forward_process(input_ids: torch.Tensor, mask_id: int, generator: torch.Generator | None = None,
                    eps: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mask every token of sequence b with probability p_b = (1 - eps) t_b + eps, t_b ~ U(0, 1).

    Returns the noisy tokens (B, L), where they were masked (B, L) bool, and p (B,). Draws t
    first, then one coin per token, in the order of LLaDA's pre-training code.
    """
    B, L = input_ids.shape
    dev = rng_device(generator, input_ids.device)
    t = torch.rand(B, generator=generator, device=dev).to(input_ids.device)  # (B,)
    p = (1 - eps) * t + eps
    coins = torch.rand((B, L), generator=generator, device=dev).to(input_ids.device)  # (B, L)
    masked = coins < p[:, None]
    return torch.where(masked, mask_id, input_ids), masked, p


def masked_cross_entropy(head, hidden: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
                         chunk_size: int = 4096) -> torch.Tensor:
    """sum_n weights[n] * CE(head(hidden[n]), targets[n]) as a float32 scalar.

    hidden (N, ..., d) holds only the positions that need a prediction; `head` maps it to
    logits (N, V). The rows go through the head chunk_size at a time, and each chunk is
    checkpointed: its logits are freed after the forward and recomputed in backward, so no more
    than chunk_size x V logits ever exist (4096 x 126464 is 2 GB in float32; all 65536 positions
    of a 64K sequence would be 33 GB).
    """
    def chunk_loss(h, t, w):
        logits = head(h).float()  # (n, V): cross-entropy in float32, one chunk upcast at a time
        return (F.cross_entropy(logits, t, reduction="none") * w).sum()

    # max(N, 1): with nothing to predict the head still runs once, on an empty chunk, so the
    # gradient graph (and every rank of a sharded head) looks the same on every step.
    return sum(checkpoint(chunk_loss, hidden[s:s + chunk_size], targets[s:s + chunk_size],
                          weights[s:s + chunk_size], use_reentrant=False)
               for s in range(0, max(len(hidden), 1), chunk_size))


def diffusion_loss(model, input_ids: torch.Tensor, generator: torch.Generator | None = None,
                   doc_lens: list[list[int]] | None = None, positions: torch.Tensor | None = None,
                   eps: float = 1e-3, chunk_size: int = 4096) -> torch.Tensor:
    """The masked-diffusion loss of a batch (B, L): sum over masked tokens of CE / p, over B * L.

    doc_lens and positions only shape the model's attention (masks.py); the loss itself counts
    every token alike, whichever document it belongs to.
    """
    noisy, masked, p = forward_process(input_ids, model.config.mask_token_id, generator, eps)
    hidden = model(noisy, positions=positions, doc_lens=doc_lens)  # (B, L, d)
    weights = (1 / p)[:, None].expand_as(masked)[masked]  # (N,): 1/p_b for each masked token
    total = masked_cross_entropy(model.head, hidden[masked], input_ids[masked], weights, chunk_size)
    return total / input_ids.numel()


def sft_loss(model, input_ids: torch.Tensor, prompt_lens: list[int] | torch.Tensor,
             generator: torch.Generator | None = None, eps: float = 1e-3,
             chunk_size: int = 4096) -> torch.Tensor:
    """LLaDA's supervised fine-tuning loss (GUIDELINES.md) on (prompt, answer) rows (B, L).

    The forward process runs over the whole row, then the prompt is restored: only the answer
    (everything after prompt_lens[b], its EOS padding included) is ever masked. Each row's
    loss is normalised by its answer length, so long and short answers weigh alike:

        loss = 1/B * sum_b 1/|a_b| * sum_{i in a_b masked} CE(x_0[i] | x_t) / p_b
    """
    B, L = input_ids.shape
    prompt_lens = torch.as_tensor(prompt_lens, device=input_ids.device)  # (B,)
    noisy, masked, p = forward_process(input_ids, model.config.mask_token_id, generator, eps)
    is_prompt = torch.arange(L, device=input_ids.device)[None] < prompt_lens[:, None]  # (B, L)
    noisy = torch.where(is_prompt, input_ids, noisy)
    masked = masked & ~is_prompt
    answer_lens = (L - prompt_lens).clamp(min=1).float()  # (B,)
    hidden = model(noisy)  # (B, L, d)
    weights = (1 / (p * answer_lens))[:, None].expand_as(masked)[masked]  # (N,)
    return masked_cross_entropy(model.head, hidden[masked], input_ids[masked], weights,
                                chunk_size) / B


# ---------------------------------------------------------------------------------------------
# Sampling: LLaDA's generate.py, computing logits for the current block only.

def guided(cond: torch.Tensor, un: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    """Classifier-free guidance: move from the unconditional towards the conditional logits."""
    return un + (cfg_scale + 1) * (cond - un)


def add_gumbel_noise(logits: torch.Tensor, temperature: float,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Gumbel-max in LLaDA's form: argmax exp(l) / (-log u)^T samples from softmax(l / T).

    In float64, as the official code does: low-precision Gumbel-max lowers perplexity but hurts
    generation quality (arXiv:2409.02908).
    """
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64)
    noise = torch.rand(logits.shape, generator=generator, dtype=torch.float64,
                       device=rng_device(generator, logits.device)).to(logits.device)
    return logits.exp() / (-torch.log(noise)) ** temperature


def get_num_transfer_tokens(block_mask_index: torch.Tensor, steps: int) -> torch.Tensor:
    """(B, steps) tokens to unmask at each step: equal shares, the remainder on the first steps."""
    mask_num = block_mask_index.sum(dim=1, keepdim=True)  # (B, 1)
    step = torch.arange(steps, device=block_mask_index.device)[None]  # (1, steps)
    return mask_num // steps + (step < mask_num % steps).long()


def padding_doc_lens(prompt_lens: list[int] | None, prompt_width: int,
                     gen_length: int) -> list[list[int]] | None:
    """Left padding as a document of its own, so that no real token ever attends to it."""
    if prompt_lens is None or all(n == prompt_width for n in prompt_lens):
        return None
    total = prompt_width + gen_length
    return [[total] if n == prompt_width else [prompt_width - n, n + gen_length]
            for n in prompt_lens]


def block_logits(model, x, block: slice, prompt_len: int, cfg_scale: float, mask_id: int,
                 doc_lens, cache) -> torch.Tensor:
    """Logits (B, block_length, V) of the current block. One forward over x, or over what
    follows the prefix once the cache holds it; the head runs on the block only."""
    if cfg_scale > 0:  # the unconditional pass sees the same sequence with the prompt masked
        un_x = x.clone()
        un_x[:, :prompt_len] = mask_id
        x = torch.cat([x, un_x])  # (2B, L)
    start = cache.length if cache is not None and cache.filled(model.config.n_layers) else 0
    hidden = model(x[:, start:], doc_lens=doc_lens, cache=cache)  # (B or 2B, L - start, d)
    logits = model.head(hidden[:, block.start - start:block.stop - start])  # (B or 2B, n, V)
    return guided(*logits.chunk(2), cfg_scale) if cfg_scale > 0 else logits


def check_schedule(gen_length: int, block_length: int, steps: int) -> None:
    """The sampler's one rule, which the official generate.py asserts: the answer is a whole
    number of blocks, and every block gets the same number of steps (a ValueError naming them)."""
    if gen_length <= 0 or block_length <= 0 or gen_length % block_length:
        raise ValueError(f"gen_length {gen_length} must be a positive multiple of block_length "
                         f"{block_length}")
    if steps <= 0 or steps % (gen_length // block_length):
        raise ValueError(f"steps {steps} must be a positive multiple of the number of blocks "
                         f"{gen_length // block_length} (gen_length / block_length)")


@torch.no_grad()
def generate(model, prompt: torch.Tensor, steps: int = 128, gen_length: int = 128,
             block_length: int = 128, temperature: float = 0., cfg_scale: float = 0.,
             remasking: str = "low_confidence", mask_id: int | None = None,
             prompt_lens: list[int] | None = None, cache: str | None = None,
             generator: torch.Generator | None = None, on_step=None) -> torch.Tensor:
    """LLaDA's sampler: prompt (B, Lp) -> (B, Lp + gen_length) with the answer filled in.

    Prompts of different lengths are left-padded to one width, and prompt_lens[b] says how many
    tokens of row b are real (the last ones); padding is kept out of attention and positions
    stay 0..L-1, as in the official code. cache="prefix" reuses the prompt's keys and values
    within a block (approximate, faster on long prompts). At temperature 0 and cache=None the
    result is token for token the official generate.py's; with temperature > 0 the Gumbel noise
    is drawn for the current block only, so the random stream differs from the official one. The
    official options logits_eos_inf and confidence_eos_eot_inf (Instruct-model tweaks) are left
    out.
    """
    mask_id = model.config.mask_token_id if mask_id is None else mask_id
    check_schedule(gen_length, block_length, steps)
    assert prompt.dim() == 2, f"prompt must be (batch, length) token ids, got {tuple(prompt.shape)}"
    assert remasking in ("low_confidence", "random") and cache in (None, "prefix"), \
        f"remasking {remasking!r}, cache {cache!r}"
    B, Lp = prompt.shape
    assert prompt_lens is None or (len(prompt_lens) == B and
                                   all(0 <= n <= Lp for n in prompt_lens)), \
        f"prompt_lens {list(prompt_lens)} for prompts of shape {(B, Lp)}"
    if bool((prompt == mask_id).any()):  # a tokenizer can encode the mask token's text
        raise ValueError(f"the prompt contains the mask token {mask_id}: no infilling, remove it")
    x = torch.full((B, Lp + gen_length), mask_id, dtype=torch.long, device=prompt.device)  # (B, L)
    x[:, :Lp] = prompt
    doc_lens = padding_doc_lens(prompt_lens, Lp, gen_length)
    if doc_lens is not None and cfg_scale > 0:
        doc_lens = doc_lens + doc_lens  # the unconditional copies are padded alike
    num_blocks = gen_length // block_length
    steps = steps // num_blocks  # per block
    for nb in range(num_blocks):
        block = slice(Lp + nb * block_length, Lp + (nb + 1) * block_length)
        num_transfer = get_num_transfer_tokens(x[:, block] == mask_id, steps)  # (B, steps)
        # Exact decoding recomputes the whole sequence every step; "prefix" is Fast-dLLM's
        # approximate cache of the prompt and the finished blocks, refreshed once per block.
        block_cache = PrefixCache(block.start) if cache == "prefix" else None
        for i in range(steps):
            logits = block_logits(model, x, block, Lp, cfg_scale, mask_id, doc_lens, block_cache)
            x0 = torch.argmax(add_gumbel_noise(logits, temperature, generator), dim=-1)  # (B, n)
            # Confidence: each prediction's probability (softmax in the logits' dtype), or a random
            # order drawn for the whole sequence; both as officially, so the picks are the same.
            if remasking == "low_confidence":
                x0_p = F.softmax(logits, dim=-1).gather(-1, x0[..., None]).squeeze(-1)  # (B, n)
            else:
                x0_p = torch.rand(x.shape, generator=generator,
                                  device=rng_device(generator, x.device)).to(x.device)[:, block]
            # Only still-masked positions of this block compete. The scores span the whole
            # sequence as in the official code, so topk sees the same input and resolves ties
            # between equal (bf16) scores the same way.
            confidence = torch.full(x.shape, -math.inf, dtype=x0_p.dtype, device=x.device)  # (B, L)
            confidence[:, block] = torch.where(x[:, block] == mask_id, x0_p, -math.inf)
            transfer = torch.zeros_like(x, dtype=torch.bool)  # (B, L)
            for j in range(B):
                transfer[j, confidence[j].topk(int(num_transfer[j, i])).indices] = True
            x[:, block] = torch.where(transfer[:, block], x0, x[:, block])
            if on_step is not None:  # e.g. a progress bar: long prompts take seconds a step
                on_step()
    return x


# ---------------------------------------------------------------------------------------------
# Likelihood: LLaDA's get_log_likelihood.py, and LongLLaDA's chunked perplexity.

def stratified_forward_process(seq: torch.Tensor, prompt_len: int, mask_id: int,
                               generator: torch.Generator | None = None
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """get_log_likelihood.py's forward process over b copies of one sequence (b, L).

    Row i masks exactly n_i of the A answer tokens; the counts are evenly spaced over 1..A from a
    random start (stratified, so one batch covers every noise level). The prompt is never
    masked. Returns the noisy rows (b, L), where they were masked (b, L), and p = n / A (b,).
    """
    b, L = seq.shape
    A = L - prompt_len  # answer length
    dev = rng_device(generator, seq.device)
    k = int(torch.randint(1, A + 1, (), generator=generator, device=dev))
    counts = torch.round(torch.linspace(float(k), k + (b - 1) * (A / b), steps=b)).long()
    counts = (counts - 1) % A + 1  # (b,) in 1..A
    is_mask = torch.arange(A)[None] < counts[:, None]  # (b, A): the first n_i, then shuffled
    for i in range(b):
        is_mask[i] = is_mask[i][torch.randperm(A, generator=generator, device=dev).cpu()]
    is_mask = torch.cat([torch.zeros(b, prompt_len, dtype=torch.bool), is_mask], 1).to(seq.device)
    return torch.where(is_mask, mask_id, seq), is_mask, (counts / A).to(seq.device)


@torch.no_grad()
def log_likelihood(model, prompt: torch.Tensor, answer: torch.Tensor, mc_num: int = 128,
                   batch_size: int = 16, cfg_scale: float = 0., mask_id: int | None = None,
                   generator: torch.Generator | None = None, chunk_size: int = 4096) -> float:
    """Lower bound on log p(answer | prompt), prompt (Lp,) and answer (A,) token ids.

    mc_num Monte Carlo draws in batches of batch_size; each batch scores
    sum over masked answer tokens of CE / p, divided by batch_size, and the result is minus the
    mean over batches. One draw is enough for single-token answers (multiple choice).
    """
    mask_id = model.config.mask_token_id if mask_id is None else mask_id
    assert mc_num >= batch_size and mc_num % batch_size == 0 and len(answer) > 0, \
        f"mc_num {mc_num}, a multiple of batch_size {batch_size}, draws of {len(answer)} tokens"
    seq = torch.cat([prompt, answer])[None].repeat(batch_size, 1)  # (b, L)
    Lp = len(prompt)
    head = model.head if cfg_scale == 0 else (lambda h: guided(*model.head(h).unbind(1), cfg_scale))
    losses = []
    for _ in range(mc_num // batch_size):
        noisy, is_mask, p = stratified_forward_process(seq, Lp, mask_id, generator)
        if cfg_scale == 0:
            hidden = model(noisy)[is_mask]  # (N, d)
        else:  # conditional and unconditional (prompt masked) rows, paired per masked token
            un = noisy.clone()
            un[:, :Lp] = mask_id
            h = model(torch.cat([noisy, un]))  # (2b, L, d)
            hidden = torch.stack([h[:batch_size][is_mask], h[batch_size:][is_mask]], 1)  # (N, 2, d)
        weights = (1 / p)[:, None].expand_as(is_mask)[is_mask]  # (N,)
        loss = masked_cross_entropy(head, hidden, seq[is_mask], weights, chunk_size) / batch_size
        losses.append(loss.item())
    return -sum(losses) / len(losses)


@torch.no_grad()
def chunk_nll(model, tokens: torch.Tensor, chunk_size: int = 64, draws: int = 8,
              mask_id: int | None = None, generator: torch.Generator | None = None,
              on_chunk=None) -> torch.Tensor:
    """LongLLaDA's per-token NLL (L / chunk_size - 1,) of each chunk of a long text (L,) after
    the first, given the text before it.

    As in LongLLaDA's get_ppl_llada.py, the first chunk is context only: scoring it with no
    context at all would count how hard a text's opening is, not how well the model uses a
    long context, and would inflate the perplexity of short texts. For chunk c >= 1 each of
    `draws` rows masks k ~ U{1..chunk_size} of the chunk's tokens; the input is everything
    before the chunk (clean) plus the chunk, never the text after it. The chunk's NLL is the
    mean over draws of (sum of CE at the masked tokens) / k.
    Cost: one forward of `draws` rows per chunk, each as long as the text up to the chunk's end,
    about draws * L^2 / (2 chunk_size) tokens in all: 2048 forwards averaging 64K tokens for a
    128K-token text. on_chunk() is called after each chunk (e.g. a progress bar's update).
    """
    mask_id = model.config.mask_token_id if mask_id is None else mask_id
    assert len(tokens) % chunk_size == 0 and len(tokens) >= 2 * chunk_size, \
        f"{len(tokens)} tokens are not two or more chunks of {chunk_size} (the first is context)"
    dev = rng_device(generator, tokens.device)
    nll = []
    for end in range(2 * chunk_size, len(tokens) + 1, chunk_size):
        seq = tokens[:end][None].repeat(draws, 1)  # (draws, end)
        k = torch.randint(1, chunk_size + 1, (draws,), generator=generator, device=dev)  # (draws,)
        # A random permutation per row; its k smallest entries mark k random positions.
        order = torch.rand((draws, chunk_size), generator=generator, device=dev).argsort(dim=1)
        is_mask = torch.zeros_like(seq, dtype=torch.bool)  # (draws, end)
        is_mask[:, end - chunk_size:] = (order < k[:, None]).to(seq.device)
        hidden = model(torch.where(is_mask, mask_id, seq))[is_mask]  # (N, d)
        weights = (1 / k.to(seq.device).float())[:, None].expand_as(is_mask)[is_mask]  # (N,)
        nll.append(masked_cross_entropy(model.head, hidden, seq[is_mask], weights) / draws)
        if on_chunk is not None:
            on_chunk()
    return torch.stack(nll).cpu()


def cumulative_perplexity(nll: torch.Tensor) -> torch.Tensor:
    """Perplexity of the text up to the end of each chunk: exp of the running mean NLL, (n,).

    With chunk_nll's output (chunk 0 is context only), entry c ends at position (c + 2) *
    chunk_size, for plotting perplexity against length.
    """
    return torch.exp(torch.cumsum(nll, 0) / torch.arange(1, len(nll) + 1))


# ---------------------------------------------------------------------------------------------
# A demo that needs nothing but this file, model.py, masks.py and rope.py: train a tiny model on
# counting sequences (3 4 5 6 ...) with the loss above, then let the sampler continue one.

def demo(steps: int = 300, seed: int = 0) -> None:
    from model import LLaDA, LLaDAConfig

    torch.manual_seed(seed)
    V, L = 16, 24  # token ids 0..15 are numbers mod 16; id 16 is [MASK]
    config = LLaDAConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, mlp_hidden_size=128,
                         vocab_size=V + 1, embedding_size=V + 1, mask_token_id=V,
                         eos_token_id=V, pad_token_id=V, max_sequence_length=L, rope_theta=1e4)
    model = LLaDA(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(steps):
        starts = torch.randint(0, V, (32, 1))
        batch = (starts + torch.arange(L)) % V  # (32, L): counting from a random number
        loss = diffusion_loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step:>4}  loss {loss.item():.3f}")
    model.eval()
    prompt = torch.tensor([[5, 6, 7, 8]])
    out = generate(model, prompt, steps=8, gen_length=8, block_length=8)
    print(f"prompt {prompt[0].tolist()} -> answer {out[0, 4:].tolist()} (counting on would be "
          f"{[n % V for n in range(9, 17)]})")
    nll = -log_likelihood(model, prompt[0], torch.tensor([9, 10, 11]), mc_num=32, batch_size=8)
    print(f"-log p(9 10 11 | 5 6 7 8) <= {nll:.3f} nats (Monte Carlo bound, 32 draws)")


if __name__ == "__main__":
    def natural(text: str) -> int:  # an argparse type: torch.manual_seed's range
        if not 0 <= int(text) < 2**63:
            raise argparse.ArgumentTypeError(f"must be in 0..2^63-1, got {text}")
        return int(text)

    p = argparse.ArgumentParser(description="Train a tiny masked-diffusion model on counting "
                                            "sequences, then sample from it (CPU, seconds).")
    p.error = lambda message: p.exit(2, f"error: {message}\n")  # one line, no usage block
    p.add_argument("--steps", type=natural, default=300, help="training steps (default 300)")
    p.add_argument("--seed", type=natural, default=0, help="seed of weights and data (default 0)")
    args = p.parse_args()
    demo(args.steps, args.seed)
