"""The training objective: masked next-token cross-entropy, its validation mean, and the compute dtype context."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from data.chunks import Chunks
from miniqwen import flops
from miniqwen.flops import FlopCounter, loss_flops
from miniqwen.model import HeadRows


def next_token_loss(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    head: HeadRows | None = None):
    """Summed next-token cross-entropy of ``model`` on a batch, padding masked.

    Args:
        input_ids: [B, T] int64 token ids.
        attention_mask: [B, T], 1 = real token, 0 = padding (right or left).
        head: None = the coursework's loss, a softmax over the whole vocabulary; or :class:`miniqwen.model.HeadRows`
            (e.g. the numeric alphabet): a *different objective*, the softmax over those K tokens only, which also
            skips the other V − K rows of the output head (counted so).

    Returns:
        ``(loss_sum, n)``: the sum over targets of −log p(token t+1 | tokens ≤ t) (float32 scalar tensor, with
        grad if enabled) and the number n of targets. A target counts only if it and its input token are real,
        so a padded chunk gives the same loss as the same chunk unpadded. The logits of padding targets are
        dropped before the log-softmax. FLOPs of the loss go to component ``"loss"``
        (:func:`miniqwen.flops.loss_flops`).

    Raises ValueError if ``head`` is given and a real target token is not among its ids.
    """
    logits = model(input_ids, attention_mask=attention_mask, head_rows=head)  # [B, T, V or K]
    keep = (attention_mask[:, 1:] != 0) & (attention_mask[:, :-1] != 0)  # [B, T-1]
    selected = logits[:, :-1][keep].float()  # [n, V or K]
    targets = input_ids[:, 1:][keep]  # [n]
    if head is not None:  # vocabulary ids -> their column among the head's (sorted) ids
        column = torch.searchsorted(head.ids, targets).clamp(max=len(head.ids) - 1)
        if not torch.equal(head.ids[column], targets):
            raise ValueError("a target token is outside the restricted loss vocabulary")
        targets = column
    n = int(targets.numel())
    if flops.counting() and n:
        flops.count("loss", loss_flops(logits.shape[-1], n))
    return F.cross_entropy(selected, targets, reduction="sum"), n


def autocast_context(device: torch.device, precision: str):
    """``torch.autocast`` to ``precision`` ("bfloat16"/"float16") on ``device``; nothing for "float32"."""
    if precision == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=getattr(torch, precision))


def validation_loss(model: nn.Module, chunks: Chunks, batch_size: int, precision: str = "float32",
                    progress: bool = True) -> tuple[float, int]:
    """Mean token-level cross-entropy of ``model`` over all of ``chunks`` (padding masked), on the model's device.

    Returns ``(loss, forward_flops)``: the loss (nats/token; sum over all targets / their number, nan if none) and
    the FLOPs counted for the forwards + loss (1× convention: what an evaluation costs).
    """
    total, count, flops_ = validation_sums(model, chunks, batch_size, precision, progress)
    return (total / count if count else float("nan")), flops_


@torch.no_grad()
def validation_sums(model: nn.Module, chunks: Chunks, batch_size: int, precision: str = "float32",
                    progress: bool = False) -> tuple[float, int, int]:
    """``(sum of the token losses, number of targets, forward FLOPs)`` of ``model`` over ``chunks`` [M, L] in
    batches of ``batch_size``: what :func:`validation_loss` divides, and what ranks sum when each evaluates a shard
    (every counted FLOP is proportional to the rows, so the shards' FLOPs add up to the whole set's)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with FlopCounter() as counter:
        for start in tqdm(range(0, len(chunks), batch_size), desc="validation loss", unit="batch", leave=False,
                          disable=not progress):
            ids = chunks.input_ids[start:start + batch_size].to(device)
            mask = chunks.attention_mask[start:start + batch_size].to(device)
            with autocast_context(device, precision):
                loss_sum, n = next_token_loss(model, ids, mask)
            total += float(loss_sum)
            count += n
    model.train(was_training)
    return total, count, counter.total
