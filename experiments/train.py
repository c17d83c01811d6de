"""The training runner shared by every training stage: AdamW on the trainable (LoRA) parameters, next-token loss on
LLMTIME token chunks, periodic validation, resumable checkpoints, logs, loss curve, FLOPs charged to the ledger.

Library use (what ``experiments.lora_default`` does)::

    apply_lora(model, rank=4)
    summary = train(model, train_chunks, val_chunks, TrainConfig(stage="lora_default", max_steps=100), out_dir,
                    ledger=Ledger())

Command line, on chunk files written by :func:`save_chunks` (tests use it; real stages prepare their own data)::

    python -m experiments.train --model DIR --train-chunks train.safetensors --val-chunks val.safetensors \\
        --out runs/x --rank 4 --lr 1e-5 --batch-size 4 --max-steps 100 [--resume] [--device cuda]

Outputs in ``out_dir``:

    log.jsonl          one object per step {"kind": "train", "step", "loss", "lr", "tokens", "flops_so_far"} and per
                       evaluation {"kind": "eval", "step", "val_loss", "flops_so_far"} (FLOPs already 3×/1×)
    checkpoint/        the state to resume from (see below), replaced atomically every ``checkpoint_every`` steps
    adapter/           final LoRA adapter (``lora.save_adapter`` format); best_adapter/ = lowest validation loss
    summary.json       what :func:`train` returns; loss_curve.png: training and validation loss against step

Checkpoint (``checkpoint/``, written to ``checkpoint.tmp/`` and renamed; no pickles anywhere)::

    adapter.safetensors + adapter_config.json   LoRA weights (loadable with lora.load_adapter)
    optimizer.safetensors                       AdamW state per trainable parameter: "<i>.exp_avg", "<i>.step", …
    best_adapter.safetensors                    LoRA weights at the best validation loss (if any evaluation)
    rng.safetensors                             torch CPU (and CUDA) generator states
    state.json                                  step, data-loader position (epoch, index), FLOP totals and what was
                                                already charged, early-stopping state, python/numpy RNG states,
                                                config, fingerprints of the data

Resuming from it gives weights bit-identical to an uninterrupted run on the same device and thread count (tested).

FLOPs (coursework rules, :mod:`miniqwen.flops`): every forward runs inside a :class:`miniqwen.flops.FlopCounter`
(model + LoRA + loss), a training step is charged 3× its counted forward (backward = 2× forward), an
evaluation 1×. The loss (component ``"loss"``) costs, per target token, a log-softmax over the V logits and picking
the target: V exps (10 each), V − 1 adds for the sum, one log (10), one subtract (log p = z_t − log Σ exp z) —
``11·V + 10`` — plus ``n`` for the mean over n tokens (n − 1 adds, 1 divide): :func:`loss_flops`. Padding targets
are dropped *before* the log-softmax, so they cost nothing there (the model forward still computes every position).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from data.chunks import Chunks
from lora import apply_lora, count_trainable_parameters, load_lora_state_dict, lora_modules, lora_settings, \
    lora_state_dict, save_adapter
from miniqwen import flops
from miniqwen.flops import FlopCounter

from .budget import Ledger


# ---------------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class TrainConfig:
    """Hyperparameters and bookkeeping of one training run (defaults: the coursework's LoRA defaults).

    Attributes:
        stage: name under which FLOPs are charged to the ledger (e.g. ``"lora_default"``).
        lr: AdamW learning rate (constant).
        batch_size: chunks per step.
        context_length: tokens per chunk; must equal the chunks' width L (the caller cuts the chunks).
        stride: offset between chunk starts used by the caller (recorded only; None = context_length).
        max_steps: optimizer steps to run in total (a resumed run may raise it to continue further).
        weight_decay, betas, eps: AdamW's (weight decay default 0: LoRA matrices are not decayed).
        max_grad_norm: clip the gradient norm of the trainable parameters to this (None or 0 = no clipping).
        eval_every: evaluate the validation loss every this many steps (0 = no periodic evaluation); whenever
            validation chunks are given it is also evaluated at step 0 (if ``eval_at_start``) and after the last
            step.
        eval_batches: validation subset = ``eval_batches · batch_size`` chunks, drawn once with ``seed`` (the
            same subset every evaluation); 0 = all validation chunks.
        eval_at_start: evaluate before the first step (the untrained loss; not repeated on resume).
        early_stop_patience: stop after this many evaluations without a new best validation loss (0 = off).
        restore_best: after training, put the best-validation-loss LoRA weights back into the model.
        checkpoint_every: write a checkpoint (and charge the ledger) every this many steps; also after the last.
        seed: seeds Python, NumPy and torch at the start, the data order and the validation subset.
        device: "cpu" or "cuda" (the model is moved there).
        dtype: "auto" = bf16 autocast on CUDA, float32 on CPU; "float32" = no autocast; "bfloat16"/"float16" =
            autocast to that dtype on ``device``.
        progress: show a tqdm progress bar (loss and FLOPs so far).
    """

    stage: str = "train"
    lr: float = 1e-5
    batch_size: int = 4
    context_length: int = 512
    stride: int | None = None
    max_steps: int = 10_000
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    eval_every: int = 500
    eval_batches: int = 8
    eval_at_start: bool = True
    early_stop_patience: int = 0
    restore_best: bool = False
    checkpoint_every: int = 500
    seed: int = 0
    device: str = "cpu"
    dtype: str = "auto"
    progress: bool = True

    #: fields that define the optimisation trajectory: a resumed run must use the same values
    RESUME_FIXED = ("lr", "batch_size", "context_length", "stride", "weight_decay", "betas", "eps", "max_grad_norm",
                    "eval_batches", "seed")

    def validate(self) -> None:
        """Raise ValueError for impossible values."""
        for name in ("batch_size", "context_length", "max_steps", "checkpoint_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be an int >= 1, got {getattr(self, name)!r}")
        for name in ("eval_every", "eval_batches", "early_stop_patience"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be an int >= 0, got {getattr(self, name)!r}")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"TrainConfig.dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.early_stop_patience and not self.eval_every:
            raise ValueError("early stopping needs evaluations: set eval_every > 0")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d


# ---------------------------------------------------------------------------------------------------------------
# Loss and evaluation
# ---------------------------------------------------------------------------------------------------------------

def loss_flops(vocab_size: int, n_tokens: int) -> int:
    """FLOPs of the mean next-token cross-entropy over ``n_tokens`` targets: ``n·(11·V + 10) + n``.

    Per token: log-softmax over V logits and the target's log-probability — V exps (10 each), V − 1 adds (sum),
    a log (10), a subtract (z_target − log Σ exp) = 11·V + 10; the max subtracted for stability is an
    implementation detail, not counted (as for attention's softmax). The mean: n − 1 adds and a divide = n.
    """
    return n_tokens * (11 * vocab_size + 10) + n_tokens


def next_token_loss(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """Summed next-token cross-entropy of ``model`` on a batch, padding masked.

    Args:
        input_ids: [B, T] int64 token ids.
        attention_mask: [B, T], 1 = real token, 0 = padding (right or left).

    Returns:
        ``(loss_sum, n)``: the sum over targets of −log p(token t+1 | tokens ≤ t) (float32 scalar tensor, with
        grad if enabled) and the number n of targets. A target counts only if it and its input token are real,
        so a padded chunk gives the same loss as the same chunk unpadded. The logits of padding targets are
        dropped before the log-softmax. FLOPs of the loss go to component ``"loss"`` (:func:`loss_flops`).
    """
    logits = model(input_ids, attention_mask=attention_mask)  # [B, T, V]
    keep = (attention_mask[:, 1:] != 0) & (attention_mask[:, :-1] != 0)  # [B, T-1]
    selected = logits[:, :-1][keep].float()  # [n, V]
    targets = input_ids[:, 1:][keep]  # [n]
    n = int(targets.numel())
    if flops.counting() and n:
        flops.count("loss", loss_flops(logits.shape[-1], n))
    return F.cross_entropy(selected, targets, reduction="sum"), n


def autocast_context(device: torch.device, dtype: str):
    """``torch.autocast`` for ``dtype`` ("auto": bf16 on CUDA, none on CPU; "float32": none)."""
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=getattr(torch, dtype))


@torch.no_grad()
def validation_loss(model: nn.Module, chunks: Chunks, batch_size: int, device="cpu", dtype: str = "auto"):
    """Mean token-level cross-entropy of ``model`` over all of ``chunks`` (padding masked).

    Returns ``(loss, forward_flops)``: the loss (float; sum over all targets / their number, nan if none) and the
    FLOPs counted for the forwards + loss (1× convention: what an evaluation costs).
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with FlopCounter() as fc:
        for start in tqdm(range(0, len(chunks), batch_size), desc="validation loss", unit="batch", leave=False):
            ids = chunks.input_ids[start:start + batch_size].to(device)
            mask = chunks.attention_mask[start:start + batch_size].to(device)
            with autocast_context(device, dtype):
                loss_sum, n = next_token_loss(model, ids, mask)
            total += float(loss_sum)
            count += n
    model.train(was_training)
    return (total / count if count else float("nan")), fc.total


# ---------------------------------------------------------------------------------------------------------------
# Data order, fingerprints, chunk files
# ---------------------------------------------------------------------------------------------------------------

def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of the n training chunks in ``epoch``: a permutation from its own generator (seed, epoch), so a
    resumed run rebuilds it from (epoch, position) alone."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def validation_subset(n: int, size: int, seed: int) -> torch.Tensor:
    """Sorted indices of the fixed validation subset: ``size`` of n chunks drawn with ``seed`` (all if size is 0
    or >= n)."""
    if size == 0 or size >= n:
        return torch.arange(n)
    g = torch.Generator().manual_seed(seed + 7919)
    return torch.randperm(n, generator=g)[:size].sort().values


def fingerprint(chunks: Chunks) -> str:
    """SHA-256 (first 16 hex digits) of the chunks' tokens and mask, to refuse resuming on different data."""
    h = hashlib.sha256()
    h.update(str(tuple(chunks.input_ids.shape)).encode())
    h.update(chunks.input_ids.contiguous().numpy().tobytes())
    h.update(chunks.attention_mask.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def save_chunks(chunks: Chunks, path: str | os.PathLike) -> None:
    """Write ``chunks`` to a safetensors file (tensors ``input_ids`` and ``attention_mask``, [M, L] int64)."""
    save_file({"input_ids": chunks.input_ids.contiguous(), "attention_mask": chunks.attention_mask.contiguous()},
              str(path))


def load_chunks(path: str | os.PathLike) -> Chunks:
    """Read chunks written by :func:`save_chunks`. Raises FileNotFoundError / ValueError (missing tensors)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such chunk file")
    t = load_file(str(path))
    if set(t) != {"input_ids", "attention_mask"}:
        raise ValueError(f"{path}: expected tensors input_ids and attention_mask, found {sorted(t)}")
    return Chunks(input_ids=t["input_ids"].long(), attention_mask=t["attention_mask"].long())


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------------

CHECKPOINT, CHECKPOINT_TMP, CHECKPOINT_OLD = "checkpoint", "checkpoint.tmp", "checkpoint.old"


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _optimizer_tensors(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> dict[str, torch.Tensor]:
    """AdamW's per-parameter state as flat tensors ``"<param index>.<name>"`` (exp_avg, exp_avg_sq, step)."""
    index = {id(p): i for i, p in enumerate(params)}
    out = {}
    for p, state in optimizer.state.items():
        for key, value in state.items():
            if not torch.is_tensor(value):
                raise TypeError(f"optimizer state {key!r} is not a tensor; cannot store it without pickle")
            out[f"{index[id(p)]}.{key}"] = value.detach().cpu().contiguous().clone()
    return out


def _load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    state_dict = optimizer.state_dict()  # param_groups of this run (lr etc.), params numbered 0..n-1
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        i, name = key.split(".", 1)
        state.setdefault(int(i), {})[name] = value
    state_dict["state"] = state
    optimizer.load_state_dict(state_dict)


def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, JSON) capturing the torch CPU/CUDA, Python and NumPy generators."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return tensors, {"python": [version, list(internal), gauss],
                     "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}


def _set_rng_state(tensors: dict[str, torch.Tensor], states: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def _fsync_dir_files(directory: Path) -> None:
    for f in directory.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def write_checkpoint(out_dir: Path, model, optimizer, state: dict, best: dict[str, torch.Tensor] | None) -> Path:
    """Write the resumable state to ``out_dir/checkpoint.tmp`` then rename it to ``out_dir/checkpoint``.

    A directory cannot be replaced in one rename, so the old checkpoint is first renamed to ``checkpoint.old``
    and removed after the new one is in place; :func:`find_checkpoint` falls back to ``checkpoint.old`` if a crash
    hits between the two renames. Returns the checkpoint directory.
    """
    tmp, final, old = out_dir / CHECKPOINT_TMP, out_dir / CHECKPOINT, out_dir / CHECKPOINT_OLD
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_adapter(model, tmp)
    params = [p for _, p in _trainable(model)]
    save_file(_optimizer_tensors(optimizer, params), str(tmp / "optimizer.safetensors"))
    if best is not None:
        save_file(best, str(tmp / "best_adapter.safetensors"))
    rng_tensors, rng_json = _rng_state()
    save_file(rng_tensors, str(tmp / "rng.safetensors"))
    (tmp / "state.json").write_text(json.dumps({**state, "rng": rng_json}) + "\n")
    _fsync_dir_files(tmp)
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)
    return final


def find_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """``out_dir/checkpoint`` if complete, else ``checkpoint.old`` (crash between renames), else None."""
    for name in (CHECKPOINT, CHECKPOINT_OLD):
        path = Path(out_dir) / name
        if (path / "state.json").is_file():
            return path
    return None


# ---------------------------------------------------------------------------------------------------------------
# Logging and plotting
# ---------------------------------------------------------------------------------------------------------------

def _truncate_log(path: Path, step: int) -> None:
    """Keep only log lines with ``step <= step`` (a killed run may have logged steps after its last checkpoint)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):  # a line torn by the kill: drop it
            continue
    path.write_text("".join(line + "\n" for line in kept))


def read_log(path: str | os.PathLike) -> list[dict]:
    """The entries of a ``log.jsonl``."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_loss_curves(log_path: str | os.PathLike, png_path: str | os.PathLike, title: str = "") -> bool:
    """Draw training loss (per step, with a running mean) and validation loss against step into ``png_path``.

    Uses matplotlib's object API with the Agg canvas (no global backend change). Returns False (and draws
    nothing) if matplotlib is not installed.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    entries = read_log(log_path)
    train = [(e["step"], e["loss"]) for e in entries if e["kind"] == "train"]
    evals = [(e["step"], e["val_loss"]) for e in entries if e["kind"] == "eval"]
    fig = Figure(figsize=(7, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if train:
        steps, losses = zip(*train)
        window = max(1, len(losses) // 50)
        ax.plot(steps, losses, color="tab:blue", alpha=0.35 if window > 1 else 1.0, lw=0.8,
                label="training loss (per step)")
        if window > 1:
            smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
            ax.plot(steps[window - 1:], smooth, color="tab:blue", lw=1.5, label=f"training loss ({window}-step mean)")
    if evals:
        steps, losses = zip(*evals)
        ax.plot(steps, losses, "o-", color="tab:orange", lw=1.5, ms=4, label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(str(png_path), dpi=120)
    return True


# ---------------------------------------------------------------------------------------------------------------
# The runner
# ---------------------------------------------------------------------------------------------------------------

def planned_flops(model_config, config: TrainConfig, val_rows: int, start_step: int = 0, lora_rank: int = 0,
                  lora_targets=("q_proj", "v_proj")) -> int:
    """FLOPs a run of ``config`` from ``start_step`` to ``config.max_steps`` will be charged (training 3×, evaluation
    1×), from the closed form :func:`miniqwen.flops.forward_flops` + :func:`loss_flops`.

    An upper bound: every position is taken as a real target (padding costs the loss nothing) and early stopping
    is ignored. ``val_rows`` = size of the validation subset (0 = no evaluation); evaluations as in :func:`train`:
    step 0 (if ``eval_at_start`` and starting at 0), every multiple of ``eval_every``, and the last step.
    """
    from miniqwen.flops import forward_flops

    L, B, e = config.context_length, config.batch_size, config.eval_every
    remaining = max(0, config.max_steps - start_step)

    def one(batch: int) -> int:
        return forward_flops(model_config, batch, L, lora_rank=lora_rank, lora_targets=tuple(lora_targets)) + \
            loss_flops(model_config.vocab_size, batch * (L - 1))

    n_evals = 0
    if val_rows:
        if remaining:  # every multiple of eval_every still ahead, plus the last step if it is not one of them
            n_evals = (config.max_steps // e - start_step // e) if e else 0
            n_evals += 0 if e and config.max_steps % e == 0 else 1
        if start_step == 0 and config.eval_at_start:
            n_evals += 1
    per_eval = sum(one(min(B, val_rows - s)) for s in range(0, val_rows, B))
    return 3 * remaining * one(B) + n_evals * per_eval


def validation_rows(n_val_chunks: int, config: TrainConfig) -> int:
    """Size of the fixed validation subset :func:`train` evaluates (0 if there are no validation chunks)."""
    return len(validation_subset(n_val_chunks, config.eval_batches * config.batch_size, config.seed)) \
        if n_val_chunks else 0


def train(
    model: nn.Module,
    train_chunks: Chunks,
    val_chunks: Chunks | None,
    config: TrainConfig,
    out_dir: str | os.PathLike,
    ledger=None,
    resume: bool = False,
    force: bool = False,
    on_step=None,
) -> dict:
    """Train ``model``'s trainable parameters (after :func:`lora.apply_lora`: the LoRA matrices) on chunks.

    Args:
        model: a miniqwen ``Qwen2ForCausalLM`` (its ``config`` is read for the planned FLOPs); frozen parameters
            stay untouched. Moved to ``config.device``.
        train_chunks: ``data.chunks.Chunks`` [M, L] with L = ``config.context_length``, right padded.
        val_chunks: validation chunks (or None: no evaluation); the subset is fixed by ``config.eval_batches``.
        config: :class:`TrainConfig`.
        out_dir: run directory (created): log, checkpoints, adapters, summary, loss curve.
        ledger: an ``experiments.budget.Ledger`` (or None: nothing charged or checked). Before training,
            ``ledger.check(planned)`` refuses a run that would exceed the budget; FLOPs spent are charged as
            ``config.stage`` (kind "train" 3× forward, "eval" 1×) at every checkpoint (the increase since the last
            charge, so resuming never charges a step twice) and at the end. Compute a killed run spent after its
            last checkpoint is not charged: those steps are redone and charged by the resumed run.
        resume: continue from ``out_dir``'s checkpoint (if there is none, start afresh). Without it, an existing
            checkpoint is an error, so runs are never overwritten by accident.
        force: passed to ``ledger.check``: run even over budget.
        on_step: optional ``callable(step)`` called after each step is finished (and checkpointed if due) —
            e.g. to simulate a crash in tests.

    Returns:
        summary dict: steps, epochs, last/best validation loss and step, stopped_early, train/eval/total FLOPs
        (charged convention), planned FLOPs, trainable parameters, seconds; also written to ``summary.json``.

    Raises:
        ValueError: bad config, chunks of the wrong width, too few chunks for a batch, no trainable parameters, or
            a checkpoint whose fixed settings or data differ from this run's.
        FileExistsError: ``out_dir`` has a checkpoint and ``resume`` is False.
        experiments.budget.BudgetExceededError: the planned run does not fit the budget (and not ``force``).
    """
    config.validate()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(config.device)
    if train_chunks.input_ids.shape[1] != config.context_length:
        raise ValueError(f"training chunks have width {train_chunks.input_ids.shape[1]}, "
                         f"config.context_length is {config.context_length}")
    M, B = len(train_chunks), config.batch_size
    if M < B:
        raise ValueError(f"{M} training chunks cannot fill a batch of {B}")
    named = _trainable(model)
    if not named:
        raise ValueError("model has no trainable parameters (call lora.apply_lora first)")
    params = [p for _, p in named]
    model.to(device)

    val = None
    if val_chunks is not None and len(val_chunks):
        if val_chunks.input_ids.shape[1] != config.context_length:
            raise ValueError(f"validation chunks have width {val_chunks.input_ids.shape[1]}, "
                             f"config.context_length is {config.context_length}")
        idx = validation_subset(len(val_chunks), config.eval_batches * B, config.seed)
        val = Chunks(val_chunks.input_ids[idx], val_chunks.attention_mask[idx])
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=tuple(config.betas), eps=config.eps,
                                  weight_decay=config.weight_decay)
    data_ids = {"train": fingerprint(train_chunks), "val": fingerprint(val) if val is not None else None}
    log_path = out_dir / "log.jsonl"

    # ---- fresh start or resume
    st = {"step": 0, "epoch": 0, "position": 0, "train_flops": 0, "eval_flops": 0, "charged_train": 0,
          "charged_eval": 0, "best_val_loss": None, "best_step": None, "evals_since_best": 0, "last_val_loss": None,
          "stopped_early": False}
    best: dict[str, torch.Tensor] | None = None
    ckpt = find_checkpoint(out_dir)
    if ckpt is not None and not resume:
        raise FileExistsError(f"{out_dir} already holds a training checkpoint; pass resume=True (--resume) to "
                              "continue it, or choose another output directory")
    if resume and ckpt is not None:
        saved = json.loads((ckpt / "state.json").read_text())
        changed = [f"{k}: checkpoint {saved['config'][k]!r} vs now {config.to_dict()[k]!r}"
                   for k in TrainConfig.RESUME_FIXED if saved["config"][k] != config.to_dict()[k]]
        if changed:
            raise ValueError(f"{ckpt}: cannot resume with different settings: " + "; ".join(changed))
        if saved["data"] != data_ids:
            raise ValueError(f"{ckpt}: the training/validation chunks differ from the checkpoint's "
                             f"({saved['data']} vs {data_ids})")
        load_lora_state_dict(model, load_file(str(ckpt / "adapter.safetensors")), source=str(ckpt))
        _load_optimizer_tensors(optimizer, load_file(str(ckpt / "optimizer.safetensors")))
        if (ckpt / "best_adapter.safetensors").is_file():
            best = load_file(str(ckpt / "best_adapter.safetensors"))
        _set_rng_state(load_file(str(ckpt / "rng.safetensors")), saved["rng"])
        st.update({k: saved[k] for k in st})
        _truncate_log(log_path, st["step"])
        print(f"resuming {out_dir} from step {st['step']} (epoch {st['epoch']}, position {st['position']})",
              file=sys.stderr)
    else:
        random.seed(config.seed)
        np.random.seed(config.seed)
        torch.manual_seed(config.seed)
        log_path.write_text("")

    # ---- budget check on what is left to do
    eval_every = config.eval_every
    rank, targets = (lora_settings(model)["rank"], lora_settings(model)["targets"]) if lora_modules(model) else (0, ())
    planned = planned_flops(model.config, config, len(val) if val is not None else 0, st["step"], rank,
                            targets or ("q_proj", "v_proj"))
    if ledger is not None:
        ledger.check(planned, force=force)

    # ---- helpers bound to this run
    def evaluate() -> float:
        loss, fwd = validation_loss(model, val, B, device, config.dtype)
        st["eval_flops"] += fwd
        st["last_val_loss"] = loss
        if st["best_val_loss"] is None or loss < st["best_val_loss"]:
            st["best_val_loss"], st["best_step"], st["evals_since_best"] = loss, st["step"], 0
            nonlocal best
            best = lora_state_dict(model)
        else:
            st["evals_since_best"] += 1
        log({"kind": "eval", "step": st["step"], "val_loss": loss})
        return loss

    def log(entry: dict) -> None:
        entry["flops_so_far"] = st["train_flops"] + st["eval_flops"]
        with open(log_path, "a") as f:
            f.write(json.dumps(entry) + "\n")

    def charge() -> None:
        if ledger is None:
            return
        details = {"run": str(out_dir), "step": st["step"]}
        for kind, key in (("train", "train"), ("eval", "eval")):
            delta = st[f"{key}_flops"] - st[f"charged_{key}"]
            if delta > 0:
                ledger.charge(config.stage, delta, kind, **details)
                st[f"charged_{key}"] += delta

    def checkpoint() -> None:
        charge()  # first: a crash right after charging can only make the resumed run charge redone work again
        write_checkpoint(out_dir, model, optimizer, {**st, "config": config.to_dict(), "data": data_ids}, best)

    # ---- loop
    t0 = time.time()
    if val is not None and st["step"] == 0 and config.eval_at_start:
        evaluate()
    bar = tqdm(total=config.max_steps, initial=st["step"], disable=not config.progress, desc=config.stage,
               dynamic_ncols=True)
    model.train()
    perm, perm_epoch = None, None
    while st["step"] < config.max_steps and not st["stopped_early"]:
        if st["position"] + B > M:  # drop the incomplete last batch: every step has the same shape
            st["epoch"], st["position"] = st["epoch"] + 1, 0
        if perm_epoch != st["epoch"]:
            perm, perm_epoch = epoch_permutation(M, config.seed, st["epoch"]), st["epoch"]
        idx = perm[st["position"]:st["position"] + B]
        st["position"] += B
        ids = train_chunks.input_ids[idx].to(device)
        mask = train_chunks.attention_mask[idx].to(device)

        optimizer.zero_grad(set_to_none=True)
        with torch.enable_grad():  # even if the caller disabled autograd globally
            with FlopCounter() as fc, autocast_context(device, config.dtype):
                loss_sum, n = next_token_loss(model, ids, mask)
            loss = loss_sum / max(n, 1)
            loss.backward()
        if config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        st["step"] += 1
        st["train_flops"] += 3 * fc.total
        loss_value = float(loss.detach())
        log({"kind": "train", "step": st["step"], "loss": loss_value, "lr": config.lr, "tokens": n})

        last = st["step"] == config.max_steps
        if val is not None and ((eval_every and st["step"] % eval_every == 0) or last):
            evaluate()
            if config.early_stop_patience and st["evals_since_best"] >= config.early_stop_patience:
                st["stopped_early"] = True
        if st["step"] % config.checkpoint_every == 0 or last or st["stopped_early"]:
            checkpoint()
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}", flops=f"{st['train_flops'] + st['eval_flops']:.3g}")
        if on_step is not None:
            on_step(st["step"])
        model.train()
    bar.close()
    model.eval()
    charge()  # anything not yet charged (e.g. max_steps already reached at resume)

    # ---- outputs
    save_adapter(model, out_dir / "adapter")
    if best is not None:
        save_adapter(model, out_dir / "best_adapter", state=best)
        if config.restore_best:
            load_lora_state_dict(model, best, source="best validation weights")
    summary = {
        "stage": config.stage,
        "steps": st["step"],
        "epochs": st["epoch"] + st["position"] / M,
        "train_chunks": M,
        "val_chunks_evaluated": len(val) if val is not None else 0,
        "last_train_loss": _last_train_loss(log_path),
        "val_loss": st["last_val_loss"],
        "best_val_loss": st["best_val_loss"],
        "best_step": st["best_step"],
        "stopped_early": st["stopped_early"],
        "train_flops": st["train_flops"],
        "eval_flops": st["eval_flops"],
        "total_flops": st["train_flops"] + st["eval_flops"],
        "planned_flops_this_session": planned,
        "trainable_parameters": count_trainable_parameters(model),
        "seconds_this_session": round(time.time() - t0, 2),
        "config": config.to_dict(),
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_loss_curves(log_path, out_dir / "loss_curve.png", title=config.stage)
    return summary


def _last_train_loss(log_path: Path) -> float | None:
    losses = [e["loss"] for e in read_log(log_path) if e["kind"] == "train"]
    return losses[-1] if losses else None


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------

def add_train_args(parser: argparse.ArgumentParser, defaults: TrainConfig | None = None) -> None:
    """Options of :class:`TrainConfig` and LoRA (rank, alpha, targets), shared by training stages' CLIs.

    ``--device``/``--dtype``/``--seed`` are left to the caller (``experiments.common`` defines them for stages).
    """
    d = defaults or TrainConfig()
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank (default 4)")
    parser.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: = rank, scale 1)")
    parser.add_argument("--targets", default="q_proj,v_proj", help="comma-separated projections (default q_proj,v_proj)")
    parser.add_argument("--lr", type=float, default=d.lr, help=f"AdamW learning rate (default {d.lr:g})")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help=f"chunks per step (default {d.batch_size})")
    parser.add_argument("--context-length", type=int, default=d.context_length, help=f"tokens per chunk (default {d.context_length})")
    parser.add_argument("--stride", type=int, default=d.stride, help="chunk stride (default: = context length)")
    parser.add_argument("--max-steps", type=int, default=d.max_steps, help=f"optimizer steps (default {d.max_steps})")
    parser.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay (default 0)")
    parser.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help=f"clip the gradient norm to this (default {d.max_grad_norm}; 0 = off)")
    parser.add_argument("--eval-every", type=int, default=d.eval_every, help=f"steps between validation losses "
                        f"(default {d.eval_every}; 0 = only at start and end)")
    parser.add_argument("--eval-batches", type=int, default=d.eval_batches,
                        help=f"validation subset = this many batches (default {d.eval_batches}; 0 = all)")
    parser.add_argument("--no-eval-at-start", action="store_true", help="skip the step-0 validation loss")
    parser.add_argument("--early-stop", type=int, default=d.early_stop_patience,
                        help="stop after this many evaluations without improvement (default 0 = off)")
    parser.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help=f"steps between checkpoints (default {d.checkpoint_every})")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace, stage: str, device: str, seed: int) -> TrainConfig:
    """A :class:`TrainConfig` from options added by :func:`add_train_args` (+ the caller's device/dtype/seed)."""
    dtype = getattr(args, "dtype", None) or "auto"
    return TrainConfig(
        stage=stage, lr=args.lr, batch_size=args.batch_size, context_length=args.context_length, stride=args.stride,
        max_steps=args.max_steps, weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm or None,
        eval_every=args.eval_every, eval_batches=args.eval_batches, eval_at_start=not args.no_eval_at_start,
        early_stop_patience=args.early_stop, checkpoint_every=args.checkpoint_every, seed=seed, device=device,
        dtype=dtype, progress=not args.no_progress,
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="HF-layout model directory (or Hub id)")
    parser.add_argument("--train-chunks", required=True, help="safetensors file from save_chunks")
    parser.add_argument("--val-chunks", default=None, help="safetensors file from save_chunks (optional)")
    parser.add_argument("--out", required=True, type=Path, help="run directory")
    parser.add_argument("--stage", default="train", help="ledger stage name (default 'train')")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="auto = bf16 autocast on CUDA, float32 on CPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ledger", default=None, help="FLOP ledger (default: $MINIQWEN_LEDGER or "
                                                       "runs/flops_ledger.jsonl)")
    parser.add_argument("--no-ledger", action="store_true", help="charge nothing (tiny test models only)")
    parser.add_argument("--force", action="store_true", help="run even if over the FLOP budget")
    parser.add_argument("--kill-after-step", type=int, default=None,
                        help="testing aid: SIGKILL this process right after step K (simulates a crash)")
    add_train_args(parser)
    args = parser.parse_args(argv)

    from miniqwen import load_pretrained

    config = config_from_args(args, args.stage, args.device, args.seed)
    model, _ = load_pretrained(args.model, dtype="float32", device=args.device)
    torch.manual_seed(args.seed)  # LoRA init (overwritten by the checkpoint when resuming)
    apply_lora(model, args.rank, args.alpha, tuple(t for t in args.targets.split(",") if t))
    train_chunks = load_chunks(args.train_chunks)
    val_chunks = load_chunks(args.val_chunks) if args.val_chunks else None
    ledger = None
    if not args.no_ledger:
        ledger = Ledger(args.ledger)

    on_step = None
    if args.kill_after_step is not None:
        def on_step(step: int) -> None:
            if step == args.kill_after_step:
                os.kill(os.getpid(), signal.SIGKILL)

    summary = train(model, train_chunks, val_chunks, config, args.out, ledger=ledger, resume=args.resume,
                    force=args.force, on_step=on_step)
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
