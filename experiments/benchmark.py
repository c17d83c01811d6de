"""Speed benchmarks: miniqwen beside transformers (+PEFT) on the same weights (recorded in the README, never
asserted in tests).

    python -m experiments.benchmark --model DIR --data FILE [--sections peak,forward,train,...] [--repeats 3]

Sections (``--sections``, default all), each a plain function returning a JSON-ready dict:

* ``peak`` — this machine's matmul peak: an n × n square matmul in float32 and in the default dtype (GFLOP/s =
  2n³ / s), the denominator of every "fraction of peak" below; and its memory read bandwidth (summing 1 GiB).
* ``counting`` — the overhead of FLOP counting: a forward pass timed with and without a
  :class:`miniqwen.flops.FlopCounter`, and the counter's bookkeeping alone on a 24-layer model too narrow to hide it.
* ``throughput`` — miniqwen's prefill tokens/s and KV-cached decoding tokens/s at several batch sizes, and the
  rate at which a decoding step reads the weights (GB/s, and the fraction of the memory bandwidth with ``peak``).
* ``forward`` / ``train`` — one forward pass, and one LoRA training step (rank 4 on q, v; AdamW; clipping), of
  miniqwen and of transformers(+PEFT) in float32 and in the default dtype, with the logits' / losses' agreement,
  peak memory and the fraction of the matmul peak reached (FLOPs from :mod:`miniqwen.flops`'s closed forms).
* ``loss`` — miniqwen's validation loss in the default dtype against float32 (first ``--loss-chunks`` chunks).
* ``forecast`` — forecasting ``--trajectories`` validation trajectories (80 → 20 steps, greedy, LLMTIME) with
  miniqwen's forecaster and with transformers' ``generate`` batched the same way, plus both at batch 1 on the first
  ``--batch1-sample`` trajectories (extrapolated to all); wall time and the parse rate of both by our own parser.

Timings are medians of ``--repeats`` runs after a warm-up, the two implementations interleaved (alternating which
goes first) so that drifts in machine load hit both; the 100-trajectory forecasts run once each. ``counting``,
``throughput`` and ``forecast`` run in the default dtype (``--precision``). Peak memory is measured per call (see
:func:`memory_method`) and, for the whole process, after each section. Writes ``<out>/benchmark.json`` and a
README-ready ``<out>/benchmark.md`` (an existing pair is replaced only with ``--overwrite``, which is checked, with
every option, before any section runs); the targets of the speed issue are reported as met / not met. Nothing is
charged to the FLOP ledger (a benchmark is not an experiment; the forecast's counted FLOPs are recorded).
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from data import Chunks, chunk_texts, decode
from lora import apply_lora
from miniqwen import (
    FlopCounter, KVCache, Qwen2Config, Qwen2ForCausalLM, QwenTokenizer, cpu_supports_bf16, generate, load_pretrained,
    packed_weights,
)
from miniqwen.atomic import atomic_write
from miniqwen.flops import DEFAULT_LORA_TARGETS, forward_flops, loss_flops
from miniqwen.loading import DEFAULT_MODEL, resolve_model_dir
from miniqwen.tokenizer import END_OF_TEXT, IM_END

from .lib import benchmark_hf as hf
from .lib.evaluation import LLMForecaster, allowed_token_ids, fill_missing, forecast_metrics, forecast_prompt, \
    max_tokens_per_step
from .lib.results import write_json
from .lib.session import load_dataset, resolve_precision, weights_label
from .lib.settings import MODEL_ENV_VAR, ArgumentParser, DataSettings, ForecastSettings, UsageError, run_cli
from .lib.training.loss import autocast_context, next_token_loss, validation_loss

SECTIONS = ("peak", "counting", "throughput", "forward", "train", "loss", "forecast")
NEEDS_TRANSFORMERS = {"forward": ("transformers",), "train": ("transformers", "peft"), "forecast": ("transformers",)}
MIB = 2**20


# ---------------------------------------------------------------------------------------------------------------
# Timing and memory
# ---------------------------------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device: torch.device = torch.device("cpu")) -> float:
    """Wall seconds of ``fn()`` (CUDA work finished before and after)."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _proc_status(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status (e.g. VmRSS, VmHWM) in bytes; None where there is no /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _max_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


_PROCESS_PEAK = 0  # the largest resident set seen, kept across the per-call resets below


def _reset_peak(device: torch.device) -> int:
    """Start measuring a call's peak memory: reset the high-water mark where the OS allows it (Linux:
    /proc/self/clear_refs; CUDA: the allocator's peak) and return the bytes in use now."""
    global _PROCESS_PEAK
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    _PROCESS_PEAK = max(_PROCESS_PEAK, _proc_status("VmHWM") or _max_rss_bytes())
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (and ru_maxrss) to the current RSS
    except OSError:
        pass
    return _proc_status("VmRSS") or 0


def _peak_since(device: torch.device, start: int) -> float | None:
    """MiB the call since :func:`_reset_peak` needed above what was in use at its start (None if the peak
    cannot be reset here, e.g. without /proc)."""
    global _PROCESS_PEAK
    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated(device) - start) / MIB
    peak = _proc_status("VmHWM")
    if peak is None:
        return None
    _PROCESS_PEAK = max(_PROCESS_PEAK, peak)
    return max(peak - start, 0) / MIB


def memory_method(device: torch.device) -> str:
    """How peak memory is measured on ``device`` (recorded in the results)."""
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated, reset before each call"
    if os.access("/proc/self/clear_refs", os.W_OK) and _proc_status("VmHWM") is not None:
        return ("resident set high-water mark (VmHWM) above the RSS at the call's start, reset before each call "
                "through /proc/self/clear_refs (memory the C heap kept from an earlier call and reuses is not seen; "
                "large tensors, which are mapped and unmapped, are)")
    return "not per call: only the process's max RSS (ru_maxrss, cumulative) is available"


def process_peak_mib(device: torch.device) -> float:
    """The most memory in use so far: the process's largest resident set (CPU; cumulative over all sections)
    or, on CUDA, the allocator's peak since the last per-call reset."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / MIB
    return max(_PROCESS_PEAK, _proc_status("VmHWM") or _max_rss_bytes()) / MIB


def interleaved(calls: dict, repeats: int, device: torch.device) -> dict:
    """Run every ``calls[name]()`` ``repeats`` times, alternating which goes first; per name ``{"seconds"
    (median), "seconds_all", "peak_extra_mib" (most memory a call needed above what was in use before it)}``."""
    out = {name: {"seconds_all": [], "peak_extra_mib": None} for name in calls}
    names = list(calls)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            _, seconds, extra = measured(calls[name], device)
            out[name]["seconds_all"].append(seconds)
            if extra is not None:
                out[name]["peak_extra_mib"] = max(out[name]["peak_extra_mib"] or 0.0, extra)
    for result in out.values():
        result["seconds"] = statistics.median(result["seconds_all"])
    return out


def measured(fn, device: torch.device):
    """``(fn(), wall seconds, peak extra MiB)`` of one call (see :func:`interleaved`)."""
    start = _reset_peak(device)
    _sync(device)
    t0 = time.perf_counter()
    value = fn()
    _sync(device)
    seconds = time.perf_counter() - t0
    return value, seconds, _peak_since(device, start)


def _free() -> None:
    """Give memory back after the caller has deleted its models."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------------------

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


def _dtype_names(default: str) -> list[str]:
    return ["float32"] + ([default] if default != "float32" else [])


# ---------------------------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def matmul_peak(size: int, dtypes: list[str], repeats: int, device: torch.device) -> dict:
    """``{dtype: {"size", "gflops_per_s" (median), "gflops_per_s_best", "seconds_all"}}`` of a [size, size] ×
    [size, size] matmul (2·size³ FLOPs) on ``device``."""
    out = {}
    for name in dtypes:
        a, b = (torch.randn(size, size, device=device).to(getattr(torch, name)) for _ in range(2))
        a @ b  # warm-up
        seconds = [_time(lambda: a @ b, device) for _ in range(max(repeats, 3))]
        flops = 2 * size**3
        out[name] = {"size": size, "gflops_per_s": flops / statistics.median(seconds) / 1e9,
                     "gflops_per_s_best": flops / min(seconds) / 1e9, "seconds_all": seconds}
    return out


@torch.no_grad()
def memory_bandwidth(mib: int, repeats: int, device: torch.device) -> dict:
    """``{"mib", "gb_per_s_read" (median), "seconds_all"}``: summing a ``mib``-MiB float32 tensor on ``device``
    reads it once (GB = 10⁹ bytes); what decoding's weight reads are compared with. A copy, which also writes,
    gave about half this rate here."""
    x = torch.ones(mib * MIB // 4, device=device)
    x.sum()  # warm-up
    seconds = [_time(lambda: x.sum(), device) for _ in range(max(repeats, 3))]
    return {"mib": mib, "gb_per_s_read": mib * MIB / statistics.median(seconds) / 1e9, "seconds_all": seconds}


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


def counting_bookkeeping(repeats: int = 300) -> dict:
    """Absolute cost of counting, isolated: a 24-layer model as narrow as possible (hidden 64), where the Python
    bookkeeping is all the counter adds, timed with and without counting (median of ``repeats``, interleaved).
    This is what counting adds to any 24-layer forward pass, whatever its width."""
    tiny = Qwen2ForCausalLM(Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=24,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()
    result = counting_overhead(tiny, 1, 8, repeats)
    result["added_ms"] = 1e3 * (result["seconds_counting"] - result["seconds_plain"])
    return result


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
        prefill = _time(lambda: model(ids, cache=cache, logits_to_keep=1), device)
        decode_s = _time(lambda: [model(step, cache=cache) for _ in range(new_tokens)], device)
    weights = decode_weight_bytes(model)
    return {"batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
            "prefill_tokens_per_s": batch * prompt_len / prefill, "decode_tokens_per_s": batch * new_tokens / decode_s,
            "decode_seconds_per_step": decode_s / new_tokens, "weight_bytes_per_step": weights,
            "weights_gb_per_s": weights * new_tokens / decode_s / 1e9}


@torch.no_grad()
def forward_side_by_side(model_dir, data: str | None, batch: int, seq_len: int, dtypes: list[str], repeats: int,
                         device: torch.device, peak: dict | None = None) -> dict:
    """One forward pass over [batch, seq_len] training tokens (all logits), miniqwen vs transformers, per dtype
    (weights held in it): median seconds, GFLOP/s (:func:`miniqwen.flops.forward_flops` / s), the fraction of
    ``peak[dtype]["gflops_per_s"]`` (from :func:`matmul_peak`), peak extra MiB, and the largest |logit difference|."""
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
        for result in times.values():
            result["gflops_per_s"] = flops / result["seconds"] / 1e9
            if peak and name in peak:
                result["fraction_of_matmul_peak"] = result["gflops_per_s"] / peak[name]["gflops_per_s"]
        out["by_dtype"][name] = {**times, "speedup": times["transformers"]["seconds"] / times["ours"]["seconds"],
                                 "max_abs_logit_difference": diff,
                                 "transformers_attention": hf.attention_implementation(theirs)}
        ours = theirs = None  # free them before the next dtype's
        _free()
    return out


def _ours_training_step(model, optimizer, params, ids, mask, precision: str) -> float:
    """One step of :func:`experiments.lib.training.train`'s loop (counted FLOPs, autocast, loss, backward, clip 1.0,
    AdamW). Returns the loss before the update."""
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
    adapters start at B = 0)."""
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
        for result in times.values():
            result["gflops_per_s"] = flops / result["seconds"] / 1e9
            if peak and name in peak:
                result["fraction_of_matmul_peak"] = result["gflops_per_s"] / peak[name]["gflops_per_s"]
        out["by_dtype"][name] = {**times, "first_step_loss": first,
                                 "speedup": times["transformers_peft"]["seconds"] / times["ours"]["seconds"]}
        ours = theirs = opt_ours = opt_theirs = p_ours = p_theirs = None  # free them before the next dtype's
        _free()
    return out


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
    for name in _dtype_names(default):
        model = load_pretrained(model_dir, dtype=getattr(torch, name), device=device)[0]
        (loss, _), seconds, _ = measured(lambda: validation_loss(model, c, batch_size, name, progress=False), device)
        out["by_dtype"][name] = {"loss": loss, "seconds": seconds}
        model = None
        _free()
    losses = out["by_dtype"]
    out["relative_difference_percent"] = 100 * (losses[default]["loss"] / losses["float32"]["loss"] - 1)
    return out


def _scores(values: np.ndarray, contexts: np.ndarray, truth: np.ndarray) -> dict:
    metrics = forecast_metrics(fill_missing(values, contexts.astype(np.float64)), truth)
    return {f"{s}_{k}": metrics[s][k] for s in metrics for k in ("mse", "mae", "r2")}


def forecast_side_by_side(model_dir, data: str | None, trajectories: int | None, batch1_sample: int,
                          gen_batch_size: int, dtype: str, device: torch.device, context_steps: int = 80,
                          horizon: int = 20, decimals: int = 2) -> dict:
    """Greedy LLMTIME forecasts of the first ``trajectories`` validation trajectories (``context_steps`` →
    ``horizon`` steps), weights in ``dtype``: miniqwen's :class:`LLMForecaster` and transformers' ``generate``, both
    batched ``gen_batch_size`` at a time on the same prompts and constraints, then both at batch 1 on the first
    ``batch1_sample`` trajectories (interleaved; seconds per trajectory × n = the extrapolated wall time). Parse
    rates (fraction of forecasts whose text gives ``horizon`` valid steps) come from :func:`data.decode` for both."""
    dataset = load_dataset(DataSettings(data=data, decimals=decimals))
    forecast = ForecastSettings(split="validation", limit=trajectories, context_steps=context_steps, horizon=horizon)
    indices, _, contexts, truth = dataset.forecast_set(forecast)
    n, k, scale = len(indices), min(batch1_sample, len(indices)), dataset.llmtime_scale
    ours, tok = load_pretrained(model_dir, dtype=getattr(torch, dtype), device=device)
    theirs = hf.load_model(model_dir, getattr(torch, dtype), device)
    gen = {"pad_token_id": tok.pad_token_id, "stop_token_id": tok.token_to_id(";"), "stop_count": horizon,
           "eos_token_ids": [tok.eos_token_id, tok.token_to_id(END_OF_TEXT), tok.token_to_id(IM_END)],
           "allowed_token_ids": allowed_token_ids(tok)}
    max_new = max_tokens_per_step(decimals) * horizon

    def ours_forecast(rows, batch_size):
        forecaster = LLMForecaster(ours, tok, scale, decimals, batch_size=batch_size, name="miniqwen")
        fc = forecaster.forecast(contexts[rows], horizon)
        return fc.values, fc.complete, [t[0] for t in fc.texts], fc.flops

    def hf_forecast(rows, batch_size):
        prompts = [tok.encode(forecast_prompt(c, scale, decimals, horizon, "raw")) for c in contexts[rows]]
        ids, constraints = hf.generate_forecasts(theirs, prompts, batch_size, max_new, **gen)
        texts = [tok.decode(x) for x in ids]
        decoded = [decode(t, scale, expected_steps=horizon) for t in texts]
        return np.stack([d.values for d in decoded]), np.array([d.complete for d in decoded]), texts, constraints

    warm = tok.encode(forecast_prompt(contexts[0], scale, decimals, horizon, "raw"))[-16:]  # a short warm-up
    generate(ours, [warm], 2, **gen)
    hf.generate_forecasts(theirs, [warm], 1, 2, **gen)
    (values, complete, texts, flops), s_ours, m_ours = measured(lambda: ours_forecast(slice(None), gen_batch_size),
                                                                device)
    (h_values, h_complete, h_texts, constraints), s_hf, m_hf = measured(
        lambda: hf_forecast(slice(None), gen_batch_size), device)
    b1 = {"ours": [], "transformers": [], "ours_complete": [], "transformers_complete": []}
    for i in range(k):  # batch 1, interleaved, alternating which goes first
        for side in (("ours", "transformers") if i % 2 == 0 else ("transformers", "ours")):
            fn = ours_forecast if side == "ours" else hf_forecast
            (_, done, _, _), seconds, _ = measured(lambda: fn(slice(i, i + 1), 1), device)
            b1[side].append(seconds)
            b1[f"{side}_complete"].append(bool(done[0]))
    per_traj = {side: statistics.mean(b1[side]) if k else None for side in ("ours", "transformers")}
    out = {
        "trajectories": n, "split": "validation", "context_steps": context_steps, "horizon": horizon,
        "decimals": decimals, "dtype": dtype, "batch_size": gen_batch_size, "runs": 1,
        "ours": {"seconds": s_ours, "seconds_per_trajectory": s_ours / n, "parsed_fraction": float(complete.mean()),
                 "flops": flops, "peak_extra_mib": m_ours, **_scores(values, contexts, truth)},
        "transformers_batched": {"seconds": s_hf, "seconds_per_trajectory": s_hf / n,
                                 "parsed_fraction": float(h_complete.mean()), "peak_extra_mib": m_hf,
                                 "same_text_as_ours": float(np.mean([a == b for a, b in zip(texts, h_texts)])),
                                 **_scores(h_values, contexts, truth)},
        "batch1": {"sample": k, "seconds_all": {s: b1[s] for s in ("ours", "transformers")},
                   "seconds_per_trajectory": per_traj,
                   "extrapolated_seconds": {s: per_traj[s] * n if k else None for s in per_traj},
                   "parsed_fraction": {s: float(np.mean(b1[f"{s}_complete"])) if k else None
                                       for s in ("ours", "transformers")}},
        "transformers_constraints": constraints,
    }
    out["speedup_vs_transformers_batched"] = s_hf / s_ours
    out["speedup_vs_transformers_batch1"] = per_traj["transformers"] * n / s_ours if k else None
    ours = theirs = None
    _free()
    return out


# ---------------------------------------------------------------------------------------------------------------
# Targets of the speed issue, and the README table
# ---------------------------------------------------------------------------------------------------------------

def check_targets(results: dict) -> list[dict]:
    """The speed issue's targets, each ``{"target", "value", "met" (None = not judged), "note"}``, from what the
    run measured (a target whose section did not run is left out)."""
    rows, default = [], results["dtype"]

    def add(target, value, met, note=""):
        rows.append({"target": target, "value": value, "met": met, "note": note})

    train = results.get("train", {}).get("by_dtype", {})
    if "float32" in train and default in train:
        speed = train["float32"]["transformers_peft"]["seconds"] / train[default]["ours"]["seconds"]
        add(f"training step, ours in {default} >= 2.5x transformers+PEFT in float32", speed, speed >= 2.5)
    if "loss" in results and default != "float32":
        rel = results["loss"]["relative_difference_percent"]
        add(f"validation loss in {default} within 0.5% of float32", rel, abs(rel) <= 0.5,
            f"{results['loss']['chunks']} validation chunks")
    if "forecast" in results:
        f = results["forecast"]
        n, full = f["trajectories"], f["trajectories"] == 100
        note = "" if full else f"measured on {n} trajectories, scaled to 100: not judged"
        add("forecasting the 100 validation trajectories in < 5 min", f["ours"]["seconds"] * 100 / n,
            f["ours"]["seconds"] < 300 if full else None, note)
        if f["speedup_vs_transformers_batch1"] is not None:
            add(">= 20x transformers generate at batch 1", f["speedup_vs_transformers_batch1"],
                f["speedup_vs_transformers_batch1"] >= 20, f"batch 1 extrapolated from {f['batch1']['sample']}")
        add(">= 4x transformers generate batched", f["speedup_vs_transformers_batched"],
            f["speedup_vs_transformers_batched"] >= 4)
        ours_p, their_p = f["ours"]["parsed_fraction"], f["transformers_batched"]["parsed_fraction"]
        add("same parse rate as transformers generate", ours_p - their_p, ours_p >= their_p,
            f"ours {ours_p:.0%}, transformers {their_p:.0%}")
    batch1 = [r for r in results.get("throughput", []) if r["batch"] == 1 and "fraction_of_memory_bandwidth" in r]
    if batch1:
        fraction = batch1[0]["fraction_of_memory_bandwidth"]
        add("decoding at batch 1 reads the weights at >= 60% of the memory bandwidth", fraction, fraction >= 0.6,
            f"{batch1[0]['weights_gb_per_s']:.1f} GB/s of weights, "
            f"memory read at {results['memory_bandwidth']['gb_per_s_read']:.1f} GB/s")
    bf16 = results.get("forward", {}).get("by_dtype", {}).get("bfloat16", {}).get("ours", {})
    if "fraction_of_matmul_peak" in bf16:
        add("bf16 forward >= 70% of the bf16 matmul peak", bf16["fraction_of_matmul_peak"],
            bf16["fraction_of_matmul_peak"] >= 0.7)
    return rows


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 120 else f"{seconds:.1f} s"


def markdown(results: dict) -> str:
    """A README table of the side-by-side sections and the targets."""
    lines = [f"Weights: {results['weights']}; {results['device']}, {results['threads']} threads, torch "
             f"{results['torch']}, transformers {results['transformers']}, peft {results['peft']}.", "",
             "| measurement | dtype | miniqwen | transformers(+PEFT) | ratio |", "| --- | --- | ---: | ---: | ---: |"]

    def pct(r: dict) -> str:
        return f" ({r['fraction_of_matmul_peak']:.0%} of peak)" if "fraction_of_matmul_peak" in r else ""

    for key, theirs, label in (("forward", "transformers", "forward {batch} × {seq_len}"),
                               ("train", "transformers_peft", "LoRA training step {batch} × {context_length}")):
        section = results.get(key)
        for dtype, r in (section or {}).get("by_dtype", {}).items():
            lines.append(f"| {label.format(**section)} | {dtype} | {r['ours']['seconds']:.2f} s{pct(r['ours'])} | "
                         f"{r[theirs]['seconds']:.2f} s{pct(r[theirs])} | {r['speedup']:.2f}× |")
    if "forecast" in results:
        f = results["forecast"]
        b1 = f["batch1"]["extrapolated_seconds"]
        lines += [f"| forecast {f['trajectories']} trajectories, batch {f['batch_size']} | {f['dtype']} | "
                  f"{_duration(f['ours']['seconds'])}, {f['ours']['parsed_fraction']:.0%} parsed | "
                  f"{_duration(f['transformers_batched']['seconds'])}, "
                  f"{f['transformers_batched']['parsed_fraction']:.0%} parsed | "
                  f"{f['speedup_vs_transformers_batched']:.1f}× |"]
        if f["speedup_vs_transformers_batch1"] is not None:
            lines += [f"| same, batch 1 (extrapolated from {f['batch1']['sample']}) | {f['dtype']} | "
                      f"{_duration(b1['ours'])} | {_duration(b1['transformers'])} | "
                      f"{f['speedup_vs_transformers_batch1']:.1f}× (vs ours batched) |"]
    for r in results.get("throughput", []):
        share = (f" ({r['fraction_of_memory_bandwidth']:.0%} of the read bandwidth)"
                 if "fraction_of_memory_bandwidth" in r else "")
        lines += [f"| decoding step, batch {r['batch']}, full head (miniqwen only) | {results['dtype']} | "
                  f"{1e3 * r['decode_seconds_per_step']:.0f} ms, weights read at {r['weights_gb_per_s']:.1f} GB/s"
                  f"{share} | | |"]
    if "matmul_peak" in results:
        lines += ["", "Matmul peak: " + ", ".join(f"{d} {r['gflops_per_s']:.0f} GFLOP/s ({r['size']}²)"
                                                  for d, r in results["matmul_peak"].items()) + "."]
    if results.get("targets"):
        lines += ["", "| target | measured | met |", "| --- | ---: | --- |"]
        for t in results["targets"]:
            met = "not judged" if t["met"] is None else ("met" if t["met"] else "**not met**")
            lines.append(f"| {t['target']} | {t['value']:.3g} | {met}{' — ' + t['note'] if t['note'] else ''} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------

def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m experiments.benchmark", description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--model", default=os.environ.get(MODEL_ENV_VAR, DEFAULT_MODEL),
      help=f"HF-layout model directory or Hub repo id (default: ${MODEL_ENV_VAR} or {DEFAULT_MODEL})")
    a("--data", default=None, help="Lotka-Volterra HDF5 file (default: $MINIQWEN_DATA, then the usual places)")
    a("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    a("--precision", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
      help="the default dtype compared beside float32 (auto: bf16 on CUDA and on CPUs with native bf16)")
    a("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    a("--sections", default=",".join(SECTIONS), help=f"comma-separated, any of {','.join(SECTIONS)} (default all)")
    a("--repeats", type=int, default=3, help="timed repeats per measurement, after a warm-up (default 3)")
    a("--out", type=Path, default=Path("runs/benchmark"), help="output directory (default runs/benchmark)")
    a("--overwrite", action="store_true", help="replace a benchmark.json / benchmark.md already in --out")
    a("--peak-size", type=int, default=2048, help="n of the n × n matmul peak (default 2048)")
    a("--bandwidth-mib", type=int, default=1024,
      help="MiB read (summed) to measure the memory read bandwidth (default 1024)")
    a("--counting-lengths", type=_ints, default=[1, 128, 512], help="forward lengths timed with/without counting")
    a("--bookkeeping-repeats", type=int, default=300, help="repeats of the counting bookkeeping (default 300)")
    a("--throughput-batches", type=_ints, default=[1, 8, 20], help="decode batch sizes (default 1,8,20)")
    a("--prompt-len", type=int, default=256, help="throughput prompt length (default 256)")
    a("--new-tokens", type=int, default=16, help="throughput decoding steps (default 16)")
    a("--forward-batch", type=int, default=4, help="forward batch (default 4)")
    a("--forward-seq", type=int, default=512, help="forward length (default 512)")
    a("--train-batch", type=int, default=4, help="training batch (default 4, the coursework's)")
    a("--train-context", type=int, default=512, help="training context length (default 512, the coursework's)")
    a("--loss-chunks", type=int, default=16, help="validation chunks for the loss comparison (default 16; 0 = all)")
    a("--loss-context", type=int, default=512, help="validation chunk length (default 512)")
    a("--loss-batch-size", type=int, default=4, help="validation chunks per batch (default 4)")
    a("--trajectories", type=int, default=100, help="validation trajectories forecast (default 100 = all)")
    a("--batch1-sample", type=int, default=3, help="trajectories timed at batch 1, then extrapolated (default 3)")
    a("--gen-batch-size", type=int, default=20, help="forecast batch size, both sides (default 20)")
    a("--context-steps", type=int, default=80, help="observed steps per forecast (default 80)")
    a("--horizon", type=int, default=20, help="forecast steps (default 20)")
    a("--decimals", type=int, default=2, help="decimals per value in the LLMTIME text (default 2)")
    return p


OUTPUTS = ("benchmark.json", "benchmark.md")


def check_device(name: str | None) -> None:
    """Refuse (UsageError naming --device) a device that is not cpu, cuda or cuda:N, or CUDA where there is none."""
    if name is None:
        return
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name!r}: must be cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name!r}: CUDA is not available on this machine (use cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse (UsageError naming --out) an output directory that is a file, or already holds a benchmark (unless
    ``overwrite``), or cannot be written — before any section runs; then create it."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a directory: choose another --out")
    held = [name for name in OUTPUTS if (out / name).exists()]
    if held and not overwrite:
        raise UsageError(f"--out {out} already holds {' and '.join(held)}: pass --overwrite to replace "
                         f"{'them' if len(held) > 1 else 'it'}, or choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"--out {out}: cannot create it ({err.strerror or err})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: not writable")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.out = args.out.expanduser()
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads {args.threads}: must be an integer >= 1 (or left out for torch's choice)")
    for name, low in (("counting_lengths", 1), ("throughput_batches", 1)):
        values = getattr(args, name)
        if not values or min(values) < low:
            raise UsageError(f"--{name.replace('_', '-')} {','.join(map(str, values)) or repr('')}: must be "
                             f"comma-separated integers >= {low}")
    if args.loss_context < 2:
        raise UsageError(f"--loss-context {args.loss_context}: must be >= 2 (a chunk needs a token to predict)")
    check_device(args.device)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown or not sections:
        raise UsageError(f"--sections {args.sections!r}: must be comma-separated names among {', '.join(SECTIONS)}")
    for name in ("repeats", "peak_size", "bandwidth_mib", "bookkeeping_repeats", "prompt_len", "new_tokens",
                 "forward_batch", "forward_seq", "train_batch", "train_context", "loss_batch_size", "trajectories",
                 "gen_batch_size", "context_steps", "horizon"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    for name in ("batch1_sample", "loss_chunks", "decimals"):
        if getattr(args, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 0")
    hf.require(*sorted({m for s in sections for m in NEEDS_TRANSFORMERS.get(s, ())}))
    check_out(args.out, args.overwrite)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    default = resolve_precision(args.precision, device)
    model_dir = resolve_model_dir(args.model)
    dtypes = _dtype_names(default)
    torch.manual_seed(0)
    results = {"benchmark": 2, "weights": weights_label(args.model), "model": Path(args.model).name,
               "device": str(device), "dtype": default, "threads": torch.get_num_threads(),
               "machine": platform.processor() or platform.machine(),
               "cpu_native_bf16": cpu_supports_bf16(), "torch": torch.__version__, **hf.versions(),
               "python": platform.python_version(), "memory_method": memory_method(device), "sections": sections,
               "settings": {k: v for k, v in vars(args).items()
                            if k not in ("model", "data", "out", "sections", "overwrite")}}
    if {"forward", "train", "loss", "forecast"} & set(sections):
        results["data"] = load_dataset(DataSettings(data=args.data, decimals=args.decimals)).record()
    results["seconds"], results["peak_memory_mib_after"] = {}, {}
    for section in sections:
        start = time.perf_counter()
        if section == "peak":
            results["matmul_peak"] = matmul_peak(args.peak_size, dtypes, args.repeats, device)
            results["memory_bandwidth"] = memory_bandwidth(args.bandwidth_mib, args.repeats, device)
        elif section == "counting":
            results["counting_bookkeeping"] = counting_bookkeeping(args.bookkeeping_repeats)
            model = load_pretrained(model_dir, dtype=getattr(torch, default), device=device)[0]
            results["counting_overhead"] = [counting_overhead(model, 1, n, args.repeats) for n in args.counting_lengths]
            del model
            _free()
        elif section == "throughput":
            model = load_pretrained(model_dir, dtype=getattr(torch, default), device=device)[0]
            results["throughput"] = [throughput(model, b, args.prompt_len, args.new_tokens)
                                     for b in args.throughput_batches]
            if "memory_bandwidth" in results:
                for r in results["throughput"]:
                    r["fraction_of_memory_bandwidth"] = (r["weights_gb_per_s"]
                                                         / results["memory_bandwidth"]["gb_per_s_read"])
            del model
            _free()
        elif section == "forward":
            results["forward"] = forward_side_by_side(model_dir, args.data, args.forward_batch, args.forward_seq,
                                                      dtypes, args.repeats, device, results.get("matmul_peak"))
        elif section == "train":
            results["train"] = train_side_by_side(model_dir, args.data, args.train_batch, args.train_context, dtypes,
                                                  args.repeats, device, results.get("matmul_peak"))
        elif section == "loss":
            results["loss"] = loss_precision(model_dir, args.data, args.loss_chunks, args.loss_context,
                                             args.loss_batch_size, default, device)
        elif section == "forecast":
            results["forecast"] = forecast_side_by_side(model_dir, args.data, args.trajectories, args.batch1_sample,
                                                        args.gen_batch_size, default, device, args.context_steps,
                                                        args.horizon, args.decimals)
        results["seconds"][section] = time.perf_counter() - start
        results["peak_memory_mib_after"][section] = process_peak_mib(device)
        print(f"{section}: done in {results['seconds'][section]:.0f} s")
    results["targets"] = check_targets(results)
    write_json(args.out / "benchmark.json", results)
    table = markdown(results)
    atomic_write(args.out / "benchmark.md", table)
    print(table)
    print(f"wrote {args.out / 'benchmark.json'} and {args.out / 'benchmark.md'}")
    return 0


if __name__ == "__main__":
    run_cli(main)
