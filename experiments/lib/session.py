"""A stage's session: what every stage sets up once and its library functions share — the run directory
(:class:`run_directory.RunDirectory`), the dataset (:mod:`experiments.lib.dataset`), the base model (loaded once, on
first use, and reused: adapters are attached and removed without reloading) and the ledger, with one path for
compute: plan -> check -> spend -> write results -> charge.

    session = Session("baseline", run, data)
    with emulation(session.device, session.precision):   # loader.emulation: bf16 emulated where the CPU has none
        session.check({"forecast": planned})             # refuses (BudgetExceededError) before anything is spent
        ...spend...                                      # forecasts, training (training charges as it checkpoints)
        session.finish(results, charge={"generate": n})  # results.json first, then the ledger
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import torch

from miniqwen.loading import resolve_model_dir, weights_fingerprint

from . import loader
from .budget import Ledger, LedgerError
from .cli import check_positions
from .dataset import load_dataset, seed_everything
from .errors import UsageError
from .loader import resolve_precision, weights_label
from .results import Results
from .resume import check_same_settings, comparable
from .run_directory import RunDirectory
from .settings import DataSettings, RunSettings, as_record
from .training import distributed


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
            "train": ...}``): kept in the run record, and on ``--resume`` compared with what the run recorded
            before anything is loaded, written or charged (:func:`resume.check_same_settings`).
        varies: fields of those groups that the stage's points each set for themselves (a study's ``("lr",
            "rank")``): left out of the record and of the comparison; ``study`` gives their values instead.
        study: the stage's own options that define its runs, ``{field: value}`` (a study's grid: ``{"lrs": (…),
            "ranks": (…)}``), kept in the run record under "study" and compared on ``--resume`` as ``--<field>``.

    ``run.out`` is a run directory (:class:`run_directory.RunDirectory`): it keeps a run record (the stage, the
    settings, the data checksum and the weights' identity) in every one it makes, and only a directory a stage made
    is resumed (by the same stage, on the same data and weights) or emptied by ``--overwrite``; anything else is
    refused before any work.

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
        self.defines, self.varies, self.study = dict(defines or {}), tuple(varies), dict(study or {})
        self.out = Path(run.out).expanduser() if run.out else Path("runs") / stage
        if run.resume and not trains and not join:
            raise UsageError(f"--resume: experiments.{stage} has nothing to resume (it does not train); run it "
                             "again with --overwrite to replace its results, or choose another --out")
        if distributed.launched():
            if not trains:
                raise UsageError(f"experiments.{stage} does not train: run it as one process, not under torchrun")
            distributed.init(self.device, followers=True)
        self.is_main = distributed.is_main()
        # rank 0 owns --out: checked here (nothing changed), begun once the data and settings are checked too
        self.directory = (RunDirectory(self.out, stage, resume=run.resume, overwrite=run.overwrite, join=join,
                                       trains=trains) if self.is_main else None)
        self.dataset = load_dataset(data)
        self.ledger = Ledger(run.ledger)
        if self.directory is not None:
            self.directory.check_same_run(self.dataset.data.path.name, self.dataset.sha256,
                                          lambda: self.weights_identity, run.model)
            record, train = self.settings_record(), self.defines.get("train")
            if run.resume and self.directory.continues:
                check_same_settings(self.directory.found, record, varies=self.varies, study=self.study,
                                    max_steps=train.max_steps if train is not None else None,
                                    precision=self.precision, asked_precision=run.precision)
            if train is not None and "context_length" not in self.varies:  # from config.json, before any work
                check_positions(run.model, [train.context_length], "--context-length", strict=False)
            try:
                self.directory.begin(record, weights=None,
                                     data={"file": self.dataset.data.path.name, "sha256": self.dataset.sha256})
            except OSError as err:
                raise UsageError(f"--out {self.out}: cannot write {err.filename or self.out} "
                                 f"({err.strerror or err})") from None
        seed_everything(run.seed)

    def settings_record(self) -> dict:
        """The settings that define this run as its record keeps them: run, data and ``defines`` by group (without
        the fields the points vary) and, if the stage has any, its ``study`` options."""
        record = as_record(run=self.run, data=self.data_settings, **self.defines)
        for group in ("lora", "train"):
            if group in record:
                record[group] = {k: v for k, v in record[group].items() if k not in self.varies}
        study = {k: comparable(v) for k, v in self.study.items()}
        return {**record, "study": study} if study else record

    @cached_property
    def weights_identity(self) -> dict:
        """What the weights are: their label and :func:`miniqwen.loading.weights_fingerprint` (config.json, the
        tensor index and a sample of the data; the tensors are not read)."""
        return {"label": self.weights, "name": _model_name(self.run.model),
                "sha256": weights_fingerprint(resolve_model_dir(self.run.model))}

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
        if self.directory is not None:  # also refuses a config.json or weights file that is not a regular file
            self.directory.record_weights(self.weights_identity, self.run.model)
        loaded = loader.load_model(self.run.model, self.device, self.precision)
        print(f"model: {self.weights} — computing on {self.device} in {self.precision}")
        return loaded.model, loaded.tokenizer

    @property
    def model(self):
        """The base model (``miniqwen.Qwen2ForCausalLM``), loaded on first use."""
        return self._loaded[0]

    @property
    def tokenizer(self):
        """The model's tokenizer (:class:`miniqwen.tokenizer.QwenTokenizer`), loaded with it."""
        return self._loaded[1]

    @cached_property
    def weights(self) -> str:
        """The weights' label in results and plots (:func:`loader.weights_label`)."""
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
        if self.directory is not None:  # what the finished run holds is the stage's, for a later --overwrite
            self.directory.finish(ignore=(str(self.ledger.path),))  # a ledger kept in --out is the user's
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
