"""A stage's data: the validated Lotka-Volterra file, its 80/10/10 split by trajectory, the LLMTIME scale fitted on
the training split and the texts and forecast sets cut from it; and the seeds every stage sets before it draws."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

import numpy as np
import torch

from data import (DataError, LotkaVolterraData, encode, fit_scale, fit_series_scale, load_trajectories,
                  resolve_data_path, split_indices)

from .errors import UsageError
from .settings import SERIES_FIT_STEPS, DataSettings, ForecastSettings


@dataclass
class Dataset:
    """The validated data, its 80/10/10 split by trajectory, and the LLMTIME scale fitted on the training split.

    Attributes: ``data`` (trajectories [N, T, 2], time [T]), ``splits`` ({name: indices}), ``llmtime_scale``
    (data units per text unit), ``sha256`` of the file, ``decimals`` of the LLMTIME text and its ``encoding``
    ("decimal" or "integer", ``data.llmtime.encode``); ``scaling`` "dataset" (every text at ``llmtime_scale``) or
    "series" (each trajectory at its own ``data.llmtime.fit_series_scale`` with ``scale_quantile`` / ``scale_target``:
    fitted on its first ``SERIES_FIT_STEPS`` steps for training text, on the context for a prompt).
    """

    data: LotkaVolterraData
    splits: dict[str, np.ndarray]
    llmtime_scale: float
    sha256: str
    decimals: int
    encoding: str = "decimal"
    scaling: str = "dataset"
    scale_quantile: float = 0.99
    scale_target: float = 10.0

    def context_scaler(self):
        """None for "dataset" scaling (every text at ``llmtime_scale``); for "series" the function ``context [C, 2]
        -> SeriesScale`` that fits a trajectory's scaling on the context it is given."""
        if self.scaling == "dataset":
            return None
        return lambda context: fit_series_scale(context, self.scale_quantile, self.scale_target)

    def text_scale(self, trajectory: np.ndarray):
        """The scale a whole trajectory ``[T, 2]`` is written with: ``llmtime_scale``, or its series scaling fitted
        on its first ``SERIES_FIT_STEPS`` steps (what a forecast's context would give)."""
        scaler = self.context_scaler()
        return self.llmtime_scale if scaler is None else scaler(trajectory[:SERIES_FIT_STEPS])

    def trajectories(self, split: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(indices (n,), trajectories [n, T, 2])`` of the first ``limit`` trajectories of ``split``."""
        idx = self.splits[split][:limit]
        return idx, self.data.trajectories[idx]

    def texts(self, split: str, limit: int | None = None) -> list[str]:
        """LLMTIME text of whole trajectories of ``split`` (the training and validation-loss corpus)."""
        return [encode(t, self.text_scale(t), self.decimals, self.encoding)
                for t in self.trajectories(split, limit)[1]]

    def forecast_set(self, forecast: ForecastSettings):
        """``(indices (n,), trajectories [n, T, 2], contexts [n, C, 2], truth [n, H, 2] float64)`` for
        ``forecast.split`` / ``limit`` / ``context_steps`` / ``horizon``.

        Raises UsageError if the context and horizon do not fit in the data or the split is empty.
        """
        T = self.data.n_steps
        if forecast.context_steps + forecast.horizon > T:
            raise UsageError(f"--context-steps {forecast.context_steps} + --horizon {forecast.horizon} must be <= "
                             f"{T}, the time steps in {self.data.path.name}")
        indices, trajectories = self.trajectories(forecast.split, forecast.limit)
        if len(indices) == 0:
            raise UsageError(f"split {forecast.split!r} of {self.data.path.name} is empty")
        contexts = trajectories[:, : forecast.context_steps]
        truth = trajectories[:, forecast.context_steps : forecast.context_steps + forecast.horizon].astype(np.float64)
        return indices, trajectories, contexts, truth

    def record(self) -> dict:
        """What results say about the data: file name (no directory), checksum, scale, text format, size; for a
        synthetic file (one with a ``source`` attribute, e.g. the fallback set used when no coursework file is
        found) also ``"synthetic": True`` and its ``"source"`` (how it was simulated)."""
        return {"file": self.data.path.name, "sha256": self.sha256, "llmtime_scale": self.llmtime_scale,
                "decimals": self.decimals, "encoding": self.encoding, "n_trajectories": self.data.n_systems,
                "n_steps": self.data.n_steps, **({} if self.scaling == "dataset" else {
                    "scaling": self.scaling, "series_fit_steps": SERIES_FIT_STEPS}),
                **({"synthetic": True, "source": self.data.source} if getattr(self.data, "source", None) else {})}



def load_dataset(settings: DataSettings) -> Dataset:
    """Load and validate ``settings.data``, split it 80/10/10 by trajectory and fit the LLMTIME scale on the
    training split only. Raises ``data.DataError`` naming the file."""
    data = load_trajectories(resolve_data_path(settings.data))
    splits = split_indices(data.n_systems)
    try:
        scale = fit_scale(data.trajectories[splits["train"]], settings.scale_quantile, settings.scale_target)
    except ValueError as err:  # e.g. all-zero training trajectories: no scale maps them to digits
        raise DataError(f"{data.path}: cannot fit the LLMTIME scale on its training split "
                        f"({str(err).removeprefix('fit_scale: ').rstrip('.')})") from None
    sha = hashlib.sha256(data.path.read_bytes()).hexdigest()
    return Dataset(data, splits, scale, sha, settings.decimals, settings.encoding, settings.scaling,
                   settings.scale_quantile, settings.scale_target)



def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
