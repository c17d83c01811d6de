"""The pieces of ``python -m experiments.forecast`` (one series, anyone's) that need torch or write files: the
input series, the LLMTIME text format (an adapter's card, ``--llmtime-scale``, or a scale fitted on the context) and
its digit check, the LLM forecast, and the outputs (forecast CSV, PNG, a run directory that is never overwritten by
surprise). The torch-free part (the Python API, methods, classical forecasters) is :mod:`.forecast_core`.

Shapes: a series is ``[T, 2]`` (prey, predator, data units); the context is the last C rows of a CSV, the first C
of an HDF5 trajectory; a forecast is an ``experiments.forecast.Forecast`` (``values [H, 2]``, ``samples [N, H, 2]``).
Errors name options as on the command line when ``cli`` is true, else as Python arguments
(:func:`.option_names.option`).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from data import Series, SeriesScale, fit_scale, fit_series_scale, is_hdf5, read_series_csv, read_trajectory

from .adapter_card import CARD_FILE, read_card
from .errors import UsageError
from .evaluation import LLMForecaster
from .option_names import option
from .plots import _figure, _save, _wrap
from .results import Forecasts
from .run_directory import RunDirectory
from .settings import DataSettings, ForecastSettings, RunSettings

STAGE = "forecast"
MAX_INTEGER_DIGITS = 3  # what one forecast step's token budget allows per value (evaluation.max_tokens_per_step)


def read_input(path: str, index: int | None, columns: str | None, time_column: str | None, context_steps: int,
               explicit: bool, whole: bool = False) -> Series:
    """The series to forecast: trajectory ``index`` of a coursework HDF5 file (recognised by its signature or a
    .h5/.hdf5 name), whole, its first ``context_steps`` the context; else the last ``context_steps`` rows of a CSV
    (:func:`data.read_series_csv`, prey/predator columns named by ``columns`` "PREY,PREDATOR" or by the header, the
    time column by ``time_column`` or the header; every row validated, only those kept, so a file of any length
    gives a bounded context), or with ``whole`` (a backtest) every row. ``explicit``: ``--context-steps`` was
    given, so the series must have that many rows.

    Raises UsageError for options that do not fit the file kind; data.DataError / SeriesError (one line naming the
    file and row) for a bad file (a FIFO, device or socket refused before it is opened) or too few rows."""
    if is_hdf5(path) or Path(path).suffix.lower() in (".h5", ".hdf5"):
        for flag, value in (("--columns", columns), ("--time-column", time_column)):
            if value is not None:
                raise UsageError(f"{flag}: {path} is an HDF5 file, whose columns are fixed (time, prey, predator)")
        if index is None:
            raise UsageError(f"--index N: {path} is an HDF5 file of many trajectories; say which to forecast")
        series = read_trajectory(path, index)
        if explicit and context_steps > len(series.values):
            raise UsageError(f"--context-steps {context_steps}: {series.source} has only {len(series.values)} steps")
        return series
    if index is not None:
        raise UsageError(f"--index: {path} is not an HDF5 file (a CSV holds one series)")
    names = None
    if columns is not None:
        names = tuple(c.strip() for c in columns.split(","))
        if len(names) != 2 or not all(names):
            raise UsageError(f"--columns {columns!r}: must be two column names, PREY,PREDATOR")
    return read_series_csv(path, names, context_steps if explicit else 1,
                           f"--context-steps {context_steps}" if explicit else "", time_column,
                           last=None if whole else context_steps)


@dataclass
class TextFormat:
    """How the context is written for the LLM: LLMTIME scale (data units per text unit, or a ``data.SeriesScale``:
    an offset and a scale per species), decimals, encoding, prompt mode, where the scale comes from (``source``),
    ``target``, the value the scale maps 99 % of its data to (the typical range of the numbers the model reads),
    and the adapter's base weights (``base_model``, if recorded)."""

    llmtime_scale: float | SeriesScale
    decimals: int
    encoding: str
    prompt: str
    source: str
    target: float = 10.0
    base_model: str | None = None

    def to_text_units(self, values: np.ndarray) -> np.ndarray:
        """``values`` [T, 2] data units -> the numbers the text writes (before rounding to ``decimals``)."""
        scale = self.llmtime_scale
        return scale.to_text_units(values) if isinstance(scale, SeriesScale) else np.asarray(values) / scale

    def describe(self) -> str:
        """The scale in words: ``LLMTIME scale 0.59954`` or ``LLMTIME offsets (…) and scales (…) per species``."""
        scale = self.llmtime_scale
        if isinstance(scale, SeriesScale):
            return (f"LLMTIME offsets ({scale.offset[0]:.5g}, {scale.offset[1]:.5g}) and scales ({scale.scale[0]:.5g}, "
                    f"{scale.scale[1]:.5g}) per species")
        return f"LLMTIME scale {scale:.5g}"

    def record(self) -> dict:
        """JSON-ready fields (a ``SeriesScale`` as ``{"offset": [prey, predator], "scale": [prey, predator]}``)."""
        scale = self.llmtime_scale
        return vars(self) | {"llmtime_scale": ({k: list(v) for k, v in asdict(scale).items()}
                                               if isinstance(scale, SeriesScale) else scale)}


def text_format(adapter: str | None, scale: float | str | None, context: np.ndarray, decimals: int | None = None,
                encoding: str | None = None, prompt: str | None = None, cli: bool = False) -> TextFormat:
    """The adapter's format (its card, :mod:`experiments.lib.adapter_card`; a number ``scale`` overrides its scale,
    ``scale="fit"`` fits one on ``context`` [C, 2] by the card's rule, ``quantile_q(context) / target`` from its
    ``scale_fit``, as the adapter's own scale was fitted on its training split; a card with ``"scaling":
    "series"`` always gives ``data.fit_series_scale(context, quantile, target)``), else
    ``decimals``/``encoding``/``prompt`` (None: 2, "decimal", "raw") with a number ``scale`` or a scale fitted on
    ``context`` by the dataset rule (the 0.99 quantile of the values -> 10, ``DataSettings``; LLMTIME fits a
    scale per series too). Options given (not None) must agree with the card.

    Raises UsageError: an option contradicts the card (a number ``scale`` for a per-series card too); an adapter
    without a card and no ``scale``; a context of zeros with no scale given. (A trained head bias named by the card
    is loaded with the adapter by ``lora.load_peft``.)
    AdapterError: a bad adapter directory or card."""
    given = {name: value for name, value in (("decimals", decimals), ("encoding", encoding), ("prompt", prompt))
             if value is not None}
    card = read_card(adapter) if adapter else None
    if adapter and card is None and scale is None:
        how = ", ".join(option(name, cli=cli) for name in ("decimals", "encoding", "prompt"))
        raise UsageError(f"{option('adapter', adapter, cli)}: no {CARD_FILE} (made before adapters carried their "
                         f"LLMTIME format, or elsewhere): pass {option('llmtime_scale', cli=cli)} (and {how}) as "
                         "trained")
    if card is not None:
        for name, value in given.items():
            if value != getattr(card, name):
                raise UsageError(f"{option(name, value, cli)}: the adapter was trained with {name} "
                                 f"{getattr(card, name)} ({CARD_FILE}); leave the option out")
        rule = card.scale_fit
        q = rule.get("quantile", DataSettings.scale_quantile)
        q = float(q) if isinstance(q, (int, float)) and 0 < q <= 1 else DataSettings.scale_quantile
        how = f"the {q:g} quantile -> {card.scale_target:g}, the adapter's rule ({CARD_FILE})"
        if rule.get("scaling") == "series":
            if scale not in (None, "fit"):
                raise UsageError(f"{option('llmtime_scale', scale, cli)}: the adapter was trained with per-series "
                                 f"scaling ({CARD_FILE}: scaling series), fitted on each context; leave it out")
            scale, source = fit_series_scale(context, q, card.scale_target), f"fitted per species on the " \
                f"{len(context)} context steps ({how}, scaling series)"
        elif scale == "fit":
            scale, source = _fit(context, q, card.scale_target, cli), f"fitted on the {len(context)} context " \
                f"steps ({how})"
        else:
            source = option("llmtime_scale", cli=cli) if scale else f"the adapter's ({CARD_FILE})"
        return TextFormat(scale or card.llmtime_scale, card.decimals, card.encoding, card.prompt, source,
                          card.scale_target, card.base_model)
    data = DataSettings(**{k: v for k, v in given.items() if k != "prompt"})
    if scale in (None, "fit"):
        scale = _fit(context, data.scale_quantile, data.scale_target, cli)
        source = f"fitted on the {len(context)} context steps"
    else:
        source = option("llmtime_scale", cli=cli)
    return TextFormat(scale, data.decimals, data.encoding, given.get("prompt", ForecastSettings.prompt), source,
                      data.scale_target)


def _fit(context: np.ndarray, quantile: float, target: float, cli: bool) -> float:
    """``data.fit_scale(context, quantile, target)``; UsageError for a context of (almost) only zeros."""
    try:
        return fit_scale(context, quantile, target)
    except ValueError:
        raise UsageError("the context is (almost) all zero: no LLMTIME scale can be fitted to it; pass "
                         f"{option('llmtime_scale', cli=cli)}") from None


def check_digits(context: np.ndarray, fmt: TextFormat, where: str, cli: bool = False) -> str | None:
    """Whether ``context`` [C, 2] can be written at ``fmt``'s scale. Returns a warning line (values far above the
    scale's typical range, or so small that they keep less than 2 significant digits) or None.

    Raises UsageError (one line, ``where`` first): a value would need more than :data:`MAX_INTEGER_DIGITS` integer
    digits (the model could not even write such a forecast in its token budget), or every value is written as 0."""
    scaled = fmt.to_text_units(np.asarray(context, dtype=np.float64))
    top, unit, at = float(scaled.max()), 10.0 ** -fmt.decimals, f"at {fmt.describe()} ({fmt.source})"
    fit = "" if fmt.source.startswith("fitted") else f" or pass {option('llmtime_scale', 'fit', cli)}"
    if top >= 10 ** MAX_INTEGER_DIGITS:
        raise UsageError(f"{where}: values up to {float(np.max(context)):.4g} are {top:.4g} in text units {at}: "
                         f"{len(str(int(top)))} integer digits, more than the {MAX_INTEGER_DIGITS} a forecast step "
                         f"may write, so the forecast would be garbage; rescale the series (e.g. to the adapter's "
                         f"units){fit} or pass {option('llmtime_scale', cli=cli)}")
    if top < unit / 2:
        raise UsageError(f"{where}: every value is written as 0 {at} with {fmt.decimals} decimals: rescale the "
                         f"series{fit} or pass {option('llmtime_scale', cli=cli)}")
    if top >= 10 * fmt.target:
        return (f"values reach {top:.0f} in text units {at}, {top / fmt.target:.0f} times the {fmt.target:g} this "
                f"scale maps 99 % of its data to: the model has seen few such numbers{fit.replace(' or', ';')}")
    if np.quantile(scaled, 0.99) < 10 * unit:
        return (f"values are mostly below {10 * unit:g} in text units {at}: written with {fmt.decimals} decimals "
                f"they keep less than 2 significant digits{fit.replace(' or', ';')}")
    return None


_loaded: dict | None = None  # inside keep_loaded(): {(model, device, precision, adapter): (model, tokenizer)}


@contextmanager
def keep_loaded():
    """Within it, :func:`llm_forecast` loads each (model, device, precision, adapter) once and reuses it (a
    backtest forecasts many contexts with one model); outside, every call loads its own, kept no longer."""
    global _loaded
    outer, _loaded = _loaded, ({} if _loaded is None else _loaded)
    try:
        yield
    finally:
        _loaded = outer


def llm_forecast(run: RunSettings, forecast: ForecastSettings, fmt: TextFormat, adapter: str | None,
                 context: np.ndarray, horizon: int, progress: bool, log=print, warn=print) -> tuple[Forecasts, str]:
    """Load ``run.model`` (:func:`loader.load_model`; and the PEFT adapter ``adapter``, merged into its weights
    while forecasting: ``lora.merged``; inside :func:`keep_loaded`, once) and forecast one context [C, 2] with
    :class:`evaluation.LLMForecaster` in ``fmt`` and ``forecast``'s sampling (tqdm bars if ``progress``), inside
    :func:`loader.emulation` (bf16 emulated on a CPU without it; a no-op inside the stage's own block). Returns
    ``(Forecasts, the weights' label)``; says what it loaded with ``log`` and, through ``warn``, if the adapter's
    card names other base weights. Raises WeightsError/ConfigError (model), AdapterError (adapter)."""
    from lora import load_peft, merged

    from . import loader

    device, precision = loader.placement(run.device, run.precision)
    key = (run.model, str(device), precision, str(Path(adapter).resolve()) if adapter else None)
    if _loaded is not None and key in _loaded:
        model, tokenizer, label = _loaded[key]
    else:
        loaded = loader.load_model(run.model, device, precision)
        model, tokenizer, label = loaded.model, loaded.tokenizer, loaded.weights
        log(f"model: {label} — computing on {device} in {precision}; {fmt.describe()} ({fmt.source}), "
            f"{fmt.decimals} decimals, {fmt.encoding}, prompt {fmt.prompt}")
        if fmt.base_model and fmt.base_model != label:
            warn(f"the adapter was trained on {fmt.base_model}, not on {label}")
        if adapter:
            load_peft(model, adapter)
        if _loaded is not None:
            _loaded.clear()  # one model at a time
            _loaded[key] = model, tokenizer, label
    forecaster = LLMForecaster(model, tokenizer, fmt.llmtime_scale, fmt.decimals, fmt.prompt, forecast.samples,
                               forecast.temperature, forecast.top_p, 1, run.seed, name="lora" if adapter else "base",
                               encoding=fmt.encoding, progress=progress)
    with loader.emulation(device, precision), merged(model):
        return forecaster.forecast(context[None], horizon), label


def forecast_rows(result, time_name: str = "time") -> list[dict]:
    """The forecast CSV's rows of an ``experiments.forecast.Forecast``: step (1..H), its time (if known, under
    ``time_name``), prey, predator (under ``result.columns``, the median of the samples) and, with N > 1 samples,
    PREY_q10, PREY_q90, PREDATOR_q10, PREDATOR_q90. A step no sample parsed is empty."""
    rows, q = [], result.quantiles or {}
    for h in range(len(result.values)):
        row = {"step": h + 1} | ({time_name: float(result.times[h])} if result.times is not None else {})
        for k, name in enumerate(result.columns):
            row[name] = result.values[h, k]
        row |= {f"{name}_q{round(100 * b)}": q[b][h, k] for k, name in enumerate(result.columns) for b in q}
        rows.append({k: ("" if isinstance(v, float) and np.isnan(v) else v) for k, v in row.items()})
    return rows


def summary(series: Series, C: int, result, rows: list[dict], method: str) -> list[str]:
    """What the stage prints: unparsed steps, the error against what the series holds after the context, the
    forecast table."""
    values, H = result.values, len(rows)
    lines, unparsed = [], int(np.isnan(values).any(axis=1).sum())
    if unparsed:
        lines.append(f"warning: {unparsed} of {H} forecast steps could not be read from the model's text (empty in "
                     "forecast.csv)")
    observed = series.values[C : C + H]
    error = np.abs(values[: len(observed)] - observed)
    if len(observed) and not np.isnan(error).all(axis=0).any():
        mae = np.nanmean(error, axis=0)
        lines.append(f"MAE against the {len(observed)} observed steps after the context: {result.columns[0]} "
                     f"{mae[0]:.4f}, {result.columns[1]} {mae[1]:.4f}")
    lines.append(f"forecast ({method}, {result.flops:.3e} FLOPs):")
    lines += ["  " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v if v != '' else '–'}"
                               for k, v in row.items()) for row in rows]
    return lines


def plot(path: Path, series: Series, C: int, result, title: str) -> bool:
    """PNG of the context (solid), what the series holds after it (dotted), the forecast (dashed, joined to the last
    context step) and, with samples, their 10–90 % band; the series' own column names in the legend and its time
    column on the x axis (else the step). Returns False without matplotlib."""
    fig = _figure(9, 4.4)
    if fig is None:
        return False
    ax, H, q, times = fig.subplots(), len(result.values), result.quantiles, result.times
    t = series.time if times is not None else np.arange(len(series.values), dtype=float)
    ft = np.concatenate([t[C - 1 : C], times if times is not None else np.arange(C, C + H, dtype=float)])
    for k, (name, colour) in enumerate(zip(result.columns, ("tab:blue", "tab:red"))):
        last = series.values[C - 1, k]
        ax.plot(t[:C], series.values[:C, k], color=colour, lw=1.2, label=f"{name} (context)")
        if len(series.values) > C:
            ax.plot(t[C - 1 : C + H], series.values[C - 1 : C + H, k], color=colour, lw=0.9, ls=":",
                    label=f"{name} (observed after)")
        if q:
            low, high = (q[b][:, k] for b in sorted(q))
            ax.fill_between(ft, np.r_[last, low], np.r_[last, high], color=colour, alpha=0.2, lw=0,
                            label=f"{name} 10–90 % of samples")
        ax.plot(ft, np.r_[last, result.values[:, k]], color=colour, ls="--", lw=1.6, label=f"{name} (forecast)")
    ax.axvline(t[C - 1], color="grey", lw=0.8, ls=":")
    ax.set_xlabel((series.time_column or "time") if times is not None else "step")
    ax.set_ylabel("population")
    ax.legend(fontsize=7, ncol=3 + bool(q), loc="upper center", bbox_to_anchor=(0.5, -0.14))
    ax.set_title(_wrap(title, 110), fontsize=9)
    fig.tight_layout()
    _save(fig, path, 110)
    return True


def write_run(directory: RunDirectory, record: dict, files: dict) -> None:
    """Begin the run in ``directory`` (its record holds ``record``'s "settings" and its other keys), write ``files``
    (``{name: write(path)}``) and list them in the record."""
    record = dict(record)
    directory.begin(record.pop("settings"), **record)
    for name, write in files.items():
        write(directory.path / name)
    directory.finish()
