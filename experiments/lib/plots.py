"""Figures as PNG (matplotlib's object API with the Agg canvas; no global backend change). Every function returns
False and draws nothing when matplotlib is not installed (``pip install .[plot]``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from miniqwen.atomic import naming

SPECIES = ("prey", "predator")


def _save(fig, path, dpi: int) -> None:
    """``fig`` as a PNG at ``path``; an OS error (a full disk) names the file."""
    with naming(path):
        fig.savefig(str(path), dpi=dpi)


def _wrap(title: str, width: int) -> str:
    """``title`` broken into lines of at most ``width`` characters, each line kept (long scale labels fit)."""
    import textwrap

    return "\n".join(textwrap.fill(line, width) for line in title.split("\n"))


def _figure(width: float, height: float):
    """A matplotlib Figure with an Agg canvas, or None without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def plot_forecasts(path: Path, time: np.ndarray, indices, trajectories: np.ndarray, forecasts, context_steps: int,
                   horizon: int, title: str, count: int = 4) -> bool:
    """Draw the first ``count`` forecasts (median and samples of :class:`evaluation.Forecasts` ``forecasts``) against
    the truth (``trajectories`` [n, T, 2], ``time`` [T]) as one PNG."""
    count = min(count, len(indices))
    fig = _figure(9, 2.6 * max(count, 1)) if count else None
    if fig is None:
        return False
    axes = fig.subplots(count, 1, squeeze=False)
    t_all = time[: context_steps + horizon]
    t_future = time[context_steps : context_steps + horizon]
    for ax, i in zip(axes[:, 0], range(count)):
        for k, (name, colour) in enumerate(zip(SPECIES, ("tab:blue", "tab:red"))):
            ax.plot(t_all, trajectories[i, : context_steps + horizon, k], color=colour, lw=1.2, label=f"{name} (true)")
            for s in range(forecasts.samples.shape[1] if forecasts.samples.shape[1] > 1 else 0):
                ax.plot(t_future, forecasts.samples[i, s, :, k], color=colour, lw=0.5, alpha=0.35)
            ax.plot(t_future, forecasts.values[i, :, k], color=colour, ls="--", lw=1.6, label=f"{name} (forecast)")
        ax.axvline(time[context_steps - 1], color="grey", lw=0.8, ls=":")
        ax.set_title(f"trajectory {int(indices[i])}", fontsize=9)
        ax.set_ylabel("population")
    axes[0, 0].legend(fontsize=7, ncol=4, loc="upper left")
    axes[-1, 0].set_xlabel("time")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path, 110)
    return True


def plot_loss_curves(log_path: str | Path, png_path: str | Path, title: str = "") -> bool:
    """Draw training loss (per step, with a running mean) and validation loss against step from a training
    ``log.jsonl`` into ``png_path``."""
    fig = _figure(7, 4)
    if fig is None:
        return False
    entries = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
    train = [(e["step"], e["loss"]) for e in entries if e["kind"] == "train"]
    evals = [(e["step"], e["val_loss"]) for e in entries if e["kind"] == "eval"]
    ax = fig.add_subplot()
    if train:
        steps, losses = zip(*train)
        window = max(1, len(losses) // 50)
        ax.plot(steps, losses, color="tab:blue", alpha=0.35 if window > 1 else 1.0, lw=0.8,
                label="training loss (per step)")
        if window > 1:
            smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
            ax.plot(steps[window - 1:], smooth, color="tab:blue", lw=1.5, label=f"training loss ({window}-step mean)")
    if evals:
        steps, losses = zip(*evals)
        ax.plot(steps, losses, "o-", color="tab:orange", lw=1.5, ms=4, label="validation loss")
    scores = [(e["step"], e["forecast_score"]) for e in entries if e["kind"] == "eval" and "forecast_score" in e]
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    if scores:  # the validation forecast score on its own axis
        right = ax.twinx()
        right.plot(*zip(*scores), "s-", color="tab:green", lw=1.5, ms=4, label="validation forecast score")
        right.set_ylabel("forecast score (median MSE / persistence's)")
        right.legend(loc="upper right")
    fig.tight_layout()
    _save(fig, png_path, 120)
    return True


def plot_training_curves(path: Path, logs: dict[str, Path], title: str) -> bool:
    """Training loss (running mean over about a tenth of the run) and validation loss against step for several
    runs in one PNG: ``logs`` = ``{label: training log.jsonl}`` (missing files are skipped)."""
    fig = _figure(8, 4.5)
    if fig is None or not logs:
        return False
    ax = fig.add_subplot()
    for (label, log), colour in zip(logs.items(), [f"C{i}" for i in range(len(logs))]):
        if not Path(log).is_file():
            continue
        entries = [json.loads(line) for line in Path(log).read_text().splitlines() if line.strip()]
        train = [(e["step"], e["loss"]) for e in entries if e["kind"] == "train"]
        evals = [(e["step"], e["val_loss"]) for e in entries if e["kind"] == "eval"]
        if train:
            steps, losses = map(np.asarray, zip(*train))
            window = max(1, len(losses) // 10)
            smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
            ax.plot(steps[window - 1:], smooth, color=colour, lw=1.3, label=f"{label} (train, {window}-step mean)")
        if evals:
            steps, losses = zip(*evals)
            ax.plot(steps, losses, "o--", color=colour, lw=1, ms=4, label=f"{label} (validation)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title(_wrap(title, 100), fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    _save(fig, path, 110)
    return True


def plot_rungs(path: Path, rows: list[dict], title: str) -> bool:
    """A successive-halving search: each point's score (``rows`` of ``tables.search_rows``: name, steps, score)
    against the steps it was trained for, one line per point, log-scaled steps."""
    fig = _figure(7, 4.2)
    if fig is None or not rows:
        return False
    ax = fig.add_subplot()
    names = list(dict.fromkeys(r["name"] for r in rows))
    for name, colour in zip(names, [f"C{i}" for i in range(len(names))]):
        mine = sorted((r["steps"], r["score"]) for r in rows if r["name"] == name)
        ax.plot(*zip(*mine), "o-", color=colour, lw=1.2, ms=4, label=name)
    ax.axhline(1.0, color="grey", lw=0.8, ls=":", label="persistence")
    ax.set_xscale("log")
    ax.set_xlabel("optimizer steps")
    ax.set_ylabel("score (median MSE / persistence's, mean of species)")
    ax.set_title(_wrap(title, 90), fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    _save(fig, path, 110)
    return True


def plot_horizon_errors(path: Path, curves: dict[str, dict], title: str, metric: str = "mae") -> bool:
    """Error per horizon step, one line per forecaster: ``curves`` = ``{label: Evaluation.metrics}``; one panel
    per species. ``metric`` is "mae" or "mse" (data units)."""
    fig = _figure(10, 3.6)
    if fig is None or not curves:
        return False
    axes = fig.subplots(1, 2)
    for ax, species in zip(axes, SPECIES):
        for label, metrics in curves.items():
            values = metrics[species][f"{metric}_by_step"]
            ax.plot(range(1, len(values) + 1), values, marker="o", ms=3, lw=1.3, label=label)
        ax.set_title(species, fontsize=10)
        ax.set_xlabel("forecast step")
        ax.set_ylabel(metric.upper())
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(_wrap(title, 120), fontsize=9)
    fig.tight_layout()
    _save(fig, path, 110)
    return True


def plot_heatmap(path: Path, values: np.ndarray, rows: list, cols: list, row_label: str, col_label: str,
                 title: str, fmt: str = ".3g") -> bool:
    """A grid of numbers ``values`` [len(rows), len(cols)] as an annotated heat map (NaN cells left blank)."""
    fig = _figure(1.6 + 1.3 * len(cols), 1.2 + 0.8 * len(rows))
    if fig is None:
        return False
    ax = fig.add_subplot()
    im = ax.imshow(np.ma.masked_invalid(values), cmap="viridis_r", aspect="auto")
    ax.set_xticks(range(len(cols)), [str(c) for c in cols])
    ax.set_yticks(range(len(rows)), [str(r) for r in rows])
    ax.set_xlabel(col_label)
    ax.set_ylabel(row_label)
    for i in range(len(rows)):
        for j in range(len(cols)):
            if np.isfinite(values[i, j]):
                ax.text(j, i, format(values[i, j], fmt), ha="center", va="center", color="white", fontsize=8)
    fig.colorbar(im, ax=ax)
    ax.set_title(_wrap(title, 60), fontsize=8)
    fig.tight_layout()
    _save(fig, path, 110)
    return True
