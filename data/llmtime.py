"""LLMTIME-style text encoding of two-species time series.

Follows the preprocessing idea of LLMTIME (Gruver et al. 2023, "Large Language
Models Are Zero-Shot Time Series Forecasters", NeurIPS 2023, section 3):
rescale the series so that numbers need a fixed, small number of digits,
print every value with a fixed number of decimals, and separate time steps
with a delimiter so that a language model can continue the text as a forecast.

Text format used here (one trajectory of T steps)::

    "p_0,q_0;p_1,q_1;...;p_{T-1},q_{T-1}"

where ``p_t = prey_t / scale`` and ``q_t = predator_t / scale`` are printed in
fixed-point notation with ``decimals`` decimals. There is no trailing ";" (a
forecasting prompt appends it itself). Two encodings of a value (:data:`ENCODINGS`):

* ``"decimal"`` (the default): with its decimal point, e.g. ``"1.23,0.45;1.30,0.41"``.
* ``"integer"``: the same digits without the point, i.e. ``round(x / scale · 10**decimals)``
  written as an integer with its leading zeros dropped, e.g. ``"123,45;130,41"``
  (with ``decimals=2``: 1.23 -> "123", 0.05 -> "5", 0 -> "0"). This is LLMTIME's own
  encoding (Gruver et al. 2023, section 3: "because decimal points are redundant
  given fixed precision, we drop them"). It saves the point's token in every value
  and the leading zero's in every value below 1: with Qwen2.5 on the coursework data,
  7.2 instead of 10.0 tokens per time step at 2 decimals (results/encoding_tokens.json).

Differences from the paper: LLMTIME chooses a scale per series and, for GPT-3,
separates digits with spaces. Here, by default, a single dataset-wide ``scale`` (see
:func:`fit_scale`) is used for both species and every system, and digits are not
spaced, because the Qwen2.5 tokenizer already splits numbers into single digits.
The paper's per-series choice is :class:`SeriesScale` (:func:`fit_series_scale`): an
offset and a scale per species fitted on one trajectory's own context, which
:func:`encode` and :func:`decode` accept in place of the dataset-wide scale.
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

SCALINGS = ("dataset", "series")
"""How values are scaled: "dataset" = one scale α for the whole dataset (:func:`fit_scale`); "series" = an offset and a
scale per species fitted on each trajectory's own context (:func:`fit_series_scale`)."""

SERIES_OFFSET_BETA = 0.3
"""β of :func:`fit_series_scale`: the offset sits β × the context's range below its minimum (LLMTIME's own value for
its per-series scaler, Gruver et al. 2023, code release ``basic=False``)."""

ENCODINGS = ("decimal", "integer")
"""How a value is written: "decimal" = fixed point with the point ("0.45"); "integer" = the same digits without the
point and without leading zeros ("45"), LLMTIME's encoding (Gruver et al. 2023, section 3). See :func:`encode`."""

NUMERIC_ALPHABET = list("0123456789") + [".", ",", ";"]
"""What LLMTIME text in the "decimal" encoding is written with (:func:`numeric_alphabet` for either encoding)."""


def numeric_alphabet(encoding: str = "decimal") -> list[str]:
    """The characters LLMTIME text in ``encoding`` is written with: digits, "," and ";", and "." for "decimal"
    (:data:`NUMERIC_ALPHABET`); the "integer" encoding has no point. Raises ValueError for an unknown encoding."""
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown encoding {encoding!r} ({', '.join(ENCODINGS)})")
    return [c for c in NUMERIC_ALPHABET if encoding == "decimal" or c != "."]


def max_tokens_per_step(decimals: int, encoding: str = "decimal") -> int:
    """Generous token budget for one "prey,pred;" step: up to 3 integer digits, the point ("decimal" encoding only)
    and ``decimals`` digits per value (Qwen tokenizes digits one by one), plus "," and ";". What a forecast may
    generate per step and what its FLOP plan assumes. Raises ValueError for an unknown encoding."""
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown encoding {encoding!r} ({', '.join(ENCODINGS)})")
    return 2 * (3 + (encoding == "decimal") + decimals) + 2


# A plain decimal number, optionally with an exponent, in ASCII digits. Deliberately stricter than
# float(): it rejects "nan", "inf", "1_000", hex, embedded whitespace and other scripts' digits ("١٫٢",
# which float() reads; \d would match them).
_NUMBER = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
# The "integer" encoding's value: ASCII digits only (no sign, point, exponent; \d would admit other scripts' digits).
_DIGITS = re.compile(r"[0-9]+")


def _check_encoding(encoding: str, where: str) -> str:
    """Return ``encoding``; raise ValueError unless it is one of :data:`ENCODINGS`."""
    if encoding not in ENCODINGS:
        raise ValueError(f"{where}: encoding must be one of {', '.join(ENCODINGS)}, got {encoding!r}.")
    return encoding


def _check_decimals(decimals, where: str) -> int:
    """Return ``decimals`` as an int; raise ValueError unless it is an integer in 0–300 (10**decimals must be a
    finite float)."""
    if isinstance(decimals, bool) or not isinstance(decimals, (int, np.integer)) or not 0 <= decimals <= 300:
        raise ValueError(f"{where}: decimals must be an integer between 0 and 300, got {decimals!r}.")
    return int(decimals)


def _check_scale(scale: float) -> float:
    """Return scale as a float; raise ValueError unless it is finite and > 0."""
    try:
        value = float(scale)
    except (TypeError, ValueError) as error:
        raise ValueError(f"scale must be a positive finite number, got {scale!r}.") from error
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"scale must be a positive finite number, got {scale!r}.")
    return value


def fit_scale(train_trajectories: np.ndarray, quantile: float = 0.99, target: float = 10.0) -> float:
    """Fit the single dataset-wide LLMTIME scale on the training split.

    Rule: ``scale = np.quantile(train_values, quantile) / target``, where
    ``train_values`` pools every prey and predator value of every training
    trajectory. After dividing by scale the ``quantile``-quantile of the
    training values equals ``target`` (defaults: the 99th percentile maps to
    10), so almost all scaled values lie in 0–10 and need one integer digit.

    Why: LLMTIME (Gruver et al. 2023, section 3) rescales series so that the
    numbers use a fixed number of digits, which keeps the token budget per step
    constant. Using one scale for both species and all systems (instead of a
    per-series scale as in the paper) keeps prey and predator on the same
    scale and keeps the text comparable across systems. Fit it on the training
    split only, so that no information leaks from validation/test data.

    Args:
        train_trajectories: array of any shape, typically ``(N_train, T, 2)``,
            of non-negative populations (data units).
        quantile: quantile level in (0, 1].
        target: value (> 0) that the quantile is mapped to.

    Returns:
        scale (float, data units per text unit; > 0). Encode with ``x / scale``.

    Raises:
        ValueError: if the input is empty, contains non-finite or negative
            values, ``quantile`` is not in (0, 1], ``target`` <= 0, or the
            resulting scale is not > 0 (e.g. the quantile of the data is 0).
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
    scale = float(np.quantile(values, quantile)) / float(target)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(
            f"fit_scale: scale = quantile({quantile}) / {target} = {scale} is not > 0; "
            "the training data is (almost) all zero."
        )
    return scale


@dataclass(frozen=True)
class SeriesScale:
    """An affine LLMTIME scaling of one trajectory, per species: a value x is written as ``(x − offset) / scale``
    (negative results, i.e. values below the offset, are written as 0) and read back as ``text · scale + offset``.

    Attributes: ``offset`` and ``scale`` — (prey, predator) pairs in data units, offset >= 0, scale > 0.
    Made by :func:`fit_series_scale`; :func:`encode` and :func:`decode` take it in place of a float scale.
    """

    offset: tuple[float, float]
    scale: tuple[float, float]

    def to_text_units(self, values: np.ndarray) -> np.ndarray:
        """``values`` [T, 2] data units -> text units (clipped at 0)."""
        return np.maximum(np.asarray(values, np.float64) - np.asarray(self.offset), 0.0) / np.asarray(self.scale)

    def to_data_units(self, values: np.ndarray) -> np.ndarray:
        """``values`` [T, 2] text units -> data units."""
        return np.asarray(values, np.float64) * np.asarray(self.scale) + np.asarray(self.offset)


def fit_series_scale(context: np.ndarray, quantile: float = 0.99, target: float = 10.0,
                     beta: float = SERIES_OFFSET_BETA) -> SeriesScale:
    """Fit a :class:`SeriesScale` on one trajectory's context, each species on its own.

    Rule (LLMTIME's per-series scaler, Gruver et al. 2023, section 3 and the ``basic=False`` scaler of its code,
    here per species and with the quantile mapped to ``target``): ``offset = max(min − β·(max − min), 0)`` and
    ``scale = quantile_q(context − offset) / target``, so that the context's values occupy about
    ``[10·β/(1+β), target]`` = [2.3, 10] in text units whatever the trajectory's size: a small or decaying
    oscillation fills the digits instead of wiggling in the last one. A constant species gets ``scale = max(|x|,
    1e-12) / target``.

    Args: context ``[C, 2]`` (C >= 1) finite, >= 0; quantile in (0, 1]; target > 0; beta >= 0.
    Raises: ValueError for a bad shape, values or parameter.
    """
    x = np.asarray(context, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != 2 or x.shape[0] < 1:
        raise ValueError(f"fit_series_scale: context must have shape (C >= 1, 2), got {x.shape}.")
    if not np.all(np.isfinite(x)) or np.any(x < 0):
        raise ValueError("fit_series_scale: context must be finite and non-negative.")
    if not 0.0 < quantile <= 1.0 or not (math.isfinite(target) and target > 0) or not beta >= 0:
        raise ValueError(f"fit_series_scale: need 0 < quantile <= 1, target > 0, beta >= 0, got {quantile!r}, "
                         f"{target!r}, {beta!r}.")
    lo, hi = x.min(axis=0), x.max(axis=0)
    offset = np.maximum(lo - beta * (hi - lo), 0.0)
    q = np.quantile(x - offset, quantile, axis=0)
    scale = np.where(q > 0, q, np.maximum(np.abs(hi), 1e-12)) / target
    return SeriesScale((float(offset[0]), float(offset[1])), (float(scale[0]), float(scale[1])))


def encode(trajectory: np.ndarray, scale: float | SeriesScale, decimals: int = 2, encoding: str = "decimal") -> str:
    """Encode one trajectory as LLMTIME text.

    Each value is divided by ``scale`` and printed fixed-point with
    ``decimals`` decimals; a time step is ``"prey,predator"`` and steps are
    joined by ``";"`` with no trailing separator. A trajectory with T = 0 steps gives ``""``.

    * ``encoding="decimal"``: e.g. ``"1.23,0.45;1.30,0.41"`` (``decimals=0`` writes no point: ``"1,0"``).
    * ``encoding="integer"`` (LLMTIME, Gruver et al. 2023, section 3): the
      decimal text with the point removed and leading zeros dropped, so a value
      is ``round(x / scale · 10**decimals)`` as an integer: with ``decimals=2``,
      1.23 -> ``"123"``, 0.45 -> ``"45"``, 0.05 -> ``"5"``, 0 -> ``"0"``,
      12.3 -> ``"1230"``; e.g. ``"123,45;130,41"``. Rounding is exactly the
      decimal encoding's (the digits are the same), so both encodings carry the
      same values and :func:`decode` returns identical numbers for both.

      Leading zeros are dropped, as in the paper (its example at precision 2:
      0.123 -> "12", 1.23 -> "123"), because they carry no information once the
      number of implied decimals is fixed and the separators delimit every
      value, and they would cost a token each: most scaled values are below 1
      or 10 (the 99th percentile maps to 10, :func:`fit_scale`), so zero-padding
      every value to a fixed width would give back most of the tokens saved by
      dropping the point. The price is that a value's magnitude is its digit
      count ("45" = 0.45, "145" = 1.45), which the model must read from the
      position of the separators instead of from a point.

    Args:
        trajectory: array of shape ``(T, 2)`` (prey, predator), data units, >= 0.
        scale: scale from :func:`fit_scale` (> 0), or a :class:`SeriesScale` (:func:`fit_series_scale`).
        decimals: number of decimals, implied ones for "integer" (>= 0).
        encoding: one of :data:`ENCODINGS`.

    Returns:
        The encoded string.

    Raises:
        ValueError: if the shape is not ``(T, 2)``, a value is negative or
            non-finite, ``scale`` <= 0 / non-finite, ``decimals`` < 0 or
            ``encoding`` is not one of :data:`ENCODINGS`.
    """
    series = scale if isinstance(scale, SeriesScale) else None
    scale = 1.0 if series else _check_scale(scale)
    _check_encoding(encoding, "encode")
    if int(decimals) != decimals or decimals < 0:
        raise ValueError(f"encode: decimals must be a non-negative integer, got {decimals!r}.")
    values = np.asarray(trajectory, dtype=np.float64)
    if values.ndim != 2 or values.shape[1] != 2:
        raise ValueError(f"encode: trajectory must have shape (T, 2), got {values.shape}.")
    if not np.all(np.isfinite(values)):
        raise ValueError(f"encode: trajectory has {int((~np.isfinite(values)).sum())} non-finite value(s).")
    if np.any(values < 0):
        raise ValueError(f"encode: trajectory has {int((values < 0).sum())} negative value(s).")
    scaled = (series.to_text_units(values) if series else values / scale) + 0.0  # -0.0 never prints as "-0.00"
    fmt = f"{{:.{int(decimals)}f}}"
    if encoding == "integer":
        def fmt_value(x: float) -> str:
            return fmt.format(x).replace(".", "").lstrip("0") or "0"
    else:
        fmt_value = fmt.format
    return STEP_SEPARATOR.join(
        fmt_value(prey) + VALUE_SEPARATOR + fmt_value(predator) for prey, predator in scaled
    )


@dataclass
class Decoded:
    """Result of :func:`decode`.

    Attributes:
        values: float64 array of shape ``(k, 2)`` (prey, predator) in data
            units (already multiplied by scale). Rows of steps that could not
            be parsed, or that were expected but missing, are NaN.
        n_invalid: number of steps present in the text but unparseable (wrong
            number of fields, not a number in ASCII digits, non-finite — also
            once multiplied by scale —, negative, empty; for the "integer"
            encoding also anything but digits, e.g. a point).
        n_missing: number of steps expected (``expected_steps``) but absent.
    """

    values: np.ndarray
    n_invalid: int
    n_missing: int

    @property
    def complete(self) -> bool:
        """True if every step was present and valid."""
        return self.n_invalid == 0 and self.n_missing == 0


def _parse_step(step: str, divisor: float | None = None, scale: float = 1.0) -> tuple[float, float] | None:
    """Parse ``"prey,predator"`` into two finite non-negative floats, each multiplied by ``scale``, or None
    (also when a value times ``scale`` overflows to inf: a number too large to be one is not a forecast).

    ``divisor`` None: plain decimal numbers (the "decimal" encoding); else ASCII digit strings (the "integer"
    encoding), each divided by ``divisor`` = 10**decimals."""
    fields = step.split(VALUE_SEPARATOR)
    if len(fields) != 2:
        return None
    parsed = []
    for field in fields:
        field = field.strip()
        if not (_NUMBER if divisor is None else _DIGITS).fullmatch(field):
            return None
        # float(digits) / 10**d is the correctly rounded quotient of two exact numbers (for up to 15 digits), i.e.
        # the same float as float("d.dd"); a huge digit string gives inf and is refused below
        value = (float(field) if divisor is None else float(field) / divisor) * scale
        if not math.isfinite(value) or value < 0:
            return None
        parsed.append(value + 0.0)  # normalise -0.0 to 0.0
    return parsed[0], parsed[1]


def decode(text: str, scale: float | SeriesScale, expected_steps: int | None = None, *, encoding: str = "decimal",
           decimals: int | None = None) -> Decoded:
    """Decode LLMTIME text (e.g. a model's forecast) back into data units.

    The text is stripped and split on ``";"``; a single empty trailing piece
    (from a trailing ``";"``) is ignored. Every piece must be exactly two
    comma-separated numbers (whitespace around them is allowed), both finite
    and >= 0; otherwise the step is counted in ``n_invalid`` and its row is
    NaN. Values are multiplied by ``scale``. What a number is depends on
    ``encoding`` (see :func:`encode`):

    * ``"decimal"``: a plain decimal number (``"1.23"``, ``"12"``, ``"1e2"``); ``decimals`` is not needed
      (the text carries its point) and is ignored.
    * ``"integer"``: ASCII digits only, read as ``int / 10**decimals``
      (``"123"`` -> 1.23 with ``decimals=2``). A point, sign, exponent or
      any other character makes the step invalid: text in the other
      encoding is never silently read 10**decimals times too large.
      Leading zeros are accepted (``"045"`` = 0.45; the value is unambiguous),
      though :func:`encode` never writes them.

    If ``expected_steps`` is given, the result has exactly that many rows:
    only the first ``expected_steps`` steps are used (extra steps are dropped
    and not counted), and absent steps are NaN rows counted in ``n_missing``.

    Never raises on the content of ``text``: any string (empty, letters,
    ``"1.2.3,4"``, ``";;;"``, ``"1,2,3"`` ...) gives a result. For example
    ``decode(";;;", 1.0)`` has 3 invalid steps and ``decode("", 1.0)`` has 0 steps.

    Args:
        text: the string to decode (``bytes`` are decoded as UTF-8 with replacement).
        scale: the scale used for encoding (> 0), or the :class:`SeriesScale` it used.
        expected_steps: number of steps wanted, or None to keep all steps.
        encoding: one of :data:`ENCODINGS`, the one the text was written in.
        decimals: the implied decimals of the "integer" encoding (required for
            it, 0–300); ignored for "decimal".

    Returns:
        Decoded with ``values`` of shape ``(k, 2)``, k = ``expected_steps`` if
        given, else the number of steps in the text.

    Raises:
        ValueError: if ``scale`` is not a positive finite number,
            ``expected_steps`` < 0, ``encoding`` is not one of
            :data:`ENCODINGS`, or ``encoding="integer"`` without an
            integer ``decimals`` in 0–300.
        TypeError: if ``text`` is neither ``str`` nor ``bytes``.
    """
    series = scale if isinstance(scale, SeriesScale) else None
    scale = 1.0 if series else _check_scale(scale)
    _check_encoding(encoding, "decode")
    divisor = None
    if encoding == "integer":
        if decimals is None:
            raise ValueError("decode: the integer encoding needs decimals (the number of implied decimals).")
        divisor = float(10 ** _check_decimals(decimals, "decode"))
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
        parsed = _parse_step(piece, divisor, scale)
        if parsed is None:
            n_invalid += 1
        else:
            values[row] = parsed
    if series is not None:
        values = series.to_data_units(values)  # NaN rows stay NaN
    return Decoded(values=values, n_invalid=n_invalid, n_missing=n_missing)
