"""The context-length study (coursework 3b): the chosen learning rate and rank trained at several token-window
lengths for the same number of steps, forecasting the same validation trajectories.

    python -m experiments.context_length --model DIR --data FILE [--from-sweep runs/sweep] [--contexts 128,512,768]
                                         [--preset cpu] [--resume]

The learning rate and rank come from ``--lr`` / ``--rank`` if given, else from the sweep's selection in
``--from-sweep`` (its results.json), else the defaults below. Equal steps mean unequal compute: a step at 768 tokens
costs about six times one at 128, so the table gives each run's FLOPs beside its scores and the forecast MSE per
PFLOP of training. The per-horizon error curves test the explanation offered for the default run — that short
windows teach only short-range continuation: if so, the shortest window's error grows fastest with the horizon.
Resumable like the sweep. Writes under ``--out`` (default ``runs/context_length``): results.json, contexts.csv,
contexts.json, horizon_mae.png, loss_curves.png, README.md and one directory per context.
"""

from __future__ import annotations

from pathlib import Path

from .lib import cli, defaults, plans, points, runs, studies, tables
from .lib.evaluation import write_csv
from .lib.loader import emulation
from .lib.plots import plot_horizon_errors, plot_training_curves
from .lib.results import Evaluation, write_json
from .lib.run_directory import check_run_of
from .lib.session import Session
from .lib.points import forecast_mse, grid_axis

STAGE = "context_length"
CONTEXTS = defaults.CONTEXT_LENGTHS
DEFAULTS, PRESETS = defaults.DEFAULTS[STAGE], defaults.PRESETS[STAGE]
plan = plans.context_length


def build_parser(preset: str | None = None):
    p = cli.parser("python -m experiments.context_length", __doc__.split("\n\n")[0], "run", "data", "forecast",
                   "lora", "train", defaults=cli.with_preset(DEFAULTS, PRESETS, preset), presets=PRESETS,
                   exclude=("lr", "rank"))
    points.add_choice_options(p, DEFAULTS)
    p.add_argument("--contexts", default=",".join(map(str, CONTEXTS)), help="window lengths (default 128,512,768)")
    return p


def markdown(rows: list[dict], untrained: Evaluation, untrained_losses: dict) -> str:
    fmt = tables.format_number
    lines = ["| context | steps | training PFLOPs | val loss (untrained) | forecast MSE | prey MSE | predator MSE | "
             "prey R² | predator R² | parsed |", "| ---: |" + " ---: |" * 9]
    for r in rows:
        lines.append(f"| {r['context_length']} | {r['steps']} | {r['train_flops'] / 1e15:.3f} | {fmt(r['val_loss'])} "
                     f"({fmt(untrained_losses.get(r['context_length']))}) | {fmt(r['forecast_mse'])} | "
                     f"{fmt(r['prey_mse'])} | {fmt(r['predator_mse'])} | {fmt(r['prey_r2'], '.3f')} | "
                     f"{fmt(r['predator_r2'], '.3f')} | {r['parsed_fraction']:.0%} |")
    lines.append(f"| untrained | 0 | 0 | – | {fmt(forecast_mse(untrained.metrics))} | "
                 f"{fmt(untrained.metrics['prey']['mse'])} | {fmt(untrained.metrics['predator']['mse'])} | "
                 f"{fmt(untrained.metrics['prey']['r2'], '.3f')} | {fmt(untrained.metrics['predator']['r2'], '.3f')} "
                 f"| {untrained.parsed_fraction:.0%} |")
    return "\n".join(lines)


def main(argv=None, on_step=None) -> int:
    preset = cli.preset_name(argv, PRESETS)
    s = cli.parse(build_parser(preset), argv)
    contexts = grid_axis(s["contexts"], int, "--contexts", field="context_length")  # each >= 2 tokens, one wording
    if s["from_sweep"]:  # a sweep's run, by its run record, before anything in it is read
        check_run_of(Path(s["from_sweep"]).expanduser(), "sweep", "--from-sweep")
    picked = points.chosen(s["from_sweep"], "sweep")
    lora, train = points.choose(s, picked, DEFAULTS)
    cli.check_positions(s["run"].model, contexts, "--contexts")  # before any work: the model's config.json only
    lr, rank, forecast = train.lr, lora.rank, s["forecast"]
    session = Session(STAGE, s["run"], s["data"], trains=True, progress=s["train"].progress,
                      defines={"forecast": forecast, "lora": lora, "train": train},
                      varies=points.CONTEXT_FIELDS)  # not --contexts: each context is its own run, the study may grow
    with emulation(session.device, session.precision):  # bf16 emulated where this CPU has none
        if not session.is_main:  # under torchrun: ranks > 0 only take part in rank 0's training runs
            return runs.follow(session.model)
        indices = session.dataset.forecast_set(forecast)[0]
        study = points.context_points(lora, train, contexts)
        key = points.study_key(session.run_key(), session.data_settings, forecast, lora, train, points.CONTEXT_FIELDS)
        records, untrained, untrained_losses, planned = studies.run_all(session, forecast, study, key, on_step=on_step)

    rows = studies.table_rows(records)
    for row, record in zip(rows, records):
        row["untrained_val_loss"] = untrained_losses[row["context_length"]]
        row["forecast_mse_gain_per_pflop"] = (forecast_mse(untrained.metrics) - row["forecast_mse"]) / (
            row["train_flops"] / 1e15)
        row["horizon_growth"] = tables.horizon_growth(record["evaluation"]["metrics"])
    best = min(rows, key=lambda r: r["forecast_mse"])
    selection = {"rule": "lowest validation forecast MSE (mean of prey and predator MSE) at equal steps",
                 "chosen": {"lr": lr, "rank": rank, "context_length": best["context_length"]}}
    scale = (f"lr {lr:g}, rank {rank}, {train.max_steps} steps at batch {train.batch_size}, {train.loss_vocabulary} "
             f"loss; {len(indices)} {forecast.split} trajectories {forecast.context_steps}→{forecast.horizon}; "
             f"{session.weights}")
    write_csv(session.out / "contexts.csv", rows)
    curves = {"untrained": untrained.metrics, **{f"context {r['context_length']}": r["evaluation"]["metrics"]
                                                  for r in records}}
    plot_horizon_errors(session.out / "horizon_mae.png", curves, f"forecast MAE by step; {scale}")
    plot_training_curves(session.out / "loss_curves.png",
                         {f"context {r['context_length']}": session.out / "points" / r["name"] / "training" /
                          "log.jsonl" for r in records}, f"training loss; {scale}")
    table = markdown(rows, untrained, untrained_losses)
    results, paired_md = studies.study_results(session, forecast, records, untrained, planned,
                                               points.CONTEXT_FIELDS, lora=lora, train=train)
    results.settings["study"] = {"contexts": list(contexts), "preset": preset, "from_sweep": picked or None}
    results.details.update(contexts=rows, selection=selection, scale=scale, table_markdown=table,
                           untrained_val_loss=untrained_losses)
    write_json(session.out / "contexts.json", {"scale": scale, "weights": session.weights, "selection": selection,
                                               "rows": rows})
    growth = ", ".join(f"{r['context_length']}: {r['horizon_growth']:.2f}" for r in rows)
    tables.write_run_readme(
        session.out / "README.md", "LoRA context-length study", tables.command_line("experiments.context_length",
                                                                                    argv),
        f"{scale}.\n\n{table}\n\nBest at equal steps: context {best['context_length']}. Error growth with the "
        f"horizon (MAE over the last quarter of the steps / the first quarter): {growth}.\n\n{paired_md}\n")
    session.finish(results)
    print("\n" + table + f"\n\nbest at equal steps: context {best['context_length']}; horizon growth {growth}")
    print(f"wrote {session.out}/results.json, contexts.csv, contexts.json, horizon_mae.png, README.md")
    return 0


if __name__ == "__main__":
    cli.run_cli(main)
