"""Context parroting (Zhang & Gilpin 2025): copy what followed the earlier stretch of the context that best matches
its last m steps, repeated with the period the match implies; stretches overlapping the last m steps are excluded (a
Theiler window). No fitted parameters but m, chosen on the validation split."""

from __future__ import annotations

from typing import Iterable

import numpy as np

from .classical_forecasters import ClassicalForecaster, as_int


#: match distances within ``PARROT_TIE_TOLERANCE * |last m steps|`` of the smallest count as ties (see
#: ``parrot_match``)
PARROT_TIE_TOLERANCE = 1e-9



def parrot_min_lag(m: int, min_lag: int | None = None) -> int:
    """The smallest lag (implied period, in time steps) a parroting match may have: ``min_lag`` if given, else
    ``max(m, 2)`` — the Theiler window that excludes every candidate window overlapping the query (a window ending
    at lag < m shares steps with the last m) and the lag-1 window that repeats the last value."""
    return max(m, 2) if min_lag is None else as_int(min_lag, "min_lag", 1)



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
    m = as_int(m, "m", 1)
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
        self.m = as_int(m, "m", 1)
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
