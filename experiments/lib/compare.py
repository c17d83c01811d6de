"""Paired comparisons of two forecasters on the same trajectories, with bootstrap intervals, win counts, medians and
blow-ups: is forecaster A really better than B, or did a few trajectories decide the mean?

Data convention: ``pred_a``, ``pred_b`` and ``truth`` are float arrays ``[n, H, 2]`` — n trajectories (the same ones,
in the same order, for both forecasters), H forecast steps, column 0 prey, column 1 predator — in data units
(populations). Every error is computed per trajectory first: ``MSE_i`` and ``MAE_i`` are the mean squared and mean
absolute error of trajectory i over its H steps, per species. The mean of ``MSE_i`` over trajectories is the MSE that
:func:`experiments.lib.evaluation.forecast_metrics` reports (every trajectory has the same H).

Uncertainty: the trajectories are the sampling unit, so intervals come from the paired bootstrap — resampling
trajectories with replacement and keeping each trajectory's two errors together, which is the same as resampling
the per-trajectory differences ``d_i = err_A,i - err_B,i`` (Efron & Tibshirani 1993, *An Introduction to the
Bootstrap*, ch. 6 and §16.4 on paired data), done with ``scipy.stats.bootstrap``
(https://docs.scipy.org/doc/scipy/reference/generated/scipy.stats.bootstrap.html).

Everything returned is plain ``dict`` / ``list`` / ``float`` / ``int`` (JSON-ready); :func:`comparison_table` renders
comparisons as Markdown for stage READMEs and the report; :func:`compare_files` and :func:`against_untrained` pair
the per-trajectory CSVs a stage writes (:mod:`experiments.lib.forecast_files`). Only numpy, scipy and the
standard library are used.
"""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path

import numpy as np
from scipy.stats import bootstrap

from .forecast_files import METRICS, SPECIES, UNTRAINED_CSV, read_errors


BLOWUP_FACTOR = 10.0
"""Factor rule: a trajectory whose MSE is above ``BLOWUP_FACTOR`` x the larger of the two forecasters' median MSEs."""
DOMINANT_SHARE = 0.5
"""Share rule: a trajectory holding more than ``DOMINANT_SHARE`` of its forecaster's summed MSE (and above the other
forecaster's median MSE)."""

BLOWUP_RULE = ("a trajectory is a blow-up of a forecaster (per species) if its MSE is above {factor:g} x the larger of "
               "the two forecasters' median per-trajectory MSEs (factor rule), or if it alone holds more than "
               "{share:.0%} of this forecaster's summed MSE while being above the other forecaster's median MSE "
               "(share rule: it dominates the mean)")


def per_trajectory_errors(pred: np.ndarray, truth: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
    """Per-trajectory errors of ``pred`` against ``truth``.

    Args:
        pred, truth: ``[n, H, 2]`` (prey, predator), data units, finite, same shape, n >= 1, H >= 1.
    Returns:
        ``{"prey": {"mse": [n], "mae": [n]}, "predator": {...}}`` float64 arrays; ``mse[i]`` is the mean over the H
        steps of trajectory i of the squared error (squared data units), ``mae[i]`` of the absolute error (data
        units).
    Raises:
        ValueError: shapes not ``[n, H, 2]`` or different, empty, or non-finite values.
    """
    p, t = _check_pair(pred, truth, "pred")
    err = p - t
    return {name: {"mse": (err[:, :, k] ** 2).mean(axis=1), "mae": np.abs(err[:, :, k]).mean(axis=1)}
            for k, name in enumerate(SPECIES)}


def paired_interval(differences: np.ndarray, confidence: float = 0.95, n_resamples: int = 9999,
                    seed: int = 0) -> dict:
    """Bootstrap confidence interval for the mean of paired per-trajectory differences ``d_i = err_A,i - err_B,i``.

    Resampling the n differences with replacement is the paired bootstrap of the two forecasters' errors (each
    trajectory keeps its pair). Method: BCa (bias-corrected and accelerated; Efron & Tibshirani 1993, ch. 14),
    because per-trajectory errors are skewed — a few trajectories with large errors — and BCa corrects the
    percentile interval for bias and skewness (second-order accurate, where the percentile interval is first-order).
    BCa needs a non-degenerate jackknife; when it yields a non-finite bound or scipy warns (e.g. almost all ``d_i``
    equal), the percentile interval of the same resamples is used instead, and ``method`` says so. When all ``d_i``
    are equal the bootstrap distribution is a single point, so the interval is ``[d, d]`` exactly (``method``
    "degenerate", no resampling, no warning); with one trajectory there is no interval (bounds None).

    Args:
        differences: ``[n]`` finite paired differences (any units; the interval is in the same units).
        confidence: two-sided confidence level in (0, 1). n_resamples: bootstrap resamples (>= 1).
        seed: seed of the ``numpy.random.Generator`` handed to scipy, so the interval is reproducible.
    Returns:
        ``{"low": float | None, "high": float | None, "method": "BCa" | "percentile" | "degenerate" | "none"}``.
    Raises:
        ValueError: differences not 1-D, empty or non-finite; confidence outside (0, 1); n_resamples < 1.
    """
    d = np.asarray(differences, dtype=np.float64)
    if d.ndim != 1 or d.size == 0 or not np.isfinite(d).all():
        raise ValueError(f"paired_interval: differences must be a non-empty finite 1-D array, got shape {d.shape}")
    if not 0 < confidence < 1:
        raise ValueError(f"paired_interval: confidence must be in (0, 1), got {confidence}")
    if int(n_resamples) < 1:
        raise ValueError(f"paired_interval: n_resamples must be >= 1, got {n_resamples}")
    if d.size == 1:
        return {"low": None, "high": None, "method": "none"}
    if np.all(d == d[0]):
        return {"low": float(d[0]), "high": float(d[0]), "method": "degenerate"}
    for method in ("BCa", "percentile"):
        generator = np.random.default_rng(seed)
        seed_kw = {"rng": generator} if "rng" in inspect.signature(bootstrap).parameters else \
            {"random_state": generator}  # scipy < 1.15 has only random_state
        with warnings.catch_warnings(record=True) as caught, np.errstate(all="ignore"):
            warnings.simplefilter("always")
            ci = bootstrap((d,), np.mean, n_resamples=int(n_resamples), confidence_level=confidence,
                           method=method, vectorized=True, **seed_kw).confidence_interval
        low, high = float(ci.low), float(ci.high)
        if np.isfinite([low, high]).all() and not caught:
            break
    return {"low": low, "high": high, "method": method}


def find_blowups(mse: np.ndarray, other_mse: np.ndarray, indices=None, factor: float = BLOWUP_FACTOR,
                 dominant_share: float = DOMINANT_SHARE) -> list[dict]:
    """Trajectories where one forecaster's MSE blew up: far above the typical error, or dominating its mean.

    The rule (:data:`BLOWUP_RULE`), for this forecaster's ``MSE_i``:

    * factor rule: ``MSE_i > factor * max(median(mse), median(other_mse))`` — an outlier against the typical error
      of both forecasters. Against the other forecaster's median alone, a forecaster that is uniformly worse would
      have every trajectory flagged; against its own median alone, a forecaster that fails on half the
      trajectories would have none flagged.
    * share rule: ``MSE_i > dominant_share * sum(mse)`` and ``MSE_i > median(other_mse)`` — one trajectory makes up
      most of the mean (at 0.5, removing it would more than halve it), and is not negligible on the other
      forecaster's scale (a share of a near-zero sum says nothing about the comparison).

    Args:
        mse: ``[n]`` this forecaster's per-trajectory MSE (one species, squared data units).
        other_mse: ``[n]`` the other forecaster's, on the same trajectories.
        indices: ``[n]`` trajectory ids to report (e.g. indices in the data file); default ``0..n-1``.
        factor: > 0, the factor rule's multiple. dominant_share: in (0, 1], the share rule's fraction.
    Returns:
        One dict per blow-up, largest MSE first: ``{"trajectory": id, "position": i, "mse": MSE_i,
        "times_typical": MSE_i / max of the two medians (None when both are 0), "share_of_sum": MSE_i / sum(mse),
        "rule": "factor" | "share" | "factor+share"}``.
    Raises:
        ValueError: arrays not 1-D of the same length n >= 1, non-finite or negative, bad factor or share.
    """
    a, b = np.asarray(mse, dtype=np.float64), np.asarray(other_mse, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape or a.size == 0 or not (np.isfinite(a).all() and np.isfinite(b).all()) \
            or (a < 0).any() or (b < 0).any():
        raise ValueError(f"find_blowups: mse and other_mse must be finite, >= 0, 1-D of one length, got {a.shape} "
                         f"and {b.shape}")
    if not factor > 0 or not 0 < dominant_share <= 1:
        raise ValueError(f"find_blowups: need factor > 0 and 0 < dominant_share <= 1, got {factor}, {dominant_share}")
    ids = _indices(indices, a.size)
    median_other, total = float(np.median(b)), float(a.sum())
    typical = max(float(np.median(a)), median_other)
    share = a / total if total > 0 else np.zeros_like(a)
    by_factor, by_share = a > factor * typical, (share > dominant_share) & (a > median_other)
    found = []
    for i in np.flatnonzero(by_factor | by_share)[np.argsort(-a[by_factor | by_share], kind="stable")]:
        rule = "+".join(name for name, hit in (("factor", by_factor[i]), ("share", by_share[i])) if hit)
        found.append({"trajectory": ids[i], "position": int(i), "mse": float(a[i]),
                      "times_typical": float(a[i] / typical) if typical > 0 else None,
                      "share_of_sum": float(share[i]), "rule": rule})
    return found


def compare_forecasts(pred_a: np.ndarray, pred_b: np.ndarray, truth: np.ndarray, names: tuple[str, str] = ("A", "B"),
                      indices=None, confidence: float = 0.95, n_resamples: int = 9999, seed: int = 0,
                      blowup_factor: float = BLOWUP_FACTOR, dominant_share: float = DOMINANT_SHARE) -> dict:
    """Compare forecaster A with forecaster B trajectory by trajectory, per species, on MSE and MAE.

    Args:
        pred_a, pred_b, truth: ``[n, H, 2]`` (prey, predator), data units, finite, the same trajectories in the
            same order.
        names: labels of A and B. indices: ``[n]`` trajectory ids used in the blow-up lists (default ``0..n-1``).
        confidence, n_resamples, seed: of the paired bootstrap (:func:`paired_interval`).
        blowup_factor, dominant_share: the blow-up rule (:func:`find_blowups`).
    Returns:
        A JSON-ready dict::

            {"a": name A, "b": name B, "n": n, "horizon": H, "confidence": 0.95, "n_resamples": ..., "seed": ...,
             "blowup_rule": text,
             "species": {"prey": {
                 "mse": {"mean_a", "mean_b", "median_a", "median_b",  # over the n per-trajectory errors
                         "diff_mean",                # mean_a - mean_b (> 0: A worse)
                         "diff_median",              # median of the per-trajectory differences A - B
                         "ci_low", "ci_high", "ci_method",  # paired bootstrap interval of diff_mean
                         "wins_a", "wins_b", "ties"},      # trajectories with a smaller error (exact ties)
                 "mae": {...same keys...},
                 "blowups": {"a": [...], "b": [...]},       # find_blowups on the per-trajectory MSE
                 "mean_mse_without_blowups": {"a": float, "b": float}},  # None if every trajectory blew up
              "predator": {...}}}

        MSE values are in squared data units, MAE values in data units.
    Raises:
        ValueError: shapes not ``[n, H, 2]`` or different, non-finite values, bad bootstrap or blow-up settings.
    """
    a, b = per_trajectory_errors(pred_a, truth), per_trajectory_errors(pred_b, truth)
    return compare_errors(a, b, int(np.shape(truth)[1]), names, indices, confidence, n_resamples, seed, blowup_factor,
                          dominant_share)


def compare_errors(errors_a: dict, errors_b: dict, horizon: int, names: tuple[str, str] = ("A", "B"), indices=None,
                   confidence: float = 0.95, n_resamples: int = 9999, seed: int = 0,
                   blowup_factor: float = BLOWUP_FACTOR, dominant_share: float = DOMINANT_SHARE) -> dict:
    """:func:`compare_forecasts` from per-trajectory errors already computed (e.g. read back from a stage's
    per-trajectory CSV, :func:`read_errors`): ``errors_a`` and ``errors_b`` as :func:`per_trajectory_errors` returns
    them (``{"prey": {"mse": [n], "mae": [n]}, "predator": {...}}``), on the same n trajectories in the same order;
    ``horizon`` the forecast steps each error is a mean over. Returns the same dict as :func:`compare_forecasts`.

    Raises:
        ValueError: arrays of different lengths or non-finite, or as :func:`compare_forecasts`.
    """
    a = {sp: {m: np.asarray(errors_a[sp][m], dtype=np.float64) for m in METRICS} for sp in SPECIES}
    b = {sp: {m: np.asarray(errors_b[sp][m], dtype=np.float64) for m in METRICS} for sp in SPECIES}
    n = a["prey"]["mse"].size
    if any(x[sp][m].shape != (n,) for x in (a, b) for sp in SPECIES for m in METRICS) or n == 0:
        raise ValueError("compare_errors: every per-trajectory error array must be 1-D with the same length n >= 1")
    if not all(np.isfinite(x[sp][m]).all() for x in (a, b) for sp in SPECIES for m in METRICS):
        raise ValueError("compare_errors: per-trajectory errors contain NaN or inf")
    ids = _indices(indices, n)
    out = {"a": str(names[0]), "b": str(names[1]), "n": int(n), "horizon": int(horizon),
           "confidence": float(confidence), "n_resamples": int(n_resamples), "seed": int(seed),
           "blowup_rule": BLOWUP_RULE.format(factor=blowup_factor, share=dominant_share), "species": {}}
    for species in SPECIES:
        entry = {}
        for metric in METRICS:
            ea, eb = a[species][metric], b[species][metric]
            diff = ea - eb
            interval = paired_interval(diff, confidence, n_resamples, seed)
            entry[metric] = {
                "mean_a": float(ea.mean()), "mean_b": float(eb.mean()),
                "median_a": float(np.median(ea)), "median_b": float(np.median(eb)),
                "diff_mean": float(ea.mean() - eb.mean()), "diff_median": float(np.median(diff)),
                "ci_low": interval["low"], "ci_high": interval["high"], "ci_method": interval["method"],
                "wins_a": int((ea < eb).sum()), "wins_b": int((eb < ea).sum()), "ties": int((ea == eb).sum()),
            }
        mse_a, mse_b = a[species]["mse"], b[species]["mse"]
        blowups = {"a": find_blowups(mse_a, mse_b, ids, blowup_factor, dominant_share),
                   "b": find_blowups(mse_b, mse_a, ids, blowup_factor, dominant_share)}
        entry["blowups"] = blowups
        entry["mean_mse_without_blowups"] = {key: _mean_without(mse, blowups[key])
                                             for key, mse in (("a", mse_a), ("b", mse_b))}
        out["species"][species] = entry
    return out


def compare_to_best(preds: dict[str, np.ndarray], truth: np.ndarray, indices=None, baseline: str = "persistence",
                    **options) -> dict:
    """Compare every forecaster with the best one, and the best one with ``baseline``.

    "Best" is the forecaster with the lowest mean over species of the MSE over all trajectories and steps (ties:
    the first in ``preds``). Each other forecaster X gives ``compare_forecasts(X, best)`` (A = X, so a positive
    difference means X is worse than the best); the best gives ``compare_forecasts(best, baseline)`` when
    ``baseline`` is in ``preds`` and is not the best (a negative difference: how much the best beats it).

    Args:
        preds: ``{name: pred [n, H, 2]}`` (at least one), data units, all on the trajectories of ``truth``.
        truth: ``[n, H, 2]``. indices: ``[n]`` trajectory ids (default ``0..n-1``).
        baseline: name of the reference the best is compared with. options: passed to :func:`compare_forecasts`.
    Returns:
        ``{"best": name, "criterion": text, "mean_mse": {name: score}, "comparisons": [compare_forecasts dicts]}``,
        the comparisons ordered by the score of their forecaster A.
    Raises:
        ValueError: no forecasts, or as :func:`compare_forecasts`.
    """
    if not preds:
        raise ValueError("compare_to_best: no forecasts given")
    score = {name: float(np.mean([e["mse"].mean() for e in per_trajectory_errors(p, truth).values()]))
             for name, p in preds.items()}
    best = min(score, key=score.get)
    order = sorted(score, key=score.get)
    pairs = [(name, best) for name in order if name != best]
    if baseline in preds and baseline != best:
        pairs.insert(0, (best, baseline))
    return {"best": best, "criterion": "lowest mean over prey and predator of the MSE over all trajectories and steps",
            "mean_mse": score,
            "comparisons": [compare_forecasts(preds[x], preds[y], truth, (x, y), indices, **options)
                            for x, y in pairs]}


def comparison_table(comparisons, spec: str = ".4g", legend: bool = True) -> str:
    """Markdown table of comparisons: one row per comparison x species x metric.

    Columns: A vs B, species, metric, mean and median of A and of B, the mean difference A − B with its bootstrap
    interval, the median per-trajectory difference, wins of A / B / ties, and blow-ups of A / B (MSE rows only).

    Args:
        comparisons: one :func:`compare_forecasts` dict or a list of them.
        spec: format spec of the numbers. legend: append a paragraph explaining the columns and the rules.
    Returns:
        The table (and legend) as one string, no trailing newline.
    Raises:
        KeyError: a dict that is not a :func:`compare_forecasts` result.
    """
    items = [comparisons] if isinstance(comparisons, dict) else list(comparisons)
    level = f"{items[0]['confidence']:.0%}" if items else "95%"
    lines = [f"| A vs B | species | metric | A mean (median) | B mean (median) | A − B mean [{level} CI] | "
             "A − B median | wins A / B / ties | blow-ups A / B |", "| --- | --- | --- |" + " ---: |" * 6]
    for c in items:
        for species in SPECIES:
            entry = c["species"][species]
            for metric in METRICS:
                m = entry[metric]
                interval = "no interval" if m["ci_low"] is None else \
                    f"[{format(m['ci_low'], spec)}, {format(m['ci_high'], spec)}]"
                blowups = f"{len(entry['blowups']['a'])} / {len(entry['blowups']['b'])}" if metric == "mse" else "–"
                lines.append(
                    f"| {c['a']} vs {c['b']} | {species} | {metric.upper()} | {format(m['mean_a'], spec)} "
                    f"({format(m['median_a'], spec)}) | {format(m['mean_b'], spec)} ({format(m['median_b'], spec)}) | "
                    f"{format(m['diff_mean'], spec)} {interval} | {format(m['diff_median'], spec)} | "
                    f"{m['wins_a']} / {m['wins_b']} / {m['ties']} | {blowups} |")
    table = "\n".join(lines)
    if not legend or not items:
        return table
    c = items[0]
    return table + (
        f"\n\nErrors per trajectory over its {c['horizon']} forecast steps (MSE in squared data units, MAE in data "
        f"units); means and medians over the {c['n']} trajectories. A − B > 0: A is worse. Interval: paired "
        f"bootstrap over trajectories ({c['n_resamples']} resamples, seed {c['seed']}, scipy.stats.bootstrap, BCa "
        f"unless degenerate). Wins: trajectories where that forecaster's error is smaller; ties are exact. "
        f"Blow-ups: {c['blowup_rule']}.")


def compare_files(path_a, path_b, names: tuple[str, str], horizon: int, seed: int = 0) -> dict | None:
    """:func:`compare_errors` of two per-trajectory CSVs (:func:`read_errors`), or None when either file is missing
    or the two do not cover the same trajectories in the same order (nothing to pair)."""
    if not (Path(path_a).is_file() and Path(path_b).is_file()):
        return None
    (ids_a, a), (ids_b, b) = read_errors(path_a), read_errors(path_b)
    if ids_a != ids_b:
        return None
    return compare_errors(a, b, horizon, names, ids_a, seed=seed)


def against_reference(reference_csv, others: dict, reference: str, horizon: int, seed: int = 0) -> tuple[list, str]:
    """Each forecaster of ``others`` (``{label: per-trajectory CSV}``) against the ``reference`` forecaster (its CSV
    ``reference_csv``), trajectory by trajectory (:func:`compare_files`; pairs that cannot be made are skipped).
    Returns ``(comparisons, Markdown)``: the :func:`summary_table` with a one-paragraph legend, or ``([], "")``."""
    found = [c for label, path in others.items()
             if (c := compare_files(path, reference_csv, (label, reference), horizon, seed)) is not None]
    if not found:
        return [], ""
    c = found[0]
    legend = (f"Each against {reference} on the same {c['n']} trajectories ({c['horizon']} steps forecast): mean "
              f"(median) per-trajectory MSE, the mean difference A − B (< 0: A better) with its paired bootstrap "
              f"{c['confidence']:.0%} interval over trajectories ({c['n_resamples']} resamples, seed {c['seed']}), "
              "wins on MSE, and blow-ups (a trajectory above 10× the larger median MSE, or holding over half the "
              "sum).")
    return found, summary_table(found) + "\n\n" + legend


def against_untrained(run_dir, trained: dict, horizon: int, seed: int = 0) -> tuple[list, str]:
    """:func:`against_reference` with the untrained model of the run directory ``run_dir`` (:data:`UNTRAINED_CSV`)
    as the reference; ``trained`` = ``{label: per-trajectory CSV path relative to run_dir}``."""
    run_dir = Path(run_dir)
    return against_reference(run_dir / UNTRAINED_CSV, {k: run_dir / v for k, v in trained.items()}, "untrained",
                             horizon, seed)


def summary_table(comparisons, spec: str = ".4g") -> str:
    """A compact Markdown table of MSE comparisons, one row per comparison × species: A's and B's mean (median) MSE,
    the mean difference A − B with its paired bootstrap interval, the same for MAE, A's wins / B's wins / ties on
    MSE, and blow-ups of A / B — for tables with many rows (a grid against its untrained model). The full table is
    :func:`comparison_table`."""
    items = [comparisons] if isinstance(comparisons, dict) else list(comparisons)
    level = f"{items[0]['confidence']:.0%}" if items else "95%"

    def diff(m: dict) -> str:
        interval = "" if m["ci_low"] is None else f" [{format(m['ci_low'], spec)}, {format(m['ci_high'], spec)}]"
        return f"{format(m['diff_mean'], spec)}{interval}"

    lines = [f"| A vs B | species | MSE A mean (median) | MSE B mean (median) | MSE A − B [{level} CI] | "
             f"MAE A − B [{level} CI] | MSE wins A / B / ties | blow-ups A / B |", "| --- | --- |" + " ---: |" * 6]
    for c in items:
        for species in SPECIES:
            e = c["species"][species]
            m = e["mse"]
            lines.append(f"| {c['a']} vs {c['b']} | {species} | {format(m['mean_a'], spec)} "
                         f"({format(m['median_a'], spec)}) | {format(m['mean_b'], spec)} "
                         f"({format(m['median_b'], spec)}) | {diff(m)} | {diff(e['mae'])} | "
                         f"{m['wins_a']} / {m['wins_b']} / {m['ties']} | "
                         f"{len(e['blowups']['a'])} / {len(e['blowups']['b'])} |")
    return "\n".join(lines)


def _check_pair(pred, truth, what: str) -> tuple[np.ndarray, np.ndarray]:
    p, t = np.asarray(pred, dtype=np.float64), np.asarray(truth, dtype=np.float64)
    if t.ndim != 3 or t.shape[2] != 2 or t.shape[0] == 0 or t.shape[1] == 0 or p.shape != t.shape:
        raise ValueError(f"{what} and truth must both have shape [n, H, 2] with n, H >= 1, got {p.shape} and "
                         f"{t.shape}")
    if not (np.isfinite(p).all() and np.isfinite(t).all()):
        raise ValueError(f"{what} or truth contains NaN or inf")
    return p, t


def _indices(indices, n: int) -> list[int]:
    ids = list(range(n)) if indices is None else [int(i) for i in indices]
    if len(ids) != n:
        raise ValueError(f"indices must have one id per trajectory ({n}), got {len(ids)}")
    return ids


def _mean_without(mse: np.ndarray, blowups: list[dict]) -> float | None:
    keep = np.ones(mse.size, dtype=bool)
    keep[[b["position"] for b in blowups]] = False
    return float(mse[keep].mean()) if keep.any() else None
