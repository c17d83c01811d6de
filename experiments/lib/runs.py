"""One run of the model, as the stages compose it: each function takes a :class:`session.Session` and plain settings
and does one thing — cut the token chunks, forecast and save, evaluate the untrained model (saved for --resume),
train a LoRA adapter and forecast with it on merged weights, follow rank 0 under torchrun. Studies of many such runs
are in :mod:`experiments.lib.studies`; tables for people to read in :mod:`experiments.lib.tables`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from data import Chunks, chunk_texts
from lora import export_peft, merged, remove_lora
from lora.head_bias import PEFT_HEAD_BIAS, has_head_bias

from . import forecast_files
from .adapter_card import card_for, peft_export_args
from .classical_forecasters import Persistence
from .costs import Sizes, lora_stage_cost
from .evaluation import (Forecaster, LLMForecaster, allowed_token_ids, evaluate, per_trajectory_rows, prediction_rows,
                         prompt_lengths, write_csv)
from .plots import plot_forecasts
from .results import Evaluation, read_record, valid_evaluation, write_json
from .dataset import Dataset
from .session import Session
from .settings import ForecastSettings, LoRASettings, TrainSettings, as_record
from .training import distributed
from .training.checkpoint import checkpoint_step
from .training.loop import check_chunks, read_log, train_lora


def llm_forecaster(model, tokenizer, dataset: Dataset, forecast: ForecastSettings, name: str, seed: int,
                   progress=None) -> LLMForecaster:
    """``model`` as a forecaster with ``forecast``'s prompt, sampling and batch settings and ``dataset``'s LLMTIME
    scale, decimals and encoding (``progress``: its bars, as :class:`evaluation.LLMForecaster` takes them)."""
    return LLMForecaster(model, tokenizer, dataset.llmtime_scale, dataset.decimals, forecast.prompt, forecast.samples,
                         forecast.temperature, forecast.top_p, forecast.gen_batch_size, seed, name=name,
                         encoding=dataset.encoding, progress=progress, scaler=dataset.context_scaler())


def file_tag(name: str) -> str:
    """A forecaster's name as it appears in file names: ``"var(11)"`` -> ``"var11"``, ``"parrot(8, lag>=3)"`` ->
    ``"parrot8_lag3"``."""
    return "".join(c for c in name.replace(", ", "_").replace(" ", "_") if c.isalnum() or c in "_-.")


def forecast_and_save(dataset: Dataset, forecaster: Forecaster, forecast: ForecastSettings, out: Path, tag: str,
                      title: str, weights: str | None, settings: dict | None = None, write_texts: bool = True,
                      predictions: dict | None = None) -> Evaluation:
    """Forecast ``forecast``'s trajectories of ``dataset`` with ``forecaster``, score them and write under ``out``
    ``per_trajectory[_<tag>].csv``, ``predictions[_<tag>].csv`` (every forecast value), ``generations[_<tag>].jsonl``
    (if it writes text) and ``forecasts[_<tag>].png`` (titled with the ``weights`` label; None for forecasters that
    use no weights). Returns the :class:`results.Evaluation`; the predictions [n, H, 2] (data units, unparsed steps
    filled by persistence) go into ``predictions`` under the forecaster's name if a dict is given (for paired
    comparisons)."""
    indices, trajectories, contexts, truth = dataset.forecast_set(forecast)
    forecasts, pred, evaluation = evaluate(forecaster, contexts, truth, forecast.split, indices, settings)
    if hasattr(forecaster, "fallback_counts"):  # classical forecasters: trajectories given persistence, and why
        evaluation.settings = {**evaluation.settings, "fallbacks": forecaster.fallback_counts()}
        if any(evaluation.settings["fallbacks"].values()):
            print(f"  {forecaster.name}: {describe_fallbacks(evaluation.settings['fallbacks'])}")
    if predictions is not None:
        predictions[evaluation.forecaster] = pred
    suffix = f"_{tag}" if tag else ""
    write_csv(out / forecast_files.csv_name(tag), per_trajectory_rows(indices, pred, truth, forecasts))
    write_csv(out / forecast_files.predictions_name(tag), prediction_rows(indices, pred))
    if write_texts and any(forecasts.texts):
        with open(out / f"generations{suffix}.jsonl", "w") as fh:
            for idx, texts in zip(indices, forecasts.texts):
                fh.write(json.dumps({"trajectory": int(idx), "texts": texts}) + "\n")
    if forecast.plots:
        plot_forecasts(out / f"forecasts{suffix}.png", dataset.data.time, indices, trajectories, forecasts,
                       forecast.context_steps, forecast.horizon,
                       title + (f" — {weights}" if weights else "")
                       + (" — synthetic data (data.simulate), not the coursework file"
                          if getattr(dataset.data, "synthetic", False) else ""),
                       forecast.plots)
    return evaluation


def describe_fallbacks(counts: dict) -> str:
    """One phrase for a classical forecaster's ``fallback_counts()``, e.g. "2 trajectories forecast by persistence,
    1 repeating a stretch shorter than its match"."""
    words = {"persistence": "forecast by persistence", "short_period": "repeating a stretch shorter than its match"}
    return ", ".join(f"{n} trajector{'y' if n == 1 else 'ies'} {words.get(k, k)}" for k, n in counts.items() if n)


def token_chunks(tokenizer, dataset: Dataset, split: str, limit: int | None, context_length: int,
                 stride: int | None = None) -> Chunks:
    """LLMTIME text of whole trajectories of ``dataset``'s ``split`` cut into token windows of ``context_length``."""
    return chunk_texts(tokenizer, dataset.texts(split, limit), context_length, stride=stride,
                       pad_id=tokenizer.pad_token_id)


def real_targets(chunks: Chunks) -> int:
    """Tokens a next-token loss over ``chunks`` predicts (both the target and its input real)."""
    return int((chunks.attention_mask[:, 1:] * chunks.attention_mask[:, :-1]).sum())


def show_examples(tokenizer, dataset: Dataset, split: str, steps: int = 5) -> list[dict]:
    """Print and return two example sequences of ``split``: raw values, LLMTIME text, token ids (first ``steps``)."""
    from data import encode

    indices, trajectories = dataset.trajectories(split, 2)
    examples = []
    for idx, traj in zip(indices, trajectories):
        text = encode(traj[:steps], dataset.text_scale(traj), dataset.decimals, dataset.encoding)
        ids = tokenizer.encode(text)
        examples.append({"trajectory": int(idx), "raw": traj[:steps].tolist(), "text": text, "token_ids": ids})
        print(f"\nexample: trajectory {idx}, first {steps} steps")
        print("  raw (prey, predator):", np.array2string(traj[:steps], precision=4, separator=", ").replace("\n", ""))
        print("  preprocessed text:  ", text)
        print("  token ids:          ", ids)
    print()
    return examples


def training_chunks(tokenizer, dataset: Dataset, train_settings: TrainSettings) -> tuple[Chunks, Chunks]:
    """``(training, validation)`` token chunks of ``train_settings.context_length`` (whole trajectories' LLMTIME
    text; the validation loss draws its fixed subset from the second)."""
    train_chunks = token_chunks(tokenizer, dataset, "train", train_settings.train_limit,
                                train_settings.context_length, train_settings.stride)
    val_chunks = token_chunks(tokenizer, dataset, "validation", None, train_settings.context_length,
                              train_settings.stride)
    print(f"chunks: {len(train_chunks)} training, {len(val_chunks)} validation; context "
          f"{train_settings.context_length}, stride {train_settings.stride or train_settings.context_length}")
    check_chunks(train_chunks, val_chunks, train_settings)  # before anything is spent
    return train_chunks, val_chunks


def loss_token_ids(tokenizer, dataset: Dataset, train_settings: TrainSettings) -> list[int] | None:
    """The restricted training-loss vocabulary (the dataset encoding's numeric alphabet + end tokens) when
    ``loss_vocabulary`` is "numeric", else None (the full vocabulary)."""
    if train_settings.loss_vocabulary != "numeric":
        return None
    return allowed_token_ids(tokenizer, dataset.encoding)


def exact_sizes(tokenizer, dataset: Dataset) -> Sizes:
    """The exact sizes a plan depends on (prompt token counts, chunk counts, the numeric head's rows) from
    ``dataset`` and ``tokenizer`` (chunk counts computed once per way of cutting)."""
    counts: dict[tuple, int] = {}

    def prompts(forecast: ForecastSettings) -> list[int]:
        contexts = dataset.forecast_set(forecast)[2]
        return prompt_lengths(tokenizer, contexts, dataset.llmtime_scale, dataset.decimals, forecast.horizon,
                              forecast.prompt, dataset.encoding, scaler=dataset.context_scaler())

    def chunk_count(split: str, limit: int | None, context_length: int, stride: int | None) -> int:
        key = (split, limit, context_length, stride)
        if key not in counts:
            counts[key] = len(token_chunks(tokenizer, dataset, *key))
        return counts[key]

    return Sizes(dataset.decimals, dataset.encoding, prompt_lengths=prompts, chunk_count=chunk_count,
                 head_rows=len(set(allowed_token_ids(tokenizer, dataset.encoding))))


def _valid_untrained(record: dict) -> None:
    record["settings"]
    valid_evaluation(record["untrained"])
    losses = record.get("validation_loss", {})
    if not isinstance(losses, dict) or not all(v is None or isinstance(v, (int, float)) for v in losses.values()):
        raise ValueError("validation_loss must map context lengths to numbers")  # None: a NaN, as JSON writes it
    if not isinstance(record.get("validation_loss_flops", 0), int):
        raise ValueError("validation_loss_flops must be an integer")
    np.asarray(record.get("predictions", []), dtype=np.float64)


def read_untrained(path: Path) -> dict:
    """The untrained evaluation saved in ``path`` (untrained.json). Raises UsageError naming the file if it is
    damaged."""
    return read_record(path, _valid_untrained, "delete it to compute the untrained forecast again (it is charged "
                                                "again), or choose another --out")


def _without_plots(key: dict) -> dict:
    """An untrained evaluation's settings ``key`` without the forecast's ``plots`` (figures, not numbers)."""
    forecast = key.get("forecast")
    if not isinstance(forecast, dict):
        return key
    return {**key, "forecast": {k: v for k, v in forecast.items() if k != "plots"}}


def untrained_evaluation(session: Session, forecast: ForecastSettings, title: str, path: Path,
                         reuse: bool, predictions: dict | None = None) -> Evaluation:
    """The untrained model's forecast of ``forecast``'s trajectories, saved in ``path`` (JSON) and charged; with
    ``reuse`` a saved one made with the same model, compute dtype (``--precision`` as resolved), seed, data and
    forecast settings (but for ``plots``, which draws figures only) is read back instead (what --resume does). Its
    predictions [n, H, 2] are saved with it and put into ``predictions`` (if a dict is given) under "untrained"
    (a saved file without them gives none)."""
    key = {"run": session.run_key(), **as_record(data=session.data_settings, forecast=forecast)}
    saved = read_untrained(path) if reuse and path.is_file() else None
    if saved and _without_plots(saved["settings"]) == _without_plots(key):
        print(f"reusing the untrained evaluation in {path}")
        if "predictions" in saved:
            pred = np.asarray(saved["predictions"], dtype=np.float64)
            write_csv(path.parent / forecast_files.predictions_name("untrained"),
                      prediction_rows(saved["untrained"]["trajectories"], pred))
            if predictions is not None:
                predictions["untrained"] = pred
        return Evaluation(**saved["untrained"])
    forecaster = llm_forecaster(session.model, session.tokenizer, session.dataset, forecast, "untrained",
                                session.run.seed, session.progress)
    made: dict = {}
    untrained = forecast_and_save(session.dataset, forecaster, forecast, path.parent, "untrained",
                                  f"untrained, {title}", session.weights, write_texts=False, predictions=made)
    write_json(path, {"settings": key, "untrained": dataclasses.asdict(untrained),
                      "predictions": made["untrained"].tolist()})
    if predictions is not None:
        predictions.update(made)
    session.charge("generate", untrained.flops, path, what="untrained forecast")
    return untrained


def train_and_forecast(session: Session, forecast: ForecastSettings, lora: LoRASettings,
                       train_settings: TrainSettings, chunks: tuple[Chunks, Chunks], out: Path, title: str, *,
                       on_step=None, export: bool = True, predictions: dict | None = None,
                       resume: bool | None = None, forecast_score=None) -> tuple[Evaluation, dict]:
    """Train LoRA ``lora`` on the session's model in ``out/training`` (resuming its checkpoint if there is one and
    the session resumes), forecast ``forecast``'s trajectories with it on merged weights (:func:`lora.merged`;
    files under ``out``, tag "trained"),
    export it in PEFT format to ``out/peft_adapter`` (if ``export``) and take the adapters off the model again
    (also when something fails). ``resume`` (default: the session's ``--resume``) continues a checkpoint in
    ``out/training``; ``forecast_score`` is passed to ``training.train_lora`` (a validation forecast score at every
    evaluation).
    Returns ``(Evaluation named "lora" with the final validation loss, training summary)``. Training charges the
    ledger itself; the forecast's FLOPs are the caller's to charge once its results are written.

    Under torchrun this runs on rank 0; the other ranks make the same ``train_lora`` call in :func:`follow`."""
    training_dir = out / "training"
    resume = (session.run.resume if resume is None else resume) and training_dir.exists()
    job = dict(train_chunks=chunks[0], val_chunks=chunks[1], settings=train_settings, out_dir=training_dir,
               lora=lora, seed=session.run.seed, stage=session.stage, precision=session.precision, resume=resume,
               loss_token_ids=loss_token_ids(session.tokenizer, session.dataset, train_settings))
    try:
        with distributed.leading(job):
            summary = train_lora(session.model, **job, ledger=session.ledger, on_step=on_step,
                                 forecast_score=forecast_score)
        if export:  # with its card: the LLMTIME scale, decimals, encoding and prompt it needs (adapter_card)
            bias = PEFT_HEAD_BIAS if has_head_bias(session.model) else None  # written by export_peft beside it
            card = card_for(session.dataset, session.data_settings, session.weights, forecast.prompt, bias)
            export_peft(session.model, out / "peft_adapter", **peft_export_args(session.model, session.run.model, card))
        forecaster = llm_forecaster(session.model, session.tokenizer, session.dataset, forecast, "lora",
                                    session.run.seed, session.progress)
        with merged(session.model):  # W + BA·scale in plain linear layers: the fast inference paths apply
            trained = forecast_and_save(session.dataset, forecaster, forecast, out, "trained",
                                        f"LoRA r={lora.rank}, lr {train_settings.lr:g}, {summary['steps']} steps, "
                                        f"{title}", session.weights, write_texts=False, predictions=predictions)
    finally:
        remove_lora(session.model)
    trained.validation_loss = summary["val_loss"]
    return trained, summary


def follow(model) -> int:
    """Ranks > 0 of a training stage launched by torchrun: make every ``train_lora`` call rank 0 makes in
    :func:`train_and_forecast` (no ledger; the loop writes nothing on these ranks), taking the adapters off the model
    after each, until rank 0's stage is done. Forecasts, results and the ledger are rank 0's alone. Returns 0."""
    for job in distributed.jobs():
        try:
            train_lora(model, **job)
        finally:
            remove_lora(model)
    return 0


def run_lora(session: Session, forecast: ForecastSettings, lora: LoRASettings, train_settings: TrainSettings,
             title: str) -> tuple[dict, dict, int]:
    """Untrained forecast -> LoRA training -> trained forecast on the session's model; the adapters are removed
    again at the end. Returns ``({"untrained", "lora", "persistence"}: Evaluation, training summary, planned FLOPs)``.
    The plan is checked before anything is spent; the untrained evaluation is saved (and reused by --resume)."""
    out, run = session.out, session.run
    indices, _, contexts, truth = session.dataset.forecast_set(forecast)
    chunks = training_chunks(session.tokenizer, session.dataset, train_settings)
    untrained_path = out / "untrained.json"
    start_step = checkpoint_step(out / "training", session.precision) if run.resume else 0
    sizes = exact_sizes(session.tokenizer, session.dataset)
    planned = session.check(lora_stage_cost(session.model.config, sizes, forecast, lora, train_settings, start_step,
                                            untrained=not (run.resume and untrained_path.is_file())))
    untrained = untrained_evaluation(session, forecast, title, untrained_path, reuse=run.resume)
    trained, summary = train_and_forecast(session, forecast, lora, train_settings, chunks, out, title)
    evals = [e for e in read_log(out / "training" / "log.jsonl") if e["kind"] == "eval"]
    untrained.validation_loss = evals[0]["val_loss"] if evals and evals[0]["step"] == 0 else None
    _, _, persistence = evaluate(Persistence(), contexts, truth, forecast.split, indices)
    return {"untrained": untrained, "lora": trained, "persistence": persistence}, summary, planned


class ChunkCache:
    """Training and validation chunks of ``dataset``'s text, cut once per (context length, stride)."""

    def __init__(self, tokenizer, dataset: Dataset):
        self.tokenizer, self.dataset, self._cache = tokenizer, dataset, {}

    def __call__(self, train: TrainSettings) -> tuple[Chunks, Chunks]:
        key = (train.context_length, train.stride)
        if key not in self._cache:
            self._cache[key] = training_chunks(self.tokenizer, self.dataset, train)
        return self._cache[key]
