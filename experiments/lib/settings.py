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


def _check_choices(settings) -> None:
    """Refuse (OptionError) a field of the dataclass ``settings`` outside the ``choices`` its option declares
    (:func:`option`): the command line and the Python API check the same list."""
    for f in dataclasses.fields(settings):
        if f.metadata.get("choices"):
            _choice(f.name, getattr(settings, f.name), f.metadata["choices"])


def option(default, help: str, *, type=None, choices=None, flag: str | None = None, action: str | None = None,
           none: bool = False):
    """A settings field and its command-line option, declared once (:func:`experiments.lib.cli.parser` reads them).

    Args:
        default: the field's default (a stage may give its own: ``defaults.DEFAULTS``).
        help: the option's help; ``{default}`` is replaced by the stage's default.
        type: argparse's ``type`` (None: the text as given). ``none``: "none" / "all" also read as None (unset).
        choices: the values allowed. flag: the spelling, if not ``--field-name``.
        action: "store_true" (a flag), "bool" (``--x`` / ``--no-x``), "store_false" (a ``--no-…`` flag clearing a
            field that defaults to True), "names" (a comma-separated list of names, read as a tuple).
    """
    return dataclasses.field(default=default, metadata={"help": help, "type": type, "choices": choices,
                                                        "flag": flag, "action": action, "none": none})


# ---------------------------------------------------------------------------------------------------------------
# The settings
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class RunSettings:
    """What a run runs on and where it writes (each field's ``help`` says what it is). ``device`` None or "auto" is
    resolved by ``miniqwen.device.resolve_device``; ``precision`` is the dtype the weights are held in and training
    autocasts to (float16 with a gradient scaler; ``miniqwen.device`` explains the fallback to float32). ``seed``
    seeds Python, NumPy and torch, the data order, LoRA's initialisation and sampling."""

    model: str = option(DEFAULT_MODEL, f"HF-layout model directory or Hub repo id (default: ${MODEL_ENV_VAR} or "
                        "{default})")
    device: str | None = option(None, "auto, cpu, cuda, cuda:N or mps (Apple silicon) (default: auto = cuda if "
                                "available, else mps if available, else cpu)")
    precision: str = option("auto", "compute dtype; auto = bf16 on CUDA GPUs of compute capability >= 8.0 and on CPUs "
                            "with native bf16, float16 on older CUDA GPUs (T4, V100) and on Apple silicon, else "
                            "float32; should float16 overflow, use float32", choices=PRECISIONS)
    seed: int = option(0, "random seed (default {default})", type=int)
    out: str | None = option(None, "output directory (default: runs/<stage>)")
    ledger: str | None = option(None, "FLOP ledger file (default: $MINIQWEN_LEDGER or runs/flops_ledger.jsonl)")
    force: bool = option(False, "run even if the FLOP budget would be exceeded", action="store_true")
    resume: bool = option(False, "continue the run already in --out", action="store_true")
    overwrite: bool = option(False, "replace the results already in --out", action="store_true")

    def validate(self) -> None:
        _check_choices(self)
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
    """Where the data is and how it becomes LLMTIME text (Gruver et al. 2023, section 3). ``encoding`` "integer"
    takes 7.2 instead of 10.0 tokens per step at 2 decimals (``data.llmtime.encode``); ``scaling`` "series" fits
    ``data.llmtime.fit_series_scale`` on a training trajectory's first :data:`SERIES_FIT_STEPS` steps and on a
    prompt's context. Both are recorded only when not the default (:func:`as_record`), so records made before the
    options existed still match."""

    data: str | None = option(None, "Lotka-Volterra HDF5 file (default: $MINIQWEN_DATA, data/lotka_volterra_data.h5 or "
                              "../shared/data/lotka_volterra_data.h5)")
    decimals: int = option(2, "decimals per value (default {default})", type=int)
    scale_quantile: float = option(0.99, "LLMTIME scale = this quantile of the training values / --scale-target "
                                   "(default {default})", type=float)
    scale_target: float = option(10.0, "value the quantile maps to (default {default:g})", type=float)
    encoding: str = option("decimal", "how values are written: decimal (1.23,0.05) or integer (123,5: no decimal "
                           "point, no leading zeros, as in LLMTIME; fewer tokens per step) (default {default})",
                           choices=ENCODINGS)
    scaling: str = option("dataset", "dataset: one LLMTIME scale fitted on the training split; series: an offset and a "
                          "scale per species fitted on each trajectory's own context (LLMTIME's per-series scaling) "
                          "(default {default})", choices=SCALINGS)

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
        _check_choices(self)


@dataclass
class ForecastSettings:
    """Which trajectories are forecast and how (``samples`` N > 1: the element-wise median of N samples)."""

    split: str = option("validation", "trajectories to forecast (default {default})", choices=SPLITS)
    limit: int | None = option(None, "forecast the first N trajectories of the split (default: all)", type=int,
                               none=True)
    context_steps: int = option(80, "observed time steps in the prompt (default {default})", type=int)
    horizon: int = option(20, "time steps to forecast (default {default})", type=int)
    prompt: str = option("raw", "raw LLMTIME continuation or a Qwen chat instruction (default {default})",
                         choices=("raw", "chat"))
    samples: int = option(1, "1 = greedy (default); N = median of N samples", type=int)
    temperature: float = option(0.7, "sampling temperature (--samples > 1)", type=float)
    top_p: float = option(0.9, "nucleus mass (--samples > 1)", type=float)
    gen_batch_size: int = option(8, "prompts per generation batch (default {default})", type=int)
    plots: int = option(4, "forecasts drawn per PNG (default {default})", type=int)

    def validate(self) -> None:
        _check_choices(self)
        _int("limit", self.limit, 1, optional=True)
        _int("context_steps", self.context_steps, 1)
        _int("horizon", self.horizon, 1)
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

    rank: int = option(4, "LoRA rank (default {default})", type=int)
    lora_alpha: float | None = option(None, "LoRA scaling numerator; the update is scaled by lora_alpha/rank "
                                      "(default: = rank)", type=float)
    targets: tuple[str, ...] = option(DEFAULT_LORA_TARGETS, "comma-separated projections (default {default})",
                                      action="names")
    head_bias: bool = option(False, "also train a bias on the output head (lm_head), zero at start: + vocab_size "
                             "parameters and 1 FLOP per logit; saved with the adapter (default {default})",
                             action="bool")

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
    """Optimisation of one training run (defaults: the coursework's LoRA defaults; AdamW's ``betas`` and ``eps``
    have no option). Notes beside the fields' ``help``:

    - ``lr_schedule``, ``warmup_steps``: :meth:`learning_rate`; recorded only when not the default (:func:`as_record`).
    - ``eval_batches``: the validation subset, ``eval_batches · batch_size`` chunks drawn once with the seed.
    - ``select_by``: what "best" means for early stopping and ``restore_best``: the validation loss, or the
      validation forecast score a stage computes at every evaluation (e.g. ``halving.forecast_scorer``; both are
      logged when the stage gives a scorer). A run may be resumed with another ``select_by`` (:attr:`RESELECTABLE`):
      the best so far is then forgotten and the selection starts at the resumed step.
    - ``loss_vocabulary`` "numeric": softmax over the numeric alphabet only, a different objective that also skips
      most of the output head; the validation loss stays the full-vocabulary one, so runs stay comparable.
    - ``compile``: TorchInductor, mostly for CUDA (on CPU it needs a C++ compiler and takes minutes for the 0.5B
      model); the counted FLOPs are the same, as dynamo replays the modules' counting on every call.
    """

    lr: float = option(1e-5, "AdamW learning rate (default {default:g})", type=float)
    batch_size: int = option(4, "chunks per step (default {default})", type=int)
    context_length: int = option(512, "tokens per training chunk (default {default})", type=int)
    stride: int | None = option(None, "offset between chunk starts (default: = context length)", type=int, none=True)
    max_steps: int = option(10_000, "optimizer steps (default {default})", type=int)
    train_limit: int | None = option(None, "use only the first N training trajectories (default: all)", type=int,
                                     none=True)
    weight_decay: float = option(0.0, "AdamW weight decay (default {default:g})", type=float)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: float | None = option(1.0, "clip the gradient norm to this (default {default}; none = no "
                                         "clipping)", type=float, none=True)
    eval_every: int = option(500, "steps between validation losses (default {default}; 0 = start and end only)",
                             type=int)
    eval_batches: int = option(8, "validation subset = this many batches (default {default}; 0 = all)", type=int)
    eval_at_start: bool = option(True, "skip the step-0 validation loss", flag="--no-eval-at-start",
                                 action="store_false")
    early_stop_patience: int = option(0, "stop after this many evaluations without improvement (default "
                                      "{default}; 0 = off)", type=int, flag="--early-stop")
    restore_best: bool = option(False, "end with the best-validation adapter (default {default})", action="bool")
    select_by: str = option("loss", "best adapter (early stopping, --restore-best) by validation loss, or by "
                            "validation forecast error where the stage scores forecasts (default {default})",
                            choices=("loss", "forecast"))
    checkpoint_every: int = option(500, "steps between checkpoints, each charging the ledger (default {default})",
                                   type=int)
    loss_vocabulary: str = option("full", "training loss over the full vocabulary (the coursework's) or only the "
                                  "numeric alphabet (a different, cheaper objective; default {default})",
                                  choices=("full", "numeric"))
    compile: bool = option(False, "torch.compile the training forward/backward (default {default}; for CUDA)",
                           action="bool")
    progress: bool = option(True, "no progress bar", flag="--no-progress", action="store_false")
    lr_schedule: str = option("constant", "constant, or cosine: decay from --lr to 0 at --max-steps (SGDR without "
                              "restarts; a resume must keep --max-steps) (default {default})", choices=LR_SCHEDULES)
    warmup_steps: int = option(0, "linear warm-up of the learning rate over the first N steps (default {default})",
                               type=int)

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
        _check_choices(self)
        _int("warmup_steps", self.warmup_steps, 0)
        if self.lr_schedule == "cosine" and self.warmup_steps >= self.max_steps:
            raise OptionError("warmup_steps", self.warmup_steps,
                              f"must be below max_steps ({self.max_steps}) with the cosine schedule, which decays "
                              "over the steps after the warm-up")
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

    loss_limit: int | None = option(None, "validation trajectories for the token loss (default: all; 0 = skip)",
                                    type=int, none=True)
    loss_context_length: int = option(512, "tokens per validation-loss chunk (default {default})", type=int)
    loss_batch_size: int = option(4, "chunks per validation-loss batch (default {default})", type=int)

    def validate(self) -> None:
        _int("loss_limit", self.loss_limit, 0, optional=True)
        _int("loss_context_length", self.loss_context_length, 2)
        _int("loss_batch_size", self.loss_batch_size, 1)


GROUPS = {"run": RunSettings, "data": DataSettings, "forecast": ForecastSettings, "lora": LoRASettings,
          "train": TrainSettings, "loss": LossSettings}
#: each group's title in ``--help``
TITLES = {"run": "run", "data": "data", "forecast": "forecasting", "lora": "LoRA", "train": "training",
          "loss": "validation loss"}

#: fields added after records existed, recorded only when they differ from these values (:func:`as_record`): the
#: record (and study key) of a run that does not use them equals the one made before they existed; a reader of a
#: record takes a missing field as this value
RECORDED_UNLESS = {DataSettings: {"scaling": "dataset"}, LoRASettings: {"head_bias": False},
                   TrainSettings: {"lr_schedule": "constant", "warmup_steps": 0}}


def as_record(**settings) -> dict:
    """``{group: {field: value}}`` of settings dataclasses, JSON-ready, for results (no machine paths: file
    options are recorded by their file name only, a model directory too, but a Hub id as given). Fields added after
    records existed are left out at their defaults (:data:`RECORDED_UNLESS`, and ``encoding`` "decimal"), so such a
    run's record equals the one made before; readers take a missing field as its default."""
    out = {}
    for group, s in settings.items():
        d = dataclasses.asdict(s)
        if isinstance(s, DataSettings) and s.encoding == "decimal":
            del d["encoding"]  # the default, left out: keys and records made before --encoding existed still match
        for key, value in RECORDED_UNLESS.get(type(s), {}).items():
            if d[key] == value and type(d[key]) is type(value):
                del d[key]  # likewise
        for key in ("model", "data", "out", "ledger"):  # a path by its name (also one not made yet); a Hub id kept
            if d.get(key) and os.sep in str(d[key]) and (key != "model" or Path(str(d[key])).exists()):
                d[key] = Path(str(d[key])).name
        out[group] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}
    return out
