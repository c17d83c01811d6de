"""The fast paths give what the plain ones give: the numeric-vocabulary head (``HeadRows``, generate's
``allowed_token_ids``), the one-token attention mask, the KV cache advancing its own length, bf16 weights on CPU,
and the compute-dtype helpers."""

from __future__ import annotations

import pytest
import torch

import miniqwen.device as mdevice
from miniqwen import FlopCounter, HeadRows, KVCache, Qwen2Config, Qwen2ForCausalLM, generate
from miniqwen.flop_count import forward_flops, generation_flops
from miniqwen.generate import sampling_probs
from miniqwen.model import attention_mask_and_positions
from miniqwen.packing import PackedLinear, packed_weights, packing_supported


@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():
        yield


def tiny_model(tie: bool, seed: int = 0, vocab_size: int = 97) -> Qwen2ForCausalLM:
    """3 layers, d=64, GQA 4:2, random weights (norms and biases perturbed so every path matters)."""
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0, tie_word_embeddings=tie)
    model = Qwen2ForCausalLM(cfg).eval()
    for name, p in model.named_parameters():
        if name.endswith("norm.weight") or name.endswith(".bias"):
            p.add_(0.1 * torch.randn_like(p))
    return model


def left_padded(prompts, pad=0):
    L = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), L), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):], mask[i, L - len(p):] = torch.tensor(p), 1
    return ids, mask


def full_head_greedy(model, prompts, max_new_tokens, allowed, pad=0):
    """generate()'s greedy loop as it was before HeadRows: full lm_head, forbidden tokens masked to −inf,
    an int mask grown by one column per step."""
    ids, mask = left_padded(prompts, pad)
    B, L = ids.shape
    vocab_mask = torch.full((model.config.vocab_size,), float("-inf"))
    vocab_mask[torch.tensor(allowed)] = 0.0
    cache = KVCache(model.config, B, L + max_new_tokens, dtype=model.lm_head.weight.dtype)
    logits = model(ids, mask, cache, logits_to_keep=1)[:, -1]
    out = []
    for step in range(max_new_tokens):
        token = (logits.float() + vocab_mask).argmax(-1)
        out.append(token)
        mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype)], dim=1)
        logits = model(token[:, None], mask, cache)[:, -1]
    return torch.stack(out, 1).tolist()


# ------------------------------------------------------------------------------------------- numeric head


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_head_rows_logits_are_the_full_heads_columns(tie):
    model = tiny_model(tie)
    head = model.head_rows([40, 3, 5, 3, 96, 0])  # unsorted, repeated
    assert isinstance(head, HeadRows)
    assert head.ids.tolist() == [0, 3, 5, 40, 96] and head.weight.shape == (5, 64)
    assert torch.equal(head.weight, model.lm_head.weight[head.ids])
    ids, mask = left_padded([[7, 8, 9, 10, 11, 12], [13, 14]])
    full = model(ids, attention_mask=mask)
    sub = model(ids, attention_mask=mask, head_rows=head)
    assert sub.shape == (2, 6, 5)
    torch.testing.assert_close(sub, full[..., head.ids], atol=1e-5, rtol=1e-6)  # float rounding only
    torch.testing.assert_close(model(ids, mask, logits_to_keep=2, head_rows=head), sub[:, -2:])
    # the same with a cache, one token at a time
    cache = KVCache(model.config, 2, 8)
    steps = [model(ids[:, :4], mask[:, :4], cache, head_rows=head)]
    for t in range(4, 6):
        steps.append(model(ids[:, t : t + 1], mask[:, : t + 1], cache, head_rows=head))
    torch.testing.assert_close(torch.cat(steps, 1), sub, atol=1e-5, rtol=0)


def test_head_rows_rejects_empty_and_out_of_vocabulary_ids():
    model = tiny_model(True)
    with pytest.raises(ValueError, match="at least one"):
        model.head_rows([])
    with pytest.raises(ValueError, match=r"\[0, 97\)"):
        model.head_rows([3, 97])
    with pytest.raises(ValueError, match=r"\[0, 97\)"):
        model.head_rows(torch.tensor([-1, 3]))
    with pytest.raises(ValueError):
        generate(model, [[1, 2]], 3, pad_token_id=0, allowed_token_ids=[])


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_constrained_greedy_equals_full_head_with_mask(tie, seed):
    """Same tokens as the full lm_head with the forbidden tokens at −inf: left-padded batch, several models."""
    model = tiny_model(tie, seed)
    g = torch.Generator().manual_seed(100 + seed)
    prompts = [torch.randint(1, 97, (n,), generator=g).tolist() for n in (7, 2, 11)]
    allowed = torch.randint(0, 97, (12,), generator=g).tolist()  # may repeat, any order
    want = full_head_greedy(model, prompts, 16, allowed)
    got = generate(model, prompts, 16, pad_token_id=0, allowed_token_ids=allowed)
    assert got == want
    assert {t for row in got for t in row} <= set(allowed)
    # and each row alone gets what it gets in the batch
    for prompt, row in zip(prompts, got):
        assert generate(model, [prompt], 16, pad_token_id=0, allowed_token_ids=allowed) == [row]


def test_constrained_generation_stops_like_before():
    model = tiny_model(False, 5)
    allowed = [3, 4, 5, 6, 7]
    ref = full_head_greedy(model, [[1, 2, 3]], 30, allowed)[0]
    # stop at the 2nd "4" (kept), or at EOS "5" (dropped)
    out = generate(model, [[1, 2, 3]], 30, pad_token_id=0, allowed_token_ids=allowed, stop_token_id=4, stop_count=2)
    cut = [i for i, t in enumerate(ref) if t == 4][1] + 1 if ref.count(4) >= 2 else 30
    assert out == [ref[:cut]]
    out = generate(model, [[1, 2, 3]], 30, pad_token_id=0, allowed_token_ids=allowed, eos_token_ids=[5])
    assert out == [ref[: ref.index(5)] if 5 in ref else ref]


@pytest.mark.parametrize("top_p", [1.0, 0.8])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_constrained_sampling_distribution_equals_full_head_with_mask(temperature, top_p):
    """A sample over the K allowed logits is drawn from the same distribution as one over all V logits with the
    rest at −inf (the random streams differ, so the same seed gives other samples; the distribution is equal)."""
    model = tiny_model(True, 7)
    allowed = [2, 9, 11, 30, 31, 50, 64, 80, 95]
    head = model.head_rows(allowed)
    ids, mask = left_padded([[5, 6, 7, 8], [9, 10]])
    vocab_mask = torch.full((97,), float("-inf"))
    vocab_mask[head.ids] = 0.0
    full = sampling_probs(model(ids, mask).float().reshape(-1, 97) + vocab_mask, temperature, top_p)
    sub = sampling_probs(model(ids, mask, head_rows=head).float().reshape(-1, len(allowed)), temperature, top_p)
    torch.testing.assert_close(full[:, head.ids], sub, atol=1e-5, rtol=0)
    others = torch.ones(97, dtype=torch.bool)
    others[head.ids] = False
    assert torch.all(full[:, others] == 0)
    # seeded sampling through generate: reproducible, allowed tokens only
    kw = dict(pad_token_id=0, allowed_token_ids=allowed, temperature=temperature, top_p=top_p, seed=3,
              num_samples=3)
    out = generate(model, [[5, 6, 7, 8], [9, 10]], 12, **kw)
    assert out == generate(model, [[5, 6, 7, 8], [9, 10]], 12, **kw)
    assert len(out) == 6 and {t for row in out for t in row} <= set(allowed)


@pytest.mark.parametrize("num_samples", [1, 3])
def test_constrained_generation_costs_generation_flops_with_head_rows(num_samples):
    model = tiny_model(False)
    allowed = [5, 9, 9, 13, 20]  # 4 distinct
    with FlopCounter() as fc:
        out = generate(model, [[1, 2, 3, 4, 5], [6, 7]], 6, pad_token_id=0, allowed_token_ids=allowed,
                       num_samples=num_samples, temperature=1.0 if num_samples > 1 else 0.0)
    assert all(len(row) == 6 for row in out)
    cfg = model.config
    # each prompt is prefilled alone at its own length; decoding attends over the longest (left-padded) one
    assert fc.total == generation_flops(cfg, [5, 2], 6, 2, num_samples=num_samples, head_rows=4)
    assert fc.total < generation_flops(cfg, 5, 6, 2, num_samples=num_samples, head_rows=4)  # padding prefilled
    assert fc.counts["lm_head"] == (2 + 5 * 2 * num_samples) * 4 * (2 * 64 - 1)
    assert fc.total < generation_flops(cfg, [5, 2], 6, 2, num_samples=num_samples)


# ------------------------------------------------------------------------------------- mask and KV cache


def reference_mask(valid: torch.Tensor, past: int) -> torch.Tensor:
    """[B, 1, T, S] by loops: query t sees key s if (s <= past + t and s real) or s == past + t."""
    B, S = valid.shape
    T = S - past
    mask = torch.zeros(B, 1, T, S, dtype=torch.bool)
    for b in range(B):
        for t in range(T):
            for s in range(S):
                mask[b, 0, t, s] = bool((s <= past + t and valid[b, s]) or s == past + t)
    return mask


@pytest.mark.parametrize("past, T", [(0, 5), (3, 4), (6, 1), (0, 1)])
def test_attention_mask_and_positions_by_hand(past, T):
    g = torch.Generator().manual_seed(past * 10 + T)
    valid = torch.rand(4, past + T, generator=g) < 0.7
    valid[0] = True
    valid[1, :] = False  # all padding, new tokens included: each still sees itself
    for attention_mask in (valid, valid.long()):
        mask, positions = attention_mask_and_positions(attention_mask, past)
        assert mask.dtype == torch.bool and torch.equal(mask, reference_mask(valid, past))
        real_before = torch.tensor([[int(valid[b, : past + t].sum()) for t in range(T)] for b in range(4)])
        want = torch.where(valid[:, past:], real_before, (real_before - 1).clamp(min=0))
        assert torch.equal(positions, want)


def test_kv_cache_advances_its_own_length():
    model = tiny_model(True)
    cfg = model.config
    cache = KVCache(cfg, 2, 10)
    k = torch.randn(2, cfg.num_key_value_heads, 3, cfg.head_dim)
    for layer in range(cfg.num_hidden_layers):
        assert cache.length == 0
        keys, values = cache.update(layer, k, k + 1)
        assert keys.shape == (2, cfg.num_key_value_heads, 3, cfg.head_dim)
    assert cache.length == 3  # the last layer completed the step
    model(torch.randint(0, 97, (2, 4)), torch.ones(2, 7, dtype=torch.long), cache)
    assert cache.length == 7
    with pytest.raises(ValueError, match="overflow"):
        model(torch.randint(0, 97, (2, 4)), cache=cache)
    assert cache.length == 7  # nothing written
    with pytest.raises(ValueError, match="dtype|bfloat16"):
        KVCache(cfg, 1, 4).update(0, k[:1].bfloat16(), k[:1].bfloat16())


def test_prompts_prefilled_alone_make_the_left_padded_cache():
    """KVCache.put_row lays single-row caches out as one left-padded batch: the same keys and values (up to float
    rounding) as prefilling the padded batch, zeros in the pad slots."""
    model = tiny_model(False, 3)
    cfg, prompts = model.config, [[5, 6, 7, 8, 9], [10, 11]]
    joined = KVCache(cfg, 2, 9)
    for b, p in enumerate(prompts):
        row = KVCache(cfg, 1, len(p))
        model(torch.tensor([p]), cache=row)
        joined.put_row(b, row, 5)
    ids, mask = left_padded(prompts)
    batched = KVCache(cfg, 2, 9)
    model(ids, mask, batched)
    assert joined.length == batched.length == 5
    for layer in range(cfg.num_hidden_layers):
        for a, b in ((joined.k[layer], batched.k[layer]), (joined.v[layer], batched.v[layer])):
            torch.testing.assert_close(a[0], b[0])
            torch.testing.assert_close(a[1, ..., 3:5], b[1, ..., 3:5])
            assert not a[1, ..., :3].any() and not a[..., 5:].any()
    with pytest.raises(ValueError, match="do not fit"):
        joined.put_row(0, row, 1)
    with pytest.raises(ValueError, match="do not fit"):
        joined.put_row(0, row, 10)
    with pytest.raises(ValueError, match="single-row"):
        joined.put_row(0, batched, 5)


# ------------------------------------------------------------------------------------------------- bf16


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_bf16_weights_on_cpu(tie):
    """model.to(bfloat16) runs (RMSNorm in fp32, RoPE and the KV cache in bf16), its logits are close to fp32's,
    greedy generation works with and without the numeric head, and the FLOP count is the same."""
    model = tiny_model(tie, 11)
    ids, mask = left_padded([[5, 6, 7, 8, 9], [10, 11, 12]])
    with FlopCounter() as fc32:
        ref = model(ids, mask)
    with FlopCounter() as gen32:
        generate(model, [[5, 6, 7, 8, 9], [10, 11, 12]], 8, pad_token_id=0)
    model = model.to(torch.bfloat16)
    with FlopCounter() as fc16:
        got = model(ids, mask)
    assert got.dtype == torch.bfloat16
    assert fc16.counts == fc32.counts and fc16.total == forward_flops(model.config, 2, 5)
    err = (got.float() - ref).abs()
    assert torch.isfinite(got).all() and err.max() < 0.02 * ref.abs().max() and err.mean() < 0.02 * ref.abs().mean()
    with FlopCounter() as gen16:
        out = generate(model, [[5, 6, 7, 8, 9], [10, 11, 12]], 8, pad_token_id=0)
    assert gen16.total == gen32.total == generation_flops(model.config, [5, 3], 8, 2)
    assert [len(row) for row in out] == [8, 8]
    allowed = [3, 4, 5, 40]
    constrained = generate(model, [[5, 6, 7, 8, 9], [10, 11, 12]], 8, pad_token_id=0, allowed_token_ids=allowed)
    assert constrained == full_head_greedy(model, [[5, 6, 7, 8, 9], [10, 11, 12]], 8, allowed)


@pytest.mark.skipif(not packing_supported(), reason="no oneDNN bf16 linear here (torch build or CPU: AVX2 only)")
def test_packed_weights_give_bit_identical_bf16_logits_and_are_dropped_after():
    """Inside packed_weights every bf16 projection is swapped for a packed copy (PackedLinear) and the logits
    (prefill and a cached decoding step) are bit-identical to the plain ones; gradients bypass the packing; after
    the block the original modules are back. float32 weights are left unpacked."""
    model = tiny_model(False, 12).to(torch.bfloat16)
    ids, mask = left_padded([[5, 6, 7, 8, 9], [10, 11, 12]])

    def projections(of):
        return [m for name, m in of.named_modules() if name.endswith("_proj")]

    originals = projections(model)
    state = model.state_dict()

    def prefill_and_step():
        cache = KVCache(model.config, 2, 6, dtype=torch.bfloat16)
        first = model(ids, mask, cache)
        step = model(torch.tensor([[3], [4]]), torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1), cache)
        return first, step

    plain = prefill_and_step()
    with packed_weights(model, 2):
        if not torch.backends.mkldnn.is_available():
            pytest.skip("this torch build has no oneDNN")
        assert all(isinstance(m, PackedLinear) for m in projections(model)) and len(projections(model)) == 21
        assert model.state_dict().keys() == state.keys()  # the same parameters, under the same names
        packed = prefill_and_step()
        with torch.enable_grad():
            x = torch.randn(1, 4, 64, dtype=torch.bfloat16, requires_grad=True)
            model.model.layers[0].mlp(x).float().sum().backward()
            assert x.grad is not None and model.model.layers[0].mlp.up_proj.weight.grad is not None
    assert all(torch.equal(a, b) for a, b in zip(plain, packed))
    assert not any(isinstance(m, PackedLinear) for m in model.modules())
    assert all(a is b for a, b in zip(projections(model), originals)) and len(projections(model)) == 21
    with packed_weights(model, lm_head=True):
        assert isinstance(model.lm_head, PackedLinear)
        assert torch.equal(model(ids, mask), plain[0])
    assert type(model.lm_head) is torch.nn.Linear
    model32 = tiny_model(False, 12)
    with packed_weights(model32, lm_head=True):
        assert not any(isinstance(m, PackedLinear) for m in model32.modules())


# -------------------------------------------------------------------------------------------- dtype helpers


def test_cpu_supports_bf16_reads_torch_then_cpuinfo(monkeypatch, tmp_path):
    probe = mdevice.cpu_supports_bf16.__wrapped__  # the uncached function
    read_flags = mdevice._cpuinfo_flags
    assert isinstance(mdevice.cpu_supports_bf16(), bool)
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_f": True, "avx512_bf16": True})
    assert probe() is True
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_f": True})
    monkeypatch.setattr(mdevice, "_cpuinfo_flags", lambda: {"fpu", "avx2"})
    assert probe() is False
    monkeypatch.setattr(mdevice, "_cpuinfo_flags", lambda: {"fpu", "amx_bf16"})
    assert probe() is True
    monkeypatch.delattr(torch.cpu, "get_capabilities")  # older torch: /proc/cpuinfo alone
    assert probe() is True

    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n\nprocessor\t: 1\nflags\t: fpu\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n")
    assert {"avx512_bf16", "fpu"} <= read_flags(x86)
    assert {"bf16", "sve"} <= read_flags(arm)
    assert read_flags(tmp_path / "absent") == set()


def test_default_compute_dtype(monkeypatch):
    assert mdevice.default_compute_dtype("cuda") == torch.bfloat16
    assert mdevice.default_compute_dtype(torch.device("cuda", 0)) == torch.bfloat16
    monkeypatch.setattr(mdevice, "cpu_supports_bf16", lambda: True)
    assert mdevice.default_compute_dtype("cpu") == torch.bfloat16
    monkeypatch.setattr(mdevice, "cpu_supports_bf16", lambda: False)
    assert mdevice.default_compute_dtype("cpu") == torch.float32
    assert mdevice.default_compute_dtype("meta") == torch.float32
    with pytest.raises(RuntimeError):
        mdevice.default_compute_dtype("not-a-device")


def test_unpadded_uncached_input_takes_the_plain_causal_pattern():
    mask, positions = attention_mask_and_positions(torch.ones(3, 6, dtype=torch.long), past=0)
    assert mask is None and torch.equal(positions, torch.arange(6).expand(3, 6))
    # the same logits as the explicit boolean mask of the same pattern
    model = tiny_model(True)
    ids = torch.randint(1, 97, (2, 7), generator=torch.Generator().manual_seed(4))
    with_none = model(ids)
    padded = model(torch.cat([torch.zeros(2, 1, dtype=torch.long), ids], 1),
                   torch.cat([torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 7, dtype=torch.long)], 1))[:, 1:]
    torch.testing.assert_close(with_none, padded, atol=1e-5, rtol=1e-5)
