"""Forecast any two-species series with the base model, a trained adapter or a classical forecaster.

    python -m experiments.forecast --data SERIES.csv [--columns PREY,PREDATOR] [--adapter DIR] [--samples N]
    python -m experiments.forecast --data lotka_volterra_data.h5 --index 950 [--adapter DIR] [--method var]

The first ``--context-steps`` rows are the context (default: 80 of an HDF5 trajectory, every row of a CSV); the next
``--horizon`` steps are forecast. ``--adapter DIR`` is a PEFT-format export of this project (``peft_adapter/``
of a training stage); its card (``miniqwen_llmtime.json``, :mod:`experiments.lib.adapter_card`) gives the LLMTIME
scale, decimals, encoding and prompt it was trained with. Without it the base model reads the series at a scale
fitted on the context (or ``--llmtime-scale``). ``--samples N`` > 1: the median of N samples with their 10–90 %
band (LLMTIME's point and interval). ``--method var|ar|parrot|persistence|lv`` fits a classical forecaster to the
context instead (orders chosen on a holdout at its end, :func:`series_forecast.classical`).

Writes ``forecast.csv`` (step, time, prey, predator[, quantiles]), ``forecast.png`` and ``run.json`` under ``--out``
(default ``runs/forecast``; a run there is replaced only with ``--overwrite``). A bad CSV, option or adapter stops
it with one line (exit status 2) before anything is written. Not charged to the FLOP ledger (a forecast of your own
series is not one of the experiments); the counted FLOPs are printed and recorded in run.json.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from .lib import cli
from .lib import series_forecast as sf
from .lib import settings
from .lib.evaluation import write_csv
from .lib.session import seed_everything

STAGE = sf.STAGE
OPTIONS = {"context_steps", "decimals", "encoding", "prompt"}  # explicit values are checked against the card


def build_parser():
    p = cli.ArgumentParser(prog="python -m experiments.forecast", description=__doc__.split("\n\n")[0])
    g = p.add_argument_group("series")
    g.add_argument("--data", required=True, help="a CSV with a header row, or the coursework HDF5 file (--index)")
    g.add_argument("--index", type=int, default=None, help="trajectory of the HDF5 file to forecast")
    g.add_argument("--columns", default=None, help="the CSV's prey and predator columns (default: prey,predator)")
    g.add_argument("--method", default="llm", choices=sf.METHODS, help="forecaster (default llm)")
    g.add_argument("--adapter", default=None, help="PEFT-format adapter directory with its card (default: none)")
    g.add_argument("--llmtime-scale", type=float, default=None,
                   help="data units per text unit (default: the adapter's, else fitted on the context)")
    g.add_argument("--context-steps", type=int, default=80, help="rows of context (default: 80 of HDF5, all of CSV)")
    g.add_argument("--horizon", type=int, default=20, help="steps to forecast (default 20)")
    g.add_argument("--samples", type=int, default=1, help="1 = greedy (default); N = median of N, 10-90%% band")
    g.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (--samples > 1)")
    g.add_argument("--top-p", type=float, default=0.9, help="nucleus mass (--samples > 1)")
    g.add_argument("--prompt", default="raw", choices=["raw", "chat"], help="without an adapter (default raw)")
    g.add_argument("--decimals", type=int, default=2, help="without an adapter (default 2)")
    g.add_argument("--encoding", default="decimal", choices=["decimal", "integer"], help="without an adapter")
    g = p.add_argument_group("run")
    g.add_argument("--model", default=os.environ.get(settings.MODEL_ENV_VAR, settings.RunSettings.model),
                   help="HF-layout model directory or Hub repo id (default: $MINIQWEN_MODEL or the Hub's)")
    g.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:N or mps (default auto)")
    g.add_argument("--precision", default="auto", choices=settings.PRECISIONS, help="compute dtype (default auto)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    g.add_argument("--out", default=None, help="output directory (default runs/forecast)")
    g.add_argument("--overwrite", action="store_true", help="replace the forecast run already in --out")
    return p


def main(argv=None) -> int:
    p = build_parser()
    s = cli.parse(p, argv)
    run, data, forecast, method, adapter = s["run"], s["data"], s["forecast"], s["method"], s["adapter"]
    explicit = {name for name in OPTIONS if cli.given(p, argv, name)}
    scale = s["llmtime_scale"]
    sf.check_options(method, adapter, scale, forecast.samples, explicit)
    series = sf.read_input(data.data, s["index"], s["columns"],
                           forecast.context_steps if "context_steps" in explicit else None)
    hdf5 = s["index"] is not None  # read_input wants --index for an HDF5 file and refuses it for a CSV
    C = min(forecast.context_steps if "context_steps" in explicit or hdf5 else len(series.values), len(series.values))
    H = forecast.horizon
    context = series.values[:C]
    out = Path(run.out).expanduser() if run.out else Path("runs") / STAGE
    if method == "llm":
        fmt = sf.text_format(adapter, data, forecast, scale, context, explicit)
        warning = sf.check_digits(context, fmt, series.source)
        if warning:
            print(f"warning: {series.source}: {warning}")
    found = sf.check_out(out, run.overwrite)  # refused before any model is loaded or file written
    seed_everything(run.seed)
    print(f"series: {series.source}, {len(series.values)} steps; context {C}, horizon {H}; method {method}")
    t0, details = time.time(), {}
    if method == "llm":
        forecasts, label = sf.llm_forecast(run, forecast, fmt, adapter, context, H)
        name = "/".join(Path(adapter).resolve().parts[-2:]) if adapter else None  # no machine path in outputs
        details = {"text_format": vars(fmt), "adapter": name, "weights": label, "texts": forecasts.texts[0],
                   "steps_unparsed": int(np.isnan(forecasts.values).any(-1).sum())}
        title = f"{'LoRA adapter ' + name + ' on ' if adapter else 'base model '}{label}"
    else:
        forecaster, details = sf.classical(method, context, H, series.time_step(C) or 1.0)
        forecasts = forecaster.forecast(context[None], H)
        details |= {"forecaster": forecaster.settings(), "fell_back": forecaster.n_fallback}
        title = forecaster.name + (f", chosen on a holdout of {details['holdout_steps']} steps"
                                   if "chosen" in details else "")
        scores = ", ".join(f"{k}: {v:.4g}" for k, v in details.get("mse_by_choice", {}).items())
        print(f"forecaster: {title}" + (f" (holdout MSE by choice: {scores})" if scores else ""))
    times = sf.future_times(series, C, H)
    rows = sf.forecast_rows(forecasts, times)
    record = {"settings": settings.as_record(run=run, data=data, forecast=forecast),
              "input": {"source": series.source, "columns": list(series.columns), "rows": len(series.values)},
              "context_steps": C, "horizon": H, "method": method, "flops": int(forecasts.flops),
              "seconds": round(time.time() - t0, 2), **details}
    sf.write_run(out, found, record, {
        "forecast.csv": lambda path: write_csv(path, rows),
        "forecast.png": lambda path: sf.plot(path, series, C, forecasts, times,
                                             f"{series.source}: {C} steps of context, {H} forecast\n{title}")})

    for line in sf.summary(series, C, forecasts, rows, method):
        print(line)
    print(f"wrote {out}/forecast.csv, forecast.png, {sf.RECORD}")
    return 0


if __name__ == "__main__":
    cli.run_cli(main)
