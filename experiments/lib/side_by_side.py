"""An LLM forecaster beside the classical ones on the same trajectories: the classical forecasters (orders and the
parroting length chosen on the validation split), their scores, and paired comparisons with bootstrap intervals
(:mod:`experiments.lib.compare`) of the LLM against every other forecaster.

A claim that one forecaster beats another rests on the per-trajectory differences: the tables give the mean
difference with its paired 95 % interval (resampling trajectories), the median difference, the win count and the
blow-ups, never a mean alone.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Iterable

import numpy as np

from . import compare, forecast_files, runs
from .classical_forecasters import AR, VAR, Persistence, select_order
from .costs import Sizes, forecast_cost
from .dataset import Dataset
from .defaults import PARROT_LENGTHS
from .errors import UsageError
from .evaluation import evaluate
from .lotka_volterra_fit import LotkaVolterraODE
from .parroting import ContextParroting, parrot_lengths_for
from .results import Evaluation
from .session import Session
from .settings import ForecastSettings
from .tables import evaluation_table


def positive_integers(text: str) -> list[int]:
    """The sorted distinct values of a comma-separated list of positive integers written in ASCII digits, or [] if
    any item is anything else ("-2", "1.5", "0", "+3", "1_0", "٢", an empty item between commas): a value that is
    not one is an error for the caller to report, never dropped or read as another number."""
    items = [x.strip() for x in text.split(",")]
    if items and items[-1] == "":
        items.pop()  # one trailing comma
    if not items or not all(x.isascii() and x.isdigit() and int(x) >= 1 for x in items):
        return []
    return sorted({int(x) for x in items})


def parse_orders(text: str, context_steps: int, option: str = "--orders") -> list[int]:
    """Comma-separated AR/VAR orders, each an integer ≥ 1 with 3p + 2 ≤ ``context_steps`` (enough rows to fit).

    Raises UsageError naming ``option`` for anything else (not silently dropped)."""
    orders = positive_integers(text)
    if not orders or 3 * orders[-1] + 2 > context_steps:
        raise UsageError(f"{option} {text!r}: must be comma-separated integers >= 1 with 3p + 2 <= --context-steps "
                         f"{context_steps}")
    return orders


def classical(ds: Dataset, out: Path, forecast: ForecastSettings, orders, predictions: dict,
              parrot_lengths=PARROT_LENGTHS) -> tuple[dict[str, Evaluation], dict, dict]:
    """Persistence, AR, VAR, the Lotka–Volterra fit and context parroting on ``forecast``'s trajectories of ``ds``,
    chosen on the whole validation split, forecast and saved (per-trajectory CSVs under ``out``). Adds each one's
    predictions [n, H, 2] to ``predictions``. Returns ``({name: Evaluation}, the order search, {name: forecaster})``."""
    _, _, val_contexts, val_truth = ds.forecast_set(dataclasses.replace(forecast, split="validation", limit=None))
    dt = float(ds.data.time[1] - ds.data.time[0])
    lengths = parrot_lengths_for(forecast.context_steps, parrot_lengths)
    forecasters, search = validated_forecasters(val_contexts, val_truth, orders, dt, parrot_lengths=lengths)
    evaluations = {}
    for forecaster in forecasters:
        tag = runs.file_tag(forecaster.name)
        evaluations[forecaster.name] = runs.forecast_and_save(
            ds, forecaster, dataclasses.replace(forecast, plots=0), out, tag, forecaster.name, None,
            settings=forecaster.settings(), predictions=predictions)
    return evaluations, search, {f.name: f for f in forecasters}


def comparisons(predictions: dict[str, np.ndarray], truth: np.ndarray, indices, reference: str,
                seed: int = 0) -> list[dict]:
    """:func:`compare.compare_forecasts` of ``reference`` (A) against every other forecaster (B) in
    ``predictions`` ({name: [n, H, 2]}, the same trajectories as ``truth``)."""
    return [compare.compare_forecasts(predictions[reference], pred, truth, names=(reference, name),
                                      indices=indices, seed=seed)
            for name, pred in predictions.items() if name != reference]


def best_classical(evaluations: dict[str, Evaluation]) -> dict[str, str]:
    """``{species: name}`` of the classical forecaster with the lowest MSE of that species (LLM entries, named
    "lora" or "untrained", are skipped)."""
    rivals = {k: e for k, e in evaluations.items() if k not in ("lora", "untrained")}
    return {s: min(rivals, key=lambda k: rivals[k].metrics[s]["mse"]) for s in ("prey", "predator")}


def indices_range(text: str, n_systems: int | None, option: str = "--peer-indices") -> np.ndarray:
    """``"A-B"`` (inclusive, ASCII digits) → trajectory indices A..B. Raises UsageError naming ``option`` if
    malformed, if A > B, or (with ``n_systems``, the file's trajectory count) outside 0..n_systems−1; without
    ``n_systems`` only the form is checked (before the data is read)."""
    match = re.fullmatch(r"([0-9]+)-([0-9]+)", text.strip())
    if match is None:
        raise UsageError(f"{option} {text!r}: must be a range like 850-999")
    a, b = int(match[1]), int(match[2])
    if a > b or (n_systems is not None and b >= n_systems):
        bounds = f"within 0-{n_systems - 1} " if n_systems is not None else ""
        raise UsageError(f"{option} {text!r}: must lie {bounds}with the first <= the last")
    return np.arange(a, b + 1)


def on_indices(ds: Dataset, forecasters: dict, forecast: ForecastSettings, indices: np.ndarray,
               known: dict[str, tuple[np.ndarray, np.ndarray]]) -> tuple[dict[str, Evaluation], dict, np.ndarray]:
    """Score ``forecasters`` ({name: forecaster}) on the trajectories ``indices`` (any split), reusing the
    predictions already made for some of them: ``known`` = {name: (their indices, predictions [m, H, 2])}; only the
    remaining trajectories are forecast. Returns ``({name: Evaluation}, {name: predictions [n, H, 2]}, truth)``."""
    data = ds.data.trajectories
    C, H = forecast.context_steps, forecast.horizon
    truth = data[indices, C:C + H].astype(np.float64)
    evaluations, predictions = {}, {}
    for name, forecaster in forecasters.items():
        have_idx, have_pred = known.get(name, (np.array([], int), np.zeros((0, H, 2))))
        position = {int(i): k for k, i in enumerate(have_idx)}
        missing = np.array([i for i in indices if int(i) not in position], dtype=int)
        pred = np.zeros((len(indices), H, 2))
        flops = 0
        if len(missing):
            _, new, e = evaluate(forecaster, data[missing, :C], data[missing, C:C + H].astype(np.float64),
                                 "mixed", missing)
            fill = {int(i): k for k, i in enumerate(missing)}
            flops = e.flops
        for k, i in enumerate(indices):
            pred[k] = have_pred[position[int(i)]] if int(i) in position else new[fill[int(i)]]
        from .evaluation import forecast_metrics

        evaluations[name] = Evaluation(forecaster=name, split="mixed", trajectories=[int(i) for i in indices],
                                       context_steps=C, horizon=H, metrics=forecast_metrics(pred, truth),
                                       flops=int(flops))
        predictions[name] = pred
    return evaluations, predictions, truth


def peer_indices(text: str | None, n_systems: int) -> np.ndarray | None:
    """The trajectories ``--peer-indices`` names (``A-B``), by default 850–999 (as published peer runs report) when
    the file has 1,000 trajectories; None for "none" or a smaller file by default. Raises UsageError for a bad
    range (:func:`indices_range`)."""
    text = text or ("850-999" if n_systems >= 1000 else "none")
    return None if text.lower() == "none" else indices_range(text, n_systems)


def peer_cost(config, sizes: Sizes, forecast: ForecastSettings, lora, peers: np.ndarray, indices) -> int:
    """Planned FLOPs of forecasting the peer trajectories outside the test split ``indices`` with the untrained and
    the trained model (an upper bound: every prompt as long as the longest test prompt)."""
    extra = [i for i in peers if i not in set(np.asarray(indices).tolist())]
    lengths = [max(sizes.prompt_lengths(forecast))] * len(extra)
    return 2 * forecast_cost(config, lengths, forecast.horizon, sizes.decimals, forecast, lora)


def peer_table(session: Session, forecast: ForecastSettings, peers, predictions: dict, indices, adapter: Path,
               forecasters: dict) -> dict:
    """The forecasters of the test table scored on the trajectories ``peers`` (e.g. 850–999, as published peer
    runs report): predictions already made on the test split are reused, the rest are forecast (the LLMs with the
    evaluated adapter, merged). Returns ``{"indices", "evaluations", "comparisons", "markdown", "flops"}``."""
    from lora import load_adapter, merged, remove_lora

    known = {name: (indices, pred) for name, pred in predictions.items()}
    llm = (session.model, session.tokenizer, session.dataset)
    untrained = runs.llm_forecaster(*llm, forecast, "untrained", session.run.seed, session.progress)
    evaluations, preds, truth = on_indices(session.dataset, {"untrained": untrained, **forecasters}, forecast, peers,
                                           known)
    try:
        load_adapter(session.model, adapter)
        with merged(session.model):
            trained = runs.llm_forecaster(*llm, forecast, "lora", session.run.seed, session.progress)
            lora_evals, lora_preds, _ = on_indices(session.dataset, {"lora": trained}, forecast, peers, known)
    finally:
        remove_lora(session.model)
    evaluations, preds = {**lora_evals, **evaluations}, {**lora_preds, **preds}
    flops = sum(e.flops for e in evaluations.values())
    session.charge("generate", flops, session.out / forecast_files.TRAINED_CSV,
                   what=f"forecasts of trajectories {peers[0]}-{peers[-1]} outside the test split")
    paired = comparisons(preds, truth, peers, "lora", seed=session.run.seed)
    outside = sorted(set(peers.tolist()) - set(int(i) for i in indices))
    markdown = (f"### Trajectories {peers[0]}–{peers[-1]} (as published peer runs report)\n\n"
                f"{len(outside)} of these {len(peers)} trajectories are outside the test split"
                + (f" ({outside[0]}–{outside[-1]}: validation trajectories — the classical orders were chosen on "
                   "the whole validation split, the search and the adapter on its first trajectories — so this "
                   "table is not a held-out test)" if outside else "") + ".\n\n"
                f"{evaluation_table(evaluations)}\n\n{compare.comparison_table(paired, legend=False)}")
    return {"indices": [int(peers[0]), int(peers[-1])], "evaluations": {k: dataclasses.asdict(e) for k, e in
                                                                         evaluations.items()},
            "comparisons": paired, "markdown": markdown, "flops": flops}


def validated_forecasters(val_contexts: np.ndarray, val_truth: np.ndarray, orders, dt: float, log: bool = False,
                          ode: bool = True, parrot_lengths: Iterable[int] | None = None) -> tuple[list, dict]:
    """Persistence, AR(p), VAR(p) with p chosen among ``orders`` by MSE on the validation contexts [n, C, 2] and
    truth [n, H, 2], (if ``ode``) the Lotka–Volterra ODE with time step ``dt``, and (if ``parrot_lengths`` is given)
    ``ContextParroting(m)`` with m chosen among ``parrot_lengths`` the same way. Returns ``(forecasters,
    {"ar"|"var"|"parrot": {"chosen": p or m, "mse_by_order": {p or m: MSE}}})``."""
    search = {}
    makers = [("ar", "p", lambda p: AR(p, log=log), orders), ("var", "p", lambda p: VAR(p, log=log), orders)]
    if parrot_lengths is not None:
        makers.append(("parrot", "m", ContextParroting, parrot_lengths))
    for name, symbol, make, candidates in makers:
        chosen, scores = select_order(make, candidates, val_contexts, val_truth)
        search[name] = {"chosen": chosen, "mse_by_order": scores}
        print(f"{name.upper()} {'order' if symbol == 'p' else 'match length'} on the validation split: "
              f"{symbol} = {chosen} (MSE by {symbol}: {', '.join(f'{p}: {v:.4f}' for p, v in scores.items())})")
    forecasters = [Persistence(), AR(search["ar"]["chosen"], log=log), VAR(search["var"]["chosen"], log=log)]
    forecasters += [LotkaVolterraODE(dt=dt)] if ode else []
    return forecasters + ([ContextParroting(search["parrot"]["chosen"])] if "parrot" in search else []), search
