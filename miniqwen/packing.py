"""Pre-packed bf16 weights for CPU inference, swapped in as modules.

PyTorch's CPU bf16 ``F.linear`` calls oneDNN, which re-lays the weight out into its blocked format at every call;
when each call has only a few input rows (decoding), that re-packing rather than the arithmetic bounds the speed.
:class:`PackedLinear` packs the weight once (the oneDNN ops inductor's ``freezing`` uses) and multiplies with the
packed copy. It is the same kernel without the per-call reordering, so the outputs are bit-identical (tested).

The model never sees this: :func:`pack_weights` replaces projections by :class:`PackedLinear` modules and
:func:`unpack_weights` puts the original ``nn.Linear`` modules back, the way ``lora.apply_lora`` and
``lora.remove_lora`` swap modules; :func:`packed_weights` does both around a ``with`` block, and
:func:`miniqwen.generate.generate` decodes inside one. A ``PackedLinear`` holds the same ``weight`` and ``bias``
Parameters and has the same ``in_features`` / ``out_features``, so the state dict, the FLOP counter
(:mod:`miniqwen.flop_count`) and gradients see what they see with the plain layer.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .config import PROJECTIONS  # the projections of a decoder layer that are packed (and lm_head when asked)


def onednn_available() -> bool:
    """True when this torch build has oneDNN and the two private ops packing uses."""
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


@functools.cache
def packing_supported() -> bool:
    """True when oneDNN can pack a bf16 weight on this CPU, found by packing a tiny one once.

    oneDNN's bf16 linear needs AVX512 (BW, VL, DQ) or AVX-NE-CONVERT; on a CPU with only AVX2 the reorder raises
    ``RuntimeError`` ("bf16 path needs the cpu support ...") and bf16 matmuls go through ``F.linear``'s own
    fallback, which has no per-call re-packing to save. Never raises.
    """
    if not onednn_available():
        return False
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(16, 16, dtype=torch.bfloat16), 1)
    except RuntimeError:
        return False
    return True


class PackedLinear(nn.Module):
    """``base`` (a bf16 ``nn.Linear`` on CPU) with its weight also pre-packed for oneDNN.

    Args:
        base: the layer to stand in for; its ``weight`` and ``bias`` Parameters are shared, not copied.
        batch_size: the rows each matmul will see, a hint to oneDNN's layout choice (results do not depend on it).

    Forward: x [..., in] -> [..., out], through the packed copy when no gradient is being recorded (it has no
    autograd formula), else through ``F.linear`` as ``base`` would. The weights must not change while packed.
    """

    def __init__(self, base: nn.Linear, batch_size: int = 1):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.packed = torch.ops.mkldnn._reorder_linear_weight(base.weight.detach(), batch_size)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def _packable(name: str, module: nn.Module, lm_head: bool) -> bool:
    wanted = name.rsplit(".", 1)[-1] in PROJECTIONS or (lm_head and name == "lm_head")
    return (wanted and type(module) is nn.Linear  # not a LoRA-wrapped or already packed layer
            and module.weight.device.type == "cpu" and module.weight.dtype == torch.bfloat16)


def _swap(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def pack_weights(model: nn.Module, batch_size: int = 1, lm_head: bool = False) -> dict[str, nn.Linear]:
    """Replace the bf16 CPU projections of ``model`` (``q/k/v/o_proj``, ``gate/up/down_proj``, and ``lm_head`` if
    asked) by :class:`PackedLinear`, in place. Anything else (float32, whose ``F.linear`` goes to MKL and would
    round differently; CUDA; LoRA-wrapped projections) is left as it is, as is everything when this torch build has
    no oneDNN or this CPU cannot run oneDNN's bf16 linear (:func:`packing_supported`). Costs a copy of the packed
    weights (0.7 GB for Qwen2.5-0.5B) until :func:`unpack_weights`.

    Args:
        model: a :class:`miniqwen.model.Qwen2ForCausalLM` (or any model with the same module names).
        batch_size: hint for oneDNN's layout (see :class:`PackedLinear`).
        lm_head: pack the full output head too (worth it when decoding uses all V logits, not with
            :class:`miniqwen.model.HeadRows`).

    Returns:
        ``{module path: the original nn.Linear}``, to give to :func:`unpack_weights`.
    """
    targets = [(name, m) for name, m in model.named_modules() if _packable(name, m, lm_head)]
    if not targets or not packing_supported():
        return {}
    originals: dict[str, nn.Linear] = {}
    try:
        for name, linear in targets:
            _swap(model, name, PackedLinear(linear, batch_size))
            originals[name] = linear
    except BaseException:
        unpack_weights(model, originals)
        raise
    return originals


def unpack_weights(model: nn.Module, originals: dict[str, nn.Linear]) -> None:
    """Undo :func:`pack_weights`: put the original ``nn.Linear`` modules back (the packed copies are freed)."""
    for name, linear in originals.items():
        _swap(model, name, linear)


@contextmanager
def packed_weights(model: nn.Module, batch_size: int = 1, lm_head: bool = False):
    """Within the ``with`` block, ``model``'s bf16 CPU projections are :class:`PackedLinear` modules
    (:func:`pack_weights`, same arguments); after it, even on an error, the original modules are back."""
    originals = pack_weights(model, batch_size, lm_head)
    try:
        yield model
    finally:
        unpack_weights(model, originals)
