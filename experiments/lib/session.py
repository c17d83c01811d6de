"""A run session: what every stage sets up once — output directory, seed, dataset and LLMTIME scale, the base model
(loaded once, on first use, and reused: adapters are attached and removed without reloading), and the ledger with
one path for compute: plan -> check -> spend -> write results -> charge.

    session = Session("baseline", run, data)
    with emulation(session.device, session.precision):   # loader.emulation: bf16 emulated where the CPU has none
        session.check({"forecast": planned})             # refuses (BudgetExceededError) before anything is spent
        ...spend...                                      # forecasts, training (training charges as it checkpoints)
        session.finish(results, charge={"generate": n})  # results.json first, then the ledger
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from data import (DataError, LotkaVolterraData, encode, fit_scale, fit_series_scale, load_trajectories,
                  resolve_data_path, split_indices)
from miniqwen.atomic import atomic_write
from miniqwen.loading import resolve_model_dir, weights_fingerprint

from . import loader
from .budget import Ledger, LedgerError
from .cli import check_positions
from .errors import UsageError
from .loader import resolve_precision, weights_label
from .results import Results
from .run_directory import (RECORD, RunDirectory, dig, empty_run_directory, inspect_out, nonempty_object, read_json,
                            why_protected, write_new_record)
from .settings import GROUPS, SERIES_FIT_STEPS, DataSettings, ForecastSettings, RunSettings, TrainSettings, as_record
from .training import distributed
from .training.checkpoint import find_checkpoint, read_checkpoint

#: The settings that define a run, by group: ``--resume`` must give the same ones, and :class:`Session` compares
#: them with what the run recorded before the model loads and before anything is written or charged. The weights
#: and the data are compared by identity (sha256, not by name), the compute dtype as resolved (``--precision auto``
#: picks by device), and with the cosine learning-rate schedule also ``max_steps``. ``gen_batch_size`` is one of
#: them: the rows batched together (their padding, the sampling seeds per batch) change the forecasts. Everything
#: else may differ on a resume: where to compute (``--device``), the ledger, ``--force``, progress bars, ``--plots``
#: (figures only), how long to train (``--max-steps``), when to evaluate, checkpoint or stop early, whether to
#: restore the best weights and what "best" means (``--select-by``), ``--compile``.
RUN_DEFINING = {
    "run": ("seed",),
    "data": ("decimals", "encoding", "scaling", "scale_quantile", "scale_target"),
    "forecast": ("split", "limit", "context_steps", "horizon", "prompt", "samples", "temperature", "top_p",
                 "gen_batch_size"),
    "lora": ("rank", "lora_alpha", "targets", "head_bias"),
    "train": tuple(k for k in TrainSettings.RESUME_FIXED if k not in TrainSettings.RESELECTABLE),
}


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


def _option(field: str) -> str:
    """A settings field's command-line option: ``gen_batch_size`` -> ``--gen-batch-size``."""
    return "--" + field.replace("_", "-")


def _comparable(value):
    """A setting as JSON reads it back (tuples are lists), to compare a recorded value with one given now."""
    return list(value) if isinstance(value, tuple) else value


def _spelled(option: str, value) -> str:
    """``option`` with ``value`` as it is typed: ``--seed 0``, ``--targets q_proj,v_proj``, ``--limit none``,
    ``--head-bias`` / ``--no-head-bias``."""
    if isinstance(value, bool):
        return option if value else "--no-" + option[2:]
    if isinstance(value, (list, tuple)):
        return f"{option} {','.join(map(str, value))}"
    return f"{option} {'none' if value is None else value}"


def _model_name(model) -> str | None:
    return Path(str(model)).name if model else None


class Session:
    """One stage's run: output directory, seed, dataset, the base model (loaded once), the ledger.

    Args:
        stage: the stage name (ledger entries, ``runs/<stage>`` default output).
        run, data: settings.
        trains: the stage trains, and accepts being launched by torchrun: it joins the process group here, and its
            ranks > 0 (``is_main`` False) only run rank 0's training jobs (``runs.follow``); they neither check
            nor touch ``run.out``. A stage that does not train refuses torchrun.
        join: ``run.out`` is shared with other jobs (sweep shards): it may hold results or nothing yet.
        progress: the forecasts' progress bars: True (the default) shows them only where stderr is a terminal (no
            bars in a pipe or a log file), False hides them (training stages pass ``--no-progress`` here, so that it
            silences every bar of the stage, not only the training loop's).
        defines: the stage's other settings groups that define its runs (e.g. ``{"forecast": ..., "lora": ...,
            "train": ...}``): kept in the run record, and on ``--resume`` compared (:data:`RUN_DEFINING`) with what
            the run recorded before anything is loaded, written or charged (:meth:`_check_same_settings`).
        varies: fields of those groups that the stage's points each set for themselves (a study's ``("lr",
            "rank")``): left out of the record and of the comparison; ``study`` gives their values instead.
        study: the stage's own options that define its runs, ``{field: value}`` (a study's grid: ``{"lrs": (…),
            "ranks": (…)}``), kept in the run record under "study" and compared on ``--resume`` as ``--<field>``.

    ``run.out`` is a run directory: the Session keeps a run record (:data:`RECORD`: the stage, the settings, the data
    checksum and the weights' identity) in every one it makes, and only a directory a stage made is resumed (by the
    same stage, on the same data and weights) or emptied by ``--overwrite``; anything else is refused before any
    work.

    Raises:
        UsageError: ``run.out`` holds files no stage wrote, or another stage's run, or results and neither
            ``resume`` nor ``overwrite`` is set (neither when joining); ``resume`` for a stage that does not train,
            with nothing in ``run.out`` to resume (or a directory that is not a run), on other data or weights than
            the run's (or weights it recorded no fingerprint of), or with another setting that defines the run (one
            line naming the option); ``overwrite`` of the current directory, a parent of it, the repository, the home
            directory or the root; torchrun for a stage that does not train; ``run.out`` cannot be created.
        data.DataError: the data file is missing or invalid.
    """

    def __init__(self, stage: str, run: RunSettings, data: DataSettings, *, trains: bool = False,
                 join: bool = False, progress: bool = True, defines: dict | None = None, varies: tuple = (),
                 study: dict | None = None):
        # bars on a terminal only: a stage's "progress" (no --no-progress) shows them where stderr is a terminal
        self.stage, self.run, self.data_settings, self.join = stage, run, data, join
        self.progress = None if progress is True else progress
        self.defines, self.varies = dict(defines or {}), tuple(varies)
        self.study = {k: _comparable(v) for k, v in (study or {}).items()}
        self.out = Path(run.out).expanduser() if run.out else Path("runs") / stage
        if run.resume and not trains and not join:
            raise UsageError(f"--resume: experiments.{stage} has nothing to resume (it does not train); run it "
                             "again with --overwrite to replace its results, or choose another --out")
        if distributed.launched():
            if not trains:
                raise UsageError(f"experiments.{stage} does not train: run it as one process, not under torchrun")
            distributed.init(self.device, followers=True)
        self.is_main = distributed.is_main()
        self._record: dict | None = None
        found = self._check_out(trains, join) if self.is_main else None
        self.dataset = load_dataset(data)
        self.ledger = Ledger(run.ledger)
        if found is not None:
            if (run.resume or join) and found.kind == "run":
                self._check_same_run(found)
            if run.resume and found.kind == "run":
                self._check_same_settings(found)
            train = self.defines.get("train")
            if train is not None and "context_length" not in self.varies:  # from config.json, before any work
                check_positions(run.model, [train.context_length], "--context-length", strict=False)
            if run.overwrite and found.kind == "run":
                empty_run_directory(self.out)
                found = RunDirectory(self.out, "empty")
            self._make_out(found)
        seed_everything(run.seed)

    def settings_record(self) -> dict:
        """The settings that define this run as its record keeps them: run, data and ``defines`` by group (without
        the fields the points vary) and, if the stage has any, its ``study`` options."""
        record = as_record(run=self.run, data=self.data_settings, **self.defines)
        for group in ("lora", "train"):
            if group in record:
                record[group] = {k: v for k, v in record[group].items() if k not in self.varies}
        return {**record, "study": self.study} if self.study else record

    # ------------------------------------------------------------------ the run directory
    def _check_out(self, trains: bool, join: bool) -> RunDirectory:
        """What ``--out`` holds, refused (UsageError) unless this run may use it as asked; changes nothing."""
        run, out, stage = self.run, self.out, self.stage
        found = inspect_out(out)
        if found.kind == "foreign" and run.resume and not join:
            raise UsageError(f"--resume: --out {out} is not a run (it holds no run record, {RECORD}), so there is "
                             f"nothing to resume; it holds files no stage wrote ({found.listing()}): choose another "
                             "--out")
        if found.kind == "foreign":
            raise UsageError(f"--out {out} holds files no stage wrote ({found.listing()}): choose another --out")
        if found.kind == "empty":
            if run.resume and not join:
                raise UsageError(f"--resume: nothing to resume in {out} (it is empty or does not exist)")
            return found
        if found.stage != stage and (run.resume or join):
            raise UsageError(f"--out {out} holds a {found.stage} run, not a {stage} run: --resume continues only "
                             f"a run of the same stage; choose another --out")
        if not (run.resume or run.overwrite or join):
            advice = "--resume to continue it, " if trains and found.stage == stage else ""
            raise UsageError(f"--out {out} already holds a {found.stage} run ({found.listing()}): pass {advice}"
                             "--overwrite to replace it, or choose another --out")
        if run.overwrite:
            why = why_protected(out.resolve())
            if why:
                raise UsageError(f"--overwrite: --out {out} is {why}, which a stage never empties: choose another "
                                 "--out")
            extra = found.not_written_by_a_stage()
            if extra:
                raise UsageError(f"--overwrite: --out {out} holds a {found.stage} run but also files no stage wrote "
                                 f"({found.listing(extra)}): move them away or choose another --out")
        return found

    def _check_same_run(self, found: RunDirectory) -> None:
        """Refuse (UsageError) to continue ``found`` on other data or other weights, or a run whose record holds
        no fingerprint of its weights (so they cannot be checked), before anything is spent."""
        out, record = self.out, found.record or {}
        data = nonempty_object(dig(record, "data")) or {}
        if isinstance(data.get("sha256"), str) and data["sha256"] != self.dataset.sha256:
            raise UsageError(f"--resume: --out {out} was run on data {data.get('file')} (sha256 "
                             f"{data['sha256'][:12]}…), not on {self.dataset.data.path.name} (sha256 "
                             f"{self.dataset.sha256[:12]}…): pass the same --data, or choose another --out")
        recorded = nonempty_object(dig(record, "weights"))
        if not recorded:
            return  # the run stopped before it loaded the model: no weights used yet
        if not isinstance(recorded.get("sha256"), str):
            raise UsageError(f"--resume: the run in {out} recorded no weights fingerprint (it was made before runs "
                             "recorded one): it cannot be resumed; choose another --out")
        mine = self.weights_identity
        if recorded["sha256"] != mine["sha256"]:
            raise UsageError(f"--model {self.run.model}: --out {out} was run on other weights "
                             f"({recorded.get('label')}, sha256 {recorded['sha256'][:12]}…; these are "
                             f"{mine['label']}, sha256 {mine['sha256'][:12]}…): resume with the same --model, "
                             "or choose another --out")

    def _check_same_settings(self, found: RunDirectory) -> None:
        """Refuse (UsageError, one line naming each option that differs) to resume ``found`` with other settings
        that define the run (:data:`RUN_DEFINING`, of the groups this stage has: run, data and ``defines``, but for
        the fields its points vary; its ``study`` options; the compute dtype as resolved) than the run was made
        with. What it was made with is what it recorded: its run record's settings, its results.json's and its
        training checkpoint (``training/``, when the stage trains: the training and LoRA settings, seed and dtype
        its steps were taken with; a damaged checkpoint is refused here too, naming the file), and the dtype of its
        untrained forecast (untrained.json). Reads only; runs before the model loads and before anything is written
        or charged, so that a refused resume leaves the run exactly as it was."""
        now = self.settings_record()
        record, results = dig(found.record, "settings"), dig(found.results, "settings")
        sources = [s for s in (record, results) if isinstance(s, dict)]
        dtypes = [dig(record, "run", "precision"), dig(results, "run", "precision")]  # as given: "auto" says nothing
        ckpt = find_checkpoint(self.out / "training") if "train" in self.defines else None
        if ckpt is not None:  # the dtype the steps were taken in, as resolved
            state = read_checkpoint(ckpt).state
            done, asked = dig(state, "loop", "step"), self.defines["train"].max_steps
            if isinstance(done, int) and done > asked:  # a resume continues a run; it cannot take steps back
                raise UsageError(f"--max-steps {asked}: the run in {self.out} has already taken {done} steps; "
                                 f"resume with --max-steps {done} or more, or choose another --out")
            sources.append({"train": state.get("settings"), "lora": state.get("lora"),
                            "run": {"seed": state["seed"]} if "seed" in state else None})
            dtypes.append(state.get("precision"))
        else:  # the untrained forecast's, as resolved
            dtypes.append(dig(read_json(self.out / "untrained.json"), "settings", "run", "precision"))
        changed: dict[str, tuple] = {}  # option -> (its value now, the run's)
        cosine = dig(now, "train", "lr_schedule") == "cosine"  # TrainSettings.schedule_depends_on_max_steps
        for source in sources:
            for group, fields in RUN_DEFINING.items():
                saved = source.get(group)
                if group not in now or not isinstance(saved, dict):
                    continue
                defaults = {f.name: f.default for f in dataclasses.fields(GROUPS[group])}
                for name in fields + (("max_steps",) if group == "train" and cosine else ()):
                    if name in self.varies:
                        continue
                    was, is_ = saved.get(name, defaults[name]), now[group].get(name, defaults[name])
                    if _comparable(was) != _comparable(is_):
                        changed.setdefault(_option(name), (is_, was))
        recorded = dig(record, "study")
        for name, value in self.study.items():  # the stage's own options (a study's grid), as its record kept them
            if isinstance(recorded, dict) and name in recorded and recorded[name] != value:
                changed.setdefault(_option(name), (value, recorded[name]))
        for dtype in dtypes:
            if isinstance(dtype, str) and dtype != "auto" and dtype != self.precision:
                asked = self.run.precision
                changed.setdefault("--precision", (asked if asked == self.precision else
                                                   f"{asked} ({self.precision} here)", dtype))
        if changed:
            options = list(changed)
            raise UsageError(f"{', '.join(_spelled(o, changed[o][0]) for o in options)}: the run in {self.out} was "
                             f"made with {', '.join(_spelled(o, changed[o][1]) for o in options)}; resume with the "
                             f"same {' and '.join(options)}, or choose another --out")

    def _make_out(self, found: RunDirectory) -> None:
        """Create ``--out`` (a link's target) and its run record, or keep the record of the run being continued."""
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            if found.kind == "run":  # the same stage's run, continued (any other was refused or emptied)
                self._record = found.record
                return
            record = {"made_by": "miniqwen", "stage": self.stage,
                      "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                      "settings": self.settings_record(),
                      "data": {"file": self.dataset.data.path.name, "sha256": self.dataset.sha256},
                      "weights": None, "written": []}
            write_new_record(self.out, record)  # taken back if the command fails before the run writes anything
            self._record = record
        except OSError as err:
            where = err.filename or self.out
            raise UsageError(f"--out {self.out}: cannot write {where} ({err.strerror or err})") from None

    def _write_record(self, record: dict) -> None:
        atomic_write(self.out / RECORD, json.dumps(record, indent=2) + "\n")
        self._record = record

    @cached_property
    def weights_identity(self) -> dict:
        """What the weights are: their label and :func:`miniqwen.loading.weights_fingerprint` (config.json, the
        tensor index and a sample of the data; the tensors are not read)."""
        return {"label": self.weights, "name": _model_name(self.run.model),
                "sha256": weights_fingerprint(resolve_model_dir(self.run.model))}

    def _record_weights(self) -> None:
        """Put the weights' identity in the run record when they are first loaded (refusing other weights than
        the ones a joined run, e.g. another shard, already recorded)."""
        if not self.is_main or self._record is None:
            return
        record = read_json(self.out / RECORD)
        record = record if isinstance(record, dict) else dict(self._record)
        recorded, mine = nonempty_object(dig(record, "weights")), self.weights_identity
        if recorded and recorded.get("sha256") != mine["sha256"]:
            raise UsageError(f"--model {self.run.model}: --out {self.out} was run on other weights "
                             f"({recorded.get('label')}): use the same --model, or choose another --out")
        if not recorded:
            record["weights"] = mine
            try:
                self._write_record(record)
            except OSError as err:
                raise UsageError(f"--out {self.out}: cannot write {self.out / RECORD} ({err.strerror})") from None

    # ------------------------------------------------------------------ the model, loaded once
    @cached_property
    def device(self) -> torch.device:
        """``run.device`` (None = cuda if available, else cpu); under torchrun, CUDA is ``cuda:LOCAL_RANK``."""
        return distributed.device(self.run.device)

    @cached_property
    def precision(self) -> str:
        """The compute dtype's name: "float32", "bfloat16" or "float16"."""
        return resolve_precision(self.run.precision, self.device)

    def run_key(self) -> dict:
        """What of the run settings a saved result must share to be read back instead of computed again: the
        model (as recorded), the compute dtype as resolved (``--precision auto`` picks by device and CPU) and the
        seed."""
        run = as_record(run=self.run)["run"]
        return {"model": run["model"], "precision": self.precision, "seed": run["seed"]}

    @cached_property
    def _loaded(self):
        """The model and tokenizer, loaded on first use (:func:`loader.load_model`, on this session's device and
        dtype) once the weights' identity is in the run record. The stage computes with them inside its
        :func:`loader.emulation` block."""
        self._record_weights()  # also refuses a config.json or weights file that is not a regular file
        loaded = loader.load_model(self.run.model, self.device, self.precision)
        print(f"model: {self.weights} — computing on {self.device} in {self.precision}")
        return loaded.model, loaded.tokenizer

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
        if self._record is not None:  # what the finished run holds is the stage's, for a later --overwrite
            try:
                record = read_json(self.out / RECORD)
                record = record if isinstance(record, dict) else dict(self._record)
                ledger = os.path.realpath(self.ledger.path)  # a ledger kept in --out is the user's, not the run's
                record["written"] = sorted(n for n in os.listdir(self.out)
                                           if os.path.realpath(self.out / n) not in (ledger, ledger + ".lock"))
                self._write_record(record)
            except OSError:
                pass  # the results are written; without the list, --overwrite goes by the stages' file names
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
