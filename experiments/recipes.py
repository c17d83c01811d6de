"""Recipes the stages are written with: each takes a :class:`session.Session` and plain settings, does one thing
(forecast and save, cut chunks, price a forecast, tabulate evaluations), and is reused by every stage."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from data import Chunks, chunk_texts

from .costs import forecast_cost
from .evaluation import Forecaster, LLMForecaster, evaluate, per_trajectory_rows, prompt_lengths, write_csv
from .plots import plot_forecasts
from .results import Evaluation
from .session import Session
from .settings import ForecastSettings, LoRASettings


def llm_forecaster(session: Session, forecast: ForecastSettings, name: str) -> LLMForecaster:
    """The session's model as a forecaster with ``forecast``'s prompt, sampling and batch settings."""
    return LLMForecaster(session.model, session.tokenizer, session.dataset.llmtime_scale, session.dataset.decimals,
                         forecast.prompt, forecast.samples, forecast.temperature, forecast.top_p,
                         forecast.gen_batch_size, session.run.seed, name=name)


def planned_forecast(session: Session, contexts: np.ndarray, forecast: ForecastSettings,
                     lora: LoRASettings | None = None) -> int:
    """Upper bound on the FLOPs of forecasting ``contexts`` with the session's model (+ ``lora``)."""
    from .evaluation import allowed_token_ids

    lens = prompt_lengths(session.tokenizer, contexts, session.dataset.llmtime_scale, session.dataset.decimals,
                          forecast.horizon, forecast.prompt)
    return forecast_cost(session.model.config, lens, forecast.horizon, session.dataset.decimals, forecast, lora,
                         head_rows=len(allowed_token_ids(session.tokenizer)))


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


def _fmt(x, spec: str) -> str:
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
    lines += [f"| {label} | " + " | ".join(_fmt(v, spec) for v in values) + " |" for label, values, spec in rows]
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
