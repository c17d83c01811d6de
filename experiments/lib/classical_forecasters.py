"""Classical forecasters of the predator–prey series: the yardstick for every LLM number in this project.

Data convention (shared by every forecaster): ``contexts`` is a float array ``[n, C, 2]`` — n trajectories,
C observed time steps, column 0 prey, column 1 predator (populations, > 0) — and ``predict(contexts, H)``
returns float64 ``[n, H, 2]``, the H steps right after each context. Each trajectory is fitted on its own
context only (no pooling across trajectories), by least squares (parroting: by a nearest-window search):

* ``Persistence`` — the last observed value, repeated (the "naive" forecast; Hyndman & Athanasopoulos,
  *Forecasting: Principles and Practice*, §5.2).
* ``AR(p)`` — one autoregression per species, ``VAR(p)`` — one vector autoregression over both species;
  ordinary least squares (``np.linalg.lstsq``) and recursive multi-step forecasts (Hamilton 1994, *Time Series
  Analysis*, ch. 4 and 11). ``log=True`` fits on log-populations and exponentiates the forecasts.
* ``LotkaVolterraODE`` (:mod:`experiments.lib.lotka_volterra_fit`) — the Lotka–Volterra equations (Lotka 1925;
  Volterra 1926) fitted with ``scipy.optimize.least_squares`` and integrated with ``scipy.integrate.solve_ivp``.
* ``ContextParroting(m)`` (:mod:`experiments.lib.parroting`) — copy what followed the earlier stretch of the
  context that best matches its last m steps, repeated with the period this match implies (Zhang & Gilpin 2025,
  "context parroting"); no fitted parameters but m, which is chosen on the validation split.

This module holds their common base (:class:`ClassicalForecaster`), persistence, AR / VAR and the choice of an order
on the validation split (:func:`select_order`); ``side_by_side.validated_forecasters`` builds the whole set.

No forecast is ever NaN: when a trajectory's fit fails, or its forecast is non-finite or absurd (any
``|value| > ABSURD_FACTOR * max |context|``), that trajectory gets the persistence forecast and is counted in
``forecaster.n_fallback`` (reset by every ``predict`` call).
"""

from __future__ import annotations

import operator
from typing import Callable, Iterable

import numpy as np

ABSURD_FACTOR = 100.0
"""A forecast with any ``|value| > ABSURD_FACTOR * max |context|`` is replaced by persistence."""


class FitFailed(Exception):
    """Internal: this trajectory cannot be fitted; use the persistence fallback."""


def as_int(value, what: str, minimum: int) -> int:
    """``value`` as an int >= ``minimum``; raises ValueError naming ``what`` otherwise (a bool is not an int)."""
    try:
        out = operator.index(value)
    except TypeError:
        raise ValueError(f"{what} must be an integer, got {value!r}") from None
    if isinstance(value, bool) or out < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return out


def _check_contexts(contexts, min_steps: int, who: str) -> np.ndarray:
    x = np.asarray(contexts, dtype=np.float64)
    if x.ndim != 3 or x.shape[2] != 2:
        raise ValueError(f"{who}: contexts must have shape [n, C, 2] (prey, predator), got {x.shape}")
    if x.shape[1] < min_steps:
        raise ValueError(f"{who} needs contexts of at least {min_steps} time steps, got C = {x.shape[1]}")
    if not np.isfinite(x).all():
        raise ValueError(f"{who}: contexts contain NaN or inf")
    return x


class ClassicalForecaster:
    """Base class. Subclasses set ``name`` and ``min_context`` and implement ``_predict_one``.

    ``predict(contexts [n, C, 2], horizon H) -> [n, H, 2]`` float64, never NaN (see the module docstring for the
    persistence fallback); ``n_fallback`` counts the trajectories that fell back in the last call and
    ``last_prediction`` is that call's ``[n, H, 2]`` result (None before the first call), so that a stage can compare
    forecasters trajectory by trajectory without forecasting twice; ``settings()`` gives the JSON-serialisable
    parameters.
    """

    name: str = "classical"
    min_context: int = 1

    def __init__(self) -> None:
        self._n_fallback = 0
        self.last_prediction: np.ndarray | None = None

    @property
    def n_fallback(self) -> int:
        """Trajectories that fell back to persistence in the last ``predict`` call."""
        return self._n_fallback

    def fallback_counts(self) -> dict:
        """``{"persistence": trajectories whose forecast of the last ``predict`` call is the persistence forecast
        because the fit failed}`` (``ContextParroting`` adds its own counts)."""
        return {"persistence": self.n_fallback}

    def settings(self) -> dict:
        """JSON-serialisable parameters, e.g. ``{"name": "ar", "p": 3, ...}``."""
        return {"name": self.name}

    def predict(self, contexts: np.ndarray, horizon: int) -> np.ndarray:
        """Forecast ``horizon`` steps after each context.

        Args:
            contexts: ``[n, C, 2]`` observed populations (prey, predator), finite, ``C >= self.min_context``.
            horizon: H >= 1, steps to forecast.
        Returns:
            float64 ``[n, H, 2]``, finite.
        Raises:
            ValueError: contexts not ``[n, C, 2]``, too short for this model, or not finite; bad horizon.
        """
        x = _check_contexts(contexts, self.min_context, self.name)
        h = as_int(horizon, "horizon", 1)
        out = np.empty((x.shape[0], h, 2))
        self._n_fallback = 0
        self.last_prediction = None
        for i, ctx in enumerate(x):
            try:
                with np.errstate(all="ignore"):
                    f = np.asarray(self._predict_one(ctx, h), dtype=np.float64)
            except (FitFailed, RuntimeError, np.linalg.LinAlgError):
                f = None
            if f is None or f.shape != (h, 2) or not np.isfinite(f).all() or \
                    np.abs(f).max() > ABSURD_FACTOR * np.abs(ctx).max():
                f = np.repeat(ctx[-1:], h, axis=0)
                self._n_fallback += 1
            out[i] = f
        self.last_prediction = out
        return out

    def forecast(self, contexts: np.ndarray, horizon: int):
        """The forecaster interface of :mod:`experiments.lib.evaluation`: :meth:`predict` as ``Forecasts`` (one
        sample, every step complete, no FLOPs)."""
        from .results import Forecasts  # here, not above: the classical path imports no torch (results does)

        return Forecasts.from_values(self.predict(contexts, horizon))

    def _predict_one(self, context: np.ndarray, horizon: int) -> np.ndarray:
        """``context [C, 2] -> [horizon, 2]``; raise ``FitFailed`` to fall back."""
        raise NotImplementedError


class Persistence(ClassicalForecaster):
    """The naive forecast: every future step equals the last observed one. Needs C >= 1."""

    name = "persistence"

    def _predict_one(self, context, horizon):
        return np.repeat(context[-1:], horizon, axis=0)


# ----------------------------------------------------------------------------- AR / VAR by least squares


def _min_steps(p: int, k: int, intercept: bool) -> int:
    """Shortest series for an over-determined (V)AR(p) fit: C - p equations > k*p + intercept unknowns."""
    return p + k * p + int(intercept) + 1


def fit_var(series: np.ndarray, p: int, intercept: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Fit ``y_t = c + sum_{i=1..p} A_i y_{t-i} + e_t`` by ordinary least squares (Hamilton 1994, §11.1).

    Args:
        series: ``[C, k]`` observations (k = 2 here: prey, predator), finite.
        p: lag order >= 1. intercept: fit c (else c = 0).
    Returns:
        ``(A [p, k, k], c [k])``; ``A[i-1][j, l]`` is the weight of series l at lag i in the equation of series j.
        Rank-deficient designs (e.g. a constant series) get numpy's minimum-norm solution.
    Raises:
        ValueError: series not 2-D or not finite, bad p, or ``C < p + k*p + intercept + 1``.
    """
    y = np.asarray(series, dtype=np.float64)
    p = as_int(p, "p", 1)
    if y.ndim != 2:
        raise ValueError(f"fit_var: series must have shape [C, k], got {y.shape}")
    C, k = y.shape
    if C < _min_steps(p, k, intercept):
        raise ValueError(f"fit_var: a VAR({p}) of {k} series needs at least {_min_steps(p, k, intercept)} "
                         f"time steps, got C = {C}")
    if not np.isfinite(y).all():
        raise ValueError("fit_var: series contains NaN or inf")
    lags = [y[p - i:C - i] for i in range(1, p + 1)]  # lag i: [C - p, k]
    design = np.concatenate(([np.ones((C - p, 1))] if intercept else []) + lags, axis=1)
    coef = np.linalg.lstsq(design, y[p:], rcond=None)[0]  # [intercept + p*k, k]
    c = coef[0] if intercept else np.zeros(k)
    A = coef[int(intercept):].reshape(p, k, k).transpose(0, 2, 1)
    return A, c


def fit_ar(series: np.ndarray, p: int, intercept: bool = True) -> tuple[np.ndarray, float]:
    """Fit ``x_t = c + sum_{i=1..p} a_i x_{t-i} + e_t`` by OLS (Hamilton 1994, §8.1); ``fit_var`` with k = 1.

    Args: series ``[C]`` finite; p >= 1; intercept (else c = 0).
    Returns: ``(a [p], c)`` with ``a[i-1]`` the weight of lag i.
    Raises: ValueError: series not 1-D or not finite, bad p, or ``C < 2p + intercept + 1``.
    """
    x = np.asarray(series, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"fit_ar: series must have shape [C], got {x.shape}")
    if len(x) < _min_steps(as_int(p, "p", 1), 1, intercept):
        raise ValueError(f"fit_ar: an AR({p}) needs at least {_min_steps(p, 1, intercept)} time steps, "
                         f"got C = {len(x)}")
    A, c = fit_var(x[:, None], p, intercept)
    return A[:, 0, 0].copy(), float(c[0])


def _var_forecast(history: np.ndarray, A: np.ndarray, c: np.ndarray, horizon: int) -> np.ndarray:
    """Recursive forecast: ``history [C, k] -> [horizon, k]``, each step fed back as the next lag."""
    p, k = A.shape[0], A.shape[1]
    ext = np.concatenate([history[-p:], np.zeros((horizon, k))])
    for t in range(p, p + horizon):
        ext[t] = c + sum(A[i] @ ext[t - 1 - i] for i in range(p))
    return ext[p:]


class _LinearForecaster(ClassicalForecaster):
    joint = False  # VAR: both species in one model; AR: one model per species

    def __init__(self, p: int, intercept: bool = True, log: bool = False) -> None:
        super().__init__()
        self.p, self.intercept, self.log = as_int(p, "p", 1), bool(intercept), bool(log)
        kind = "var" if self.joint else "ar"
        self.name = f"{kind}({self.p})" + ("-log" if self.log else "")
        self.min_context = _min_steps(self.p, 2 if self.joint else 1, self.intercept)

    def settings(self) -> dict:
        return {"name": "var" if self.joint else "ar", "p": self.p, "intercept": self.intercept, "log": self.log}

    def _predict_one(self, context, horizon):
        if self.log and (context <= 0).any():
            raise FitFailed("log fit of a non-positive series")
        z = np.log(context) if self.log else context
        groups = [slice(0, 2)] if self.joint else [slice(0, 1), slice(1, 2)]
        out = np.empty((horizon, 2))
        for g in groups:
            A, c = fit_var(z[:, g], self.p, self.intercept)
            out[:, g] = _var_forecast(z[:, g], A, c, horizon)
        return np.exp(out) if self.log else out


class AR(_LinearForecaster):
    """Per-species AR(p) (``fit_ar`` on each species' own context), recursive forecast.

    Args: p >= 1 lag order; intercept; log: fit on log-populations, forecast ``exp(.)`` (positive; contexts with
    a value <= 0 fall back). Name ``"ar(p)"`` / ``"ar(p)-log"``. Needs ``C >= 2p + intercept + 1``
    (ValueError otherwise). Source: Hamilton 1994, ch. 4 (forecasting) and §8.1 (OLS).
    """


class VAR(_LinearForecaster):
    """VAR(p) over (prey, predator) jointly (``fit_var``), recursive forecast.

    Args as ``AR``; name ``"var(p)"`` / ``"var(p)-log"``. Needs ``C >= 3p + intercept + 1`` (ValueError otherwise).
    Source: Hamilton 1994, ch. 11 (VAR estimated equation by equation by OLS).
    """

    joint = True


def select_order(make: Callable[[int], ClassicalForecaster], orders: Iterable[int], contexts: np.ndarray,
                 truth: np.ndarray) -> tuple[int, dict[int, float]]:
    """Pick the order p (e.g. on the validation split) whose forecaster ``make(p)`` forecasts best.

    Criterion: the mean squared error over all ``n * H * 2`` elements of ``make(p).predict(contexts, H)`` against
    ``truth`` (= the average of the prey and predator MSEs), persistence fallbacks included; ties go to the
    smaller order.

    Args:
        make: factory, e.g. ``lambda p: AR(p, log=True)``. orders: candidate orders (non-empty).
        contexts: ``[n, C, 2]``. truth: ``[n, H, 2]`` the steps right after each context, finite.
    Returns:
        ``(best_order, {order: mse})``.
    Raises:
        ValueError: no orders, truth not ``[n, H, 2]`` matching contexts or not finite, or a forecaster's own
        ValueError (e.g. contexts too short for an order).
    """
    orders = list(orders)
    if not orders:
        raise ValueError("select_order: no orders given")
    truth = np.asarray(truth, dtype=np.float64)
    n = np.shape(contexts)[0] if np.ndim(contexts) else -1
    if truth.ndim != 3 or truth.shape[2] != 2 or truth.shape[0] != n or truth.shape[1] < 1:
        raise ValueError(f"select_order: truth must have shape [n, H, 2] with n = {n}, got {truth.shape}")
    if not np.isfinite(truth).all():
        raise ValueError("select_order: truth contains NaN or inf")
    scores = {p: float(np.mean((make(p).predict(contexts, truth.shape[1]) - truth) ** 2)) for p in orders}
    return min(orders, key=lambda p: (scores[p], p)), scores


