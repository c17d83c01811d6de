"""bf16 matmuls in float32 kernels (miniqwen.emulation): the definition on each op, the model end to end against
PyTorch's own bf16, float32 untouched, and the stages turning it on where bf16 is not native."""

from contextlib import ExitStack

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import _get_current_dispatch_mode

from lora.layers import apply_lora
from miniqwen import Qwen2Config, Qwen2ForCausalLM
from miniqwen.emulation import Float32Matmuls

aten = torch.ops.aten
bf16 = torch.bfloat16


GEN = torch.Generator().manual_seed(0)


def randn(*shape, dtype=bf16):
    return torch.randn(*shape, generator=GEN, dtype=torch.float32).to(dtype)


@pytest.mark.parametrize("op", ["mm", "addmm", "bmm", "baddbmm"])
def test_each_matmul_is_the_float32_product_of_the_bf16_values_rounded_to_bf16(op):
    a, b, c = randn(2, 5, 33), randn(2, 33, 7), randn(2, 5, 7)
    args = {"mm": (a[0], b[0]), "addmm": (c[0], a[0], b[0]), "bmm": (a, b), "baddbmm": (c, a, b)}[op]
    with Float32Matmuls():
        got = getattr(torch, op)(*args)
    expected = getattr(torch, op)(*(x.float() for x in args)).to(bf16)
    assert got.dtype == bf16 and torch.equal(got, expected)


def test_fused_attention_returns_the_dtypes_of_the_bf16_kernel_and_float32_values():
    q, k, v = randn(1, 4, 6, 8), randn(1, 2, 6, 8), randn(1, 2, 6, 8)
    with Float32Matmuls():
        got = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True, enable_gqa=True)
    assert got.dtype == bf16
    torch.testing.assert_close(got, expected.to(bf16), rtol=0, atol=0)
    out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k.repeat_interleave(2, 1),
                                                                v.repeat_interleave(2, 1), is_causal=True)
    with Float32Matmuls():
        out2, lse2 = aten._scaled_dot_product_flash_attention_for_cpu(q, k.repeat_interleave(2, 1),
                                                                      v.repeat_interleave(2, 1), is_causal=True)
    assert (out2.dtype, lse2.dtype) == (out.dtype, lse.dtype) == (bf16, torch.float32)


def tiny_lora_model(dtype):
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = Qwen2ForCausalLM(config).to(dtype)
    apply_lora(model, rank=4)
    with torch.no_grad():  # B starts at zero: give it values so that A's gradient is not zero too
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return model


def loss_and_grads(model, ids, *contexts):
    """Logits and the LoRA gradients of one next-token loss, computed within ``contexts``."""
    model.zero_grad()
    with ExitStack() as stack:
        for context in contexts:
            stack.enter_context(context)
        logits = model(ids)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
    return logits.float(), torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])


def test_a_training_step_matches_pytorchs_own_bf16_within_bf16_rounding():
    """Forward and backward of the LoRA model in bf16: emulated and PyTorch's own bf16 kernels each differ from
    float32 by bf16 rounding, and from each other by no more than that."""
    ids = torch.randint(0, 96, (2, 24), generator=GEN)
    reference = loss_and_grads(tiny_lora_model(torch.float32), ids)  # float32 throughout, no autocast
    native = loss_and_grads(tiny_lora_model(bf16), ids, torch.autocast("cpu", dtype=bf16))
    emulated = loss_and_grads(tiny_lora_model(bf16), ids, Float32Matmuls(), torch.autocast("cpu", dtype=bf16))

    def rel(x, y):
        return ((x - y).norm() / y.norm()).item()

    for i in range(2):  # logits, then the LoRA gradients
        bf16_noise = rel(native[i], reference[i])
        assert 0 < bf16_noise < 0.05
        assert rel(emulated[i], reference[i]) < 2 * bf16_noise
        assert rel(emulated[i], native[i]) < 2 * bf16_noise


def test_float32_computation_is_untouched():
    model = tiny_lora_model(torch.float32)
    ids = torch.randint(0, 96, (2, 12), generator=GEN)
    with torch.no_grad():
        plain = model(ids)
        with Float32Matmuls():
            within = model(ids)
    assert torch.equal(plain, within)


def test_a_stage_computing_in_bf16_on_a_cpu_without_it_emulates_inside_its_block(monkeypatch, tmp_path,
                                                                                   tiny_full_vocab, capsys):
    """Loading the model enters nothing; the stage's ``with loader.emulation(...)`` block runs bf16 matmuls in
    float32 kernels, says so once, and leaves them when the block ends."""
    from experiments.lib import loader
    from experiments.lib.session import Session
    from experiments.lib.settings import DataSettings, RunSettings

    monkeypatch.setattr(loader, "emulated_precision", lambda device, precision: "note: emulated")
    session = Session("baseline", RunSettings(out=str(tmp_path / "b"), model=str(tiny_full_vocab),
                                              device="cpu", precision="bfloat16"), DataSettings())
    session.model
    assert _get_current_dispatch_mode() is None
    with loader.emulation(session.device, session.precision):
        assert isinstance(_get_current_dispatch_mode(), Float32Matmuls)
        assert "note: emulated" in capsys.readouterr().err
    assert _get_current_dispatch_mode() is None
