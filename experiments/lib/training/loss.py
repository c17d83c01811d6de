"""The training objective: masked next-token cross-entropy, its validation mean on the fixed validation subset, and
the compute dtype context."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from data.chunks import Chunks
from miniqwen import flop_count
from miniqwen.flop_count import FlopCounter, loss_flops
from miniqwen.generate import bar_disabled
from miniqwen.model import HeadRows

IGNORE_INDEX = -100  # the target of positions without one (PyTorch's and transformers' convention)


def validation_subset(n: int, size: int, seed: int) -> torch.Tensor:
    """Sorted indices of the fixed validation subset: ``size`` of n chunks drawn with ``seed`` (all if size is 0
    or >= n)."""
    if size == 0 or size >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919))[:size].sort().values


def validation_chunks(chunks: Chunks, size: int, seed: int) -> Chunks:
    """The fixed validation subset of ``chunks`` [N, L] that the training loop evaluates: :func:`validation_subset`
    of ``size`` rows (``eval_batches × batch_size``; 0 = all) drawn with ``seed``."""
    idx = validation_subset(len(chunks), size, seed)
    return Chunks(chunks.input_ids[idx], chunks.attention_mask[idx])


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
        so a padded chunk gives the same loss as the same chunk unpadded (up to float rounding). As in
        transformers' causal-LM loss, the targets are shifted instead of the logits, and the positions without a
        target (each row's last, padding) get ``IGNORE_INDEX``: the logits [B·T, V] are neither sliced nor
        indexed, so the backward pass does not scatter their gradient into a zeroed copy. FLOPs of the loss go to
        component ``"loss"`` (:func:`miniqwen.flop_count.loss_flops`), charged per target; the fused kernel's softmax
        over the B·T − n ignored rows, whose result it discards, is not charged (4 of 2,048 rows for four full
        512-token chunks).

    Raises ValueError if ``head`` is given and a real target token is not among its ids.
    """
    logits = model(input_ids, attention_mask=attention_mask, head_rows=head)  # [B, T, V or K]
    real = attention_mask != 0
    keep = torch.zeros_like(real)  # [B, T]: position t has a target (t+1 and t real)
    keep[:, :-1] = real[:, 1:] & real[:, :-1]
    targets = input_ids.roll(-1, dims=1)  # [B, T]: targets[:, t] = input_ids[:, t + 1] (last column ignored)
    if head is not None:  # vocabulary ids -> their column among the head's (sorted) ids
        column = torch.searchsorted(head.ids, targets).clamp(max=len(head.ids) - 1)
        if not torch.equal(head.ids[column][keep], targets[keep]):
            raise ValueError("a target token is outside the restricted loss vocabulary")
        targets = column
    targets = targets.masked_fill(~keep, IGNORE_INDEX)
    n = int(keep.sum())
    if flop_count.counting() and n:
        flop_count.count("loss", loss_flops(logits.shape[-1], n))
    loss_sum = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                               reduction="sum")
    return loss_sum, n


def autocast_context(device: torch.device, precision: str):
    """``torch.autocast`` to ``precision`` ("bfloat16"/"float16") on ``device``; nothing for "float32"."""
    if precision == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=getattr(torch, precision))


def validation_loss(model: nn.Module, chunks: Chunks, batch_size: int, precision: str = "float32",
                    progress: bool | None = None) -> tuple[float, int]:
    """Mean token-level cross-entropy of ``model`` over all of ``chunks`` (padding masked), on the model's device,
    with a tqdm bar if ``progress`` (None: only when stderr is a terminal).

    Returns ``(loss, forward_flops)``: the loss (nats/token; sum over all targets / their number, nan if none) and
    the FLOPs counted for the forwards + loss (1× convention: what an evaluation costs).
    """
    total, count, flops_ = validation_sums(model, chunks, batch_size, precision, progress)
    return (total / count if count else float("nan")), flops_


@torch.no_grad()
def validation_sums(model: nn.Module, chunks: Chunks, batch_size: int, precision: str = "float32",
                    progress: bool | None = False) -> tuple[float, int, int]:
    """``(sum of the token losses, number of targets, forward FLOPs)`` of ``model`` over ``chunks`` [M, L] in
    batches of ``batch_size``: what :func:`validation_loss` divides, and what ranks sum when each evaluates a shard
    (every counted FLOP is proportional to the rows, so the shards' FLOPs add up to the whole set's)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with FlopCounter() as counter:
        for start in tqdm(range(0, len(chunks), batch_size), desc="validation loss", unit="batch", leave=False,
                          disable=bar_disabled(progress)):
            ids = chunks.input_ids[start:start + batch_size].to(device)
            mask = chunks.attention_mask[start:start + batch_size].to(device)
            with autocast_context(device, precision):
                loss_sum, n = next_token_loss(model, ids, mask)
            total += float(loss_sum)
            count += n
    model.train(was_training)
    return total, count, counter.total
