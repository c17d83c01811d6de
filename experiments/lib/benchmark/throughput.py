"""The ``throughput`` section: miniqwen's prefill and KV-cached decoding tokens/s, and the rate at which a decoding
step reads the weights."""

from __future__ import annotations

import torch

from miniqwen import KVCache, load_pretrained, packed_weights

from .harness import free_memory, timed


def decode_weight_bytes(model) -> int:
    """Bytes of parameters one decoding step reads: every parameter once, except the token embedding, of which a
    step reads only its rows (a tied ``lm_head`` is that same matrix, read whole)."""
    params = {id(p): p for p in model.parameters()}  # a tied matrix once
    total = sum(p.numel() * p.element_size() for p in params.values())
    if not model.config.tie_word_embeddings:
        embedding = model.model.embed_tokens.weight
        total -= embedding.numel() * embedding.element_size()
    return total


@torch.no_grad()
def throughput(model, batch: int, prompt_len: int, new_tokens: int) -> dict:
    """Prefill tokens/s over ``batch × prompt_len`` and decode tokens/s over ``new_tokens`` cached steps (full
    output head), and the rate at which decoding reads the weights (:func:`decode_weight_bytes` per step); with
    the weights packed and the cache shaped as :func:`miniqwen.generate` has them
    (:func:`miniqwen.model.packed_weights`, ``KVCache(fixed_shape=True)``)."""
    device = next(model.parameters()).device
    cache = KVCache(model.config, batch, prompt_len + new_tokens, dtype=next(model.parameters()).dtype,
                    device=device, fixed_shape=True)
    ids = torch.randint(0, 1000, (batch, prompt_len), device=device)
    step = torch.randint(0, 1000, (batch, 1), device=device)
    with packed_weights(model, batch, lm_head=True):
        prefill = timed(lambda: model(ids, cache=cache, logits_to_keep=1), device)
        decode_s = timed(lambda: [model(step, cache=cache) for _ in range(new_tokens)], device)
    weights = decode_weight_bytes(model)
    return {"batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
            "prefill_tokens_per_s": batch * prompt_len / prefill, "decode_tokens_per_s": batch * new_tokens / decode_s,
            "decode_seconds_per_step": decode_s / new_tokens, "weight_bytes_per_step": weights,
            "weights_gb_per_s": weights * new_tokens / decode_s / 1e9}


def throughputs(model_dir, dtype: str, device: torch.device, batches: list[int], prompt_len: int, new_tokens: int,
                bandwidth: dict | None = None) -> list[dict]:
    """:func:`throughput` at each of ``batches``, on the weights of ``model_dir`` in ``dtype`` (loaded here, freed
    after); each with ``"fraction_of_memory_bandwidth"`` too when ``bandwidth`` (from the ``peak`` section) is given."""
    model = load_pretrained(model_dir, dtype=getattr(torch, dtype), device=device)[0]
    out = [throughput(model, b, prompt_len, new_tokens) for b in batches]
    if bandwidth is not None:
        for r in out:
            r["fraction_of_memory_bandwidth"] = r["weights_gb_per_s"] / bandwidth["gb_per_s_read"]
    del model
    free_memory()
    return out
