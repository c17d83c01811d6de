"""The final run (coursework 3c): the chosen configuration trained with checkpoints, exact resume and early stopping
on the validation score, then evaluated once on the test trajectories beside the untrained model and the classical
forecasters, on exactly the same trajectories.

    python -m experiments.final --model DIR --data FILE [--from-search runs/search | --from-sweep runs/sweep
                                [--from-context runs/context_length]] [--preset cpu] [--resume]

The lr and rank come from ``--lr`` / ``--rank``, else the search's selection (``--from-search``, which also gives the
context length and, unless ``--no-continue-search``, the winning point's run to continue from its checkpoint), else
the sweep's (``--from-sweep``), else :data:`experiments.lib.defaults.DEFAULTS`; the context length from
``--context-length``, else the context study's (``--from-context``), else the default. ``--select-by forecast`` (the
default) keeps the adapter with the best validation forecast score, ``loss`` the lowest validation loss. The test
table puts the LoRA model beside the untrained model, persistence, AR, VAR, the Lotka–Volterra fit and context
parroting (chosen on the validation split) with paired bootstrap intervals; ``--peer-indices`` (default 850-999)
scores them on the trajectories published peer runs report. Writes under ``--out`` (default ``runs/final``):
results.json, README.md, horizon_*.png, forecasts_*.png, per-trajectory CSVs, untrained.json, training/ and
peft_adapter/.
"""

from __future__ import annotations

import argparse
import dataclasses

from .lib import (by_type, cli, compare, defaults, forecast_files, halving, plans, points, runs, side_by_side,
                  tables)
from .lib.errors import UsageError
from .lib.loader import emulation
from .lib.plots import plot_horizon_errors
from .lib.session import Session
from .lib.training import distributed
from .lib.training.checkpoint import checkpoint_step
from .lib.training.loop import read_log

STAGE = "final"
DEFAULTS, PRESETS = defaults.DEFAULTS[STAGE], defaults.PRESETS[STAGE]
plan = plans.final


def build_parser(preset: str | None = None):
    p = cli.parser("python -m experiments.final", __doc__.split("\n\n")[0], "run", "data", "forecast", "lora",
                   "train", defaults=cli.with_preset(DEFAULTS, PRESETS, preset), presets=PRESETS,
                   exclude=("lr", "rank"), scores_forecasts=True)
    points.add_choice_options(p, DEFAULTS)
    p.add_argument("--from-context", default=None,
                   help="context-length study directory whose selection gives --context-length")
    p.add_argument("--from-search", default=None,
                   help="search directory (experiments.search) whose selection gives lr, rank and context length")
    p.add_argument("--continue-search", action=argparse.BooleanOptionalAction, default=True,
                   help="with --from-search: continue the winning point's own training run (default true)")
    p.add_argument("--orders", default=",".join(map(str, range(1, 21))),
                   help="AR/VAR orders to choose from on the validation split (default 1..20)")
    p.add_argument("--score-limit", type=int, default=100,
                   help="--select-by forecast: score the first N validation trajectories at every evaluation "
                        "(default 100: all of them; on 50 a score's bootstrap SD is ~0.045, as large as the jumps "
                        "between evaluations)")
    p.add_argument("--peer-indices", default=None,
                   help="also score on these trajectories (A-B; default 850-999, as published peer runs, when the "
                        "file has 1,000 trajectories; none = skip)")
    return p


def main(argv=None, on_step=None) -> int:
    preset = cli.preset_name(argv, PRESETS)
    s = cli.parse(build_parser(preset), argv)
    if s["from_search"] and (s["from_sweep"] or s["from_context"]):
        raise UsageError("--from-search gives lr, rank and context length: it takes no --from-sweep/--from-context")
    picked = {**points.chosen(s["from_sweep"], "sweep"), **points.chosen(s["from_context"], "context_length"),
              **points.chosen(s["from_search"], "search")}
    points.refuse_conflicts(s, picked, lambda dest: cli.given(build_parser(preset), argv, dest))
    lora, train = points.choose(s, picked, DEFAULTS)
    if not cli.given(build_parser(preset), argv, "context_length") and "context_length" in picked:
        train = dataclasses.replace(train, context_length=picked["context_length"])
        train.validate()
    forecast = s["forecast"]
    orders = side_by_side.parse_orders(s["orders"], forecast.context_steps)
    if train.select_by == "forecast" and (s["score_limit"] < 1 or distributed.launched()):
        raise UsageError("--select-by forecast: " + ("--score-limit must be >= 1" if s["score_limit"] < 1 else
                                                      "scores forecasts in one process; use --select-by loss under "
                                                      "torchrun"))
    if (s["peer_indices"] or "none").lower() != "none":  # its form now, its bounds once the data is read
        side_by_side.indices_range(s["peer_indices"], None)
    session = Session(STAGE, s["run"], s["data"], trains=True, progress=s["train"].progress,
                      defines={"forecast": forecast, "lora": lora, "train": train})  # compared on --resume
    with emulation(session.device, session.precision):  # bf16 emulated where this CPU has none
        if not session.is_main:  # under torchrun: ranks > 0 only take part in rank 0's training runs
            return runs.follow(session.model)
        peers = side_by_side.peer_indices(s["peer_indices"], session.dataset.data.n_systems)
        indices, _, contexts, truth = session.dataset.forecast_set(forecast)
        continued = s["from_search"] is not None and s["continue_search"]
        inherited = halving.continue_point(s["from_search"], picked, train, session.out) if continued else {}
        chunks = runs.training_chunks(session.tokenizer, session.dataset, train)
        untrained_path, resume = session.out / "untrained.json", session.run.resume
        start = checkpoint_step(session.out / "training", session.precision) if resume or continued else 0
        sizes = runs.exact_sizes(session.tokenizer, session.dataset)
        planned = plan(session.model.config, sizes, forecast, lora, train, start,
                       untrained=not (resume and untrained_path.is_file()))
        if peers is not None:  # the LLMs on the peer trajectories outside the test split
            planned["peer trajectories"] = side_by_side.peer_cost(session.model.config, sizes, forecast, lora, peers,
                                                                   indices)
        planned = session.check(planned)

        predictions: dict = {}
        untrained = runs.untrained_evaluation(session, forecast, f"{forecast.split} split", untrained_path, resume,
                                              predictions=predictions)
        scorer = None
        if train.select_by == "forecast":  # the search's fixed validation subset
            scoring = dataclasses.replace(forecast, split="validation", limit=s["score_limit"], plots=0)
            forecaster = runs.llm_forecaster(session.model, session.tokenizer, session.dataset, scoring,
                                             "validation score", session.run.seed, session.progress)
            scorer = halving.forecast_scorer(forecaster, session.dataset, scoring)
        trained, summary = runs.train_and_forecast(session, forecast, lora, train, chunks, session.out,
                                                   f"{forecast.split} split", on_step=on_step, predictions=predictions,
                                                   resume=resume or continued, forecast_score=scorer)
        evals = [e for e in read_log(session.out / "training" / "log.jsonl") if e["kind"] == "eval"]
        untrained.validation_loss = evals[0]["val_loss"] if evals and evals[0]["step"] == 0 else None
        if train.restore_best and summary["best_step"] is not None:
            trained.validation_loss = summary["best_val_loss"]
        session.charge("generate", trained.flops, session.out / forecast_files.TRAINED_CSV, what="trained forecast")

        classical, search, forecasters = side_by_side.classical(session.dataset, session.out, forecast,
                                                                orders, predictions)
        evaluations = {"untrained": untrained, "lora": trained, **classical}
        predictions = {"lora": predictions.pop("lora"), **predictions}
        best = side_by_side.best_classical(evaluations)
        comparisons = side_by_side.comparisons(predictions, truth, indices, "lora", seed=session.run.seed)
        note = f" (the first {inherited['step']} in the search's {inherited['point']})" if inherited else ""
        note = (" (stopped early)" if summary["stopped_early"] else "") + note
        scale = (f"lr {train.lr:g}, rank {lora.rank}, batch {train.batch_size} × {train.context_length} tokens, "
                 f"{summary['steps']} of {train.max_steps} steps{note}, {train.loss_vocabulary} loss, adapter of step "
                 f"{summary['best_step'] if train.restore_best else summary['steps']}; {len(indices)} "
                 f"{forecast.split} trajectories {forecast.context_steps}→{forecast.horizon}; {session.weights}")
        curves = {name: e.metrics for name, e in evaluations.items()}
        for metric in ("mae", "mse"):
            plot_horizon_errors(session.out / f"horizon_{metric}.png", curves, f"{metric.upper()} by step; {scale}",
                                metric=metric)
        kinds = by_type.section(session.out, predictions, truth, contexts, "lora", [*best.values(), *(
            n for n in predictions if n.startswith("var("))], scale)
        table = tables.evaluation_table(evaluations)
        body = (f"{scale}.\n\n{table}\n\nBest classical forecaster by MSE: prey {best['prey']}, predator "
                f"{best['predator']}.\n\n### The LoRA model against each forecaster, trajectory by trajectory\n\n"
                f"{compare.comparison_table(comparisons)}\n\n{kinds['markdown']}\n")
        peer = None
        if peers is not None:
            adapter = session.out / "training" / ("best_adapter" if train.restore_best and
                                                  (session.out / "training" / "best_adapter").is_dir() else "adapter")
            peer = side_by_side.peer_table(session, forecast, peers, predictions, indices, adapter, forecasters)
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
                           peer_trajectories=peer, by_type=kinds)
    results.seconds["training_this_session"] = summary["seconds_this_session"]
    tables.write_run_readme(session.out / "README.md", "Final LoRA run on the test split",
                             tables.command_line("experiments.final", argv), body)
    session.finish(results)
    print("\n" + table)
    print(f"\nFLOPs {results.flops['total']:.3e}; wrote {session.out}/results.json, README.md, training/, "
          "peft_adapter/, horizon_mae.png")
    return 0


if __name__ == "__main__":
    cli.run_cli(main)
