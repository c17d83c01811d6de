"""One two-species series from anyone's CSV file, validated cell by cell, or one trajectory of the coursework HDF5.

CSV layout: comma-separated UTF-8 text (a byte-order mark is allowed); the first row is a header naming the columns;
every following row is one time step. The prey and predator columns are the ones named ``prey`` and ``predator``
(any case) unless ``columns`` names them; a column named ``time`` or ``t`` (any case), if present, gives the sample
times. Other columns are ignored; blank lines are skipped. For example::

    time,prey,predator
    0.0,0.949,1.04
    2.0202,0.712,0.968

Rows are counted as in a spreadsheet: the header is row 1, the first data row is row 2 (= the line number of the
file, unless a quoted cell spans lines). Every problem is a :class:`SeriesError` of one line naming the file and,
where there is one, the row and column: a missing or unreadable file, an empty file, no data rows, a missing
column, a cell that is not a plain decimal number (``1.5``, ``2e-3``; not ``abc``, ``1,5``, ``1_000``), NaN or
infinity, a negative population, a row with another number of cells than the header, times that do not increase,
fewer rows than the caller needs.
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .lotka_volterra import DataError, load_trajectories

#: column names recognised without ``columns`` (compared case-insensitively)
SPECIES_COLUMNS = ("prey", "predator")
TIME_COLUMNS = ("time", "t")
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
# a plain decimal number with an optional exponent; also "nan"/"inf" so that they get their own message
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|[+-]?(?:nan|inf|infinity)", re.IGNORECASE | re.ASCII)


class SeriesError(DataError):
    """A series file that cannot be used: one line naming the file (and the row and column where there is one).
    A :class:`data.DataError`, so the stages report it as one line with exit status 2."""


@dataclass
class Series:
    """One two-species series.

    Attributes:
        values: float64 ``[T, 2]`` (prey, predator) in the file's units, finite and >= 0.
        time: float64 ``[T]`` strictly increasing sample times, or None when the file has none.
        source: what it is, for messages and plots: ``"file.csv"`` or ``"file.h5, trajectory 950"``.
        path: the file read. columns: the names of the prey and predator columns (``("prey", "predator")`` for HDF5).
    """

    values: np.ndarray
    time: np.ndarray | None
    source: str
    path: Path
    columns: tuple[str, str] = SPECIES_COLUMNS

    def time_step(self, steps: int | None = None) -> float | None:
        """The time between rows if the first ``steps`` (default all) times are evenly spaced (relative tolerance
        1e-3), else None (also without times or with fewer than two)."""
        t = None if self.time is None else self.time[:steps]
        if t is None or len(t) < 2:
            return None
        dt = np.diff(t)
        return float(dt.mean()) if np.allclose(dt, dt.mean(), rtol=1e-3, atol=0) else None


def is_hdf5(path: str | Path) -> bool:
    """Whether ``path`` is an HDF5 file (by its 8-byte signature; False if it cannot be read)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(8) == HDF5_SIGNATURE
    except OSError:
        return False


def read_trajectory(path: str | Path, index: int) -> Series:
    """Trajectory ``index`` of a coursework-schema HDF5 file (:func:`data.load_trajectories`) as a :class:`Series`
    with the file's times. Raises DataError for a bad file, SeriesError for an index out of range."""
    data = load_trajectories(path)
    if not 0 <= index < data.n_systems:
        raise SeriesError(f"{data.path}: --index {index} is out of range (the file has trajectories 0 to "
                          f"{data.n_systems - 1})")
    return Series(data.trajectories[index].astype(np.float64), data.time.astype(np.float64),
                  f"{data.path.name}, trajectory {index}", data.path)


def _find(header: list[str], name: str) -> int | None:
    """Index of the column called ``name``: the exact name, else the only one equal ignoring case; None if none."""
    if name in header:
        return header.index(name)
    hits = [i for i, h in enumerate(header) if h.lower() == name.lower()]
    return hits[0] if len(hits) == 1 else None


def _number(cell: str, where: str, nonnegative: bool) -> float:
    text = cell.strip()
    if not text:
        raise SeriesError(f"{where}: empty cell, expected a number")
    if not _NUMBER.fullmatch(text):
        raise SeriesError(f"{where}: {cell.strip()!r} is not a number")
    value = float(text)
    if not math.isfinite(value):
        raise SeriesError(f"{where}: {text} is not a finite number (NaN and infinity are not allowed)")
    if nonnegative and value < 0:
        raise SeriesError(f"{where}: {text} is negative (populations must be >= 0)")
    return value + 0.0


def read_series_csv(path: str | Path, columns: tuple[str, str] | None = None, min_rows: int = 1,
                    need: str = "") -> Series:
    """Read and validate a two-species CSV (layout in the module docstring).

    Args:
        path: the CSV file.
        columns: ``(prey column, predator column)`` names; None = the columns named prey and predator.
        min_rows: data rows required (e.g. the context length); ``need`` says why, for the message
            (e.g. ``"--context-steps 80"``).

    Returns:
        :class:`Series` with ``values`` [T, 2] float64 and ``time`` [T] (None without a time column).

    Raises:
        SeriesError: one line naming the file, and the row and column where the problem is (module docstring).
    """
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            rows = [(reader.line_num, row) for row in reader if any(cell.strip() for cell in row)]
    except FileNotFoundError:
        raise SeriesError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise SeriesError(f"{path}: is a directory, not a CSV file") from None
    except UnicodeDecodeError as err:
        raise SeriesError(f"{path}: not UTF-8 text (byte {err.start}); save it as UTF-8 CSV") from None
    except csv.Error as err:
        raise SeriesError(f"{path}: not a readable CSV file ({err})") from None
    except OSError as err:
        raise SeriesError(f"{path}: cannot read it ({err.strerror or err})") from None
    if not rows:
        raise SeriesError(f"{path}: empty file (expected a header row naming the columns, e.g. time,prey,predator)")
    (header_row, header), data = rows[0], rows[1:]
    header = [h.strip() for h in header]
    if len(header) == 1 and any(sep in header[0] for sep in ";\t"):
        raise SeriesError(f"{path}: row {header_row} has a single column {header[0]!r}: the file must be "
                          "comma-separated")
    if all(_NUMBER.fullmatch(h) for h in header):
        raise SeriesError(f"{path}: row {header_row} holds numbers, not a header: the first row must name the "
                          "columns (e.g. time,prey,predator)")
    wanted = tuple(columns) if columns else SPECIES_COLUMNS
    found = [_find(header, name) for name in wanted]
    missing = [name for name, i in zip(wanted, found) if i is None]
    if missing:
        how = "" if columns else "; name the prey and predator columns with --columns PREY,PREDATOR"
        raise SeriesError(f"{path}: no column {' or '.join(map(repr, missing))} in the header (row {header_row}: "
                          f"{', '.join(header)}){how}")
    if found[0] == found[1]:
        raise SeriesError(f"{path}: the prey and predator columns are the same column {header[found[0]]!r}")
    time_at = next((i for name in TIME_COLUMNS if (i := _find(header, name)) is not None and i not in found), None)
    if not data:
        raise SeriesError(f"{path}: no data rows after the header (row {header_row})")
    values, times = np.empty((len(data), 2)), np.empty(len(data))
    for k, (row_number, row) in enumerate(data):
        if len(row) != len(header):
            raise SeriesError(f"{path}: row {row_number} has {len(row)} cells, the header has {len(header)}")
        for j, i in enumerate(found):
            values[k, j] = _number(row[i], f"{path}: row {row_number}, column {header[i]!r}", nonnegative=True)
        if time_at is not None:
            times[k] = _number(row[time_at], f"{path}: row {row_number}, column {header[time_at]!r}", False)
            if k and times[k] <= times[k - 1]:
                raise SeriesError(f"{path}: row {row_number}, column {header[time_at]!r}: {row[time_at].strip()} "
                                  f"does not increase on the row before (times must be strictly increasing)")
    if len(data) < min_rows:
        raise SeriesError(f"{path}: only {len(data)} data rows (the last is row {data[-1][0]}), but "
                          f"{need or 'the forecast'} needs at least {min_rows}")
    return Series(values, times if time_at is not None else None, path.name, path,
                  (header[found[0]], header[found[1]]))
