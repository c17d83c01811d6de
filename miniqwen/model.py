"""Qwen2 / Qwen2.5 decoder-only transformer, written out by hand.

Architecture (Qwen2 technical report, arXiv:2407.10671, section 2.1; behaviour matched against transformers'
``Qwen2ForCausalLM``): token embedding -> N x [RMSNorm -> grouped-query self-attention with RoPE -> residual,
RMSNorm -> SwiGLU MLP -> residual] -> RMSNorm -> lm_head. Module and parameter names are exactly those of the
Hugging Face state dict (``model.layers.3.self_attn.q_proj.weight`` …), so official safetensors load unchanged.

Every module reports its FLOPs to :mod:`miniqwen.flop_count` (the coursework's rules) from the shapes it actually sees.
Only the architecture is here: attention kernels in :mod:`miniqwen.attention`, the KV cache in :mod:`miniqwen.kv_cache`,
packed CPU weights (swapped in by ``generate``) in :mod:`miniqwen.packing`. A guided forward pass: ``docs/model.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import flop_count
from .attention import attention
from .config import Qwen2Config
from .kv_cache import KVCache


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019): ``weight * x / sqrt(mean(x²) + eps)`` over the last dim.

    Computed in float32 whatever the input dtype, then cast back, as transformers' Qwen2RMSNorm does, because
    the mean of squares overflows/underflows easily in bf16/fp16.
    """

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if flop_count.counting():
            d = x.shape[-1]
            flop_count.count("norm", x.numel() // d * (4 * d + 11))
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """Rotary-embedding tables (Su et al. 2021, RoFormer, section 3.4) for integer ``positions`` [B, T].

    Returns ``cos, sin`` of shape [B, 1, T, head_dim] in HF's "rotate-half" layout: frequency i is used for both
    dimension i and dimension i + head_dim/2. Computing them is free under the coursework's rules.
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    angles = positions.float()[..., None] * inv_freq  # [B, T, head_dim/2]
    angles = torch.cat([angles, angles], dim=-1)[:, None]  # [B, 1, T, head_dim]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i+D/2}) of ``x`` [B, H, T, D] by the position's angle: x·cos + rotate_half(x)·sin."""
    if flop_count.counting():
        d = x.shape[-1]
        flop_count.count("attn.rope", x.numel() // d * (3 * d + d // 2))
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def _linear(layer: nn.Module, x: torch.Tensor, component: str) -> torch.Tensor:
    """``layer(x)``, with the matmul (and bias) FLOPs recorded under ``component``: from ``in_features``,
    ``out_features`` and ``bias``, which stand-ins for an ``nn.Linear`` (LoRA, packed weights) have too."""
    if flop_count.counting():
        rows = x.numel() // x.shape[-1]
        flop_count.count_matmul(component, rows, layer.in_features, layer.out_features)
        if layer.bias is not None:
            flop_count.count(component, rows * layer.out_features)
    return layer(x)


class Qwen2Attention(nn.Module):
    """Causal self-attention with grouped-query heads (Ainslie et al. 2023): ``num_attention_heads`` query heads
    share ``num_key_value_heads`` key/value heads. q/k/v projections have biases, the output projection has none.
    """

    def __init__(self, config: Qwen2Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim,
        )
        d = config.hidden_size
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=False)
        self.scale = 1.0 / math.sqrt(self.head_dim)

    def forward(self, x, cos, sin, mask, cache: KVCache | None):
        """``x`` [B, T, d] -> [B, T, d]; ``cos, sin`` [B, 1, T, D] (:func:`rope_cos_sin`); ``mask`` [B, 1, T, S]
        boolean, True = may attend (S = cached + T keys), or None for the plain causal pattern (no padding, no
        cache); ``cache`` gets this layer's new keys and values."""
        B, T, _ = x.shape
        # [B, T, H·D] -> [B, H, T, D]
        q = _linear(self.q_proj, x, "attn.q_proj").view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = _linear(self.k_proj, x, "attn.k_proj").view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = _linear(self.v_proj, x, "attn.v_proj").view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        S = k.shape[2]
        if flop_count.counting():
            D, heads = self.head_dim, B * self.n_heads
            flop_count.count_matmul("attn.scores", T, D, S, batch=heads)
            flop_count.count("attn.scale", heads * T * S)
            flop_count.count("attn.mask", heads * T * S)
            flop_count.count("attn.softmax", heads * (11 * T * S + T * (S - 1)))
            flop_count.count_matmul("attn.values", T, S, D, batch=heads)
        # softmax(q kᵀ / √D + mask) v, each group of Hq/Hkv query heads reading its shared key/value head
        out = attention(q, k, v, mask, self.scale)  # [B, Hq, T, D]
        out = out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return _linear(self.o_proj, out, "attn.o_proj")


class Qwen2MLP(nn.Module):
    """SwiGLU feed-forward (Shazeer 2020): ``down_proj(silu(gate_proj(x)) * up_proj(x))``, no biases."""

    def __init__(self, config: Qwen2Config):
        super().__init__()
        d, i = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(d, i, bias=False)
        self.up_proj = nn.Linear(d, i, bias=False)
        self.down_proj = nn.Linear(i, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = _linear(self.gate_proj, x, "mlp.gate_proj")
        up = _linear(self.up_proj, x, "mlp.up_proj")
        if flop_count.counting():
            flop_count.count("mlp.act", 13 * gate.numel())  # x / (1 + exp(-x)): negate, exp, add, divide
            flop_count.count("mlp.mul", gate.numel())
        if torch.is_grad_enabled():
            hidden = F.silu(gate) * up
        else:  # inference: the same values, computed in gate's memory instead of a fresh [B, T, I] tensor
            hidden = F.silu(gate, inplace=True).mul_(up)
        return _linear(self.down_proj, hidden, "mlp.down_proj")


class Qwen2DecoderLayer(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

    def __init__(self, config: Qwen2Config, layer_idx: int):
        super().__init__()
        self.self_attn = Qwen2Attention(config, layer_idx)
        self.mlp = Qwen2MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache):
        if flop_count.counting():
            flop_count.count("residual", 2 * x.numel())
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


def attention_mask_and_positions(attention_mask: torch.Tensor,
                                 past: int) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The attention pattern and RoPE positions of T new tokens after ``past`` cached ones.

    Args:
        attention_mask: [B, S] bool or 0/1 ints over cached + new tokens (S = past + T), True/1 = real token.

    Returns:
        ``mask`` [B, 1, T, S] bool (True = may attend; broadcast over heads) and ``positions`` [B, T] int64.
        Query t (absolute index past + t) sees key s if s <= past + t and s is real; a padded query also sees
        itself, so no softmax row is empty (an all-masked row would give NaN, and NaN spreads). The position of
        a token is the number of real tokens before it, so left padding does not shift positions.
        ``mask`` is None when nothing is cached, T > 1 and no token is padding: the plain causal pattern, which
        SDPA applies itself on its fast path (CUDA's fused kernels need it).
    """
    valid = attention_mask.bool()
    B, S = valid.shape
    T = S - past
    if past == 0 and T > 1 and bool(valid.all()):
        return None, torch.arange(T, device=valid.device).expand(B, T)
    if T == 1:  # a decode step: every real key is in the past, and the query always sees itself
        mask = valid.clone()
        mask[:, -1] = True
        positions = (valid.sum(-1, keepdim=True) - 1).clamp(min=0)
        return mask[:, None, None, :], positions
    query = torch.arange(past, S, device=valid.device)[:, None]  # [T, 1] absolute index of each query
    key = torch.arange(S, device=valid.device)  # [S]
    mask = ((key <= query) & valid[:, None, :]) | (key == query)  # [B, T, S]
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
    return mask[:, None], positions


class Qwen2Model(nn.Module):
    """The decoder stack without the output head (HF prefix ``model.``): token ids -> hidden states."""

    def __init__(self, config: Qwen2Config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Qwen2DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """``input_ids`` [B, T] -> hidden states [B, T, hidden_size], after the final norm. ``attention_mask``,
        ``cache`` and the errors raised as in :meth:`Qwen2ForCausalLM.forward`."""
        cfg = self.config
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        S = past + T
        if attention_mask is None:
            attention_mask = torch.ones(B, S, dtype=torch.bool, device=input_ids.device)
        if attention_mask.shape != (B, S):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, S)}")
        mask, positions = attention_mask_and_positions(attention_mask, past)
        if cache is not None:
            mask = cache.widen_mask(mask)  # a fixed-shape cache may be read beyond its S filled slots

        x = self.embed_tokens(input_ids)  # [B, T, d]
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache)
        return self.norm(x)


@dataclass(frozen=True)
class HeadRows:
    """Some rows of ``lm_head``: the model then computes logits for these vocabulary ids only.

    For constrained decoding (e.g. digits and separators): the vocab projection costs K instead of V rows.
    Make it with :meth:`Qwen2ForCausalLM.head_rows`; ``weight`` is a copy, so make it again after changing weights.
    A head bias (``lora.head_bias``, trainable) is not copied: the forward adds its K rows ``bias[ids]`` live.

    Attributes:
        ids: [K] int64 vocabulary ids, sorted ascending and distinct (so an argmax tie picks the lowest id, as an
            argmax over the full vocabulary would).
        weight: [K, hidden_size] ``lm_head.weight[ids]``.
    """

    ids: torch.Tensor
    weight: torch.Tensor


class Qwen2ForCausalLM(nn.Module):
    """Qwen2 language model: ``input_ids`` [B, T] -> next-token ``logits`` [B, T, vocab_size].

    With ``tie_word_embeddings`` (Qwen2.5-0.5B) ``lm_head.weight`` *is* ``model.embed_tokens.weight``; otherwise it
    is a separate matrix. Reproduces transformers' ``Qwen2ForCausalLM`` logits (tested to 1e-5 in fp32).
    """

    def __init__(self, config: Qwen2Config):
        super().__init__()
        self.config = config
        self.model = Qwen2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def head_rows(self, token_ids) -> HeadRows:
        """The :class:`HeadRows` for ``token_ids`` (an iterable of ints or an int tensor; order and repeats do not
        matter), to pass to :meth:`forward` as ``head_rows``.

        Raises:
            ValueError: if ``token_ids`` is empty or has an id outside [0, vocab_size).
        """
        weight = self.lm_head.weight
        ids = torch.as_tensor(token_ids if torch.is_tensor(token_ids) else list(token_ids), dtype=torch.long)
        ids = torch.unique(ids.to(weight.device))  # sorted ascending
        if ids.numel() == 0:
            raise ValueError("head_rows needs at least one token id")
        if ids[0] < 0 or ids[-1] >= self.config.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size}), got {ids[0].item()} … "
                             f"{ids[-1].item()}")
        return HeadRows(ids, weight[ids])

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        logits_to_keep: int = 0,
        head_rows: HeadRows | None = None,
    ) -> torch.Tensor:
        """Run the model on ``input_ids`` [B, T] (int64 token ids).

        Args:
            attention_mask: [B, cache.length + T] (1/True = real token, 0/False = padding), covering the cached
                tokens too; padding may be on the left (generation) or the right (training). Positions are counted
                over real tokens only, so a left-padded row gets the same logits as the unpadded row.
                ``None`` = no padding.
            cache: a :class:`~miniqwen.kv_cache.KVCache`; the new tokens are appended to it (its ``length`` grows
                by T) and attend to everything cached.
            logits_to_keep: compute logits only for the last this-many positions (0 = all), as in transformers;
                generation needs only the last one, which saves the large vocab projection on the prompt.
            head_rows: compute logits only for these vocabulary ids (:meth:`head_rows`), K instead of V columns.

        Returns:
            logits [B, T', V] in the model's dtype, T' = T or ``logits_to_keep``; [B, T', K] with ``head_rows``
            (column j is vocabulary id ``head_rows.ids[j]``).

        Raises:
            ValueError: if ``attention_mask`` does not cover cached + new tokens, or the cache overflows.
        """
        x = self.model(input_ids, attention_mask, cache)  # [B, T, d]
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        if head_rows is None:
            return _linear(self.lm_head, x, "lm_head")
        bias = self.lm_head.bias  # None, or a trainable head bias (lora.head_bias): its K rows are added
        if flop_count.counting():
            rows, k = x.numel() // x.shape[-1], head_rows.weight.shape[0]
            flop_count.count_matmul("lm_head", rows, x.shape[-1], k)
            flop_count.count("lm_head", rows * k if bias is not None else 0)
        return F.linear(x, head_rows.weight, None if bias is None else bias[head_rows.ids].to(head_rows.weight.dtype))
