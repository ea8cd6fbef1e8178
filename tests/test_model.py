import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import model as model_py
from model import (CheckpointError, LLaDA, PrefixCache, from_pretrained, num_params, preset,
                   save_pretrained)


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


def test_llada_8b_parameter_count():
    assert num_params(preset("llada-8b")) == 8_015_581_184


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


def test_float32_numerics_are_deterministic(net):
    x = ids()
    with torch.no_grad():
        assert torch.equal(net.logits(x), net.logits(x))


def test_gradients_reach_every_parameter(net):
    x = ids(high=320)
    net.logits(x).logsumexp(-1).sum().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_head_on_a_subset_equals_full_logits(net):
    x = ids()
    with torch.no_grad():
        h = net(x)
        full = net.head(h)
        where = torch.tensor([[0, 5], [3, 23]])
        part = net.head(h[torch.arange(2)[:, None], where])
    assert torch.allclose(part, full[torch.arange(2)[:, None], where])


@pytest.mark.parametrize("shard_bytes,dtype", [(10**12, torch.float32), (200_000, torch.float32),
                                               (200_000, torch.bfloat16)])
def test_save_load_round_trip(tmp_path, net, shard_bytes, dtype):
    net = net.to(dtype)
    path = tmp_path / "ckpt"
    save_pretrained(str(path), net.config, net.state_dict(), max_shard_bytes=shard_bytes)
    files = sorted(os.listdir(path))
    if shard_bytes < 10**9:
        assert "model.safetensors.index.json" in files and len([f for f in files if f.startswith("model-")]) >= 2
    else:
        assert files == ["config.json", "model.safetensors"]
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == "llada" and cfg["architectures"] == ["LLaDAModelLM"]
    assert cfg["torch_dtype"] == str(dtype).removeprefix("torch.")
    loaded = from_pretrained(str(path))
    assert next(loaded.parameters()).dtype == dtype
    for k, v in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    x = ids()
    with torch.no_grad():
        assert torch.equal(loaded.logits(x), net.logits(x))


def test_loads_an_official_layout_directory(tmp_path, net):
    """A directory as Hugging Face hosts it: the official config keys and shard names."""
    sd = {k: v.to(torch.bfloat16) for k, v in net.state_dict().items()}
    keys = sorted(sd)
    half = len(keys) // 2
    shards = {"model-00001-of-00002.safetensors": keys[:half],
              "model-00002-of-00002.safetensors": keys[half:]}
    for name, ks in shards.items():
        save_file({k: sd[k].contiguous() for k in ks}, str(tmp_path / name), metadata={"format": "pt"})
    index = {"metadata": {"total_size": 0}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    c = net.config
    official = {"activation_type": "silu", "alibi": False, "architectures": ["LLaDAModelLM"],
                "block_type": "llama", "d_model": c.d_model, "n_heads": c.n_heads,
                "n_kv_heads": c.n_kv_heads, "n_layers": c.n_layers, "mlp_ratio": 4,
                "mlp_hidden_size": c.mlp_hidden_size, "vocab_size": c.vocab_size,
                "embedding_size": c.embedding_size, "rope_theta": 500000.0,
                "rms_norm_eps": 1e-05, "max_sequence_length": 4096, "include_bias": False,
                "weight_tying": False, "mask_token_id": 299, "eos_token_id": 298,
                "pad_token_id": 298, "model_type": "llada", "rope": True, "use_cache": False,
                "transformers_version": "4.46.3"}
    (tmp_path / "config.json").write_text(json.dumps(official))
    loaded = from_pretrained(str(tmp_path), dtype=torch.float32)
    assert loaded.config.extra["transformers_version"] == "4.46.3"
    x = ids()
    with torch.no_grad():
        ref = reference_logits({k: v.float() for k, v in sd.items()}, loaded.config, x)
        assert torch.allclose(loaded.logits(x), ref, atol=1e-5)
    # saving it again keeps the keys the official code reads
    save_pretrained(str(tmp_path / "again"), loaded.config, loaded.state_dict())
    again = json.loads((tmp_path / "again" / "config.json").read_text())
    assert set(official) <= set(again) and again["transformers_version"] == "4.46.3"


def test_clear_errors(tmp_path, net):
    with pytest.raises(CheckpointError, match="does not exist"):
        from_pretrained(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="has no config.json"):
        from_pretrained(str(tmp_path / "empty"))
    good = tmp_path / "good"
    save_pretrained(str(good), net.config, net.state_dict())

    sd = dict(net.state_dict())
    del sd["model.transformer.blocks.1.up_proj.weight"]
    save_pretrained(str(tmp_path / "missing"), net.config, sd)
    with pytest.raises(CheckpointError, match=r"missing tensor: model\.transformer\.blocks\.1\.up_proj\.weight"):
        from_pretrained(str(tmp_path / "missing"))

    sd = dict(net.state_dict())
    sd["model.transformer.ln_f.weight"] = torch.ones(65)
    save_pretrained(str(tmp_path / "shape"), net.config, sd)
    with pytest.raises(CheckpointError, match=r"ln_f\.weight is \(65,\), expected \(64,\)"):
        from_pretrained(str(tmp_path / "shape"))

    sd = {**net.state_dict(), "model.transformer.extra.weight": torch.ones(2)}
    save_pretrained(str(tmp_path / "extra"), net.config, sd)
    with pytest.raises(CheckpointError, match="unexpected tensor: model.transformer.extra.weight"):
        from_pretrained(str(tmp_path / "extra"))

    save_pretrained(str(tmp_path / "sharded"), net.config, net.state_dict(), max_shard_bytes=200_000)
    second = sorted(f for f in os.listdir(tmp_path / "sharded") if f.startswith("model-"))[1]
    os.remove(tmp_path / "sharded" / second)
    with pytest.raises(CheckpointError, match=f"incomplete: missing {second}"):
        from_pretrained(str(tmp_path / "sharded"))


def test_save_is_atomic(tmp_path, net, monkeypatch):
    path = tmp_path / "ckpt"
    save_pretrained(str(path), net.config, net.state_dict())
    before = (path / "model.safetensors").read_bytes()
    import safetensors.torch
    calls = []

    def crash(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed while writing the second shard
        return real(*a, **k)

    real = safetensors.torch.save_file
    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    changed = {k: v + 1 for k, v in net.state_dict().items()}
    with pytest.raises(KeyboardInterrupt):
        save_pretrained(str(path), net.config, changed, max_shard_bytes=200_000)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no half-written directory left behind
    assert (path / "model.safetensors").read_bytes() == before


def test_rope_scaling_is_recorded_and_used(tmp_path, net):
    from rope import scale_rope
    s = scale_rope("pi", 512, 128, 16, 500000.0)
    net.config.rope_scaling = s
    save_pretrained(str(tmp_path / "pi"), net.config, net.state_dict())
    loaded = from_pretrained(str(tmp_path / "pi"))
    assert loaded.config.rope_scaling["method"] == "pi"
    assert loaded.config.position_scale == 0.25
    x = ids(1, 16)
    with torch.no_grad():
        scaled = loaded(x)
        # positions 0, 4, 8, ... at scale 1 see the same angles as 0, 1, 2, ... at scale 1/4
        plain = LLaDA(small_config())
        plain.load_state_dict(net.state_dict())
        same = plain(x, positions=torch.arange(16)[None] * 0.25)
    assert torch.allclose(scaled, same, atol=1e-6)


def test_prefix_cache_is_exact_for_one_layer():
    """With a single layer the prompt's keys depend on the prompt alone, so the cache is exact."""
    torch.manual_seed(0)
    net = LLaDA(small_config(n_layers=1))
    x = ids(2, 30)
    with torch.no_grad():
        full = net(x)
        cache = PrefixCache(18)
        net(x, cache=cache)
        part = net(x[:, 18:], cache=cache)
    assert torch.allclose(part, full[:, 18:], atol=1e-5)


def test_prefix_cache_approximates_for_deeper_models(net):
    x = ids(1, 30)
    with torch.no_grad():
        full = net(x)
        cache = PrefixCache(18)
        net(x, cache=cache)
        y = x.clone()
        y[:, 18:] = 5  # the suffix changes after the cache was filled
        part = net(y[:, 18:], cache=cache)
        exact = net(y)[:, 18:]
    assert not torch.allclose(part, exact, atol=1e-4)  # stale prompt keys: an approximation
    assert (part - exact).abs().mean() < (full[:, 18:] - exact).abs().mean()


def test_cli_describes_the_8b_model_without_allocating(capsys):
    model_py.main(["--preset", "llada-8b"])
    out = capsys.readouterr().out
    assert "8,015,581,184" in out and "14.93 GiB" in out


def test_unknown_preset(capsys):
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        preset("huge")
    with pytest.raises(SystemExit):
        model_py.main(["--preset", "huge"])
    assert "unknown preset 'huge'" in capsys.readouterr().err


@pytest.mark.parametrize("user_value, expected", [(None, "1"), ("0", "0")])
def test_importing_the_model_turns_on_huge_pages_unless_told_not_to(user_value, expected):
    # A fresh interpreter: this one imported model.py long ago. The value PyTorch will read is
    # the one in the environment at its first large allocation, after `import model`.
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if user_value is not None:
        env["THP_MEM_ALLOC_ENABLE"] = user_value
    code = "import os, model; print(os.environ.get('THP_MEM_ALLOC_ENABLE'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), check=True)
    assert out.stdout.strip() == expected
