"""The Python API of :mod:`experiments.forecast` (:func:`forecast` -> :class:`Forecast`, which the command line
calls), and its torch-free core: the methods, a classical forecaster fitted to one context, parroting's fallbacks.

Imports no torch at module level, nor anything that does (:mod:`data`, :mod:`miniqwen` and
:mod:`experiments.lib.settings` all do): ``forecast(x, method="var")`` runs without it, and only ``method="llm"``
loads it (``tests/test_forecast_api.py`` checks).
"""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .classical_forecasters import AR, VAR, Persistence, select_order
from .lotka_volterra_fit import LotkaVolterraODE
from .parroting import ContextParroting
from .errors import OptionError, UsageError
from .option_names import option

METHODS = ("llm", "var", "ar", "parrot", "persistence", "lv")
ORDERS = tuple(range(1, 21))  # AR/VAR orders tried (as experiments.classical)
PARROT_LENGTHS = (1, 2, 3, 5, 8, 12, 16, 20)  # = defaults.PARROT_LENGTHS (which imports torch); a test checks
FIT = "fit"  # llmtime_scale: fit the scale on the context by the adapter's rule (series_forecast.text_format)
BAND = (0.1, 0.9)  # the quantiles of the samples returned, written and drawn with samples > 1
MODEL_ENV_VAR = "MINIQWEN_MODEL"  # = settings.MODEL_ENV_VAR (settings imports torch)


def check_options(method: str, adapter, scale: float | str | None, samples: int, explicit: set[str],
                  cli: bool = False) -> None:
    """Refuse (UsageError) an unknown ``method``, a bad ``llmtime_scale`` (a positive finite number or "fit") and
    options of the LLM (``adapter``, ``llmtime_scale``, ``samples`` > 1, and the names in ``explicit``: options
    given, e.g. decimals, encoding, prompt, model) with a classical ``method``."""
    if method not in METHODS:
        raise UsageError(f"{option('method', method, cli)}: must be one of {', '.join(METHODS)}")
    number = isinstance(scale, (int, float, np.floating)) and not isinstance(scale, bool)
    if scale is not None and not (scale == FIT if isinstance(scale, str) else number and 0 < scale < float("inf")):
        raise UsageError(f"{option('llmtime_scale', scale, cli)}: must be a positive finite number or "
                         f"{FIT if cli else repr(FIT)}")
    llm_only = [name for name, used in [("adapter", adapter), ("llmtime_scale", scale), ("samples", samples > 1)]
                + [(name, name in explicit) for name in ("decimals", "encoding", "prompt", "model")] if used]
    if method != "llm" and llm_only:
        raise UsageError(f"{option(llm_only[0], cli=cli)}: applies to {option('method', 'llm', cli)} only, not "
                         f"{option('method', method, cli)}")


def number_or_fit(text: str) -> float | str:
    """``--llmtime-scale``'s value: "fit" or a number in ASCII digits (an argparse ``type``: ValueError else)."""
    if text == FIT:
        return text
    if not text.isascii():
        raise ValueError(text)
    return float(text)


def classical(method: str, context: np.ndarray, horizon: int, dt: float, cli: bool = False):
    """A classical forecaster for one context [C, 2] and its choice: ``(forecaster, details)``.

    AR(p), VAR(p) (p in :data:`ORDERS`) and parroting (m in :data:`PARROT_LENGTHS`) choose p or m by a holdout at
    the end of the context: fitted on the first C - h steps, scored (MSE over both species) on the last
    h = min(horizon, C // 4) (``classical_forecasters.select_order``), then refitted on the whole context, so the
    search is bounded by C. Persistence has nothing to choose; the Lotka–Volterra ODE uses time step ``dt``.
    Raises UsageError if the context is too short for the method (``cli``: named as a command-line option)."""
    if method == "persistence":
        return Persistence(), {}
    if method == "lv":
        if len(context) < LotkaVolterraODE.min_context:
            raise UsageError(f"{option('method', method, cli)} needs at least {LotkaVolterraODE.min_context} "
                             "context steps")
        return LotkaVolterraODE(dt=dt), {"dt": dt}
    make, choices = {"ar": (AR, ORDERS), "var": (VAR, ORDERS), "parrot": (ContextParroting, PARROT_LENGTHS)}[method]
    C = len(context)
    h = max(1, min(horizon, C // 4))
    candidates = [p for p in choices if make(p).min_context <= C - h]
    if not candidates:
        raise UsageError(f"{option('method', method, cli)}: {C} context steps are too few to choose its order on a "
                         f"holdout of the last {h} (it needs at least {make(choices[0]).min_context + h})")
    chosen, scores = select_order(make, candidates, context[None, : C - h], context[None, C - h :])
    return make(chosen), {"chosen": chosen, "holdout_steps": h, "mse_by_choice": scores}


def parrot_fallbacks(forecaster: ContextParroting) -> dict[str, int]:
    """After ``forecaster.predict``: ``{"persistence": trajectories forecast as their repeated last value,
    "short_period": trajectories whose implied period is shorter than the match length m}`` — the forecaster's own
    ``fallback_counts()`` where it has one, else the same counted from its ``lags`` and ``m``."""
    counts = getattr(forecaster, "fallback_counts", None)
    if callable(counts):
        return {key: int(value) for key, value in counts().items()}
    lags = np.asarray(getattr(forecaster, "lags", []), dtype=int)
    return {"persistence": int((lags == 1).sum()) + int(forecaster.n_fallback),
            "short_period": int((lags < forecaster.m).sum())}


def parrot_note(m: int, period: int | None, counts: dict[str, int]) -> str | None:
    """One line saying when a parroting forecast of one series is persistence or repeats a window shorter than its
    match (``counts`` from :func:`parrot_fallbacks`), else None."""
    if counts.get("persistence"):
        return (f"note: parroting (m = {m}) fell back to persistence: the best match of its last {m} steps is the "
                "same window one step earlier, so the forecast repeats the last value")
    if counts.get("short_period"):
        return (f"note: parroting (m = {m}) repeats a window of {period} steps, shorter than its match of {m}: the "
                "context's best match overlaps the last steps themselves")
    return None


@dataclass
class Forecast:
    """A forecast of one two-species series (:func:`forecast`).

    Attributes:
        values: float64 ``(horizon, 2)`` prey, predator in the context's units: the forecast; with samples > 1 the
            element-wise median of the samples (LLMTIME's point forecast). NaN where no sample's text gave a number.
        quantiles: with samples > 1, ``{0.1: (horizon, 2), 0.9: (horizon, 2)}``, the samples' 10 and 90 %
            quantiles (LLMTIME's interval), NaN where no sample gave a number; None with one sample.
        samples: float64 ``(samples, horizon, 2)`` every sample (a classical method: its one forecast).
        texts: the model's generated text, one per sample (``[]`` for a classical method).
        flops: FLOPs counted while forecasting, by the coursework's rules (0 for a classical method).
        settings: what was used, JSON-ready: method, horizon, context_steps and the method's own (the LLMTIME text
            format, adapter, weights and sampling; a classical method's parameters, the order it chose and the
            holdout MSE of each choice; parroting's implied period and fallbacks).
        times: float64 ``(horizon,)`` the forecast steps' times, continuing the context's time step (its last one
            if the times are uneven); None without context times.
        columns: the names of the prey and predator columns (a DataFrame's, else ``columns=``, else prey, predator).
    """

    values: np.ndarray
    quantiles: dict[float, np.ndarray] | None
    samples: np.ndarray
    texts: list[str]
    flops: int
    settings: dict
    times: np.ndarray | None = None
    columns: tuple[str, str] = ("prey", "predator")

    @classmethod
    def from_samples(cls, samples: np.ndarray, texts: list[str], flops: int, settings: dict,
                     times: np.ndarray | None = None, columns: tuple[str, str] = ("prey", "predator")) -> "Forecast":
        """The forecast of ``samples`` ``(N, H, 2)``: their median and, for N > 1, their :data:`BAND` quantiles."""
        samples = np.asarray(samples, dtype=np.float64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a step no sample parsed stays NaN
            values = np.nanmedian(samples, axis=0)
            q = np.nanquantile(samples, BAND, axis=0) if len(samples) > 1 else None
        return cls(values, None if q is None else dict(zip(BAND, q)), samples, list(texts), int(flops), settings,
                   times, tuple(columns))


def forecast(context, horizon: int = 20, method: str = "llm", adapter: str | None = None, model: str | None = None,
             llmtime_scale: float | str | None = None, samples: int = 1, *, columns: tuple[str, str] | None = None,
             time=None, temperature: float = 0.7, top_p: float = 0.9, decimals: int | None = None,
             encoding: str | None = None, prompt: str | None = None, device: str | None = None,
             precision: str = "auto", seed: int = 0, progress: bool | None = None) -> Forecast:
    """Forecast the ``horizon`` steps after ``context`` with Qwen2.5 reading it as LLMTIME text (Gruver et al. 2023,
    "Large Language Models Are Zero-Shot Time Series Forecasters", NeurIPS: values scaled, written with fixed
    decimals, steps joined by ``;``, the model's continuation read back), optionally with a trained LoRA adapter,
    or with a classical forecaster fitted to the context alone.

    Args:
        context: ``(T, 2)`` prey, predator populations in raw units (finite, >= 0), oldest first; every row is
            context (bound it yourself: the command line takes the last ``--context-steps``). A pandas DataFrame
            is accepted too (pandas is never imported here): its ``columns`` (default: the columns named prey and
            predator in any case, or its only two columns) and, if it has one, its column named time or t.
        horizon: steps to forecast (>= 1).
        method: "llm" (the language model), or a classical forecaster fitted to this context: "var", "ar" (order
            1–20 chosen on a holdout of the context's last min(horizon, T // 4) steps), "parrot" (context
            parroting, match length chosen likewise), "persistence", "lv" (the Lotka–Volterra ODE fitted by least
            squares). The classical methods import no torch.
        adapter: a PEFT-format adapter directory of this project, whose card gives its LLMTIME format (llm only).
        model: HF-layout model directory or Hub repo id (default ``$MINIQWEN_MODEL``, else Qwen2.5-0.5B-Instruct).
        llmtime_scale: data units per text unit (default: the adapter's, else fitted on the context: its 0.99
            quantile written as 10), or "fit": with an adapter, fitted on this context by the rule the adapter's
            scale was fitted with on its training data (its card's ``scale_fit``: quantile_q(context) / target),
            so the context fills the range of numbers the adapter was trained on whatever its units, and
            forecasting c·x gives c times the forecast of x (the same text); without one, as the default. An
            adapter trained with per-series scaling (card ``"scaling": "series"``) always writes the context at
            ``data.fit_series_scale(context, quantile, target)`` (a number here is refused).
        samples: 1 = greedy decoding; N > 1 = N samples at ``temperature``/``top_p``, their median and 10–90 %.
        columns: a DataFrame's prey and predator columns; for an array, the names the result carries.
        time: ``(T,)`` strictly increasing sample times of the context (or a DataFrame's time column name), which
            the forecast times continue; also the "lv" time step (default 1 per row).
        decimals, encoding, prompt: the LLMTIME text format without an adapter (default 2, "decimal", "raw"); with
            one they must match its card.
        device, precision, seed: where and in what dtype the model computes ("auto": bf16 where native, else
            float32), and the sampling seed.
        progress: tqdm bars; None = only when stderr is a terminal.

    Returns:
        :class:`Forecast` (``values`` ``(horizon, 2)`` raw units, ``quantiles``, ``texts``, ``flops``, ``settings``).

    Raises:
        UsageError: a bad argument (one line naming it), a context too short for the method, an option that does
            not apply to the method or contradicts the adapter's card, values the LLMTIME text cannot write.
        AdapterError, WeightsError, ConfigError: an unusable adapter or model (llm only).
    """
    return _forecast(context, horizon, method, adapter, model, llmtime_scale, samples, columns=columns, time=time,
                     temperature=temperature, top_p=top_p, decimals=decimals, encoding=encoding, prompt=prompt,
                     device=device, precision=precision, seed=seed, progress=progress)


def _forecast(context, horizon, method, adapter, model, llmtime_scale, samples, *, columns, time, temperature, top_p,
              decimals, encoding, prompt, device, precision, seed, progress, cli=False, source="context",
              log=None) -> Forecast:
    """:func:`forecast`, its errors naming command-line options if ``cli``; ``source`` names the series in
    messages; ``log`` (the command line: print) hears what is done, else warnings go through :mod:`warnings`."""
    say = log or (lambda line: None)
    warn = (lambda line: say(f"warning: {line}")) if log else (lambda line: warnings.warn(line, stacklevel=3))
    given = {name for name, value in [("decimals", decimals), ("encoding", encoding), ("prompt", prompt),
                                      ("model", model)] if value is not None}
    check_options(method, adapter, llmtime_scale, _count("samples", samples, cli), given, cli)
    H = _count("horizon", horizon, cli)
    values, times, names = _as_context(context, columns, time)
    step = _time_step(times)
    settings = {"method": method, "horizon": H, "context_steps": len(values)}
    if method == "llm":
        samples_, texts, flops, details = _llm(values, H, adapter, model, llmtime_scale, samples, temperature, top_p,
                                               decimals, encoding, prompt, device, precision, seed, progress, cli,
                                               source, say, warn)
    else:
        forecaster, details = classical(method, values, H, step or 1.0, cli)
        samples_, texts, flops = forecaster.predict(values[None], H), [], 0
        details |= {"label": forecaster.name, "forecaster": forecaster.settings(), "fell_back": forecaster.n_fallback}
        if method == "parrot":
            details |= {"period": int(forecaster.lags[0]), "fallbacks": parrot_fallbacks(forecaster)}
    future = None
    if times is not None and len(times) > 1:
        future = times[-1] + (step or times[-1] - times[-2]) * np.arange(1, H + 1)
    return Forecast.from_samples(samples_, texts, flops, settings | details, future, names)


def _llm(values, H, adapter, model, scale, samples, temperature, top_p, decimals, encoding, prompt, device,
         precision, seed, progress, cli, source, say, warn):
    """The LLM forecast of one context: ``(samples (N, H, 2), texts, flops, details)``."""
    from . import series_forecast as sf
    from .dataset import seed_everything
    from .settings import DataSettings, ForecastSettings, RunSettings

    fmt = sf.text_format(adapter, scale, values, decimals, encoding, prompt, cli)
    run = RunSettings(model=model or os.environ.get(MODEL_ENV_VAR, RunSettings.model), device=device,
                      precision=precision, seed=seed)
    fcs = ForecastSettings(horizon=H, samples=samples, temperature=temperature, top_p=top_p, prompt=fmt.prompt)
    try:
        for s in (run, fcs, DataSettings(decimals=fmt.decimals, encoding=fmt.encoding)):
            s.validate()
    except OptionError as err:
        raise UsageError(f"{option(err.field, err.value, cli)}: {err.allowed}") from None
    if warning := sf.check_digits(values, fmt, source, cli):
        warn(f"{source}: {warning}")
    seed_everything(seed)
    bars = sys.stderr.isatty() if progress is None else bool(progress)
    forecasts, label = sf.llm_forecast(run, fcs, fmt, adapter, values, H, bars, say, warn)
    name = "/".join(Path(adapter).resolve().parts[-2:]) if adapter else None  # no machine path in outputs
    details = {"text_format": fmt.record(), "adapter": name, "weights": label, "label": label,
               "steps_unparsed": int(np.isnan(forecasts.values).any(-1).sum()),
               "sampling": {"samples": samples, "temperature": temperature, "top_p": top_p, "seed": seed}}
    return forecasts.samples[0], forecasts.texts[0], forecasts.flops, details


def _count(name: str, value, cli: bool) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise UsageError(f"{option(name, value, cli)}: must be an integer >= 1")
    return int(value)


def _as_context(context, columns, time):
    """``(values (T, 2) float64, times (T,) or None, (prey name, predator name))`` of an array or a DataFrame,
    validated (UsageError naming the argument)."""
    names = tuple(columns) if columns is not None else ("prey", "predator")
    if hasattr(context, "columns") and not isinstance(context, np.ndarray):  # a pandas DataFrame (duck-typed)
        header = [str(c) for c in context.columns]
        picks = [_find(header, name) for name in names]
        if None in picks and columns is None and len(header) == 2:
            picks = [0, 1]
        if None in picks:
            raise UsageError(f"context: a DataFrame without columns {names[0]!r} and {names[1]!r} (it has "
                             f"{', '.join(header)}): name them with columns=(PREY, PREDATOR)")
        names = (header[picks[0]], header[picks[1]])
        at = None  # the time column: named by ``time``, else one called time or t
        if isinstance(time, str):
            if (at := _find(header, time)) is None:
                raise UsageError(f"time={time!r}: the DataFrame has no such column (it has {', '.join(header)})")
        elif time is None:
            at = next((i for n in ("time", "t") if (i := _find(header, n)) is not None and i not in picks), None)
        if at is not None:
            time = np.asarray(context[context.columns[at]], dtype=np.float64)
        context = np.column_stack([np.asarray(context[context.columns[i]], dtype=np.float64) for i in picks])
    try:
        values = np.array(context, dtype=np.float64)
    except (TypeError, ValueError):
        raise UsageError(f"context: not an array of numbers ({type(context).__name__})") from None
    if values.ndim != 2 or values.shape[1] != 2 or not len(values):
        raise UsageError(f"context: must have shape (T, 2) (prey, predator), T >= 1; got shape {values.shape}")
    if not np.isfinite(values).all() or (values < 0).any():
        raise UsageError("context: every value must be a finite population >= 0 (no NaN, infinity or negatives)")
    if time is None:
        return values, None, names
    times = np.array(time, dtype=np.float64)
    if times.shape != (len(values),) or not np.isfinite(times).all() or (np.diff(times) <= 0).any():
        raise UsageError(f"time: must be {len(values)} finite, strictly increasing times, one per context row; got "
                         f"shape {times.shape}")
    return values, times, names


def _find(header: list[str], name: str) -> int | None:
    """The column called ``name`` (exactly, else the only one equal ignoring case), or None."""
    if name in header:
        return header.index(name)
    hits = [i for i, h in enumerate(header) if h.lower() == str(name).lower()]
    return hits[0] if len(hits) == 1 else None


def _time_step(times: np.ndarray | None) -> float | None:
    """The time between rows if ``times`` are evenly spaced (relative tolerance 1e-3), else None."""
    if times is None or len(times) < 2:
        return None
    dt = np.diff(times)
    return float(dt.mean()) if np.allclose(dt, dt.mean(), rtol=1e-3, atol=0) else None
