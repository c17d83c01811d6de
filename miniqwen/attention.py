"""The attention kernel: ``softmax(q kᵀ · scale, masked) v`` with grouped-query heads.

:func:`reference_attention` is the definition, written out step by step; it is what the model means and what the
tests compare against. :func:`attention`, the one function the model calls, gives the same result (up to float
rounding) through one of two faster paths, each tested against the reference:

* :func:`sdpa_attention` for a pass of several tokens (a prompt, a training batch): PyTorch's fused
  ``F.scaled_dot_product_attention``, which picks a flash / memory-efficient kernel on the device it runs on.
* :func:`single_query_attention` for a decoding step (one new token per row): two plain batched matmuls that read
  the KV cache's transposed store in place, which on CPU in bf16 beats the fused kernel for a single query
  (README, Speed).

Shapes: ``q`` [B, Hq, T, D]; ``k``, ``v`` [B, Hkv, S, D] (S keys, the cached ones and the T new ones; Hq a
multiple of Hkv); ``mask`` [B, 1, T, S] boolean (True = may attend), or None for the plain causal pattern over
S = T keys. Every function returns [B, Hq, T, D] in ``v``'s dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                        scale: float) -> torch.Tensor:
    """The definition: each query head h reads key/value head ``h // (Hq/Hkv)`` (grouped-query attention, Ainslie
    et al. 2023), scores ``q kᵀ · scale`` in float32, masked scores set to −inf, softmax over the keys, then the
    probability-weighted sum of the values. Slow and plain; for tests and for reading."""
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    k = k.repeat_interleave(Hq // Hkv, dim=1)  # [B, Hq, S, D]: one copy of each key head per query head
    v = v.repeat_interleave(Hq // Hkv, dim=1)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # [B, Hq, T, S]
    if mask is None:  # causal: query t (the last T of the S keys) sees keys 0 … S − T + t
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return torch.matmul(probs, v.float()).to(v.dtype)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                   scale: float) -> torch.Tensor:
    """PyTorch's fused kernel. ``enable_gqa`` lets each group of query heads read its shared key/value head in
    place (what :func:`reference_attention` does by repeating k and v, without the copies)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


def single_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                           scale: float) -> torch.Tensor:
    """Attention for one query position per row (T = 1). The Hq/Hkv query heads of a group become the rows of
    one matmul against their shared key head (a view, no copy); scores and softmax are computed in float32. Both
    matmuls take a KV cache's transposed store ([.., D, S], see :class:`miniqwen.kv_cache.KVCache`) as it is:
    ``q kᵀ``, and ``(vᵀ pᵀ)ᵀ`` for the values."""
    B, Hq, _, D = q.shape
    Hkv = k.shape[1]
    scores = torch.matmul(q.reshape(B, Hkv, Hq // Hkv, D), k.transpose(-1, -2)).float() * scale  # [B, Hkv, G, S]
    if mask is not None:  # [B, 1, 1, S] broadcasts over the Hkv groups and their G query heads
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    out = torch.matmul(v.transpose(-1, -2), probs.transpose(-1, -2))  # [B, Hkv, D, G]
    return out.transpose(-1, -2).reshape(B, Hq, 1, D)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              scale: float) -> torch.Tensor:
    """``softmax(q kᵀ · scale, masked) v``: :func:`single_query_attention` for a decoding step (T = 1),
    :func:`sdpa_attention` otherwise. Shapes in the module docstring."""
    if q.shape[2] == 1:
        return single_query_attention(q, k, v, mask, scale)
    return sdpa_attention(q, k, v, mask, scale)
