import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import masks
from masks import (STRATEGIES, allowed, attention, attention_plan, doc_ids, document_positions,
                   main, num_packed_sequences, pack_sequence)
from model import LLaDA, preset
from scripts import one_line_error, script

EOD = 999


def make_corpus(lengths, seed=0):
    rng = np.random.default_rng(seed)
    docs = [rng.integers(0, 500, n) for n in lengths]
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return np.concatenate(docs), offsets, docs


def unpack_all(tokens, offsets, seq_len, strategy):
    return [pack_sequence(tokens, offsets, i, seq_len, strategy, EOD)
            for i in range(num_packed_sequences(offsets, seq_len, strategy))]


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_packing_is_the_document_stream_cut_every_seq_len(strategy):
    # short ones share sequences, 200 is cut into chunks; under eod the stream below has the
    # separator exactly at each document's end
    lengths = [5, 70, 3, 200, 1, 40, 33]
    tokens, offsets, docs = make_corpus(lengths)
    sep = strategy == "eod"
    stream = np.concatenate([np.concatenate([d, [EOD]]) if sep else d for d in docs])
    seqs = unpack_all(tokens, offsets, 32, strategy)
    assert len(seqs) == len(stream) // 32
    packed = np.concatenate([s for s, _ in seqs])
    assert np.array_equal(packed, stream[: len(packed)])  # every token once, in order
    for s, lens in seqs:
        assert sum(lens) == 32 and all(n > 0 for n in lens)
    # the pieces are the documents (plus separators) cut where sequences end, and nowhere else
    cuts = set(np.cumsum([n for _, lens in seqs for n in lens]).tolist())
    doc_ends = set(np.cumsum([n + sep for n in lengths]).tolist())
    assert cuts == {e for e in doc_ends if e <= len(packed)} | set(range(32, len(packed) + 1, 32))


def test_preconditions_are_assertions_that_name_the_values():
    tokens, offsets, _ = make_corpus([10, 10])
    with pytest.raises(AssertionError, match=r"packed sequence 3 is out of range \(2 sequences"):
        pack_sequence(tokens, offsets, 3, 8, "concat")
    with pytest.raises(AssertionError, match="needs eod_id"):
        pack_sequence(tokens, offsets, 0, 8, "eod")
    for doc_lens in ([[3, 4]], [[8, 0]], [[8], [8]]):  # sums to 7; an empty document; 2 rows
        with pytest.raises(AssertionError, match=r"doc_lens must give 1 rows of positive lengths "
                                                 r"summing to 8, got \["):
            attention_plan(doc_lens, 1, 8, torch.device("cpu"))


def test_layout_conversions():
    assert doc_ids([[2, 3]]).tolist() == [[0, 0, 1, 1, 1]]
    assert document_positions([[2, 3], [5]]).tolist() == [[0, 1, 0, 1, 2], [0, 1, 2, 3, 4]]
    a = allowed([2, 1], "adaptive")
    assert a.tolist() == [[True, True, False], [True, True, False], [False, False, True]]
    assert allowed([2, 1], "eod").all() and allowed([2, 1], "concat").all()


def dense_reference(q, k, v, doc_lens):
    """Attention with an explicit (L, L) mask: fine for tiny L, forbidden in the real code."""
    mask = torch.stack([allowed(lens, "adaptive") for lens in doc_lens])[:, None]  # (B, 1, L, L)
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          attn_mask=mask).transpose(1, 2)


@pytest.mark.parametrize("doc_lens", [
    [[7, 1, 30, 9, 9, 8, 1, 1], [66], [12, 20, 14, 20]],  # many bucket shapes
    [[22, 22, 22], [22, 22, 22], [22, 22, 22]],  # equal documents: the reshape path
])
def test_bucketed_attention_equals_dense_masked_attention_with_gradients(doc_lens):
    g = torch.Generator().manual_seed(0)
    B, L, H, D = 3, 66, 2, 16
    qkv = [torch.randn(B, L, H, D, generator=g, requires_grad=True) for _ in range(3)]
    plan = attention_plan(doc_lens, B, L, torch.device("cpu"))
    out = attention(*qkv, plan)
    ref = dense_reference(*qkv, doc_lens)
    assert torch.allclose(out, ref, atol=1e-5)
    w = torch.randn(out.shape, generator=g)
    grads = torch.autograd.grad((out * w).sum(), qkv)
    grads_ref = torch.autograd.grad((ref * w).sum(), qkv)
    for a, b in zip(grads, grads_ref):
        assert torch.allclose(a, b, atol=1e-5)


def test_suffix_plan_matches_full_attention_for_the_last_document():
    g = torch.Generator().manual_seed(1)
    B, L, H, D, Lq = 2, 20, 2, 8, 6
    q, k, v = (torch.randn(B, L, H, D, generator=g) for _ in range(3))
    doc_lens = [[5, 15], [20]]  # row 0 has 5 padding tokens in front
    full = attention(q, k, v, attention_plan(doc_lens, B, L, torch.device("cpu")))
    plan = attention_plan(doc_lens, B, L, torch.device("cpu"), query_len=Lq)
    part = attention(q[:, -Lq:], k, v, plan)
    assert torch.allclose(part, full[:, -Lq:], atol=1e-6)
    with pytest.raises(AssertionError, match="all 12 queries inside the last document"):
        attention_plan([[10, 10]], 1, 20, torch.device("cpu"), query_len=12)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return LLaDA(preset("tiny"))


def packed_input(seed=0):
    g = torch.Generator().manual_seed(seed)
    doc_lens = [[11, 25, 4, 24], [30, 34]]
    return torch.randint(0, 5000, (2, 64), generator=g), doc_lens


def test_full_attention_lets_a_document_change_every_other_one(tiny):
    """concat and eod (no doc_lens): editing document 1 of row 0 reaches its other documents,
    never row 1; under adaptive nothing crosses a document."""
    ids, doc_lens = packed_input()
    changed = ids.clone()
    changed[0, 11:36] = torch.randint(5000, 6000, (25,))  # every token of document 1
    with torch.no_grad():
        a, b = tiny(ids), tiny(changed)
        adaptive = tiny(ids, doc_lens=doc_lens), tiny(changed, doc_lens=doc_lens)
    for x, y, leaks in ((a, b, True), (*adaptive, False)):
        diff = torch.cat([x[0, :11] - y[0, :11], x[0, 36:] - y[0, 36:]]).abs().max()
        assert diff > 1e-2 if leaks else diff < 1e-5
        assert torch.equal(x[1], y[1])  # the other sequence is never affected


def test_adaptive_equals_each_document_alone_forward_and_gradients(tiny):
    ids, doc_lens = packed_input(1)
    tiny.zero_grad()
    packed = tiny(ids, doc_lens=doc_lens)
    w = torch.randn(packed.shape, generator=torch.Generator().manual_seed(2))
    (packed * w).sum().backward()
    g_packed = {n: p.grad.clone() for n, p in tiny.named_parameters() if p.grad is not None}
    assert len(g_packed) == len(list(tiny.parameters())) - 1  # all but the unused LM head
    tiny.zero_grad()
    total, start = 0.0, 0
    for b, lens in enumerate(doc_lens):
        start = 0
        for n in lens:
            pos = torch.arange(start, start + n)[None]  # same positions as in the pack
            alone = tiny(ids[b:b + 1, start:start + n], positions=pos)
            assert torch.allclose(alone[0], packed[b, start:start + n].detach(), atol=2e-5)
            total = total + (alone[0] * w[b, start:start + n]).sum()
            start += n
    total.backward()
    for n, p in tiny.named_parameters():
        if n in g_packed:
            assert torch.allclose(p.grad, g_packed[n], atol=1e-4, rtol=1e-4), n


def test_positions_restarting_per_document_change_nothing_under_adaptive(tiny):
    ids, doc_lens = packed_input(3)
    with torch.no_grad():
        continuous = tiny(ids, doc_lens=doc_lens)
        restarted = tiny(ids, doc_lens=doc_lens, positions=document_positions(doc_lens))
        full_cont = tiny(ids)
        full_restart = tiny(ids, positions=document_positions(doc_lens))
    assert torch.allclose(continuous, restarted, atol=2e-5)
    assert not torch.allclose(full_cont, full_restart, atol=1e-3)  # under full attention they differ


def test_plot_draws_a_picture(tmp_path):
    out = tmp_path / "masks.png"
    main(["--plot", "--out", str(out)])
    import matplotlib.image
    img = matplotlib.image.imread(out)
    assert img.shape[0] > 300 and img.shape[1] > 900


def test_the_kernel_is_chosen_in_one_place_and_an_adaptive_plan_serves_either(monkeypatch):
    for device, dtype, flash_installed, expected in [
        ("cuda", torch.bfloat16, True, "flash"), ("cuda", torch.float16, True, "flash"),
        ("cuda", torch.float32, True, "sdpa"),  # flash-attn has no float32 kernels
        ("cuda", torch.bfloat16, False, "sdpa"), ("cpu", torch.bfloat16, True, "sdpa"),
        ("cpu", torch.float32, False, "sdpa"),
    ]:
        monkeypatch.setattr(masks, "flash_attn_available", lambda: flash_installed)
        assert masks.attention_kernel(torch.device(device), dtype) == expected
    # The plan is built before the dtype of q is known (autocast decides it), so it must work
    # for whichever kernel attention() picks: a plan made where flash-attn is installed still
    # runs float32 attention through SDPA (this used to raise: no buckets had been built).
    def no_peeking():
        raise AssertionError("attention_plan must not depend on flash-attn")
    monkeypatch.setattr(masks, "flash_attn_available", no_peeking)
    lens = [[5, 9, 2], [7, 7, 2]]
    plan = attention_plan(lens, 2, 16, torch.device("cpu"))
    monkeypatch.setattr(masks, "flash_attn_available", lambda: True)
    q, k, v = (torch.randn(2, 16, 2, 8) for _ in range(3))
    assert torch.allclose(attention(q, k, v, plan), dense_reference(q, k, v, lens), atol=1e-6)


def test_pairs_are_counted_as_the_mask_would_count_them_without_building_one(capsys, monkeypatch):
    for doc_lens in ([5, 3, 6, 2], [1], [7, 1, 1, 30]):
        for strategy in STRATEGIES:
            assert masks.pairs_computed(doc_lens, strategy) == int(allowed(doc_lens, strategy).sum())

    def no_mask(*a, **k):
        raise AssertionError("an L x L mask of 2e9 tokens would need 4e18 bytes")
    monkeypatch.setattr(masks, "allowed", no_mask)
    main(["--doc-lens", "1000000000", "1000000000"])
    out = capsys.readouterr().out
    assert "query-key pairs computed: 2000000000000000000 of 4000000000000000000" in out  # adaptive
    assert "query-key pairs computed: 4000000008000000004 of 4000000008000000004" in out  # eod


def test_cli_refuses_what_it_cannot_draw_and_writes_nothing(tmp_path, monkeypatch, capsys):
    for case, (out, args, message) in enumerate([
        ("", [], "--out '' is not a picture's file name"),  # matplotlib wrote ".png"
        ("folder", [], "is not a picture's file name"),  # ... and "folder.png" beside the folder
        ("picture", [], "is not a picture's file name"),
        ("masks.xyz", [], "Format 'xyz' is not supported"),
        ("masks.png", ["--doc-lens", "200", "100"], "--doc-lens sum to 300 tokens"),
        ("/proc/ultrallada/masks.png", [], "cannot write /proc/ultrallada"),
        ("masks.png", ["--doc-lens", "0"], "--doc-lens must all be positive"),
    ]):
        (tmp_path / str(case) / "folder").mkdir(parents=True)
        monkeypatch.chdir(tmp_path / str(case))
        with pytest.raises(SystemExit) as e:
            main(["--plot", "--out", out, *args])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
        assert message in err
        assert os.listdir() == ["folder"] and not os.listdir("folder")
    r = script("masks.py", "--plot", "--doc-lens", "100000", "100000")  # as a user runs it
    one_line_error(r, "--doc-lens sum to 200000 tokens")
    assert "usage:" not in r.stderr and r.stdout == ""
