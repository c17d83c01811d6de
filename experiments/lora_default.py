"""LoRA fine-tuning with the coursework's default hyperparameters (rank 4 on q_proj and v_proj, learning rate 1e-5,
batch size 4, context length 512), evaluated like ``experiments.baseline`` before and after. The coursework allows up
to 10,000 steps; the 1e17 plan (``experiments.flops``) gives this stage 1,000.

    python -m experiments.lora_default --model DIR --data FILE [--max-steps N] [--context-length L] [--limit N] …

Forecasts ``--limit`` validation trajectories with the untrained model, trains LoRA on the training trajectories'
LLMTIME text cut into ``--context-length`` token chunks (validation loss on a fixed subset of the validation chunks;
checkpoints; ``--resume``), then forecasts the same trajectories with the adapter. Writes under ``--out`` (default
``runs/lora_default``): results.json, README.md (the side-by-side table), untrained.json (reused by --resume),
training/ (log, loss curve, adapters, checkpoint), peft_adapter/ (PEFT format), per-trajectory CSVs and plots.
"""

from __future__ import annotations

from .lib import recipes, settings
from .lib.costs import lora_stage_cost
from .lib.session import Session

STAGE = "lora_default"
TRAIN_DEFAULTS = settings.TrainSettings(lr=1e-5, batch_size=4, context_length=512, max_steps=1_000, eval_every=250,
                                        eval_batches=8, checkpoint_every=250)
#: full scale (a GPU); the forecasts cover the whole validation split
DEFAULTS = {"train": TRAIN_DEFAULTS, "forecast": settings.ForecastSettings(gen_batch_size=100)}
#: this 2-core CPU: the scale of the committed LoRA runs (60 steps at context 256, 20 trajectories; ~11 min)
PRESETS = {"cpu": {"train": {"context_length": 256, "max_steps": 60, "eval_every": 30, "eval_batches": 4,
                             "checkpoint_every": 30},
                   "forecast": {"limit": 20}}}


def plan(config, sizes, forecast: settings.ForecastSettings, lora: settings.LoRASettings,
         train: settings.TrainSettings) -> dict[str, int]:
    """Planned FLOPs of the stage from scratch (the stage checks the same costs, from its checkpoint if resumed)."""
    return lora_stage_cost(config, sizes, forecast, lora, train)


def build_parser(preset: str | None = None):
    return settings.parser("python -m experiments.lora_default", __doc__.split("\n\n")[0], "run", "data", "forecast",
                           "lora", "train", defaults=settings.with_preset(DEFAULTS, PRESETS, preset),
                           forecast_batch_flag="--gen-batch-size", presets=PRESETS)


def main(argv=None) -> int:
    s = settings.parse(build_parser(settings.preset_name(argv, PRESETS)), argv)
    session = Session(STAGE, s["run"], s["data"], trains=True)
    if not session.is_main:  # under torchrun: ranks > 0 only take part in rank 0's training runs
        return recipes.follow(session)
    forecast, lora, train_settings = s["forecast"], s["lora"], s["train"]
    evaluations, summary, planned = recipes.run_lora(session, forecast, lora, train_settings,
                                                     f"{forecast.prompt} prompt")

    results = session.results(forecast=forecast, lora=lora, train=train_settings)
    results.evaluations = evaluations
    results.flops["planned"] = planned
    results.add_flops("generate", evaluations["untrained"].flops + evaluations["lora"].flops)
    results.add_flops("train", summary["train_flops"])
    results.add_flops("eval", summary["eval_flops"])
    table = recipes.evaluation_table(evaluations)
    results.details.update(training=summary, table_markdown=table)
    results.seconds["training_this_session"] = summary["seconds_this_session"]
    command = recipes.command_line("experiments.lora_default", argv)
    recipes.write_run_readme(
        session.out / "README.md", "LoRA, default hyperparameters", command,
        f"Rank {lora.rank} on {', '.join(lora.targets)}, lr {train_settings.lr:g}, batch {train_settings.batch_size}, "
        f"context {train_settings.context_length}, {summary['steps']} steps ({summary['epochs']:.2f} epochs of "
        f"{summary['train_chunks']} chunks); forecasts of {len(evaluations['lora'].trajectories)} {forecast.split} "
        f"trajectories ({forecast.context_steps} steps observed, {forecast.horizon} forecast); validation loss on "
        f"{summary['val_chunks_evaluated']} fixed validation chunks. Weights: {session.weights}.\n\n{table}\n")
    session.finish(results, charge={"generate": evaluations["lora"].flops})
    print("\n" + table)
    print(f"\nFLOPs {results.flops['total']:.3e}; wrote {session.out}/results.json, README.md, training/, "
          "peft_adapter/")
    return 0


if __name__ == "__main__":
    settings.run_cli(main)
