"""The transformers (+PEFT) side of :mod:`experiments.benchmark`: load the same weights directory, attach the same
LoRA, take the same training step and run ``generate`` under the same forecasting constraints as miniqwen.

transformers and peft are development dependencies (``pip install -e ".[dev]"``): they are imported here, inside
the functions, and :func:`require` turns their absence into one line (a :class:`settings.UsageError`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import UsageError
from ..training.loss import autocast_context


def require(*modules: str) -> None:
    """Raise :class:`UsageError` (one line) if any of ``modules`` (e.g. "transformers", "peft") cannot be imported."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(f"the side-by-side benchmark needs {' and '.join(missing)} (pip install -e \".[dev]\"), or "
                         "run only --sections counting,throughput,peak,loss")


def versions() -> dict:
    """``{"transformers": version, "peft": version}`` of what is installed (None where absent)."""
    import importlib.metadata as md

    out = {}
    for name in ("transformers", "peft"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def load_model(model_dir, dtype: torch.dtype, device: torch.device):
    """transformers' ``AutoModelForCausalLM`` from ``model_dir`` in ``dtype`` on ``device``, in eval mode, with a
    fresh (empty) generation config so that the checkpoint's sampling defaults (Qwen2.5-Instruct ships
    temperature, top-p, top-k and a repetition penalty) can never leak into a greedy comparison."""
    require("transformers")
    import transformers
    from packaging.version import Version

    # transformers 4.56 renamed torch_dtype to dtype; the old name still works there but warns
    key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), **{key: dtype}).to(device).eval()
    model.generation_config = transformers.GenerationConfig()
    return model


def attention_implementation(model) -> str | None:
    """The attention kernel transformers chose for ``model`` (e.g. "sdpa", "eager")."""
    return getattr(model.config, "_attn_implementation", None)


def with_lora(model, rank: int, alpha: float, targets: Sequence[str]):
    """``model`` wrapped by PEFT with ``LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets)`` (no dropout,
    no bias), as a user of transformers + PEFT would set up the coursework's LoRA."""
    require("peft")
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, bias="none",
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def training_step(model, optimizer, params, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  precision: str, max_grad_norm: float | None = 1.0) -> float:
    """One optimizer step of a transformers(+PEFT) model on ``input_ids`` [B, T] (``attention_mask`` [B, T], 1 = real
    token): transformers' own causal-LM loss (``labels``, padding = −100, mean over targets) under autocast to
    ``precision``, backward, gradient clipping to ``max_grad_norm``, ``optimizer.step()`` — the steps of
    :func:`experiments.lib.training.train_lora`. Returns the loss (nats/token) before the update."""
    device = input_ids.device
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    optimizer.zero_grad(set_to_none=True)
    with torch.enable_grad():
        with autocast_context(device, precision):
            loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False).loss
        loss.backward()
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    return float(loss.detach())


def _generation_hooks(vocab_size: int, allowed_token_ids, stop_token_id: int, stop_count: int, prompt_len: int,
                      device):
    """A LogitsProcessor that masks every token outside ``allowed_token_ids`` (None: none) and a StoppingCriteria
    that ends a row once it has generated ``stop_token_id`` ``stop_count`` times (per row, as miniqwen's
    ``generate`` does)."""
    from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

    class AllowOnly(LogitsProcessor):
        def __init__(self):
            self.bias = torch.full((vocab_size,), float("-inf"), device=device)
            self.bias[torch.as_tensor(sorted(set(allowed_token_ids)), device=device)] = 0.0

        def __call__(self, input_ids, scores):
            return scores + self.bias[: scores.shape[-1]].to(scores.dtype)

    class StopAfterCount(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return (input_ids[:, prompt_len:] == stop_token_id).sum(-1) >= stop_count

    processors = LogitsProcessorList([AllowOnly()] if allowed_token_ids is not None else [])
    return processors, StoppingCriteriaList([StopAfterCount()])


@torch.no_grad()
def generate_forecasts(model, prompts: Sequence[Sequence[int]], batch_size: int, max_new_tokens: int, *,
                       pad_token_id: int, eos_token_ids: Sequence[int], stop_token_id: int, stop_count: int,
                       allowed_token_ids: Sequence[int] | None = None) -> tuple[list[list[int]], dict]:
    """Greedy continuations of ``prompts`` (token ids) with transformers' ``generate``, ``batch_size`` at a time in
    the order miniqwen's forecaster uses (sorted by length, so the batches have the same left padding).

    Every row is left-padded with ``pad_token_id`` (with an attention mask), ends at any of ``eos_token_ids`` or
    after ``stop_count`` × ``stop_token_id`` (a StoppingCriteria), and may only emit ``allowed_token_ids`` (a
    LogitsProcessor that masks the other logits: unlike miniqwen's restricted head, the full output head is still
    computed). Returns ``(generated ids per prompt in input order, without end or padding tokens; the constraints
    that were applied)``.
    """
    device = next(model.parameters()).device
    eos = set(eos_token_ids) | {pad_token_id}
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        L = max(len(prompts[i]) for i in rows)
        ids = torch.full((len(rows), L), pad_token_id, dtype=torch.long, device=device)
        mask = torch.zeros((len(rows), L), dtype=torch.long, device=device)
        for r, i in enumerate(rows):
            ids[r, L - len(prompts[i]):] = torch.as_tensor(list(prompts[i]), device=device)
            mask[r, L - len(prompts[i]):] = 1
        processors, stopping = _generation_hooks(model.config.vocab_size, allowed_token_ids, stop_token_id,
                                                 stop_count, L, device)
        sequences = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, num_beams=1,
                                   max_new_tokens=max_new_tokens, pad_token_id=pad_token_id,
                                   eos_token_id=list(eos_token_ids), logits_processor=processors,
                                   stopping_criteria=stopping)
        for r, i in enumerate(rows):
            tokens = sequences[r, L:].tolist()
            end = next((k for k, t in enumerate(tokens) if t in eos), len(tokens))
            out[i] = tokens[:end]
    constraints = {
        "greedy": True, "same_prompt_token_ids": True, "left_padding_with_attention_mask": True,
        "batch_order": "sorted by prompt length, as miniqwen's forecaster", "max_new_tokens": max_new_tokens,
        "eos_token_ids": sorted(set(eos_token_ids)), "stop_after": f"{stop_count} x token {stop_token_id} "
        "(StoppingCriteria, per row)",
        "allowed_tokens_only": allowed_token_ids is not None,
        "allowed_tokens_how": "LogitsProcessor masking the full-vocabulary logits" if allowed_token_ids is not None
        else None,
        "generation_config": "fresh GenerationConfig (no sampling defaults from the checkpoint)",
    }
    return out, constraints
