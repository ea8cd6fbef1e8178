"""Tests for diffusion.py: the loss, LLaDA's sampler (against a restatement of the official
generate.py), the prompt cache, and the likelihood estimates. Tiny or fake models, CPU only."""
import math
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from diffusion import (add_gumbel_noise, check_schedule, chunk_nll, cumulative_perplexity,
                       diffusion_loss, generate, get_num_transfer_tokens, log_likelihood,
                       masked_cross_entropy, sft_loss)
from model import LLaDA, preset
from scripts import one_line_error, script

V = 64  # a small vocabulary keeps the tiny model fast; the last two ids are [MASK] and EOS/pad
MASK, PAD = V - 1, V - 2


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: OpenMP hand-offs made this file 6x slower on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def left_pad(prompts: list, pad_id: int) -> tuple[torch.Tensor, list[int]]:
    """Prompts of different lengths -> (B, Lp) token ids padded on the left, and their lengths."""
    lens = [len(p) for p in prompts]
    batch = torch.full((len(prompts), max(lens)), pad_id, dtype=torch.long)  # (B, Lp)
    for b, p in enumerate(prompts):
        batch[b, batch.shape[1] - lens[b]:] = torch.as_tensor(p)
    return batch, lens


def tiny_model(n_layers=2, seed=0):
    """A random tiny LLaDA. init_std 0.1 (not 0.02) makes predictions depend strongly on the
    context, so a wrong position, pad or cache changes the tokens chosen."""
    torch.manual_seed(seed)
    cfg = preset("tiny", n_layers=n_layers, vocab_size=V, embedding_size=V, mask_token_id=MASK,
                 eos_token_id=PAD, pad_token_id=PAD, init_std=0.1)
    return LLaDA(cfg).eval()


class EmbeddingModel(nn.Module):
    """A context-free model: hidden = embedding of each token, logits = a linear map of it.
    Follows the PrefixCache protocol (a filled cache means input_ids start at cache.length) and
    records what forward and head were given."""

    def __init__(self, d=8):
        super().__init__()
        self.config = SimpleNamespace(mask_token_id=MASK, n_layers=1)
        self.wte = nn.Embedding(V, d)
        self.linear = nn.Linear(d, V, bias=False)
        self.calls, self.head_shapes = [], []

    def forward(self, input_ids, positions=None, doc_lens=None, cache=None):
        start = cache.length if cache is not None and cache.filled(1) else 0
        if cache is not None and not cache.filled(1):
            cache.kv.append(None)  # one layer, nothing to store
        self.calls.append(dict(input_ids=input_ids.clone(), positions=positions, doc_lens=doc_lens,
                               start=start))
        return self.wte(input_ids)

    def head(self, h):
        self.head_shapes.append(tuple(h.shape))
        return self.linear(h)


class ConstantModel(nn.Module):
    """Predicts the same distribution q at every position, whatever the input; records inputs."""

    def __init__(self, q):
        super().__init__()
        self.config = SimpleNamespace(mask_token_id=MASK, n_layers=1)
        self.log_q = torch.log(q)
        self.inputs = []

    def forward(self, input_ids, positions=None, doc_lens=None, cache=None):
        self.inputs.append(input_ids.clone())
        return torch.zeros(*input_ids.shape, 1)

    def head(self, h):
        return self.log_q.expand(*h.shape[:-1], V)


# ---------------------------------------------------------------------------------------------
# Loss

def replay(seed, B, L):
    """The forward process's draws for Generator(seed): t first, then one coin per token, and p."""
    g = torch.Generator().manual_seed(seed)
    t, coins = torch.rand(B, generator=g), torch.rand((B, L), generator=g)
    return coins, (1 - 1e-3) * t + 1e-3


def test_loss_equals_hand_computation_and_passes_the_layout():
    torch.manual_seed(0)
    model = EmbeddingModel()
    x = torch.randint(0, V - 2, (3, 8))
    doc_lens, positions = [[2, 6], [8], [8]], torch.arange(8)[None]
    loss = diffusion_loss(model, x, torch.Generator().manual_seed(2), doc_lens, positions)
    coins, p = replay(2, 3, 8)
    log_probs = F.log_softmax(model.head(model.wte.weight[MASK]).detach().double(), -1)
    masked = coins < p[:, None]
    assert masked.sum() == 14  # this seed masks 6, 2 and 6 tokens: the sum is not empty
    expected = sum(-float(log_probs[x[b, i]]) / float(p[b]) for b, i in masked.nonzero())
    assert math.isclose(loss.item(), expected / 24, rel_tol=1e-6)
    assert torch.equal(model.calls[0]["input_ids"] == MASK, masked)
    assert model.calls[0]["doc_lens"] == doc_lens and model.calls[0]["positions"] is positions


def test_sft_loss_never_masks_the_prompt_and_normalises_by_answer_length():
    torch.manual_seed(0)
    model = EmbeddingModel()
    x = torch.randint(0, V - 2, (3, 10))
    prompt_lens = [4, 7, 2]
    loss = sft_loss(model, x, prompt_lens, torch.Generator().manual_seed(5))
    coins, p = replay(5, 3, 10)
    log_probs = F.log_softmax(model.head(model.wte.weight[MASK]).detach().double(), -1)
    # the answer is masked where the coins say so, exactly as in pre-training; the prompt never
    is_answer = torch.arange(10)[None] >= torch.tensor(prompt_lens)[:, None]
    masked = (coins < p[:, None]) & is_answer
    assert torch.equal(model.calls[0]["input_ids"] == MASK, masked) and masked.any()
    assert torch.equal(model.calls[0]["input_ids"][~masked], x[~masked])
    expected = sum(-float(log_probs[x[b, i]]) / float(p[b]) / (10 - prompt_lens[b])
                   for b, i in masked.nonzero())
    assert math.isclose(loss.item(), expected / 3, rel_tol=1e-6)


def test_chunked_cross_entropy_equals_unchunked_and_bounds_the_logits():
    """The head never sees more than chunk_size rows, and runs again per chunk in backward
    (checkpointing), so the logits of all rows never exist at once; the result is the same."""
    torch.manual_seed(0)
    linear, rows = nn.Linear(16, V, bias=False), []

    def head(h):
        rows.append(h.shape[0])
        return linear(h)

    def loss_and_grads(hidden, targets, weights, chunk_size):
        hidden = hidden.clone().requires_grad_()
        linear.zero_grad()
        loss = masked_cross_entropy(head, hidden, targets, weights, chunk_size)
        loss.backward()
        return loss.detach(), hidden.grad, linear.weight.grad.clone()

    hidden, targets, weights = torch.randn(23, 16), torch.randint(0, V, (23,)), torch.rand(23) + 0.5
    ref = (F.cross_entropy(linear(hidden), targets, reduction="none") * weights).sum()
    full = loss_and_grads(hidden, targets, weights, 1000)
    assert torch.allclose(full[0], ref.detach(), rtol=1e-6)
    for chunk_size in (1, 5, 23):
        rows.clear()
        for a, b in zip(loss_and_grads(hidden, targets, weights, chunk_size), full):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
        n = math.ceil(23 / chunk_size)  # forward, then again in reverse order for backward
        assert max(rows) == min(chunk_size, 23) and len(rows) == 2 * n
    # with nothing masked the loss is 0 and still differentiable (the head runs on no rows)
    loss, _, grad = loss_and_grads(torch.zeros(0, 16), torch.zeros(0, dtype=torch.long),
                                   torch.zeros(0), 4)
    assert loss.item() == 0 and torch.equal(grad, torch.zeros_like(grad))


# ---------------------------------------------------------------------------------------------
# The official sampler, restated: ML-GSAI/LLaDA generate.py at b7e6c35, on full logits. Only
# three things are adapted: logits come from model.logits, the attention_mask becomes doc_lens
# (what the official model does with it: pad keys hidden), and torch.rand takes a generator.

def hf_logits(model, x, attention_mask=None):
    doc_lens = None
    if attention_mask is not None and 0 in attention_mask:
        L = x.shape[1]
        doc_lens = [[n, L - n] if n else [L] for n in (attention_mask == 0).sum(1).tolist()]
    return model.logits(x, doc_lens=doc_lens)


def official_add_gumbel_noise(logits, temperature):
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64)
    noise = torch.rand_like(logits, dtype=torch.float64)
    gumbel_noise = (- torch.log(noise)) ** temperature
    return logits.exp() / gumbel_noise


def official_get_num_transfer_tokens(mask_index, steps):
    mask_num = mask_index.sum(dim=1, keepdim=True)
    base = mask_num // steps
    remainder = mask_num % steps
    num_transfer_tokens = torch.zeros(mask_num.size(0), steps, device=mask_index.device, dtype=torch.int64) + base
    for i in range(mask_num.size(0)):
        num_transfer_tokens[i, :remainder[i]] += 1
    return num_transfer_tokens


@torch.no_grad()
def official_generate(model, prompt, attention_mask=None, steps=128, gen_length=128, block_length=128,
                      temperature=0., cfg_scale=0., remasking='low_confidence', mask_id=126336,
                      generator=None):
    x = torch.full((prompt.shape[0], prompt.shape[1] + gen_length), mask_id, dtype=torch.long).to(prompt.device)
    x[:, :prompt.shape[1]] = prompt.clone()
    if attention_mask is not None:
        attention_mask = torch.cat([attention_mask, torch.ones((prompt.shape[0], gen_length), dtype=attention_mask.dtype)], dim=-1)
    prompt_index = (x != mask_id)
    assert gen_length % block_length == 0
    num_blocks = gen_length // block_length
    assert steps % num_blocks == 0
    steps = steps // num_blocks
    for num_block in range(num_blocks):
        block_mask_index = (x[:, prompt.shape[1] + num_block * block_length: prompt.shape[1] + (num_block + 1) * block_length:] == mask_id)
        num_transfer_tokens = official_get_num_transfer_tokens(block_mask_index, steps)
        for i in range(steps):
            mask_index = (x == mask_id)
            if cfg_scale > 0.:
                un_x = x.clone()
                un_x[prompt_index] = mask_id
                x_ = torch.cat([x, un_x], dim=0)
                attention_mask_ = None if attention_mask is None else torch.cat([attention_mask, attention_mask], dim=0)
                logits = hf_logits(model, x_, attention_mask_)
                logits, un_logits = torch.chunk(logits, 2, dim=0)
                logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
            else:
                logits = hf_logits(model, x, attention_mask)
            logits_with_noise = official_add_gumbel_noise(logits, temperature=temperature)
            x0 = torch.argmax(logits_with_noise, dim=-1)  # b, l
            if remasking == 'low_confidence':
                p = F.softmax(logits, dim=-1)
                x0_p = torch.squeeze(torch.gather(p, dim=-1, index=torch.unsqueeze(x0, -1)), -1)  # b, l
            elif remasking == 'random':
                x0_p = torch.rand((x0.shape[0], x0.shape[1]), device=x0.device, generator=generator)
            else:
                raise NotImplementedError(remasking)
            x0_p[:, prompt.shape[1] + (num_block + 1) * block_length:] = -np.inf
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -np.inf)
            transfer_index = torch.zeros_like(x0, dtype=torch.bool, device=x0.device)
            for j in range(confidence.shape[0]):
                _, select_index = torch.topk(confidence[j], k=num_transfer_tokens[j, i])
                transfer_index[j, select_index] = True
            x[transfer_index] = x0[transfer_index]
    return x


CONFIGS = [  # steps, gen_length, block_length, cfg_scale, remasking
    (8, 16, 8, 0.0, "low_confidence"),    # two blocks, 2 tokens a step
    (9, 12, 4, 0.0, "low_confidence"),    # three blocks of 4 tokens in 3 steps: 2, 1, 1
    (4, 10, 10, 0.0, "low_confidence"),   # one block, 10 tokens in 4 steps: 3, 3, 2, 2
    (6, 12, 6, 1.5, "low_confidence"),    # classifier-free guidance
    (6, 12, 6, 0.0, "random"),            # random order, same generator seed
    (4, 8, 8, 0.5, "random"),
]


def check_equals_official(model, steps, gen_length, block_length, cfg_scale, remasking):
    prompt = torch.randint(0, V - 2, (2, 7), generator=torch.Generator().manual_seed(1))
    kw = dict(steps=steps, gen_length=gen_length, block_length=block_length, cfg_scale=cfg_scale,
              remasking=remasking)
    ours = generate(model, prompt, generator=torch.Generator().manual_seed(5), **kw)
    theirs = official_generate(model, prompt, mask_id=MASK, generator=torch.Generator().manual_seed(5), **kw)
    assert torch.equal(ours, theirs)
    return ours


@pytest.mark.parametrize("steps,gen_length,block_length,cfg_scale,remasking", CONFIGS)
def test_generate_equals_official(steps, gen_length, block_length, cfg_scale, remasking):
    ours = check_equals_official(tiny_model(), steps, gen_length, block_length, cfg_scale, remasking)
    assert (ours[:, 7:] != MASK).all()  # every mask filled (not asked of bf16 below: a random
    #                                     bf16 model can predict [MASK] itself, officially too)


@pytest.mark.parametrize("cfg_scale", [0.0, 1.0])
def test_generate_equals_official_in_bfloat16(cfg_scale):
    """bf16 confidences are coarse (the softmax stays in the logits' dtype, as officially) and
    often tie; the tokens must still be the official ones."""
    check_equals_official(tiny_model().to(torch.bfloat16), 8, 16, 8, cfg_scale, "low_confidence")


@pytest.mark.parametrize("cfg_scale", [0.0, 1.0])
def test_padded_batch_equals_official_and_each_prompt_alone(cfg_scale):
    model = tiny_model()
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, V - 2, (n,), generator=g) for n in (9, 4, 6)]
    batch, lens = left_pad(prompts, PAD)
    kw = dict(steps=8, gen_length=12, block_length=6, cfg_scale=cfg_scale)
    ours = generate(model, batch, prompt_lens=lens, **kw)
    assert torch.equal(ours[:, :9], batch)  # the padding and the prompts never change
    attention_mask = (torch.arange(9)[None] >= 9 - torch.tensor(lens)[:, None]).long()
    assert torch.equal(ours, official_generate(model, batch, attention_mask, mask_id=MASK, **kw))
    for b, p in enumerate(prompts):
        alone = generate(model, p[None], **kw)
        assert torch.equal(ours[b, 9 - len(p):], alone[0])


def test_padding_does_change_the_answer_when_not_masked():
    """The equality above is not vacuous: without prompt_lens the pads are attended to and the
    tiny model answers differently."""
    model = tiny_model()
    batch, lens = left_pad([torch.arange(9), torch.arange(4)], PAD)
    kw = dict(steps=8, gen_length=12, block_length=6)
    alone = generate(model, batch[1:, 5:], **kw)[0]
    assert torch.equal(generate(model, batch, prompt_lens=lens, **kw)[1, 5:], alone)
    assert not torch.equal(generate(model, batch, **kw)[1, 5:], alone)


def test_prefix_cache_follows_protocol_and_equals_exact_when_the_model_is_context_free():
    torch.manual_seed(1)
    model = EmbeddingModel()
    prompt = torch.randint(0, V - 2, (1, 6))
    kw = dict(steps=6, gen_length=12, block_length=4)
    exact = generate(model, prompt, **kw)
    model.calls.clear()
    assert torch.equal(generate(model, prompt, cache="prefix", **kw), exact)
    # Per block of 2 steps: one full forward that fills the cache, then the suffix only.
    assert [c["start"] for c in model.calls] == [0, 6, 0, 10, 0, 14]
    assert all(c["input_ids"].shape[1] == 18 - c["start"] for c in model.calls)
    assert all(shape[1] == 4 for shape in model.head_shapes)  # logits of the block only


@pytest.mark.parametrize("cfg_scale", [0.0, 2.0])
def test_prefix_cache_is_exact_for_one_layer_and_fills_every_mask_with_two(cfg_scale):
    """With one layer the prompt's keys and values depend on the prompt's tokens only, so the
    cache is no approximation there: cached decoding must equal exact decoding."""
    model = tiny_model(n_layers=1)
    g = torch.Generator().manual_seed(3)
    batch, lens = left_pad([torch.randint(0, V - 2, (n,), generator=g) for n in (8, 5)], PAD)
    kw = dict(steps=8, gen_length=16, block_length=4, cfg_scale=cfg_scale, prompt_lens=lens)
    assert torch.equal(generate(model, batch, cache="prefix", **kw), generate(model, batch, **kw))
    out = generate(tiny_model(n_layers=2), batch, cache="prefix", **kw)  # approximate
    assert out.shape == (2, 24) and torch.equal(out[:, :8], batch) and not (out == MASK).any()


def test_num_transfer_tokens_matches_official():
    mask = torch.rand(4, 13, generator=torch.Generator().manual_seed(0)) < 0.7
    for steps in (1, 3, 5, 13, 20):
        ours = get_num_transfer_tokens(mask, steps)
        assert torch.equal(ours, official_get_num_transfer_tokens(mask, steps))
        assert torch.equal(ours.sum(1), mask.sum(1))


def test_gumbel_noise_samples_softmax_over_temperature():
    logits = torch.tensor([1.0, 0.0, -1.0, 0.5])
    assert add_gumbel_noise(logits, 0.0) is logits
    T, n = 0.7, 40000
    noisy = add_gumbel_noise(logits.expand(n, 4), T, torch.Generator().manual_seed(0))
    assert noisy.dtype == torch.float64
    freq = torch.bincount(noisy.argmax(-1), minlength=4).double() / n
    assert torch.allclose(freq, torch.softmax(logits.double() / T, 0), atol=0.01)


def test_generate_checks_its_arguments_before_any_forward():
    """The schedule rule is check_schedule's ValueError; a prompt holding the mask token is a
    ValueError too (a tokenizer can produce it); the rest are a programmer's assertions."""
    check_schedule(gen_length=12, block_length=4, steps=9)  # 3 blocks of 3 steps
    model = EmbeddingModel()
    for kw, error, message in [
        (dict(gen_length=10, block_length=4), ValueError,
         "gen_length 10 must be a positive multiple of block_length 4"),
        (dict(block_length=0), ValueError, "gen_length 8 must be a positive multiple of block_length 0"),
        (dict(steps=5, block_length=4), ValueError, "steps 5 must be a positive multiple of the "
                                                    "number of blocks 2 (gen_length / block_length)"),
        (dict(steps=0), ValueError, "steps 0 must be a positive multiple of the number of blocks 1"),
        (dict(prompt=torch.full((1, 3), MASK)), ValueError, f"contains the mask token {MASK}"),
        (dict(remasking="entropy"), AssertionError, "remasking 'entropy'"),
        (dict(cache="kv"), AssertionError, "cache 'kv'"),
        (dict(prompt_lens=[3]), AssertionError, "prompt_lens [3] for prompts of shape (2, 3)"),
        (dict(prompt_lens=[3, 4]), AssertionError, "prompt_lens [3, 4]"),
        (dict(prompt=torch.zeros(3, dtype=torch.long)), AssertionError,
         "(batch, length) token ids, got (3,)"),
    ]:
        args = dict(prompt=torch.zeros(2, 3, dtype=torch.long), steps=4, gen_length=8,
                    block_length=8) | kw
        with pytest.raises(error, match=re.escape(message)):
            generate(model, **args)
    assert model.calls == []


# ---------------------------------------------------------------------------------------------
# Likelihood

def official_forward_process(batch, prompt_index, mask_id, generator):
    """get_log_likelihood.py's forward_process, with a generator."""
    b, l = batch.shape
    target_len = (l - prompt_index.sum()).item()
    k = torch.randint(1, target_len + 1, (), device=batch.device, generator=generator)
    x = torch.round(torch.linspace(float(k), k + (b - 1) * (target_len / b), steps=b, device=batch.device)).long()
    x = ((x - 1) % target_len) + 1
    assert x.min() >= 1 and x.max() <= target_len
    indices = torch.arange(target_len, device=batch.device).repeat(b, 1)
    is_mask = indices < x.unsqueeze(1)
    for i in range(b):
        is_mask[i] = is_mask[i][torch.randperm(target_len, generator=generator)]
    is_mask = torch.cat((torch.zeros(b, prompt_index.sum(), dtype=torch.bool, device=batch.device), is_mask), dim=1)
    noisy_batch = torch.where(is_mask, mask_id, batch)
    return noisy_batch, (x / target_len).unsqueeze(1).repeat(1, l)


@torch.no_grad()
def official_get_log_likelihood(model, prompt, answer, mc_num, batch_size, cfg_scale, mask_id, generator):
    seq = torch.concatenate([prompt, answer])[None, :]
    seq = seq.repeat((batch_size, 1))
    prompt_index = torch.arange(seq.shape[1]) < len(prompt)
    loss_ = []
    for _ in range(mc_num // batch_size):
        perturbed_seq, p_mask = official_forward_process(seq, prompt_index, mask_id, generator)
        mask_index = perturbed_seq == mask_id
        if cfg_scale > 0.:
            un_batch = perturbed_seq.clone()
            un_batch[:, prompt_index] = mask_id
            logits = model.logits(torch.cat([perturbed_seq, un_batch]))
            logits, un_logits = torch.chunk(logits, 2, dim=0)
            logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
        else:
            logits = model.logits(perturbed_seq)
        loss = F.cross_entropy(logits[mask_index], seq[mask_index], reduction='none') / p_mask[mask_index]
        loss = loss.sum() / batch_size
        loss_.append(loss.item())
    return - sum(loss_) / len(loss_)


@pytest.mark.parametrize("cfg_scale", [0.0, 0.5])
def test_log_likelihood_equals_official(cfg_scale):
    model = tiny_model()
    prompt, answer = torch.randint(0, V - 2, (6,)), torch.randint(0, V - 2, (5,))
    ours = log_likelihood(model, prompt, answer, mc_num=16, batch_size=4, cfg_scale=cfg_scale,
                          generator=torch.Generator().manual_seed(7), chunk_size=7)
    theirs = official_get_log_likelihood(model, prompt, answer, 16, 4, cfg_scale, MASK,
                                         torch.Generator().manual_seed(7))
    assert math.isclose(ours, theirs, rel_tol=1e-5)


def test_log_likelihood_of_a_fixed_distribution_is_exact():
    q = torch.softmax(torch.randn(V, generator=torch.Generator().manual_seed(0)), 0)
    model = ConstantModel(q)
    prompt = torch.randint(0, V - 2, (5,))
    same = torch.full((7,), 3)  # every masked token costs the same: each draw is exact
    ll = log_likelihood(model, prompt, same, mc_num=8, batch_size=4, generator=torch.Generator().manual_seed(0))
    assert math.isclose(ll, 7 * math.log(q[3]), rel_tol=1e-5)
    answer = torch.randint(0, V - 2, (12,), generator=torch.Generator().manual_seed(1))
    exact = float(torch.log(q[answer]).sum())
    ll = log_likelihood(model, prompt, answer, mc_num=2048, batch_size=32,
                        generator=torch.Generator().manual_seed(0))
    assert abs(ll - exact) < 0.01 * abs(exact)
    with pytest.raises(AssertionError, match="mc_num 10, a multiple of batch_size 4"):
        log_likelihood(model, prompt, answer, mc_num=10, batch_size=4)


def test_chunk_nll_scores_each_chunk_after_the_first_given_the_text_before_it():
    q = torch.softmax(torch.randn(V, generator=torch.Generator().manual_seed(0)), 0)
    model = ConstantModel(q)
    tokens = torch.randint(0, V - 2, (48,), generator=torch.Generator().manual_seed(1))
    nll = chunk_nll(model, tokens, chunk_size=16, draws=8, generator=torch.Generator().manual_seed(0))
    assert [x.shape for x in model.inputs] == [(8, 32), (8, 48)]  # the first chunk is context
    ks = []
    for c, x in enumerate(model.inputs, 1):
        end = 16 * (c + 1)
        assert torch.equal(x[:, :end - 16], tokens[:end - 16].expand(8, -1))  # clean context
        masked = x[:, end - 16:] == MASK
        assert torch.equal(x[:, end - 16:][~masked], tokens[end - 16:end].expand(8, -1)[~masked])
        ks += masked.sum(1).tolist()
        # each draw's mean CE over its k masked tokens, averaged over the draws
        chunk = tokens[end - 16:end]
        per_draw = [float(-torch.log(q[chunk[row]]).mean()) for row in masked]
        assert math.isclose(float(nll[c - 1]), sum(per_draw) / 8, rel_tol=1e-5)
    assert min(ks) >= 1 and max(ks) <= 16 and len(set(ks)) > 3
    # one token repeated per chunk makes every draw exact: the perplexity of the text after the
    # first chunk is its own
    tokens = torch.tensor([3, 17, 3, 40, 9]).repeat_interleave(16)
    ppl = cumulative_perplexity(chunk_nll(model, tokens, chunk_size=16, draws=4))
    assert math.isclose(float(ppl[-1]), math.exp(-float(torch.log(q[tokens[16:]]).mean())),
                        rel_tol=1e-5)
    for n in (40, 16):  # not whole chunks; one chunk, context only
        with pytest.raises(AssertionError, match=f"{n} tokens are not two or more chunks of 16"):
            chunk_nll(model, tokens[:n], chunk_size=16)


def test_diffusion_cli_answers_bad_input_in_one_line():
    for args, fragment in [(["--steps", "-1"], "argument --steps: must be in 0..2^63-1, got -1"),
                           (["--seed", str(2**63)], "argument --seed: must be in 0..2^63-1, got 92")]:
        r = script("diffusion.py", *args)
        one_line_error(r, fragment)
        assert "usage:" not in r.stderr and r.stdout == ""
