"""Settings of every stage as small dataclasses, each validating its own fields (:class:`OptionError`).

The command line that fills them lives in :mod:`experiments.lib.cli`; this module is a leaf of the library (it
imports no other part of it but :mod:`experiments.lib.errors`). Library
functions take the dataclasses (or plain values), never an ``argparse.Namespace``, so a sweep can call them in a
loop. Every field a run depends on is recorded in its results (:func:`as_record`).

Names: ``llmtime_scale`` is the LLMTIME scale α (data units per text unit); ``lora_alpha`` is LoRA's scaling
numerator; ``precision`` is the compute dtype (weights and autocast), one name for one meaning.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path

from data import ENCODINGS, SCALINGS
from lora import DEFAULT_LORA_TARGETS
from miniqwen.config import PROJECTIONS
from miniqwen.loading import DEFAULT_MODEL

from .errors import OptionError, UsageError

MODEL_ENV_VAR = "MINIQWEN_MODEL"
PRECISIONS = ("auto", "float32", "bfloat16", "float16")
SPLITS = ("train", "validation", "test")
LR_SCHEDULES = ("constant", "cosine")
#: the largest seed NumPy accepts (``np.random.seed`` takes 32-bit seeds)
MAX_SEED = 2**32 - 1
#: the largest LoRA update scale lora_alpha / rank accepted: published LoRA runs use 0.5-4 (alpha = r to 2r, or
#: rsLoRA's sqrt(r)); far above this the scaled gradients overflow float32 — the gradient norm becomes inf, clipping
#: multiplies every gradient by max_norm / inf = 0, and the "trained" adapter is the untrained one, silently
MAX_LORA_SCALE = 1e4


# ---------------------------------------------------------------------------------------------------------------
# Checks shared by the dataclasses
# ---------------------------------------------------------------------------------------------------------------

#: digits of a scaled value (integer part of --scale-target + --decimals): more, and a step's text outgrows a context
MAX_VALUE_DIGITS = 12


def _int(name: str, value, minimum: int, optional: bool = False) -> None:
    if optional and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise OptionError(name, value, f"must be an integer >= {minimum}" + (" (or unset)" if optional else ""))


def _float(name: str, value, low: float, high: float = math.inf, low_open: bool = False,
           high_open: bool = False, optional: bool = False) -> None:
    if optional and value is None:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        lo = f"{'>' if low_open else '>='} {low:g}"
        hi = "" if high == math.inf else f" and {'<' if high_open else '<='} {high:g}"
        raise OptionError(name, value, f"must be a finite number {lo}{hi}")


def _choice(name: str, value, choices) -> None:
    if value not in choices:
        raise OptionError(name, value, f"must be one of {', '.join(map(str, choices))}")


# ---------------------------------------------------------------------------------------------------------------
# The settings
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class RunSettings:
    """What a run runs on and where it writes.

    Attributes:
        model: HF-layout model directory or Hub repo id.
        device: "auto", "cpu", "cuda", "cuda:N" or "mps" (Apple silicon); None or "auto" = cuda if available, else
            mps if available, else cpu (``miniqwen.device.resolve_device``).
        precision: compute dtype — "auto" (bf16 on CUDA GPUs of compute capability >= 8.0 and on CPUs with native
            bf16 matmuls; float16 on older CUDA GPUs such as the T4 and V100 and on MPS; else float32), "float32",
            "bfloat16" or "float16". Weights are held in it; training also autocasts to it (float16 with a gradient
            scaler). Should float16 overflow, float32 is the fallback (``miniqwen.device`` explains).
        seed: seeds Python, NumPy and torch, the data order, LoRA's initialisation and sampling.
        out: output directory (None = ``runs/<stage>``).
        ledger: FLOP ledger file (None = ``$MINIQWEN_LEDGER`` or ``runs/flops_ledger.jsonl``).
        force: run even if the FLOP budget would be exceeded.
        resume: continue the run in ``out``; overwrite: replace the results already in ``out``.
    """

    model: str = DEFAULT_MODEL
    device: str | None = None
    precision: str = "auto"
    seed: int = 0
    out: str | None = None
    ledger: str | None = None
    force: bool = False
    resume: bool = False
    overwrite: bool = False

    def validate(self) -> None:
        _choice("precision", self.precision, PRECISIONS)
        _int("seed", self.seed, 0)
        if self.seed > MAX_SEED:  # NumPy's seeds are 32-bit: a larger one fails only when the run seeds NumPy
            raise OptionError("seed", self.seed, f"must be an integer between 0 and {MAX_SEED} (2**32 - 1)")
        from miniqwen import device as devices

        if self.device not in (None, "auto"):
            import torch

            kinds = "must be auto, cpu, cuda, cuda:N or mps"
            try:
                device = torch.device(self.device)
            except (RuntimeError, ValueError):
                raise OptionError("device", self.device, kinds) from None
            if device.type not in ("cpu", "cuda", "mps"):
                raise OptionError("device", self.device, kinds)
            if device.type == "cuda" and not torch.cuda.is_available():
                raise OptionError("device", self.device, "CUDA is not available on this machine (use auto or cpu)")
            if device.type == "mps" and not devices.mps_available():
                raise OptionError("device", self.device,
                                  "MPS (Apple silicon's GPU) is not available on this machine (use auto or cpu)")
        if self.precision == "bfloat16":
            why = devices.unsupported_precision(devices.resolve_device(self.device), self.precision)
            if why:
                raise OptionError("precision", self.precision, why)
        if self.resume and self.overwrite:
            raise UsageError("--resume and --overwrite cannot be used together")


#: steps of a training trajectory its "series" scaling is fitted on: the forecast context (80 of the coursework's 100)
SERIES_FIT_STEPS = 80


@dataclass
class DataSettings:
    """Where the data is and how it becomes LLMTIME text.

    Attributes:
        data: the HDF5 file (None = ``$MINIQWEN_DATA``, ``data/lotka_volterra_data.h5`` or
            ``../shared/data/lotka_volterra_data.h5``).
        decimals: decimals per value in the text.
        scale_quantile, scale_target: LLMTIME scale = ``scale_quantile`` quantile of the training values /
            ``scale_target`` (Gruver et al. 2023, section 3).
        encoding: "decimal" (``1.23,0.05``) or "integer" (``123,5``: the same digits without the point and leading
            zeros, LLMTIME's own encoding; 7.2 instead of 10.0 tokens per step at 2 decimals), see
            ``data.llmtime.encode``. Recorded only when not "decimal" (:func:`as_record`), so records made before
            the option existed still match.
        scaling: "dataset" (one scale α fitted on the training split) or "series" (an offset and a scale per
            species fitted on each trajectory's own context, ``data.llmtime.fit_series_scale``: on its first
            :data:`SERIES_FIT_STEPS` steps for training text, on the forecast's context for a prompt). Recorded
            only when not "dataset".
    """

    data: str | None = None
    decimals: int = 2
    scale_quantile: float = 0.99
    scale_target: float = 10.0
    encoding: str = "decimal"
    scaling: str = "dataset"

    def validate(self) -> None:
        _int("decimals", self.decimals, 0)
        if self.decimals > 8:
            raise OptionError("decimals", self.decimals, "must be between 0 and 8")
        _float("scale_quantile", self.scale_quantile, 0.0, 1.0, low_open=True)
        _float("scale_target", self.scale_target, 0.0, low_open=True)
        if len(str(int(self.scale_target))) + self.decimals > MAX_VALUE_DIGITS:
            raise OptionError("scale_target", self.scale_target,
                              f"writes values of more than {MAX_VALUE_DIGITS} digits at --decimals {self.decimals} "
                              f"(a step would fill a context): must be < 1e{MAX_VALUE_DIGITS - self.decimals}")
        _choice("encoding", self.encoding, ENCODINGS)
        _choice("scaling", self.scaling, SCALINGS)


@dataclass
class ForecastSettings:
    """Which trajectories are forecast and how.

    Attributes:
        split: "train", "validation" or "test"; limit: the first this-many trajectories of it (None = all).
        context_steps: observed time steps in the prompt; horizon: time steps forecast after them.
        prompt: "raw" (LLMTIME continuation) or "chat" (an instruction in Qwen's chat format).
        samples: 1 = greedy; N > 1 = element-wise median of N samples at ``temperature`` / ``top_p``.
        gen_batch_size: prompts per generation batch. plots: forecasts drawn per PNG (0 = none).
    """

    split: str = "validation"
    limit: int | None = None
    context_steps: int = 80
    horizon: int = 20
    prompt: str = "raw"
    samples: int = 1
    temperature: float = 0.7
    top_p: float = 0.9
    gen_batch_size: int = 8
    plots: int = 4

    def validate(self) -> None:
        _choice("split", self.split, SPLITS)
        _int("limit", self.limit, 1, optional=True)
        _int("context_steps", self.context_steps, 1)
        _int("horizon", self.horizon, 1)
        _choice("prompt", self.prompt, ("raw", "chat"))
        _int("samples", self.samples, 1)
        _int("gen_batch_size", self.gen_batch_size, 1)
        _int("plots", self.plots, 0)
        _float("temperature", self.temperature, 0.0, low_open=True)
        _float("top_p", self.top_p, 0.0, 1.0, low_open=True)


@dataclass
class LoRASettings:
    """The adapter (Hu et al. 2021): ``rank`` r, ``lora_alpha`` (update scaled by lora_alpha / r; None = r, scale 1)
    and the projections it wraps in every decoder layer (``targets``).

    ``head_bias``: also train a bias on the output head, zero at start (``lora.head_bias``; the HF Qwen2 head has
    none; published peer runs of the coursework trained one): + vocab_size trainable parameters (151,936 for
    Qwen2.5-0.5B) and + 1 FLOP per computed logit (V per position, K with the numeric head). Saved with the
    adapter, exported beside the PEFT adapter. Recorded only when True (:func:`as_record`)."""

    rank: int = 4
    lora_alpha: float | None = None
    targets: tuple[str, ...] = DEFAULT_LORA_TARGETS
    head_bias: bool = False

    def validate(self) -> None:
        _int("rank", self.rank, 1)
        if not isinstance(self.head_bias, bool):
            raise OptionError("head_bias", self.head_bias, "must be True or False")
        _float("lora_alpha", self.lora_alpha, 0.0, low_open=True, optional=True)
        if self.lora_alpha is not None and self.lora_alpha / self.rank > MAX_LORA_SCALE:
            raise OptionError("lora_alpha", self.lora_alpha,
                              f"the update scale lora_alpha / rank = {self.lora_alpha / self.rank:.3g} is above "
                              f"{MAX_LORA_SCALE:g}, where float32 gradients overflow and clipping zeroes them (LoRA "
                              "runs use alpha between r and 2r)")
        if not self.targets or any(t not in PROJECTIONS for t in self.targets) or len(set(self.targets)) != len(
                self.targets):
            raise OptionError("targets", ",".join(self.targets),
                              f"must be distinct names among {', '.join(PROJECTIONS)}")


@dataclass
class TrainSettings:
    """Optimisation of one training run (defaults: the coursework's LoRA defaults).

    Attributes:
        lr: AdamW learning rate (the peak of the schedule). batch_size: chunks per step. context_length: tokens
            per chunk.
        lr_schedule, warmup_steps: the learning rate of each step, :meth:`learning_rate`: "constant" (the default)
            or "cosine" (decay to 0 at ``max_steps``), after a linear warm-up over the first ``warmup_steps`` steps
            (0 = none). Both are recorded only when not the default (:func:`as_record`).
        stride: offset between chunk starts (None = context_length, no overlap).
        max_steps: optimizer steps in total. train_limit: use only the first N training trajectories (None = all).
        weight_decay, betas, eps: AdamW's. max_grad_norm: clip the gradient norm to this (None = no clipping).
        eval_every: validation loss every this many steps (0 = only at the start and the end); eval_batches:
            validation subset of ``eval_batches · batch_size`` chunks drawn once with the seed (0 = all chunks);
            eval_at_start: evaluate before the first step.
        early_stop_patience: stop after this many evaluations without a new best (0 = off); restore_best: put the
            best-validation weights back into the model at the end.
        select_by: what "best" means for early stopping and ``restore_best``: "loss" (the validation loss) or
            "forecast" (the validation forecast score a stage computes at every evaluation, e.g.
            ``halving.forecast_scorer``; both are logged either way when the stage gives a scorer). A run may be
            resumed with another ``select_by`` (:attr:`RESELECTABLE`, e.g. the final stage continuing a search
            point's run): the best so far is then forgotten and the selection starts at the resumed step.
        checkpoint_every: checkpoint (and charge the ledger) every this many steps and after the last.
        loss_vocabulary: "full" (the coursework's loss: softmax over the whole vocabulary) or "numeric" (softmax
            over the numeric alphabet only: a different objective that also skips most of the output head; the
            validation loss stays the full-vocabulary one, so runs stay comparable).
        compile: run the training forward and backward through ``torch.compile`` (TorchInductor; mostly for CUDA,
            where it fuses the element-wise work; on CPU it needs a C++ compiler, and compiling the 0.5B model takes
            minutes). The counted FLOPs are the same: dynamo replays the modules' counting on every call.
        progress: show a progress bar.
    """

    lr: float = 1e-5
    batch_size: int = 4
    context_length: int = 512
    stride: int | None = None
    max_steps: int = 10_000
    train_limit: int | None = None
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    eval_every: int = 500
    eval_batches: int = 8
    eval_at_start: bool = True
    early_stop_patience: int = 0
    restore_best: bool = False
    select_by: str = "loss"
    checkpoint_every: int = 500
    loss_vocabulary: str = "full"
    compile: bool = False
    progress: bool = True
    lr_schedule: str = "constant"
    warmup_steps: int = 0

    #: fields that define the optimisation trajectory: a resumed run must use the same values (and, under a
    #: schedule that depends on it, the same ``max_steps``: :attr:`schedule_depends_on_max_steps`)
    RESUME_FIXED = ("lr", "batch_size", "context_length", "stride", "train_limit", "weight_decay", "betas", "eps",
                    "max_grad_norm", "eval_batches", "loss_vocabulary", "select_by", "lr_schedule", "warmup_steps")

    #: of :attr:`RESUME_FIXED`, what a resumed run may change without changing its weights: what "best" means
    #: (the best so far, chosen by the old criterion, is forgotten on such a resume)
    RESELECTABLE = ("select_by",)

    @property
    def schedule_depends_on_max_steps(self) -> bool:
        """True for the cosine schedule: its learning rates depend on ``max_steps``, so a run continued to other
        ``max_steps`` would not equal one trained straight to them (a resume must keep ``max_steps``)."""
        return self.lr_schedule == "cosine"

    def learning_rate(self, step: int) -> float:
        """The learning rate of the optimizer step that follows ``step`` steps already taken (0 <= step <
        ``max_steps``), η = ``lr``, W = ``warmup_steps``, T = ``max_steps``::

            step < W                       η · (step + 1) / W                        linear warm-up
            "constant", step >= W          η
            "cosine",   step >= W          η · ½ · (1 + cos(π · (step − W) / (T − W)))

        The cosine is SGDR's annealing (Loshchilov & Hutter, "SGDR: Stochastic Gradient Descent with Warm
        Restarts", ICLR 2017, eq. 5) with η_min = 0, one cycle of T − W steps and no restarts; it would reach 0 at
        step = T, so the last step taken still has a small positive rate. The warm-up is the gradual warm-up of
        Goyal et al. 2017 ("Accurate, Large Minibatch SGD", section 2.2), counted from 1 so that no step has rate
        0 (transformers' ``get_cosine_schedule_with_warmup`` uses step / W, whose first step has rate 0; after the
        warm-up the two agree). A pure function of the step: a resumed run computes the same rates.
        """
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.lr_schedule == "cosine":
            progress = (step - self.warmup_steps) / (self.max_steps - self.warmup_steps)
            return self.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.lr

    def validate(self) -> None:
        _float("lr", self.lr, 0.0, 1.0, low_open=True)
        _int("batch_size", self.batch_size, 1)
        _int("context_length", self.context_length, 2)
        _int("stride", self.stride, 1, optional=True)
        _int("max_steps", self.max_steps, 1)
        _int("train_limit", self.train_limit, 1, optional=True)
        _float("weight_decay", self.weight_decay, 0.0, 1.0, high_open=True)
        _float("eps", self.eps, 0.0, low_open=True)
        for b in self.betas:
            _float("betas", b, 0.0, 1.0, high_open=True)
        _float("max_grad_norm", self.max_grad_norm, 0.0, low_open=True, optional=True)
        _int("eval_every", self.eval_every, 0)
        _int("eval_batches", self.eval_batches, 0)
        _int("early_stop_patience", self.early_stop_patience, 0)
        _int("checkpoint_every", self.checkpoint_every, 1)
        _choice("loss_vocabulary", self.loss_vocabulary, ("full", "numeric"))
        _choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _int("warmup_steps", self.warmup_steps, 0)
        if self.lr_schedule == "cosine" and self.warmup_steps >= self.max_steps:
            raise OptionError("warmup_steps", self.warmup_steps,
                              f"must be below max_steps ({self.max_steps}) with the cosine schedule, which decays "
                              "over the steps after the warm-up")
        _choice("select_by", self.select_by, ("loss", "forecast"))
        if not isinstance(self.compile, bool):
            raise OptionError("compile", self.compile, "must be True or False")
        if self.early_stop_patience and not self.eval_every:
            raise UsageError(f"--eval-every 0 leaves early stopping (--early-stop {self.early_stop_patience}) without "
                             "the periodic evaluations it needs: set --eval-every > 0, or --early-stop 0 to turn it "
                             "off")


@dataclass
class LossSettings:
    """The token-level validation loss a stage measures besides forecasting: over the first ``loss_limit``
    validation trajectories (None = all, 0 = skip), cut into chunks of ``loss_context_length`` tokens, evaluated
    ``loss_batch_size`` chunks at a time."""

    loss_limit: int | None = None
    loss_context_length: int = 512
    loss_batch_size: int = 4

    def validate(self) -> None:
        _int("loss_limit", self.loss_limit, 0, optional=True)
        _int("loss_context_length", self.loss_context_length, 2)
        _int("loss_batch_size", self.loss_batch_size, 1)


GROUPS = {"run": RunSettings, "data": DataSettings, "forecast": ForecastSettings, "lora": LoRASettings,
          "train": TrainSettings,
          "loss": LossSettings}

#: fields added after records existed, recorded only when they differ from these values (:func:`as_record`): the
#: record (and study key) of a run that does not use them equals the one made before they existed; a reader of a
#: record takes a missing field as this value
RECORDED_UNLESS = {DataSettings: {"scaling": "dataset"}, LoRASettings: {"head_bias": False},
                   TrainSettings: {"lr_schedule": "constant", "warmup_steps": 0}}


def as_record(**settings) -> dict:
    """``{group: {field: value}}`` of settings dataclasses, JSON-ready, for results (no machine paths: file
    options are recorded by their file name only). Fields added after records existed are left out at their
    defaults (:data:`RECORDED_UNLESS`, and ``encoding`` "decimal"), so such a run's record equals the one made
    before; readers take a missing field as its default."""
    out = {}
    for group, s in settings.items():
        d = dataclasses.asdict(s)
        if isinstance(s, DataSettings) and s.encoding == "decimal":
            del d["encoding"]  # the default, left out: keys and records made before --encoding existed still match
        for key, value in RECORDED_UNLESS.get(type(s), {}).items():
            if d[key] == value and type(d[key]) is type(value):
                del d[key]  # likewise
        for key in ("model", "data", "out", "ledger"):
            if d.get(key) and os.sep in str(d[key]) and Path(str(d[key])).exists():
                d[key] = Path(str(d[key])).name
        out[group] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}
    return out
