"""Recipes the stages are written with: each takes a :class:`session.Session` and plain settings, does one thing
(forecast and save, cut chunks, price a forecast, tabulate evaluations), and is reused by every stage."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from data import Chunks, chunk_texts
from lora import export_peft, remove_lora

from . import settings as settings_module
from .classical_forecasters import Persistence
from .costs import forecast_cost, training_cost
from .evaluation import (
    Forecaster, LLMForecaster, allowed_token_ids, evaluate, per_trajectory_rows, prompt_lengths, write_csv,
)
from .plots import plot_forecasts
from .results import Evaluation, write_json
from .session import Session
from .settings import ForecastSettings, LoRASettings, TrainSettings
from .training import checkpoint_step, read_log, train, validation_subset


def llm_forecaster(session: Session, forecast: ForecastSettings, name: str) -> LLMForecaster:
    """The session's model as a forecaster with ``forecast``'s prompt, sampling and batch settings."""
    return LLMForecaster(session.model, session.tokenizer, session.dataset.llmtime_scale, session.dataset.decimals,
                         forecast.prompt, forecast.samples, forecast.temperature, forecast.top_p,
                         forecast.gen_batch_size, session.run.seed, name=name)


def planned_forecast(session: Session, contexts: np.ndarray, forecast: ForecastSettings,
                     lora: LoRASettings | None = None) -> int:
    """Upper bound on the FLOPs of forecasting ``contexts`` with the session's model (+ ``lora``)."""
    lens = prompt_lengths(session.tokenizer, contexts, session.dataset.llmtime_scale, session.dataset.decimals,
                          forecast.horizon, forecast.prompt)
    return forecast_cost(session.model.config, lens, forecast.horizon, session.dataset.decimals, forecast, lora,
                         head_rows=len(set(allowed_token_ids(session.tokenizer))))


def forecast_and_save(session: Session, forecaster: Forecaster, forecast: ForecastSettings, tag: str,
                      title: str, settings: dict | None = None, write_texts: bool = True,
                      weights: str | None = "session") -> Evaluation:
    """Forecast ``forecast``'s trajectories with ``forecaster``, score them and write, under the session's output
    directory, ``per_trajectory[_<tag>].csv``, ``generations[_<tag>].jsonl`` (if it writes text) and
    ``forecasts[_<tag>].png`` (titled with ``weights``: the session's weights label unless given, None for
    forecasters that use no weights). Returns the :class:`results.Evaluation`."""
    indices, trajectories, contexts, truth = session.dataset.forecast_set(forecast)
    forecasts, pred, evaluation = evaluate(forecaster, contexts, truth, forecast.split, indices, settings)
    out, suffix = session.out, f"_{tag}" if tag else ""
    write_csv(out / f"per_trajectory{suffix}.csv", per_trajectory_rows(indices, pred, truth, forecasts))
    if write_texts and any(forecasts.texts):
        with open(out / f"generations{suffix}.jsonl", "w") as fh:
            for idx, texts in zip(indices, forecasts.texts):
                fh.write(json.dumps({"trajectory": int(idx), "texts": texts}) + "\n")
    if forecast.plots:
        plot_forecasts(out / f"forecasts{suffix}.png", session.dataset.data.time, indices, trajectories, forecasts,
                       forecast.context_steps, forecast.horizon,
                       title + (f" — {session.weights if weights == 'session' else weights}" if weights else ""),
                       forecast.plots)
    return evaluation


def token_chunks(session: Session, split: str, limit: int | None, context_length: int,
                 stride: int | None = None) -> Chunks:
    """LLMTIME text of whole trajectories of ``split`` cut into token windows of ``context_length``."""
    return chunk_texts(session.tokenizer, session.dataset.texts(split, limit), context_length, stride=stride,
                       pad_id=session.tokenizer.pad_token_id)


def real_targets(chunks: Chunks) -> int:
    """Tokens a next-token loss over ``chunks`` predicts (both the target and its input real)."""
    return int((chunks.attention_mask[:, 1:] * chunks.attention_mask[:, :-1]).sum())


def show_examples(session: Session, split: str, steps: int = 5) -> list[dict]:
    """Print and return two example sequences of ``split``: raw values, LLMTIME text, token ids (first ``steps``)."""
    from data import encode

    indices, trajectories = session.dataset.trajectories(split, 2)
    examples = []
    for idx, traj in zip(indices, trajectories):
        text = encode(traj[:steps], session.dataset.llmtime_scale, session.dataset.decimals)
        ids = session.tokenizer.encode(text)
        examples.append({"trajectory": int(idx), "raw": traj[:steps].tolist(), "text": text, "token_ids": ids})
        print(f"\nexample: trajectory {idx}, first {steps} steps")
        print("  raw (prey, predator):", np.array2string(traj[:steps], precision=4, separator=", ").replace("\n", ""))
        print("  preprocessed text:  ", text)
        print("  token ids:          ", ids)
    print()
    return examples


def format_number(x, spec: str = ".4f") -> str:
    """``x`` formatted with ``spec``, or "–" for a missing value (None or NaN), for Markdown tables."""
    return "–" if x is None or (isinstance(x, float) and np.isnan(x)) else format(x, spec)


def evaluation_table(evaluations: dict[str, Evaluation]) -> str:
    """Markdown table, one column per evaluation: validation loss, per-species MSE / MAE / R², parse rate, FLOPs."""
    names = list(evaluations)
    rows = [("validation loss (nats/token)", [e.validation_loss for e in evaluations.values()], ".4f")]
    for species in ("prey", "predator"):
        for key, label, spec in (("mse", "MSE", ".4f"), ("mae", "MAE", ".4f"), ("r2", "R²", ".3f")):
            rows.append((f"{species} {label}", [e.metrics[species][key] for e in evaluations.values()], spec))
    rows.append(("forecasts parsed completely", [e.parsed_fraction for e in evaluations.values()], ".0%"))
    rows.append(("forecast FLOPs", [e.flops for e in evaluations.values()], ".3g"))
    lines = ["| metric | " + " | ".join(names) + " |", "| --- |" + " ---: |" * len(names)]
    lines += [f"| {label} | " + " | ".join(format_number(v, spec) for v in values) + " |"
              for label, values, spec in rows]
    return "\n".join(lines)


def print_evaluation(evaluation: Evaluation, reference: Evaluation | None = None) -> None:
    """One line per species: MSE / MAE / R² (and the reference's, e.g. persistence, for scale)."""
    print(f"{evaluation.forecaster}: {len(evaluation.trajectories)} trajectories of {evaluation.split}, "
          f"{100 * evaluation.parsed_fraction:.0f}% parsed completely ({evaluation.steps_invalid} invalid, "
          f"{evaluation.steps_missing} missing steps)")
    for name in ("prey", "predator"):
        m = evaluation.metrics[name]
        line = f"  {name:9s} MSE {m['mse']:.4f}  MAE {m['mae']:.4f}  R² {m['r2']:.3f}"
        if reference is not None:
            p = reference.metrics[name]
            line += f"   ({reference.forecaster}: MSE {p['mse']:.4f}  MAE {p['mae']:.4f}  R² {p['r2']:.3f})"
        print(line)


def command_line(module: str, argv) -> str:
    """The command that ran ``module`` with ``argv`` (default ``sys.argv[1:]``), absolute paths shortened to their
    last part so that no machine path lands in committed results."""
    import sys

    words = sys.argv[1:] if argv is None else list(argv)
    return " ".join([f"python -m {module}"] + [Path(w).name if Path(w).is_absolute() else w for w in words])


def write_run_readme(path: Path, title: str, command: str, body: str) -> None:
    """A short README.md for a run directory: the title, the command that produced it, the body (tables)."""
    path.write_text(f"# {title}\n\n`{command}`\n\n{body}\n")


def run_lora(session: Session, forecast: ForecastSettings, lora: LoRASettings, train_settings: TrainSettings,
             title: str) -> tuple[dict, dict, int]:
    """Untrained forecast -> LoRA training -> trained forecast on the session's model; the adapters are removed
    again at the end. Returns ``({"untrained", "lora", "persistence"}: Evaluation, training summary, planned FLOPs)``.
    The plan is checked before anything is spent; the untrained evaluation is saved (and reused by --resume)."""
    out, run = session.out, session.run
    indices, _, contexts, truth = session.dataset.forecast_set(forecast)
    train_chunks = token_chunks(session, "train", train_settings.train_limit, train_settings.context_length,
                                train_settings.stride)
    val_chunks = token_chunks(session, "validation", None, train_settings.context_length, train_settings.stride)
    print(f"chunks: {len(train_chunks)} training, {len(val_chunks)} validation; context "
          f"{train_settings.context_length}, stride {train_settings.stride or train_settings.context_length}")

    untrained_path = out / "untrained.json"
    key = settings_module.as_record(run=run, data=session.data_settings, forecast=forecast)
    key["run"] = {k: key["run"][k] for k in ("model", "precision", "seed")}
    saved = json.loads(untrained_path.read_text()) if untrained_path.is_file() else None
    reuse = bool(run.resume and saved and saved["settings"] == key)
    training_dir = out / "training"
    start_step = checkpoint_step(training_dir) if run.resume else 0
    loss_ids = allowed_token_ids(session.tokenizer) if train_settings.loss_vocabulary == "numeric" else None
    loss_rows = len(set(loss_ids)) if loss_ids else None
    val_rows = len(validation_subset(len(val_chunks), train_settings.eval_batches * train_settings.batch_size,
                                    run.seed))
    untrained_plan = 0 if reuse else planned_forecast(session, contexts, forecast)
    planned = session.check({
        "untrained forecast": untrained_plan,
        "training": training_cost(session.model.config, train_settings, lora, val_rows, start_step, loss_rows),
        "trained forecast": planned_forecast(session, contexts, forecast, lora),
    })

    if reuse:
        untrained = Evaluation(**saved["untrained"])
        print(f"reusing the untrained evaluation in {untrained_path}")
    else:
        forecaster = llm_forecaster(session, forecast, "untrained")
        untrained = forecast_and_save(session, forecaster, forecast, "untrained", f"untrained, {title}",
                                      write_texts=False)
        write_json(untrained_path, {"settings": key, "untrained": dataclasses.asdict(untrained)})
        session.charge("generate", untrained.flops, untrained_path, what="untrained forecast")

    summary = train(session.model, train_chunks, val_chunks, train_settings, training_dir, lora=lora, seed=run.seed,
                    stage=session.stage, precision=session.precision, ledger=session.ledger,
                    resume=run.resume and training_dir.exists(), force=run.force, loss_token_ids=loss_ids)
    evals = [e for e in read_log(training_dir / "log.jsonl") if e["kind"] == "eval"]
    untrained.validation_loss = evals[0]["val_loss"] if evals and evals[0]["step"] == 0 else None
    export_peft(session.model, out / "peft_adapter", base_model_name_or_path=session.weights)

    forecaster = llm_forecaster(session, forecast, "lora")
    trained = forecast_and_save(session, forecaster, forecast, "trained",
                                f"LoRA r={lora.rank}, {summary['steps']} steps, {title}", write_texts=False)
    trained.validation_loss = summary["val_loss"]
    remove_lora(session.model)
    _, _, persistence = evaluate(Persistence(), contexts, truth, forecast.split, indices)
    return {"untrained": untrained, "lora": trained, "persistence": persistence}, summary, planned
