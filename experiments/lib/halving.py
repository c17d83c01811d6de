"""Successive halving over LoRA points: every point trained to N steps and scored, the best 1/η continued to ηN from
their own checkpoints, and so on, so that the compute goes to the settings that are still in the race.

Source: Jamieson & Talwalkar, "Non-stochastic best arm identification and hyperparameter optimization" (AISTATS
2016), Algorithm 1 (successive halving), here with a fixed number of rungs as in the inner loop of Hyperband (Li et
al., JMLR 18(185), 2018, Algorithm 1, one bracket). Points and their directories are :mod:`experiments.lib.points`':

    out/points/<name>/training/                 one training run per point, continued rung after rung
    out/points/<name>/rung<k>.json              the point's score at rung k (its presence: rung k is done for it)
    out/points/<name>/per_trajectory_rung<k>.csv

Continuing a point from rung k to rung k+1 resumes its checkpoint with a larger ``max_steps``: the learning rate is
constant (the search refuses a schedule that depends on the run's length), and the validation loss taken at the
end of a rung changes no weight, so a point taken to ηN in two rungs is bit-identical to one trained to ηN straight
(tested).

The score (lower is better) is robust to the one blown-up forecast that can move a mean: for each species, the
median over the validation trajectories of the per-trajectory forecast MSE, divided by the same median of
persistence (the last observed value repeated) on the same trajectories, then averaged over the two species — so
prey, whose values are larger, does not outweigh predator.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np

from lora import merged, remove_lora

from . import forecast_files, points, results, runs
from .classical_forecasters import Persistence
from .costs import Sizes, lora_run_cost, untrained_forecast_cost, validation_loss_cost
from .dataset import Dataset
from .errors import UsageError
from .evaluation import SPECIES, LLMForecaster, evaluate, per_trajectory_rows, write_csv
from .points import Point
from .results import write_json
from .runs import ChunkCache
from .session import Session
from .settings import DataSettings, ForecastSettings, TrainSettings
from .scores import SCORE_RULE, per_trajectory_mse, robust_score, score_sd
from .training import distributed
from .training.checkpoint import checkpoint_step, find_checkpoint, read_checkpoint
from .training.loop import train_lora


def schedule(n_points: int, min_steps: int, eta: int, rungs: int) -> list[tuple[int, int]]:
    """``[(steps, points trained to them), …]`` per rung: rung k trains ``max(1, n_points // eta**k)`` points to
    ``min_steps · eta**k`` steps; e.g. 9 points, N = 100, η = 3, 3 rungs → ``[(100, 9), (300, 3), (900, 1)]``.

    Raises UsageError if a value is not a positive integer (η ≥ 2) or a rung would keep as many points as the one
    before it while points remain to be dropped (too many rungs for ``n_points``)."""
    for name, value, low in (("--min-steps", min_steps, 1), ("--eta", eta, 2), ("--rungs", rungs, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise UsageError(f"{name} {value!r}: must be an integer >= {low}")
    out = [(min_steps * eta**k, max(1, n_points // eta**k)) for k in range(rungs)]
    if n_points > 1 and any(out[k][1] == out[k - 1][1] for k in range(1, rungs)):
        raise UsageError(f"--rungs {rungs}: with {n_points} points and --eta {eta} a rung would keep as many points "
                         f"as the one before it; use at most {1 + int(math.log(n_points, eta) + 1e-9)} rungs")
    return out


def persistence_reference(dataset: Dataset, forecast: ForecastSettings):
    """``(indices, contexts [n, C, 2], truth [n, H, 2], persistence's per-trajectory MSE)`` of ``forecast``'s
    trajectories of ``dataset``: what every :func:`scores.robust_score` on them is divided by."""
    indices, _, contexts, truth = dataset.forecast_set(forecast)
    _, reference_pred, _ = evaluate(Persistence(), contexts, truth, forecast.split, indices)
    return indices, contexts, truth, per_trajectory_mse(reference_pred, truth)


def forecast_scorer(forecaster: LLMForecaster, dataset: Dataset, forecast: ForecastSettings):
    """A ``model -> (score, FLOPs)`` for ``train_lora(forecast_score=…)``: the :data:`scores.SCORE_RULE` score of the
    model (adapters merged, :func:`lora.merged`; forecasting as ``forecaster`` does) on ``forecast``'s trajectories
    of ``dataset``, e.g. a fixed validation subset, greedy; persistence's per-trajectory errors on them are computed
    once."""
    indices, contexts, truth, reference = persistence_reference(dataset, forecast)

    def score(model) -> tuple[float, int]:
        forecaster.model = model
        with merged(model):
            _, pred, evaluation = evaluate(forecaster, contexts, truth, forecast.split, indices)
        return robust_score(per_trajectory_mse(pred, truth), reference), evaluation.flops

    return score


def saved_score(dataset: Dataset, forecast: ForecastSettings, path: Path) -> dict | None:
    """The score and per-species median MSE of the predictions saved in ``path`` (an ``untrained.json`` with a
    "predictions" list [n, H, 2]) on ``forecast``'s trajectories, for the table's reference row; None if the file
    holds no predictions."""
    import json

    saved = json.loads(path.read_text()).get("predictions")
    if saved is None:
        return None
    _, _, truth, reference = persistence_reference(dataset, forecast)
    mse = per_trajectory_mse(np.asarray(saved, dtype=np.float64), truth)
    return {"score": robust_score(mse, reference),
            "median_mse": {s: float(np.median(v)) for s, v in mse.items()}}


def rung_path(out: Path, name: str, rung: int) -> Path:
    """The rung record of point ``name`` at rung ``rung``: ``out/points/<name>/rung<k>.json``."""
    return out / "points" / name / f"rung{rung}.json"


def ranking(records: list[dict]) -> tuple[list[int], list[str]]:
    """The records' order best first by :data:`scores.TIE_RULE`, and the names tied with the best one (the best's
    ``score_sd`` wide; records given without one tie only exactly), as
    ``(indices, tied names)``."""
    scores = [finite_score(r["score"]) for r in records]
    best = min(range(len(records)), key=lambda i: (scores[i], i))
    width = records[best].get("score_sd") or 0.0
    tied = [i for i in range(len(records)) if scores[i] <= scores[best] + width]
    loss = [finite_score(r.get("val_loss")) for r in records]
    rest = sorted((i for i in range(len(records)) if i not in tied), key=lambda i: (scores[i], i))
    return sorted(tied, key=lambda i: (loss[i], i)) + rest, [records[i]["name"] for i in tied]


def survivors(records: list[dict], kept: int) -> list[str]:
    """Names of the ``kept`` best records by :func:`ranking` (:data:`scores.TIE_RULE`; the records are in grid
    order)."""
    return [records[i]["name"] for i in ranking(records)[0][:kept]]


def finite_score(x) -> float:
    """``x``, or inf when it is None or not finite (a point that blew up ranks last)."""
    return x if x is not None and math.isfinite(x) else math.inf


def run_rung(session: Session, forecast: ForecastSettings, point: Point, rung: int, chunks: ChunkCache,
             key: dict, reference: dict[str, np.ndarray], on_step=None) -> dict:
    """Train ``point`` to its rung's steps in ``out/points/<name>/training`` (continuing its checkpoint if it has
    one), forecast the validation subset with it and write its rung record (``rung<k>.json`` last, then the forecast
    is charged). Returns the record."""
    points.point_directory(session.out, point.name, may_restart=rung == 0)
    t, out = point.train, session.out / "points" / point.name / "training"
    print(f"\n=== rung {rung}: {point.name} (lr {t.lr:g}, rank {point.lora.rank}) to step {t.max_steps} ===")
    indices, _, contexts, truth = session.dataset.forecast_set(forecast)
    train_chunks, val_chunks = chunks(t)
    job = dict(train_chunks=train_chunks, val_chunks=val_chunks, settings=t, out_dir=out, lora=point.lora,
               seed=session.run.seed, stage=session.stage, precision=session.precision,
               resume=checkpoint_step(out) > 0,
               loss_token_ids=runs.loss_token_ids(session.tokenizer, session.dataset, t))
    try:
        with distributed.leading(job):
            summary = train_lora(session.model, **job, ledger=session.ledger, on_step=on_step)
        forecaster = runs.llm_forecaster(session.model, session.tokenizer, session.dataset, forecast, point.name,
                                         session.run.seed, session.progress)
        forecasts, pred, evaluation = evaluate(forecaster, contexts, truth, forecast.split, indices)
    finally:
        remove_lora(session.model)
    evaluation.validation_loss = summary["val_loss"]
    mse = per_trajectory_mse(pred, truth)
    write_csv(session.out / forecast_files.point_csv(point.name, rung),
              per_trajectory_rows(indices, pred, truth, forecasts))
    record = {"settings": key, "name": point.name, "rung": rung, "steps": summary["steps"], "lr": t.lr,
              "rank": point.lora.rank, "context_length": t.context_length, "score": robust_score(mse, reference),
              "score_sd": score_sd(mse, reference, session.run.seed),
              "median_mse": {s: float(np.median(v)) for s, v in mse.items()}, "val_loss": summary["val_loss"],
              "evaluation": dataclasses.asdict(evaluation),
              "training": {k: summary[k] for k in ("steps", "epochs", "train_flops", "eval_flops",
                                                   "seconds_this_session")}}
    path = write_json(rung_path(session.out, point.name, rung), record)
    session.charge("generate", evaluation.flops, path, what=f"forecast {point.name} at rung {rung}")
    print(f"{point.name} at step {record['steps']}: score {record['score']:.4f} ± {record['score_sd']:.4f}, "
          f"validation loss "
          f"{record['val_loss']:.4f}, prey MSE {evaluation.metrics['prey']['mse']:.4f}, predator MSE "
          f"{evaluation.metrics['predator']['mse']:.4f}")
    return record


def read_rung(out: Path, name: str, rung: int, key: dict) -> dict | None:
    """The rung record of point ``name`` in the search ``out`` if it was written (None otherwise).

    Raises UsageError naming the file if it is unreadable or was made with other settings."""
    path = rung_path(out, name, rung)
    if not path.is_file():
        return None
    record = results.read_record(path, _valid_rung, "delete it to redo that rung")
    if not points.same_study(record["settings"], key):
        raise UsageError(f"{path} was made with other settings than these; use another --out or --overwrite")
    return record


def _valid_rung(record: dict) -> None:
    for k in ("settings", "name", "rung", "steps", "lr", "rank", "score", "val_loss"):
        record[k]
    for s in SPECIES:
        record["median_mse"][s]
    results.valid_evaluation(record["evaluation"])
    for k in ("train_flops", "eval_flops"):
        record["training"][k]


def rung_cost(config, sizes: Sizes, forecast: ForecastSettings, alive: list[Point], out: Path,
              precision: str) -> dict[str, int]:
    """FLOPs of one rung of the search in ``out``: each point's training from its checkpoint step (in compute
    dtype ``precision``) to the rung's steps, and its forecast of the validation subset."""
    costs = {}
    for p in alive:
        start = checkpoint_step(out / "points" / p.name / "training", precision)
        costs[p.name] = sum(lora_run_cost(config, sizes, forecast, p.lora, p.train, start).values())
    return costs


def search_cost(config, sizes: Sizes, forecast: ForecastSettings, grid: list[Point],
                rungs: list[tuple[int, int]]) -> dict[str, int]:
    """Upper bound on a whole search from scratch, before anyone knows which points survive: rung k is priced as
    its ``kept`` most expensive points trained from the previous rung's steps to its own, plus their forecasts; and
    the untrained model's forecast and validation loss that every score is shown beside."""
    t = grid[0].train
    costs = {"untrained": untrained_forecast_cost(config, sizes, forecast) + validation_loss_cost(
        config, sizes.val_rows(t), t.batch_size, t.context_length)}
    previous = 0
    for k, (steps, kept) in enumerate(rungs):
        each = sorted((sum(lora_run_cost(config, sizes, forecast, p.lora,
                                         dataclasses.replace(p.train, max_steps=steps), previous).values())
                       for p in grid), reverse=True)
        costs[f"rung {k}"], previous = int(sum(each[:kept])), steps
    return costs


def search(session: Session, forecast: ForecastSettings, grid: list[Point], rungs: list[tuple[int, int]], key: dict,
           on_step=None) -> list[list[dict]]:
    """Run (or read back) every rung in order: rung 0 over ``grid``, rung k over the best of rung k − 1. Each rung's
    plan is checked against the ledger before it starts. Returns the rung records, rung by rung, in grid order.
    ``on_step(point name, step)`` is called after every training step (tests simulate a kill with it)."""
    indices, contexts, truth, reference = persistence_reference(session.dataset, forecast)
    sizes = runs.exact_sizes(session.tokenizer, session.dataset)
    chunks, done, alive = ChunkCache(session.tokenizer, session.dataset), [], list(grid)
    for k, (steps, kept) in enumerate(rungs):
        if k:
            names = survivors(done[-1], kept)
            alive = [p for p in grid if p.name in names]
        alive = [dataclasses.replace(p, train=dataclasses.replace(p.train, max_steps=steps)) for p in alive]
        todo = [p for p in alive if read_rung(session.out, p.name, k, key) is None]
        print(f"\nrung {k}: {len(alive)} points to {steps} steps ({len(alive) - len(todo)} done earlier)")
        if todo:
            session.check(rung_cost(session.model.config, sizes, forecast, todo, session.out, session.precision))
        records = []
        for p in alive:
            record = read_rung(session.out, p.name, k, key)
            if record is None:
                hook = (lambda step, n=p.name: on_step(n, step)) if on_step else None
                record = run_rung(session, forecast, p, k, chunks, key, reference, on_step=hook)
            records.append(record)
        done.append(records)
    return done


def search_key(run_key: dict, data: DataSettings, forecast: ForecastSettings, base: Point,
               rungs: list[tuple[int, int]], eta: int) -> dict:
    """What every rung record of a search must share: the points' study key (:func:`points.study_key`, with the
    last rung's steps, without lr and rank, which each point's record gives) and the schedule."""
    key = points.study_key(run_key, data, forecast, base.lora,
                           dataclasses.replace(base.train, max_steps=rungs[-1][0]), varies=points.GRID_FIELDS)
    key["search"] = {"rungs": [list(r) for r in rungs], "eta": eta, "score": SCORE_RULE}
    return key


def continue_point(search_dir: str, picked: dict, train: TrainSettings, out: Path) -> dict:
    """Copy the search's winning point's training run into ``out/training`` (once) so that training continues from
    its checkpoint, and record what came from the search in ``out/continued_from.json``. Returns that record:
    ``{"search", "point", "step", "train_flops", "eval_flops"}`` (FLOPs already charged under the search).

    Raises UsageError if the search's run is missing or was trained with settings a resumed run may not change
    (:attr:`TrainSettings.RESUME_FIXED`; the search selects by validation loss, and the final run may select by
    forecast score from the continued step on, :attr:`TrainSettings.RESELECTABLE`)."""
    record_path = out / "continued_from.json"
    if record_path.is_file():
        return json.loads(record_path.read_text())
    source = Path(search_dir) / "points" / picked["point"] / "training"
    theirs = json.loads((Path(search_dir) / "results.json").read_text())["settings"]["train"]
    theirs = {k: theirs.get(k, getattr(TrainSettings(), k)) for k in TrainSettings.RESUME_FIXED}  # left out: default
    differ = [k for k in TrainSettings.RESUME_FIXED if k not in ("lr", *TrainSettings.RESELECTABLE) and theirs[k] != (
        list(getattr(train, k)) if isinstance(getattr(train, k), tuple) else getattr(train, k))]
    if differ:
        raise UsageError(f"--from-search {search_dir}: the search trained with " + ", ".join(
            f"{k}={theirs[k]!r}" for k in differ) + " — give the same options or --no-continue-search")
    checkpoint = find_checkpoint(source)
    if checkpoint is None or (out / "training").exists():
        raise UsageError(f"--from-search {search_dir}: no checkpoint of {picked['point']} in {source}"
                         if checkpoint is None else f"{out / 'training'} exists but was not continued from a search")
    loop = read_checkpoint(checkpoint).state["loop"]
    shutil.copytree(source, out / "training")
    record = {"search": Path(search_dir).name, "point": picked["point"], "step": loop["step"],
              "train_flops": loop["train_flops"], "eval_flops": loop["eval_flops"]}
    write_json(record_path, record)
    return record
