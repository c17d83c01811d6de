"""The ``forward`` and ``train`` sections: one forward pass, and one LoRA training step, of miniqwen and of
transformers (+PEFT) on the same weights and the same training tokens, per dtype, interleaved."""

from __future__ import annotations

from pathlib import Path

import torch

from data import chunk_texts
from lora import DEFAULT_LORA_TARGETS, apply_lora
from miniqwen import FlopCounter, Qwen2Config, QwenTokenizer, load_pretrained
from miniqwen.flop_count import forward_flops, loss_flops

from ..errors import UsageError
from ..session import load_dataset
from ..settings import DataSettings
from ..training.loss import autocast_context, next_token_loss
from . import hf
from .harness import add_rates, free_memory, interleaved


def training_batch(tokenizer, data: str | None, batch: int, seq_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` [batch, seq_len]: the first ``batch`` unpadded token chunks of the LLMTIME
    text of the training trajectories of ``data`` (what a training step sees). Raises UsageError if too few."""
    dataset = load_dataset(DataSettings(data=data))
    texts = dataset.texts("train", 4 * batch)
    chunks = chunk_texts(tokenizer, texts, seq_len, pad_id=tokenizer.pad_token_id)
    full = chunks.attention_mask.bool().all(1)
    if int(full.sum()) < batch:
        raise UsageError(f"{int(full.sum())} unpadded chunks of {seq_len} tokens in the first {4 * batch} training "
                         f"trajectories, need {batch}: use a shorter length")
    ids, mask = chunks.input_ids[full][:batch], chunks.attention_mask[full][:batch]
    return ids.to(device), mask.to(device)


@torch.no_grad()
def forward_side_by_side(model_dir, data: str | None, batch: int, seq_len: int, dtypes: list[str], repeats: int,
                         device: torch.device, peak: dict | None = None) -> dict:
    """One forward pass over [batch, seq_len] training tokens (all logits), miniqwen vs transformers, per dtype
    (weights held in it): median seconds, GFLOP/s (:func:`miniqwen.flop_count.forward_flops` / s), the fraction of
    ``peak[dtype]["gflops_per_s"]`` (from :func:`~.peak.matmul_peak`), peak extra MiB, and the largest |logit
    difference|. Raises UsageError if the data has too few unpadded chunks (:func:`training_batch`)."""
    config, tok = Qwen2Config.from_json(Path(model_dir) / "config.json"), QwenTokenizer.from_file(model_dir)
    ids = training_batch(tok, data, batch, seq_len, device)[0]
    flops = forward_flops(config, batch, seq_len)
    out = {"batch": batch, "seq_len": seq_len, "repeats": repeats, "flops": flops, "by_dtype": {}}
    for name in dtypes:
        dtype = getattr(torch, name)
        ours = load_pretrained(model_dir, dtype=dtype, device=device)[0]
        theirs = hf.load_model(model_dir, dtype, device)
        a, b = ours(ids).float(), theirs(input_ids=ids, use_cache=False).logits.float()  # also the warm-up
        diff = float(a.sub_(b).abs_().max())
        del a, b
        times = interleaved({"ours": lambda: ours(ids),
                             "transformers": lambda: theirs(input_ids=ids, use_cache=False)}, repeats, device)
        add_rates(times, flops, name, peak)
        out["by_dtype"][name] = {**times, "speedup": times["transformers"]["seconds"] / times["ours"]["seconds"],
                                 "max_abs_logit_difference": diff,
                                 "transformers_attention": hf.attention_implementation(theirs)}
        ours = theirs = None  # free them before the next dtype's
        free_memory()
    return out


def _ours_training_step(model, optimizer, params, ids, mask, precision: str) -> float:
    """One step of :func:`experiments.lib.training.train_lora`'s loop (counted FLOPs, autocast, loss, backward, clip
    1.0, AdamW). Returns the loss before the update."""
    optimizer.zero_grad(set_to_none=True)
    with torch.enable_grad():
        with FlopCounter(), autocast_context(ids.device, precision):
            loss_sum, n = next_token_loss(model, ids, mask)
        loss = loss_sum / max(n, 1)
        loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    return float(loss.detach())


def train_side_by_side(model_dir, data: str | None, batch: int, context_length: int, dtypes: list[str],
                       repeats: int, device: torch.device, peak: dict | None = None, rank: int = 4,
                       lora_alpha: float = 4, lora_targets=DEFAULT_LORA_TARGETS, lr: float = 1e-5) -> dict:
    """One LoRA training step on [batch, context_length] training tokens, miniqwen vs transformers + PEFT
    (``LoraConfig(r=rank, lora_alpha, target_modules=lora_targets)``), per dtype (weights in it, autocast to it, LoRA
    matrices in float32 on both sides): median seconds, GFLOP/s (3 × forward + loss, coursework convention), the
    fraction of the matmul peak, peak extra MiB, and the first step's loss on each side (equal up to rounding: both
    adapters start at B = 0). Raises UsageError if the data has too few unpadded chunks (:func:`training_batch`)."""
    config, tok = Qwen2Config.from_json(Path(model_dir) / "config.json"), QwenTokenizer.from_file(model_dir)
    ids, mask = training_batch(tok, data, batch, context_length, device)
    n_targets = int((mask[:, 1:] * mask[:, :-1]).sum())
    flops = 3 * (forward_flops(config, batch, context_length, rank, lora_targets=tuple(lora_targets))
                 + loss_flops(config.vocab_size, n_targets))
    out = {"batch": batch, "context_length": context_length, "repeats": repeats, "lora_rank": rank,
           "lora_alpha": lora_alpha, "lora_targets": list(lora_targets), "optimizer": f"AdamW lr {lr}, clip 1.0",
           "flops": flops, "by_dtype": {}}
    for name in dtypes:
        dtype = getattr(torch, name)
        torch.manual_seed(0)
        ours = load_pretrained(model_dir, dtype=dtype, device=device)[0]
        apply_lora(ours, rank, lora_alpha, lora_targets)
        theirs = hf.with_lora(hf.load_model(model_dir, dtype, device), rank, lora_alpha, lora_targets)
        ours.train()
        theirs.train()
        p_ours, p_theirs = ([p for p in m.parameters() if p.requires_grad] for m in (ours, theirs))
        opt_ours, opt_theirs = (torch.optim.AdamW(p, lr=lr, weight_decay=0.0) for p in (p_ours, p_theirs))
        step_ours = lambda: _ours_training_step(ours, opt_ours, p_ours, ids, mask, name)  # noqa: E731
        step_theirs = lambda: hf.training_step(theirs, opt_theirs, p_theirs, ids, mask, name)  # noqa: E731
        first = {"ours": step_ours(), "transformers_peft": step_theirs()}  # the warm-up steps
        times = interleaved({"ours": step_ours, "transformers_peft": step_theirs}, repeats, device)
        add_rates(times, flops, name, peak)
        out["by_dtype"][name] = {**times, "first_step_loss": first,
                                 "speedup": times["transformers_peft"]["seconds"] / times["ours"]["seconds"]}
        ours = theirs = opt_ours = opt_theirs = p_ours = p_theirs = None  # free them before the next dtype's
        free_memory()
    return out
