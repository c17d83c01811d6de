"""Classical forecasters beside the LLM, on the same trajectories and with the same metrics: persistence, AR(p) per
species and VAR(p) over both species (least squares on each trajectory's own observed context; p chosen on the
validation split), the Lotka–Volterra ODE fitted to each context, and context parroting (copy what followed the best
match of the last m steps within the context; m chosen on the validation split).

    python -m experiments.classical --data FILE [--splits validation,test | --split S] [--orders 1,2,...,20]
        [--parrot-lengths 1,2,3,5,8,12,16,20] [--no-ode]

Writes ``results.json`` (one evaluation per forecaster and split, keyed ``"<forecaster>/<split>"``; in ``details``
the order search and, per split, paired comparisons of every forecaster with the best one — bootstrap intervals,
wins, medians, blow-ups, see :mod:`experiments.lib.compare`), ``README.md`` (the tables), per-trajectory CSVs and
forecast plots under ``--out`` (default ``runs/classical``). These forecasters run no language model: they spend no
FLOPs of the 1e17 budget and charge nothing to the ledger.
"""

from __future__ import annotations

import dataclasses

from .lib import cli, defaults, errors, runs, settings, tables
from .lib.parroting import parrot_lengths_for
from .lib.side_by_side import validated_forecasters
from .lib.compare import compare_to_best, comparison_table
from .lib.session import Session
from .lib.side_by_side import positive_integers

STAGE = "classical"
PARROT_LENGTHS = defaults.PARROT_LENGTHS


def build_parser():
    p = cli.parser("python -m experiments.classical", __doc__.split("\n\n")[0], "run", "data", "forecast")
    p.add_argument("--splits", default="validation,test", help="comma-separated splits (default validation,test)")
    p.add_argument("--orders", default=",".join(map(str, range(1, 21))),
                   help="AR/VAR orders to choose from on the validation split (default 1..20)")
    p.add_argument("--parrot-lengths", default=None,
                   help="context-parroting match lengths m to choose from on the validation split (default "
                        f"{','.join(map(str, PARROT_LENGTHS))}, those whose match and Theiler window fit in --context-steps)")
    p.add_argument("--log", action="store_true", help="fit AR/VAR to log-populations (default: populations)")
    p.add_argument("--no-ode", action="store_true", help="skip the Lotka-Volterra ODE fit (the slowest forecaster)")
    return p


def main(argv=None) -> int:
    s = cli.parse(build_parser(), argv)
    run, data, forecast = s["run"], s["data"], s["forecast"]
    text = s["splits"]
    if cli.given(build_parser(), argv, "split"):  # honoured, not ignored: --split S forecasts split S
        if cli.given(build_parser(), argv, "splits"):
            raise errors.UsageError(f"--split {forecast.split} and --splits {text!r}: experiments.classical "
                                    "forecasts the splits in --splits; give one of the two")
        text = forecast.split
    splits = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in splits if x not in settings.SPLITS] or ([] if splits else ["(none)"])
    if bad:
        raise errors.UsageError(f"--splits {text!r}: each must be one of {', '.join(settings.SPLITS)}")
    forecast = dataclasses.replace(forecast, split=splits[0])  # recorded as forecast.split: the first split run
    C = forecast.context_steps
    orders = integers("--orders", s["orders"], (C - 2) // 3,  # a VAR(p) with intercept needs 3p + 2 observed steps
                      f"a VAR(p) fitted to {C} observed steps needs 3p + 2 of them")
    lengths = parrot_lengths_for(C, PARROT_LENGTHS) if s["parrot_lengths"] is None else \
        integers("--parrot-lengths", s["parrot_lengths"], max(1, C // 2),
                 f"a match of m steps at lag >= max(m, 2) needs m + max(m, 2) of the {C} observed")
    session = Session(STAGE, run, data)
    ds = session.dataset
    dt = float(ds.data.time[1] - ds.data.time[0])

    # choose p for AR and VAR and m for parroting on the validation split (its trajectories and horizon)
    _, _, contexts, truth = ds.forecast_set(dataclasses.replace(forecast, split="validation"))
    forecasters, search = validated_forecasters(contexts, truth, orders, dt, log=s["log"], ode=not s["no_ode"],
                                                parrot_lengths=lengths)
    results = session.results(forecast=forecast)
    results.weights = None  # no language model
    results.settings["splits"] = splits  # what was forecast (forecast.split is the first)
    results.details.update(order_search=search, dt=dt, flops_note="classical forecasters spend no LLM FLOPs")
    results.flops["planned"] = 0
    comparisons, readme = {}, ["Chosen on the validation split: " + ", ".join(
        f"{name} {'m' if name == 'parrot' else 'p'} = {v['chosen']}" for name, v in search.items()) + "."]
    for split in splits:
        fs = dataclasses.replace(forecast, split=split)
        indices, _, _, split_truth = ds.forecast_set(fs)
        for forecaster in forecasters:
            tag = f"{runs.file_tag(forecaster.name)}_{split}"
            evaluation = runs.forecast_and_save(ds, forecaster, fs, session.out, tag, f"{forecaster.name}, {split}",
                                                None, settings=forecaster.settings())
            results.evaluations[f"{forecaster.name}/{split}"] = evaluation
            tables.print_evaluation(evaluation)
        # paired comparisons with the best forecaster of this split, trajectory by trajectory
        comparisons[split] = compare_to_best({f.name: f.last_prediction for f in forecasters}, split_truth, indices,
                                             seed=run.seed)
        table = comparison_table(comparisons[split]["comparisons"])
        scores = tables.evaluation_table({f.name: results.evaluations[f"{f.name}/{split}"] for f in forecasters})
        readme += [f"## {split} split: {len(indices)} trajectories, {C} steps observed → {forecast.horizon} forecast",
                   scores, f"Best: {comparisons[split]['best']}. Paired comparisons:", table]
        print(f"\n{split}: paired comparisons with the best forecaster\n{table}")
    body = "\n\n".join(readme)
    results.details.update(comparisons=comparisons, table_markdown=body)
    tables.write_run_readme(session.out / "README.md", "Classical forecasters",
                             tables.command_line("experiments.classical", argv), body)
    results.add_flops("generate", 0)
    session.finish(results)
    print(f"wrote {session.out}/results.json and README.md (no FLOPs charged: no language model was run)")
    return 0


def integers(option: str, text: str, largest: int, why: str) -> list[int]:
    """The sorted distinct integers of a comma-separated ``text``; UsageError naming ``option`` unless all are in
    ``1..largest`` (``why`` says where the bound comes from)."""
    values = positive_integers(text)
    if largest < 1:  # no value could do: say which option makes it so
        raise errors.UsageError(f"{option} {text!r}: none fits ({why}): give more --context-steps")
    if not values or values[-1] > largest:
        raise errors.UsageError(f"{option} {text!r}: integers between 1 and {largest} ({why})")
    return values


if __name__ == "__main__":
    cli.run_cli(main)
