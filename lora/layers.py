"""Low-rank adapters (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685).

A frozen linear layer ``y = x Wᵀ + b`` (W: out × in) is adapted by a trainable low-rank update (section 4.1)::

    y = x Wᵀ + b + (alpha / r) · x Aᵀ Bᵀ        A: r × in,  B: out × r,  r ≪ min(in, out)

``A`` starts random and ``B`` at zero, so the adapted model starts out *exactly* equal to the pretrained one;
``alpha / r`` scales the update so that changing ``r`` needs little re-tuning of the learning rate (section 4.1).
The paper draws A from a Gaussian; its reference code (loralib) and PEFT use Kaiming-uniform with ``a = √5`` —
the default init of ``torch.nn.Linear`` — which we follow, so our fresh adapters are distributed like PEFT's.

Module layout (a choice that keeps the model's own parameter names unchanged): :class:`LoRALinear` holds the
base layer's ``weight`` and ``bias`` Parameters *directly* (not under ``base_layer.`` as PEFT does), plus two
bias-free ``torch.nn.Linear`` submodules ``lora_A`` (in → r) and ``lora_B`` (r → out). So after
:func:`apply_lora` the model's state dict is the Hugging Face one plus keys like
``model.layers.0.self_attn.q_proj.lora_A.weight`` [r, in] and ``….lora_B.weight`` [out, r] — the same suffixes
PEFT uses, which makes export (:mod:`lora.io`) a pure renaming.

FLOPs: :class:`LoRALinear` reports only its own extra work, under component ``"lora"``; the base matmul is
already counted by ``miniqwen.model._linear``, which wraps every projection call (it reads ``in_features``,
``out_features`` and ``bias`` from whatever module it is given — LoRALinear exposes the base's).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from miniqwen import flop_count
from miniqwen.config import PROJECTIONS, projection_shapes

from .head_bias import remove_head_bias

DEFAULT_LORA_TARGETS: tuple[str, ...] = ("q_proj", "v_proj")
"""The projections LoRA adapts unless told otherwise (Hu et al. 2021, section 7.1: query and value), some of
:data:`miniqwen.config.PROJECTIONS`. The closed-form FLOP counts of :mod:`miniqwen.flop_count` default to the same
two (miniqwen may not import this package)."""


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable rank-``r`` update: ``base(x) + (alpha / r) · lora_B(lora_A(x))``.

    Args:
        base: the ``nn.Linear`` to adapt. Its ``weight`` [out, in] and ``bias`` [out] (or None) Parameters are
            taken over (same objects, so storage is shared) and frozen (``requires_grad = False``).
        rank: r >= 1.
        alpha: scaling numerator; default ``rank`` (scale 1). The update is multiplied by ``alpha / rank``.
        dtype: dtype of the LoRA matrices; default float32 whatever the base dtype, so the optimizer updates the
            trainable weights at full precision. Inputs are cast to it and the update back to the output's dtype.

    Attributes:
        weight, bias: the frozen base parameters; ``in_features``, ``out_features`` as in ``nn.Linear``.
        lora_A: ``nn.Linear(in, r, bias=False)``, weight [r, in], Kaiming-uniform (a = √5).
        lora_B: ``nn.Linear(r, out, bias=False)``, weight [out, r], zeros.
        scaling: ``alpha / rank``.
        merged: True while the update is folded into ``weight`` (see :meth:`merge`).

    Forward: x [..., in] -> [..., out]. While merged the update is already in ``weight`` and is not added again.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ValueError(f"LoRA rank must be an int >= 1, got {rank!r}")
        alpha = rank if alpha is None else alpha
        if not alpha > 0:
            raise ValueError(f"LoRA alpha must be > 0, got {alpha!r}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        self.weight = base.weight
        self.bias = base.bias
        for p in (self.weight, self.bias):
            if p is not None:
                p.requires_grad_(False)
        device = base.weight.device
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=device, dtype=dtype)
        self.reset_lora_parameters()
        self.merged = False

    def reset_lora_parameters(self) -> None:
        """A ~ Kaiming-uniform(a=√5) (uses the torch RNG: seed it for reproducible runs), B = 0, so ΔW = BA = 0."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"rank={self.rank}, alpha={self.alpha}, merged={self.merged}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self.merged:
            return out
        if flop_count.counting():
            n = x.numel() // x.shape[-1]  # N = rows of x (batch · tokens)
            flop_count.count_matmul("lora", n, self.in_features, self.rank)   # x Aᵀ: N·r·(2·in − 1)
            flop_count.count_matmul("lora", n, self.rank, self.out_features)  # (x Aᵀ) Bᵀ: N·out·(2r − 1)
            flop_count.count("lora", 2 * n * self.out_features)              # × alpha/r, + base output
        update = self.lora_B(self.lora_A(x.to(self.lora_A.weight.dtype)))
        return out + (self.scaling * update).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """The dense update ``(alpha / r) · B A`` [out, in], in the LoRA matrices' dtype."""
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight (``W += (alpha/r)·BA``) so inference costs no extra FLOPs.

        Raises RuntimeError if already merged. The LoRA matrices are kept, so :meth:`unmerge` can undo it (exactly
        up to floating-point rounding of the add and subtract, ~1e-7 relative in fp32).
        """
        if self.merged:
            raise RuntimeError("LoRALinear.merge: already merged")
        self.weight.add_(self.delta_weight().to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge` (``W -= (alpha/r)·BA``). Raises RuntimeError if not merged."""
        if not self.merged:
            raise RuntimeError("LoRALinear.unmerge: not merged")
        self.weight.sub_(self.delta_weight().to(self.weight.dtype))
        self.merged = False


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """``{module path: LoRALinear}`` of every adapter in ``model``, in module order (empty if none)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def apply_lora(
    model: nn.Module,
    rank: int,
    alpha: float | None = None,
    targets: Iterable[str] = DEFAULT_LORA_TARGETS,
    dtype: torch.dtype = torch.float32,
) -> dict[str, LoRALinear]:
    """Freeze ``model`` and wrap its target projections in :class:`LoRALinear`, in place.

    Every ``nn.Linear`` whose own name (last part of its path) is in ``targets`` is replaced — in a Qwen2 model
    that is the named projection of every decoder layer, e.g. ``model.layers.i.self_attn.q_proj``. Works on
    miniqwen's ``Qwen2ForCausalLM`` and on any model with the same module names (e.g. transformers' Qwen2).

    Args:
        model: the model to adapt (modified in place).
        rank: LoRA rank r (>= 1).
        alpha: scaling numerator (default ``rank``); the update is scaled by ``alpha / rank``.
        targets: module names to wrap, any of :data:`~miniqwen.config.PROJECTIONS` (q_proj … down_proj).
        dtype: dtype of the new LoRA matrices (default float32, see :class:`LoRALinear`).

    Returns:
        ``{module path: LoRALinear}`` of the wrapped layers. Afterwards only their ``lora_A``/``lora_B`` weights
        have ``requires_grad``; every other parameter of the model is frozen.

    Raises:
        ValueError: unknown target name, no matching layer found, or the model already has LoRA layers.
    """
    targets = tuple(targets)
    unknown = [t for t in targets if t not in PROJECTIONS]
    if unknown or not targets:
        raise ValueError(f"LoRA targets must be a non-empty subset of {PROJECTIONS}, got {targets}")
    if lora_modules(model):
        raise ValueError("model already has LoRA layers; apply_lora must be called once")
    for p in model.parameters():
        p.requires_grad_(False)
    found = [(name, module) for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets]
    if not found:
        raise ValueError(f"no nn.Linear named any of {targets} in {type(model).__name__}")
    wrapped = {}
    for name, base in found:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        lora = LoRALinear(base, rank, alpha, dtype=dtype)
        setattr(parent, child, lora)
        wrapped[name] = lora
    return wrapped


def count_trainable_parameters(model: nn.Module) -> int:
    """Number of scalars the optimizer will update: the sum of ``numel`` over parameters with ``requires_grad``.

    After :func:`apply_lora` these are the LoRA matrices only: each wrapped layer in → out adds A (r × in) and
    B (out × r), i.e. ``r · (in + out)``, so the total is ``L · Σ_targets r · (in + out)`` (see
    :func:`lora_parameter_count` for the closed form).

    Qwen2.5-0.5B, rank 4 on q_proj and v_proj (L = 24 layers, d = 896, 14 query heads and 2 key/value heads of
    head_dim 64, so q_proj is 896 → 896 and v_proj 896 → 128 because of grouped-query attention)::

        q_proj: 4 · (896 + 896) = 7,168        v_proj: 4 · (896 + 128) = 4,096
        24 · (7,168 + 4,096) = 24 · 11,264 = 270,336 trainable parameters

    — 0.055% of the model's 494,032,768 parameters (the tied embedding counted once). A trainable head bias
    (:func:`lora.head_bias.add_head_bias`) adds V = 151,936: 422,272 in all.
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def lora_parameter_count(config, rank: int, targets: Iterable[str] = DEFAULT_LORA_TARGETS,
                         head_bias: bool = False) -> int:
    """Closed form of :func:`count_trainable_parameters` for a Qwen2 ``config``: ``L · Σ_targets r·(in + out)``,
    plus ``vocab_size`` with a trainable head bias (``head_bias``).

    Raises ValueError for an unknown target name.
    """
    dims = projection_shapes(config)
    total = 0
    for t in targets:
        if t not in dims:
            raise ValueError(f"unknown LoRA target {t!r}; expected some of {PROJECTIONS}")
        total += rank * sum(dims[t])
    return config.num_hidden_layers * total + (config.vocab_size if head_bias else 0)


def remove_lora(model: nn.Module) -> None:
    """Undo :func:`apply_lora`: put the original ``nn.Linear`` back in place of every adapter (unmerging first if
    merged), so the same base model can take a new adapter without being reloaded. Parameters keep the
    ``requires_grad`` that :func:`apply_lora` gave them (frozen). A trainable head bias is part of the adapter and
    is removed too (:func:`lora.head_bias.remove_head_bias`). A model without adapters is left as it is."""
    remove_head_bias(model)
    for name, lora in lora_modules(model).items():
        if lora.merged:
            lora.unmerge()
        base = nn.Linear(lora.in_features, lora.out_features, bias=lora.bias is not None, device="meta")
        base.weight = lora.weight
        base.bias = lora.bias
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, base)


def merge_lora(model: nn.Module) -> None:
    """:meth:`LoRALinear.merge` on every adapter of ``model``."""
    for m in lora_modules(model).values():
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    """:meth:`LoRALinear.unmerge` on every adapter of ``model``."""
    for m in lora_modules(model).values():
        m.unmerge()


@contextmanager
def merged(model: nn.Module):
    """Forecast on merged weights: inside the ``with`` block every adapter is replaced by a plain ``nn.Linear``
    whose weight is a new tensor ``W + (alpha/r)·BA`` (in W's dtype), so the model runs — and the FLOP counter
    counts — as the base architecture with no LoRA branch, and the fast inference paths that act on ``nn.Linear``
    apply. On exit the adapters are put back untouched: the base weight W was never modified, so training can go on
    bit-exactly (unlike :func:`merge_lora`, whose add-then-subtract rounds W in bf16). Costs one extra copy of the
    wrapped projections' weights while inside. A model without adapters is left as it is.

    The outputs equal the unmerged adapter's up to floating-point rounding of the summed weight (Hu et al. 2021,
    section 4.1: "no additional inference latency")."""
    swapped = {}
    with torch.no_grad():
        for name, lora in lora_modules(model).items():
            weight = lora.weight if lora.merged else lora.weight + lora.delta_weight().to(lora.weight.dtype)
            linear = nn.Linear(lora.in_features, lora.out_features, bias=lora.bias is not None, device="meta")
            linear.weight = nn.Parameter(weight, requires_grad=False)
            linear.bias = None if lora.bias is None else nn.Parameter(lora.bias.detach(), requires_grad=False)
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, linear)
            swapped[name] = (parent, child, lora)
    try:
        yield model
    finally:
        for parent, child, lora in swapped.values():
            setattr(parent, child, lora)
