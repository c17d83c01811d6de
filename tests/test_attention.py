"""The attention kernels against the one plain definition (miniqwen.attention.reference_attention), the KV cache's
mask widening, the model with the reference kernel swapped in, and the packed-weight swap's FLOP count."""

from __future__ import annotations

import pytest
import torch

import miniqwen.model as model_module
from miniqwen import FlopCounter, KVCache, PackedLinear, Qwen2Config, Qwen2ForCausalLM, generate
from miniqwen.attention import attention, reference_attention, sdpa_attention, single_query_attention
from miniqwen import packing
from miniqwen.packing import pack_weights, packed_weights, packing_supported, unpack_weights


@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():
        yield


TOLERANCE = {torch.float32: dict(atol=2e-6, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
HEADS = [(4, 2), (6, 1), (3, 3)]  # (Hq, Hkv): GQA 2:1, multi-query, multi-head


def qkv(B, Hq, Hkv, T, S, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, T, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, S, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, S, D, generator=g).to(dtype)
    return q, k, v


def random_mask(B, T, S, seed):
    """[B, 1, T, S], True = may attend; query t (absolute S − T + t) always sees itself, so no row is empty."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, 1, T, S, generator=g) < 0.6
    mask[..., torch.arange(T), torch.arange(S - T, S)] = True
    return mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("Hq, Hkv", HEADS)
def test_sdpa_path_equals_reference(Hq, Hkv, dtype):
    """Several queries per row: the causal pattern (mask None, nothing cached) and explicit masks over cached keys."""
    D, scale = 16, 0.25
    q, k, v = qkv(2, Hq, Hkv, 7, 7, D, dtype, seed=Hq)
    got = sdpa_attention(q, k, v, None, scale)
    assert got.shape == (2, Hq, 7, D) and got.dtype == dtype
    torch.testing.assert_close(got, reference_attention(q, k, v, None, scale), **TOLERANCE[dtype])
    explicit = torch.ones(7, 7, dtype=torch.bool).tril()[None, None].expand(2, 1, 7, 7)
    torch.testing.assert_close(reference_attention(q, k, v, explicit, scale), reference_attention(q, k, v, None, scale))
    q, k, v = qkv(3, Hq, Hkv, 5, 12, D, dtype, seed=10 + Hq)  # 7 cached keys + 5 new
    mask = random_mask(3, 5, 12, seed=Hq)
    torch.testing.assert_close(sdpa_attention(q, k, v, mask, scale), reference_attention(q, k, v, mask, scale),
                               **TOLERANCE[dtype])
    assert torch.equal(attention(q, k, v, mask, scale), sdpa_attention(q, k, v, mask, scale))  # T > 1 takes SDPA


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("Hq, Hkv", HEADS)
def test_single_query_path_equals_reference(Hq, Hkv, dtype):
    """One query per row, keys and values read from a KV cache's transposed store (non-contiguous views)."""
    D, S, scale = 16, 11, 0.25
    q, k, v = qkv(3, Hq, Hkv, 1, S, D, dtype, seed=20 + Hq)
    store_k, store_v = k.transpose(-1, -2).contiguous(), v.transpose(-1, -2).contiguous()  # [B, Hkv, D, S]
    k_view, v_view = store_k.transpose(-1, -2), store_v.transpose(-1, -2)
    assert not k_view.is_contiguous()
    mask = random_mask(3, 1, S, seed=Hq)
    got = single_query_attention(q, k_view, v_view, mask, scale)
    assert got.shape == (3, Hq, 1, D) and got.dtype == dtype
    want = reference_attention(q, k, v, mask, scale)
    torch.testing.assert_close(got, want, **TOLERANCE[dtype])
    torch.testing.assert_close(single_query_attention(q, k, v, None, scale), reference_attention(q, k, v, None, scale),
                               **TOLERANCE[dtype])  # no mask: a single query sees every key
    assert torch.equal(attention(q, k_view, v_view, mask, scale), got)  # T = 1 takes the single-query path


def test_masked_slots_do_not_matter():
    """What a fixed-shape cache relies on: keys masked out (whatever they hold) change nothing but rounding."""
    q, k, v = qkv(2, 4, 2, 1, 9, 8, torch.float32, seed=5)
    mask = random_mask(2, 1, 9, seed=5)
    mask[..., 6:] = False
    mask[..., 5] = True
    noisy_k, noisy_v = k.clone(), v.clone()
    noisy_k[..., 6:, :], noisy_v[..., 6:, :] = 1e3, -1e3
    short = reference_attention(q, k[..., :6, :], v[..., :6, :], mask[..., :6], 0.3)
    for kernel in (single_query_attention, reference_attention):
        torch.testing.assert_close(kernel(q, noisy_k, noisy_v, mask, 0.3), short)


def tiny_model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0, tie_word_embeddings=False)
    model = Qwen2ForCausalLM(cfg).eval()
    for name, p in model.named_parameters():
        if name.endswith("norm.weight") or name.endswith(".bias"):
            p.add_(0.1 * torch.randn_like(p))
    return model.to(dtype)


def prefill_and_decode(model, fixed_shape):
    """Left-padded prefill, then three one-token steps with a cache: the logits of every pass."""
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    cache = KVCache(model.config, 2, 9, dtype=model.lm_head.weight.dtype, fixed_shape=fixed_shape)
    out = [model(ids, mask, cache)]
    for step in range(3):
        mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
        out.append(model(torch.tensor([[3 + step], [4 + step]]), mask, cache))
    return out


@pytest.mark.parametrize("fixed_shape", [False, True])
def test_model_with_the_reference_kernel_gives_the_same_logits(monkeypatch, fixed_shape):
    model = tiny_model()
    fast = prefill_and_decode(model, fixed_shape)
    monkeypatch.setattr(model_module, "attention", reference_attention)
    plain = prefill_and_decode(model, fixed_shape)
    for a, b in zip(fast, plain):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_cache_widens_the_mask_only_for_fixed_shape_decoding():
    cfg = tiny_model().config
    mask = torch.ones(2, 1, 1, 5, dtype=torch.bool)
    assert KVCache(cfg, 2, 9).widen_mask(None) is None
    cache = KVCache(cfg, 2, 9, fixed_shape=True)
    assert cache.widen_mask(None) is None
    assert torch.equal(cache.widen_mask(torch.ones(2, 1, 3, 3, dtype=torch.bool)), torch.ones(2, 1, 3, 3).bool())
    cache.length = 4  # four tokens cached: a one-token pass reads all 9 slots, the last 4 masked
    wide = cache.widen_mask(mask)
    assert wide.shape == (2, 1, 1, 9) and wide[..., :5].all() and not wide[..., 5:].any()
    plain = KVCache(cfg, 2, 9)
    plain.length = 4
    assert plain.widen_mask(mask) is mask


def test_qwen2model_returns_hidden_states():
    """The decoder stack alone: ``model.model(ids)`` gives the hidden states lm_head turns into logits."""
    model = tiny_model()
    ids = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(1))
    hidden = model.model(ids)
    assert hidden.shape == (2, 6, 64)
    assert torch.equal(model.lm_head(hidden), model(ids))
    mask = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    assert torch.equal(model.lm_head(model.model(ids, mask)), model(ids, mask))
    with pytest.raises(ValueError, match="attention_mask"):
        model.model(ids, mask[:, 1:])


@pytest.mark.skipif(not packing_supported(), reason="no oneDNN bf16 linear here (torch build or CPU: AVX2 only)")
def test_packed_linear_is_a_module_swap_the_flop_counter_cannot_tell_apart():
    """pack_weights swaps PackedLinear in (same parameters, shapes and FLOP count, bit-identical bf16 logits);
    unpack_weights puts the very same nn.Linear modules back; generate leaves none behind."""
    model = tiny_model(torch.bfloat16, seed=3)
    ids = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(2))
    before = dict(model.named_modules())
    params = dict(model.named_parameters())
    with FlopCounter() as plain_fc:
        plain = model(ids)
    originals = pack_weights(model, 2, lm_head=True)
    assert len(originals) == 3 * 7 + 1 and all(before[name] is m for name, m in originals.items())
    packed_modules = {name: m for name, m in model.named_modules() if isinstance(m, PackedLinear)}
    assert packed_modules.keys() == originals.keys()
    for name, m in packed_modules.items():
        assert (m.in_features, m.out_features) == (originals[name].in_features, originals[name].out_features)
    assert all(p is params[name] for name, p in model.named_parameters())
    with FlopCounter() as packed_fc:
        packed = model(ids)
    unpack_weights(model, originals)
    assert torch.equal(plain, packed)
    assert packed_fc.counts == plain_fc.counts and packed_fc.matmul_2mnp == plain_fc.matmul_2mnp
    assert all(before[name] is m for name, m in model.named_modules())
    generate(model, [[1, 2, 3]], 3, pad_token_id=0)
    assert not any(isinstance(m, PackedLinear) for m in model.modules())
    with pytest.raises(RuntimeError, match="inside"):
        with packed_weights(model):
            raise RuntimeError("inside")
    assert all(before[name] is m for name, m in model.named_modules())  # put back on an error too


def test_packing_is_skipped_where_onednn_cannot_pack_bf16(monkeypatch):
    """On a CPU whose oneDNN has no bf16 linear (AVX2 only), pack_weights packs nothing and generate still runs
    on the plain layers, with the same tokens."""
    model = tiny_model(torch.bfloat16, seed=3)
    want = generate(model, [[1, 2, 3]], 4, pad_token_id=0)
    monkeypatch.setattr(packing, "packing_supported", lambda: False)
    before = dict(model.named_modules())
    assert pack_weights(model, 2, lm_head=True) == {}
    assert all(before[name] is m for name, m in model.named_modules())
    assert generate(model, [[1, 2, 3]], 4, pad_token_id=0) == want
