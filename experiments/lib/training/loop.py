"""The training loop: AdamW on the LoRA matrices (and a head bias with ``LoRASettings.head_bias``), at the learning
rate of each step's schedule (``TrainSettings.learning_rate``), next-token loss on LLMTIME token chunks, periodic
validation, checkpoints and FLOPs charged to the ledger as they are spent.

    summary = train_lora(model, train_chunks, val_chunks, TrainSettings(max_steps=100), "runs/x",
                         lora=LoRASettings(), stage="lora_default", ledger=Ledger())

Run directory: ``log.jsonl`` (one object per step ``{"kind": "train", "step", "loss", "lr" (that step's), "tokens",
"flops_so_far"}`` and per evaluation ``{"kind": "eval", "step", "val_loss", "flops_so_far"}``), ``checkpoint/``
(:mod:`.checkpoint`), ``adapter/`` (final LoRA weights), ``best_adapter/`` (lowest validation loss),
``summary.json`` (what :func:`train_lora` returns) and ``loss_curve.png``. Resuming gives weights bit-identical to an
uninterrupted run on the same device and thread count (tested).

FLOPs (coursework rules): every forward runs inside a :class:`miniqwen.flop_count.FlopCounter` (model + LoRA + loss); a
training step is charged 3× its counted forward (backward = 2× forward), an evaluation 1×. The ledger is charged at
each checkpoint with what was spent since the last charge, before the checkpoint is written: a crash never loses a
charge (steps redone after a crash are charged again, an over-count, never an under-count). Stopped by Ctrl-C, the
run also charges the steps since its last checkpoint, marked "discarded" in the ledger: a resume redoes them.

Several processes (``torchrun``, :mod:`.distributed`): ``batch_size`` is the *global* batch, split evenly over the
ranks — rank r takes its contiguous slice of each step's indices from the same epoch permutation — and the model is
wrapped in ``DistributedDataParallel``. Each rank's loss is its summed token loss × world / (targets of all ranks),
so DDP's averaged gradient is that of the global batch's token mean, as one process computes it; clipping acts on
that all-reduced gradient. The counted FLOPs are summed over ranks every step (and the validation loss is computed
on a shard per rank, with its sums and FLOPs all-reduced), so the ledger gets what one process spending the same
work would charge. Only rank 0 writes the log, checkpoints, adapters, summary and plot and charges the ledger; the
loop state is global, so a run resumes with the same or another number of ranks.

:func:`train_lora` runs its named steps in order: check the arguments, prepare the model and optimizer (a
:class:`.steps.Trainer`), start fresh or restore from the checkpoint, wrap the model, the training steps
(:meth:`.steps.Trainer.run_steps`: step, evaluate and stop early, checkpoint) and finish (adapters, summary, plot).
It trains and charges; pricing the run and checking the budget is the caller's, done once with the rest of its plan
(``experiments.lib.costs.training_cost``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from data.chunks import Chunks
from lora import (add_head_bias, apply_lora, count_trainable_parameters, has_head_bias, load_lora_state_dict,
                  lora_modules, lora_settings, save_adapter)
from miniqwen.atomic import atomic_write

from ..errors import CheckpointError, UsageError
from ..plots import plot_loss_curves
from ..settings import LoRASettings, TrainSettings, as_record
from . import distributed
from .checkpoint import find_checkpoint, fingerprint, precision_change, read_checkpoint, restore
from .loss import validation_chunks
from .state import TrainState
from .steps import Trainer


def read_log(path: str | os.PathLike) -> list[dict]:
    """The entries of a ``log.jsonl``."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def train_lora(model: nn.Module, train_chunks: Chunks, val_chunks: Chunks | None, settings: TrainSettings,
               out_dir: str | os.PathLike, *, lora: LoRASettings | None = None, seed: int = 0, stage: str = "train",
               precision: str = "float32", ledger=None, resume: bool = False, on_step=None,
               loss_token_ids: list[int] | None = None, forecast_score=None) -> dict:
    """Train LoRA adapters of ``lora`` on ``model`` (attached here if the model has none) over token chunks.

    Args:
        model: a miniqwen ``Qwen2ForCausalLM`` on its device; only the LoRA matrices are trained.
        train_chunks, val_chunks: ``data.chunks.Chunks`` [M, L] with L = ``settings.context_length`` (validation
            may be None: no evaluation); the validation subset is fixed by ``settings.eval_batches`` and ``seed``.
        out_dir: the run directory (see the module docstring).
        stage: ledger stage name; ledger: an ``experiments.lib.budget.Ledger`` charged as the run checkpoints, or
            None. The run is priced and checked against the budget by the caller, before it calls
            (``costs.training_cost``; every stage does it with the rest of its plan): this function trains, it does
            not price.
        precision: "float32" or an autocast dtype ("bfloat16", "float16").
        resume: continue from the checkpoint in ``out_dir`` (same settings and data required).
        on_step: called with the step number after each step (tests use it to simulate a crash).
        loss_token_ids: the vocabulary of the training loss when ``settings.loss_vocabulary`` is "numeric" (e.g.
            the digits, ".", ",", ";" and the end token); the validation loss always uses the full vocabulary.
        forecast_score: ``model -> (score, FLOPs)``, called at every evaluation with the adapters attached (e.g. a
            validation forecast error, lower is better); logged beside the validation loss as ``forecast_score``,
            its FLOPs counted as evaluation, and the criterion of "best" when ``settings.select_by`` is "forecast".

    Returns the summary dict (also ``summary.json``).

    Raises:
        FileExistsError: ``out_dir`` holds a checkpoint and ``resume`` is False.
        CheckpointError: ``resume`` with nothing to resume, or a corrupt checkpoint.
        UsageError (a ValueError): the chunks do not fit the settings (:func:`check_chunks`).
        ValueError: a resumed run with other settings or data.

    Under torchrun every rank makes this call with the same arguments (see the module docstring); ``ledger`` and
    ``on_step`` may differ (only rank 0 charges), and every rank returns the same summary.
    """
    lora, out_dir = lora or LoRASettings(), Path(out_dir)
    _check_arguments(train_chunks, val_chunks, settings, lora, out_dir, loss_token_ids, forecast_score)
    trainer = _prepare(model, train_chunks, val_chunks, settings, lora, out_dir, seed=seed, stage=stage,
                       precision=precision, ledger=ledger if distributed.is_main() else None,
                       loss_token_ids=loss_token_ids, forecast_score=forecast_score)
    _start_or_resume(trainer, resume)
    _wrap(trainer)
    t0 = time.time()
    trainer.run_steps(on_step)
    return _finish(trainer, t0)


def check_chunks(train_chunks: Chunks, val_chunks: Chunks | None, settings: TrainSettings) -> None:
    """Refuse chunks the loop cannot train on, naming the option to change: a global batch (``batch_size``) that
    torchrun's processes cannot share evenly, chunks of another width than ``context_length``, fewer training chunks
    than one batch. Stages call it as soon as the chunks are cut, before anything is spent; :func:`train_lora`
    calls it again for callers that did not.

    Raises UsageError (a ValueError) naming ``--batch-size`` or ``--context-length``."""
    B, world, M, L = settings.batch_size, distributed.world_size(), len(train_chunks), settings.context_length
    if B % world:
        raise UsageError(f"--batch-size {B}: batch size {B} is the global batch, split over the {world} processes "
                         f"torchrun started, so it must be divisible by {world}")
    for name, chunks in (("training", train_chunks), ("validation", val_chunks)):
        if chunks is not None and len(chunks) and chunks.input_ids.shape[1] != L:
            raise UsageError(f"--context-length {L}: the {name} chunks have width {chunks.input_ids.shape[1]} "
                             "tokens")
    if M < B:
        raise UsageError(f"--batch-size {B}: the training data gives only {M} chunks of {L} tokens, fewer than one "
                         f"batch; use --batch-size {M} or less (or more training data: --train-limit, a shorter "
                         "--context-length)")


def _check_arguments(train_chunks: Chunks, val_chunks: Chunks | None, settings: TrainSettings, lora: LoRASettings,
                     out_dir: Path, loss_token_ids: list[int] | None, forecast_score) -> None:
    """Validate the settings, make ``out_dir`` (rank 0), then check the data and options against the settings.

    Raises:
        UsageError: the chunks do not fit the settings (:func:`check_chunks`); select_by "forecast" without
            ``forecast_score``.
        ValueError: invalid settings, ``loss_token_ids`` given without the numeric loss vocabulary or missing with
            it.
    """
    settings.validate()
    lora.validate()
    if distributed.is_main():
        out_dir.mkdir(parents=True, exist_ok=True)
    check_chunks(train_chunks, val_chunks, settings)
    if (settings.loss_vocabulary == "numeric") != (loss_token_ids is not None):
        raise ValueError('loss_token_ids must be given exactly when settings.loss_vocabulary is "numeric"')
    if settings.select_by == "forecast" and forecast_score is None:
        raise UsageError('select_by "forecast" (--select-by forecast) needs a stage that measures the validation '
                         "forecast error during training")


def _attach(model: nn.Module, lora: LoRASettings, seed: int) -> None:
    """Attach the adapters of ``lora`` (initialised from ``seed``; with ``lora.head_bias`` also a zero head bias,
    :func:`lora.add_head_bias`, trained with them), or check that the ones attached match it."""
    if not lora_modules(model):
        torch.manual_seed(seed)
        apply_lora(model, lora.rank, lora.lora_alpha, lora.targets)
        if lora.head_bias:  # after apply_lora, which freezes every parameter there is; zeros: no RNG drawn
            add_head_bias(model)
        return
    have = {**lora_settings(model), "head_bias": has_head_bias(model)}
    want = {"rank": lora.rank, "alpha": lora.lora_alpha or lora.rank, "targets": list(lora.targets),
            "head_bias": lora.head_bias}
    if have != want:
        raise ValueError(f"the model's adapters {have} differ from the LoRA settings {want}")


def _prepare(model: nn.Module, train_chunks: Chunks, val_chunks: Chunks | None, settings: TrainSettings,
             lora: LoRASettings, out_dir: Path, *, seed: int, stage: str, precision: str, ledger,
             loss_token_ids: list[int] | None, forecast_score) -> Trainer:
    """Attach (or check) the adapters, join the process group (torchrun), fix the validation subset and build
    AdamW over the trainable parameters (and, in float16, the gradient scaler): a :class:`Trainer` at step 0.

    Raises:
        ValueError: the model's adapters differ from ``lora``; a loss token id outside the vocabulary.
    """
    _attach(model, lora, seed)
    head = model.head_rows(loss_token_ids) if loss_token_ids is not None else None
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device
    distributed.init(device)
    val = None
    if val_chunks is not None and len(val_chunks):
        val = validation_chunks(val_chunks, settings.eval_batches * settings.batch_size, seed)
    optimizer = torch.optim.AdamW(params, lr=settings.lr, betas=tuple(settings.betas), eps=settings.eps,
                                  weight_decay=settings.weight_decay)
    # float16 only: scale the loss so that small gradients survive float16, skip steps whose gradients overflowed
    # (counted: AdamW's own step count then trails the loop's by skipped_steps, recorded with the scaler's state)
    scaler = torch.amp.GradScaler(device.type) if precision == "float16" else None
    record = {**as_record(settings=settings, lora=lora), "seed": seed, "precision": precision,
              "data": {"train": fingerprint(train_chunks), "val": fingerprint(val)}}
    return Trainer(model=model, settings=settings, lora=lora, seed=seed, stage=stage, precision=precision,
                   out_dir=out_dir, train_chunks=train_chunks, val=val, head=head, params=params, device=device,
                   optimizer=optimizer, scaler=scaler, record=record, ledger=ledger, forecast_score=forecast_score,
                   world=distributed.world_size(), rank=distributed.rank(), main=distributed.is_main())


def _start_or_resume(trainer: Trainer, resume: bool) -> None:
    """A fresh start seeds Python, NumPy and torch with ``trainer.seed`` and empties ``log.jsonl``; a resume restores
    the adapters, optimizer, gradient scaler, best weights, loop state and RNG states from the checkpoint and cuts
    the log back to its step. A resume with another ``select_by`` (:attr:`TrainSettings.RESELECTABLE`) forgets the
    best weights and ``best_adapter/``: they were chosen by the other criterion.

    Raises:
        FileExistsError: ``out_dir`` holds a checkpoint and ``resume`` is False.
        CheckpointError: ``resume`` with no checkpoint, a corrupt one, or one of other settings, seed, precision
            or data.
    """
    out_dir, log_path = trainer.out_dir, trainer.log_path
    ckpt = find_checkpoint(out_dir)
    if ckpt is not None and not resume:
        raise FileExistsError(f"{out_dir} already holds a training checkpoint; pass --resume to continue it, or "
                              "choose another output directory")
    if not resume:
        random.seed(trainer.seed)
        np.random.seed(trainer.seed)
        torch.manual_seed(trainer.seed)
        if trainer.main:
            atomic_write(log_path, "")
        return
    if ckpt is None:
        ran = log_path.exists() and log_path.stat().st_size
        raise CheckpointError(f"{out_dir}: nothing to resume (no checkpoint/state.json"
                              + ("; log.jsonl shows steps were run, so the checkpoint was lost or never written"
                                 " — start again with --overwrite)" if ran else ")"))
    saved = read_checkpoint(ckpt)
    check_same_run(ckpt, saved.state, trainer.record)
    restore(saved, trainer.model, trainer.optimizer)
    if trainer.scaler is not None and saved.state.get("grad_scaler"):
        trainer.scaler.load_state_dict(saved.state["grad_scaler"])
        trainer.skipped_steps = saved.state["grad_scaler"].get("skipped_steps", 0)
    trainer.best = saved.best
    trainer.st = st = TrainState(**saved.state["loop"])
    if trainer.main:
        _truncate_log(log_path, st.step)
        print(f"resuming {out_dir} from step {st.step} (epoch {st.epoch}, position {st.position})", file=sys.stderr)
    was = {k: saved.state["settings"].get(k, getattr(TrainSettings, k)) for k in TrainSettings.RESELECTABLE}
    now = {k: getattr(trainer.settings, k) for k in TrainSettings.RESELECTABLE}
    if was != now:  # "best" means something else now: the selection starts here
        trainer.best, st.best_step, st.best_val_loss, st.best_forecast_score = None, None, None, None
        st.evals_since_best = 0
        if trainer.main:
            shutil.rmtree(out_dir / "best_adapter", ignore_errors=True)  # chosen by the old criterion
            print(f"{now} (the checkpoint's: {was}): the best adapter so far is forgotten; the selection starts at "
                  f"step {st.step}", file=sys.stderr)


def _truncate_log(path: Path, step: int) -> None:
    """Keep only log lines with ``step <= step`` (a killed run may have logged steps after its last checkpoint).

    Raises:
        CheckpointError: a damaged line with readable lines after it — a kill tears only the last line, so this is
            damage the resume must not paper over (the message names the file and line).
    """
    kept, torn = [], None
    for number, line in enumerate(path.read_text().splitlines() if path.exists() else [], start=1):
        try:
            entry = json.loads(line)
            entry_step = entry["step"]
            if not isinstance(entry_step, int):
                raise TypeError
        except (json.JSONDecodeError, KeyError, TypeError):  # a line torn by the kill: only the last may be
            torn = torn or number
            continue
        if torn is not None:
            raise CheckpointError(f"{path}: line {torn} is damaged but later lines are not (a kill tears only the "
                                  "last line): restore the log, or start the run again with --overwrite")
        if entry_step <= step:
            kept.append(line)
    atomic_write(path, "".join(line + "\n" for line in kept))


def _wrap(trainer: Trainer) -> None:
    """Wrap the model for training: DDP under torchrun, ``torch.compile`` with ``settings.compile``."""
    # under torchrun: gradients averaged over the ranks in backward
    trainer.net = distributed.data_parallel(trainer.model)
    if trainer.settings.compile:
        trainer.net = torch.compile(trainer.net)  # the training steps only; evaluation and generation stay eager


def _finish(trainer: Trainer, t0: float) -> dict:
    """Charge what is left, save ``adapter/`` and ``best_adapter/`` (rank 0), put the best weights back with
    ``settings.restore_best``, and write ``summary.json`` and ``loss_curve.png`` (rank 0). Returns the summary
    (every rank the same; the seconds since ``t0`` of this session included)."""
    st, settings, model, out_dir = trainer.st, trainer.settings, trainer.model, trainer.out_dir
    M = len(trainer.train_chunks)
    trainer.charge()  # anything not yet charged (e.g. max_steps already reached at resume)
    if trainer.main:
        save_adapter(model, out_dir / "adapter")
        if trainer.best is not None:
            save_adapter(model, out_dir / "best_adapter", state=trainer.best)
    if trainer.best is not None and settings.restore_best:
        load_lora_state_dict(model, trainer.best, source="best validation weights")
    distributed.barrier()  # rank 0's log is complete before the other ranks read it
    losses = [e["loss"] for e in read_log(trainer.log_path) if e["kind"] == "train"]
    summary = {
        "stage": trainer.stage, "steps": st.step, "epochs": st.epoch + st.position / M, "train_chunks": M,
        "val_chunks_evaluated": len(trainer.val) if trainer.val is not None else 0,
        "last_train_loss": losses[-1] if losses else None,
        "val_loss": st.last_val_loss, "best_val_loss": st.best_val_loss,
        "best_forecast_score": st.best_forecast_score, "best_step": st.best_step, "select_by": settings.select_by,
        "stopped_early": st.stopped_early, "train_flops": st.train_flops, "eval_flops": st.eval_flops,
        "total_flops": st.train_flops + st.eval_flops,
        "trainable_parameters": count_trainable_parameters(model), "processes": trainer.world,
        "seconds_this_session": round(time.time() - t0, 2), **trainer.record,
    }
    if trainer.main:
        atomic_write(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        plot_loss_curves(trainer.log_path, out_dir / "loss_curve.png", title=trainer.stage)
    return summary


def check_same_run(ckpt: Path, saved: dict, now: dict) -> None:
    """Refuse to resume with settings that change the optimisation, other adapters, seed, compute dtype or data;
    with a learning-rate schedule that depends on ``max_steps`` (cosine), also another ``max_steps``. What "best" means
    (:attr:`TrainSettings.RESELECTABLE`) may change: the caller then forgets the best so far.

    ``saved``: the checkpoint's state.json (at ``ckpt``); ``now``: this run's record (``settings``, ``lora``,
    ``seed``, ``precision`` as resolved, ``data`` fingerprints, as the loop writes them into a checkpoint).

    Raises:
        CheckpointError: naming every field that differs, or the data fingerprints.
    """
    fixed = TrainSettings.RESUME_FIXED
    # a field missing from a record is its default: added since the checkpoint, or left out (settings.as_record)
    default = {f.name: f.default for f in dataclasses.fields(TrainSettings)}
    was = {k: saved["settings"].get(k, default[k]) for k in (*fixed, "max_steps")}
    is_ = {k: now["settings"].get(k, default[k]) for k in (*fixed, "max_steps")}
    changed = [f"{k}: checkpoint {was[k]!r} vs now {is_[k]!r}" for k in fixed
               if was[k] != is_[k] and k not in TrainSettings.RESELECTABLE]
    schedule = TrainSettings(lr_schedule=is_["lr_schedule"])
    if schedule.schedule_depends_on_max_steps and was["max_steps"] != is_["max_steps"]:
        changed.append(f"max_steps: checkpoint {was['max_steps']} vs now {is_['max_steps']} (the {is_['lr_schedule']}"
                       " learning-rate schedule decays to 0 at max_steps, so a run continued to other max_steps "
                       "would not equal one trained straight to them: keep max_steps, or start a new run)")
    changed += [f"lora: checkpoint {saved['lora']} vs now {now['lora']}"] if saved["lora"] != now["lora"] else []
    changed += [f"seed: checkpoint {saved['seed']} vs now {now['seed']}"] if saved["seed"] != now["seed"] else []
    # the compute dtype, as resolved: "--precision auto" picks by device and CPU, so on another machine it may pick
    # another one
    changed += [why] if (why := precision_change(saved, now.get("precision"))) else []
    if changed:
        raise CheckpointError(f"{ckpt}: cannot resume with different settings: " + "; ".join(changed))
    if saved["data"] != now["data"]:
        raise CheckpointError(f"{ckpt}: the training/validation chunks differ from the checkpoint's "
                              f"({saved['data']} vs {now['data']})")
