"""A trainable bias on the output head (``lm_head``), an opt-in extra trained beside the LoRA matrices.

Qwen2's ``lm_head`` has no bias (transformers' ``Qwen2ForCausalLM``: ``nn.Linear(hidden, vocab, bias=False)``).
Published runs of this coursework that forecast best trained one anyway, zero at start, with their LoRA adapters
(issue 22): ``logits = h Wᵀ + b``, b ∈ R^V. Since b starts at zero the model starts out exactly equal to the
pretrained one, as LoRA's B = 0 does (Hu et al. 2021, section 4.1).

:func:`add_head_bias` replaces ``model.lm_head`` by a :class:`BiasedHead` that holds the head's own ``weight``
Parameter (the same object, so a head tied to the embeddings stays tied, and frozen) plus a trainable ``bias``
[vocab_size], zeros, in float32 (the optimizer then updates it at full precision, like the LoRA matrices); in the
forward it is cast to the weight's dtype. :func:`remove_head_bias` puts a plain bias-free ``nn.Linear`` back
(``lora.remove_lora`` calls it too: the bias belongs to the adapter).

Cost (coursework rules, an add = 1 FLOP): V extra FLOPs per position whose logits are computed — K with a
restricted head (``miniqwen.model.HeadRows``: the forward adds the K selected bias entries) — i.e. 151,936 per
position for Qwen2.5-0.5B, 0.056 % of that head's V·(2d − 1) = 2.72e8; counted by ``miniqwen.model`` and in the
closed form (``miniqwen.flop_count.forward_flops(..., head_bias=True)``). Trainable parameters: + V = 151,936 (a
rank-4 q,v adapter has 270,336, rank 8 540,672).

Saved with our adapter (:mod:`lora.io`) as the tensor ``lm_head.bias`` and ``"head_bias": true`` in
``adapter_config.json``. PEFT's ``LoraConfig`` has no place for a bias on a module it does not wrap (its ``bias``
option trains the existing biases of the wrapped layers, and ``modules_to_save`` would save the whole V × d head),
so :func:`lora.export_peft` writes it beside the PEFT adapter as ``head_bias.safetensors`` (key ``lm_head.bias``,
float32). A transformers + peft user adds it after loading the adapter::

    from safetensors.torch import load_file
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter_dir)
    head = model.get_output_embeddings()                      # the nn.Linear lm_head (bias None)
    bias = load_file(f"{adapter_dir}/head_bias.safetensors")["lm_head.bias"]
    head.bias = torch.nn.Parameter(bias.to(head.weight.dtype), requires_grad=False)

(:func:`load_peft_head_bias` does the same for a miniqwen model; tested against transformers + peft).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from miniqwen.atomic import atomic_write

HEAD = "lm_head"
HEAD_BIAS_KEY = "lm_head.bias"
PEFT_HEAD_BIAS = "head_bias.safetensors"


class BiasedHead(nn.Module):
    """The output head with a trainable bias: x [..., in] -> ``x Wᵀ + b`` [..., out].

    Args:
        base: the bias-free ``nn.Linear`` head; its ``weight`` [out, in] Parameter is taken over (same object: a
            tied head stays tied) and keeps its ``requires_grad``.
        dtype: dtype of the new bias (default float32 whatever the weight's; cast to the weight's dtype in the
            forward, so the matmul runs as the plain head's does).

    Attributes: ``weight``, ``bias`` [out] (zeros, trainable), ``in_features``, ``out_features`` — what
    ``miniqwen.model._linear`` reads to count the matmul and the bias add.
    """

    def __init__(self, base: nn.Linear, dtype: torch.dtype = torch.float32):
        super().__init__()
        if type(base) is not nn.Linear:
            raise TypeError(f"BiasedHead wraps a plain nn.Linear head, got {type(base).__name__}")
        if base.bias is not None:
            raise ValueError("the head already has a bias")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = nn.Parameter(torch.zeros(self.out_features, device=base.weight.device, dtype=dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias=True ({self.bias.dtype})"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias.to(self.weight.dtype))


def get_head_bias(model: nn.Module) -> nn.Parameter | None:
    """The trainable head bias of ``model`` ([vocab_size] Parameter), or None if it has none."""
    head = getattr(model, HEAD, None)
    return head.bias if isinstance(head, BiasedHead) else None


def has_head_bias(model: nn.Module) -> bool:
    """Whether ``model.lm_head`` carries a trainable bias (:func:`add_head_bias`)."""
    return get_head_bias(model) is not None


def add_head_bias(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Parameter:
    """Give ``model.lm_head`` a zero-initialised trainable bias, in place; the logits are unchanged until it trains.

    Call it after ``lora.apply_lora`` (which freezes every parameter the model has at that moment).

    Returns the new bias Parameter [vocab_size] (``requires_grad`` True, ``dtype``).

    Raises:
        ValueError: the model has no ``lm_head``, or its head already has a bias.
        TypeError: ``lm_head`` is not a plain ``nn.Linear`` (e.g. packed weights are swapped in).
    """
    base = getattr(model, HEAD, None)
    if base is None:
        raise ValueError(f"{type(model).__name__} has no {HEAD} to give a bias")
    if isinstance(base, BiasedHead):
        raise ValueError("the model's head already has a trainable bias")
    head = BiasedHead(base, dtype)
    setattr(model, HEAD, head)
    return head.bias


def remove_head_bias(model: nn.Module) -> torch.Tensor | None:
    """Undo :func:`add_head_bias`: put a bias-free ``nn.Linear`` holding the same weight back. Returns the removed
    bias (detached) or None if the model had none (then nothing changes)."""
    head = getattr(model, HEAD, None)
    if not isinstance(head, BiasedHead):
        return None
    base = nn.Linear(head.in_features, head.out_features, bias=False, device="meta")
    base.weight = head.weight
    setattr(model, HEAD, base)
    return head.bias.detach()


def head_bias_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """``{"lm_head.bias": Parameter}`` if the model has a head bias, else ``{}`` (the keys of :mod:`lora.io`)."""
    bias = get_head_bias(model)
    return {} if bias is None else {HEAD_BIAS_KEY: bias}


def save_peft_head_bias(model: nn.Module, out_dir: str | os.PathLike) -> Path | None:
    """Write ``model``'s head bias to ``out_dir/head_bias.safetensors`` (key ``lm_head.bias``, [vocab_size]) beside
    a PEFT adapter, atomically; with no head bias, remove a stale file of that name instead. Returns the file or
    None."""
    path = Path(out_dir) / PEFT_HEAD_BIAS
    bias = get_head_bias(model)
    if bias is None:
        path.unlink(missing_ok=True)
        return None
    state = {HEAD_BIAS_KEY: bias.detach().cpu().contiguous().clone()}
    atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
    return path


def read_peft_head_bias(peft_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """``{"lm_head.bias": [vocab]}`` from ``peft_dir/head_bias.safetensors`` (:func:`save_peft_head_bias`), or ``{}``
    when the directory has no such file (an adapter without a head bias).

    Raises:
        ValueError: the file is unreadable, or does not hold exactly one 1-D tensor ``lm_head.bias``.
    """
    path = Path(peft_dir) / PEFT_HEAD_BIAS
    if not path.is_file():
        return {}
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path}: cannot read the head bias ({err})") from None
    if set(state) != {HEAD_BIAS_KEY} or state[HEAD_BIAS_KEY].dim() != 1:
        got = ", ".join(f"{k} {list(v.shape)}" for k, v in state.items())
        raise ValueError(f"{path}: expected one 1-D tensor {HEAD_BIAS_KEY!r}, got {got or 'none'}")
    return state


def load_peft_head_bias(model: nn.Module, peft_dir: str | os.PathLike) -> bool:
    """Load ``peft_dir/head_bias.safetensors`` into ``model``, adding the bias first if the head has none. Returns
    False (and changes nothing) when the directory has no such file.

    Raises:
        ValueError: as :func:`read_peft_head_bias`, or the bias's size is not the head's ``out_features``.
    """
    state = read_peft_head_bias(peft_dir)
    if not state:
        return False
    head = getattr(model, HEAD, None)
    want = getattr(head, "out_features", None)
    if tuple(state[HEAD_BIAS_KEY].shape) != (want,):
        raise ValueError(f"{Path(peft_dir) / PEFT_HEAD_BIAS}: {HEAD_BIAS_KEY} has shape "
                         f"{list(state[HEAD_BIAS_KEY].shape)}, the model's head [{want}]")
    bias = get_head_bias(model)
    if bias is None:
        bias = add_head_bias(model)
    with torch.no_grad():
        bias.copy_(state[HEAD_BIAS_KEY])
    return True
