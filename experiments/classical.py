"""Classical forecasters beside the LLM, on the same trajectories and with the same metrics: persistence, AR(p) per
species and VAR(p) over both species (least squares on each trajectory's own observed context; p chosen on the
validation split), and the Lotka–Volterra ODE fitted to each context.

    python -m experiments.classical --data FILE [--splits validation,test] [--orders 1,2,...,20] [--no-ode]

Writes ``results.json`` (one evaluation per forecaster and split, keyed ``"<forecaster>/<split>"``), the order
search, per-trajectory CSVs and forecast plots under ``--out`` (default ``runs/classical``). These forecasters run no
language model: they spend no FLOPs of the 1e17 budget and charge nothing to the ledger.
"""

from __future__ import annotations

import dataclasses

from . import recipes, settings
from .classical_forecasters import validated_forecasters
from .session import Session

STAGE = "classical"


def build_parser():
    p = settings.parser("python -m experiments.classical", __doc__.split("\n\n")[0], "run", "data", "forecast")
    p.add_argument("--splits", default="validation,test", help="comma-separated splits (default validation,test)")
    p.add_argument("--orders", default=",".join(map(str, range(1, 21))),
                   help="AR/VAR orders to choose from on the validation split (default 1..20)")
    p.add_argument("--log", action="store_true", help="fit AR/VAR to log-populations (default: populations)")
    p.add_argument("--no-ode", action="store_true", help="skip the Lotka-Volterra ODE fit (the slowest forecaster)")
    return p


def main(argv=None) -> int:
    s = settings.parse(build_parser(), argv)
    run, data, forecast = s["run"], s["data"], s["forecast"]
    splits = [x.strip() for x in s["splits"].split(",") if x.strip()]
    bad = [x for x in splits if x not in settings.SPLITS] or ([] if splits else ["(none)"])
    if bad:
        raise settings.UsageError(f"--splits {s['splits']!r}: each must be one of {', '.join(settings.SPLITS)}")
    try:
        orders = sorted({int(x) for x in s["orders"].split(",") if x.strip()})
    except ValueError:
        orders = []
    largest = (forecast.context_steps - 2) // 3  # a VAR(p) with intercept needs 3p + 2 observed steps
    if not orders or orders[0] < 1 or orders[-1] > largest:
        raise settings.UsageError(f"--orders {s['orders']!r}: integers between 1 and {largest} (a VAR(p) fitted to "
                                  f"{forecast.context_steps} observed steps needs 3p + 2 of them)")
    session = Session(STAGE, run, data)
    ds = session.dataset
    dt = float(ds.data.time[1] - ds.data.time[0])

    # choose p for AR and VAR on the validation split (its trajectories and horizon)
    _, _, contexts, truth = ds.forecast_set(dataclasses.replace(forecast, split="validation"))
    forecasters, search = validated_forecasters(contexts, truth, orders, dt, log=s["log"], ode=not s["no_ode"])
    results = session.results(forecast=forecast)
    results.weights = None  # no language model
    results.details.update(order_search=search, dt=dt, flops_note="classical forecasters spend no LLM FLOPs")
    results.flops["planned"] = 0
    for split in splits:
        fs = dataclasses.replace(forecast, split=split)
        for forecaster in forecasters:
            tag = f"{forecaster.name}_{split}".replace("(", "").replace(")", "")
            evaluation = recipes.forecast_and_save(session, forecaster, fs, tag, f"{forecaster.name}, {split}",
                                                   settings=forecaster.settings(), weights=None)
            evaluation.settings["fallbacks"] = forecaster.n_fallback
            results.evaluations[f"{forecaster.name}/{split}"] = evaluation
            recipes.print_evaluation(evaluation)
            if forecaster.n_fallback:
                print(f"  ({forecaster.n_fallback} trajectories fell back to persistence)")
    results.add_flops("generate", 0)
    session.finish(results)
    print(f"wrote {session.out}/results.json (no FLOPs charged: no language model was run)")
    return 0


if __name__ == "__main__":
    settings.run_cli(main)
