"""A run session: what every stage sets up once — output directory, seed, dataset and LLMTIME scale, the base model
(loaded once, on first use, and reused: adapters are attached and removed without reloading), and the ledger with
one path for compute: plan -> check -> spend -> write results -> charge.

    session = Session("baseline", run, data)
    session.check({"forecast": planned})            # refuses (BudgetExceededError) before anything is spent
    ...spend...                                      # forecasts, training (training charges as it checkpoints)
    session.finish(results, charge={"generate": n})  # results.json first, then the ledger
"""

from __future__ import annotations

import hashlib
import random
import shutil
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from data import LotkaVolterraData, encode, fit_scale, load_trajectories, resolve_data_path, split_indices
from miniqwen import load_pretrained

from .budget import Ledger, LedgerError
from .results import Results
from .training import distributed
from .settings import DataSettings, ForecastSettings, RunSettings, UsageError, as_record


@dataclass
class Dataset:
    """The validated data, its 80/10/10 split by trajectory, and the LLMTIME scale fitted on the training split.

    Attributes: ``data`` (trajectories [N, T, 2], time [T]), ``splits`` ({name: indices}), ``llmtime_scale``
    (data units per text unit), ``sha256`` of the file, ``decimals`` of the LLMTIME text.
    """

    data: LotkaVolterraData
    splits: dict[str, np.ndarray]
    llmtime_scale: float
    sha256: str
    decimals: int

    def trajectories(self, split: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(indices (n,), trajectories [n, T, 2])`` of the first ``limit`` trajectories of ``split``."""
        idx = self.splits[split][:limit]
        return idx, self.data.trajectories[idx]

    def texts(self, split: str, limit: int | None = None) -> list[str]:
        """LLMTIME text of whole trajectories of ``split`` (the training and validation-loss corpus)."""
        return [encode(t, self.llmtime_scale, self.decimals) for t in self.trajectories(split, limit)[1]]

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
        """What results say about the data: file name (no directory), checksum, scale, size."""
        return {"file": self.data.path.name, "sha256": self.sha256, "llmtime_scale": self.llmtime_scale,
                "decimals": self.decimals, "n_trajectories": self.data.n_systems, "n_steps": self.data.n_steps}


def load_dataset(settings: DataSettings) -> Dataset:
    """Load and validate ``settings.data``, split it 80/10/10 by trajectory and fit the LLMTIME scale on the
    training split only. Raises ``data.DataError`` naming the file."""
    data = load_trajectories(resolve_data_path(settings.data))
    splits = split_indices(data.n_systems)
    scale = fit_scale(data.trajectories[splits["train"]], settings.scale_quantile, settings.scale_target)
    sha = hashlib.sha256(data.path.read_bytes()).hexdigest()
    return Dataset(data, splits, scale, sha, settings.decimals)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def weights_label(model: str) -> str:
    """What the weights are, for results: the first line of a PROVENANCE.txt beside them (the offline dequantized
    build writes one), without its closing full stop so that it reads inside a sentence, else ``model`` as given (a
    Hub repo id, or a directory's name)."""
    path = Path(model)
    provenance = path / "PROVENANCE.txt"
    if provenance.is_file():
        return provenance.read_text().splitlines()[0].rstrip(".")
    return path.name if path.is_dir() else str(model)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``"auto"`` -> "bfloat16" on CUDA and on CPUs with native bf16 matrix products, else "float32"."""
    if precision != "auto":
        return precision
    from miniqwen.device import default_compute_dtype

    return str(default_compute_dtype(device)).removeprefix("torch.")


class Session:
    """One stage's run: output directory, seed, dataset, the base model (loaded once), the ledger.

    Args:
        stage: the stage name (ledger entries, ``runs/<stage>`` default output).
        run, data: settings.
        trains: the stage trains, and accepts being launched by torchrun: it joins the process group here, and its
            ranks > 0 (``is_main`` False) only run rank 0's training jobs (``recipes.follow``); they neither check
            nor touch ``run.out``. A stage that does not train refuses torchrun.
        join: ``run.out`` is shared with other jobs (sweep shards): it may hold results or nothing yet.

    Raises:
        UsageError: ``run.out`` already holds results and neither ``resume`` nor ``overwrite`` is set, or
            ``resume`` with nothing in ``run.out`` to resume (neither when joining); torchrun for a stage that
            does not train.
        data.DataError: the data file is missing or invalid.
    """

    def __init__(self, stage: str, run: RunSettings, data: DataSettings, *, trains: bool = False,
                 join: bool = False):
        self.stage, self.run, self.data_settings = stage, run, data
        self.out = Path(run.out) if run.out else Path("runs") / stage
        if distributed.launched():
            if not trains:
                raise UsageError(f"experiments.{stage} does not train: run it as one process, not under torchrun")
            distributed.init(self.device, followers=True)
        self.is_main = distributed.is_main()
        held = self.is_main and self.out.is_dir() and any(self.out.iterdir())
        if held and not (run.resume or run.overwrite or join):
            raise UsageError(f"--out {self.out} already holds results: pass --resume to continue that run, "
                             "--overwrite to replace it, or choose another --out")
        if self.is_main and run.resume and not held and not join:
            raise UsageError(f"--resume: nothing to resume in {self.out} (it is empty or does not exist)")
        self.dataset = load_dataset(data)
        self.ledger = Ledger(run.ledger)
        if run.overwrite and held:
            shutil.rmtree(self.out)
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        seed_everything(run.seed)

    # ------------------------------------------------------------------ the model, loaded once
    @cached_property
    def device(self) -> torch.device:
        """``run.device`` (None = cuda if available, else cpu); under torchrun, CUDA is ``cuda:LOCAL_RANK``."""
        return distributed.device(self.run.device)

    @cached_property
    def precision(self) -> str:
        """The compute dtype's name: "float32", "bfloat16" or "float16"."""
        return resolve_precision(self.run.precision, self.device)

    @cached_property
    def _loaded(self):
        model, tokenizer = load_pretrained(self.run.model, dtype=getattr(torch, self.precision), device=self.device)
        print(f"model: {self.weights} — computing on {self.device} in {self.precision}")
        return model.eval(), tokenizer

    @property
    def model(self):
        return self._loaded[0]

    @property
    def tokenizer(self):
        return self._loaded[1]

    @cached_property
    def weights(self) -> str:
        return weights_label(self.run.model)

    # ------------------------------------------------------------------ results and compute
    def results(self, **settings) -> Results:
        """An empty :class:`Results` of this stage recording ``settings`` (dataclasses by group) and the run."""
        return Results(stage=self.stage, settings=as_record(run=self.run, data=self.data_settings, **settings),
                       weights=self.weights if self.run.model else None, data=self.dataset.record(),
                       seed=self.run.seed, details={"precision": self.run.precision})

    def check(self, planned: dict[str, int]) -> int:
        """Print the planned FLOPs by part and refuse (BudgetExceededError) if ledger + plan passes the budget
        (unless ``--force``). Returns the planned total."""
        total = int(sum(planned.values()))
        print("planned FLOPs: " + ", ".join(f"{k} {v:.3e}" for k, v in planned.items()))
        self.ledger.check(total, force=self.run.force)
        return total

    def finish(self, results: Results, charge: dict[str, int] | None = None) -> Path:
        """Write ``results.json`` and only then charge ``charge`` (``{kind: FLOPs}``) to the ledger, so a ledger
        failure never discards finished work. Returns the results path.

        Raises LedgerError (after the results are on disk) naming the results file and the FLOPs not recorded.
        """
        path = results.write(self.out / "results.json")
        for kind, flops in (charge or {}).items():
            self.charge(kind, flops, path)
        return path

    def charge(self, kind: str, flops: int, saved: Path, **details) -> None:
        """Charge ``flops`` of ``kind`` under this stage, once the work they paid for is saved in ``saved``.

        Raises LedgerError naming ``saved`` and the FLOPs not recorded, so nothing finished is lost with it.
        """
        if flops <= 0:
            return
        try:
            self.ledger.charge(self.stage, int(flops), kind, run=self.out.name, **details)
        except LedgerError as err:
            raise LedgerError(f"results are safe in {saved}, but {flops:.3e} FLOPs of kind {kind!r} could not be "
                              f"charged to the ledger; add them by hand: {err}") from None
