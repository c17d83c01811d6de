"""The per-trajectory files a stage writes in its run directory and the tools read back: each forecaster's errors
(``per_trajectory[_<tag>].csv``: columns ``trajectory``, ``mse_prey``, ``mae_prey``, ``mse_predator``,
``mae_predator``, …) and its forecasts (``predictions[_<tag>].csv``: ``trajectory``, ``step``, ``prey``,
``predator``, data units) — their names and their readers. :mod:`experiments.lib.compare` pairs them."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

SPECIES = ("prey", "predator")
METRICS = ("mse", "mae")


def read_errors(path) -> tuple[list[int], dict]:
    """The per-trajectory errors a stage wrote in ``path`` (a per-trajectory CSV: columns ``trajectory``,
    ``mse_prey``, ``mae_prey``, ``mse_predator``, ``mae_predator``, …; :func:`evaluation.per_trajectory_rows`).
    Returns ``(trajectory ids, {"prey": {"mse": [n], "mae": [n]}, "predator": {...}})`` for :func:`compare_errors`.

    Raises:
        ValueError: naming the file, if it is not a regular file (a FIFO would block), has no rows, lacks one of
            those columns or a value is not a number.
    """
    if Path(path).exists() and not Path(path).is_file():
        raise ValueError(f"{path}: not a regular file")
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    try:
        ids = [int(r["trajectory"]) for r in rows]
        errors = {sp: {m: np.array([float(r[f"{m}_{sp}"]) for r in rows]) for m in METRICS} for sp in SPECIES}
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: not a per-trajectory error table ({err})") from None
    if not rows:
        raise ValueError(f"{path}: no rows")
    return ids, errors


def csv_name(tag: str | None = None) -> str:
    """The file name of a forecaster's per-trajectory errors in a run directory: ``per_trajectory[_<tag>].csv``."""
    return f"per_trajectory_{tag}.csv" if tag else "per_trajectory.csv"


def predictions_name(tag: str | None = None) -> str:
    """The file name of a forecaster's forecasts in a run directory: ``predictions[_<tag>].csv`` (columns
    ``trajectory``, ``step``, ``prey``, ``predator``; data units; written by ``runs.forecast_and_save``)."""
    return f"predictions_{tag}.csv" if tag else "predictions.csv"


def read_predictions(path) -> tuple[np.ndarray, np.ndarray]:
    """``(trajectories [n] int, predictions [n, H, 2] float64)`` from a ``predictions_<tag>.csv``, in the file's
    trajectory order. Raises ValueError naming the file if a row is missing, repeated or not finite, or the steps of
    a trajectory are not 1..H."""
    path = Path(path)
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or set(rows[0]) != {"trajectory", "step", "prey", "predator"}:
        raise ValueError(f"{path}: not a predictions file (columns trajectory, step, prey, predator)")
    order, values = [], {}
    try:
        for r in rows:
            t = int(r["trajectory"])
            if t not in values:
                order.append(t)
                values[t] = []
            values[t].append((int(r["step"]), float(r["prey"]), float(r["predator"])))
    except ValueError:
        raise ValueError(f"{path}: a cell is not a number") from None
    H = len(values[order[0]])
    out = np.empty((len(order), H, 2))
    for i, t in enumerate(order):
        steps = sorted(values[t])
        if [s[0] for s in steps] != list(range(1, H + 1)):
            raise ValueError(f"{path}: trajectory {t} does not have steps 1..{H} exactly once")
        out[i] = [s[1:] for s in steps]
    if not np.isfinite(out).all():
        raise ValueError(f"{path}: predictions contain NaN or inf")
    return np.array(order, dtype=int), out


#: where a stage's run directory keeps the untrained model's per-trajectory errors (the reference of its tables),
#: and the trained model's (the LoRA stages)
UNTRAINED_CSV, TRAINED_CSV = csv_name("untrained"), csv_name("trained")


def point_csv(name: str, rung: int | None = None) -> str:
    """Where a study's point keeps its per-trajectory errors, relative to the run directory: the trained forecast of
    a sweep or context-study point, or rung ``rung``'s forecast of a search point."""
    return f"points/{name}/" + (TRAINED_CSV if rung is None else csv_name(f"rung{rung}"))
