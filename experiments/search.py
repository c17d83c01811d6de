"""A LoRA search that can tell settings apart: successive halving over the learning-rate × rank grid — every point
trained to N steps and scored on a fixed validation subset, the best 1/η continued to ηN from its own checkpoint, the
best of those to η²N (Jamieson & Talwalkar 2016; one bracket of Hyperband, Li et al. 2018).

    python -m experiments.search --model DIR --data FILE [--preset cpu] [--lrs 1e-5,5e-5,1e-4] [--ranks 2,4,8]
                                 [--min-steps 100] [--eta 3] [--rungs 3] [--resume]

Rungs are judged by validation forecast error, robustly: for each species the median over trajectories of the
per-trajectory MSE, relative to persistence's, averaged over the two species (:data:`scores.SCORE_RULE`); the
validation loss is reported beside it. The learning rate is constant, so a point continued over rungs is the point
trained straight to the same step. The whole search is priced (an upper bound) before it starts and each rung again
before its training. Resumable (``--resume``): finished rungs are read back and an interrupted point continues from its
checkpoint exactly. The coursework's equal-steps grid is ``experiments.sweep``. Writes under ``--out`` (default
``runs/search``): results.json, search.csv, rungs.png, README.md, untrained.json and one directory per point.
"""

from __future__ import annotations

from .lib import cli, compare, defaults, forecast_files, halving, points, runs, scores, studies, tables
from .lib.errors import UsageError
from .lib.evaluation import write_csv
from .lib.loader import emulation
from .lib.plots import plot_rungs
from .lib.results import Evaluation
from .lib.session import Session
from .lib.settings import ForecastSettings, LoRASettings, TrainSettings

STAGE = "search"
MIN_STEPS = defaults.SEARCH_MIN_STEPS
DEFAULTS, PRESETS = defaults.DEFAULTS[STAGE], defaults.PRESETS[STAGE]


def build_parser(preset: str | None = None):
    p = cli.parser("python -m experiments.search", __doc__.split("\n\n")[0], "run", "data", "forecast", "lora",
                   "train", defaults=cli.with_preset(DEFAULTS, PRESETS, preset), presets=PRESETS,
                   exclude=("lr", "rank"))
    p.add_argument("--lrs", default="1e-5,5e-5,1e-4", help="learning rates (default 1e-5,5e-5,1e-4)")
    p.add_argument("--ranks", default="2,4,8", help="LoRA ranks (default 2,4,8)")
    p.add_argument("--min-steps", type=int, default=MIN_STEPS[preset],
                   help=f"steps of the first rung, N (default {MIN_STEPS[preset]})")
    p.add_argument("--eta", type=int, default=3,
                   help="rung k trains 1/eta^k of the points to N·eta^k steps (default 3)")
    p.add_argument("--rungs", type=int, default=3, help="number of rungs (default 3)")
    return p


def main(argv=None, on_step=None) -> int:
    """Run the search. ``on_step(point_name, step)`` is called after every training step (tests simulate a kill)."""
    preset = cli.preset_name(argv, PRESETS)
    s = cli.parse(build_parser(preset), argv)
    lrs, ranks = points.grid_axis(s["lrs"], float, "--lrs"), points.grid_axis(s["ranks"], int, "--ranks")
    forecast, lora, train = s["forecast"], s["lora"], s["train"]
    if train.schedule_depends_on_max_steps:  # a continued point must equal one trained straight to the same step
        raise UsageError(f"--lr-schedule {train.lr_schedule}: depends on the run's length, and the search continues "
                         "points over rungs; use constant (warm-up allowed)")
    grid = points.grid_points(lora, train, lrs, ranks)
    rungs = halving.schedule(len(grid), s["min_steps"], s["eta"], s["rungs"])
    session = Session(STAGE, s["run"], s["data"], trains=True, progress=s["train"].progress,
                      defines={"forecast": forecast, "lora": lora, "train": train}, varies=points.GRID_FIELDS,
                      study={"lrs": lrs, "ranks": ranks, **{k: s[k] for k in ("min_steps", "eta", "rungs")}})
    with emulation(session.device, session.precision):  # bf16 emulated where this CPU has none
        if not session.is_main:  # under torchrun: ranks > 0 only take part in rank 0's training runs
            return runs.follow(session.model)
        key = halving.search_key(session.run_key(), session.data_settings, forecast, grid[0], rungs, s["eta"])
        with points.locked(session.out, [p.name for p in grid]):  # a second copy of this search is refused here
            chunks = runs.ChunkCache(session.tokenizer, session.dataset)
            chunks(grid[0].train)  # cut (and checked against the batch size) before anything is spent
            sizes = runs.exact_sizes(session.tokenizer, session.dataset)
            planned = session.check(halving.search_cost(session.model.config, sizes, forecast, grid, rungs))
            untrained, _, loss_flops = studies.untrained(session, forecast, grid, chunks,
                                                         session.out / "untrained.json")
            done = halving.search(session, forecast, grid, rungs, key, on_step=on_step)
    write_results(session, done, untrained, loss_flops, planned, forecast, lora, train, rungs, s, preset, argv)
    return 0


def write_results(session: Session, done: list[list[dict]], untrained: Evaluation, untrained_loss_flops: int,
                  planned: int, forecast: ForecastSettings, lora: LoRASettings, train: TrainSettings, rungs,
                  s: dict, preset, argv) -> None:
    """search.csv, rungs.png, README.md (the table) and results.json; the winner is the best point of the last
    rung."""
    rows = tables.search_rows(done)
    order, tied = halving.ranking(done[-1])
    winner = done[-1][order[0]]
    scale = (f"rungs {', '.join(f'{n} points × {steps} steps' for steps, n in rungs)}; batch {train.batch_size} × "
             f"{train.context_length} tokens, {train.loss_vocabulary} loss, constant lr; {len(untrained.trajectories)} "
             f"{forecast.split} trajectories {forecast.context_steps}→{forecast.horizon}; {session.weights}")
    write_csv(session.out / "search.csv", rows)
    plot_rungs(session.out / "rungs.png", rows, f"successive halving; {scale}")
    base = halving.saved_score(session.dataset, forecast, session.out / "untrained.json")
    m = untrained.metrics
    reference = None if base is None else {  # the model before any training, scored the same way
        "score": base["score"], "val_loss": untrained.validation_loss, "median_mse": base["median_mse"],
        "prey_r2": m["prey"]["r2"], "predator_r2": m["predator"]["r2"], "parsed_fraction": untrained.parsed_fraction}
    table = tables.search_table(rows, winner, reference)
    ties = [{"rung": k, "tied": halving.ranking(records)[1]} for k, records in enumerate(done)
            if len(halving.ranking(records)[1]) > 1]
    chosen = {"rule": f"best at the last rung; score = {scores.SCORE_RULE}; {scores.TIE_RULE}", "ties": ties,
              "chosen": {"lr": winner["lr"], "rank": winner["rank"], "context_length": winner["context_length"],
                         "steps": winner["steps"], "point": winner["name"]}}
    results = session.results(forecast=forecast, lora=lora, train=train)
    results.settings = points.without_point_fields(results.settings, points.GRID_FIELDS)  # each row gives its own
    results.settings["search"] = {"lrs": sorted({r["lr"] for r in rows}), "ranks": sorted({r["rank"] for r in rows}),
                                  "min_steps": s["min_steps"], "eta": s["eta"], "rungs": [list(r) for r in rungs],
                                  "preset": preset}
    results.evaluations = {"untrained": untrained, **{f"{r['name']}@{r['steps']}": Evaluation(**r["evaluation"])
                                                      for records in done for r in records}}
    results.flops["planned"] = planned
    last = {r["name"]: r for records in done for r in records}  # each point's training totals at its last rung
    results.add_flops("generate", untrained.flops + sum(r["forecast_flops"] for r in rows))
    results.add_flops("train", sum(r["training"]["train_flops"] for r in last.values()))
    results.add_flops("eval", sum(r["training"]["eval_flops"] for r in last.values()) + untrained_loss_flops)
    paired, paired_md = compare.against_untrained(
        session.out, {f"{r['name']} @ {r['steps']}": forecast_files.point_csv(r["name"], r["rung"]) for r in rows},
        forecast.horizon, session.run.seed)
    results.details.update(rows=rows, selection=chosen, scale=scale, table_markdown=table, untrained_score=base,
                           vs_untrained=paired)
    tables.write_run_readme(session.out / "README.md", "LoRA search: successive halving over learning rate × rank",
                            tables.command_line("experiments.search", argv),
                            f"{scale}.\n\nSelection: {chosen['rule']} → {winner['name']} at {winner['steps']} steps."
                            f"\n\n{table}\n\n{paired_md}\n")
    session.finish(results)  # every part was charged as it finished
    print("\n" + table + f"\n\nchosen: {winner['name']} ({winner['steps']} steps)")
    print(f"wrote {session.out}/results.json, search.csv, rungs.png, README.md")


if __name__ == "__main__":
    cli.run_cli(main)
