"""Loading, validating and splitting the Lotka–Volterra predator–prey dataset.

The dataset is one HDF5 file with two datasets:

* ``/trajectories``: float32, shape ``(N, T, 2)``; ``[:, :, 0]`` is the prey
  population and ``[:, :, 1]`` the predator population (arbitrary population
  units, non-negative).
* ``/time``: float64, shape ``(T,)``; the common, strictly increasing sample
  times of every trajectory (arbitrary time units; 0 to 200 in the coursework
  file).

The coursework file has N = 1000 systems and T = 100 time points. A file with
the same schema can be generated with ``python -m data.simulate``; where no
coursework file is found, :func:`resolve_data_path` falls back to such a
synthetic set, generated once into a cache (:func:`synthetic_data_path`).
A file whose root attribute ``source`` is set (``data.simulate.write_h5``)
is synthetic; :attr:`LotkaVolterraData.source` carries it into results.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

SPLITS = ("train", "validation", "test")
"""Names of the three dataset splits, in trajectory-index order."""

DATA_ENV_VAR = "MINIQWEN_DATA"
"""Environment variable that may hold the path of the HDF5 data file."""

DATA_FILENAME = "lotka_volterra_data.h5"

SYNTHETIC_FILENAME = "synthetic_lotka_volterra_v1.h5"
"""Name of the cached synthetic fallback set (bump the version when its recipe changes)."""

SYNTHETIC_SETTINGS = {"model": "damped", "n_systems": 1000, "n_steps": 100, "t_max": 200.0, "seed": 0}
"""How the synthetic fallback set is made (``data.simulate.simulate``): the coursework's shape and time grid."""

_PACKAGE_DIR = Path(__file__).resolve().parent
_REPO_DIR = _PACKAGE_DIR.parent

_FIX_ADVICE = (
    "To fix this, pass the file explicitly with --data PATH, "
    f"set the environment variable {DATA_ENV_VAR}=PATH, "
    "or create a synthetic dataset with "
    f"`python -m data.simulate --out data/{DATA_FILENAME}` (run from the repository root)."
)


class DataError(ValueError):
    """A data file is missing, unreadable or does not follow the expected schema.

    Every message names the offending file and says what is wrong with it.
    """


@dataclass
class LotkaVolterraData:
    """The contents of one validated Lotka–Volterra HDF5 file.

    Attributes:
        trajectories: float32 array of shape ``(N, T, 2)``; ``[..., 0]`` prey,
            ``[..., 1]`` predator; all values finite and >= 0.
        time: float64 array of shape ``(T,)``, strictly increasing sample times.
        path: the file the data was read from.
        source: the file's root attribute ``source`` if set (synthetic data), else None.
    """

    trajectories: np.ndarray
    time: np.ndarray
    path: Path
    source: str | None = None
    """The file's ``source`` attribute: how a synthetic file was made; None for the coursework file."""

    @property
    def synthetic(self) -> bool:
        """True if the file says it was made by the simulator (it has a ``source`` attribute)."""
        return self.source is not None

    @property
    def n_systems(self) -> int:
        """Number of trajectories N."""
        return int(self.trajectories.shape[0])

    @property
    def n_steps(self) -> int:
        """Number of time points T per trajectory."""
        return int(self.trajectories.shape[1])


def default_data_candidates() -> list[Path]:
    """Return the fallback locations searched when no path or env var is given.

    In order: ``<repo>/data/lotka_volterra_data.h5`` (a git-ignored copy inside
    this package folder), then ``<repo>/../shared/data/lotka_volterra_data.h5``,
    where ``<repo>`` is the parent directory of the ``data`` package.
    """
    return [
        _PACKAGE_DIR / DATA_FILENAME,
        _REPO_DIR.parent / "shared" / "data" / DATA_FILENAME,
    ]


def synthetic_cache_dir() -> Path:
    """Directory of the cached synthetic set: ``$XDG_CACHE_HOME/miniqwen`` if ``XDG_CACHE_HOME`` is set and
    non-empty, else ``~/.cache/miniqwen``."""
    base = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(base).expanduser() if base else Path.home() / ".cache") / "miniqwen"


def synthetic_data_path() -> Path:
    """The synthetic fallback set, generated on first use.

    The file is ``synthetic_cache_dir() / SYNTHETIC_FILENAME``. If it is not there it is simulated
    deterministically with ``SYNTHETIC_SETTINGS`` (``data.simulate``: the damped Rosenzweig–MacArthur model,
    1000 trajectories × 100 steps on [0, 200], seed 0, about a second) and written atomically (a temporary
    file moved into place), so concurrent first uses write identical bytes and a reader never sees a partial
    file. An existing file is reused as it is (:func:`load_trajectories` validates it).

    Returns:
        The path of the file.

    Raises:
        DataError: if the cache directory or file cannot be written.
    """
    path = synthetic_cache_dir() / SYNTHETIC_FILENAME
    if path.is_file():
        return path
    from .simulate import describe, simulate, write_h5

    settings = SYNTHETIC_SETTINGS
    trajectories, time = simulate(settings["n_systems"], settings["n_steps"], settings["t_max"], settings["seed"],
                                  model=settings["model"])
    try:
        return write_h5(path, trajectories, time, source=describe(**settings))
    except OSError as error:
        raise DataError(f"{path}: cannot write the synthetic dataset ({error}). {_FIX_ADVICE}") from error


def default_data_path() -> tuple[Path, bool]:
    """The data file used when neither ``--data`` nor ``MINIQWEN_DATA`` names one.

    The first existing file of :func:`default_data_candidates`; if there is none, the synthetic set of
    :func:`synthetic_data_path` (generated on first use), announced in one line on stderr.

    Returns:
        ``(path, synthetic)``: synthetic is True for the fallback.

    Raises:
        DataError: if the synthetic set is needed and cannot be written.
    """
    candidates = default_data_candidates()
    for candidate in candidates:
        if candidate.is_file():
            return candidate, False
    path = synthetic_data_path()
    settings = " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in SYNTHETIC_SETTINGS.items())
    print(f"no coursework data file found: using the synthetic set {path} (data.simulate {settings}), not the "
          f"coursework file; pass --data or set {DATA_ENV_VAR} to use it", file=sys.stderr)
    return path, True


def resolve_data_path(path: str | os.PathLike | None = None) -> Path:
    """Decide which HDF5 file to use.

    Precedence:

    1. ``path`` if given (returned as is, even if it does not exist, so that
       :func:`load_trajectories` reports the problem: an explicit path is never
       silently replaced);
    2. the environment variable ``MINIQWEN_DATA`` if set and non-empty
       (also returned as is);
    3. :func:`default_data_path`: the first existing file of
       :func:`default_data_candidates`, else the cached synthetic set
       (:func:`synthetic_data_path`, generated on first use; one line on stderr
       says so).

    Raises:
        DataError: if the synthetic set is needed and cannot be written.
    """
    if path is not None:
        return Path(path).expanduser()
    from_env = os.environ.get(DATA_ENV_VAR, "").strip()
    if from_env:
        return Path(from_env).expanduser()
    return default_data_path()[0]


def _first_index(mask: np.ndarray) -> tuple[int, ...]:
    """Index tuple of the first True entry of ``mask`` (C order)."""
    return tuple(int(i) for i in np.argwhere(mask)[0])


def _read_dataset(file: h5py.File, name: str, path: Path) -> np.ndarray:
    """Read dataset ``/name`` from an open file as a numeric array, or raise DataError."""
    if name not in file:
        raise DataError(f"{path}: missing dataset '/{name}' (found: {sorted(file.keys())}).")
    node = file[name]
    if not isinstance(node, h5py.Dataset):
        raise DataError(f"{path}: '/{name}' is a {type(node).__name__}, expected a dataset.")
    try:
        values = node[()]
    except (OSError, ValueError, TypeError) as error:
        raise DataError(f"{path}: could not read dataset '/{name}': {error}") from error
    values = np.asarray(values)
    if not (np.issubdtype(values.dtype, np.floating) or np.issubdtype(values.dtype, np.integer)):
        raise DataError(f"{path}: dataset '/{name}' has non-numeric dtype {values.dtype}.")
    return values


def load_trajectories(path: str | os.PathLike | None = None) -> LotkaVolterraData:
    """Load and validate a Lotka–Volterra HDF5 file.

    Args:
        path: the HDF5 file; if None it is chosen by :func:`resolve_data_path`.

    Returns:
        LotkaVolterraData with ``trajectories`` float32 ``(N, T, 2)``,
        ``time`` float64 ``(T,)`` and ``source`` (the file's ``source``
        attribute: set for synthetic files, else None).

    Raises:
        DataError (a ValueError), naming the file, if: the file does not exist;
        it is not a readable HDF5 file; ``/trajectories`` or ``/time`` is
        missing or not numeric; ``trajectories`` is not 3-D with last
        dimension 2 or is empty; ``time`` is not 1-D of length T; any value is
        non-finite or negative (the message gives the count and the first
        index); ``time`` is not strictly increasing.
    """
    path = resolve_data_path(path)
    if not path.exists():
        raise DataError(f"{path}: data file does not exist. {_FIX_ADVICE}")
    if not path.is_file():
        raise DataError(f"{path}: is not a regular file. {_FIX_ADVICE}")
    try:
        with h5py.File(path, "r") as file:
            trajectories = _read_dataset(file, "trajectories", path)
            time = _read_dataset(file, "time", path)
            source = file.attrs.get("source")
    except DataError:
        raise
    except OSError as error:  # h5py raises OSError for non-HDF5 or corrupt files
        raise DataError(f"{path}: not a valid HDF5 file or it is corrupt ({error}).") from error

    if trajectories.ndim != 3 or trajectories.shape[2] != 2:
        raise DataError(
            f"{path}: '/trajectories' has shape {trajectories.shape}, expected (N, T, 2) "
            "with [..., 0] = prey and [..., 1] = predator."
        )
    n_systems, n_steps, _ = trajectories.shape
    if n_systems == 0 or n_steps == 0:
        raise DataError(f"{path}: '/trajectories' is empty (shape {trajectories.shape}).")
    if time.ndim != 1 or time.shape[0] != n_steps:
        raise DataError(
            f"{path}: '/time' has shape {time.shape}, expected ({n_steps},) to match the "
            f"T = {n_steps} steps of '/trajectories'."
        )

    for name, values in (("trajectories", trajectories), ("time", time)):
        bad = ~np.isfinite(values)
        if bad.any():
            raise DataError(
                f"{path}: '/{name}' has {int(bad.sum())} non-finite value(s) (NaN or inf); "
                f"first at index {_first_index(bad)}."
            )
    negative = trajectories < 0
    if negative.any():
        raise DataError(
            f"{path}: '/trajectories' has {int(negative.sum())} negative value(s); populations "
            f"must be >= 0; first at index {_first_index(negative)}."
        )
    if n_steps > 1 and not np.all(np.diff(time) > 0):
        first = int(np.argmax(np.diff(time) <= 0))
        raise DataError(
            f"{path}: '/time' is not strictly increasing "
            f"(time[{first}] = {time[first]} >= time[{first + 1}] = {time[first + 1]})."
        )

    return LotkaVolterraData(
        trajectories=trajectories.astype(np.float32, copy=False),
        time=time.astype(np.float64, copy=False),
        path=path,
        source=None if source is None else (source.decode() if isinstance(source, bytes) else str(source)),
    )


def split_indices(
    n: int,
    train_fraction: float = 0.8,
    validation_fraction: float = 0.1,
    *,
    train_end: int | None = None,
    validation_end: int | None = None,
) -> dict[str, np.ndarray]:
    """Split trajectory indices ``0..n-1`` into contiguous train/validation/test blocks.

    The blocks are ``[0, train_end)``, ``[train_end, validation_end)`` and
    ``[validation_end, n)``. By default ``train_end = round(n * train_fraction)``
    and ``validation_end = train_end + round(n * validation_fraction)``; for
    n = 1000 this is exactly 0–799, 800–899, 900–999. Explicit boundaries
    (``train_end``, ``validation_end``) override the fractions. Validation and
    test may be empty; train may not.

    Args:
        n: number of trajectories (>= 1).
        train_fraction, validation_fraction: fractions in [0, 1] with sum <= 1.
        train_end, validation_end: optional explicit boundaries (keyword-only).

    Returns:
        dict with keys ``"train"``, ``"validation"``, ``"test"`` (see ``SPLITS``),
        each a 1-D int64 array of indices in increasing order.

    Raises:
        ValueError: if n < 1, a fraction is outside [0, 1] or they sum to more
            than 1, or the boundaries do not satisfy
            ``1 <= train_end <= validation_end <= n``.
    """
    if int(n) != n or n < 1:
        raise ValueError(f"split_indices: n must be a positive integer, got {n!r}.")
    n = int(n)
    for name, fraction in (("train_fraction", train_fraction), ("validation_fraction", validation_fraction)):
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"split_indices: {name} must be in [0, 1], got {fraction!r}.")
    if train_fraction + validation_fraction > 1.0 + 1e-12:
        raise ValueError(
            "split_indices: train_fraction + validation_fraction must be <= 1, got "
            f"{train_fraction} + {validation_fraction}."
        )
    if train_end is None:
        train_end = int(round(n * train_fraction))
    if validation_end is None:
        validation_end = train_end + int(round(n * validation_fraction))
    if not 1 <= train_end <= n:
        raise ValueError(
            f"split_indices: train split would be empty or out of range (train_end={train_end}, n={n}); "
            "need 1 <= train_end <= n."
        )
    if not train_end <= validation_end <= n:
        raise ValueError(
            f"split_indices: need train_end <= validation_end <= n, got train_end={train_end}, "
            f"validation_end={validation_end}, n={n}."
        )
    return {
        "train": np.arange(0, train_end, dtype=np.int64),
        "validation": np.arange(train_end, validation_end, dtype=np.int64),
        "test": np.arange(validation_end, n, dtype=np.int64),
    }
