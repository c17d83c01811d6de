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
* ``LotkaVolterraODE`` — the Lotka–Volterra equations (Lotka 1925; Volterra 1926) fitted with
  ``scipy.optimize.least_squares`` and integrated with ``scipy.integrate.solve_ivp``.
* ``ContextParroting(m)`` — copy what followed the earlier stretch of the context that best matches its last m
  steps, repeated with the period this match implies (Zhang & Gilpin 2025, "context parroting"); stretches
  overlapping the last m steps are excluded (a Theiler window); no fitted parameters but m, which is chosen on the
  validation split.

No forecast is ever NaN: when a trajectory's fit fails, or its forecast is non-finite or absurd (any
``|value| > ABSURD_FACTOR * max |context|``), that trajectory gets the persistence forecast and is counted in
``forecaster.n_fallback`` (reset by every ``predict`` call).
"""

from __future__ import annotations

import operator
from typing import Callable, Iterable

import numpy as np
from scipy.integrate import solve_ivp
from scipy.optimize import least_squares

ABSURD_FACTOR = 100.0
"""A forecast with any ``|value| > ABSURD_FACTOR * max |context|`` is replaced by persistence."""


class _FitFailed(Exception):
    """Internal: this trajectory cannot be fitted; use the persistence fallback."""


def _as_int(value, what: str, minimum: int) -> int:
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
        h = _as_int(horizon, "horizon", 1)
        out = np.empty((x.shape[0], h, 2))
        self._n_fallback = 0
        self.last_prediction = None
        for i, ctx in enumerate(x):
            try:
                with np.errstate(all="ignore"):
                    f = np.asarray(self._predict_one(ctx, h), dtype=np.float64)
            except (_FitFailed, RuntimeError, np.linalg.LinAlgError):
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
        from .evaluation import Forecasts

        return Forecasts.from_values(self.predict(contexts, horizon))

    def _predict_one(self, context: np.ndarray, horizon: int) -> np.ndarray:
        """``context [C, 2] -> [horizon, 2]``; raise ``_FitFailed`` to fall back."""
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
    p = _as_int(p, "p", 1)
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
    if len(x) < _min_steps(_as_int(p, "p", 1), 1, intercept):
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
        self.p, self.intercept, self.log = _as_int(p, "p", 1), bool(intercept), bool(log)
        kind = "var" if self.joint else "ar"
        self.name = f"{kind}({self.p})" + ("-log" if self.log else "")
        self.min_context = _min_steps(self.p, 2 if self.joint else 1, self.intercept)

    def settings(self) -> dict:
        return {"name": "var" if self.joint else "ar", "p": self.p, "intercept": self.intercept, "log": self.log}

    def _predict_one(self, context, horizon):
        if self.log and (context <= 0).any():
            raise _FitFailed("log fit of a non-positive series")
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


# ----------------------------------------------------------------------------- Lotka–Volterra ODE


def _lv_rhs(t, z, a, b, c, d):
    """Lotka–Volterra in log-populations z = (log x, log y): dz/dt = (a - b y, c x - d)."""
    x, y = np.exp(z)
    return np.array([a - b * y, c * x - d])


def _lv_rhs_sensitivity(t, w, a, b, c, d):
    """``_lv_rhs`` plus its forward sensitivities S = dz/d(log a, log b, log c, log d, z0) (2 x 6, row-major in
    w[2:]), for which dS/dt = J S + df/dtheta with J = [[0, -b y], [c x, 0]] (the variational equations; Hairer,
    Nørsett & Wanner, *Solving ODEs I*, §I.14)."""
    x, y = np.exp(w[:2])
    out = np.empty(14)
    out[0], out[1] = a - b * y, c * x - d
    out[2:8] = (-b * y) * w[8:]  # row 0 of J @ S
    out[8:] = (c * x) * w[2:8]  # row 1 of J @ S
    out[2] += a  # d f0 / d log a
    out[3] -= b * y  # d f0 / d log b
    out[10] += c * x  # d f1 / d log c
    out[11] -= d  # d f1 / d log d
    return out


def _lv_solve(theta, times, hi, sensitivity):
    """Integrate from z0 = theta[4:] at t = 0; returns ``sol.y.T`` at ``times`` or None when the integrator fails
    or a log-population leaves [-700, hi] (above: absurd; below: exp underflows)."""
    rates = tuple(np.exp(theta[:4]))
    event = lambda t, w, *args: min(hi - w[0], hi - w[1], w[0] + 700.0, w[1] + 700.0)  # noqa: E731
    event.terminal = True
    w0 = np.concatenate([theta[4:], np.eye(2, 6, 4).ravel()]) if sensitivity else theta[4:]
    rhs = _lv_rhs_sensitivity if sensitivity else _lv_rhs
    with np.errstate(all="ignore"):
        sol = solve_ivp(rhs, (0.0, times[-1]), w0, t_eval=times, args=rates, rtol=1e-6, atol=1e-8, events=event)
    if sol.status != 0 or sol.y.shape[1] != len(times) or not np.isfinite(sol.y).all():
        return None
    return sol.y.T


def _lv_guesses(y: np.ndarray, dt: float) -> list[np.ndarray]:
    """Initial (a, b, c, d): (1) regression of log-differences, d/dt log x ~ a - b y and d/dt log y ~ c x - d;
    (2-3) LV time averages (mean x = d/c, mean y = a/b) with sqrt(a d) = the dominant angular frequency of
    the context, a = d and a = 4d."""
    logy, mid = np.log(y), 0.5 * (y[1:] + y[:-1])
    growth = np.diff(logy, axis=0) / dt
    ones = np.ones(len(mid))
    a, mb = np.linalg.lstsq(np.stack([ones, mid[:, 1]], 1), growth[:, 0], rcond=None)[0]
    md, c = np.linalg.lstsq(np.stack([ones, mid[:, 0]], 1), growth[:, 1], rcond=None)[0]
    guesses = [np.abs([a, mb, c, md])]
    spectrum = np.abs(np.fft.rfft(logy[:, 0] - logy[:, 0].mean()))
    omega = 2 * np.pi * (1 + np.argmax(spectrum[1:])) / (len(y) * dt) if len(spectrum) > 1 else 1.0 / dt
    for ratio in (1.0, 4.0):
        a, d = omega * np.sqrt(ratio), omega / np.sqrt(ratio)
        guesses.append(np.array([a, a / y[:, 1].mean(), d / y[:, 0].mean(), d]))
    return guesses


def fit_lotka_volterra(series: np.ndarray, dt: float = 1.0, log_residuals: bool = False,
                       max_nfev: int = 30, n_refine: int = 1) -> tuple[np.ndarray, np.ndarray, float]:
    """Fit dx/dt = a x - b x y, dy/dt = c x y - d y (Lotka 1925; Volterra 1926) to one trajectory.

    Observation k is at time ``k * dt``. The six unknowns — log a, log b, log c, log d and the log initial state
    (x0, y0) — are fitted together by ``scipy.optimize.least_squares`` (trust-region reflective, ``max_nfev``
    evaluations per start, Jacobian from the forward sensitivity equations). Starts: the first observation with each
    of the three rate guesses of ``_lv_guesses``; the ``n_refine`` starts of lowest initial cost are refined and
    the best result wins (refining all three costs ~3x the time for no gain on the coursework data). The ODE is
    integrated in log-populations
    (which stay finite and keep x, y > 0) with ``solve_ivp`` (RK45, rtol 1e-6). Fitting the initial state (rather
    than fixing it at the first, noisy observation) lets every observation weigh equally. Rates are bounded to
    [1e-4, 3] / dt (a, d; b * mean y; c * mean x), the initial state to [min / e^20, 100 max]; orbits going
    above ``ABSURD_FACTOR * max`` are rejected.

    Args:
        series: ``[C, 2]`` (prey, predator), finite, > 0, C >= 4.
        dt: time between observations (> 0); only the units of the rates depend on it.
        log_residuals: residuals log(model) - log(data) (relative error; troughs count) if True, else model - data.
        max_nfev: least-squares function evaluations per start. n_refine: starts refined (1..3).
    Returns:
        ``(rates [a, b, c, d], state0 [x0, y0], rms)``: rates in 1/time (a, d) and 1/(time * population) (b, c),
        rms the root-mean-square residual (log units if ``log_residuals``).
    Raises:
        ValueError: bad shape, C < 4, non-finite or non-positive values, dt <= 0.
        RuntimeError: no start gave a finite fit.
    """
    y = np.asarray(series, dtype=np.float64)
    if y.ndim != 2 or y.shape[1] != 2 or y.shape[0] < 4:
        raise ValueError(f"fit_lotka_volterra: series must have shape [C >= 4, 2], got {y.shape}")
    if not np.isfinite(y).all() or (y <= 0).any():
        raise ValueError("fit_lotka_volterra: series must be finite and positive")
    if not dt > 0:
        raise ValueError(f"fit_lotka_volterra: dt must be > 0, got {dt}")
    times, logy = dt * np.arange(len(y)), np.log(y)
    lo, hi = logy.min() - 20.0, np.log(ABSURD_FACTOR * y.max())  # bounds of the fitted initial state
    per_rate = np.log([1.0, y[:, 1].mean(), y[:, 0].mean(), 1.0])  # b, c scaled by the mean population
    lower = np.concatenate([np.log(1e-4 / dt) - per_rate, [lo + 1, lo + 1]])
    upper = np.concatenate([np.log(3.0 / dt) - per_rate, [hi - 1, hi - 1]])
    cache: dict = {}  # theta bytes -> (residuals, Jacobian): least_squares asks for both at each point

    def evaluate(theta):
        key = theta.tobytes()
        if key not in cache:
            w = _lv_solve(theta, times, hi, sensitivity=True)
            if w is None:
                res, jac = np.full(2 * len(y), np.nan), np.zeros((2 * len(y), 6))
            else:
                z, S = w[:, :2], w[:, 2:].reshape(-1, 2, 6)
                if log_residuals:
                    res, jac = z - logy, S
                else:
                    res, jac = np.exp(z) - y, np.exp(z)[:, :, None] * S
                res, jac = res.ravel(), jac.reshape(-1, 6)
            if len(cache) > 8:
                cache.clear()
            cache[key] = res, jac
        return cache[key]

    starts = [np.clip(np.concatenate([np.log(np.maximum(r, 1e-300)), logy[0]]), lower, upper)
              for r in _lv_guesses(y, dt)]
    start_cost = [np.sum(evaluate(x0)[0] ** 2) for x0 in starts]  # NaN for a failed integration
    best = None
    for i in np.argsort(np.nan_to_num(start_cost, nan=np.inf))[:n_refine]:
        if not np.isfinite(start_cost[i]):
            break
        fit = least_squares(lambda th: evaluate(th)[0], starts[i], jac=lambda th: evaluate(th)[1],
                            bounds=(lower, upper), method="trf", max_nfev=max_nfev, ftol=1e-6, xtol=1e-6)
        if np.isfinite(fit.cost) and (best is None or fit.cost < best.cost):
            best = fit
    if best is None:
        raise RuntimeError("fit_lotka_volterra: no initial guess gave a finite fit")
    return np.exp(best.x[:4]), np.exp(best.x[4:]), float(np.sqrt(2 * best.cost / best.fun.size))


class LotkaVolterraODE(ClassicalForecaster):
    """Fit the Lotka–Volterra ODE to each context (``fit_lotka_volterra``) and integrate it on for the horizon.

    Args: dt: time between observations (the coursework grid: 200 / 99); log_residuals, max_nfev, n_refine: see
    ``fit_lotka_volterra``. Name ``"lv_ode"``. Needs C >= 4 (ValueError otherwise); contexts with a value <= 0,
    failed fits and orbits going above ``ABSURD_FACTOR * max`` fall back to persistence.
    """

    name = "lv_ode"
    min_context = 4

    def __init__(self, dt: float = 1.0, log_residuals: bool = False, max_nfev: int = 30, n_refine: int = 1) -> None:
        super().__init__()
        if not dt > 0:
            raise ValueError(f"LotkaVolterraODE: dt must be > 0, got {dt}")
        self.dt, self.log_residuals = float(dt), bool(log_residuals)
        self.max_nfev, self.n_refine = _as_int(max_nfev, "max_nfev", 1), _as_int(n_refine, "n_refine", 1)

    def settings(self) -> dict:
        return {"name": self.name, "dt": self.dt, "log_residuals": self.log_residuals, "max_nfev": self.max_nfev,
                "n_refine": self.n_refine}

    def _predict_one(self, context, horizon):
        if (context <= 0).any():
            raise _FitFailed("non-positive population")
        rates, state0, _ = fit_lotka_volterra(context, self.dt, self.log_residuals, self.max_nfev, self.n_refine)
        C = len(context)
        times = self.dt * np.arange(C + horizon)
        theta = np.concatenate([np.log(rates), np.log(state0)])
        z = _lv_solve(theta, times, np.log(ABSURD_FACTOR * context.max()), sensitivity=False)
        if z is None:
            raise _FitFailed("forecast orbit left the plausible range")
        return np.exp(z[C:])


# ----------------------------------------------------------------------------- context parroting

PARROT_TIE_TOLERANCE = 1e-9
"""Match distances within ``PARROT_TIE_TOLERANCE * |last m steps|`` of the smallest count as ties (see
``parrot_match``)."""


def parrot_min_lag(m: int, min_lag: int | None = None) -> int:
    """The smallest lag (implied period, in time steps) a parroting match may have: ``min_lag`` if given, else
    ``max(m, 2)`` — the Theiler window that excludes every candidate window overlapping the query (a window ending
    at lag < m shares steps with the last m) and the lag-1 window that repeats the last value."""
    return max(m, 2) if min_lag is None else _as_int(min_lag, "min_lag", 1)


def parrot_lengths_for(context_steps: int, lengths: Iterable[int]) -> list[int]:
    """The match lengths m of ``lengths`` that a context of ``context_steps`` can hold with the default Theiler
    window (``m + parrot_min_lag(m) <= context_steps``), in order."""
    return [m for m in lengths if m + parrot_min_lag(m) <= context_steps]


def parrot_match(context: np.ndarray, m: int, min_lag: int | None = None) -> tuple[int, int, float]:
    """The earlier window of ``context`` that best matches its last ``m`` steps (the search of ``ContextParroting``).

    Candidates are the windows ``context[j-m+1 : j+1]`` ending at every ``j`` from ``m - 1`` to ``C - 1 - L``, with
    ``L = parrot_min_lag(m, min_lag)`` (default ``max(m, 2)``): the lag ``C - 1 - j`` of a candidate is at least L.
    Windows closer in time to the query are excluded — a Theiler window (J. Theiler, "Spurious dimension from
    correlation integrals applied to limited time-series data", Phys. Rev. A 34, 1986; H. Kantz & T. Schreiber,
    *Nonlinear Time Series Analysis*, 2nd ed., ch. 4, on excluding temporal neighbours from nearest-neighbour
    searches): on a smooth series the query shifted by one step is always nearest, and it implies period 1, i.e.
    persistence. The distance is the Euclidean norm of the difference over all ``m x 2`` values, in data units
    (prey and predator unscaled). Distances within ``PARROT_TIE_TOLERANCE`` times the norm of the query of the
    smallest one are ties, and ties go to the most recent window (the shortest lag), so that float rounding in a
    periodic series does not pick a multiple of its period.

    Args:
        context: ``[C, 2]`` (prey, predator), finite. m: match length >= 1. min_lag: L >= 1, or None for the
        default (``min_lag=1`` is the search without a Theiler window).
    Returns:
        ``(j, lag, distance)``: the end position of the matched window, ``lag = C - 1 - j`` (>= L, the period the
        match implies, in time steps) and its distance (data units).
    Raises:
        ValueError: context not ``[C, 2]`` or not finite, bad m or min_lag, or ``C < m + L``.
    """
    x = np.asarray(context, dtype=np.float64)
    m = _as_int(m, "m", 1)
    L = parrot_min_lag(m, min_lag)
    if x.ndim != 2 or x.shape[1] != 2:
        raise ValueError(f"parrot_match: context must have shape [C, 2], got {x.shape}")
    C = x.shape[0]
    if C < m + L:
        raise ValueError(f"parrot_match: a match of m = {m} steps at lag >= {L} needs at least {m + L} time steps, "
                         f"got C = {C}")
    if not np.isfinite(x).all():
        raise ValueError("parrot_match: context contains NaN or inf")
    query = x[C - m:]
    windows = np.lib.stride_tricks.sliding_window_view(x[:C - L], m, axis=0)  # [C-L-m+1, 2, m]; k ends at k+m-1
    distance = np.sqrt(((windows - query.T) ** 2).sum(axis=(1, 2)))
    tied = np.flatnonzero(distance <= distance.min() + PARROT_TIE_TOLERANCE * np.linalg.norm(query))
    j = int(tied[-1]) + m - 1
    return j, C - 1 - j, float(distance[j - m + 1])


class ContextParroting(ClassicalForecaster):
    """Context parroting: continue each context by copying what followed its best match within the context itself.

    Source: Y. Zhang & W. Gilpin, "Zero-shot forecasting of chaotic systems", ICLR 2025 (where parroting is
    identified as what time-series foundation models do when forecasting from context), and "Context parroting: a
    simple but tough-to-beat baseline for foundation models in scientific machine learning", arXiv:2505.11349
    (2025), the section that defines the parroting model (section numbers not checked against the PDFs here).

    For one context ``x [C, 2]`` (prey, predator, data units): ``parrot_match`` finds the window ``x[j-m+1 : j+1]``
    at lag ``C - 1 - j >= L`` (the Theiler window, default ``L = max(m, 2)``: no candidate overlaps the last m
    steps) nearest (Euclidean, over its ``m x 2`` values) to the last m steps ``x[C-m : C]``; the match implies the
    period ``p = C - 1 - j`` time steps, and forecast step ``h = 0, 1, ..., H - 1`` is ``x[j + 1 + (h mod p)]``: the
    values that followed the match, in order, and once the copy reaches the end of the context, the same ``p``
    values again. An exactly periodic series of period P >= L is therefore continued exactly (its last window recurs
    P steps earlier, the most recent exact match); a damped oscillation is continued by its previous cycle.

    Args: m: match length in time steps (>= 1), chosen on the validation split like an AR order
    (``select_order``); min_lag: L (default None: ``max(m, 2)``; 1 allows the adjacent window, which on smooth
    series gives persistence). Name ``"parrot(m)"`` (``"parrot(m, lag>=L)"`` for a non-default L); needs
    ``C >= m + L`` (ValueError otherwise). Forecasts are copies of context values, so they are always finite and
    never fall back. After ``predict``, ``lags`` holds the implied period p of each trajectory (int ``[n]``) and
    ``fallback_counts()`` how many forecasts were persistence (p = 1) or repeat a stretch shorter than the match
    (p < m).
    """

    def __init__(self, m: int, min_lag: int | None = None) -> None:
        super().__init__()
        self.m = _as_int(m, "m", 1)
        self.min_lag = parrot_min_lag(self.m, min_lag)
        default = self.min_lag == parrot_min_lag(self.m)
        self.name = f"parrot({self.m})" if default else f"parrot({self.m}, lag>={self.min_lag})"
        self.min_context = self.m + self.min_lag
        self.lags = np.zeros(0, dtype=int)
        self._lags: list[int] = []

    def settings(self) -> dict:
        return {"name": "parrot", "m": self.m, "min_lag": self.min_lag}

    def fallback_counts(self) -> dict:
        """Of the last ``predict`` call: ``{"persistence": forecasts that repeat the last value (implied period 1,
        or the generic fallback), "short_period": forecasts whose implied period is shorter than m}``."""
        return {"persistence": int((self.lags == 1).sum()) + self.n_fallback,
                "short_period": int((self.lags < self.m).sum())}

    def predict(self, contexts: np.ndarray, horizon: int) -> np.ndarray:
        self._lags, self.lags = [], np.zeros(0, dtype=int)
        out = super().predict(contexts, horizon)
        self.lags = np.array(self._lags, dtype=int)
        return out

    def _predict_one(self, context, horizon):
        j, lag, _ = parrot_match(context, self.m, self.min_lag)
        self._lags.append(lag)
        return context[j + 1 + np.arange(horizon) % lag]


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


def validated_forecasters(val_contexts: np.ndarray, val_truth: np.ndarray, orders, dt: float, log: bool = False,
                          ode: bool = True, parrot_lengths: Iterable[int] | None = None) -> tuple[list, dict]:
    """Persistence, AR(p), VAR(p) with p chosen among ``orders`` by MSE on the validation contexts [n, C, 2] and
    truth [n, H, 2], (if ``ode``) the Lotka–Volterra ODE with time step ``dt``, and (if ``parrot_lengths`` is given)
    ``ContextParroting(m)`` with m chosen among ``parrot_lengths`` the same way. Returns ``(forecasters,
    {"ar"|"var"|"parrot": {"chosen": p or m, "mse_by_order": {p or m: MSE}}})``."""
    search = {}
    makers = [("ar", "p", lambda p: AR(p, log=log), orders), ("var", "p", lambda p: VAR(p, log=log), orders)]
    if parrot_lengths is not None:
        makers.append(("parrot", "m", ContextParroting, parrot_lengths))
    for name, symbol, make, candidates in makers:
        chosen, scores = select_order(make, candidates, val_contexts, val_truth)
        search[name] = {"chosen": chosen, "mse_by_order": scores}
        print(f"{name.upper()} {'order' if symbol == 'p' else 'match length'} on the validation split: "
              f"{symbol} = {chosen} (MSE by {symbol}: {', '.join(f'{p}: {v:.4f}' for p, v in scores.items())})")
    forecasters = [Persistence(), AR(search["ar"]["chosen"], log=log), VAR(search["var"]["chosen"], log=log)]
    forecasters += [LotkaVolterraODE(dt=dt)] if ode else []
    return forecasters + ([ContextParroting(search["parrot"]["chosen"])] if "parrot" in search else []), search
