"""One training run's state and the steps :func:`.loop.train` repeats: the next batch, one optimizer step, an
evaluation (with early stopping), the ledger charge and the checkpoint, and the loop of steps with its progress bar.

:class:`TrainState` is what a checkpoint stores besides tensors; :class:`Trainer` holds it together with everything the
steps work with (model, optimizer, data, settings, where to write). The module docstring of :mod:`.loop` describes
the log, the FLOP accounting and the behaviour under torchrun.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from data.chunks import Chunks
from lora import lora_state_dict
from miniqwen.device import FLOAT16_OVERFLOW
from miniqwen.flop_count import FlopCounter
from miniqwen.generate import bar_disabled
from miniqwen.model import HeadRows

from ..errors import UsageError
from ..settings import LoRASettings, TrainSettings
from . import distributed
from .checkpoint import write_checkpoint
from .loss import autocast_context, next_token_loss, validation_sums
from .state import TrainState


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """Order of the n training chunks in ``epoch``, from its own generator (seed, epoch): a resumed run rebuilds it
    from (epoch, position) alone."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


@dataclass(eq=False)
class Trainer:
    """A training run in progress: everything one :func:`.loop.train_lora` call works with, and its mutable state
    (``st``, ``best``, ...).

    ``net`` is what the training forward runs through (the model, wrapped for DDP under torchrun and compiled with
    ``settings.compile``); evaluation uses ``model`` itself. ``val`` is the fixed validation subset [N, L] (None: no
    evaluation); ``head`` the restricted loss's head rows (None: full vocabulary). ``ledger`` is None on ranks > 0.
    """

    model: nn.Module
    settings: TrainSettings
    lora: LoRASettings
    seed: int
    stage: str
    precision: str
    out_dir: Path
    train_chunks: Chunks
    val: Chunks | None
    head: HeadRows | None
    params: list[nn.Parameter]
    device: torch.device
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None        # float16 only
    record: dict                               # settings, seed and data fingerprints, as checkpoints store them
    ledger: object | None                      # an experiments.lib.budget.Ledger
    forecast_score: Callable | None
    world: int
    rank: int
    main: bool
    net: nn.Module | None = None
    st: TrainState = field(default_factory=TrainState)
    best: dict | None = None                   # LoRA state dict at the best evaluation
    skipped_steps: int = 0                     # float16 steps the gradient scaler skipped (overflow)
    perm: torch.Tensor | None = None           # the permutation of epoch perm_epoch
    perm_epoch: int | None = None

    @property
    def log_path(self) -> Path:
        """The run's ``log.jsonl``."""
        return self.out_dir / "log.jsonl"

    @property
    def run_name(self) -> str:
        """The run as its ledger entries name it: the training directory and its parent (``lora_default/training``;
        only the directory's name where it has no named parent, e.g. ``--out run``)."""
        return "/".join(n for n in (self.out_dir.parent.name, self.out_dir.name) if n)

    def log(self, entry: dict) -> None:
        """Append ``entry`` with ``flops_so_far`` (train + eval FLOPs so far) to ``log.jsonl`` (rank 0 only)."""
        if not self.main:
            return
        entry["flops_so_far"] = self.st.train_flops + self.st.eval_flops
        with open(self.log_path, "a") as f:
            f.write(json.dumps(entry) + "\n")

    def charge(self, discarded: bool = False) -> None:
        """Charge the ledger (if any) with the train and eval FLOPs spent since the last charge; ``discarded``:
        the run is stopping without a checkpoint of that work (a resume redoes it), which the entry says."""
        st = self.st
        note = {"discarded": f"interrupted after step {st.step}, before a checkpoint; a resume redoes the steps "
                             "since the last one"} if discarded else {}
        for kind in ("train", "eval"):
            delta = getattr(st, f"{kind}_flops") - getattr(st, f"charged_{kind}")
            if self.ledger is not None and delta > 0:
                self.ledger.charge(self.stage, delta, kind, run=self.run_name,
                                   step=st.step, **note)
                setattr(st, f"charged_{kind}", getattr(st, f"charged_{kind}") + delta)

    def evaluate(self) -> None:
        """Validation loss (nats/token, full vocabulary; each rank a shard, sums all-reduced) and, with
        ``forecast_score``, the forecast score; their FLOPs counted as evaluation. Updates the best step (keeping its
        LoRA weights in ``best``) and the evaluations since it, and logs an "eval" entry."""
        st, world, rank, val = self.st, self.world, self.rank, self.val
        shard = val if world == 1 else Chunks(val.input_ids[rank::world], val.attention_mask[rank::world])
        total, count, fwd = distributed.sum_over_ranks(*validation_sums(self.model, shard, self.settings.batch_size,
                                                                        self.precision))
        loss = total / count if count else float("nan")
        st.eval_flops += fwd
        st.last_val_loss = loss
        entry = {"kind": "eval", "step": st.step, "val_loss": loss}
        score = None
        if self.forecast_score is not None:
            score, spent = self.forecast_score(self.model)
            entry["forecast_score"], st.eval_flops = score, st.eval_flops + spent
        if self.settings.select_by == "forecast":
            better = st.best_forecast_score is None or score < st.best_forecast_score
        else:
            better = st.best_val_loss is None or loss < st.best_val_loss
        if better:
            st.best_val_loss, st.best_forecast_score = loss, score
            st.best_step, st.evals_since_best, self.best = st.step, 0, lora_state_dict(self.model)
        else:
            st.evals_since_best += 1
        self.log(entry)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share of the next global batch: (input_ids, attention_mask), each [B / world, L] on the
        device. A new epoch (a new permutation) starts when the rest of this one cannot fill a batch."""
        st, M, B, world = self.st, len(self.train_chunks), self.settings.batch_size, self.world
        if st.position + B > M:  # drop the incomplete last batch: every step has the same shape
            st.epoch, st.position = st.epoch + 1, 0
        if self.perm_epoch != st.epoch:
            self.perm, self.perm_epoch = epoch_permutation(M, self.seed, st.epoch), st.epoch
        idx = self.perm[st.position:st.position + B][self.rank * B // world:(self.rank + 1) * B // world]
        st.position += B
        chunks = self.train_chunks
        return chunks.input_ids[idx].to(self.device), chunks.attention_mask[idx].to(self.device)

    def backward(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, int, int, float]:
        """Forward (FLOP-counted, under autocast) and backward of the next-token loss of one batch [B / world, L].

        Returns (loss, targets, forward FLOPs, loss sum): the loss backpropagated (this rank's summed token loss ×
        world / targets of all ranks), then the targets, forward FLOPs and summed loss (nats) of all ranks.

        Raises:
            UsageError: in float16, a non-finite loss (the model overflows float16).
        """
        self.optimizer.zero_grad(set_to_none=True)
        with torch.enable_grad():  # even if the caller disabled autograd globally
            with FlopCounter() as counter, autocast_context(self.device, self.precision):
                loss_sum, n = next_token_loss(self.net, ids, mask, self.head)
            # all ranks: targets, forward FLOPs, loss; DDP then averages sum_r ∇(loss_sum_r · world / n) over ranks
            n, forward, loss_total = distributed.sum_over_ranks(n, counter.total, float(loss_sum.detach()))
            loss = loss_sum / (max(n, 1) / self.world)
            if self.scaler is None:
                loss.backward()
            else:
                if not math.isfinite(loss_total):
                    raise UsageError(f"training loss {loss_total} at step {self.st.step + 1}: {FLOAT16_OVERFLOW}")
                self.scaler.scale(loss).backward()
                self.scaler.unscale_(self.optimizer)  # clip (and AdamW) see the true gradients
        return loss, n, forward, loss_total

    def update(self) -> float:
        """Clip the gradient norm (``settings.max_grad_norm``), set this step's learning rate and step AdamW
        (through the gradient scaler in float16, counting the steps it skips). Returns the learning rate."""
        settings, optimizer, scaler = self.settings, self.optimizer, self.scaler
        if settings.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, settings.max_grad_norm)
        lr = settings.learning_rate(self.st.step)  # from the step alone: a resumed run sets the same rates
        for group in optimizer.param_groups:
            group["lr"] = lr
        if scaler is None:
            optimizer.step()
        else:
            scale = scaler.get_scale()
            scaler.step(optimizer)  # skipped if the scaled gradients overflowed: the scale then backs off
            scaler.update()
            self.skipped_steps += scaler.get_scale() < scale
        return lr

    def train_step(self) -> float:
        """One optimizer step on the next batch; charges 3× its counted forward FLOPs to the state and logs a
        "train" entry. Returns the step's training loss (nats/token over the global batch)."""
        loss, n, forward, loss_total = self.backward(*self.next_batch())
        lr = self.update()
        self.st.step += 1
        self.st.train_flops += 3 * forward
        loss_value = float(loss.detach()) if self.world == 1 else loss_total / max(n, 1)
        self.log({"kind": "train", "step": self.st.step, "loss": loss_value, "lr": lr, "tokens": n})
        return loss_value

    def evaluate_if_due(self) -> None:
        """Evaluate every ``eval_every`` steps and after the last; stop early after ``early_stop_patience``
        evaluations without a new best."""
        st, settings = self.st, self.settings
        last = st.step == settings.max_steps
        if self.val is not None and ((settings.eval_every and st.step % settings.eval_every == 0) or last):
            self.evaluate()
            if settings.early_stop_patience and st.evals_since_best >= settings.early_stop_patience:
                st.stopped_early = True

    def checkpoint_if_due(self) -> None:
        """Every ``checkpoint_every`` steps, after the last and on stopping early: charge the ledger, then (rank 0)
        write the checkpoint (loop state, gradient scaler state in float16, best weights)."""
        st, settings, scaler = self.st, self.settings, self.scaler
        if not (st.step % settings.checkpoint_every == 0 or st.step == settings.max_steps or st.stopped_early):
            return
        self.charge()  # first: a crash between the two can only make a resumed run charge redone work again
        if self.main:
            scaling = {} if scaler is None else {
                "grad_scaler": {**scaler.state_dict(), "skipped_steps": self.skipped_steps}}
            write_checkpoint(self.out_dir, self.model, self.optimizer,
                             {**self.record, "loop": dataclasses.asdict(st), **scaling}, self.best)

    def run_steps(self, on_step: Callable[[int], None] | None = None) -> None:
        """Evaluate at the start (``eval_at_start``, a fresh run only), then train step by step until ``max_steps``
        or an early stop, with a progress bar (rank 0, ``settings.progress``: True or None = only when stderr is a
        terminal, False = none);
        ``on_step(step)`` after each step.
        Leaves the model in eval mode. Stopped by Ctrl-C (SIGINT, ``KeyboardInterrupt``), it charges the steps and
        evaluations completed since the last checkpoint before it stops (:meth:`charge`, marked discarded): they
        were spent, and a resume spends them again. A crash or a kill (SIGKILL, power loss) leaves them uncharged:
        the ledger then holds the run's work, not the compute lost to the crash."""
        st, settings = self.st, self.settings
        bar = None
        try:
            if self.val is not None and st.step == 0 and settings.eval_at_start:  # a resumed run is past step 0
                self.evaluate()
            bar = tqdm(total=settings.max_steps, initial=st.step, desc=self.stage, dynamic_ncols=True,
                       disable=bar_disabled(None if settings.progress else False) if self.main else True)
            self.model.train()
            while st.step < settings.max_steps and not st.stopped_early:
                loss_value = self.train_step()
                self.evaluate_if_due()
                self.checkpoint_if_due()
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.4f}", flops=f"{st.train_flops + st.eval_flops:.3g}")
                if on_step is not None:
                    on_step(st.step)
                self.model.train()
        except KeyboardInterrupt:
            if bar is not None:
                bar.close()
            try:
                self.charge(discarded=True)
            except Exception as err:  # the ledger itself failing: say so, and let the interruption through
                print(f"warning: the FLOPs since the last checkpoint were not charged: {err}", file=sys.stderr)
            raise
        bar.close()
        self.model.eval()
