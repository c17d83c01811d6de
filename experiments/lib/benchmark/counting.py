"""The ``counting`` section: what a :class:`miniqwen.flop_count.FlopCounter` adds to a forward pass, on the real model
and, isolated, on a 24-layer model too narrow to hide its bookkeeping."""

from __future__ import annotations

import torch

from miniqwen import FlopCounter, Qwen2Config, Qwen2ForCausalLM, load_pretrained

from .harness import free_memory, interleaved


@torch.no_grad()
def counting_overhead(model, batch: int, seq_len: int, repeats: int) -> dict:
    """Median seconds of one forward pass [batch, seq_len] without and with a FlopCounter, and the overhead."""
    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len), device=device)
    model(ids)  # warm-up

    def counted():
        with FlopCounter():
            model(ids)

    times = interleaved({"plain": lambda: model(ids), "counting": counted}, repeats, device)
    a, b = times["plain"]["seconds"], times["counting"]["seconds"]
    return {"batch": batch, "seq_len": seq_len, "seconds_plain": a, "seconds_counting": b,
            "overhead_percent": 100 * (b - a) / a}


def counting_overheads(model_dir, dtype: str, device: torch.device, lengths: list[int], repeats: int) -> list[dict]:
    """:func:`counting_overhead` at batch 1 for each of ``lengths``, on the weights of ``model_dir`` in ``dtype``
    (loaded here, freed after)."""
    model = load_pretrained(model_dir, dtype=getattr(torch, dtype), device=device)[0]
    out = [counting_overhead(model, 1, n, repeats) for n in lengths]
    del model
    free_memory()
    return out


def counting_bookkeeping(repeats: int = 300) -> dict:
    """Absolute cost of counting, isolated: a 24-layer model as narrow as possible (hidden 64), where the Python
    bookkeeping is all the counter adds, timed with and without counting (median of ``repeats``, interleaved).
    This is what counting adds to any 24-layer forward pass, whatever its width."""
    tiny = Qwen2ForCausalLM(Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=24,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()
    result = counting_overhead(tiny, 1, 8, repeats)
    result["added_ms"] = 1e3 * (result["seconds_counting"] - result["seconds_plain"])
    return result
