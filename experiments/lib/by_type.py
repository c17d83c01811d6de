"""Forecast errors split by trajectory type — damped or sustained oscillation — so that a pooled score cannot hide
where a forecaster loses, and every such figure recomputed from the forecasts a run keeps (``predictions_<tag>.csv``).

The type is decided from the observed context alone (never from the steps being forecast): for each species, the
oscillation's amplitude over its last cycle divided by that over its first cycle, the cycle length being the
dominant period of the context's spectrum; the two species' ratios are combined by their geometric mean. A
trajectory whose ratio is below :data:`DAMPED_BELOW` (its oscillation lost more than a fifth of its amplitude over
the context) is "damped", else "sustained". On the coursework's test split this labels 68 of 100 trajectories
damped (40 lost more than half their amplitude).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .evaluation import SPECIES

DAMPED_BELOW = 0.8
"""Amplitude ratio (last cycle / first cycle of the context) below which a trajectory counts as damped."""
TYPES = ("damped", "sustained")
RULE = (f"A trajectory is damped when its oscillation's amplitude over the last cycle of its context, divided by that "
        f"over the first cycle (geometric mean over the two species; cycle = the context's dominant period), is below "
        f"{DAMPED_BELOW}, else sustained; decided from the observed steps alone. Cells: mean / median of the "
        "per-trajectory MSE (data units²); wins: trajectories where the reference's MSE is lower; median ratio: the "
        "reference's median MSE over the other's.")


def amplitude_ratio(contexts: np.ndarray) -> np.ndarray:
    """``[n]`` amplitude ratio of each context ``[n, C, 2]`` (data units, C >= 8): per species, the range
    (max − min) of the last P steps over that of the first P, P the dominant period of the species' context (the
    largest non-constant term of its discrete Fourier transform, clipped to 4..C/2 steps); then the geometric mean
    over the two species. < 1: the oscillation decays; ≈ 1: sustained. Raises ValueError for a bad shape."""
    x = np.asarray(contexts, dtype=np.float64)
    if x.ndim != 3 or x.shape[2] != 2 or x.shape[1] < 8:
        raise ValueError(f"amplitude_ratio: contexts must have shape [n, C >= 8, 2], got {x.shape}")
    C = x.shape[1]
    logs = np.zeros(x.shape[0])
    for k in range(2):
        series = x[:, :, k] - x[:, :, k].mean(axis=1, keepdims=True)
        frequency = 1 + np.argmax(np.abs(np.fft.rfft(series, axis=1))[:, 1:], axis=1)
        periods = np.clip(np.round(C / frequency).astype(int), 4, C // 2)
        for i, P in enumerate(periods):
            first, last = np.ptp(x[i, :P, k]), np.ptp(x[i, -P:, k])
            logs[i] += np.log(max(last, 1e-12) / max(first, 1e-12)) / 2
    return np.exp(logs)


def trajectory_types(contexts: np.ndarray, damped_below: float = DAMPED_BELOW) -> np.ndarray:
    """``[n]`` labels "damped" / "sustained" of the contexts ``[n, C, 2]`` by :func:`amplitude_ratio`."""
    return np.where(amplitude_ratio(contexts) < damped_below, TYPES[0], TYPES[1])


def per_trajectory_mse(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """``[n, 2]`` MSE over the horizon of each trajectory and species (data units²); pred and truth ``[n, H, 2]``."""
    return ((np.asarray(pred) - np.asarray(truth)) ** 2).mean(axis=1)


def by_type(predictions: dict[str, np.ndarray], truth: np.ndarray, types: np.ndarray,
            reference: str | None = None) -> dict:
    """Mean and median per-trajectory MSE of every forecaster per type and species, and (with ``reference``) the
    reference's wins over each other forecaster and its median MSE ratio to it.

    Args:
        predictions: ``{name: [n, H, 2]}`` forecasts (data units) of the same n trajectories as ``truth`` [n, H, 2].
        types: ``[n]`` labels (:func:`trajectory_types`). reference: a name in ``predictions`` or None.
    Returns:
        ``{type: {"n": count, "forecasters": {name: {species: {"mean_mse", "median_mse"}}}, "reference": {name:
        {species: {"wins", "median_ratio"}}}}}`` for each type and "all".
    """
    types = np.asarray(types)
    mse = {name: per_trajectory_mse(p, truth) for name, p in predictions.items()}
    out = {}
    for label in (*TYPES, "all"):
        rows = np.ones(len(types), bool) if label == "all" else types == label
        if not rows.any():
            continue
        entry = {"n": int(rows.sum()), "forecasters": {
            name: {s: {"mean_mse": float(m[rows, k].mean()), "median_mse": float(np.median(m[rows, k]))}
                   for k, s in enumerate(SPECIES)} for name, m in mse.items()}}
        if reference is not None:
            ref = mse[reference][rows]
            entry["reference"] = {
                name: {s: {"wins": int((ref[:, k] < m[rows, k]).sum()),
                           "median_ratio": float(np.median(ref[:, k]) / max(np.median(m[rows, k]), 1e-300))}
                       for k, s in enumerate(SPECIES)}
                for name, m in mse.items() if name != reference}
        out[label] = entry
    return out


def by_type_table(summary: dict, reference: str | None = None) -> str:
    """Markdown of :func:`by_type`'s result: one row per forecaster, mean and median MSE per type and species; then
    (with ``reference``) the reference's wins and median-MSE ratio against each forecaster, per type."""
    labels = list(summary)
    head = " | ".join(f"{s} {label} (n={summary[label]['n']}) mean / median" for s in SPECIES for label in labels)
    lines = [f"| forecaster | {head} |", "| --- |" + " ---: |" * (len(SPECIES) * len(labels))]
    for name in summary[labels[0]]["forecasters"]:
        cells = [f"{summary[label]['forecasters'][name][s]['mean_mse']:.4g} / "
                 f"{summary[label]['forecasters'][name][s]['median_mse']:.3g}" for s in SPECIES for label in labels]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if reference is not None:
        lines += ["", f"| {reference} against | " + " | ".join(f"{s} {label}: wins, median ratio" for s in SPECIES
                                                                for label in labels) + " |",
                  "| --- |" + " ---: |" * (len(SPECIES) * len(labels))]
        for name in summary[labels[0]].get("reference", {}):
            cells = [f"{summary[label]['reference'][name][s]['wins']} / {summary[label]['n']}, "
                     f"{summary[label]['reference'][name][s]['median_ratio']:.3g}×" for s in SPECIES for label in labels]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def section(out: Path, predictions: dict[str, np.ndarray], truth: np.ndarray, contexts: np.ndarray, reference: str,
            beside, scale: str) -> dict:
    """The damped / sustained section of a run's README and results: the types of the contexts ``[n, C, 2]``,
    :func:`by_type` of every forecaster in ``predictions`` against ``reference``, and ``out/horizon_by_type.png``
    with the reference, the forecasters named in ``beside`` and every parroting forecaster. Returns ``{"rule",
    "types" [n], "summary", "markdown"}``."""
    types = trajectory_types(contexts)
    summary = by_type(predictions, truth, types, reference=reference)
    shown = [n for n in dict.fromkeys([reference, *beside, *predictions]) if n in predictions and
             (n in (reference, *beside) or n.startswith("parrot("))]
    plot_horizon_by_type(out / "horizon_by_type.png", {n: predictions[n] for n in shown}, truth, types,
                         f"MSE by step, damped and sustained; {scale}")
    markdown = (f"### Damped and sustained trajectories\n\n{RULE}\n\n![MSE by step and type](horizon_by_type.png)"
                f"\n\n{by_type_table(summary, reference=reference)}")
    return {"rule": RULE, "types": types.tolist(), "summary": summary, "markdown": markdown}


def plot_horizon_by_type(path: Path, predictions: dict[str, np.ndarray], truth: np.ndarray, types: np.ndarray,
                         title: str) -> None:
    """PNG of the MSE at each horizon step (log scale), one panel per type × species, one line per forecaster
    (``predictions`` {name: [n, H, 2]}, ``truth`` [n, H, 2], ``types`` [n])."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from miniqwen.atomic import naming

    labels = [t for t in TYPES if (np.asarray(types) == t).any()]
    fig, axes = plt.subplots(len(labels), 2, figsize=(11, 3.6 * len(labels)), squeeze=False)
    steps = np.arange(1, truth.shape[1] + 1)
    for r, label in enumerate(labels):
        rows = np.asarray(types) == label
        for k, species in enumerate(SPECIES):
            ax = axes[r, k]
            for name, pred in predictions.items():
                ax.plot(steps, ((pred[rows, :, k] - truth[rows, :, k]) ** 2).mean(axis=0), label=name)
            ax.set_yscale("log")
            ax.set_title(f"{species}, {label} ({rows.sum()} trajectories)", fontsize=10)
            ax.set_xlabel("forecast step")
            ax.set_ylabel("MSE (data units²)")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with naming(path):
        fig.savefig(path, dpi=110)
    plt.close(fig)


def rescore(run_dir: Path, trajectories: np.ndarray) -> dict[str, tuple[list[int], dict]]:
    """Every ``predictions_<tag>.csv`` of ``run_dir`` scored again from the file alone against ``trajectories``
    ``[N, T, 2]`` (the data file's, data units): ``{tag: (trajectory indices, forecast_metrics)}``. Step h of a
    trajectory's file rows is compared with its time step ``C + h − 1``, C the context length the run's results.json
    records. Raises ValueError naming a damaged file (:func:`experiments.lib.forecast_files.read_predictions`)."""
    import json

    from .forecast_files import read_predictions
    from .evaluation import forecast_metrics

    run_dir = Path(run_dir)
    evaluations = json.loads((run_dir / "results.json").read_text())["evaluations"]
    C = next(iter(evaluations.values()))["context_steps"]
    out = {}
    for path in sorted(run_dir.glob("predictions_*.csv")):
        indices, pred = read_predictions(path)
        truth = np.asarray(trajectories)[indices, C:C + pred.shape[1]].astype(np.float64)
        out[path.stem[len("predictions_"):]] = (indices.tolist(), forecast_metrics(pred, truth))
    return out
