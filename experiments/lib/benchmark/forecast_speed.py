"""The ``forecast`` section: greedy LLMTIME forecasts of validation trajectories with miniqwen's forecaster and with
transformers' ``generate`` under the same constraints, batched and at batch 1; wall time and parse rates."""

from __future__ import annotations

import statistics

import numpy as np
import torch

from data import decode, max_tokens_per_step
from miniqwen import generate, load_pretrained
from miniqwen.tokenizer import END_OF_TEXT, IM_END

from ..evaluation import LLMForecaster, allowed_token_ids, fill_missing, forecast_metrics, forecast_prompt
from ..session import load_dataset
from ..settings import DataSettings, ForecastSettings
from . import hf
from .harness import free_memory, measured


def _scores(values: np.ndarray, contexts: np.ndarray, truth: np.ndarray) -> dict:
    metrics = forecast_metrics(fill_missing(values, contexts.astype(np.float64)), truth)
    return {f"{s}_{k}": metrics[s][k] for s in metrics for k in ("mse", "mae", "r2")}


class _Sides:
    """Both forecasters on the same contexts [n, context_steps, 2], prompts and constraints: each call forecasts the
    trajectories ``rows`` (a slice), ``batch_size`` at a time, and returns ``(values [rows, horizon, 2], complete
    [rows], texts, FLOPs (miniqwen) or the constraints applied (transformers))``."""

    def __init__(self, ours, theirs, tok, contexts: np.ndarray, scale: float, decimals: int, horizon: int):
        self.ours, self.theirs, self.tok, self.contexts = ours, theirs, tok, contexts
        self.scale, self.decimals, self.horizon = scale, decimals, horizon
        self.gen = {"pad_token_id": tok.pad_token_id, "stop_token_id": tok.token_to_id(";"), "stop_count": horizon,
                    "eos_token_ids": [tok.eos_token_id, tok.token_to_id(END_OF_TEXT), tok.token_to_id(IM_END)],
                    "allowed_token_ids": allowed_token_ids(tok)}
        self.max_new = max_tokens_per_step(decimals) * horizon

    def prompt(self, context: np.ndarray) -> list[int]:
        return self.tok.encode(forecast_prompt(context, self.scale, self.decimals, self.horizon, "raw"))

    def miniqwen(self, rows, batch_size: int):
        forecaster = LLMForecaster(self.ours, self.tok, self.scale, self.decimals, batch_size=batch_size,
                                   name="miniqwen")
        fc = forecaster.forecast(self.contexts[rows], self.horizon)
        return fc.values, fc.complete, [t[0] for t in fc.texts], fc.flops

    def transformers(self, rows, batch_size: int):
        prompts = [self.prompt(c) for c in self.contexts[rows]]
        ids, constraints = hf.generate_forecasts(self.theirs, prompts, batch_size, self.max_new, **self.gen)
        texts = [self.tok.decode(x) for x in ids]
        decoded = [decode(t, self.scale, expected_steps=self.horizon) for t in texts]
        return np.stack([d.values for d in decoded]), np.array([d.complete for d in decoded]), texts, constraints

    def warm_up(self) -> None:
        """A short generation on each side (the last 16 tokens of the first prompt)."""
        warm = self.prompt(self.contexts[0])[-16:]
        generate(self.ours, [warm], 2, **self.gen)
        hf.generate_forecasts(self.theirs, [warm], 1, 2, **self.gen)


def _batch1(sides: _Sides, k: int, device: torch.device) -> dict:
    """Seconds and completeness of each side forecasting trajectories 0..k-1 one at a time, interleaved (alternating
    which goes first): ``{"ours", "transformers", "ours_complete", "transformers_complete"}``, lists of k."""
    b1 = {"ours": [], "transformers": [], "ours_complete": [], "transformers_complete": []}
    for i in range(k):
        for side in (("ours", "transformers") if i % 2 == 0 else ("transformers", "ours")):
            fn = sides.miniqwen if side == "ours" else sides.transformers
            (_, done, _, _), seconds, _ = measured(lambda: fn(slice(i, i + 1), 1), device)
            b1[side].append(seconds)
            b1[f"{side}_complete"].append(bool(done[0]))
    return b1


def _batch1_record(b1: dict, k: int, n: int) -> dict:
    """The ``batch1`` entry of the results from :func:`_batch1`'s timings of ``k`` trajectories (out of ``n``)."""
    per_traj = {side: statistics.mean(b1[side]) if k else None for side in ("ours", "transformers")}
    return {"sample": k, "seconds_all": {s: b1[s] for s in ("ours", "transformers")},
            "seconds_per_trajectory": per_traj,
            "extrapolated_seconds": {s: per_traj[s] * n if k else None for s in per_traj},
            "parsed_fraction": {s: float(np.mean(b1[f"{s}_complete"])) if k else None
                                for s in ("ours", "transformers")}}


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
    n, k = len(indices), min(batch1_sample, len(indices))
    ours, tok = load_pretrained(model_dir, dtype=getattr(torch, dtype), device=device)
    theirs = hf.load_model(model_dir, getattr(torch, dtype), device)
    sides = _Sides(ours, theirs, tok, contexts, dataset.llmtime_scale, decimals, horizon)
    sides.warm_up()
    (values, complete, texts, flops), s_ours, m_ours = measured(lambda: sides.miniqwen(slice(None), gen_batch_size),
                                                                device)
    (h_values, h_complete, h_texts, constraints), s_hf, m_hf = measured(
        lambda: sides.transformers(slice(None), gen_batch_size), device)
    batch1 = _batch1_record(_batch1(sides, k, device), k, n)
    out = {
        "trajectories": n, "split": "validation", "context_steps": context_steps, "horizon": horizon,
        "decimals": decimals, "dtype": dtype, "batch_size": gen_batch_size, "runs": 1,
        "ours": {"seconds": s_ours, "seconds_per_trajectory": s_ours / n, "parsed_fraction": float(complete.mean()),
                 "flops": flops, "peak_extra_mib": m_ours, **_scores(values, contexts, truth)},
        "transformers_batched": {"seconds": s_hf, "seconds_per_trajectory": s_hf / n,
                                 "parsed_fraction": float(h_complete.mean()), "peak_extra_mib": m_hf,
                                 "same_text_as_ours": float(np.mean([a == b for a, b in zip(texts, h_texts)])),
                                 **_scores(h_values, contexts, truth)},
        "batch1": batch1,
        "transformers_constraints": constraints,
    }
    out["speedup_vs_transformers_batched"] = s_hf / s_ours
    out["speedup_vs_transformers_batch1"] = (batch1["seconds_per_trajectory"]["transformers"] * n / s_ours
                                             if k else None)
    sides = ours = theirs = None
    free_memory()
    return out
