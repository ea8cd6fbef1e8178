import pytest
import torch
import torch.nn.functional as F

import model as model_py
from model import LLaDA, PrefixCache, num_params, preset
from scripts import one_line_error, script


def small_config(**kw):
    base = dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, mlp_hidden_size=96,
                vocab_size=300, embedding_size=320, mask_token_id=299, eos_token_id=298,
                pad_token_id=298, max_sequence_length=128)
    return preset("tiny", **{**base, **kw})


@pytest.fixture
def net():
    torch.manual_seed(0)
    return LLaDA(small_config())


def ids(B=2, L=24, seed=0, high=298):
    return torch.randint(0, high, (B, L), generator=torch.Generator().manual_seed(seed))


def reference_logits(sd, cfg, input_ids):
    """LLaDA's forward as the official modeling code writes it: (B, H, T, D) layout, RoPE tables
    for 0..T-1 built from `1 / theta^(arange/dim)`, q and k rotated in float32, RMSNorm cast
    back before the weight multiply, SDPA with is_causal=False, SwiGLU = silu(ff_proj) * up_proj."""
    def rms(x, w):
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps)
        return w * x32.to(x.dtype)

    def rotate_half(x):
        B, nh, T, hs = x.size()
        x1, x2 = x.view(B, nh, T, 2, hs // 2).unbind(dim=-2)
        return torch.cat((-x2, x1), dim=-1)

    p = "model.transformer."
    B, T = input_ids.shape
    hs = cfg.d_model // cfg.n_heads
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hs, 2, dtype=torch.float) / hs))
    freqs = torch.einsum("i , j -> i j", torch.arange(T, dtype=torch.float), inv_freq)
    pos = torch.cat((freqs, freqs), dim=-1)
    sin, cos = pos.sin()[None, None], pos.cos()[None, None]
    x = F.embedding(input_ids, sd[p + "wte.weight"])
    for i in range(cfg.n_layers):
        b = f"{p}blocks.{i}."
        h = rms(x, sd[b + "attn_norm.weight"])
        q, k, v = (F.linear(h, sd[b + n + ".weight"]).view(B, T, cfg.n_heads, hs).transpose(1, 2)
                   for n in ("q_proj", "k_proj", "v_proj"))
        q_, k_ = q.float(), k.float()
        q_ = (q_ * cos) + (rotate_half(q_) * sin)
        k_ = (k_ * cos) + (rotate_half(k_) * sin)
        q, k = q_.type_as(q), k_.type_as(k)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False)
        att = att.transpose(1, 2).contiguous().view(B, T, cfg.d_model)
        x = x + F.linear(att, sd[b + "attn_out.weight"])
        h = rms(x, sd[b + "ff_norm.weight"])
        h = F.silu(F.linear(h, sd[b + "ff_proj.weight"])) * F.linear(h, sd[b + "up_proj.weight"])
        x = x + F.linear(h, sd[b + "ff_out.weight"])
    x = rms(x, sd[p + "ln_f.weight"])
    return F.linear(x, sd[p + "ff_out.weight"])


def test_state_dict_keys_are_the_official_names(net):
    keys = set(net.state_dict())
    expected = {f"model.transformer.{n}.weight" for n in ("wte", "ln_f", "ff_out")}
    for i in range(2):
        expected |= {f"model.transformer.blocks.{i}.{n}.weight" for n in (
            "attn_norm", "q_proj", "k_proj", "v_proj", "attn_out", "ff_norm", "ff_proj",
            "up_proj", "ff_out")}
    assert keys == expected
    assert net.state_dict()["model.transformer.blocks.0.ff_proj.weight"].shape == (96, 64)
    assert net.state_dict()["model.transformer.blocks.0.ff_out.weight"].shape == (64, 96)


def test_matches_the_official_arithmetic(net):
    x = ids()
    with torch.no_grad():
        ours = net.logits(x)
        ref = reference_logits(net.state_dict(), net.config, x)
    assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-5)


def test_matches_the_official_arithmetic_in_bf16(net):
    net = net.to(torch.bfloat16)
    x = ids()
    with torch.no_grad():
        ours, ref = net.logits(x), reference_logits(net.state_dict(), net.config, x)
    assert ours.dtype == torch.bfloat16
    assert (ours.float() - ref.float()).abs().max() < 0.05


def test_gradients_reach_every_parameter(net):
    x = ids(high=320)
    net.logits(x).logsumexp(-1).sum().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_head_on_a_subset_equals_full_logits_and_float32_is_deterministic(net):
    x = ids()
    with torch.no_grad():
        h = net(x)
        full = net.head(h)
        where = torch.tensor([[0, 5], [3, 23]])
        part = net.head(h[torch.arange(2)[:, None], where])
        assert torch.equal(net.logits(x), full)
    assert torch.allclose(part, full[torch.arange(2)[:, None], where])


def test_prefix_cache_is_exact_until_the_suffix_changes_then_approximates():
    """Running the unchanged suffix against a freshly filled cache is exact, at any depth. With a
    single layer the prompt's keys depend on the prompt alone, so it stays exact after the suffix
    changes; deeper models only approximate, though closer than ignoring the change."""
    x = ids(2, 30)
    y = x.clone()
    y[:, 18:] = 5  # the suffix changes after the cache was filled
    for n_layers in (1, 2):
        torch.manual_seed(0)
        net = LLaDA(small_config(n_layers=n_layers))
        with torch.no_grad():
            full, cache = net(x), PrefixCache(18)
            net(x, cache=cache)
            assert torch.allclose(net(x[:, 18:], cache=cache), full[:, 18:], atol=1e-5)
            part, exact = net(y[:, 18:], cache=cache), net(y)[:, 18:]
        assert not torch.allclose(full[:, 18:], exact, atol=1e-4)  # the change reaches the output
        if n_layers == 1:
            assert torch.allclose(part, exact, atol=1e-5)
        else:  # stale prompt keys: an approximation
            assert not torch.allclose(part, exact, atol=1e-4)
            assert (part - exact).abs().mean() < (full[:, 18:] - exact).abs().mean()


def test_cli_describes_the_8b_model_without_allocating_and_refuses_bad_input(capsys):
    model_py.main(["--preset", "llada-8b"])
    out = capsys.readouterr().out
    assert num_params(preset("llada-8b")) == 8_015_581_184
    assert "8,015,581,184" in out and "14.93 GiB" in out
    for args, fragment in [
        (["--preset", " tiny"], "argument --preset: invalid choice: ' tiny'"),  # a stray space
        (["--size", "8b"], "unrecognized arguments: --size 8b"),
    ]:
        r = script("model.py", *args)
        one_line_error(r, fragment)
        assert "usage:" not in r.stderr and r.stdout == ""


def test_presets_are_copies_and_other_layouts_are_refused():
    a, b = preset("tiny"), preset("tiny", n_layers=3)
    a.extra["x"] = 1
    assert b.n_layers == 3 and b.extra == {} == model_py.PRESETS["tiny"].extra
    for layout in (dict(include_bias=True), dict(weight_tying=True), dict(n_kv_heads=1)):
        with pytest.raises(AssertionError):  # harness/checkpoint.py refuses such a config.json
            LLaDA(small_config(**layout))


@pytest.mark.parametrize("doc_lens", [None, [[7, 20, 13], [40]]])
def test_inference_in_token_slices_equals_the_whole_sequence(net, monkeypatch, doc_lens):
    # Without gradients, long inputs run everything but attention a slice of tokens at a time;
    # slices of 16 tokens here (one of them partial) must give the logits of the plain path.
    x = ids(2, 40)
    whole = net.logits(x, doc_lens=doc_lens).detach()  # gradients on: never sliced
    monkeypatch.setattr(model_py, "TOKEN_SLICE", 16)
    with torch.no_grad():
        sliced = net.logits(x, doc_lens=doc_lens)
    assert torch.allclose(sliced, whole, atol=1e-6, rtol=1e-6)
