"""Backtests on one's own series: forecast it from N rolling origins with each of several forecasters and compare
them, as ``python -m experiments.forecast --backtest N`` does (:func:`cli_backtest`) and :func:`backtest` returns.

An origin ``o`` is a row of the series: the forecast of ``horizon`` steps starts there, from the context of the rows
before it (all of them, or the last ``context_steps``), and is scored against rows ``o .. o + horizon - 1``. The N
origins are the last N the series allows, ``step`` rows apart (default ``horizon``: forecasts that tile the end of
the series without overlap), the last one ``T - horizon``. Every forecaster sees the same contexts; the origins are
the paired units of :func:`experiments.lib.compare.compare_to_best` (each forecaster against the best one, the best
against persistence, with paired bootstrap intervals over origins), the way the experiments compare forecasters over
trajectories. A classical forecaster is refitted on each origin's context (its order chosen on that context alone,
:func:`experiments.lib.forecast_core.classical`), so nothing after an origin is ever seen.

Shapes: a series ``[T, 2]`` (prey, predator, data units); ``truth`` and each method's ``forecasts`` ``[N, H, 2]``.
Imports no torch unless "llm" is among the methods.
"""

from __future__ import annotations

import json
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UsageError
from .forecast_core import METHODS, _as_context, _count, _forecast, check_options
from .option_names import option

SPECIES = ("prey", "predator")  # = compare.SPECIES (compare imports scipy: only when comparing)
CLASSICAL = ("var", "ar", "parrot", "persistence", "lv")  # the default methods: fitted to each context, no model
MIN_CONTEXT = 2  # rows the first origin must have before it
LLM_DEFAULTS = {"adapter": None, "model": None, "llmtime_scale": None, "samples": 1, "temperature": 0.7,
                "top_p": 0.9, "decimals": None, "encoding": None, "prompt": None, "device": None,
                "precision": "auto"}  # forecast()'s options of method "llm", and their defaults
FILES = ("backtest.csv", "backtest.json", "backtest.png")


@dataclass
class Backtest:
    """The forecasts of a backtest and how they scored (:func:`backtest`).

    Attributes:
        origins: ``[N]`` row of the series (0-based) where each forecast starts, oldest first.
        times: ``[N, H]`` the times of the forecast steps (the series' time column), None without times.
        truth: float64 ``[N, H, 2]`` what the series holds at those steps.
        forecasts: ``{method: float64 [N, H, 2]}`` (NaN where the LLM's text gave no number).
        metrics: ``{method: {"prey": {"mse", "mae"}, "predator": {...}, "steps_unparsed": int}}`` over all origins
            and steps (MSE in squared data units, MAE in data units; unparsed steps left out).
        comparison: :func:`compare.compare_to_best` over the origins where every method gave every step, plus
            ``"origins"`` (those origins); None with one method.
        details: ``{method: [the forecast's settings at each origin]}`` (orders chosen, LLMTIME format, texts).
        settings: n_origins, horizon, step, context_steps, methods. columns: the prey and predator names.
        flops: FLOPs counted over all forecasts (the LLM's; 0 for classical methods).
    """

    origins: list[int]
    times: np.ndarray | None
    truth: np.ndarray
    forecasts: dict[str, np.ndarray]
    metrics: dict
    comparison: dict | None
    details: dict[str, list[dict]]
    settings: dict
    columns: tuple[str, str] = SPECIES
    flops: int = 0

    def rows(self, time_name: str = "time") -> list[dict]:
        """backtest.csv's rows: origin, method, step (1..H), the step's time (under ``time_name``, if known), the
        forecast (under the series' column names; empty where unparsed) and the truth (``NAME_truth``)."""
        prey, predator = self.columns
        rows = []
        for method, values in self.forecasts.items():
            for i, origin in enumerate(self.origins):
                for h in range(values.shape[1]):
                    row = {"origin": origin, "method": method, "step": h + 1}
                    row |= {time_name: float(self.times[i, h])} if self.times is not None else {}
                    row |= {prey: values[i, h, 0], predator: values[i, h, 1],
                            f"{prey}_truth": self.truth[i, h, 0], f"{predator}_truth": self.truth[i, h, 1]}
                    rows.append({k: "" if isinstance(v, float) and np.isnan(v) else v for k, v in row.items()})
        return rows

    def table(self, spec: str = ".4g") -> str:
        """Markdown table of :attr:`metrics`, one row per method (the best by mean MSE over species marked)."""
        prey, predator = self.columns
        best = self.comparison["best"] if self.comparison else None
        lines = [f"| method | {prey} MSE | {prey} MAE | {predator} MSE | {predator} MAE | steps unparsed |",
                 "| --- |" + " ---: |" * 5]
        for method, m in self.metrics.items():
            cells = [format(m[sp][k], spec) for sp in SPECIES for k in ("mse", "mae")]
            lines.append(f"| {method}{' (best)' if method == best else ''} | {' | '.join(cells)} | "
                         f"{m['steps_unparsed']} |")
        return "\n".join(lines)

    def record(self) -> dict:
        """backtest.json: settings, origins, metrics, the paired comparisons and each forecast's details."""
        return {"settings": self.settings, "columns": list(self.columns), "origins": self.origins,
                "origin_times": None if self.times is None else self.times[:, 0].tolist(),
                "metrics": self.metrics, "comparison": self.comparison, "flops": self.flops,
                "details": self.details}


def origins(T: int, n_origins: int, horizon: int, step: int | None = None, cli: bool = False) -> list[int]:
    """The last ``n_origins`` origins of a series of ``T`` rows, ``step`` (default ``horizon``) apart, oldest first:
    ``T - horizon - k · step`` for k = N-1 .. 0. Raises UsageError if the first would leave fewer than
    :data:`MIN_CONTEXT` rows of context."""
    step = horizon if step is None else step
    found = [T - horizon - k * step for k in range(n_origins - 1, -1, -1)]
    if found[0] < MIN_CONTEXT:
        room = max(0, (T - horizon - MIN_CONTEXT) // step + 1)
        raise UsageError(f"{option('backtest' if cli else 'n_origins', n_origins, cli)}: {T} rows hold only {room} "
                         f"origins {step} rows apart with {horizon} rows of truth after each and {MIN_CONTEXT} of "
                         f"context before the first")
    return found


def backtest(series, n_origins: int, horizon: int = 20, methods=CLASSICAL, *, step: int | None = None,
             context_steps: int | None = None, columns: tuple[str, str] | None = None, time=None, seed: int = 0,
             n_resamples: int = 9999, progress: bool | None = None, log=None, cli: bool = False,
             source: str = "series", **llm) -> Backtest:
    """Forecast ``series`` from its last ``n_origins`` origins with each of ``methods`` and compare them.

    Args:
        series: ``(T, 2)`` prey, predator in raw units (finite, >= 0), oldest first, or a pandas DataFrame (as
            :func:`experiments.forecast.forecast` takes it, with ``columns`` and ``time``).
        n_origins: N >= 1 origins (module docstring); horizon: steps forecast from each (>= 1).
        methods: names from :data:`forecast_core.METHODS` (default the classical ones, :data:`CLASSICAL`).
        step: rows between origins (default ``horizon``). context_steps: the context is at most the last this many
            rows before each origin (default: all of them).
        seed: the LLM's sampling seed and the bootstrap's. n_resamples: bootstrap resamples of the comparisons.
        progress, log: as :func:`experiments.forecast.forecast` (``log``: print what is done, e.g. ``print``).
        cli: errors name command-line options. source: the series' name in messages.
        llm: the options of method "llm", as :func:`experiments.forecast.forecast` takes them (adapter, model,
            llmtime_scale, samples, temperature, top_p, decimals, encoding, prompt, device, precision).

    Returns:
        :class:`Backtest`.

    Raises:
        UsageError (one line naming the argument): a bad argument or method, too few rows for N origins, an LLM
            option without method "llm", a context too short for a method at an origin (named).
        AdapterError, WeightsError, ConfigError: an unusable adapter or model ("llm" only).
    """
    values, times, names = _as_context(series, columns, time)
    N, H = _count("backtest" if cli else "n_origins", n_origins, cli), _count("horizon", horizon, cli)
    step = H if step is None else _count("backtest_step" if cli else "step", step, cli)
    context_steps = None if context_steps is None else _count("context_steps", context_steps, cli)
    methods = _methods(methods, cli)
    unknown = sorted(set(llm) - set(LLM_DEFAULTS))
    if unknown:
        raise UsageError(f"{unknown[0]}=: not an option of backtest (LLM options: {', '.join(LLM_DEFAULTS)})")
    opts = LLM_DEFAULTS | llm
    given = {k for k in ("decimals", "encoding", "prompt", "model") if opts[k] is not None}
    check_options("llm" if "llm" in methods else methods[0], opts["adapter"], opts["llmtime_scale"],
                  _count("samples", opts["samples"], cli), given, cli)
    at = origins(len(values), N, H, step, cli)
    forecasts, details, flops = {}, {}, 0
    for method in methods:
        call = opts if method == "llm" else LLM_DEFAULTS
        runs = []
        for o in at:
            start = 0 if context_steps is None else max(0, o - context_steps)
            when = f"origin {o}" + (f" ({times[o]:g})" if times is not None else "")
            try:
                runs.append(_forecast(values[start:o], H, method, **call, columns=names,
                                      time=None if times is None else times[start:o], seed=seed, progress=progress,
                                      cli=cli, source=f"{source}, {when}", log=log))
            except UsageError as err:
                raise UsageError(f"{source}, {when}, {o - start} rows of context: {err}") from None
        forecasts[method] = np.stack([r.values for r in runs])
        details[method] = [r.settings | ({"texts": r.texts} if r.texts else {}) for r in runs]
        flops += sum(r.flops for r in runs)
    truth = np.stack([values[o : o + H] for o in at])
    step_times = None if times is None else np.stack([times[o : o + H] for o in at])
    settings = {"n_origins": N, "horizon": H, "step": step, "context_steps": context_steps,
                "methods": list(methods), "rows": len(values)}
    return Backtest(at, step_times, truth, forecasts, _metrics(forecasts, truth),
                    _compare(forecasts, truth, at, seed, n_resamples), details, settings, names, flops)


def _methods(methods, cli: bool) -> tuple[str, ...]:
    """``methods`` (a sequence or "a,b") as a tuple of distinct known names; UsageError otherwise."""
    names = tuple(m.strip() for m in methods.split(",")) if isinstance(methods, str) else tuple(methods)
    what = option("methods", ",".join(map(str, names)), cli)
    if not names or any(m not in METHODS for m in names) or len(set(names)) < len(names):
        raise UsageError(f"{what}: must be distinct names from {', '.join(METHODS)}, at least one")
    return names


def _metrics(forecasts: dict[str, np.ndarray], truth: np.ndarray) -> dict:
    """Per method and species, MSE and MAE over every origin and step it gave a number for."""
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a method that gave no number at all: NaN
        for method, pred in forecasts.items():
            err = pred - truth
            out[method] = {sp: {"mse": float(np.nanmean(err[..., k] ** 2)),
                                "mae": float(np.nanmean(np.abs(err[..., k])))} for k, sp in enumerate(SPECIES)}
            out[method]["steps_unparsed"] = int(np.isnan(pred).any(-1).sum())
    return out


def _compare(forecasts: dict[str, np.ndarray], truth: np.ndarray, at: list[int], seed: int,
             n_resamples: int) -> dict | None:
    """:func:`compare.compare_to_best` over the origins (the paired units) where every method gave every step."""
    from .compare import compare_to_best

    keep = np.all([np.isfinite(p).all(axis=(1, 2)) for p in forecasts.values()], axis=0)
    if len(forecasts) < 2 or not keep.any():
        return None
    used = [o for o, k in zip(at, keep) if k]
    result = compare_to_best({m: p[keep] for m, p in forecasts.items()}, truth[keep], used, seed=seed,
                             n_resamples=n_resamples)
    pairs = set()  # compare_to_best compares the best with persistence and persistence with the best: keep one
    result["comparisons"] = [c for c in result["comparisons"]
                             if not (frozenset((c["a"], c["b"])) in pairs or pairs.add(frozenset((c["a"], c["b"]))))]
    return result | {"origins": used}


# ------------------------------------------------------------------------------------------------ files, the stage

def plot(path: Path, result: Backtest, values: np.ndarray, times: np.ndarray | None, time_name: str,
         title: str) -> bool:
    """PNG: one panel per species (the series, every method's forecast from every origin, the origins dotted) and a
    bar chart of each method's MAE per species. Returns False without matplotlib."""
    from .plots import _figure, _save, _wrap

    fig = _figure(10, 8)
    if fig is None:
        return False
    axes = fig.subplots(3, 1, gridspec_kw={"height_ratios": [3, 3, 2]})
    t = times if times is not None else np.arange(len(values), dtype=float)
    steps = result.times if result.times is not None else np.array([np.arange(o, o + result.truth.shape[1])
                                                                    for o in result.origins], dtype=float)
    colours = dict(zip(result.forecasts, [f"C{i}" for i in range(10)] * 2))
    for k, ax in enumerate(axes[:2]):
        ax.plot(t, values[:, k], color="black", lw=1.0, label=f"{result.columns[k]} (series)")
        for i, o in enumerate(result.origins):
            ax.axvline(t[o], color="grey", lw=0.6, ls=":")
            for method, pred in result.forecasts.items():
                ax.plot(np.r_[t[o - 1], steps[i]], np.r_[values[o - 1, k], pred[i, :, k]], color=colours[method],
                        ls="--", lw=1.3, label=method if i == 0 else None)
        ax.set_ylabel(result.columns[k])
        ax.legend(fontsize=7, ncol=len(result.forecasts) + 1, loc="upper left")
    axes[1].set_xlabel(time_name if times is not None else "step")
    width = 0.8 / len(SPECIES)
    x = np.arange(len(result.metrics))
    for k, sp in enumerate(SPECIES):
        axes[2].bar(x + (k - 0.5) * width, [m[sp]["mae"] for m in result.metrics.values()], width,
                    label=f"{result.columns[k]} MAE")
    axes[2].set_xticks(x, list(result.metrics))
    axes[2].set_ylabel("MAE over origins")
    axes[2].legend(fontsize=7)
    axes[0].set_title(_wrap(title, 120), fontsize=9)
    fig.tight_layout()
    _save(fig, path, 110)
    return True


def cli_backtest(p, argv, s: dict, explicit: set[str]) -> int:
    """``python -m experiments.forecast --backtest N``: refuse misused options, read the whole series, backtest it
    (:func:`backtest`), write backtest.csv, backtest.json, backtest.png and run.json under ``--out`` (default
    ``runs/backtest``) and print the metrics and comparisons. Returns the exit status (0)."""
    from miniqwen.atomic import atomic_write

    from . import series_forecast as sf
    from .cli import given
    from .compare import comparison_table
    from .evaluation import write_csv
    from .loader import emulation
    from .run_directory import RunDirectory
    from .settings import as_record

    run, data, fcs = s["run"], s["data"], s["forecast"]
    if s["backtest"] is None:
        raise UsageError(f"{'--methods' if s['methods'] is not None else '--backtest-step'}: applies to "
                         "--backtest N only")
    if given(p, argv, "method"):
        raise UsageError("--method: with --backtest, name the forecasters with --methods (e.g. --methods "
                         "var,parrot,llm)")
    methods = _methods(s["methods"] if s["methods"] is not None else CLASSICAL, cli=True)
    series = sf.read_input(data.data, s["index"], s["columns"], s["time_column"], fcs.context_steps,
                           "context_steps" in explicit, whole=True)
    out = Path(run.out).expanduser() if run.out else Path("runs") / "backtest"
    directory = RunDirectory(out, sf.STAGE, overwrite=run.overwrite)
    llm = {"adapter": s["adapter"], "model": run.model if "llm" in methods else None,
           "llmtime_scale": s["llmtime_scale"], "samples": fcs.samples, "temperature": fcs.temperature,
           "top_p": fcs.top_p, "device": run.device, "precision": run.precision,
           **{k: getattr(data if k != "prompt" else fcs, k) if k in explicit else None
              for k in ("decimals", "encoding", "prompt")}}
    print(f"series: {series.source}, {series.rows} steps; backtest from {s['backtest']} origins, horizon "
          f"{fcs.horizon}, context up to {fcs.context_steps} rows; methods {', '.join(methods)}")
    with (sf.keep_loaded() if "llm" in methods else nullcontext(),  # one model for every origin
          emulation(run.device, run.precision) if "llm" in methods else nullcontext()):  # bf16 emulated if no bf16
        result = backtest(series.values, s["backtest"], fcs.horizon, methods, step=s["backtest_step"],
                          context_steps=fcs.context_steps, columns=series.columns, time=series.time,
                          seed=run.seed, progress=s["show_progress"], log=print, cli=True, source=series.source,
                          **llm)
    time_name = series.time_column or "time"
    title = (f"{series.source}: backtest from {len(result.origins)} origins, {fcs.horizon} steps each; "
             + ", ".join(methods))
    record = {"settings": as_record(run=run, data=data, forecast=fcs),
              "input": {"source": series.source, "columns": list(series.columns), "time_column": series.time_column,
                        "rows": series.rows}, "backtest": result.settings, "flops": int(result.flops)}
    sf.write_run(directory, record, {
        "backtest.csv": lambda path: write_csv(path, result.rows(time_name)),
        "backtest.json": lambda path: atomic_write(path, json.dumps(result.record(), indent=2, default=float) + "\n"),
        "backtest.png": lambda path: plot(path, result, series.values, series.time, time_name, title)})
    print(result.table())
    if result.comparison:
        print(comparison_table(result.comparison["comparisons"], legend=False))
    print(f"wrote {out}/{', '.join(FILES)}, run.json")
    return 0
