"""The final run (coursework 3c): the chosen configuration trained with early stopping on the validation loss,
checkpoints and exact resume, then evaluated once on the test trajectories beside the untrained model and the
classical forecasters (orders chosen on the validation split), on exactly the same trajectories.

    python -m experiments.final --model DIR --data FILE [--from-sweep runs/sweep] [--from-context runs/context_length]
                                [--preset cpu] [--resume]

The learning rate and rank come from ``--lr`` / ``--rank``, else the sweep's selection (``--from-sweep``), else the
defaults below; the context length from ``--context-length``, else the context study's (``--from-context``), else the
default. With ``--restore-best`` (on by default here) the adapter of the lowest validation loss is the one evaluated.
Writes under ``--out`` (default ``runs/final``): results.json, README.md (the table), horizon_mae.png,
horizon_mse.png, forecasts_*.png, per-trajectory CSVs, untrained.json, training/ (log, checkpoint, adapters, loss
curve) and peft_adapter/ (PEFT format).
"""

from __future__ import annotations

import dataclasses
import sys

from . import points, recipes, settings
from .classical_forecasters import validated_forecasters
from .costs import lora_stage_cost
from .plots import plot_horizon_errors
from .session import Session
from .settings import ForecastSettings, LoRASettings, TrainSettings, UsageError
from .training import checkpoint_step, read_log

STAGE = "final"
#: full scale (a GPU): up to 3,000 steps at batch 4 × 768 tokens, stopping after 5 evaluations without a new best
#: validation loss; priced at rank 8 and replaced by the sweep's and the context study's choices when known
DEFAULTS = {
    "train": TrainSettings(lr=1e-4, batch_size=4, context_length=768, max_steps=3_000, eval_every=100,
                           eval_batches=8, early_stop_patience=5, restore_best=True, checkpoint_every=100),
    "lora": LoRASettings(rank=8),
    "forecast": ForecastSettings(split="test", limit=None, gen_batch_size=100, plots=4),
}
#: this 2-core CPU: up to 1,000 steps at batch 4 × 512 tokens with the numeric-alphabet loss (several sittings:
#: --resume continues from the last checkpoint)
PRESETS = {"cpu": {"train": {"context_length": 512, "max_steps": 1_000, "eval_batches": 4, "checkpoint_every": 25,
                             "loss_vocabulary": "numeric"},
                   "forecast": {"gen_batch_size": 25}}}


def build_parser(preset: str | None = None):
    p = settings.parser("python -m experiments.final", __doc__.split("\n\n")[0], "run", "data", "forecast", "lora",
                        "train", defaults=settings.with_preset(DEFAULTS, PRESETS, preset),
                        forecast_batch_flag="--gen-batch-size", presets=PRESETS, exclude=("lr", "rank"))
    points.add_choice_options(p, DEFAULTS)
    p.add_argument("--from-context", default=None,
                   help="context-length study directory whose selection gives --context-length")
    p.add_argument("--orders", default=",".join(map(str, range(1, 21))),
                   help="AR/VAR orders to choose from on the validation split (default 1..20)")
    return p


def plan(config, sizes, forecast: ForecastSettings, lora: LoRASettings, train: TrainSettings,
         start_step: int = 0, untrained: bool = True) -> dict[str, int]:
    """Planned FLOPs: the untrained test forecast (if ``untrained``), training from ``start_step`` (an upper bound:
    early stopping ignored) and the trained test forecast."""
    return lora_stage_cost(config, sizes, forecast, lora, train, start_step, untrained)


def main(argv=None, on_step=None) -> int:
    preset = settings.preset_name(argv, PRESETS)
    p = build_parser(preset)
    s = settings.parse(p, argv)
    picked = {**points.chosen(s["from_sweep"], "sweep"), **points.chosen(s["from_context"], "context_length")}
    words = sys.argv[1:] if argv is None else argv
    explicit_context = any(a == "--context-length" or a.startswith("--context-length=") for a in words)
    lora, train = points.choose(s, picked, DEFAULTS)
    if not explicit_context and "context_length" in picked:
        train = dataclasses.replace(train, context_length=picked["context_length"])
        train.validate()
    orders = sorted({int(x) for x in s["orders"].split(",") if x.strip().isdigit()})
    forecast = s["forecast"]
    if not orders or orders[0] < 1 or 3 * orders[-1] + 2 > forecast.context_steps:
        raise UsageError(f"--orders {s['orders']!r}: integers >= 1 with 3p + 2 <= --context-steps "
                         f"{forecast.context_steps}")
    session = Session(STAGE, s["run"], s["data"], trains=True)
    if not session.is_main:  # under torchrun: ranks > 0 only take part in rank 0's training runs
        return recipes.follow(session)
    ds = session.dataset
    indices, _, contexts, truth = ds.forecast_set(forecast)
    chunks = recipes.training_chunks(session, train)
    untrained_path = session.out / "untrained.json"
    reuse = session.run.resume and untrained_path.is_file()
    start = checkpoint_step(session.out / "training") if session.run.resume else 0
    planned = session.check(plan(session.model.config, recipes.SessionSizes(session), forecast, lora, train, start,
                                 untrained=not reuse))

    untrained = recipes.untrained_evaluation(session, forecast, f"{forecast.split} split", untrained_path,
                                             session.run.resume)
    trained, summary = recipes.train_and_forecast(session, forecast, lora, train, chunks, session.out,
                                                  f"{forecast.split} split", on_step=on_step)
    evals = [e for e in read_log(session.out / "training" / "log.jsonl") if e["kind"] == "eval"]
    untrained.validation_loss = evals[0]["val_loss"] if evals and evals[0]["step"] == 0 else None
    if train.restore_best and summary["best_val_loss"] is not None:
        trained.validation_loss = summary["best_val_loss"]
    session.charge("generate", trained.flops, session.out / "per_trajectory_trained.csv", what="trained forecast")

    # the classical forecasters on the same trajectories, orders chosen on the validation split
    _, _, val_contexts, val_truth = ds.forecast_set(dataclasses.replace(forecast, split="validation", limit=None))
    dt = float(ds.data.time[1] - ds.data.time[0])
    forecasters, search = validated_forecasters(val_contexts, val_truth, orders, dt)
    evaluations = {"untrained": untrained, "lora": trained}
    for forecaster in forecasters:
        tag = forecaster.name.replace("(", "").replace(")", "").replace(" ", "_")
        evaluations[forecaster.name] = recipes.forecast_and_save(
            session, forecaster, dataclasses.replace(forecast, plots=0), tag, forecaster.name,
            settings=forecaster.settings(), weights=None)

    scale = (f"lr {train.lr:g}, rank {lora.rank}, batch {train.batch_size} × {train.context_length} tokens, "
             f"{summary['steps']} of {train.max_steps} steps{' (stopped early)' if summary['stopped_early'] else ''}"
             f", {train.loss_vocabulary} loss, adapter of step {summary['best_step'] if train.restore_best else summary['steps']}; "
             f"{len(indices)} {forecast.split} trajectories {forecast.context_steps}→{forecast.horizon}; "
             f"{session.weights}")
    curves = {name: e.metrics for name, e in evaluations.items()}
    for metric in ("mae", "mse"):
        plot_horizon_errors(session.out / f"horizon_{metric}.png", curves, f"{metric.upper()} by step; {scale}",
                            metric=metric)
    table = recipes.evaluation_table(evaluations)
    results = session.results(forecast=forecast, lora=lora, train=train)
    results.settings["chosen_from"] = {"preset": preset, **picked}
    results.evaluations = evaluations
    results.flops["planned"] = planned
    results.add_flops("generate", untrained.flops + trained.flops)
    results.add_flops("train", summary["train_flops"])
    results.add_flops("eval", summary["eval_flops"])
    results.details.update(training=summary, order_search=search, scale=scale, table_markdown=table)
    results.seconds["training_this_session"] = summary["seconds_this_session"]
    recipes.write_run_readme(session.out / "README.md", "Final LoRA run on the test split",
                             recipes.command_line("experiments.final", argv), f"{scale}.\n\n{table}\n")
    session.finish(results)
    print("\n" + table)
    print(f"\nFLOPs {results.flops['total']:.3e}; wrote {session.out}/results.json, README.md, training/, "
          "peft_adapter/, horizon_mae.png")
    return 0


if __name__ == "__main__":
    settings.run_cli(main)
