"""Running a study: named LoRA runs ("points", :mod:`experiments.lib.points`) on one loaded base model, each
trained, forecast and saved in its own directory, so that a study of many points (the lr × rank grid, the
context-length study) skips finished points and resumes an interrupted one exactly. A point is finished when its
``point.json`` exists; until then its ``training/`` checkpoint is what a ``--resume`` continues from.

    out/untrained.json              the base model's forecast and validation losses, computed once
    out/points/<name>/...           each point's directory (:mod:`experiments.lib.points`)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from . import compare, forecast_files, results, runs
from .classical_forecasters import Persistence
from .evaluation import evaluate
from .points import Point, by_context, forecast_mse, locked, point_directory, scan, study_cost, without_point_fields
from .results import Evaluation, write_json
from .session import Session
from .settings import ForecastSettings
from .training.loop import read_log
from .training.loss import validation_chunks, validation_loss


def untrained(session: Session, forecast: ForecastSettings, points: list[Point], chunks: runs.ChunkCache,
              path: Path) -> tuple[Evaluation, dict[int, float], int]:
    """The base model's forecast (saved and reused on --resume) and its validation loss at every context length of
    ``points``, on the same validation subsets the points are scored on. Returns ``(evaluation, {context_length:
    validation loss}, FLOPs of those losses)``; the evaluation's own ``validation_loss`` is the first context's."""
    evaluation = runs.untrained_evaluation(session, forecast, "base model", path, session.run.resume)
    saved = runs.read_untrained(path)
    losses, flops = saved.get("validation_loss", {}), saved.get("validation_loss_flops", 0)
    for (context_length, _), train in by_context(points).items():
        if str(context_length) in losses:
            continue
        val = validation_chunks(chunks(train)[1], train.eval_batches * train.batch_size, session.run.seed)
        losses[str(context_length)], spent = validation_loss(session.model, val, train.batch_size, session.precision,
                                                             progress=False)
        flops += spent
        saved.update(validation_loss=losses, validation_loss_flops=flops)
        write_json(path, saved)
        session.charge("eval", spent, path, what=f"untrained validation loss, context {context_length}")
    loss_by_context = {int(k): v for k, v in losses.items()}
    evaluation.validation_loss = loss_by_context[points[0].train.context_length]
    return evaluation, loss_by_context, flops


def run(session: Session, forecast: ForecastSettings, point: Point, chunks: runs.ChunkCache, key: dict,
        on_step=None, export: bool = False) -> dict:
    """Train, forecast and save one point (``point.json`` last: its presence means the point is finished), then
    charge its forecast. Returns the point record."""
    out = point_directory(session.out, point.name)
    t = point.train
    print(f"\n=== {point.name}: lr {t.lr:g}, rank {point.lora.rank}, context {t.context_length}, "
          f"{t.max_steps} steps ===")
    evaluation, summary = runs.train_and_forecast(session, forecast, point.lora, t, chunks(t), out,
                                                  f"{t.context_length}-token windows", on_step=on_step,
                                                  export=export)
    evaluation.forecaster = point.name
    losses = [e["loss"] for e in read_log(out / "training" / "log.jsonl") if e["kind"] == "train"]
    record = {"settings": key, "name": point.name, "lr": t.lr, "rank": point.lora.rank,
              "context_length": t.context_length, "evaluation": dataclasses.asdict(evaluation),
              "training": {k: summary[k] for k in ("steps", "epochs", "val_loss", "best_val_loss", "train_flops",
                                                   "eval_flops", "seconds_this_session")},
              "train_loss_last_10": float(np.mean(losses[-10:])) if losses else None}
    path = write_json(out / "point.json", record)
    session.charge("generate", evaluation.flops, path, what=f"forecast {point.name}")
    return record


def run_all(session: Session, forecast: ForecastSettings, points: list[Point], key: dict, on_step=None,
            export: bool = False, reference: bool = True) -> tuple[list[dict], Evaluation | None, dict, int]:
    """Check the study's plan against the ledger, then run every point not finished (finished ones are read back).
    Returns ``(records in the order of points, untrained evaluation, {context: untrained validation loss},
    planned FLOPs)``. ``on_step(point name, step)`` is called after every training step. ``reference=False`` (a
    shard of a study, :mod:`experiments.sweep`): no untrained evaluation, returned as ``None`` and ``{}``."""
    done, _ = scan(session.out, session.precision, points, key, session.join)
    with locked(session.out, [p.name for p in points if p.name not in done]):
        # again: another job may have finished some meanwhile
        done, start_steps = scan(session.out, session.precision, points, key, session.join)
        path = session.out / "untrained.json"
        reuse = session.run.resume and path.is_file()
        chunks = runs.ChunkCache(session.tokenizer, session.dataset)
        for train in by_context([p for p in points if p.name not in done]).values():
            chunks(train)  # cut (and checked against the batch size) before anything is spent
        sizes = runs.exact_sizes(session.tokenizer, session.dataset)
        planned = session.check(study_cost(session.model.config, sizes, forecast, points,
                                           start_steps, untrained=reference and not reuse))
        base, untrained_losses = (untrained(session, forecast, points, chunks, path)[:2] if reference else (None, {}))
        records = []
        for point in points:
            if point.name in done:
                print(f"{point.name}: finished earlier, read back")
                records.append(done[point.name])
                continue
            hook = (lambda step, n=point.name: on_step(n, step)) if on_step else None
            records.append(run(session, forecast, point, chunks, key, on_step=hook, export=export))
    return records, base, untrained_losses, planned


def table_rows(records: list[dict]) -> list[dict]:
    """One flat row per point (for CSV): settings, losses, per-species forecast metrics, FLOPs."""
    rows = []
    for r in records:
        m, e = r["evaluation"]["metrics"], r["evaluation"]
        rows.append({"name": r["name"], "lr": r["lr"], "rank": r["rank"], "context_length": r["context_length"],
                     "steps": r["training"]["steps"], "train_loss_last_10": r["train_loss_last_10"],
                     "val_loss": r["training"]["val_loss"], "forecast_mse": forecast_mse(m),
                     "prey_mse": m["prey"]["mse"], "predator_mse": m["predator"]["mse"],
                     "prey_mae": m["prey"]["mae"], "predator_mae": m["predator"]["mae"], "prey_r2": m["prey"]["r2"],
                     "predator_r2": m["predator"]["r2"], "parsed_fraction": e["parsed_fraction"],
                     "train_flops": r["training"]["train_flops"] + r["training"]["eval_flops"],
                     "flops": r["training"]["train_flops"] + r["training"]["eval_flops"] + e["flops"]})
    return rows


def charged_flops(records: list[dict], reference: Evaluation, path: Path) -> dict[str, int]:
    """FLOPs of a study by kind, as its parts were charged: generate, train, eval."""
    saved = runs.read_untrained(path)
    return {"generate": reference.flops + sum(r["evaluation"]["flops"] for r in records),
            "train": sum(r["training"]["train_flops"] for r in records),
            "eval": saved.get("validation_loss_flops", 0) + sum(r["training"]["eval_flops"] for r in records)}


def study_results(session: Session, forecast: ForecastSettings, records: list[dict], untrained: Evaluation,
                  planned: int, varies: tuple[str, ...], **settings) -> tuple[results.Results, str]:
    """The results of a study of points (the sweep, the context study): every point's evaluation beside the
    untrained model's and persistence's on the same trajectories, the plan, the FLOPs charged, and each point against
    the untrained model trajectory by trajectory (``details["vs_untrained"]``, paired bootstrap intervals,
    :func:`compare.against_reference`). ``settings``: the settings dataclasses to record, without the fields the
    points vary (``varies``, as in :func:`study_key`). Returns ``(results,
    Markdown of the paired table)``; the caller adds its own details and finishes the session."""
    indices, _, contexts, truth = session.dataset.forecast_set(forecast)
    _, _, persistence = evaluate(Persistence(), contexts, truth, forecast.split, indices)
    out = session.results(forecast=forecast, **settings)
    out.settings = without_point_fields(out.settings, varies)
    out.evaluations = {"untrained": untrained, **{r["name"]: Evaluation(**r["evaluation"]) for r in records},
                       "persistence": persistence}
    out.flops["planned"] = planned
    for kind, flops in charged_flops(records, untrained, session.out / "untrained.json").items():
        out.add_flops(kind, flops)
    trained = {r["name"]: forecast_files.point_csv(r["name"]) for r in records}
    paired, markdown = compare.against_untrained(session.out, trained, forecast.horizon, session.run.seed)
    out.details["vs_untrained"] = paired
    return out, markdown
