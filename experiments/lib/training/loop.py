"""The training loop: AdamW on the LoRA matrices (and a head bias with ``LoRASettings.head_bias``), at the learning
rate of each step's schedule (``TrainSettings.learning_rate``), next-token loss on LLMTIME token chunks, periodic
validation, checkpoints and FLOPs charged to the ledger as they are spent.

    summary = train(model, train_chunks, val_chunks, TrainSettings(max_steps=100), "runs/x", lora=LoRASettings(),
                    stage="lora_default", ledger=Ledger())

Run directory: ``log.jsonl`` (one object per step ``{"kind": "train", "step", "loss", "lr" (that step's), "tokens",
"flops_so_far"}`` and per evaluation ``{"kind": "eval", "step", "val_loss", "flops_so_far"}``), ``checkpoint/``
(:mod:`.checkpoint`), ``adapter/`` (final LoRA weights), ``best_adapter/`` (lowest validation loss),
``summary.json`` (what :func:`train` returns) and ``loss_curve.png``. Resuming gives weights bit-identical to an
uninterrupted run on the same device and thread count (tested).

FLOPs (coursework rules): every forward runs inside a :class:`miniqwen.flops.FlopCounter` (model + LoRA + loss); a
training step is charged 3× its counted forward (backward = 2× forward), an evaluation 1×. The ledger is charged at
each checkpoint with what was spent since the last charge, before the checkpoint is written: a crash never loses a
charge (steps redone after a crash are charged again, an over-count, never an under-count).

Several processes (``torchrun``, :mod:`.distributed`): ``batch_size`` is the *global* batch, split evenly over the
ranks — rank r takes its contiguous slice of each step's indices from the same epoch permutation — and the model is
wrapped in ``DistributedDataParallel``. Each rank's loss is its summed token loss × world / (targets of all ranks),
so DDP's averaged gradient is that of the global batch's token mean, as one process computes it; clipping acts on
that all-reduced gradient. The counted FLOPs are summed over ranks every step (and the validation loss is computed
on a shard per rank, with its sums and FLOPs all-reduced), so the ledger gets what one process spending the same
work would charge. Only rank 0 writes the log, checkpoints, adapters, summary and plot and charges the ledger; the
loop state is global, so a run resumes with the same or another number of ranks.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from data.chunks import Chunks
from lora import add_head_bias, apply_lora, count_trainable_parameters, has_head_bias, load_lora_state_dict, \
    lora_modules, lora_settings, lora_state_dict, save_adapter
from miniqwen.atomic import atomic_write
from miniqwen.device import FLOAT16_OVERFLOW
from miniqwen.flops import FlopCounter

from ..costs import training_cost
from ..plots import plot_loss_curves
from ..settings import LoRASettings, TrainSettings, UsageError, as_record
from . import distributed
from .checkpoint import CheckpointError, find_checkpoint, fingerprint, read_checkpoint, restore, write_checkpoint
from .loss import autocast_context, next_token_loss, validation_sums


@dataclass
class TrainState:
    """Where a run is: what a checkpoint stores besides tensors (all JSON-ready)."""

    step: int = 0
    epoch: int = 0
    position: int = 0          # next chunk of this epoch's permutation
    train_flops: int = 0       # already 3× forward
    eval_flops: int = 0
    charged_train: int = 0     # what the ledger already holds of the two above
    charged_eval: int = 0
    best_val_loss: float | None = None         # at the best step: the lowest unless select_by is "forecast"
    best_forecast_score: float | None = None   # at the best step (when the stage gives a forecast scorer)
    best_step: int | None = None
    evals_since_best: int = 0
    last_val_loss: float | None = None
    stopped_early: bool = False


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """Order of the n training chunks in ``epoch``, from its own generator (seed, epoch): a resumed run rebuilds it
    from (epoch, position) alone."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def validation_subset(n: int, size: int, seed: int) -> torch.Tensor:
    """Sorted indices of the fixed validation subset: ``size`` of n chunks drawn with ``seed`` (all if size is 0
    or >= n)."""
    if size == 0 or size >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919))[:size].sort().values


def read_log(path: str | os.PathLike) -> list[dict]:
    """The entries of a ``log.jsonl``."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _truncate_log(path: Path, step: int) -> None:
    """Keep only log lines with ``step <= step`` (a killed run may have logged steps after its last checkpoint)."""
    kept = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):  # a line torn by the kill: drop it
            continue
    atomic_write(path, "".join(line + "\n" for line in kept))


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


def train(model: nn.Module, train_chunks: Chunks, val_chunks: Chunks | None, settings: TrainSettings,
          out_dir: str | os.PathLike, *, lora: LoRASettings | None = None, seed: int = 0, stage: str = "train",
          precision: str = "float32", ledger=None, resume: bool = False, force: bool = False, on_step=None,
          loss_token_ids: list[int] | None = None, forecast_score=None) -> dict:
    """Train LoRA adapters of ``lora`` on ``model`` (attached here if the model has none) over token chunks.

    Args:
        model: a miniqwen ``Qwen2ForCausalLM`` on its device; only the LoRA matrices are trained.
        train_chunks, val_chunks: ``data.chunks.Chunks`` [M, L] with L = ``settings.context_length`` (validation
            may be None: no evaluation); the validation subset is fixed by ``settings.eval_batches`` and ``seed``.
        out_dir: the run directory (see the module docstring).
        stage: ledger stage name; ledger: an ``experiments.lib.budget.Ledger`` or None (nothing checked or charged).
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
        ValueError: chunk widths differ from ``settings.context_length``, fewer chunks than a batch, a resumed run
            with other settings or data. BudgetExceededError: the plan would exceed the budget.
        UsageError (a ValueError): under torchrun, ``batch_size`` is not divisible by the number of processes.

    Under torchrun every rank makes this call with the same arguments (see the module docstring); ``ledger`` and
    ``on_step`` may differ (only rank 0 charges), and every rank returns the same summary.
    """
    lora = lora or LoRASettings()
    settings.validate()
    lora.validate()
    world, rank, main = distributed.world_size(), distributed.rank(), distributed.is_main()
    ledger = ledger if main else None
    out_dir = Path(out_dir)
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
    M, B = len(train_chunks), settings.batch_size
    if B % world:
        raise UsageError(f"batch size {B} is the global batch, split over the {world} processes torchrun started: "
                         "it must be divisible by their number")
    for name, chunks in (("training", train_chunks), ("validation", val_chunks)):
        if chunks is not None and len(chunks) and chunks.input_ids.shape[1] != settings.context_length:
            raise ValueError(f"{name} chunks have width {chunks.input_ids.shape[1]}, context_length is "
                             f"{settings.context_length}")
    if M < B:
        raise ValueError(f"{M} training chunks cannot fill a batch of {B}")
    if (settings.loss_vocabulary == "numeric") != (loss_token_ids is not None):
        raise ValueError('loss_token_ids must be given exactly when settings.loss_vocabulary is "numeric"')
    if settings.select_by == "forecast" and forecast_score is None:
        raise UsageError('select_by "forecast" (--select-by forecast) needs a stage that measures the validation '
                         "forecast error during training")
    _attach(model, lora, seed)
    head = model.head_rows(loss_token_ids) if loss_token_ids is not None else None
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device
    distributed.init(device)
    val = None
    if val_chunks is not None and len(val_chunks):
        idx = validation_subset(len(val_chunks), settings.eval_batches * B, seed)
        val = Chunks(val_chunks.input_ids[idx], val_chunks.attention_mask[idx])
    optimizer = torch.optim.AdamW(params, lr=settings.lr, betas=tuple(settings.betas), eps=settings.eps,
                                  weight_decay=settings.weight_decay)
    # float16 only: scale the loss so that small gradients survive float16, skip steps whose gradients overflowed
    # (counted: AdamW's own step count then trails the loop's by skipped_steps, recorded with the scaler's state)
    scaler = torch.amp.GradScaler(device.type) if precision == "float16" else None
    skipped_steps = 0
    record = {**as_record(settings=settings, lora=lora), "seed": seed,
              "data": {"train": fingerprint(train_chunks), "val": fingerprint(val)}}
    log_path = out_dir / "log.jsonl"

    # ---- fresh start or resume
    st, best = TrainState(), None
    ckpt = find_checkpoint(out_dir)
    if ckpt is not None and not resume:
        raise FileExistsError(f"{out_dir} already holds a training checkpoint; pass --resume to continue it, or "
                              "choose another output directory")
    if resume:
        if ckpt is None:
            ran = log_path.exists() and log_path.stat().st_size
            raise CheckpointError(f"{out_dir}: nothing to resume (no checkpoint/state.json"
                                  + ("; log.jsonl shows steps were run, so the checkpoint was lost or never written"
                                     " — start again with --overwrite)" if ran else ")"))
        saved = read_checkpoint(ckpt)
        _check_same_run(ckpt, saved.state, record)
        restore(saved, model, optimizer)
        if scaler is not None and saved.state.get("grad_scaler"):
            scaler.load_state_dict(saved.state["grad_scaler"])
            skipped_steps = saved.state["grad_scaler"].get("skipped_steps", 0)
        best = saved.best
        st = TrainState(**saved.state["loop"])
        if main:
            _truncate_log(log_path, st.step)
            print(f"resuming {out_dir} from step {st.step} (epoch {st.epoch}, position {st.position})",
                  file=sys.stderr)
    else:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        if main:
            atomic_write(log_path, "")
    net = distributed.data_parallel(model)  # under torchrun: gradients averaged over the ranks in backward
    if settings.compile:
        net = torch.compile(net)  # the training steps only; evaluation and generation stay eager

    planned = training_cost(model.config, settings, lora, len(val) if val is not None else 0, st.step,
                            len(head.ids) if head is not None else None)
    if ledger is not None:
        ledger.check(planned, force=force)

    def log(entry: dict) -> None:
        if not main:
            return
        entry["flops_so_far"] = st.train_flops + st.eval_flops
        with open(log_path, "a") as f:
            f.write(json.dumps(entry) + "\n")

    def evaluate() -> None:
        nonlocal best
        shard = val if world == 1 else Chunks(val.input_ids[rank::world], val.attention_mask[rank::world])
        total, count, fwd = distributed.sum_over_ranks(*validation_sums(model, shard, B, precision))
        loss = total / count if count else float("nan")
        st.eval_flops += fwd
        st.last_val_loss = loss
        entry = {"kind": "eval", "step": st.step, "val_loss": loss}
        score = None
        if forecast_score is not None:
            score, spent = forecast_score(model)
            entry["forecast_score"], st.eval_flops = score, st.eval_flops + spent
        if settings.select_by == "forecast":
            better = st.best_forecast_score is None or score < st.best_forecast_score
        else:
            better = st.best_val_loss is None or loss < st.best_val_loss
        if better:
            st.best_val_loss, st.best_forecast_score = loss, score
            st.best_step, st.evals_since_best, best = st.step, 0, lora_state_dict(model)
        else:
            st.evals_since_best += 1
        log(entry)

    def charge() -> None:
        for kind in ("train", "eval"):
            delta = getattr(st, f"{kind}_flops") - getattr(st, f"charged_{kind}")
            if ledger is not None and delta > 0:
                ledger.charge(stage, delta, kind, run=f"{out_dir.parent.name}/{out_dir.name}", step=st.step)
                setattr(st, f"charged_{kind}", getattr(st, f"charged_{kind}") + delta)

    # ---- loop
    t0 = time.time()
    if val is not None and st.step == 0 and settings.eval_at_start:  # a resumed run is past step 0
        evaluate()
    bar = tqdm(total=settings.max_steps, initial=st.step, disable=not (settings.progress and main), desc=stage,
               dynamic_ncols=True)
    model.train()
    perm, perm_epoch = None, None
    while st.step < settings.max_steps and not st.stopped_early:
        if st.position + B > M:  # drop the incomplete last batch: every step has the same shape
            st.epoch, st.position = st.epoch + 1, 0
        if perm_epoch != st.epoch:
            perm, perm_epoch = epoch_permutation(M, seed, st.epoch), st.epoch
        idx = perm[st.position:st.position + B][rank * B // world:(rank + 1) * B // world]  # this rank's share
        st.position += B
        ids, mask = train_chunks.input_ids[idx].to(device), train_chunks.attention_mask[idx].to(device)

        optimizer.zero_grad(set_to_none=True)
        with torch.enable_grad():  # even if the caller disabled autograd globally
            with FlopCounter() as counter, autocast_context(device, precision):
                loss_sum, n = next_token_loss(net, ids, mask, head)
            # all ranks: targets, forward FLOPs, loss; DDP then averages sum_r ∇(loss_sum_r · world / n) over ranks
            n, forward, loss_total = distributed.sum_over_ranks(n, counter.total, float(loss_sum.detach()))
            loss = loss_sum / (max(n, 1) / world)
            if scaler is None:
                loss.backward()
            else:
                if not math.isfinite(loss_total):
                    raise UsageError(f"training loss {loss_total} at step {st.step + 1}: {FLOAT16_OVERFLOW}")
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)  # clip (and AdamW) see the true gradients
        if settings.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
        lr = settings.learning_rate(st.step)  # from the step alone: a resumed run sets the same rates
        for group in optimizer.param_groups:
            group["lr"] = lr
        if scaler is None:
            optimizer.step()
        else:
            scale = scaler.get_scale()
            scaler.step(optimizer)  # skipped if the scaled gradients overflowed: the scale then backs off
            scaler.update()
            skipped_steps += scaler.get_scale() < scale
        st.step += 1
        st.train_flops += 3 * forward
        loss_value = float(loss.detach()) if world == 1 else loss_total / max(n, 1)
        log({"kind": "train", "step": st.step, "loss": loss_value, "lr": lr, "tokens": n})

        last = st.step == settings.max_steps
        if val is not None and ((settings.eval_every and st.step % settings.eval_every == 0) or last):
            evaluate()
            if settings.early_stop_patience and st.evals_since_best >= settings.early_stop_patience:
                st.stopped_early = True
        if st.step % settings.checkpoint_every == 0 or last or st.stopped_early:
            charge()  # first: a crash between the two can only make a resumed run charge redone work again
            if main:
                scaling = {} if scaler is None else {
                    "grad_scaler": {**scaler.state_dict(), "skipped_steps": skipped_steps}}
                write_checkpoint(out_dir, model, optimizer, {**record, "loop": dataclasses.asdict(st), **scaling},
                                 best)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}", flops=f"{st.train_flops + st.eval_flops:.3g}")
        if on_step is not None:
            on_step(st.step)
        model.train()
    bar.close()
    model.eval()
    charge()  # anything not yet charged (e.g. max_steps already reached at resume)

    # ---- outputs
    if main:
        save_adapter(model, out_dir / "adapter")
        if best is not None:
            save_adapter(model, out_dir / "best_adapter", state=best)
    if best is not None and settings.restore_best:
        load_lora_state_dict(model, best, source="best validation weights")
    distributed.barrier()  # rank 0's log is complete before the other ranks read it
    losses = [e["loss"] for e in read_log(log_path) if e["kind"] == "train"]
    summary = {
        "stage": stage, "steps": st.step, "epochs": st.epoch + st.position / M, "train_chunks": M,
        "val_chunks_evaluated": len(val) if val is not None else 0, "last_train_loss": losses[-1] if losses else None,
        "val_loss": st.last_val_loss, "best_val_loss": st.best_val_loss,
        "best_forecast_score": st.best_forecast_score, "best_step": st.best_step, "select_by": settings.select_by,
        "stopped_early": st.stopped_early, "train_flops": st.train_flops, "eval_flops": st.eval_flops,
        "total_flops": st.train_flops + st.eval_flops, "planned_flops_this_session": planned,
        "trainable_parameters": count_trainable_parameters(model), "processes": world,
        "seconds_this_session": round(time.time() - t0, 2), **record,
    }
    if main:
        atomic_write(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        plot_loss_curves(log_path, out_dir / "loss_curve.png", title=stage)
    return summary


def _check_same_run(ckpt: Path, saved: dict, now: dict) -> None:
    """Refuse to resume with settings that change the optimisation, other adapters, seed or data; with a learning-
    rate schedule that depends on ``max_steps`` (cosine), also another ``max_steps``."""
    fixed = TrainSettings.RESUME_FIXED
    # a field missing from a record is its default: added since the checkpoint, or left out (settings.as_record)
    default = {f.name: f.default for f in dataclasses.fields(TrainSettings)}
    was = {k: saved["settings"].get(k, default[k]) for k in (*fixed, "max_steps")}
    is_ = {k: now["settings"].get(k, default[k]) for k in (*fixed, "max_steps")}
    changed = [f"{k}: checkpoint {was[k]!r} vs now {is_[k]!r}" for k in fixed if was[k] != is_[k]]
    schedule = TrainSettings(lr_schedule=is_["lr_schedule"])
    if schedule.schedule_depends_on_max_steps and was["max_steps"] != is_["max_steps"]:
        changed.append(f"max_steps: checkpoint {was['max_steps']} vs now {is_['max_steps']} (the {is_['lr_schedule']}"
                       " learning-rate schedule decays to 0 at max_steps, so a run continued to other max_steps "
                       "would not equal one trained straight to them: keep max_steps, or start a new run)")
    changed += [f"lora: checkpoint {saved['lora']} vs now {now['lora']}"] if saved["lora"] != now["lora"] else []
    changed += [f"seed: checkpoint {saved['seed']} vs now {now['seed']}"] if saved["seed"] != now["seed"] else []
    if changed:
        raise CheckpointError(f"{ckpt}: cannot resume with different settings: " + "; ".join(changed))
    if saved["data"] != now["data"]:
        raise CheckpointError(f"{ckpt}: the training/validation chunks differ from the checkpoint's "
                              f"({saved['data']} vs {now['data']})")
