"""The final run (coursework 3c): the chosen configuration trained with early stopping on the validation loss,
checkpoints and exact resume, then evaluated once on the test trajectories beside the untrained model and the
classical forecasters (orders chosen on the validation split), on exactly the same trajectories.

    python -m experiments.final --model DIR --data FILE [--from-search runs/search | --from-sweep runs/sweep
                                [--from-context runs/context_length]] [--preset cpu] [--resume]

The learning rate and rank come from ``--lr`` / ``--rank``, else the search's selection (``--from-search``, which
also gives the context length and, unless ``--no-continue-search``, the winning point's own training run to continue
from its checkpoint), else the sweep's (``--from-sweep``), else the defaults below; the context length from
``--context-length``, else the context study's (``--from-context``), else the default. With ``--restore-best`` (on by
default here) the adapter of the lowest validation loss is the one evaluated. The test table puts the LoRA model
beside the untrained model and the classical forecasters (persistence, AR, VAR, the Lotka–Volterra fit, context
parroting; chosen on the validation split) with paired bootstrap intervals (:mod:`experiments.lib.side_by_side`), and
``--peer-indices`` (default 850-999) scores the same forecasters on the trajectories published peer runs report.
Writes under ``--out`` (default ``runs/final``): results.json, README.md (the tables), horizon_mae.png,
horizon_mse.png, forecasts_*.png, per-trajectory CSVs, untrained.json, training/ (log, checkpoint, adapters, loss
curve) and peft_adapter/ (PEFT format).
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import shutil
from pathlib import Path

from .lib import compare, halving, points, recipes, settings, side_by_side
from .lib.costs import forecast_cost, lora_stage_cost
from .lib.plots import plot_horizon_errors
from .lib.session import Session
from .lib.settings import ForecastSettings, LoRASettings, TrainSettings, UsageError
from .lib.results import write_json
from .lib.training import checkpoint_step, distributed, find_checkpoint, read_checkpoint, read_log

STAGE = "final"
#: full scale (a GPU): up to 3,000 steps at batch 4 × 768 tokens, stopping after 5 evaluations without a new best
#: validation loss; priced at rank 8 and replaced by the sweep's and the context study's choices when known
DEFAULTS = {
    "train": TrainSettings(lr=1e-4, batch_size=4, context_length=768, max_steps=3_000, eval_every=100,
                           eval_batches=8, early_stop_patience=5, restore_best=True, select_by="forecast",
                           checkpoint_every=100),
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
    p.add_argument("--from-search", default=None,
                   help="search directory (experiments.search) whose selection gives lr, rank and context length")
    p.add_argument("--continue-search", action=argparse.BooleanOptionalAction, default=True,
                   help="with --from-search: continue the winning point's own training run (default true)")
    p.add_argument("--orders", default=",".join(map(str, range(1, 21))),
                   help="AR/VAR orders to choose from on the validation split (default 1..20)")
    p.add_argument("--score-limit", type=int, default=50,
                   help="--select-by forecast: score the first N validation trajectories at every evaluation "
                        "(default 50, the search's subset)")
    p.add_argument("--peer-indices", default=None,
                   help="also score on these trajectories (A-B; default 850-999, as published peer runs, when the "
                        "file has 1,000 trajectories; none = skip)")
    return p


def continue_point(search_dir: str, picked: dict, train: TrainSettings, out: Path) -> dict:
    """Copy the search's winning point's training run into ``out/training`` (once) so that training continues from
    its checkpoint, and record what came from the search in ``out/continued_from.json``. Returns that record:
    ``{"search", "point", "step", "train_flops", "eval_flops"}`` (FLOPs already charged under the search).

    Raises UsageError if the search's run is missing or was trained with settings a resumed run may not change
    (:attr:`TrainSettings.RESUME_FIXED`)."""
    record_path = out / "continued_from.json"
    if record_path.is_file():
        return json.loads(record_path.read_text())
    source = Path(search_dir) / "points" / picked["point"] / "training"
    theirs = json.loads((Path(search_dir) / "results.json").read_text())["settings"]["train"]
    theirs = {k: theirs.get(k, getattr(TrainSettings(), k)) for k in TrainSettings.RESUME_FIXED}  # left out: default
    differ = [k for k in TrainSettings.RESUME_FIXED if k != "lr" and theirs[k] != (
        list(getattr(train, k)) if isinstance(getattr(train, k), tuple) else getattr(train, k))]
    if differ:
        raise UsageError(f"--from-search {search_dir}: the search trained with " + ", ".join(
            f"{k}={theirs[k]!r}" for k in differ) + " — give the same options or --no-continue-search")
    checkpoint = find_checkpoint(source)
    if checkpoint is None or (out / "training").exists():
        raise UsageError(f"--from-search {search_dir}: no checkpoint of {picked['point']} in {source}"
                         if checkpoint is None else f"{out / 'training'} exists but was not continued from a search")
    loop = read_checkpoint(checkpoint).state["loop"]
    shutil.copytree(source, out / "training")
    record = {"search": Path(search_dir).name, "point": picked["point"], "step": loop["step"],
              "train_flops": loop["train_flops"], "eval_flops": loop["eval_flops"]}
    write_json(record_path, record)
    return record


def peer_table(session: Session, forecast: ForecastSettings, peers, predictions: dict, indices, adapter: Path,
               forecasters: dict) -> dict:
    """The forecasters of the test table scored on the trajectories ``peers`` (e.g. 850–999, as published peer
    runs report): predictions already made on the test split are reused, the rest are forecast (the LLMs with the
    evaluated adapter, merged). Returns ``{"indices", "evaluations", "comparisons", "markdown", "flops"}``."""
    from lora import load_adapter, merged, remove_lora

    known = {name: (indices, pred) for name, pred in predictions.items()}
    llms = {"untrained": recipes.llm_forecaster(session, forecast, "untrained")}
    evaluations, preds, truth = side_by_side.on_indices(session, {**llms, **forecasters}, forecast, peers, known)
    try:
        load_adapter(session.model, adapter)
        with merged(session.model):
            lora_evals, lora_preds, _ = side_by_side.on_indices(
                session, {"lora": recipes.llm_forecaster(session, forecast, "lora")}, forecast, peers, known)
    finally:
        remove_lora(session.model)
    evaluations, preds = {**lora_evals, **evaluations}, {**lora_preds, **preds}
    flops = sum(e.flops for e in evaluations.values())
    session.charge("generate", flops, session.out / "per_trajectory_trained.csv",
                   what=f"forecasts of trajectories {peers[0]}-{peers[-1]} outside the test split")
    comparisons = side_by_side.comparisons(preds, truth, peers, "lora", seed=session.run.seed)
    outside = sorted(set(peers.tolist()) - set(int(i) for i in indices))
    markdown = (f"### Trajectories {peers[0]}–{peers[-1]} (as published peer runs report)\n\n"
                f"{len(outside)} of these {len(peers)} trajectories are outside the test split"
                + (f" ({outside[0]}–{outside[-1]}: validation trajectories — the classical orders were chosen on "
                   "the whole validation split, the search and the adapter on its first trajectories — so this "
                   "table is not a held-out test)" if outside else "") + ".\n\n"
                f"{recipes.evaluation_table(evaluations)}\n\n{compare.comparison_table(comparisons, legend=False)}")
    return {"indices": [int(peers[0]), int(peers[-1])], "evaluations": {k: dataclasses.asdict(e) for k, e in
                                                                         evaluations.items()},
            "comparisons": comparisons, "markdown": markdown, "flops": flops}


def plan(config, sizes, forecast: ForecastSettings, lora: LoRASettings, train: TrainSettings,
         start_step: int = 0, untrained: bool = True) -> dict[str, int]:
    """Planned FLOPs: the untrained test forecast (if ``untrained``), training from ``start_step`` (an upper bound:
    early stopping ignored) and the trained test forecast."""
    return lora_stage_cost(config, sizes, forecast, lora, train, start_step, untrained)


def main(argv=None, on_step=None) -> int:
    preset = settings.preset_name(argv, PRESETS)
    s = settings.parse(build_parser(preset), argv)
    if s["from_search"] and (s["from_sweep"] or s["from_context"]):
        raise UsageError("--from-search gives lr, rank and context length: it takes no --from-sweep/--from-context")
    picked = {**points.chosen(s["from_sweep"], "sweep"), **points.chosen(s["from_context"], "context_length"),
              **points.chosen(s["from_search"], "search")}
    lora, train = points.choose(s, picked, DEFAULTS)
    if not settings.given(build_parser(preset), argv, "context_length") and "context_length" in picked:
        train = dataclasses.replace(train, context_length=picked["context_length"])
        train.validate()
    forecast = s["forecast"]
    orders = side_by_side.parse_orders(s["orders"], forecast.context_steps)
    if train.select_by == "forecast" and (s["score_limit"] < 1 or distributed.launched()):
        raise UsageError("--select-by forecast: " + ("--score-limit must be >= 1" if s["score_limit"] < 1 else
                                                      "scores forecasts in one process; use --select-by loss under "
                                                      "torchrun"))
    session = Session(STAGE, s["run"], s["data"], trains=True)
    if not session.is_main:  # under torchrun: ranks > 0 only take part in rank 0's training runs
        return recipes.follow(session)
    ds = session.dataset
    text = s["peer_indices"] or ("850-999" if ds.data.n_systems >= 1000 else "none")
    peers = None if text.lower() == "none" else side_by_side.indices_range(text, ds.data.n_systems)
    indices, _, contexts, truth = ds.forecast_set(forecast)
    continued = s["from_search"] is not None and s["continue_search"]
    inherited = continue_point(s["from_search"], picked, train, session.out) if continued else {}
    chunks = recipes.training_chunks(session, train)
    untrained_path = session.out / "untrained.json"
    reuse = session.run.resume and untrained_path.is_file()
    start = checkpoint_step(session.out / "training") if session.run.resume or continued else 0
    planned = plan(session.model.config, recipes.SessionSizes(session), forecast, lora, train, start,
                   untrained=not reuse)
    if peers is not None:  # the LLMs on the peer trajectories outside the test split
        extra = [i for i in peers if i not in set(indices.tolist())]
        lengths = [max(recipes.SessionSizes(session).prompt_lengths(forecast))] * len(extra)
        planned["peer trajectories"] = 2 * forecast_cost(session.model.config, lengths, forecast.horizon,
                                                         ds.decimals, forecast, lora)
    planned = session.check(planned)

    predictions: dict = {}
    untrained = recipes.untrained_evaluation(session, forecast, f"{forecast.split} split", untrained_path,
                                             session.run.resume, predictions=predictions)
    scorer = None
    if train.select_by == "forecast":  # the search's fixed validation subset
        scorer = halving.forecast_scorer(session, dataclasses.replace(
            forecast, split="validation", limit=s["score_limit"], plots=0))
    trained, summary = recipes.train_and_forecast(session, forecast, lora, train, chunks, session.out,
                                                  f"{forecast.split} split", on_step=on_step, predictions=predictions,
                                                  resume=session.run.resume or continued, forecast_score=scorer)
    evals = [e for e in read_log(session.out / "training" / "log.jsonl") if e["kind"] == "eval"]
    untrained.validation_loss = evals[0]["val_loss"] if evals and evals[0]["step"] == 0 else None
    if train.restore_best and summary["best_step"] is not None:
        trained.validation_loss = summary["best_val_loss"]
    session.charge("generate", trained.flops, session.out / "per_trajectory_trained.csv", what="trained forecast")

    classical, search, forecasters = side_by_side.classical(session, forecast, orders, predictions)
    evaluations = {"untrained": untrained, "lora": trained, **classical}
    predictions = {"lora": predictions.pop("lora"), **predictions}
    best = side_by_side.best_classical(evaluations)
    comparisons = side_by_side.comparisons(predictions, truth, indices, "lora", seed=session.run.seed)
    adapter_step = summary["best_step"] if train.restore_best else summary["steps"]
    note = f" (the first {inherited['step']} in the search's {inherited['point']})" if inherited else ""
    scale = (f"lr {train.lr:g}, rank {lora.rank}, batch {train.batch_size} × {train.context_length} tokens, "
             f"{summary['steps']} of {train.max_steps} steps{' (stopped early)' if summary['stopped_early'] else ''}"
             f"{note}, {train.loss_vocabulary} loss, "
             f"adapter of step {adapter_step}; {len(indices)} {forecast.split} trajectories "
             f"{forecast.context_steps}→{forecast.horizon}; {session.weights}")
    curves = {name: e.metrics for name, e in evaluations.items()}
    for metric in ("mae", "mse"):
        plot_horizon_errors(session.out / f"horizon_{metric}.png", curves, f"{metric.upper()} by step; {scale}",
                            metric=metric)
    table = recipes.evaluation_table(evaluations)
    body = (f"{scale}.\n\n{table}\n\nBest classical forecaster by MSE: prey {best['prey']}, predator "
            f"{best['predator']}.\n\n### The LoRA model against each forecaster, trajectory by trajectory\n\n"
            f"{compare.comparison_table(comparisons)}\n")
    peer = None
    if peers is not None:
        best_adapter = session.out / "training" / "best_adapter"
        adapter = best_adapter if train.restore_best and best_adapter.is_dir() else session.out / "training" / "adapter"
        peer = peer_table(session, forecast, peers, predictions, indices, adapter, forecasters)
        body += f"\n{peer['markdown']}\n"
    results = session.results(forecast=forecast, lora=lora, train=train)
    results.settings["chosen_from"] = {"preset": preset, **picked}
    results.evaluations = evaluations
    results.flops["planned"] = planned
    results.add_flops("generate", untrained.flops + trained.flops + (peer["flops"] if peer else 0))
    results.add_flops("train", summary["train_flops"] - inherited.get("train_flops", 0))
    results.add_flops("eval", summary["eval_flops"] - inherited.get("eval_flops", 0))
    results.details.update(training=summary, order_search=search, scale=scale, table_markdown=table,
                           best_classical=best, comparisons=comparisons, continued_from_search=inherited,
                           peer_trajectories=peer)
    results.seconds["training_this_session"] = summary["seconds_this_session"]
    recipes.write_run_readme(session.out / "README.md", "Final LoRA run on the test split",
                             recipes.command_line("experiments.final", argv), body)
    session.finish(results)
    print("\n" + table)
    print(f"\nFLOPs {results.flops['total']:.3e}; wrote {session.out}/results.json, README.md, training/, "
          "peft_adapter/, horizon_mae.png")
    return 0


if __name__ == "__main__":
    settings.run_cli(main)
