"""The learning-rate × LoRA-rank grid (coursework 3b): every point trained for the same number of steps on one
loaded base model, scored by validation loss and by forecasts of the same validation trajectories.

    python -m experiments.sweep --model DIR --data FILE [--preset cpu] [--lrs 1e-5,5e-5,1e-4] [--ranks 2,4,8] [--resume]

Selection rule: the point with the lowest validation forecast MSE (mean of the prey and predator MSE) wins — the
default LoRA run lowered token loss while its forecasts got worse, so token loss alone is not trusted; the table
reports both and says whether they rank the grid the same way. Resumable (``--resume``): finished points are read
back, an interrupted point continues from its checkpoint exactly. Writes under ``--out`` (default ``runs/sweep``):
results.json, grid.csv, grid.json, heatmap_val_loss.png, heatmap_forecast_mse.png, loss_curves.png, README.md,
untrained.json and one directory per point (training/, per-trajectory CSV, forecast plot, point.json).

Over many jobs: each point is an independent job. ``--shard I/N`` (or, when set, SLURM's SLURM_ARRAY_TASK_ID −
SLURM_ARRAY_TASK_MIN of SLURM_ARRAY_TASK_COUNT) runs only points I, I+N, I+2N … of the grid; shards share one
``--out`` and one ``--ledger`` (its file lock serialises their charges) and join that directory as ``--resume``
would: finished points are read back, interrupted ones continue. A point is run by one job at a time: a job holds
the lock file of every point it has to run (``points/<name>/.lock``), so a second copy of a running shard is refused
at once, before it spends anything. Then ``--collect`` computes the untrained reference
once and writes the same table, heat maps and results.json as one process, or stops naming the unfinished points.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from .lib import cli, defaults, plans, points, runs, studies, tables
from .lib.errors import UsageError
from .lib.evaluation import write_csv
from .lib.loader import emulation
from .lib.plots import plot_heatmap, plot_training_curves
from .lib.points import forecast_mse
from .lib.results import Evaluation, write_json
from .lib.tables import format_number
from .lib.session import Session
from .lib.settings import ForecastSettings, LoRASettings, TrainSettings

STAGE = "sweep"
LRS, RANKS = defaults.GRID_LRS, defaults.GRID_RANKS
DEFAULTS, PRESETS = defaults.DEFAULTS[STAGE], defaults.PRESETS[STAGE]
plan = plans.sweep


def build_parser(preset: str | None = None):
    p = cli.parser("python -m experiments.sweep", __doc__.split("\n\n")[0], "run", "data", "forecast", "lora",
                   "train", defaults=cli.with_preset(DEFAULTS, PRESETS, preset), presets=PRESETS,
                   exclude=("lr", "rank"))
    p.add_argument("--lrs", default=",".join(f"{x:g}" for x in LRS), help="learning rates (default 1e-5,5e-5,1e-4)")
    p.add_argument("--ranks", default=",".join(map(str, RANKS)), help="LoRA ranks (default 2,4,8)")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="run only points I, I+N, … of the grid (0-based) in an --out shared with the other shards "
                        "(default: SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT when set); then --collect")
    p.add_argument("--collect", action="store_true",
                   help="assemble the table, heat maps and results.json from the shards' finished points in --out")
    return p


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


def main(argv=None, on_step=None) -> int:
    """Run the grid. ``on_step(point_name, step)`` is called after every training step (tests simulate a kill)."""
    preset = cli.preset_name(argv, PRESETS)
    s = cli.parse(build_parser(preset), argv)
    lrs, ranks = points.grid_axis(s["lrs"], float, "--lrs"), points.grid_axis(s["ranks"], int, "--ranks")
    forecast, lora, train, run = s["forecast"], s["lora"], s["train"], s["run"]
    shard = None if s["collect"] else shard_of(s["shard"])
    if s["collect"] and s["shard"]:
        raise UsageError("--collect assembles every shard's points: it takes no --shard")
    join = shard is not None or s["collect"]
    if join and run.overwrite:
        raise UsageError("--overwrite would delete the other shards' points: remove --out by hand to start again")
    study = points.grid_points(lora, train, lrs, ranks)  # refuses a --lora-alpha absurd at some rank, before any work
    session = Session(STAGE, dataclasses.replace(run, resume=True) if join else run, s["data"], trains=True,
                      join=join, progress=train.progress, defines={"forecast": forecast, "lora": lora, "train": train},
                      varies=points.GRID_FIELDS)  # not --lrs/--ranks: each point is its own run, a grid may grow
    with emulation(session.device, session.precision):  # bf16 emulated where this CPU has none
        if not session.is_main:  # under torchrun: ranks > 0 only take part in rank 0's training runs
            return runs.follow(session.model)
        key = points.study_key(session.run_key(), session.data_settings, forecast, lora, train, points.GRID_FIELDS)
        if shard is not None:
            mine = study[shard[0]::shard[1]]
            print(f"shard {shard[0]}/{shard[1]}: points {', '.join(p.name for p in mine) or 'none'} of {len(study)}")
            studies.run_all(session, forecast, mine, key, on_step=on_step, reference=False)
            print(f"shard {shard[0]}/{shard[1]} done; when every shard is, assemble the table with --collect")
            return 0
        if s["collect"]:
            done = points.scan(session.out, session.precision, study, key, session.join)[0]
            missing = [p.name for p in study if p.name not in done]
            if missing:
                raise UsageError(f"--collect: {len(missing)} of {len(study)} points are not finished in "
                                 f"{session.out}: {', '.join(missing)} (run their shards first)")
        records, untrained, _, planned = studies.run_all(session, forecast, study, key, on_step=on_step)
    write_results(session, records, untrained, planned, forecast, lora, train, lrs, ranks,
                  {"preset": preset, "collected_from_shards": s["collect"]}, argv)
    return 0


def write_results(session: Session, records: list[dict], untrained: Evaluation, planned: int,
                  forecast: ForecastSettings, lora: LoRASettings, train: TrainSettings, lrs, ranks, provenance: dict,
                  argv) -> None:
    """The grid's table (CSV, JSON, Markdown), selection, heat maps, README.md and results.json."""
    indices = session.dataset.forecast_set(forecast)[0]
    scale = (f"{train.max_steps} steps, batch {train.batch_size} × {train.context_length} tokens, "
             f"{train.loss_vocabulary} loss; {len(indices)} {forecast.split} trajectories "
             f"{forecast.context_steps}→{forecast.horizon}; {session.weights}")
    rows = studies.table_rows(records)
    chosen = selection(rows)
    write_plots(session.out, rows, lrs, ranks, untrained, scale)
    table = grid_table(rows, untrained, chosen["chosen"])
    results, paired_md = studies.study_results(session, forecast, records, untrained, planned,
                                               points.GRID_FIELDS, lora=lora, train=train)
    results.settings["grid"] = {"lrs": list(lrs), "ranks": list(ranks), **provenance}
    results.details.update(grid=rows, selection=chosen, scale=scale, table_markdown=table)
    write_json(session.out / "grid.json", {"scale": scale, "weights": session.weights, "selection": chosen,
                                           "rows": rows})
    verdict = ("Validation loss and forecast MSE pick the same point." if chosen["same_winner"] else
               f"Validation loss would pick lr {chosen['chosen_by_val_loss']['lr']:g}, rank "
               f"{chosen['chosen_by_val_loss']['rank']} instead.") + tables.tie_note(chosen)
    tables.write_run_readme(
        session.out / "README.md", "LoRA grid: learning rate × rank", tables.command_line("experiments.sweep", argv),
        f"{scale}.\n\nSelection: {chosen['rule']} → lr {chosen['chosen']['lr']:g}, rank {chosen['chosen']['rank']}. "
        f"{verdict} Spearman ρ(forecast MSE, validation loss) = "
        f"{tables.format_number(chosen['spearman_forecast_mse_vs_val_loss'], '.2f')}.\n\n{table}\n\n{paired_md}\n")
    session.finish(results)  # every part was charged as it finished
    print("\n" + table + f"\n\nchosen: lr {chosen['chosen']['lr']:g}, rank {chosen['chosen']['rank']} ({verdict})")
    print(f"wrote {session.out}/results.json, grid.csv, grid.json, heat maps, README.md")


if __name__ == "__main__":
    cli.run_cli(main)
