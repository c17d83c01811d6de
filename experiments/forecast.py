"""Forecast any two-species series with the base model, a trained adapter or a classical forecaster.

From Python, :func:`forecast` (``experiments.lib.forecast_core``); on the command line, a thin layer over it:

    python -m experiments.forecast --data SERIES.csv [--columns PREY,PREDATOR] [--adapter DIR] [--samples N]
    python -m experiments.forecast --data lotka_volterra_data.h5 --index 950 [--adapter DIR] [--method var]
    python -m experiments.forecast --data docs/hare_lynx.csv --columns Hare,Lynx --backtest 5 --horizon 10

The context is the last ``--context-steps`` rows of a CSV (default 80; the forecast continues past its end, and a
file of any length is read row by row, keeping only those rows), or the first ``--context-steps`` steps of an HDF5
trajectory (default 80; the steps after them are compared with the forecast). The next ``--horizon`` steps are
forecast. ``--adapter DIR`` is a PEFT-format export of this project (``peft_adapter/`` of a training stage); its card
(``miniqwen_llmtime.json``, :mod:`experiments.lib.adapter_card`) gives the LLMTIME scale, decimals, encoding and
prompt it was trained with. Without it the base model reads the series at a scale fitted on the context (or
``--llmtime-scale``; ``--llmtime-scale fit`` fits it on the context by the adapter's own rule, for a series in
any units). ``--samples N`` > 1: the median of N samples with their 10–90 % band (LLMTIME's point and
interval). ``--method var|ar|parrot|persistence|lv`` fits a classical forecaster to the context instead (orders
chosen on a holdout at its end, :func:`experiments.lib.forecast_core.classical`); these import no torch.
``--backtest N`` forecasts the whole series from its last N origins with each of ``--methods`` and compares them
(:mod:`experiments.lib.backtest`: backtest.csv, backtest.json, backtest.png).

Writes ``forecast.csv`` (step, time, prey, predator[, quantiles], under the CSV's own column names, the forecast
times continuing the context's last time step), ``forecast.png`` and ``run.json`` under ``--out`` (default
``runs/forecast``; a run there is replaced only with ``--overwrite``). A bad CSV, option or adapter stops it with
one line (exit status 2) before anything is written. Progress bars only when stderr is a terminal (``--progress``,
``--no-progress`` to choose). Not charged to the FLOP ledger (a forecast of your own series is not one of the
experiments); the counted FLOPs are printed and recorded in run.json.

Nothing imported here at module level imports torch: only ``method="llm"`` (and the command line) loads it.
"""

from __future__ import annotations

import os
import time as clock
from contextlib import nullcontext
from pathlib import Path

from .lib.backtest import Backtest, backtest, cli_backtest as backtest_stage  # noqa: F401 (the API)
from .lib.forecast_core import METHODS, Forecast, check_options, forecast, parrot_note  # noqa: F401 (the API)
from .lib.forecast_core import _forecast, number_or_fit

STAGE = "forecast"
OPTIONS = {"context_steps", "decimals", "encoding", "prompt"}  # explicit values are checked against the card


# ------------------------------------------------------------------------------------------------ the command line

def build_parser():
    from .lib import cli, settings

    p = cli.ArgumentParser(prog="python -m experiments.forecast", description=__doc__.split("\n\n")[0])
    g = p.add_argument_group("series")
    g.add_argument("--data", required=True, help="a CSV with a header row, or the coursework HDF5 file (--index)")
    g.add_argument("--index", type=int, default=None, help="trajectory of the HDF5 file to forecast")
    g.add_argument("--columns", default=None, help="the CSV's prey and predator columns (default: prey,predator)")
    g.add_argument("--time-column", default=None,
                   help="the CSV's time column (default: one named time or t, else the first other column if it "
                        "holds increasing numbers)")
    g.add_argument("--method", default="llm", choices=METHODS, help="forecaster (default llm)")
    g.add_argument("--adapter", default=None, help="PEFT-format adapter directory with its card (default: none)")
    g.add_argument("--llmtime-scale", type=number_or_fit, default=None,
                   help="data units per text unit, or fit: fitted on the context by the adapter's rule (default: "
                        "the adapter's, else fitted on the context)")
    g.add_argument("--context-steps", type=int, default=80,
                   help="rows of context: the last of a CSV, the first of an HDF5 trajectory (default 80, or all "
                        "rows if fewer)")
    g.add_argument("--horizon", type=int, default=20, help="steps to forecast (default 20)")
    g.add_argument("--samples", type=int, default=1, help="1 = greedy (default); N = median of N, 10-90%% band")
    g.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (--samples > 1)")
    g.add_argument("--top-p", type=float, default=0.9, help="nucleus mass (--samples > 1)")
    g.add_argument("--prompt", default="raw", choices=["raw", "chat"], help="without an adapter (default raw)")
    g.add_argument("--decimals", type=int, default=2, help="without an adapter (default 2)")
    g.add_argument("--encoding", default="decimal", choices=["decimal", "integer"], help="without an adapter")
    g.add_argument("--backtest", type=int, default=None, metavar="N",
                   help="forecast from the series' last N origins with each of --methods, compare them")
    g.add_argument("--backtest-step", type=int, default=None, help="rows between origins (default --horizon)")
    g.add_argument("--methods", default=None, help="--backtest's forecasters, e.g. var,parrot,llm (default: "
                                                   "var,ar,parrot,persistence,lv)")
    g = p.add_argument_group("run")
    g.add_argument("--model", default=os.environ.get(settings.MODEL_ENV_VAR, settings.RunSettings.model),
                   help="HF-layout model directory or Hub repo id (default: $MINIQWEN_MODEL or the Hub's)")
    g.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:N or mps (default auto)")
    g.add_argument("--precision", default="auto", choices=settings.PRECISIONS, help="compute dtype (default auto)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    g.add_argument("--out", default=None, help="output directory (default runs/forecast)")
    g.add_argument("--overwrite", action="store_true", help="replace the forecast run already in --out")
    g.add_argument("--progress", dest="show_progress", action="store_const", const=True, default=None,
                   help="progress bars even when stderr is not a terminal (default: only on a terminal)")
    g.add_argument("--no-progress", dest="show_progress", action="store_const", const=False, help="no progress bars")
    return p


def main(argv=None) -> int:
    from .lib import cli, settings
    from .lib import series_forecast as sf
    from .lib.evaluation import write_csv
    from .lib.loader import emulation
    from .lib.run_directory import RunDirectory

    p = build_parser()
    s = cli.parse(p, argv)
    run, data, fcs, method, adapter = s["run"], s["data"], s["forecast"], s["method"], s["adapter"]
    explicit = {name for name in OPTIONS if cli.given(p, argv, name)}
    scale = s["llmtime_scale"]
    if {s["backtest"], s["backtest_step"], s["methods"]} != {None}:
        return backtest_stage(p, argv, s, explicit)
    check_options(method, adapter, scale, fcs.samples, explicit, cli=True)
    series = sf.read_input(data.data, s["index"], s["columns"], s["time_column"], fcs.context_steps,
                           "context_steps" in explicit)
    C, H = min(fcs.context_steps, len(series.values)), fcs.horizon
    out = Path(run.out).expanduser() if run.out else Path("runs") / STAGE
    # refused before any model is loaded or file written
    directory = RunDirectory(out, sf.STAGE, overwrite=run.overwrite)
    where = "the first" if s["index"] is not None else "the last"
    print(f"series: {series.source}, {series.rows} steps; context {where} {C}, horizon {H}; method {method}")
    t0 = clock.time()
    with emulation(run.device, run.precision) if method == "llm" else nullcontext():  # bf16 emulated if no bf16
        result = _forecast(series.values[:C], H, method, adapter, run.model if method == "llm" else None, scale,
                           fcs.samples, columns=series.columns, time=None if series.time is None else series.time[:C],
                           temperature=fcs.temperature, top_p=fcs.top_p, progress=s["show_progress"],
                           decimals=data.decimals if "decimals" in explicit else None,
                           encoding=data.encoding if "encoding" in explicit else None,
                           prompt=fcs.prompt if "prompt" in explicit else None, device=run.device,
                           precision=run.precision, seed=run.seed, cli=True, source=series.source, log=print)
    details = dict(result.settings)
    if method == "llm":
        title = f"{'LoRA adapter ' + details['adapter'] + ' on ' if adapter else 'base model '}{details['weights']}"
        details["texts"] = result.texts
    else:
        title = details["label"] + (f", chosen on a holdout of {details['holdout_steps']} steps"
                                    if "chosen" in details else "")
        scores = ", ".join(f"{k}: {v:.4g}" for k, v in details.get("mse_by_choice", {}).items())
        print(f"forecaster: {title}" + (f" (holdout MSE by choice: {scores})" if scores else ""))
        if method == "parrot" and (note := parrot_note(details["forecaster"]["m"], details["period"],
                                                       details["fallbacks"])):
            print(note)
    time_name = series.time_column or "time"
    rows = sf.forecast_rows(result, time_name)
    record = {"settings": settings.as_record(run=run, data=data, forecast=fcs),
              "input": {"source": series.source, "columns": list(series.columns), "time_column": series.time_column,
                        "rows": series.rows, "context": f"{where} {C} rows"},
              "context_steps": C, "horizon": H, "method": method, "flops": int(result.flops),
              "seconds": round(clock.time() - t0, 2), **details}
    sf.write_run(directory, record, {
        "forecast.csv": lambda path: write_csv(path, rows),
        "forecast.png": lambda path: sf.plot(path, series, C, result,
                                             f"{series.source}: {C} steps of context, {H} forecast\n{title}")})

    for line in sf.summary(series, C, result, rows, method):
        print(line)
    print(f"wrote {out}/forecast.csv, forecast.png, run.json")
    return 0


if __name__ == "__main__":
    from .lib.cli import run_cli

    run_cli(main)
