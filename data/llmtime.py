"""LLMTIME-style text encoding of two-species time series.

Follows the preprocessing idea of LLMTIME (Gruver et al. 2023, "Large Language
Models Are Zero-Shot Time Series Forecasters", NeurIPS 2023, section 3):
rescale the series so that numbers need a fixed, small number of digits,
print every value with a fixed number of decimals, and separate time steps
with a delimiter so that a language model can continue the text as a forecast.

Text format used here (one trajectory of T steps)::

    "p_0,q_0;p_1,q_1;...;p_{T-1},q_{T-1}"

where ``p_t = prey_t / alpha`` and ``q_t = predator_t / alpha`` are printed in
fixed-point notation with ``decimals`` decimals, e.g. ``"1.23,0.45;1.30,0.41"``.
There is no trailing ";" (a forecasting prompt appends it itself).

Differences from the paper: LLMTIME chooses a scale per series and, for GPT-3,
drops the decimal point and separates digits with spaces. Here a single
dataset-wide scale ``alpha`` (see :func:`fit_scale`) is used for both species
and every system, and numbers keep their decimal point, because the Qwen2.5
tokenizer already splits numbers into single digits.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

STEP_SEPARATOR = ";"
"""Separates consecutive time steps."""

VALUE_SEPARATOR = ","
"""Separates the prey and predator value within one time step."""

# A plain decimal number, optionally with an exponent. Deliberately stricter than
# float(): it rejects "nan", "inf", "1_000", hex, and embedded whitespace.
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")


def _check_alpha(alpha: float) -> float:
    """Return alpha as a float; raise ValueError unless it is finite and > 0."""
    try:
        value = float(alpha)
    except (TypeError, ValueError) as error:
        raise ValueError(f"alpha must be a positive finite number, got {alpha!r}.") from error
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"alpha must be a positive finite number, got {alpha!r}.")
    return value


def fit_scale(train_trajectories: np.ndarray, quantile: float = 0.99, target: float = 10.0) -> float:
    """Fit the single dataset-wide LLMTIME scale alpha on the training split.

    Rule: ``alpha = np.quantile(train_values, quantile) / target``, where
    ``train_values`` pools every prey and predator value of every training
    trajectory. After dividing by alpha the ``quantile``-quantile of the
    training values equals ``target`` (defaults: the 99th percentile maps to
    10), so almost all scaled values lie in 0–10 and need one integer digit.

    Why: LLMTIME (Gruver et al. 2023, section 3) rescales series so that the
    numbers use a fixed number of digits, which keeps the token budget per step
    constant. Using one alpha for both species and all systems (instead of a
    per-series scale as in the paper) keeps prey and predator on the same
    scale and keeps the text comparable across systems. Fit it on the training
    split only, so that no information leaks from validation/test data.

    Args:
        train_trajectories: array of any shape, typically ``(N_train, T, 2)``,
            of non-negative populations (data units).
        quantile: quantile level in (0, 1].
        target: value (> 0) that the quantile is mapped to.

    Returns:
        alpha (float, data units per text unit; > 0). Encode with ``x / alpha``.

    Raises:
        ValueError: if the input is empty, contains non-finite or negative
            values, ``quantile`` is not in (0, 1], ``target`` <= 0, or the
            resulting alpha is not > 0 (e.g. the quantile of the data is 0).
    """
    values = np.asarray(train_trajectories, dtype=np.float64)
    if values.size == 0:
        raise ValueError("fit_scale: training data is empty.")
    if not np.all(np.isfinite(values)):
        raise ValueError(f"fit_scale: training data has {int((~np.isfinite(values)).sum())} non-finite value(s).")
    if np.any(values < 0):
        raise ValueError(f"fit_scale: training data has {int((values < 0).sum())} negative value(s).")
    if not 0.0 < quantile <= 1.0:
        raise ValueError(f"fit_scale: quantile must be in (0, 1], got {quantile!r}.")
    if not (math.isfinite(target) and target > 0):
        raise ValueError(f"fit_scale: target must be a positive finite number, got {target!r}.")
    alpha = float(np.quantile(values, quantile)) / float(target)
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(
            f"fit_scale: alpha = quantile({quantile}) / {target} = {alpha} is not > 0; "
            "the training data is (almost) all zero."
        )
    return alpha


def encode(trajectory: np.ndarray, alpha: float, decimals: int = 2) -> str:
    """Encode one trajectory as LLMTIME text.

    Each value is divided by ``alpha`` and printed fixed-point with
    ``decimals`` decimals; a time step is ``"prey,predator"`` and steps are
    joined by ``";"`` with no trailing separator, e.g. ``"1.23,0.45;1.30,0.41"``.
    A trajectory with T = 0 steps gives ``""``.

    Args:
        trajectory: array of shape ``(T, 2)`` (prey, predator), data units, >= 0.
        alpha: scale from :func:`fit_scale` (> 0).
        decimals: number of decimals (>= 0).

    Returns:
        The encoded string.

    Raises:
        ValueError: if the shape is not ``(T, 2)``, a value is negative or
            non-finite, ``alpha`` <= 0 / non-finite, or ``decimals`` < 0.
    """
    alpha = _check_alpha(alpha)
    if int(decimals) != decimals or decimals < 0:
        raise ValueError(f"encode: decimals must be a non-negative integer, got {decimals!r}.")
    values = np.asarray(trajectory, dtype=np.float64)
    if values.ndim != 2 or values.shape[1] != 2:
        raise ValueError(f"encode: trajectory must have shape (T, 2), got {values.shape}.")
    if not np.all(np.isfinite(values)):
        raise ValueError(f"encode: trajectory has {int((~np.isfinite(values)).sum())} non-finite value(s).")
    if np.any(values < 0):
        raise ValueError(f"encode: trajectory has {int((values < 0).sum())} negative value(s).")
    scaled = values / alpha + 0.0  # "+ 0.0" turns -0.0 into 0.0 so it never prints as "-0.00"
    fmt = f"{{:.{int(decimals)}f}}"
    return STEP_SEPARATOR.join(
        fmt.format(prey) + VALUE_SEPARATOR + fmt.format(predator) for prey, predator in scaled
    )


@dataclass
class Decoded:
    """Result of :func:`decode`.

    Attributes:
        values: float64 array of shape ``(k, 2)`` (prey, predator) in data
            units (already multiplied by alpha). Rows of steps that could not
            be parsed, or that were expected but missing, are NaN.
        n_invalid: number of steps present in the text but unparseable (wrong
            number of fields, not a number, non-finite, negative, empty).
        n_missing: number of steps expected (``expected_steps``) but absent.
    """

    values: np.ndarray
    n_invalid: int
    n_missing: int

    @property
    def complete(self) -> bool:
        """True if every step was present and valid."""
        return self.n_invalid == 0 and self.n_missing == 0


def _parse_step(step: str) -> tuple[float, float] | None:
    """Parse ``"prey,predator"`` into two finite non-negative floats, or None."""
    fields = step.split(VALUE_SEPARATOR)
    if len(fields) != 2:
        return None
    parsed = []
    for field in fields:
        field = field.strip()
        if not _NUMBER.fullmatch(field):
            return None
        value = float(field)
        if not math.isfinite(value) or value < 0:
            return None
        parsed.append(value + 0.0)  # normalise -0.0 to 0.0
    return parsed[0], parsed[1]


def decode(text: str, alpha: float, expected_steps: int | None = None) -> Decoded:
    """Decode LLMTIME text (e.g. a model's forecast) back into data units.

    The text is stripped and split on ``";"``; a single empty trailing piece
    (from a trailing ``";"``) is ignored. Every piece must be exactly two
    comma-separated plain decimal numbers (whitespace around them is allowed),
    both finite and >= 0; otherwise the step is counted in ``n_invalid`` and
    its row is NaN. Values are multiplied by ``alpha``.

    If ``expected_steps`` is given, the result has exactly that many rows:
    only the first ``expected_steps`` steps are used (extra steps are dropped
    and not counted), and absent steps are NaN rows counted in ``n_missing``.

    Never raises on the content of ``text``: any string (empty, letters,
    ``"1.2.3,4"``, ``";;;"``, ``"1,2,3"`` ...) gives a result. For example
    ``decode(";;;", 1.0)`` has 3 invalid steps and ``decode("", 1.0)`` has 0 steps.

    Args:
        text: the string to decode (``bytes`` are decoded as UTF-8 with replacement).
        alpha: the scale used for encoding (> 0).
        expected_steps: number of steps wanted, or None to keep all steps.

    Returns:
        Decoded with ``values`` of shape ``(k, 2)``, k = ``expected_steps`` if
        given, else the number of steps in the text.

    Raises:
        ValueError: if ``alpha`` is not a positive finite number or
            ``expected_steps`` < 0.
        TypeError: if ``text`` is neither ``str`` nor ``bytes``.
    """
    alpha = _check_alpha(alpha)
    if expected_steps is not None and (int(expected_steps) != expected_steps or expected_steps < 0):
        raise ValueError(f"decode: expected_steps must be a non-negative integer or None, got {expected_steps!r}.")
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    if not isinstance(text, str):
        raise TypeError(f"decode: text must be a str, got {type(text).__name__}.")

    stripped = text.strip()
    pieces = stripped.split(STEP_SEPARATOR) if stripped else []
    if pieces and pieces[-1].strip() == "":
        pieces.pop()

    n_missing = 0
    if expected_steps is not None:
        expected_steps = int(expected_steps)
        n_missing = max(expected_steps - len(pieces), 0)
        pieces = pieces[:expected_steps]

    values = np.full((len(pieces) + n_missing, 2), np.nan, dtype=np.float64)
    n_invalid = 0
    for row, piece in enumerate(pieces):
        parsed = _parse_step(piece)
        if parsed is None:
            n_invalid += 1
        else:
            values[row] = parsed
    return Decoded(values=values * alpha, n_invalid=n_invalid, n_missing=n_missing)
