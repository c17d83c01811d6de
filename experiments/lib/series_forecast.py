"""The pieces of ``python -m experiments.forecast`` (one series, anyone's): the input series, the LLMTIME text
format (an adapter's card, ``--llmtime-scale``, or a scale fitted on the context) and its digit check, a classical
forecaster fitted to one context, the LLM forecast, and the outputs (forecast CSV, PNG, a run directory that is
never overwritten by surprise).

Shapes: a series is ``[T, 2]`` (prey, predator, data units); the context is its first C rows; forecasts are
``Forecasts`` of one trajectory (``values [1, H, 2]``, ``samples [1, N, H, 2]``).
"""

from __future__ import annotations

import json
import sys
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from data import Series, fit_scale, is_hdf5, read_series_csv, read_trajectory
from miniqwen.atomic import atomic_write

from .adapter_card import CARD_FILE, read_card
from .classical_forecasters import AR, VAR, ContextParroting, LotkaVolterraODE, Persistence, select_order
from .defaults import PARROT_LENGTHS
from .errors import UsageError
from .evaluation import SPECIES, Forecasts, LLMForecaster
from .plots import _figure, _save, _wrap
from .run_directory import RECORD, RunDirectory, empty_run_directory, inspect_out, why_protected
from .session import resolve_precision, weights_label
from .settings import DataSettings, ForecastSettings, RunSettings

STAGE = "forecast"
METHODS = ("llm", "var", "ar", "parrot", "persistence", "lv")
ORDERS = tuple(range(1, 21))  # AR/VAR orders tried (as experiments.classical)
MAX_INTEGER_DIGITS = 3  # what one forecast step's token budget allows per value (evaluation.max_tokens_per_step)
BAND = (0.1, 0.9)  # the quantiles of the samples written and drawn with --samples N > 1


def read_input(path: str, index: int | None, columns: str | None, context_steps: int | None) -> Series:
    """The series to forecast: trajectory ``index`` of a coursework HDF5 file (recognised by its signature or a
    .h5/.hdf5 name), else a CSV (:func:`data.read_series_csv`, prey/predator columns named by ``columns``
    "PREY,PREDATOR" or by the header). ``context_steps`` (None = the default) must fit in it.

    Raises UsageError for options that do not fit the file kind; data.DataError / SeriesError (one line naming the
    file and row) for a bad file or too few rows."""
    if is_hdf5(path) or Path(path).suffix.lower() in (".h5", ".hdf5"):
        if columns is not None:
            raise UsageError(f"--columns: {path} is an HDF5 file, whose columns are fixed (prey, predator)")
        if index is None:
            raise UsageError(f"--index N: {path} is an HDF5 file of many trajectories; say which to forecast")
        series = read_trajectory(path, index)
        if context_steps is not None and context_steps > len(series.values):
            raise UsageError(f"--context-steps {context_steps}: {series.source} has only {len(series.values)} steps")
        return series
    if index is not None:
        raise UsageError(f"--index: {path} is not an HDF5 file (a CSV holds one series)")
    names = None
    if columns is not None:
        names = tuple(c.strip() for c in columns.split(","))
        if len(names) != 2 or not all(names):
            raise UsageError(f"--columns {columns!r}: must be two column names, PREY,PREDATOR")
    return read_series_csv(path, names, context_steps or 1, f"--context-steps {context_steps}" if context_steps else "")


def check_options(method: str, adapter: str | None, scale: float | None, samples: int, explicit: set[str]) -> None:
    """Refuse (UsageError) a bad ``--llmtime-scale`` and options of the LLM (``--adapter``, ``--llmtime-scale``,
    ``--samples`` > 1, explicit ``--decimals/--encoding/--prompt``) with a classical ``method``."""
    if scale is not None and not 0 < scale < float("inf"):
        raise UsageError(f"--llmtime-scale {scale!r}: must be a positive finite number")
    llm_only = [flag for flag, used in [("--adapter", adapter), ("--llmtime-scale", scale), ("--samples", samples > 1)]
                + [(f"--{name}", name in explicit) for name in ("decimals", "encoding", "prompt")] if used]
    if method != "llm" and llm_only:
        raise UsageError(f"{llm_only[0]}: applies to --method llm only, not --method {method}")


@dataclass
class TextFormat:
    """How the context is written for the LLM: LLMTIME scale (data units per text unit), decimals, encoding,
    prompt mode, where the scale comes from (``source``), ``target``, the value the scale maps 99 % of its data
    to (the typical range of the numbers the model reads), and the adapter's base weights (``base_model``, if
    recorded)."""

    llmtime_scale: float
    decimals: int
    encoding: str
    prompt: str
    source: str
    target: float = 10.0
    base_model: str | None = None


def text_format(adapter: str | None, data: DataSettings, forecast: ForecastSettings, scale: float | None,
                context: np.ndarray, explicit: set[str]) -> TextFormat:
    """The adapter's format (its card, :mod:`experiments.lib.adapter_card`; ``--llmtime-scale`` overrides the scale),
    else ``--decimals/--encoding/--prompt`` with ``scale`` or a scale fitted on ``context`` [C, 2] by the dataset
    rule (``data.scale_quantile`` of the values -> ``data.scale_target``; LLMTIME fits a scale per series too).
    ``explicit``: the option fields given on the command line (they must agree with the card).

    Raises UsageError: an option contradicts the card; an adapter without a card and no ``--llmtime-scale``; a
    context of zeros with no scale given. (A trained head bias named by the card is loaded with the adapter by
    ``lora.load_peft``.)
    AdapterError: a bad adapter directory or card."""
    card = read_card(adapter) if adapter else None
    if adapter and card is None and scale is None:
        raise UsageError(f"--adapter {adapter}: no {CARD_FILE} (made before adapters carried their LLMTIME format, "
                         "or elsewhere): pass --llmtime-scale (and --decimals, --encoding, --prompt) as trained")
    if card is not None:
        for name, value in (("decimals", data.decimals), ("encoding", data.encoding), ("prompt", forecast.prompt)):
            if name in explicit and value != getattr(card, name):
                raise UsageError(f"--{name} {value}: the adapter was trained with {name} {getattr(card, name)} "
                                 f"({CARD_FILE}); leave the option out")
        return TextFormat(scale or card.llmtime_scale, card.decimals, card.encoding, card.prompt,
                          "--llmtime-scale" if scale else f"the adapter's ({CARD_FILE})", card.scale_target,
                          card.base_model)
    if scale is None:
        try:
            scale = fit_scale(context, data.scale_quantile, data.scale_target)
        except ValueError:
            raise UsageError("the context is (almost) all zero: no LLMTIME scale can be fitted to it; pass "
                             "--llmtime-scale") from None
        source = f"fitted on the {len(context)} context steps"
    else:
        source = "--llmtime-scale"
    return TextFormat(scale, data.decimals, data.encoding, forecast.prompt, source, data.scale_target)


def check_digits(context: np.ndarray, fmt: TextFormat, where: str) -> str | None:
    """Whether ``context`` [C, 2] can be written at ``fmt``'s scale. Returns a warning line (values far above the
    scale's typical range, or so small that they keep less than 2 significant digits) or None.

    Raises UsageError (one line, ``where`` first): a value would need more than :data:`MAX_INTEGER_DIGITS` integer
    digits (the model could not even write such a forecast in its token budget), or every value is written as 0."""
    scaled = np.asarray(context, dtype=np.float64) / fmt.llmtime_scale
    top, unit = float(scaled.max()), 10.0 ** -fmt.decimals
    if top >= 10 ** MAX_INTEGER_DIGITS:
        raise UsageError(f"{where}: values up to {float(np.max(context)):.4g} are {top:.4g} in text units at LLMTIME "
                         f"scale {fmt.llmtime_scale:.5g} ({fmt.source}): {len(str(int(top)))} integer digits, more "
                         f"than the {MAX_INTEGER_DIGITS} a forecast step may write, so the forecast would be garbage; "
                         "rescale the series (e.g. to the adapter's units) or pass --llmtime-scale")
    if top < unit / 2:
        raise UsageError(f"{where}: every value is written as 0 at LLMTIME scale {fmt.llmtime_scale:.5g} with "
                         f"{fmt.decimals} decimals ({fmt.source}): rescale the series or pass --llmtime-scale")
    if top >= 10 * fmt.target:
        return (f"values reach {top:.0f} in text units at LLMTIME scale {fmt.llmtime_scale:.5g} ({fmt.source}), "
                f"{top / fmt.target:.0f} times the {fmt.target:g} this scale maps 99 % of its data to: the model "
                "has seen few such numbers")
    if np.quantile(scaled, 0.99) < 10 * unit:
        return (f"values are mostly below {10 * unit:g} in text units at LLMTIME scale {fmt.llmtime_scale:.5g} "
                f"({fmt.source}): written with {fmt.decimals} decimals they keep less than 2 significant digits")
    return None


def classical(method: str, context: np.ndarray, horizon: int, dt: float):
    """A classical forecaster for one context [C, 2] and its choice: ``(forecaster, details)``.

    AR(p), VAR(p) (p in :data:`ORDERS`) and parroting (m in :data:`PARROT_LENGTHS`) choose p or m by a holdout at
    the end of the context: fitted on the first C - h steps, scored (MSE over both species) on the last
    h = min(horizon, C // 4) (``classical_forecasters.select_order``), then refitted on the whole context.
    Persistence has nothing to choose; the Lotka–Volterra ODE uses time step ``dt``.
    Raises UsageError if the context is too short for the method."""
    if method == "persistence":
        return Persistence(), {}
    if method == "lv":
        if len(context) < LotkaVolterraODE.min_context:
            raise UsageError(f"--method lv needs at least {LotkaVolterraODE.min_context} context steps")
        return LotkaVolterraODE(dt=dt), {"dt": dt}
    make, choices = {"ar": (AR, ORDERS), "var": (VAR, ORDERS), "parrot": (ContextParroting, PARROT_LENGTHS)}[method]
    C = len(context)
    h = max(1, min(horizon, C // 4))
    candidates = [p for p in choices if make(p).min_context <= C - h]
    if not candidates:
        raise UsageError(f"--method {method}: {C} context steps are too few to choose its order on a holdout of "
                         f"the last {h} (it needs at least {make(choices[0]).min_context + h})")
    chosen, scores = select_order(make, candidates, context[None, : C - h], context[None, C - h :])
    return make(chosen), {"chosen": chosen, "holdout_steps": h, "mse_by_choice": scores}


def llm_forecast(run: RunSettings, forecast: ForecastSettings, fmt: TextFormat, adapter: str | None,
                 context: np.ndarray, horizon: int) -> tuple[Forecasts, str]:
    """Load ``run.model`` (and the PEFT adapter ``adapter``, merged into its weights while forecasting:
    ``lora.merged``) and forecast one context [C, 2] with :class:`evaluation.LLMForecaster` in ``fmt`` and
    ``forecast``'s sampling. Returns ``(Forecasts, the weights' label)``; warns if the adapter's card names other
    base weights. Raises WeightsError/ConfigError (model), AdapterError (adapter)."""
    import torch

    from lora import load_peft, merged
    from miniqwen import load_pretrained
    from miniqwen.device import emulated_precision, resolve_device
    from miniqwen.loading import resolve_model_dir

    device = resolve_device(run.device)
    precision = resolve_precision(run.precision, device)
    model, tokenizer = load_pretrained(resolve_model_dir(run.model), dtype=getattr(torch, precision), device=device)
    label = weights_label(run.model)
    print(f"model: {label} — computing on {device} in {precision}; LLMTIME scale {fmt.llmtime_scale:.5g} "
          f"({fmt.source}), {fmt.decimals} decimals, {fmt.encoding}, prompt {fmt.prompt}")
    if slow := emulated_precision(device, precision):
        print(slow, file=sys.stderr)
    if fmt.base_model and fmt.base_model != label:
        print(f"warning: the adapter was trained on {fmt.base_model}, not on {label}")
    if adapter:
        load_peft(model, adapter)
    forecaster = LLMForecaster(model, tokenizer, fmt.llmtime_scale, fmt.decimals, fmt.prompt, forecast.samples,
                               forecast.temperature, forecast.top_p, 1, run.seed, name="lora" if adapter else "base",
                               encoding=fmt.encoding)
    with merged(model):
        return forecaster.forecast(context[None], horizon), label


def future_times(series: Series, C: int, H: int) -> np.ndarray | None:
    """Times of the H forecast steps, continuing the context's even time step (None if the series has no times or
    its context's are uneven; rows are then numbered only)."""
    dt = series.time_step(C)
    return None if dt is None else series.time[C - 1] + dt * np.arange(1, H + 1)


def band(forecasts: Forecasts) -> np.ndarray | None:
    """The :data:`BAND` quantiles of the samples, ``[2, H, 2]`` (low, high), or None with a single sample."""
    if forecasts.samples.shape[1] < 2:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a step no sample parsed stays NaN
        return np.nanquantile(forecasts.samples[0], BAND, axis=0)


def forecast_rows(forecasts: Forecasts, times: np.ndarray | None) -> list[dict]:
    """The forecast CSV's rows: step (1..H), time (if known), prey, predator (the median of the samples) and, with
    N > 1 samples, prey_q10, prey_q90, predator_q10, predator_q90. A step no sample parsed is empty."""
    values, q = forecasts.values[0], band(forecasts)
    rows = []
    for h in range(len(values)):
        row = {"step": h + 1} | ({"time": float(times[h])} if times is not None else {})
        row |= {name: values[h, k] for k, name in enumerate(SPECIES)}
        if q is not None:
            row |= {f"{name}_q{round(100 * b)}": q[j, h, k] for k, name in enumerate(SPECIES)
                    for j, b in enumerate(BAND)}
        rows.append({k: ("" if isinstance(v, float) and np.isnan(v) else v) for k, v in row.items()})
    return rows


def summary(series: Series, C: int, forecasts: Forecasts, rows: list[dict], method: str) -> list[str]:
    """What the stage prints: unparsed steps, the error against what the series holds after the context, the
    forecast table."""
    values, H = forecasts.values[0], len(rows)
    lines, unparsed = [], int(np.isnan(values).any(axis=1).sum())
    if unparsed:
        lines.append(f"warning: {unparsed} of {H} forecast steps could not be read from the model's text (empty in "
                     "forecast.csv)")
    observed = series.values[C : C + H]
    error = np.abs(values[: len(observed)] - observed)
    if len(observed) and not np.isnan(error).all(axis=0).any():
        mae = np.nanmean(error, axis=0)
        lines.append(f"MAE against the {len(observed)} observed steps after the context: prey {mae[0]:.4f}, "
                     f"predator {mae[1]:.4f}")
    lines.append(f"forecast ({method}, {forecasts.flops:.3e} FLOPs):")
    lines += ["  " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v if v != '' else '–'}"
                               for k, v in row.items()) for row in rows]
    return lines


def plot(path: Path, series: Series, C: int, forecasts: Forecasts, times: np.ndarray | None, title: str) -> bool:
    """PNG of the context (solid), what the series holds after it (dotted), the forecast (dashed, joined to the last
    context step) and, with samples, their 10–90 % band. Returns False without matplotlib."""
    fig = _figure(9, 4.4)
    if fig is None:
        return False
    ax, H, q = fig.subplots(), forecasts.values.shape[1], band(forecasts)
    t = series.time if times is not None else np.arange(len(series.values), dtype=float)
    ft = np.concatenate([t[C - 1 : C], times if times is not None else np.arange(C, C + H, dtype=float)])
    for k, (name, colour) in enumerate(zip(SPECIES, ("tab:blue", "tab:red"))):
        last = series.values[C - 1, k]
        ax.plot(t[:C], series.values[:C, k], color=colour, lw=1.2, label=f"{name} (context)")
        if len(series.values) > C:
            ax.plot(t[C - 1 : C + H], series.values[C - 1 : C + H, k], color=colour, lw=0.9, ls=":",
                    label=f"{name} (observed after)")
        if q is not None:
            ax.fill_between(ft, np.r_[last, q[0, :, k]], np.r_[last, q[1, :, k]], color=colour, alpha=0.2, lw=0,
                            label=f"{name} 10–90 % of samples")
        ax.plot(ft, np.r_[last, forecasts.values[0, :, k]], color=colour, ls="--", lw=1.6, label=f"{name} (forecast)")
    ax.axvline(t[C - 1], color="grey", lw=0.8, ls=":")
    ax.set_xlabel("time" if times is not None else "step")
    ax.set_ylabel("population")
    ax.legend(fontsize=7, ncol=3 + (q is not None), loc="upper center", bbox_to_anchor=(0.5, -0.14))
    ax.set_title(_wrap(title, 110), fontsize=9)
    fig.tight_layout()
    _save(fig, path, 110)
    return True


def check_out(out: Path, overwrite: bool) -> RunDirectory:
    """What ``--out`` holds, refused (UsageError) as a :class:`session.Session` refuses it: files no stage wrote;
    a run (any stage's) without ``overwrite``; with it, a protected directory or one holding other files too.
    Changes nothing."""
    found = inspect_out(out)
    if found.kind == "foreign":
        raise UsageError(f"--out {out} holds files no stage wrote ({found.listing()}): choose another --out")
    if found.kind in ("run", "legacy"):
        made_by = found.stage or "training"
        if not overwrite:
            raise UsageError(f"--out {out} already holds a {made_by} run ({found.listing()}): pass --overwrite to "
                             "replace it, or choose another --out")
        why = why_protected(out.resolve())
        if why:
            raise UsageError(f"--overwrite: --out {out} is {why}, which a stage never empties: choose another --out")
        extra = found.not_written_by_a_stage()
        if extra:
            raise UsageError(f"--overwrite: --out {out} holds a {made_by} run but also files no stage wrote "
                             f"({found.listing(extra)}): move them away or choose another --out")
    return found


def write_run(out: Path, found: RunDirectory, record: dict, files: dict) -> None:
    """Empty ``out`` if it holds a run (``check_out`` allowed it), write the run record (:data:`session.RECORD`,
    listing what it holds) and then ``files`` (``{name: write(path)}``)."""
    if found.kind in ("run", "legacy"):
        empty_run_directory(out)
    out.mkdir(parents=True, exist_ok=True)
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    record = {"made_by": "miniqwen", "stage": STAGE, "created": created, **record,
              "written": sorted([RECORD, *files])}
    atomic_write(out / RECORD, json.dumps(record, indent=2, default=float) + "\n")
    for name, write in files.items():
        write(out / name)
