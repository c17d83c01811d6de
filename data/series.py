"""One two-species series from anyone's CSV file, validated cell by cell, or one trajectory of the coursework HDF5.

CSV layout: comma-separated UTF-8 text (a byte-order mark is allowed); the first row is a header naming the columns;
every following row is one time step. The prey and predator columns are the ones named ``prey`` and ``predator``
(any case) unless ``columns`` names them. The sample times are the column ``time_column`` names, else a column
named ``time`` or ``t`` (any case), else the first other column if all its cells are numbers that increase (else the
series has no times). Other columns are ignored; blank lines are skipped. For example::

    time,prey,predator
    0.0,0.949,1.04
    2.0202,0.712,0.968

Rows are counted as in a spreadsheet: the header is row 1, the first data row is row 2 (= the line number of the
file, unless a quoted cell spans lines). Every problem is a :class:`SeriesError` of one line naming the file and,
where there is one, the row and column: a missing or unreadable file, an empty file, no data rows, a missing
column, a cell that is not a plain decimal number (``1.5``, ``2e-3``; not ``abc``, ``1,5``, ``1_000``), NaN or
infinity, a negative population, a row with another number of cells than the header, times that do not increase,
fewer rows than the caller needs. A path that is not a regular file (a FIFO, device or socket, which would block
or never end) is refused before it is opened, as :func:`data.load_trajectories` refuses one.
"""

from __future__ import annotations

import csv
import math
import re
import stat
from collections import deque
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
        time_column: the name of the time column (``"time"`` for HDF5), None without times.
        rows: data rows in the file (``len(values)`` unless only the last rows were kept).
    """

    values: np.ndarray
    time: np.ndarray | None
    source: str
    path: Path
    columns: tuple[str, str] = SPECIES_COLUMNS
    time_column: str | None = None
    rows: int | None = None

    def time_step(self, steps: int | None = None) -> float | None:
        """The time between rows if the first ``steps`` (default all) times are evenly spaced (relative tolerance
        1e-3), else None (also without times or with fewer than two)."""
        t = None if self.time is None else self.time[:steps]
        if t is None or len(t) < 2:
            return None
        dt = np.diff(t)
        return float(dt.mean()) if np.allclose(dt, dt.mean(), rtol=1e-3, atol=0) else None


def not_a_regular_file(path: str | Path) -> str | None:
    """What ``path`` is if it exists but is not a regular file (``"a FIFO"``, ``"a directory"``, ...), else None.
    Checked without opening it: opening a FIFO blocks until something writes to it."""
    try:
        mode = Path(path).stat().st_mode
    except OSError:
        return None
    kinds = [(stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")]
    return None if stat.S_ISREG(mode) else next((kind for test, kind in kinds if test(mode)), "not a regular file")


def is_hdf5(path: str | Path) -> bool:
    """Whether ``path`` is an HDF5 file (by its 8-byte signature; False if it cannot be read or is not a regular
    file)."""
    if not_a_regular_file(path):
        return False
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
                  f"{data.path.name}, trajectory {index}", data.path, time_column="time", rows=data.n_steps)


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


def _rows(path: Path):
    """``(line number, cells)`` of each non-blank row of the CSV ``path``, read lazily; read errors as SeriesError."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            for row in reader:
                if any(cell.strip() for cell in row):
                    yield reader.line_num, row
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


def _time_at(path: Path, header: list[str], header_row: int, species: list[int], name: str | None) -> int | None:
    """The time column's index: the one called ``name``, else one called time or t, else the first other column."""
    if name is not None:
        i = _find(header, name)
        if i is None:
            raise SeriesError(f"{path}: no time column {name!r} in the header (row {header_row}: {', '.join(header)})")
        if i in species:
            raise SeriesError(f"{path}: the time column {header[i]!r} is also a species column")
        return i
    named = next((i for n in TIME_COLUMNS if (i := _find(header, n)) is not None and i not in species), None)
    return named if named is not None else next((i for i in range(len(header)) if i not in species), None)


def read_series_csv(path: str | Path, columns: tuple[str, str] | None = None, min_rows: int = 1,
                    need: str = "", time_column: str | None = None, last: int | None = None) -> Series:
    """Read and validate a two-species CSV (layout in the module docstring).

    Args:
        path: the CSV file (a regular file: a FIFO, device or socket is refused before it is opened).
        columns: ``(prey column, predator column)`` names; None = the columns named prey and predator.
        min_rows: data rows required (e.g. the context length); ``need`` says why, for the message
            (e.g. ``"--context-steps 80"``).
        time_column: the time column's name; None = a column named time or t, else the first column that is not
            a species column, used only if all its cells are increasing numbers.
        last: keep only the last this-many rows (None = all). Every row is still validated, but memory stays
            bounded by ``last`` however long the file is.

    Returns:
        :class:`Series` with ``values`` [T, 2] float64 and ``time`` [T] (None without a time column), T = the rows
        kept; ``rows`` counts them all.

    Raises:
        SeriesError: one line naming the file, and the row and column where the problem is (module docstring).
    """
    path = Path(path)
    kind = not_a_regular_file(path)
    if kind and kind != "a directory":
        raise SeriesError(f"{path}: is {kind}, not a regular file: give a CSV file")
    rows = _rows(path)
    header_row, header = next(rows, (None, None))
    if header is None:
        raise SeriesError(f"{path}: empty file (expected a header row naming the columns, e.g. time,prey,predator)")
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
    time_at = _time_at(path, header, header_row, found, time_column)
    strict = time_at is not None and (time_column is not None or header[time_at].lower() in TIME_COLUMNS)
    kept, count, previous = deque(maxlen=last), 0, None  # (row number, values, time) of the last rows
    for row_number, row in rows:
        if len(row) != len(header):
            raise SeriesError(f"{path}: row {row_number} has {len(row)} cells, the header has {len(header)}")
        values = [_number(row[i], f"{path}: row {row_number}, column {header[i]!r}", nonnegative=True) for i in found]
        t = None
        if time_at is not None:
            try:
                t = _number(row[time_at], f"{path}: row {row_number}, column {header[time_at]!r}", False)
                if previous is not None and t <= previous:
                    raise SeriesError(f"{path}: row {row_number}, column {header[time_at]!r}: {row[time_at].strip()} "
                                      f"does not increase on the row before (times must be strictly increasing)")
            except SeriesError:
                if strict:
                    raise
                time_at = None  # the default column is not a time: the series has none
            previous = t
        kept.append((row_number, values, t))
        count += 1
    if not count:
        raise SeriesError(f"{path}: no data rows after the header (row {header_row})")
    if count < min_rows:
        raise SeriesError(f"{path}: only {count} data rows (the last is row {kept[-1][0]}), but "
                          f"{need or 'the forecast'} needs at least {min_rows}")
    times = None if time_at is None else np.array([t for _, _, t in kept], dtype=np.float64)
    return Series(np.array([v for _, v, _ in kept], dtype=np.float64).reshape(-1, 2), times, path.name, path,
                  (header[found[0]], header[found[1]]), None if time_at is None else header[time_at], count)
