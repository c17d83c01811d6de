"""The ``loss`` section: miniqwen's validation loss in the default dtype against float32."""

from __future__ import annotations

import torch

from data import Chunks, chunk_texts
from miniqwen import QwenTokenizer, load_pretrained

from ..session import load_dataset
from ..settings import DataSettings
from ..training.loss import validation_loss
from .harness import dtype_names, free_memory, measured


def loss_precision(model_dir, data: str | None, chunks: int, context_length: int, batch_size: int, default: str,
                   device: torch.device) -> dict:
    """miniqwen's validation loss (nats/token, :func:`experiments.lib.training.validation_loss`) on the first
    ``chunks`` validation chunks of ``context_length`` tokens (0 = all) in float32 and in ``default`` (weights in
    it + autocast, as the stages run), the relative difference and the seconds of each."""
    tok = QwenTokenizer.from_file(model_dir)
    c = chunk_texts(tok, load_dataset(DataSettings(data=data)).texts("validation"), context_length,
                    pad_id=tok.pad_token_id)
    c = Chunks(c.input_ids[:chunks or None], c.attention_mask[:chunks or None])
    out = {"chunks": len(c), "context_length": context_length, "batch_size": batch_size, "by_dtype": {}}
    for name in dtype_names(default):
        model = load_pretrained(model_dir, dtype=getattr(torch, name), device=device)[0]
        (loss, _), seconds, _ = measured(lambda: validation_loss(model, c, batch_size, name, progress=False), device)
        out["by_dtype"][name] = {"loss": loss, "seconds": seconds}
        model = None
        free_memory()
    losses = out["by_dtype"]
    out["relative_difference_percent"] = 100 * (losses[default]["loss"] / losses["float32"]["loss"] - 1)
    return out
