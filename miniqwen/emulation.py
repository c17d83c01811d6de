"""bf16 matmuls computed in float32 kernels, for CPUs without native bf16 arithmetic.

A native bf16 matmul (AVX512-BF16, AMX, CUDA) reads bf16 operands, accumulates in float32 and rounds the result to
bf16. On a CPU with only AVX2, PyTorch has no fast kernel for that: its bf16 fallback ran a LoRA training step of
Qwen2.5-0.5B more than 10x slower than float32 (``results/benchmark_avx2/``). :class:`Float32Matmuls` keeps the
computation bf16 — the same bf16 weights and activations, every other op unchanged — and runs each bf16 matmul as
the native kernel defines it, with float32 kernels: the bf16 operands are widened to float32 (exact), multiplied
with float32 accumulation, and the result rounded back to bf16. It differs from a native bf16 kernel only where two
native kernels differ from each other: the order of the float32 additions (and, in fused attention, whether the
softmax probabilities are rounded to bf16 before they multiply the values).

It is a ``TorchDispatchMode``: it sits below autograd and autocast, so it sees the matmuls of the backward pass as
well as the forward, and the model code does not change. Only the ops in :data:`MATMUL_OPS` are touched, and only
when a CPU tensor among their inputs is bf16; everything else (float32, CUDA, elementwise ops) passes through.

Used by ``experiments`` when ``--precision bfloat16`` runs on a CPU without native bf16
(:func:`miniqwen.device.emulated_precision`): each stage holds ``experiments.lib.loader.emulation``, a ``with``
block around its work, left when the stage is done.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

aten = torch.ops.aten

#: The aten ops rerouted: plain and batched matmuls (what ``F.linear`` and ``torch.matmul`` become below autograd,
#: in the forward and the backward pass) and the CPU fused-attention kernel with its backward.
MATMUL_OPS = frozenset({
    aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default,
    aten._scaled_dot_product_flash_attention_for_cpu.default,
    aten._scaled_dot_product_flash_attention_for_cpu_backward.default,
})


def _is_cpu_bf16(x) -> bool:
    return isinstance(x, torch.Tensor) and x.dtype == torch.bfloat16 and x.device.type == "cpu"


def _widen(x):
    return x.float() if _is_cpu_bf16(x) else x


def _meta(x):
    return x.to("meta") if isinstance(x, torch.Tensor) else x


class Float32Matmuls(TorchDispatchMode):
    """Within ``with Float32Matmuls():``, every op of :data:`MATMUL_OPS` with a bf16 CPU input runs on its inputs
    widened to float32 and returns its outputs in the dtypes the bf16 op returns (found from the op's meta kernel:
    bf16 for products, float32 for the attention's log-sum-exp). Shapes are unchanged. Raises nothing of its own;
    an op's own errors (shape mismatch, mixed dtypes) are raised as without the mode."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in MATMUL_OPS or not any(_is_cpu_bf16(a) for a in (*args, *kwargs.values())):
            return func(*args, **kwargs)
        expected = func(*tree_map(_meta, args), **tree_map(_meta, kwargs))  # the bf16 op's output dtypes
        out = func(*tree_map(_widen, args), **tree_map(_widen, kwargs))
        if isinstance(out, torch.Tensor):
            return out.to(expected.dtype)
        return type(out)(o.to(e.dtype) if isinstance(o, torch.Tensor) else o for o, e in zip(out, expected))
