"""LoRA layers (Hu et al. 2021): math, init, merge, freezing, parameter counts, FLOPs, save/load, PEFT export."""

import json

import pytest
import torch
from torch import nn

from lora import (
    AdapterError,
    LoRALinear,
    apply_lora,
    count_trainable_parameters,
    export_peft,
    load_adapter,
    lora_modules,
    lora_parameter_count,
    lora_state_dict,
    merge_lora,
    merged,
    save_adapter,
    unmerge_lora,
)
from miniqwen import FlopCounter, Qwen2Config, Qwen2ForCausalLM, load_pretrained
from miniqwen.flop_count import forward_flops_breakdown

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(**TINY)).eval()


def randomize_lora(model, seed=1):
    """Give every lora_B random values (fresh B is zero, which would hide any mistake in B or the scaling)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)


def test_lora_linear_matches_explicit_formula():
    torch.manual_seed(0)
    base = nn.Linear(12, 7, bias=True)
    W, b = base.weight.detach().clone(), base.bias.detach().clone()
    layer = LoRALinear(base, rank=3, alpha=6.0)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(2, 5, 12)
    A, B = layer.lora_A.weight, layer.lora_B.weight
    assert A.shape == (3, 12) and B.shape == (7, 3)
    expected = x @ W.T + b + (6.0 / 3) * (x @ A.T @ B.T)
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=1e-6)
    assert layer.scaling == 2.0 and LoRALinear(nn.Linear(4, 4), rank=4).scaling == 1.0  # alpha defaults to rank


def test_fresh_lora_leaves_output_unchanged_and_base_frozen():
    torch.manual_seed(0)
    base = nn.Linear(10, 6)
    x = torch.randn(4, 10)
    before = base(x).detach()
    layer = LoRALinear(base, rank=2)
    assert torch.count_nonzero(layer.lora_B.weight) == 0 and torch.count_nonzero(layer.lora_A.weight) > 0
    assert torch.equal(layer(x), before)
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert layer.lora_A.weight.requires_grad and layer.lora_B.weight.requires_grad
    assert layer.weight is base.weight  # the base parameter is taken over, not copied
    # Kaiming-uniform with a=√5 on [r, in]: bound = 1/√in
    assert layer.lora_A.weight.abs().max() <= 1 / 10 ** 0.5


def test_merged_context_forecasts_like_the_adapter_and_leaves_it_untouched():
    """Forecasts run on merged weights (W + BA·scale in plain nn.Linear modules): the same logits and greedy tokens
    as the unmerged adapter (float32 rounding), the base model's FLOP count, and afterwards the very same adapter
    modules with bit-identical weights (training can continue exactly)."""
    from miniqwen import generate

    model = tiny_model()
    apply_lora(model, rank=4, alpha=8, targets=("q_proj", "v_proj"))
    randomize_lora(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = lora_modules(model)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        unmerged = model(ids)
        tokens = generate(model, [ids[0].tolist(), ids[1].tolist()], 6, pad_token_id=0)
        with merged(model):
            assert not lora_modules(model) and all(type(m) is nn.Linear for n, m in model.named_modules()
                                                   if n.endswith(("q_proj", "v_proj")))
            inside = model(ids)
            with FlopCounter() as fc:
                model(ids)
            assert tokens == generate(model, [ids[0].tolist(), ids[1].tolist()], 6, pad_token_id=0)
    base = tiny_model()
    with torch.no_grad(), FlopCounter() as fc_base:
        base(ids)
    assert fc.total == fc_base.total and "lora" not in {k for k, v in fc.counts.items() if v}
    torch.testing.assert_close(inside, unmerged, atol=1e-5, rtol=1e-5)
    assert lora_modules(model) == modules
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_merge_unmerge_round_trip():
    model = tiny_model()
    apply_lora(model, rank=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"))
    randomize_lora(model)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    weights = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith(("lora_A.weight", "lora_B.weight"))}
    with torch.no_grad():
        unmerged = model(ids)
        merge_lora(model)
        merged = model(ids)
        with FlopCounter() as fc:
            model(ids)
        assert fc.counts["lora"] == 0  # merged: the update is inside the base matmul
        unmerge_lora(model)
        again = model(ids)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)  # logits here reach ~50
    torch.testing.assert_close(again, unmerged, atol=1e-5, rtol=1e-5)
    for k, v in model.state_dict().items():
        if k in weights:
            torch.testing.assert_close(v, weights[k], atol=1e-6, rtol=0)
    layer = next(iter(lora_modules(model).values()))
    with pytest.raises(RuntimeError):
        layer.unmerge()
    layer.merge()
    with pytest.raises(RuntimeError):
        layer.merge()


def test_apply_lora_freezes_everything_else_and_counts_by_formula():
    model = tiny_model()
    names_before = {k for k in model.state_dict()}
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    wrapped = apply_lora(model, rank=3, targets=targets)
    assert len(wrapped) == 3 * 7
    assert all(isinstance(model.get_submodule(n), LoRALinear) for n in wrapped)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{ab}.weight" for n in wrapped for ab in "AB"}
    # the base keys keep their Hugging Face names; only lora_A/lora_B keys are added
    assert names_before <= set(model.state_dict())
    d, I, D, Hq, Hkv = 64, 96, 16, 4, 2
    per_layer = 3 * ((d + Hq * D) + 2 * (d + Hkv * D) + (Hq * D + d) + 2 * (d + I) + (I + d))
    assert count_trainable_parameters(model) == 3 * per_layer == lora_parameter_count(model.config, 3, targets)
    with pytest.raises(ValueError):
        apply_lora(model, rank=3)  # twice
    with pytest.raises(ValueError):
        apply_lora(tiny_model(), rank=3, targets=("qkv",))
    with pytest.raises(ValueError):
        apply_lora(tiny_model(), rank=0)


def test_qwen25_05b_rank4_qv_has_270336_trainable_parameters():
    with torch.device("meta"):
        model = Qwen2ForCausalLM(Qwen2Config())
    apply_lora(model, rank=4)
    assert count_trainable_parameters(model) == 270_336
    assert lora_parameter_count(Qwen2Config(), 4) == 270_336


@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), ("k_proj", "o_proj", "gate_proj", "up_proj", "down_proj")])
def test_flops_with_lora_equal_without_plus_lora_formula(targets):
    model = tiny_model()
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), FlopCounter() as plain:
        model(ids)
    r = 3
    apply_lora(model, rank=r, targets=targets)
    with torch.no_grad(), FlopCounter() as adapted:
        model(ids)
    cfg, N = model.config, 2 * 11
    dims = {"q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32), "o_proj": (64, 64),
            "gate_proj": (64, 96), "up_proj": (64, 96), "down_proj": (96, 64)}
    lora = cfg.num_hidden_layers * sum(
        N * r * (2 * i - 1) + N * o * (2 * r - 1) + N * o + N * o for i, o in (dims[t] for t in targets))
    assert adapted.counts["lora"] == lora
    assert adapted.total == plain.total + lora
    assert {k: v for k, v in adapted.breakdown().items() if k != "lora"} == plain.breakdown()
    matmul_lora = cfg.num_hidden_layers * sum(2 * N * r * i + 2 * N * o * r for i, o in (dims[t] for t in targets))
    assert adapted.matmul_2mnp == plain.matmul_2mnp + matmul_lora
    # and the closed form agrees
    closed = forward_flops_breakdown(cfg, 2, 11, lora_rank=r, lora_targets=targets)
    assert closed["lora"] == lora and sum(closed.values()) == adapted.total


def test_save_load_round_trip(tmp_path):
    model = tiny_model()
    torch.manual_seed(5)
    apply_lora(model, rank=2, alpha=5, targets=("q_proj", "up_proj"))
    randomize_lora(model)
    save_adapter(model, tmp_path / "ad", base_model="tiny")
    assert sorted(p.name for p in (tmp_path / "ad").iterdir()) == ["adapter.safetensors", "adapter_config.json"]
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert config["rank"] == 2 and config["alpha"] == 5 and config["targets"] == ["q_proj", "up_proj"]

    fresh = tiny_model()  # same base weights, no LoRA yet: load_adapter applies it
    load_adapter(fresh, tmp_path / "ad")
    saved, loaded = lora_state_dict(model), lora_state_dict(fresh)
    assert saved.keys() == loaded.keys() and "model.layers.0.self_attn.q_proj.lora_A.weight" in saved
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    ids = torch.randint(0, 128, (1, 7))
    with torch.no_grad():
        assert torch.equal(model(ids), fresh(ids))
    assert count_trainable_parameters(fresh) == count_trainable_parameters(model)

    other = tiny_model()
    apply_lora(other, rank=3, targets=("q_proj", "up_proj"))
    with pytest.raises(AdapterError, match="differ"):
        load_adapter(other, tmp_path / "ad")
    with pytest.raises(AdapterError):
        load_adapter(tiny_model(), tmp_path / "missing")


def test_peft_export_gives_same_logits_as_transformers_plus_peft(tiny_checkpoint, tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    path, _ = tiny_checkpoint
    ours, _ = load_pretrained(path, device="cpu")
    torch.manual_seed(0)
    apply_lora(ours, rank=4, alpha=8, targets=("q_proj", "v_proj", "o_proj", "gate_proj"))
    randomize_lora(ours)
    export_peft(ours, tmp_path / "peft", base_model_name_or_path=str(path))
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["task_type"] == "CAUSAL_LM" and config["fan_in_fan_out"] is False

    base = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    # every adapter tensor must have been picked up (not left at PEFT's fresh init)
    their_state = peft.get_peft_model_state_dict(theirs)
    exported = lora_state_dict(ours)
    assert set(their_state) == {"base_model.model." + k for k in exported}
    ids = torch.randint(0, 128, (2, 13), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_the_flop_counters_default_targets_are_loras_default():
    import inspect

    import lora
    from miniqwen.flop_count import forward_flops

    assert inspect.signature(forward_flops).parameters["lora_targets"].default == lora.DEFAULT_LORA_TARGETS
