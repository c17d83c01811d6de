"""LoRA fine-tuning with the coursework's default hyperparameters (rank 4 on q_proj and v_proj, learning rate 1e-5,
batch size 4, context length 512, up to 10,000 steps), evaluated like ``experiments.baseline`` before and after.

    python -m experiments.lora_default --model DIR --data FILE [--max-steps N] [--context-length L] [--limit N] …

Forecasts ``--limit`` validation trajectories with the untrained model, trains LoRA on the training trajectories'
LLMTIME text cut into ``--context-length`` token chunks (validation loss on a fixed subset of the validation chunks;
checkpoints; ``--resume``), then forecasts the same trajectories with the adapter. Writes under ``--out`` (default
``runs/lora_default``): results.json, README.md (the side-by-side table), untrained.json (reused by --resume),
training/ (log, loss curve, adapters, checkpoint), peft_adapter/ (PEFT format), per-trajectory CSVs and plots.
"""

from __future__ import annotations

import dataclasses
import json

from lora import export_peft, remove_lora

from . import recipes, settings
from .costs import training_cost
from .classical_forecasters import Persistence
from .evaluation import evaluate
from .results import Evaluation, write_json
from .session import Session
from .training import read_log, train, validation_subset

STAGE = "lora_default"
TRAIN_DEFAULTS = settings.TrainSettings(lr=1e-5, batch_size=4, context_length=512, max_steps=10_000, eval_every=500,
                                        eval_batches=8, checkpoint_every=500)


def build_parser():
    return settings.parser("python -m experiments.lora_default", __doc__.split("\n\n")[0], "run", "data", "forecast",
                           "lora", "train", defaults={"train": TRAIN_DEFAULTS}, forecast_batch_flag="--gen-batch-size")


def run_lora(session: Session, forecast: settings.ForecastSettings, lora: settings.LoRASettings,
             train_settings: settings.TrainSettings, title: str) -> tuple[dict, dict, int]:
    """Untrained forecast -> LoRA training -> trained forecast on the session's model; the adapters are removed
    again at the end. Returns ``({"untrained", "lora", "persistence"}: Evaluation, training summary, planned FLOPs)``.
    The plan is checked before anything is spent; the untrained evaluation is saved (and reused by --resume)."""
    out, run = session.out, session.run
    indices, _, contexts, truth = session.dataset.forecast_set(forecast)
    train_chunks = recipes.token_chunks(session, "train", train_settings.train_limit, train_settings.context_length,
                                        train_settings.stride)
    val_chunks = recipes.token_chunks(session, "validation", None, train_settings.context_length,
                                      train_settings.stride)
    print(f"chunks: {len(train_chunks)} training, {len(val_chunks)} validation; context "
          f"{train_settings.context_length}, stride {train_settings.stride or train_settings.context_length}")

    untrained_path = out / "untrained.json"
    key = settings.as_record(run=run, data=session.data_settings, forecast=forecast)
    key["run"] = {k: key["run"][k] for k in ("model", "precision", "seed")}
    saved = json.loads(untrained_path.read_text()) if untrained_path.is_file() else None
    reuse = bool(run.resume and saved and saved["settings"] == key)
    training_dir = out / "training"
    start_step = 0
    if run.resume and (training_dir / "checkpoint" / "state.json").is_file():
        start_step = json.loads((training_dir / "checkpoint" / "state.json").read_text())["loop"]["step"]
    val_rows = len(validation_subset(len(val_chunks), train_settings.eval_batches * train_settings.batch_size,
                                    run.seed))
    untrained_plan = 0 if reuse else recipes.planned_forecast(session, contexts, forecast)
    planned = session.check({
        "untrained forecast": untrained_plan,
        "training": training_cost(session.model.config, train_settings, lora, val_rows, start_step),
        "trained forecast": recipes.planned_forecast(session, contexts, forecast, lora),
    })

    if reuse:
        untrained = Evaluation(**saved["untrained"])
        print(f"reusing the untrained evaluation in {untrained_path}")
    else:
        forecaster = recipes.llm_forecaster(session, forecast, "untrained")
        untrained = recipes.forecast_and_save(session, forecaster, forecast, "untrained", f"untrained, {title}",
                                              write_texts=False)
        write_json(untrained_path, {"settings": key, "untrained": dataclasses.asdict(untrained)})
        session.charge("generate", untrained.flops, untrained_path, what="untrained forecast")

    summary = train(session.model, train_chunks, val_chunks, train_settings, training_dir, lora=lora, seed=run.seed,
                    stage=session.stage, precision=session.precision, ledger=session.ledger,
                    resume=run.resume and training_dir.exists(), force=run.force)
    evals = [e for e in read_log(training_dir / "log.jsonl") if e["kind"] == "eval"]
    untrained.validation_loss = evals[0]["val_loss"] if evals and evals[0]["step"] == 0 else None
    export_peft(session.model, out / "peft_adapter", base_model_name_or_path=session.weights)

    forecaster = recipes.llm_forecaster(session, forecast, "lora")
    trained = recipes.forecast_and_save(session, forecaster, forecast, "trained",
                                        f"LoRA r={lora.rank}, {summary['steps']} steps, {title}", write_texts=False)
    trained.validation_loss = summary["val_loss"]
    remove_lora(session.model)
    _, _, persistence = evaluate(Persistence(), contexts, truth, forecast.split, indices)
    return {"untrained": untrained, "lora": trained, "persistence": persistence}, summary, planned


def main(argv=None) -> int:
    s = settings.parse(build_parser(), argv)
    session = Session(STAGE, s["run"], s["data"])
    forecast, lora, train_settings = s["forecast"], s["lora"], s["train"]
    evaluations, summary, planned = run_lora(session, forecast, lora, train_settings, f"{forecast.prompt} prompt")

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
