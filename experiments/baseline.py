"""Zero-shot forecasting with the untrained model (coursework 2a + 2b).

    python -m experiments.baseline --model DIR --data FILE [--limit N] [--samples 5] [--prompt chat] ...

Prints two preprocessed examples, forecasts ``--horizon`` steps after ``--context-steps`` observed steps of every
selected trajectory (batched, KV-cached, constrained to the numeric alphabet), scores them beside persistence, and
measures the untrained model's token-level loss on the chunks of the first 20 validation trajectories (``--loss-limit
all``: all 100, the full loss, about 6.5 min instead of 1.5 on 2 CPU cores; ``0``: none). Writes ``results.json``,
``per_trajectory.csv``, ``generations.jsonl`` and ``forecasts.png`` under ``--out``; charges the ledger after.
"""

from __future__ import annotations

import time

from .lib import cli, defaults, plans, runs, tables
from .lib.classical_forecasters import Persistence
from .lib.evaluation import evaluate
from .lib.loader import emulation
from .lib.session import Session
from .lib.training.loss import validation_loss

STAGE = "baseline"
DEFAULTS, PRESETS = defaults.DEFAULTS[STAGE], defaults.PRESETS[STAGE]
plan = plans.baseline


def build_parser(preset: str | None = None):
    p = cli.parser("python -m experiments.baseline", __doc__.split("\n\n")[0], "run", "data", "forecast",
                   "loss", defaults=cli.with_preset(DEFAULTS, PRESETS, preset), presets=PRESETS)
    limit = cli.with_preset(DEFAULTS, PRESETS, preset)["loss"].loss_limit
    for action in p._actions:
        if action.dest == "loss_limit":
            action.help = (f"validation trajectories for the token loss, the first N (default {limit}; all = every "
                           "validation trajectory, the full loss: about 6.5 min instead of 1.5 on 2 CPU cores; "
                           "0 = skip)")
    p.add_argument("--no-progress", dest="hide_progress", action="store_true", help="no progress bars")
    return p


def main(argv=None) -> int:
    s = cli.parse(build_parser(cli.preset_name(argv, PRESETS)), argv)
    run, data, forecast, loss_settings = s["run"], s["data"], s["forecast"], s["loss"]
    if loss_settings.loss_limit != 0 and cli.given(build_parser(cli.preset_name(argv, PRESETS)), argv,
                                                    "loss_context_length"):  # an explicit one, from config.json
        cli.check_positions(run.model, [loss_settings.loss_context_length], "--loss-context-length", strict=False)
    session = Session(STAGE, run, data, progress=not s["hide_progress"])
    with emulation(session.device, session.precision):  # bf16 emulated where this CPU has none
        indices, trajectories, contexts, truth = session.dataset.forecast_set(forecast)
        ds = session.dataset
        print(f"data: {ds.data.path.name} ({ds.data.n_systems} trajectories x {ds.data.n_steps} steps); split "
              f"{forecast.split}: {len(indices)} trajectories; LLMTIME scale = {ds.llmtime_scale:.5g} (fitted on "
              f"{len(ds.splits['train'])} training trajectories)")
        examples = runs.show_examples(session.tokenizer, ds, forecast.split)

        loss_chunks = None
        if loss_settings.loss_limit != 0:
            loss_chunks = runs.token_chunks(session.tokenizer, ds, "validation", loss_settings.loss_limit,
                                            loss_settings.loss_context_length)
        results = session.results(forecast=forecast, loss=loss_settings)
        sizes = runs.exact_sizes(session.tokenizer, ds)
        results.flops["planned"] = session.check(plan(session.model.config, sizes, forecast, loss_settings))

        forecaster = runs.llm_forecaster(session.model, session.tokenizer, ds, forecast, "zero-shot", session.run.seed,
                                         session.progress)
        title = f"zero-shot {forecast.prompt}, {forecast.samples} sample(s)"
        zero_shot = runs.forecast_and_save(ds, forecaster, forecast, session.out, "", title, session.weights)
        results.add_flops("generate", zero_shot.flops)
        if loss_chunks is not None:
            t0 = time.time()
            loss, loss_flops = validation_loss(session.model, loss_chunks, loss_settings.loss_batch_size,
                                               session.precision, progress=session.progress)
            zero_shot.validation_loss = loss
            results.add_flops("eval", loss_flops)
            results.seconds["validation_loss"] = round(time.time() - t0, 2)
            results.details["validation_loss"] = {
                "loss": loss, "tokens": runs.real_targets(loss_chunks), "chunks": len(loss_chunks),
                "context_length": loss_settings.loss_context_length, "flops": loss_flops}
        _, _, persistence = evaluate(Persistence(), contexts, truth, forecast.split, indices)
        results.evaluations = {"zero-shot": zero_shot, "persistence": persistence}
        results.seconds["forecast"] = zero_shot.seconds
        results.details["examples"] = examples
        session.finish(results, charge={"generate": zero_shot.flops, "eval": results.flops.get("eval", 0)})

    print()
    tables.print_evaluation(zero_shot, persistence)
    if zero_shot.validation_loss is not None:
        print(f"  validation loss {zero_shot.validation_loss:.4f} nats/token over "
              f"{results.details['validation_loss']['tokens']} tokens")
    print(f"  FLOPs {results.flops['total']:.3e}; forecast {zero_shot.seconds:.0f} s")
    written = [name for name in ("results.json", "per_trajectory.csv", "generations.jsonl", "forecasts.png")
               if (session.out / name).is_file()]  # --plots 0 draws no forecasts.png
    print(f"wrote {session.out}/{', '.join(written)}")
    return 0


if __name__ == "__main__":
    cli.run_cli(main)
