"""LoRA fine-tuning with the coursework's default hyperparameters (rank 4 on q_proj and v_proj, learning rate 1e-5,
batch size 4, context length 512), evaluated like ``experiments.baseline`` before and after. The coursework allows up
to 10,000 steps; the 1e17 plan (``experiments.flops``) gives this stage 1,000.

    python -m experiments.lora_default --model DIR --data FILE [--max-steps N] [--context-length L] [--limit N] …

Forecasts ``--limit`` validation trajectories with the untrained model, trains LoRA on the training trajectories'
LLMTIME text cut into ``--context-length`` token chunks (validation loss on a fixed subset of the validation chunks;
checkpoints; ``--resume``, refused before any work with another setting that defines the run:
``resume.RUN_DEFINING``), then forecasts the same trajectories with the adapter. Writes under ``--out`` (default
``runs/lora_default``): results.json, README.md (the side-by-side table), untrained.json (reused by --resume),
training/ (log, loss curve, adapters, checkpoint), peft_adapter/ (PEFT format), per-trajectory CSVs and plots.
"""

from __future__ import annotations

from .lib import cli, compare, defaults, forecast_files, plans, runs, tables
from .lib.loader import emulation
from .lib.session import Session

STAGE = "lora_default"
DEFAULTS, PRESETS = defaults.DEFAULTS[STAGE], defaults.PRESETS[STAGE]
plan = plans.lora_default


def build_parser(preset: str | None = None):
    return cli.parser("python -m experiments.lora_default", __doc__.split("\n\n")[0], "run", "data", "forecast",
                      "lora", "train", defaults=cli.with_preset(DEFAULTS, PRESETS, preset), presets=PRESETS)


def main(argv=None) -> int:
    s = cli.parse(build_parser(cli.preset_name(argv, PRESETS)), argv)
    forecast, lora, train_settings = s["forecast"], s["lora"], s["train"]
    # a --resume with other settings that define the run is refused here, before anything loads or is written
    session = Session(STAGE, s["run"], s["data"], trains=True, progress=train_settings.progress,
                      defines={"forecast": forecast, "lora": lora, "train": train_settings})
    with emulation(session.device, session.precision):  # bf16 emulated where this CPU has none
        if not session.is_main:  # under torchrun: ranks > 0 only take part in rank 0's training runs
            return runs.follow(session.model)
        evaluations, summary, planned = runs.run_lora(session, forecast, lora, train_settings,
                                                      f"{forecast.prompt} prompt")

    results = session.results(forecast=forecast, lora=lora, train=train_settings)
    results.evaluations = evaluations
    results.flops["planned"] = planned
    results.add_flops("generate", evaluations["untrained"].flops + evaluations["lora"].flops)
    results.add_flops("train", summary["train_flops"])
    results.add_flops("eval", summary["eval_flops"])
    table = tables.evaluation_table(evaluations)
    paired, paired_md = compare.against_untrained(session.out, {"lora": forecast_files.TRAINED_CSV},
                                                  forecast.horizon, session.run.seed)
    results.details.update(training=summary, table_markdown=table, vs_untrained=paired)
    results.seconds["training_this_session"] = summary["seconds_this_session"]
    command = tables.command_line("experiments.lora_default", argv)
    tables.write_run_readme(
        session.out / "README.md", "LoRA, default hyperparameters", command,
        f"Rank {lora.rank} on {', '.join(lora.targets)}, lr {train_settings.lr:g}, batch {train_settings.batch_size}, "
        f"context {train_settings.context_length}, {summary['steps']} steps ({summary['epochs']:.2f} epochs of "
        f"{summary['train_chunks']} chunks); forecasts of {len(evaluations['lora'].trajectories)} {forecast.split} "
        f"trajectories ({forecast.context_steps} steps observed, {forecast.horizon} forecast); validation loss on "
        f"{summary['val_chunks_evaluated']} fixed validation chunks. Weights: {session.weights}.\n\n{table}\n\n"
        f"{paired_md}\n")
    session.finish(results, charge={"generate": evaluations["lora"].flops})
    print("\n" + table)
    print(f"\nFLOPs {results.flops['total']:.3e}; wrote {session.out}/results.json, README.md, training/, "
          "peft_adapter/")
    return 0


if __name__ == "__main__":
    cli.run_cli(main)
