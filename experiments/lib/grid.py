"""The learning-rate × rank grid of the sweep stage: which share of it a job runs (``--shard``, SLURM arrays), the
selection rule and its agreement with the validation loss, the Markdown table and the heat maps."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .errors import UsageError
from .evaluation import write_csv
from .plots import plot_heatmap, plot_training_curves
from .points import forecast_mse
from .results import Evaluation
from .tables import format_number


def shard_of(text: str | None, environ=None) -> tuple[int, int] | None:
    """The share ``(I, N)`` of the grid a job runs: ``--shard I/N`` when given, else SLURM's array task
    (SLURM_ARRAY_TASK_ID − SLURM_ARRAY_TASK_MIN, of SLURM_ARRAY_TASK_COUNT) when both are set, else None (the whole
    grid). Raises UsageError for a malformed value or I outside 0..N−1 (an array must be a range like 0-3)."""
    environ = os.environ if environ is None else environ
    flag = "--shard"
    if text is None and "SLURM_ARRAY_TASK_ID" in environ and "SLURM_ARRAY_TASK_COUNT" in environ:
        names = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_COUNT")
        values = {name: environ.get(name, "0").strip() for name in names}
        bad = [f"{name}={value!r}" for name, value in values.items() if not (value.isascii() and value.isdigit())]
        if bad:
            raise UsageError(f"SLURM array: {', '.join(bad)} is not a non-negative integer (unset it, or pass "
                             "--shard I/N)")
        first = int(values["SLURM_ARRAY_TASK_MIN"])
        text = f"{int(values['SLURM_ARRAY_TASK_ID']) - first}/{values['SLURM_ARRAY_TASK_COUNT']}"
        flag = "SLURM array"
    if text is None:
        return None
    try:
        parts = text.split("/")
        if not all(x.strip().lstrip("-").isascii() and x.strip().lstrip("-").isdigit() for x in parts):
            raise ValueError(text)
        i, n = (int(x) for x in parts)
    except ValueError:
        raise UsageError(f"{flag} {text!r}: must be I/N, e.g. 0/4") from None
    if not 0 <= i < n:
        raise UsageError(f"{flag} {text!r}: I must be between 0 and N-1")
    return i, n


def selection(rows: list[dict]) -> dict:
    """The winner by validation forecast MSE, the winner by validation loss, and whether the two criteria rank the
    grid the same way (Spearman's rank correlation between them, scipy)."""
    from scipy.stats import spearmanr

    by_forecast = min(rows, key=lambda r: r["forecast_mse"])
    by_loss = min(rows, key=lambda r: r["val_loss"])
    mse, loss = [r["forecast_mse"] for r in rows], [r["val_loss"] for r in rows]
    varied = len(rows) > 2 and len(set(mse)) > 1 and len(set(loss)) > 1
    rho = float(spearmanr(mse, loss).statistic) if varied else None
    # points with exactly the winner's forecast MSE: the first in grid order (lr outer, rank inner) was taken
    tied = [{"lr": r["lr"], "rank": r["rank"]} for r in rows
            if r is not by_forecast and r["forecast_mse"] == by_forecast["forecast_mse"]]
    return {"rule": "lowest validation forecast MSE (mean of prey and predator MSE)",
            "chosen": {"lr": by_forecast["lr"], "rank": by_forecast["rank"]},
            "chosen_by_val_loss": {"lr": by_loss["lr"], "rank": by_loss["rank"]},
            "same_winner": by_forecast is by_loss, "spearman_forecast_mse_vs_val_loss": rho, "tied_with": tied}


def write_plots(out: Path, rows: list[dict], lrs, ranks, untrained: Evaluation, scale: str) -> None:
    """grid.csv, heat maps of validation loss and forecast MSE, the training curves of every point, under ``out``."""
    write_csv(out / "grid.csv", rows)
    cell = {(r["lr"], r["rank"]): r for r in rows}
    for key, label in (("val_loss", "validation loss (nats/token)"), ("forecast_mse", "forecast MSE")):
        values = np.array([[cell[(lr, k)][key] if (lr, k) in cell else np.nan for k in ranks] for lr in lrs],
                          dtype=float)
        reference = untrained.validation_loss if key == "val_loss" else forecast_mse(untrained.metrics)
        plot_heatmap(out / f"heatmap_{key}.png", values, [f"{lr:g}" for lr in lrs], list(ranks),
                     "learning rate", "LoRA rank", f"{label}; untrained {reference:.4g}\n{scale}",
                     fmt=".4f" if key == "val_loss" else ".4g")
    plot_training_curves(out / "loss_curves.png",
                         {f"lr {r['lr']:g}, r={r['rank']}": out / "points" / r["name"] / "training" /
                          "log.jsonl" for r in rows}, f"training loss, {scale}")


def grid_table(rows: list[dict], untrained: Evaluation, chosen: dict) -> str:
    """The grid as a Markdown table, the untrained model first, the chosen point in bold."""
    fmt = format_number
    lines = ["| lr | rank | val loss | forecast MSE | prey MSE | predator MSE | prey R² | predator R² | parsed |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
             f"| untrained | – | {fmt(untrained.validation_loss)} | {fmt(forecast_mse(untrained.metrics))} | "
             f"{fmt(untrained.metrics['prey']['mse'])} | {fmt(untrained.metrics['predator']['mse'])} | "
             f"{fmt(untrained.metrics['prey']['r2'], '.3f')} | {fmt(untrained.metrics['predator']['r2'], '.3f')} | "
             f"{untrained.parsed_fraction:.0%} |"]
    for r in rows:
        bold = "**" if (r["lr"], r["rank"]) == (chosen["lr"], chosen["rank"]) else ""
        lines.append(f"| {bold}{r['lr']:g}{bold} | {bold}{r['rank']}{bold} | {fmt(r['val_loss'])} | "
                     f"{bold}{fmt(r['forecast_mse'])}{bold} | {fmt(r['prey_mse'])} | {fmt(r['predator_mse'])} | "
                     f"{fmt(r['prey_r2'], '.3f')} | {fmt(r['predator_r2'], '.3f')} | {r['parsed_fraction']:.0%} |")
    return "\n".join(lines)
