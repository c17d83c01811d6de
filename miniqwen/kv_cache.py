"""The key/value cache of incremental decoding.

When a model generates text one token at a time, every new token attends to the keys and values of all the tokens
before it. Those do not change once computed, so :class:`KVCache` keeps them: each forward pass writes its new
tokens' keys and values after the cached ones (:meth:`KVCache.update`, called by every attention layer) and reads
all of them back. The model itself only calls ``update`` and :meth:`KVCache.widen_mask`; the storage layout and the
fixed-shape mode below exist for speed and do not change the result.
"""

from __future__ import annotations

import torch

from .config import Qwen2Config


class KVCache:
    """Pre-allocated key/value cache for incremental decoding.

    ``k[i]``, ``v[i]``: [B, num_key_value_heads, head_dim, max_len] for layer i, in ``dtype`` (the model's);
    ``length`` tokens per row are filled. Keys are cached *after* RoPE, so a cached token never needs re-rotating.
    Both are stored transposed (tokens on the last axis): the filled part ``[..., :length]`` is then a matrix that
    a batched matmul reads in place, whereas a slice ``[:, :, :length]`` of the usual [.., max_len, head_dim]
    layout is copied by PyTorch's CPU bf16 matmul at every decoding step (measurements: README, Speed).
    The cache keeps its own length: a forward pass writes every layer at ``length`` (:meth:`update`), and writing
    the last layer completes the pass, so ``length`` then grows by the pass's T new tokens.

    With ``fixed_shape``, a one-token pass attends over all ``max_len`` slots, the unfilled ones masked out
    (:meth:`keys_attended`, :meth:`widen_mask`): every decoding step then has the same shapes, so the matmuls read
    the store without copying it. The result is the same up to rounding (masked slots get probability 0), and the
    FLOPs are those of ``max_len`` keys (counted so). ``generate`` decodes with such a cache.
    """

    def __init__(self, config: Qwen2Config, batch_size: int, max_len: int, dtype=torch.float32, device=None,
                 fixed_shape: bool = False):
        shape = (batch_size, config.num_key_value_heads, config.head_dim, max_len)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.max_len = max_len
        self.length = 0
        self.fixed_shape = fixed_shape

    def keys_attended(self, T: int) -> int:
        """How many key slots the next pass of T new tokens attends to: ``length + T``, or all ``max_len`` for a
        one-token pass after cached tokens when ``fixed_shape`` (the slots beyond ``length + T`` are then masked).
        """
        if self.fixed_shape and T == 1 and self.length > 0:
            return self.max_len
        return self.length + T

    def widen_mask(self, mask: torch.Tensor | None) -> torch.Tensor | None:
        """The attention ``mask`` [B, 1, T, length + T] of the next pass (True = may attend, as made by
        :func:`miniqwen.model.attention_mask_and_positions`), widened with False columns to the
        :meth:`keys_attended` slots that pass reads: unchanged unless ``fixed_shape`` makes it read more.
        ``None`` (the plain causal pattern, nothing cached) stays ``None``."""
        if mask is None:
            return None
        B, _, T, S = mask.shape
        unwritten = self.keys_attended(T) - S
        if unwritten > 0:  # attended to, but masked
            mask = torch.cat([mask, mask.new_zeros(B, 1, T, unwritten)], dim=-1)
        return mask

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write layer ``layer``'s new ``k, v`` [B, Hkv, T, D] after the cached ones; return that layer's keys and
        values so far, [B, Hkv, length + T, D] each (views of the transposed store; ``k, v`` themselves when the
        cache was empty; all ``max_len`` slots when T = 1 and ``fixed_shape``). After the last layer, ``length``
        advances by T.

        Raises:
            ValueError: if the cache would hold more than ``max_len`` tokens, or ``k`` is not in the cache's dtype
                (make the cache with the model's dtype).
        """
        start, end, attended = self.length, self.length + k.shape[2], self.keys_attended(k.shape[2])
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} tokens > max_len {self.max_len}")
        if k.dtype != self.k[layer].dtype:
            raise ValueError(f"keys are {k.dtype} but the KV cache holds {self.k[layer].dtype}")
        self.k[layer][..., start:end] = k.transpose(-1, -2)
        self.v[layer][..., start:end] = v.transpose(-1, -2)
        if layer == len(self.k) - 1:
            self.length = end
        if start == 0:  # nothing was cached: the new keys are all of them, already in the attention's layout
            return k, v
        return self.k[layer][..., :attended].transpose(-1, -2), self.v[layer][..., :attended].transpose(-1, -2)

    def put_row(self, b: int, row: "KVCache", end: int) -> None:
        """Copy the single-row cache ``row`` (e.g. one prompt prefilled alone) into row ``b``, its tokens ending at
        token ``end``: the layout of a left-padded prompt. ``length`` becomes ``end``; the pad slots before a
        shorter row's tokens hold zeros, so mask them (attention_mask 0) in every later pass.

        Raises ValueError if ``row`` has more than one row, more than ``end`` tokens, or ``end`` > ``max_len``.
        """
        if row.k[0].shape[0] != 1:
            raise ValueError("KVCache.put_row takes a single-row cache")
        if row.length > end or end > self.max_len:
            raise ValueError(f"KVCache.put_row: {row.length} tokens ending at {end} do not fit (max_len "
                             f"{self.max_len})")
        for store, filled in ((self.k, row.k), (self.v, row.v)):
            for layer, t in enumerate(filled):
                store[layer][b, ..., end - row.length:end] = t[0, ..., :row.length]
        self.length = end

    def repeat_interleave(self, n: int) -> None:
        """Repeat every row ``n`` times (row b -> rows b·n … b·n+n−1), e.g. to draw n samples per prompt."""
        self.k = [t.repeat_interleave(n, dim=0) for t in self.k]
        self.v = [t.repeat_interleave(n, dim=0) for t in self.v]
