"""One forecaster interface and one way to score it, shared by the LLM and the classical forecasters.

A *forecaster* has a ``name`` and ``forecast(contexts [n, C, 2], horizon) -> Forecasts``. :class:`LLMForecaster`
continues LLMTIME text with constrained, KV-cached generation; the classical ones
(:mod:`experiments.lib.classical_forecasters`) fit each context. :func:`evaluate` turns any of them into an
:class:`experiments.lib.results.Evaluation`: unparsed steps filled by persistence, MSE/MAE/R² per species overall and
per horizon step, parse rate, FLOPs, wall time.
"""

from __future__ import annotations

import csv
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from tqdm.auto import tqdm

from data import decode, encode, max_tokens_per_step, numeric_alphabet
from miniqwen import FlopCounter, chat_prompt, generate, token_ids_for
from miniqwen.atomic import naming
from miniqwen.generate import bar_disabled
from miniqwen.tokenizer import END_OF_TEXT, IM_END

from .results import Evaluation, Forecasts

SPECIES = ("prey", "predator")


class Forecaster(Protocol):
    """What :func:`evaluate` scores: ``forecast(contexts [n, C, 2] data units, horizon) -> Forecasts``."""

    name: str

    def forecast(self, contexts: np.ndarray, horizon: int) -> Forecasts: ...


# ---------------------------------------------------------------------------------------------------------------
# The LLM forecaster (LLMTIME, Gruver et al. 2023)
# ---------------------------------------------------------------------------------------------------------------

def forecast_prompt(context: np.ndarray, llmtime_scale, decimals: int, horizon: int, mode: str,
                    encoding: str = "decimal") -> str:
    """The text the model continues for one trajectory.

    ``context`` [C, 2] in data units, written at ``llmtime_scale`` (a float α, or a ``data.SeriesScale``) in
    ``encoding`` ("decimal" or "integer", :func:`data.llmtime.encode`).
    ``mode="raw"``: the LLMTIME string of the context followed by ";" — the model simply continues the sequence
    (Gruver et al. 2023). ``mode="chat"``: the same string inside a Qwen chat turn that asks for the next
    ``horizon`` steps in the same format; the assistant's answer is the forecast.
    Raises ValueError for another mode or encoding.
    """
    series = encode(context, llmtime_scale, decimals, encoding) + ";"
    if mode == "raw":
        return series
    if mode == "chat":
        written = (f"with {decimals} decimals" if encoding == "decimal" else
                   f"as whole numbers, {10 ** decimals} times the value (no decimal point)")
        return chat_prompt(
            "Below is a predator-prey time series: one time step per ';'-separated entry, each written as "
            f"'prey,predator' {written}. Continue it with the next {horizon} time steps in exactly "
            f"the same format. Answer with the numbers only.\n\n{series}"
        )
    raise ValueError(f"unknown prompt mode {mode!r} (raw or chat)")


def allowed_token_ids(tokenizer, encoding: str = "decimal") -> list[int]:
    """Vocabulary ids generation may emit: the numeric alphabet of ``encoding`` (digits , ; and, for "decimal", the
    point) and the end tokens. With "integer" a "." could only make a step invalid, so it is not offered."""
    return token_ids_for(tokenizer, numeric_alphabet(encoding)) + [tokenizer.eos_token_id, tokenizer.pad_token_id]


def prompt_lengths(tokenizer, contexts: np.ndarray, llmtime_scale: float, decimals: int, horizon: int,
                   prompt: str, encoding: str = "decimal", scaler=None) -> list[int]:
    """Token count of each context's prompt (what the cost plan needs); ``scaler`` as :class:`LLMForecaster`'s."""
    return [len(tokenizer.encode(forecast_prompt(c, scaler(c) if scaler else llmtime_scale, decimals, horizon,
                                                 prompt, encoding))) for c in contexts]


@dataclass
class LLMForecaster:
    """Forecasts by continuing LLMTIME text with ``model`` (constrained to digits, ",", ";", end tokens and, in the
    "decimal" ``encoding``, "."; :func:`allowed_token_ids`).

    ``samples`` = 1: greedy; N > 1: N samples at ``temperature`` / ``top_p`` per trajectory, combined by the
    element-wise median (the LLMTIME point forecast, Gruver et al. 2023, section 3). Prompts are batched
    ``batch_size`` at a time, sorted by length (less left padding). Every row stops after ``horizon`` ";" (or
    ``max_tokens_per_step(decimals, encoding) · horizon`` tokens); unparseable output is counted, never raised.
    ``encoding``: "decimal" or "integer", how the prompt is written and the output read (:mod:`data.llmtime`).
    ``progress``: show progress bars. ``scaler``: None (every context at ``llmtime_scale``) or ``context [C, 2] ->
    data.SeriesScale``, each trajectory written and read at the scaling fitted on its own context (``--scaling
    series``).
    """

    model: object
    tokenizer: object
    llmtime_scale: float
    decimals: int = 2
    prompt: str = "raw"
    samples: int = 1
    temperature: float = 0.7
    top_p: float = 0.9
    batch_size: int = 8
    seed: int = 0
    name: str = "llm"
    encoding: str = "decimal"
    progress: bool | None = None
    scaler: object = None

    def forecast(self, contexts: np.ndarray, horizon: int) -> Forecasts:
        """``contexts`` [n, C, 2] data units -> :class:`Forecasts` of ``horizon`` steps (FLOPs counted)."""
        tok = self.tokenizer
        allowed = allowed_token_ids(tok, self.encoding)
        semicolon = tok.token_to_id(";")
        eos = [tok.eos_token_id, tok.token_to_id(END_OF_TEXT), tok.token_to_id(IM_END)]
        scales = [self.scaler(c) if self.scaler else self.llmtime_scale for c in contexts]
        prompts = [tok.encode(forecast_prompt(c, scale, self.decimals, horizon, self.prompt, self.encoding))
                   for c, scale in zip(contexts, scales)]
        n, samples = len(prompts), self.samples
        out = np.full((n, samples, horizon, 2), np.nan)
        texts: list[list[str]] = [[] for _ in range(n)]
        n_invalid, n_missing = np.zeros(n, int), np.zeros(n, int)
        counter = FlopCounter()
        order = sorted(range(n), key=lambda i: len(prompts[i]))
        with counter, tqdm(total=n, desc=f"forecasting ({self.name}, {samples} sample{'s' * (samples > 1)})",
                           unit="traj", disable=bar_disabled(self.progress)) as bar:
            for start in range(0, n, self.batch_size):
                rows = order[start : start + self.batch_size]
                generated = generate(
                    self.model, [prompts[i] for i in rows],
                    max_tokens_per_step(self.decimals, self.encoding) * horizon,
                    pad_token_id=tok.pad_token_id, eos_token_ids=eos,
                    temperature=0.0 if samples == 1 else self.temperature, top_p=self.top_p, num_samples=samples,
                    seed=self.seed + start, allowed_token_ids=allowed, stop_token_id=semicolon, stop_count=horizon,
                    progress=self.progress,
                )
                for j, i in enumerate(rows):
                    for s in range(samples):
                        text = tok.decode(generated[j * samples + s])
                        decoded = decode(text, scales[i], expected_steps=horizon,
                                         encoding=self.encoding, decimals=self.decimals)
                        out[i, s] = decoded.values
                        n_invalid[i] += decoded.n_invalid
                        n_missing[i] += decoded.n_missing
                        texts[i].append(text)
                bar.update(len(rows))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN median (nothing parsed) is expected
            values = np.nanmedian(out, axis=1)
        return Forecasts(values, out, texts, n_invalid, n_missing, (n_invalid == 0) & (n_missing == 0),
                         counter.total, [len(p) for p in prompts])


# ---------------------------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------------------------

def evaluate(forecaster: Forecaster, contexts: np.ndarray, truth: np.ndarray, split: str, indices,
             settings: dict | None = None) -> tuple[Forecasts, np.ndarray, Evaluation]:
    """Forecast every context with ``forecaster`` and score it against ``truth``.

    Args:
        contexts: [n, C, 2] observed steps (data units); truth: [n, H, 2] the steps that followed.
        split, indices: where the trajectories come from (recorded in the evaluation).

    Returns:
        ``(forecasts, pred [n, H, 2] with missing values filled by persistence, Evaluation)``.
    """
    t0 = time.time()
    forecasts = forecaster.forecast(contexts, truth.shape[1])
    seconds = time.time() - t0
    pred = fill_missing(forecasts.values, contexts.astype(np.float64))
    evaluation = Evaluation(
        forecaster=forecaster.name, split=split, trajectories=[int(i) for i in indices],
        context_steps=int(contexts.shape[1]), horizon=int(truth.shape[1]), metrics=forecast_metrics(pred, truth),
        parsed_fraction=float(forecasts.complete.mean()), steps_invalid=int(forecasts.n_invalid.sum()),
        steps_missing=int(forecasts.n_missing.sum()), flops=int(forecasts.flops), seconds=round(seconds, 2),
        settings=settings or {},
    )
    return forecasts, pred, evaluation


def fill_missing(pred: np.ndarray, contexts: np.ndarray) -> np.ndarray:
    """Replace NaN forecast values by the last observed value of the context (a persistence fallback), so that
    every trajectory counts in the metrics. ``pred`` [n, H, 2], ``contexts`` [n, C, 2]."""
    last = np.broadcast_to(contexts[:, -1:, :], pred.shape)
    return np.where(np.isnan(pred), last, pred)


def forecast_metrics(pred: np.ndarray, truth: np.ndarray) -> dict:
    """Errors of ``pred`` against ``truth`` (both [n, H, 2], data units, no NaN), per species.

    MSE and MAE are means over all trajectories and horizon steps; R² = 1 − SS_res / SS_tot with SS_tot taken
    around the mean of the true values over all trajectories and steps (so R² compares against predicting one
    constant); ``mse_by_step`` / ``mae_by_step`` are the errors at each horizon step (length H).

    Raises ValueError if the shapes differ or ``pred`` has NaN.
    """
    if pred.shape != truth.shape or np.isnan(pred).any():
        raise ValueError(f"pred {pred.shape} and truth {truth.shape} must match and pred must have no NaN")
    result = {}
    for k, name in enumerate(SPECIES):
        p, t = pred[..., k], truth[..., k]
        err = p - t
        ss_tot = float(((t - t.mean()) ** 2).sum())
        result[name] = {
            "mse": float((err**2).mean()),
            "mae": float(np.abs(err).mean()),
            "r2": float(1.0 - (err**2).sum() / ss_tot) if ss_tot > 0 else float("nan"),
            "mse_by_step": (err**2).mean(axis=0).tolist(),
            "mae_by_step": np.abs(err).mean(axis=0).tolist(),
        }
    return result


def per_trajectory_rows(indices, pred: np.ndarray, truth: np.ndarray, forecasts: Forecasts) -> list[dict]:
    """One CSV row per trajectory: its index, MSE/MAE per species, parse counts."""
    rows = []
    for i, idx in enumerate(indices):
        row = {"trajectory": int(idx)}
        for k, name in enumerate(SPECIES):
            err = pred[i, :, k] - truth[i, :, k]
            row[f"mse_{name}"] = float((err**2).mean())
            row[f"mae_{name}"] = float(np.abs(err).mean())
        row.update(complete=bool(forecasts.complete[i]), n_invalid=int(forecasts.n_invalid[i]),
                   n_missing=int(forecasts.n_missing[i]))
        rows.append(row)
    return rows


def prediction_rows(indices, pred: np.ndarray) -> list[dict]:
    """One CSV row per (trajectory, horizon step) of ``pred`` [n, H, 2] (data units, unparsed steps already filled
    by persistence, i.e. exactly what the metrics score): ``trajectory``, ``step`` (1..H, the steps right after the
    context), ``prey``, ``predator``. Written as ``predictions_<tag>.csv`` beside every per-trajectory CSV, so that
    every figure can be recomputed from the files (:func:`experiments.lib.forecast_files.read_predictions` reads it)."""
    return [{"trajectory": int(idx), "step": h + 1, SPECIES[0]: repr(float(pred[i, h, 0])),
             SPECIES[1]: repr(float(pred[i, h, 1]))}
            for i, idx in enumerate(indices) for h in range(pred.shape[1])]


def write_csv(path: Path, rows: list[dict]) -> None:
    """Write dict rows (same keys) to ``path`` as CSV."""
    with naming(path), open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
