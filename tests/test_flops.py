"""FLOP accounting: the closed form by hand, counter == closed form, 2mnp == torch's FlopCounterMode, the ledger,
and the ``experiments.flops`` report.

The rules are the coursework FLOP table written out at the top of ``miniqwen/flop_count.py``.
"""

from __future__ import annotations

import json
import os

import pytest

from experiments.lib.budget import BUDGET, BudgetExceededError, Ledger, LedgerError
from experiments.flops import spent_by_stage
from experiments.lib.tables import ledger_table
from miniqwen.config import Qwen2Config
from miniqwen.flop_count import (
    COMPONENTS,
    FlopCounter,
    forward_flops,
    forward_flops_breakdown,
    generation_flops,
    training_flops,
)


def hand_config(**kw):
    """1 layer, d=8, Hq=2, Hkv=1, D=4, I=16, V=11."""
    return Qwen2Config(vocab_size=11, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, **kw)


def nonzero(bd: dict) -> dict:
    return {k: v for k, v in sorted(bd.items()) if v}


# ----------------------------------------------------------------------------------------- closed form alone


def test_closed_form_by_hand_tiny_config():
    """B=1, T=3, no cache: every component expanded by hand from the table (N=3, S=3)."""
    c = hand_config()
    assert c.head_dim == 4
    expected = {
        "embedding": 0,
        "norm": 3 * 3 * (4 * 8 + 11),          # 2 layer norms + final norm, N·(4d+11) each = 387
        "attn.q_proj": 3 * 8 * 15 + 3 * 8,     # N·Hq·D·(2d−1) + bias N·Hq·D = 384
        "attn.k_proj": 3 * 4 * 15 + 3 * 4,     # 192
        "attn.v_proj": 3 * 4 * 15 + 3 * 4,     # 192
        "attn.rope": (3 * 2 + 3 * 1) * (12 + 2),  # (N·Hq + N·Hkv)·(3D + D/2) = 126
        "attn.scores": 2 * 3 * 3 * 7,          # B·Hq·T·S·(2D−1) = 126
        "attn.scale": 2 * 3 * 3,               # 18
        "attn.mask": 2 * 3 * 3,                # 18
        "attn.softmax": 2 * (11 * 9 + 3 * 2),  # B·Hq·(11·T·S + T·(S−1)) = 210
        "attn.values": 2 * 3 * 4 * 5,          # B·Hq·T·D·(2S−1) = 120
        "attn.o_proj": 3 * 8 * 15,             # N·d·(2·Hq·D − 1) = 360
        "residual": 2 * 3 * 8,                 # 48
        "mlp.gate_proj": 3 * 16 * 15,          # 720
        "mlp.up_proj": 3 * 16 * 15,            # 720
        "mlp.act": 13 * 3 * 16,                # 624
        "mlp.mul": 3 * 16,                     # 48
        "mlp.down_proj": 3 * 8 * 31,           # N·d·(2I−1) = 744
        "lm_head": 3 * 11 * 15,                # B·K·V·(2d−1) = 495
        "lora": 0,
    }
    assert forward_flops_breakdown(c, 1, 3) == expected
    assert list(forward_flops_breakdown(c, 1, 3)) == list(COMPONENTS)
    assert forward_flops(c, 1, 3) == 5532 == sum(expected.values())
    assert training_flops(c, 1, 3) == 3 * 5532


def test_closed_form_by_hand_lora_cache_and_logits_to_keep():
    c = hand_config()
    # LoRA r=2 on q (8→8) and v (8→4), N=3: N·r·(2·in−1) + N·out·(2r−1) + N·out + N·out
    q = 3 * 2 * 15 + 3 * 8 * 3 + 3 * 8 + 3 * 8    # 210
    v = 3 * 2 * 15 + 3 * 4 * 3 + 3 * 4 + 3 * 4    # 150
    assert forward_flops_breakdown(c, 1, 3, lora_rank=2)["lora"] == q + v == 360
    assert forward_flops(c, 1, 3, lora_rank=2) == 5532 + 360
    # all seven targets, r=1: adds k (8→4), o (8→8), gate/up (8→16), down (16→8)
    one = lambda i, o: 3 * 1 * (2 * i - 1) + 3 * o * 1 + 3 * o + 3 * o  # noqa: E731
    allt = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert forward_flops_breakdown(c, 1, 3, lora_rank=1, lora_targets=allt)["lora"] == (
        one(8, 8) + one(8, 4) + one(8, 4) + one(8, 8) + one(8, 16) + one(8, 16) + one(16, 8))
    # one decode step: T=1 against a cache of 3 (S=4)
    bd = forward_flops_breakdown(c, 1, 1, cache_len=3)
    assert bd["attn.scores"] == 2 * 1 * 4 * 7
    assert bd["attn.softmax"] == 2 * (11 * 4 + 1 * 3)
    assert bd["attn.values"] == 2 * 1 * 4 * 7
    assert bd["attn.q_proj"] == 8 * 15 + 8 and bd["lm_head"] == 11 * 15
    # logits_to_keep: only K positions through lm_head; 0 = all; more than T = all
    assert forward_flops_breakdown(c, 1, 3, logits_to_keep=1)["lm_head"] == 1 * 11 * 15
    assert forward_flops_breakdown(c, 2, 3, logits_to_keep=2)["lm_head"] == 2 * 2 * 11 * 15
    assert forward_flops_breakdown(c, 1, 3, logits_to_keep=9)["lm_head"] == 3 * 11 * 15


def test_closed_form_head_rows():
    """Constrained decoding computes R rows of lm_head instead of V: B·K·R·(2d−1); nothing else changes."""
    c = hand_config()
    full = forward_flops_breakdown(c, 2, 3)
    some = forward_flops_breakdown(c, 2, 3, head_rows=4)
    assert some["lm_head"] == 2 * 3 * 4 * 15
    assert {k: v for k, v in some.items() if k != "lm_head"} == {k: v for k, v in full.items() if k != "lm_head"}
    assert forward_flops_breakdown(c, 2, 3, head_rows=11) == full == forward_flops_breakdown(c, 2, 3, head_rows=None)
    assert forward_flops_breakdown(c, 1, 3, logits_to_keep=1, head_rows=3)["lm_head"] == 1 * 3 * 15
    assert forward_flops(c, 2, 3, head_rows=4) == forward_flops(c, 2, 3) - 2 * 3 * (11 - 4) * 15
    # generation: every pass (prefill with 1 logit, then one-token steps) uses R rows; each of the 3 steps attends
    # over the whole cache of 5 + 4 slots (KVCache(fixed_shape=True))
    g = forward_flops(c, 2, 5, logits_to_keep=1, head_rows=4) + 3 * forward_flops(
        c, 6, 1, cache_len=5 + 4 - 1, logits_to_keep=1, head_rows=4)
    assert generation_flops(c, 5, 4, 2, num_samples=3, head_rows=4) == g
    assert generation_flops(c, 5, 4, 2, 0, ("q_proj", "v_proj"), 3) == generation_flops(c, 5, 4, 2, num_samples=3)
    # prompts of different lengths: each prefilled alone at its length, decoding over the longest (left-padded)
    g = forward_flops(c, 1, 5, logits_to_keep=1) + forward_flops(c, 1, 2, logits_to_keep=1) + 3 * forward_flops(
        c, 2, 1, cache_len=5 + 4 - 1, logits_to_keep=1)
    assert generation_flops(c, [5, 2], 4) == generation_flops(c, [5, 2], 4, 2) == g
    assert generation_flops(c, [5, 5], 4) == generation_flops(c, 5, 4, 2)
    for lengths, batch in (([], 1), ([5, 2], 3)):
        with pytest.raises(ValueError, match="prompt_len"):
            generation_flops(c, lengths, 4, batch)
    # Qwen2.5-0.5B decode step constrained to 13 tokens (digits . , ;), as in forward_flops_breakdown's docstring
    q = Qwen2Config()
    assert forward_flops_breakdown(q, 1, 1, cache_len=511, head_rows=13)["lm_head"] == 13 * 1791 == 23_283
    assert forward_flops(q, 1, 1, cache_len=511, head_rows=13) == 1_035_688_267 - (151936 - 13) * 1791
    for bad in (0, 12, -1, 4.0, True):
        with pytest.raises(ValueError, match="head_rows"):
            forward_flops(c, 1, 3, head_rows=bad)
        with pytest.raises(ValueError, match="head_rows"):
            generation_flops(c, 3, 2, head_rows=bad)


def test_closed_form_scaling_and_monotonicity():
    c = Qwen2Config()
    for T in (1, 17, 512):
        one = forward_flops(c, 1, T, lora_rank=4, cache_len=5)
        assert forward_flops(c, 7, T, lora_rank=4, cache_len=5) == 7 * one  # exactly linear in batch
    # per-layer part is exactly linear in the number of layers
    f = {L: forward_flops_breakdown(Qwen2Config(num_hidden_layers=L), 1, 64) for L in (1, 2, 5)}
    layer = {k: f[2][k] - f[1][k] for k in COMPONENTS}
    assert all(f[5][k] == f[1][k] + 4 * layer[k] for k in COMPONENTS)
    assert layer["lm_head"] == 0 and layer["norm"] == 2 * 64 * (4 * 896 + 11)
    # grows with length, cache and rank
    assert forward_flops(c, 1, 128) < forward_flops(c, 1, 512) < forward_flops(c, 1, 768)
    assert forward_flops(c, 1, 1, cache_len=10) < forward_flops(c, 1, 1, cache_len=11)
    ranks = [forward_flops(c, 1, 512, lora_rank=r) for r in (0, 2, 4, 8)]
    assert ranks == sorted(ranks) and len(set(ranks)) == 4
    # generation = prefill (1 logit) + (new − 1) one-token steps, each over all 800 + 200 cache slots
    g = forward_flops(c, 1, 800, logits_to_keep=1) + 199 * forward_flops(c, 1, 1, cache_len=999, logits_to_keep=1)
    assert generation_flops(c, 800, 200) == g


def test_closed_form_qwen05b_numbers_in_docstring():
    """The Qwen2.5-0.5B figures quoted in forward_flops_breakdown's docstring."""
    c = Qwen2Config()
    assert forward_flops(c, 1, 512) == 530_272_392_704
    assert forward_flops(c, 1, 512, logits_to_keep=1) == 391_220_413_568
    assert forward_flops_breakdown(c, 1, 512)["lm_head"] == 512 * 151936 * 1791 == 139_324_096_512
    assert forward_flops(c, 1, 1, cache_len=511) == 530_272_392_704 // 512 == 1_035_688_267
    assert forward_flops(c, 1, 512, lora_rank=4) - forward_flops(c, 1, 512) == 512 * 565_056


@pytest.mark.parametrize("kwargs", [dict(batch_size=0, seq_len=1), dict(batch_size=1, seq_len=0),
                                    dict(batch_size=1, seq_len=1, cache_len=-1),
                                    dict(batch_size=1, seq_len=1, lora_rank=-1),
                                    dict(batch_size=1, seq_len=1, logits_to_keep=-1),
                                    dict(batch_size=1.0, seq_len=1),
                                    dict(batch_size=1, seq_len=1, lora_rank=2, lora_targets=("lm_head",))])
def test_closed_form_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        forward_flops(hand_config(), **kwargs)


# ------------------------------------------------------------------------------- counter == closed form

TINY = {
    # name: (config kwargs) — 2 layers, d=32; tied/untied; GQA 4:2, MHA 4:4, 6:2, 4:1 with head_dim ≠ d/Hq
    "tied_gqa2": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "untied_mha": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False),
    "tied_gqa3": dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True),
    "untied_gqa4_hd12": dict(num_attention_heads=4, num_key_value_heads=1, head_dim=12, tie_word_embeddings=False),
}


def tiny_config(name: str) -> Qwen2Config:
    kw = dict(vocab_size=37, hidden_size=32, intermediate_size=40, num_hidden_layers=2, rope_theta=10000.0)
    kw.update(TINY[name])
    return Qwen2Config(**kw)


def _model_api():
    model = pytest.importorskip("miniqwen.model", reason="miniqwen/model.py not written yet")
    if not hasattr(model, "Qwen2ForCausalLM"):
        pytest.skip("miniqwen.model has no Qwen2ForCausalLM yet")
    return model


def _apply_lora():
    try:
        import lora
    except ImportError:
        pytest.skip("lora package not importable yet")
    if not hasattr(lora, "apply_lora"):
        where = list(getattr(lora, "__path__", []))
        pytest.skip(f"lora.apply_lora not found (lora imported from {where}: not written yet, or a stale editable "
                    "install that maps lora/ as a namespace package; reinstall with `pip install -e .` or run "
                    "`python -m pytest` from the repo root)")
    return lora.apply_lora


def build(name: str, rank: int = 0, seed: int = 0):
    import torch

    mq = _model_api()
    torch.manual_seed(seed)
    model = mq.Qwen2ForCausalLM(tiny_config(name)).eval()
    if rank:
        _apply_lora()(model, rank)
    return model


def counted(model, *args, **kwargs):
    import torch

    with torch.no_grad(), FlopCounter() as fc:
        out = model(*args, **kwargs)
    return fc, out


@pytest.mark.parametrize("name", list(TINY))
@pytest.mark.parametrize("rank", [0, 2, 4])
def test_counter_equals_closed_form(name, rank):
    import torch

    model = build(name, rank)
    cfg = model.config
    g = torch.Generator().manual_seed(1)
    for B, T, keep in ((1, 1, 0), (1, 9, 0), (3, 6, 0), (2, 7, 1), (2, 7, 3)):
        ids = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
        fc, logits = counted(model, ids, logits_to_keep=keep)
        assert logits.shape == (B, keep or T, cfg.vocab_size)
        want = forward_flops_breakdown(cfg, B, T, lora_rank=rank, logits_to_keep=keep)
        assert fc.breakdown() == nonzero(want), (B, T, keep)
        assert fc.total == forward_flops(cfg, B, T, lora_rank=rank, logits_to_keep=keep)
    # padding (left-padded row) costs exactly like real tokens
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    fc, _ = counted(model, torch.randint(0, cfg.vocab_size, (2, 5), generator=g), attention_mask=mask)
    assert fc.total == forward_flops(cfg, 2, 5, lora_rank=rank)


@pytest.mark.parametrize("name", ["tied_gqa2", "untied_gqa4_hd12"])
@pytest.mark.parametrize("rank", [0, 2])
def test_counter_equals_closed_form_with_cache(name, rank):
    """Prefill (logits only for the last position) then decode one token at a time with the KV cache."""
    import torch

    mq = _model_api()
    model = build(name, rank)
    cfg = model.config
    B, P = 2, 6
    cache = mq.KVCache(cfg, B, 16, dtype=torch.float32)
    ids = torch.randint(0, cfg.vocab_size, (B, P), generator=torch.Generator().manual_seed(2))
    fc, logits = counted(model, ids, cache=cache, logits_to_keep=1)
    assert cache.length == P
    assert fc.breakdown() == nonzero(forward_flops_breakdown(cfg, B, P, lora_rank=rank, logits_to_keep=1))
    steps = []
    for step in range(3):
        nxt = logits[:, -1:].argmax(-1)
        fc, logits = counted(model, nxt, cache=cache)
        assert fc.breakdown() == nonzero(forward_flops_breakdown(cfg, B, 1, lora_rank=rank, cache_len=P + step))
        steps.append(logits)
    # a multi-token chunk on top of the cache (S = cache_len + T)
    chunk = torch.randint(0, cfg.vocab_size, (B, 3), generator=torch.Generator().manual_seed(3))
    fc, _ = counted(model, chunk, cache=cache, logits_to_keep=2)
    assert fc.total == forward_flops(cfg, B, 3, lora_rank=rank, cache_len=P + 3, logits_to_keep=2)
    # generate's cache (fixed_shape): every one-token step attends over all P + 4 slots, counted so; same logits
    cache = mq.KVCache(cfg, B, P + 4, dtype=torch.float32, fixed_shape=True)
    fc, logits = counted(model, ids, cache=cache, logits_to_keep=1)
    total = fc.total
    for step in range(3):
        fc, logits = counted(model, logits[:, -1:].argmax(-1), cache=cache)
        assert fc.breakdown() == nonzero(forward_flops_breakdown(cfg, B, 1, lora_rank=rank, cache_len=P + 3))
        assert torch.allclose(logits, steps[step], atol=1e-5, rtol=1e-5)
        total += fc.total
    assert total == generation_flops(cfg, P, 4, batch_size=B, lora_rank=rank)


@pytest.mark.parametrize("name", ["tied_gqa2", "untied_gqa4_hd12"])
@pytest.mark.parametrize("rank", [0, 2])
def test_counter_equals_closed_form_with_head_rows(name, rank):
    """Logits for some rows of lm_head only (constrained decoding): counted as B·K·R·(2d−1), with and without
    a cache and logits_to_keep."""
    import torch

    mq = _model_api()
    model = build(name, rank)
    cfg = model.config
    head = model.head_rows([3, 1, 4, 1, 5, 9, 2, 6])  # 7 distinct rows
    R = 7
    g = torch.Generator().manual_seed(6)
    for B, T, keep in ((1, 1, 0), (3, 6, 0), (2, 7, 1), (2, 7, 3)):
        fc, logits = counted(model, torch.randint(0, cfg.vocab_size, (B, T), generator=g), logits_to_keep=keep,
                             head_rows=head)
        assert logits.shape == (B, keep or T, R)
        want = forward_flops_breakdown(cfg, B, T, lora_rank=rank, logits_to_keep=keep, head_rows=R)
        assert fc.breakdown() == nonzero(want), (B, T, keep)
    cache = mq.KVCache(cfg, 2, 9)
    fc, _ = counted(model, torch.randint(0, cfg.vocab_size, (2, 5), generator=g), cache=cache, logits_to_keep=1,
                    head_rows=head)
    assert fc.total == forward_flops(cfg, 2, 5, lora_rank=rank, logits_to_keep=1, head_rows=R)
    fc, _ = counted(model, torch.randint(0, cfg.vocab_size, (2, 1), generator=g), cache=cache, head_rows=head)
    assert fc.total == forward_flops(cfg, 2, 1, lora_rank=rank, cache_len=5, head_rows=R)
    # the matmul part in 2·m·n·p still equals torch's FlopCounterMode (the slice is an F.linear on R rows)
    fc, fm = _torch_count(model, torch.randint(0, cfg.vocab_size, (2, 4), generator=g), cpu_sdpa=True,
                          head_rows=head)
    assert fc.matmul_2mnp == fm.get_total_flops()


# ---------------------------------------------------------------------- 2·m·n·p versus torch's FlopCounterMode


def _sdpa_2mnp(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """QKᵀ and PV of scaled-dot-product attention as 2·m·n·p (per batch·head), written here from the shapes."""
    b, h, s_q, d = query_shape
    s_k, d_v = key_shape[2], value_shape[3]
    return b * h * (2 * s_q * d * s_k + 2 * s_q * s_k * d_v)


def _torch_count(model, *args, cpu_sdpa: bool, **kwargs):
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_2mnp} if cpu_sdpa else None
    with torch.no_grad(), FlopCounter() as fc, FlopCounterMode(display=False, custom_mapping=mapping) as fm:
        model(*args, **kwargs)
    return fc, fm


@pytest.mark.parametrize("rank", [0, 2])
@pytest.mark.parametrize("name", ["tied_gqa2", "untied_gqa4_hd12"])
def test_matmul_2mnp_equals_torch_flop_counter(name, rank):
    """The counter's matmul part in 2·m·n·p equals FlopCounterMode's total, once FlopCounterMode is taught the
    CPU attention kernel.

    Why the teaching: on CPU, ``F.scaled_dot_product_attention`` dispatches to
    ``aten._scaled_dot_product_flash_attention_for_cpu``, which torch's flop registry does not list (it has the
    CUDA flash / efficient / cudnn kernels only), so plain FlopCounterMode counts QKᵀ and PV as 0 on CPU. Linear
    layers appear as ``aten.addmm`` (with bias; the bias add is not counted, same as ``matmul_2mnp``) or
    ``aten.mm`` — both 2·m·n·p. RoPE tables are built by broadcasting, not a matmul, so nothing else appears.
    """
    import torch

    model = build(name, rank)
    cfg = model.config
    B, T = 2, 5
    ids = torch.randint(0, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(4))
    fc, fm = _torch_count(model, ids, cpu_sdpa=True)
    assert fc.matmul_2mnp == fm.get_total_flops()

    # without the mapping, the gap is exactly the attention matmuls (when torch lacks the CPU kernel's formula)
    fc, fm = _torch_count(model, ids, cpu_sdpa=False)
    from torch.utils.flop_counter import FlopCounterMode

    registry = FlopCounterMode(display=False).flop_registry
    attention = cfg.num_hidden_layers * B * cfg.num_attention_heads * 2 * (2 * T * cfg.head_dim * T)
    if torch.ops.aten._scaled_dot_product_flash_attention_for_cpu in registry:
        assert fc.matmul_2mnp == fm.get_total_flops()
    else:
        assert fc.matmul_2mnp - fm.get_total_flops() == attention
    ops = {str(k) for k in fm.get_flop_counts()["Global"]}
    assert ops <= {"aten.addmm", "aten.mm", "aten._scaled_dot_product_flash_attention_for_cpu"}, ops


def test_matmul_2mnp_with_cache_equals_torch_flop_counter():
    import torch

    mq = _model_api()
    model = build("tied_gqa3")
    cfg = model.config
    cache = mq.KVCache(cfg, 1, 12, dtype=torch.float32)
    ids = torch.randint(0, cfg.vocab_size, (1, 7), generator=torch.Generator().manual_seed(5))
    for chunk, keep in ((ids[:, :6], 1), (ids[:, 6:], 0)):
        fc, fm = _torch_count(model, chunk, cpu_sdpa=True, cache=cache, logits_to_keep=keep)
        assert fc.matmul_2mnp == fm.get_total_flops()


# -------------------------------------------------------------------------------------------------- ledger


def test_ledger_round_trip_and_persistence(tmp_path):
    path = tmp_path / "sub" / "ledger.jsonl"
    ledger = Ledger(path)
    assert ledger.entries() == [] and ledger.total() == 0
    e = ledger.charge("baseline_eval", 84_000_000_000_000, "generate", trajectories=100)
    assert e["stage"] == "baseline_eval" and e["flops"] == 84_000_000_000_000 and e["trajectories"] == 100
    assert e["time"].endswith("+00:00")
    ledger.charge("lora_default", 3 * 10**15, "train", steps=10)
    ledger.charge("baseline_eval", 10**13, "eval")
    again = Ledger(path)  # a new instance reads what the first wrote
    assert again.total() == 84 * 10**12 + 3 * 10**15 + 10**13
    assert spent_by_stage(again) == {"baseline_eval": 84 * 10**12 + 10**13, "lora_default": 3 * 10**15}
    assert [x["kind"] for x in again.entries()] == ["generate", "train", "eval"]
    text = path.read_text()
    assert text.endswith("\n") and len(text.splitlines()) == 3
    assert all(json.loads(line) for line in text.splitlines())
    assert sorted(p.name for p in path.parent.iterdir()) == ["ledger.jsonl", "ledger.jsonl.lock"]  # no temp
    table = ledger_table(again)
    assert "| baseline_eval | generate, eval | 9.40e+13 | 0.09% |" in table
    assert "| lora_default | train | 3.00e+15 | 3.00% |" in table
    assert "**3.09e+15**" in table


def test_ledger_default_path_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIQWEN_LEDGER", str(tmp_path / "env.jsonl"))
    assert Ledger().path == tmp_path / "env.jsonl"
    monkeypatch.delenv("MINIQWEN_LEDGER")
    monkeypatch.chdir(tmp_path)
    assert str(Ledger().path) == os.path.join("runs", "flops_ledger.jsonl")


@pytest.mark.parametrize("bad", ['{"stage": "a", "kind": "train", "flops": 5}',  # no final newline
                                 '{"stage": "a", "kind": "tr',                    # torn mid-object
                                 'not json\n',
                                 '{"stage": "a", "kind": "fly", "flops": 5}\n',
                                 '{"stage": "a", "kind": "train", "flops": 1.5}\n',
                                 '\n'])
def test_ledger_invalid_line_raises_with_file_and_line(tmp_path, bad):
    path = tmp_path / "l.jsonl"
    ledger = Ledger(path)
    ledger.charge("a", 1, "train")
    with open(path, "a") as f:
        f.write(bad)
    with pytest.raises(LedgerError, match=rf"{path.name}:2"):
        ledger.entries()
    with pytest.raises(LedgerError):
        ledger.total()
    with pytest.raises(LedgerError):  # nothing is appended to a corrupt ledger
        ledger.charge("b", 1, "eval")
    assert path.read_text().endswith(bad)


def test_ledger_rejects_bad_entries(tmp_path):
    ledger = Ledger(tmp_path / "l.jsonl")
    for args, kw in ((("s", 1, "training"), {}), (("s", -1, "train"), {}), (("", 1, "train"), {}),
                     (("s", 1.5, "train"), {}), (("s", 1, "train"), {"time": "now"}),
                     (("s", 1, "train"), {"obj": object()})):
        with pytest.raises(ValueError):
            ledger.charge(*args, **kw)
    assert ledger.entries() == []
    assert ledger.charge("s", 1e15, "train")["flops"] == 10**15  # integral floats are stored as int


def test_ledger_check(tmp_path, capsys):
    ledger = Ledger(tmp_path / "l.jsonl")
    ledger.charge("lora_default", 6 * 10**16, "train")
    ledger.check(4 * 10**16)  # exactly at the budget is allowed
    out = capsys.readouterr().out
    assert "4.00e+16" in out and "6.00e+16" in out and "1.00e+17" in out
    with pytest.raises(BudgetExceededError, match="--force"):
        ledger.check(4 * 10**16 + 1)
    ledger.check(5 * 10**16, force=True)
    assert "WARNING" in capsys.readouterr().err
    with pytest.raises(BudgetExceededError):
        ledger.check(10, budget=6 * 10**16)
    with pytest.raises(ValueError):
        ledger.check(-1)
    assert BUDGET == 10**17


# ---------------------------------------------------------------------------------------- experiments.flops


def test_report_writes_tables(tmp_path, capsys):
    from experiments.flops import main, stage_plans

    ledger = Ledger(tmp_path / "l.jsonl")
    ledger.charge("baseline_eval", 8 * 10**13, "generate")
    assert main(["--out", str(tmp_path / "out"), "--ledger", str(ledger.path)]) == 0
    md = (tmp_path / "out" / "flop_tables.md").read_text()
    data = json.loads((tmp_path / "out" / "flop_tables.json").read_text())
    assert md in capsys.readouterr().out
    c = Qwen2Config()
    assert data["per_token_512"]["all_logits"] == forward_flops(c, 1, 512) / 512
    assert data["components"]["total_training"]["4"]["768"] == training_flops(c, 1, 768, lora_rank=4)
    assert data["ledger"]["total"] == 8 * 10**13
    plans = stage_plans(c)
    assert data["plan_total"] == sum(sum(parts.values()) for parts in plans.values()) <= 10**17
    # the default LoRA stage: 1,000 training steps at batch 4 x 512, rank 4, plus its validation losses
    assert plans["lora_default"]["training"] >= 1_000 * training_flops(c, 4, 512, lora_rank=4)
    for heading in ("(a)", "(b)", "(c)", "(d)"):
        assert f"## {heading}" in md


def test_report_bad_model_dir_and_bad_ledger(tmp_path, capsys):
    from experiments.flops import main

    assert main(["--out", str(tmp_path / "o"), "--model", str(tmp_path / "nope")]) == 2
    assert "not a directory" in capsys.readouterr().err
    (tmp_path / "m").mkdir()
    assert main(["--out", str(tmp_path / "o"), "--model", str(tmp_path / "m")]) == 2
    assert "config.json" in capsys.readouterr().err
    (tmp_path / "m" / "config.json").write_text(json.dumps(tiny_config("tied_gqa2").to_dict()))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"stage": "a", "kind": "train", "flops": 1}')  # torn: no newline
    from experiments.lib.budget import LedgerError

    with pytest.raises(LedgerError, match="bad.jsonl"):  # refused before anything is written
        main(["--out", str(tmp_path / "o"), "--model", str(tmp_path / "m"), "--ledger", str(bad)])
    assert not (tmp_path / "o" / "flop_tables.md").exists()


@pytest.mark.parametrize("num_samples", [1, 2])
def test_generate_costs_generation_flops(num_samples):
    """miniqwen.generate.generate (no early stop) costs exactly generation_flops."""
    import torch

    gen = pytest.importorskip("miniqwen.generate", reason="miniqwen/generate.py not written yet")
    model = build("tied_gqa2")
    prompts = [[1, 2, 3, 4], [5, 6, 7]]  # prefilled alone, then the second is left-padded to 4 for decoding
    with torch.no_grad(), FlopCounter() as fc:
        out = gen.generate(model, prompts, 5, pad_token_id=0, num_samples=num_samples)
    assert len(out) == 2 * num_samples and all(len(o) == 5 for o in out)
    assert fc.total == generation_flops(model.config, [4, 3], 5, batch_size=2, num_samples=num_samples)
    # constrained to some tokens: only those rows of lm_head are computed, and generation_flops(head_rows=) agrees
    with torch.no_grad(), FlopCounter() as fc:
        out = gen.generate(model, prompts, 5, pad_token_id=0, num_samples=num_samples, temperature=1.0,
                           allowed_token_ids=[7, 3, 30, 3])
    assert len(out) == 2 * num_samples and all(len(o) == 5 and set(o) <= {3, 7, 30} for o in out)
    assert fc.total == generation_flops(model.config, [4, 3], 5, num_samples=num_samples, head_rows=3)
