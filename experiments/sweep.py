"""The learning-rate × LoRA-rank grid (coursework 3b): every point trained for the same number of steps on one
loaded base model, scored by validation loss and by forecasts of the same validation trajectories.

    python -m experiments.sweep --model DIR --data FILE [--preset cpu] [--lrs 1e-5,5e-5,1e-4] [--ranks 2,4,8] [--resume]

Selection rule: the point with the lowest validation forecast MSE (mean of the prey and predator MSE) wins — the
default LoRA run lowered token loss while its forecasts got worse, so token loss alone is not trusted; the table
reports both and says whether they rank the grid the same way. Resumable (``--resume``): finished points are read
back, an interrupted point continues from its checkpoint exactly. Writes under ``--out`` (default ``runs/sweep``):
results.json, grid.csv, grid.json, heatmap_val_loss.png, heatmap_forecast_mse.png, loss_curves.png, README.md,
untrained.json and one directory per point (training/, per-trajectory CSV, forecast plot, point.json).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil

import numpy as np

from . import recipes, settings
from .classical_forecasters import Persistence
from .costs import lora_run_cost, untrained_forecast_cost, validation_loss_cost
from .evaluation import evaluate
from .plots import plot_heatmap, plot_training_curves
from .results import Evaluation, write_json
from .session import Session
from .settings import ForecastSettings, LoRASettings, TrainSettings, UsageError
from .training import checkpoint_step, read_log, validation_loss, validation_subset

STAGE = "sweep"
LRS = (1e-5, 5e-5, 1e-4)
RANKS = (2, 4, 8)
#: full scale (a GPU): 500 steps per point at the coursework's batch 4 × context 512, 100 validation trajectories
DEFAULTS = {
    "train": TrainSettings(batch_size=4, context_length=512, max_steps=500, eval_every=100, eval_batches=8,
                           eval_at_start=False, checkpoint_every=100),
    "forecast": ForecastSettings(limit=100, gen_batch_size=20, plots=2),
}
#: this 2-core CPU: 100 steps per point at context 256 with the numeric-alphabet loss, 50 trajectories
PRESETS = {"cpu": {"train": {"context_length": 256, "max_steps": 100, "eval_every": 0, "eval_batches": 4,
                             "checkpoint_every": 25, "loss_vocabulary": "numeric"},
                   "forecast": {"limit": 50, "gen_batch_size": 25}}}


def build_parser(preset: str | None = None):
    p = settings.parser("python -m experiments.sweep", __doc__.split("\n\n")[0], "run", "data", "forecast", "lora",
                        "train", defaults=settings.with_preset(DEFAULTS, PRESETS, preset),
                        forecast_batch_flag="--gen-batch-size", presets=PRESETS, exclude=("lr", "rank"))
    p.add_argument("--lrs", default=",".join(f"{x:g}" for x in LRS), help="learning rates (default 1e-5,5e-5,1e-4)")
    p.add_argument("--ranks", default=",".join(map(str, RANKS)), help="LoRA ranks (default 2,4,8)")
    return p


def grid_axis(text: str, kind, flag: str) -> tuple:
    """Comma-separated values of a grid axis, each valid for its field. Raises UsageError naming ``flag``."""
    try:
        values = tuple(kind(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"{flag} {text!r}: must be comma-separated {kind.__name__}s") from None
    check = TrainSettings if kind is float else LoRASettings
    for v in values:
        try:
            dataclasses.replace(check(), **{"lr" if kind is float else "rank": v}).validate()
        except settings.OptionError as err:
            raise UsageError(f"{flag} {text!r}: {v} {err.allowed}") from None
    if not values or len(set(values)) != len(values):
        raise UsageError(f"{flag} {text!r}: must be distinct values, at least one")
    return values


def point_name(lr: float, rank: int) -> str:
    return f"lr{lr:g}_rank{rank}"


def plan(config, sizes, forecast: ForecastSettings, lora: LoRASettings, train: TrainSettings, lrs, ranks,
         start_steps: dict | None = None, untrained: bool = True) -> dict[str, int]:
    """Planned FLOPs of the grid: the untrained forecast and validation loss (once, if ``untrained``) and, for every
    point not in ``start_steps`` as finished (``None``), its training from its checkpoint step and its forecast."""
    start_steps = start_steps or {}
    costs = {"untrained": 0}
    if untrained:
        costs["untrained"] = untrained_forecast_cost(config, sizes, forecast) + validation_loss_cost(
            config, sizes.val_rows(train), train.batch_size, train.context_length)
    for lr in lrs:
        for rank in ranks:
            name = point_name(lr, rank)
            if name in start_steps and start_steps[name] is None:
                continue
            point = lora_run_cost(config, sizes, forecast, dataclasses.replace(lora, rank=rank),
                                  dataclasses.replace(train, lr=lr), start_steps.get(name, 0))
            costs[name] = sum(point.values())
    return costs


def run_point(session: Session, forecast: ForecastSettings, lora: LoRASettings, train: TrainSettings,
              chunks, key: dict, on_step=None) -> dict:
    """Train, forecast and save one grid point (``point.json`` last: its presence means the point is finished);
    charge its forecast. Returns the point record."""
    name = point_name(train.lr, lora.rank)
    out = session.out / "points" / name
    if out.exists() and checkpoint_step(out / "training") == 0:
        shutil.rmtree(out)  # killed before its first checkpoint: nothing was kept or charged, start it again
    out.mkdir(parents=True, exist_ok=True)
    print(f"\n=== {name}: lr {train.lr:g}, rank {lora.rank}, {train.max_steps} steps ===")
    evaluation, summary = recipes.train_and_forecast(session, forecast, lora, train, chunks, out,
                                                     f"{train.context_length}-token windows", on_step=on_step,
                                                     export=False)
    evaluation.forecaster = name
    losses = [e["loss"] for e in read_log(out / "training" / "log.jsonl") if e["kind"] == "train"]
    record = {"settings": key, "lr": train.lr, "rank": lora.rank, "evaluation": dataclasses.asdict(evaluation),
              "training": {k: summary[k] for k in ("steps", "epochs", "val_loss", "best_val_loss", "train_flops",
                                                   "eval_flops", "seconds_this_session")},
              "train_loss_last_10": float(np.mean(losses[-10:])) if losses else None}
    path = write_json(out / "point.json", record)
    session.charge("generate", evaluation.flops, path, what=f"forecast {name}")
    return record


def table_rows(records: list[dict]) -> list[dict]:
    """One flat row per point for grid.csv: settings, losses, per-species forecast metrics, FLOPs."""
    rows = []
    for r in records:
        m = r["evaluation"]["metrics"]
        rows.append({"lr": r["lr"], "rank": r["rank"], "steps": r["training"]["steps"],
                     "train_loss_last_10": r["train_loss_last_10"], "val_loss": r["training"]["val_loss"],
                     "forecast_mse": forecast_mse(m), "prey_mse": m["prey"]["mse"], "predator_mse": m["predator"]["mse"],
                     "prey_mae": m["prey"]["mae"], "predator_mae": m["predator"]["mae"], "prey_r2": m["prey"]["r2"],
                     "predator_r2": m["predator"]["r2"], "parsed_fraction": r["evaluation"]["parsed_fraction"],
                     "flops": r["training"]["train_flops"] + r["training"]["eval_flops"] + r["evaluation"]["flops"]})
    return rows


def forecast_mse(metrics: dict) -> float:
    """The selection score: mean over the two species of the forecast MSE (data units²)."""
    return float((metrics["prey"]["mse"] + metrics["predator"]["mse"]) / 2)


def selection(rows: list[dict]) -> dict:
    """The winner by validation forecast MSE, the winner by validation loss, and whether the two criteria rank the
    grid the same way (Spearman's rank correlation between them, scipy)."""
    from scipy.stats import spearmanr

    by_forecast = min(rows, key=lambda r: r["forecast_mse"])
    by_loss = min(rows, key=lambda r: r["val_loss"])
    mse, loss = [r["forecast_mse"] for r in rows], [r["val_loss"] for r in rows]
    varied = len(rows) > 2 and len(set(mse)) > 1 and len(set(loss)) > 1
    rho = float(spearmanr(mse, loss).statistic) if varied else None
    return {"rule": "lowest validation forecast MSE (mean of prey and predator MSE)",
            "chosen": {"lr": by_forecast["lr"], "rank": by_forecast["rank"]},
            "chosen_by_val_loss": {"lr": by_loss["lr"], "rank": by_loss["rank"]},
            "same_winner": by_forecast is by_loss, "spearman_forecast_mse_vs_val_loss": rho}


def write_outputs(session: Session, rows: list[dict], lrs, ranks, untrained: Evaluation, scale: str) -> None:
    """grid.csv, heat maps of validation loss and forecast MSE, the training curves of every point."""
    with open(session.out / "grid.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    cell = {(r["lr"], r["rank"]): r for r in rows}
    for key, label in (("val_loss", "validation loss (nats/token)"), ("forecast_mse", "forecast MSE")):
        values = np.array([[cell[(lr, k)][key] if (lr, k) in cell else np.nan for k in ranks] for lr in lrs],
                          dtype=float)
        reference = untrained.validation_loss if key == "val_loss" else forecast_mse(untrained.metrics)
        plot_heatmap(session.out / f"heatmap_{key}.png", values, [f"{lr:g}" for lr in lrs], list(ranks),
                     "learning rate", "LoRA rank", f"{label}; untrained {reference:.4g}\n{scale}",
                     fmt=".4f" if key == "val_loss" else ".4g")
    plot_training_curves(session.out / "loss_curves.png",
                         {f"lr {r['lr']:g}, r={r['rank']}": session.out / "points" / point_name(r["lr"], r["rank"])
                          / "training" / "log.jsonl" for r in rows}, f"training loss, {scale}")


def markdown(rows: list[dict], untrained: Evaluation, chosen: dict) -> str:
    """The grid as a Markdown table, the untrained model first, the chosen point in bold."""
    fmt = recipes.format_number
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


def main(argv=None, on_step=None) -> int:
    """Run the grid. ``on_step(point_name, step)`` is called after every training step (tests simulate a kill)."""
    preset = settings.preset_name(argv, PRESETS)
    s = settings.parse(build_parser(preset), argv)
    lrs, ranks = grid_axis(s["lrs"], float, "--lrs"), grid_axis(s["ranks"], int, "--ranks")
    forecast, lora, train = s["forecast"], s["lora"], s["train"]
    session = Session(STAGE, s["run"], s["data"])
    indices, _, contexts, truth = session.dataset.forecast_set(forecast)
    chunks = recipes.training_chunks(session, train)
    sizes = recipes.SessionSizes(session)

    key = settings.as_record(run=session.run, data=session.data_settings, forecast=forecast, lora=lora, train=train)
    key["run"] = {k: key["run"][k] for k in ("model", "precision", "seed")}
    done, start_steps = {}, {}
    for lr in lrs:
        for rank in ranks:
            name = point_name(lr, rank)
            path = session.out / "points" / name / "point.json"
            if path.is_file():
                record = json.loads(path.read_text())
                if record["settings"] != key:
                    raise UsageError(f"{path} was made with other settings than these; use another --out or "
                                     "--overwrite")
                done[name], start_steps[name] = record, None
            elif (session.out / "points" / name / "training").exists():
                start_steps[name] = checkpoint_step(session.out / "points" / name / "training")
    untrained_path = session.out / "untrained.json"
    reuse = session.run.resume and untrained_path.is_file()
    planned = session.check(plan(session.model.config, sizes, forecast, lora, train, lrs, ranks, start_steps,
                                 untrained=not reuse))
    scale = (f"{train.max_steps} steps, batch {train.batch_size} × {train.context_length} tokens, "
             f"{train.loss_vocabulary} loss; {len(indices)} {forecast.split} trajectories "
             f"{forecast.context_steps}→{forecast.horizon}; {session.weights}")

    untrained = recipes.untrained_evaluation(session, forecast, "base model", untrained_path, session.run.resume)
    if untrained.validation_loss is None:  # once for the whole grid, on the same validation subset as the points
        idx = validation_subset(len(chunks[1]), train.eval_batches * train.batch_size, session.run.seed)
        val = type(chunks[1])(chunks[1].input_ids[idx], chunks[1].attention_mask[idx])
        untrained.validation_loss, eval_flops = validation_loss(session.model, val, train.batch_size,
                                                                session.precision, progress=False)
        saved = json.loads(untrained_path.read_text())
        saved["untrained"]["validation_loss"] = untrained.validation_loss
        saved["validation_loss_flops"] = eval_flops
        write_json(untrained_path, saved)
        session.charge("eval", eval_flops, untrained_path, what="untrained validation loss")

    records = []
    for lr in lrs:
        for rank in ranks:
            name = point_name(lr, rank)
            if name in done:
                print(f"{name}: finished earlier, read back")
                records.append(done[name])
                continue
            point_train, point_lora = dataclasses.replace(train, lr=lr), dataclasses.replace(lora, rank=rank)
            records.append(run_point(session, forecast, point_lora, point_train, chunks, key,
                                     on_step=(lambda step, n=name: on_step(n, step)) if on_step else None))

    rows = table_rows(records)
    chosen = selection(rows)
    write_outputs(session, rows, lrs, ranks, untrained, scale)
    table = markdown(rows, untrained, chosen["chosen"])
    _, _, persistence = evaluate(Persistence(), contexts, truth, forecast.split, indices)
    results = session.results(forecast=forecast, lora=lora, train=train)
    results.settings["grid"] = {"lrs": list(lrs), "ranks": list(ranks), "preset": preset}
    results.evaluations = {"untrained": untrained, **{point_name(r["lr"], r["rank"]): Evaluation(**r["evaluation"])
                                                      for r in records}, "persistence": persistence}
    results.flops["planned"] = planned
    results.add_flops("generate", untrained.flops + sum(r["evaluation"]["flops"] for r in records))
    results.add_flops("train", sum(r["training"]["train_flops"] for r in records))
    results.add_flops("eval", json.loads(untrained_path.read_text())["validation_loss_flops"]
                      + sum(r["training"]["eval_flops"] for r in records))
    results.details.update(grid=rows, selection=chosen, scale=scale, table_markdown=table)
    write_json(session.out / "grid.json", {"scale": scale, "weights": session.weights, "selection": chosen,
                                           "rows": rows})
    verdict = ("Validation loss and forecast MSE pick the same point." if chosen["same_winner"] else
               f"Validation loss would pick lr {chosen['chosen_by_val_loss']['lr']:g}, rank "
               f"{chosen['chosen_by_val_loss']['rank']} instead.")
    recipes.write_run_readme(
        session.out / "README.md", "LoRA grid: learning rate × rank", recipes.command_line("experiments.sweep", argv),
        f"{scale}.\n\nSelection: {chosen['rule']} → lr {chosen['chosen']['lr']:g}, rank {chosen['chosen']['rank']}. "
        f"{verdict} Spearman ρ(forecast MSE, validation loss) = "
        f"{recipes.format_number(chosen['spearman_forecast_mse_vs_val_loss'], '.2f')}.\n\n{table}\n")
    session.finish(results)  # every part was charged as it finished
    print("\n" + table + f"\n\nchosen: lr {chosen['chosen']['lr']:g}, rank {chosen['chosen']['rank']} ({verdict})")
    print(f"wrote {session.out}/results.json, grid.csv, grid.json, heat maps, README.md")
    return 0


if __name__ == "__main__":
    settings.run_cli(main)
