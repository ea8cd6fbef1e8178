"""Tests for checkpoint.py: the official Hugging Face layout round-trips, an official
directory loads, damaged ones fail with one line, config.json is checked field by field where
it is read, a save is published by renames that a kill cannot break and follows the umask,
what every RoPE method saves gives the official modeling code the same logits (all but
position interpolation), and the optimizer state round-trips in safetensors."""
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_model import ids, reference_logits, small_config

import train
from harness.checkpoint import (CheckpointError, from_pretrained, load_optimizer_state, publish,
                                read_config, save_pretrained, save_training_checkpoint)
from harness.files import FileError
from model import LLaDA
from rope import METHODS, scale_rope


@pytest.fixture
def net():
    torch.manual_seed(0)
    return LLaDA(small_config())


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
    for folder in ("nowhere", "empty"):  # not a checkpoint directory
        (tmp_path / "empty").mkdir(exist_ok=True)
        with pytest.raises(FileError, match=f"{folder}/config.json does not exist"):
            from_pretrained(str(tmp_path / folder))
    good = tmp_path / "good"
    save_pretrained(str(good), net.config, net.state_dict())

    sd = dict(net.state_dict())
    del sd["model.transformer.blocks.1.up_proj.weight"]
    save_pretrained(str(tmp_path / "missing"), net.config, sd)
    with pytest.raises(CheckpointError, match=r'Missing key.*"model\.transformer\.blocks\.1\.up_proj\.weight"'):
        from_pretrained(str(tmp_path / "missing"))

    sd = dict(net.state_dict())
    sd["model.transformer.ln_f.weight"] = torch.ones(65)
    save_pretrained(str(tmp_path / "shape"), net.config, sd)
    with pytest.raises(CheckpointError, match=r"size mismatch for model\.transformer\.ln_f\.weight"):
        from_pretrained(str(tmp_path / "shape"))

    sd = {**net.state_dict(), "model.transformer.extra.weight": torch.ones(2)}
    save_pretrained(str(tmp_path / "extra"), net.config, sd)
    with pytest.raises(CheckpointError, match=r'Unexpected key.*"model\.transformer\.extra\.weight"'):
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


@pytest.mark.parametrize("method", METHODS)
def test_saved_rope_gives_the_official_code_the_same_logits_except_for_pi(tmp_path, net, method):
    # The official modeling code reads rope_theta from config.json and nothing else of ours:
    # every NTK-family method changes only the base, so it loads there exactly; position
    # interpolation also squeezes positions, which only our model.py reads (rope_scaling).
    net.config.set_rope(scale_rope(method, 512, 128, net.config.head_dim, net.config.rope_theta))
    save_pretrained(str(tmp_path / method), net.config, net.state_dict())
    official_config = json.loads((tmp_path / method / "config.json").read_text())
    loaded = from_pretrained(str(tmp_path / method))
    x = ids(1, 40)
    with torch.no_grad():
        ours = loaded.logits(x)
        official = reference_logits(loaded.state_dict(), type("C", (), {
            **{k: official_config[k] for k in ("d_model", "n_heads", "n_layers", "rms_norm_eps",
                                               "rope_theta")}})(), x)
    if method == "pi":
        assert not torch.allclose(ours, official, atol=1e-4)
    else:
        assert torch.allclose(ours, official, atol=1e-5)


@pytest.mark.parametrize("edit, says", [
    ({"n_heads": 3, "n_kv_heads": 3}, "n_heads 3 does not divide d_model 64"),
    ({"n_heads": 0}, "n_heads is 0, it must be a whole number"),
    ({"d_model": "64"}, 'd_model is "64", it must be a whole number'),
    ({"n_layers": True}, "n_layers is true, it must be a whole number"),
    ({"d_model": -64}, "d_model is -64"),
    ({"d_model": 10**30}, "d_model is 1000000000000000000000000000000"),
    ({"n_heads": 64, "n_kv_heads": 64}, "the head size d_model / n_heads = 1 must be even"),
    ({"rope_theta": float("nan")}, "rope_theta is NaN, it must be a finite number above 1"),
    ({"rope_theta": 0}, "rope_theta is 0, it must be a finite number above 1"),
    ({"rope_theta": 1.0}, "rope_theta is 1.0"),
    ({"rms_norm_eps": 0}, "rms_norm_eps is 0, it must be a finite number above 0"),
    ({"rope_scaling": "abc"}, 'rope_scaling is "abc", it must be an object or null'),
    ({"rope_scaling": {"position_scale": 0}}, "rope_scaling.position_scale is 0"),
    ({"rope_scaling": {"original_rope_theta": float("inf")}}, "original_rope_theta is Infinity"),
    ({"mask_token_id": "299"}, 'mask_token_id is "299", it must be a whole number'),
    ({"mask_token_id": 320}, "mask_token_id 320 has no embedding (embedding_size 320)"),
    ({"include_bias": 0}, "include_bias is 0, it must be true or false"),
])
def test_config_values_are_checked_where_they_are_read(tmp_path, net, edit, says):
    save_pretrained(str(tmp_path / "ckpt"), net.config, net.state_dict())
    path = tmp_path / "ckpt" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **edit}))
    with pytest.raises(CheckpointError) as e:
        read_config(str(tmp_path / "ckpt"))
    assert says in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)


def test_non_float_weights_are_refused_instead_of_cast(tmp_path, net):
    """int64 weights would be cast to float32 and run as if they were a model."""
    save_pretrained(str(tmp_path / "ckpt"), net.config, net.state_dict())
    file = tmp_path / "ckpt" / "model.safetensors"
    state = {k: (v * 1000).to(torch.int64) for k, v in load_file(file).items()}
    save_file(state, file, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="int64, not floating-point weights"):
        from_pretrained(str(tmp_path / "ckpt"))


@pytest.mark.parametrize("mask, file_mode, folder_mode", [(0o022, 0o644, 0o755),
                                                          (0o077, 0o600, 0o700)])
def test_a_checkpoint_is_readable_as_the_umask_says(tmp_path, net, mask, file_mode, folder_mode):
    """As a Hugging Face checkpoint: 0644 files under umask 022, so a colleague can read the
    weights (safetensors and mkstemp write 0600), and private under 077."""
    previous = os.umask(mask)
    try:
        save_pretrained(str(tmp_path / "ckpt"), net.config, net.state_dict())
    finally:
        os.umask(previous)
    for name in ("model.safetensors", "config.json"):
        assert os.stat(tmp_path / "ckpt" / name).st_mode & 0o777 == file_mode, name
    assert os.stat(tmp_path / "ckpt").st_mode & 0o777 == folder_mode


def test_the_optimizer_state_round_trips_in_safetensors(tmp_path):
    """AdamW's moments and step counts come back exactly, into an optimizer whose flags may
    differ; a file that holds another model's parameters is one line."""
    torch.manual_seed(0)
    model = LLaDA(small_config())
    opt = train.make_optimizer(model, train.TrainConfig(), 1e-3)
    for _ in range(2):
        model.head(model(ids())).sum().backward()
        opt.step()
    save_training_checkpoint(str(tmp_path / "ckpt"), model, opt, 2, {}, {}, rank=0, world=1)
    loaded = from_pretrained(str(tmp_path / "ckpt"))
    again = train.make_optimizer(loaded, train.TrainConfig(weight_decay=0.5), 5e-4)
    load_optimizer_state(str(tmp_path / "ckpt"), loaded, again)
    for p, q in zip(model.parameters(), loaded.parameters()):
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[p][key], again.state[q][key]), key
    assert again.param_groups[0]["weight_decay"] == 0.5  # the flags', not the saved ones
    other = LLaDA(small_config(n_layers=1))
    with pytest.raises(FileError, match="does not hold the state of this model's parameters"):
        load_optimizer_state(str(tmp_path / "ckpt"), other, train.make_optimizer(
            other, train.TrainConfig(), 1e-3))


def folder(path, **files):
    path.mkdir()
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def test_publish_keeps_what_a_user_put_in_the_old_folder_and_a_kill_loses_nothing(tmp_path):
    ckpt = folder(tmp_path / "ckpt", **{"model.safetensors": "old", "notes.txt": "mine"})
    publish(str(ckpt), lambda tmp: folder(Path(tmp), **{"model.safetensors": "new"}))
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    assert {n: (ckpt / n).read_text() for n in os.listdir(ckpt)} == {
        "model.safetensors": "new", "notes.txt": "mine"}
    # killed between the two renames: only ckpt.old; the next publish puts it back first
    os.replace(ckpt, tmp_path / "ckpt.old")
    publish(str(ckpt), lambda tmp: folder(Path(tmp), **{"model.safetensors": "newer"}))
    assert sorted(os.listdir(tmp_path)) == ["ckpt"] and (ckpt / "notes.txt").read_text() == "mine"
    # killed after them: the old folder beside the new one still gives it what only it holds
    folder(tmp_path / "ckpt.old", **{"model.safetensors": "older", "evals.json": "{}"})
    publish(str(ckpt), lambda tmp: folder(Path(tmp), **{"model.safetensors": "newest"}))
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    assert sorted(os.listdir(ckpt)) == ["evals.json", "model.safetensors", "notes.txt"]
    assert (ckpt / "model.safetensors").read_text() == "newest"


def test_names_in_an_index_never_reach_outside_the_folder(tmp_path, net):
    save_pretrained(str(tmp_path / "ckpt"), net.config, net.state_dict(), max_shard_bytes=200_000)
    index = tmp_path / "ckpt" / "model.safetensors.index.json"
    for shard in ("../ckpt/model-00001-of-00002.safetensors", 7):
        data = json.loads(index.read_text())
        data["weight_map"]["model.transformer.wte.weight"] = shard
        index.write_text(json.dumps(data))
        with pytest.raises(CheckpointError, match="names shards that are not files of"):
            from_pretrained(str(tmp_path / "ckpt"))
