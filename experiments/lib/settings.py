"""Settings of every stage as small dataclasses, and the only code that touches argparse.

A stage builds its parser from the groups it needs (:func:`parser`), and :func:`parse` turns the command line into
the dataclasses, validating every value before any data is read, any model loaded or any FLOP spent. Library
functions take the dataclasses (or plain values), never an ``argparse.Namespace``, so a sweep can call them in a
loop. Every field a run depends on is recorded in its results (:func:`as_record`).

Names: ``llmtime_scale`` is the LLMTIME scale α (data units per text unit); ``lora_alpha`` is LoRA's scaling
numerator; ``precision`` is the compute dtype (weights and autocast), one name for one meaning.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from data import ENCODINGS, DataError
from miniqwen import ConfigError, WeightsError
from miniqwen.flops import DEFAULT_LORA_TARGETS, LORA_TARGETS
from miniqwen.loading import DEFAULT_MODEL

from .budget import BudgetExceededError, LedgerError

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


class UsageError(ValueError):
    """A bad option value or options that cannot work together; reported as one line, exit status 2."""


class OptionError(UsageError):
    """One field of a settings dataclass holds a value that is not allowed.

    Attributes: ``field`` (the dataclass field name), ``value``, ``allowed`` (what would be accepted). The command
    line names the option that sets the field (:func:`parse`); library callers see the field name.
    """

    def __init__(self, field_name: str, value, allowed: str):
        self.field, self.value, self.allowed = field_name, value, allowed
        super().__init__(f"{field_name}={value!r}: {allowed}")


# ---------------------------------------------------------------------------------------------------------------
# Checks shared by the dataclasses
# ---------------------------------------------------------------------------------------------------------------

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
    """

    data: str | None = None
    decimals: int = 2
    scale_quantile: float = 0.99
    scale_target: float = 10.0
    encoding: str = "decimal"

    def validate(self) -> None:
        _int("decimals", self.decimals, 0)
        if self.decimals > 8:
            raise OptionError("decimals", self.decimals, "must be between 0 and 8")
        _float("scale_quantile", self.scale_quantile, 0.0, 1.0, low_open=True)
        _float("scale_target", self.scale_target, 0.0, low_open=True)
        _choice("encoding", self.encoding, ENCODINGS)


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
        if not self.targets or any(t not in LORA_TARGETS for t in self.targets) or len(set(self.targets)) != len(
                self.targets):
            raise OptionError("targets", ",".join(self.targets),
                              f"must be distinct names among {', '.join(LORA_TARGETS)}")


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
            ``halving.forecast_scorer``; both are logged either way when the stage gives a scorer).
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
        _float("weight_decay", self.weight_decay, 0.0)
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
RECORDED_UNLESS = {LoRASettings: {"head_bias": False},
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


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------

def _none_or(kind):
    def convert(text: str):
        return None if text.lower() in ("none", "all", "") else kind(text)
    convert.__name__ = kind.__name__
    return convert


class ArgumentParser(argparse.ArgumentParser):
    """argparse without abbreviations (``--context-len`` is not taken for ``--context-length``: a stage that checks
    which options were given explicitly matches their full spelling) whose errors are a :class:`UsageError`: one
    line "error: …" and exit status 2 through :func:`run_cli`, like every other refusal."""

    def __init__(self, *args, **kwargs):
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def error(self, message):
        raise UsageError(f"{message} (see {self.prog} --help)")


def preset_name(argv, presets: dict | None) -> str | None:
    """The ``--preset NAME`` given in ``argv`` (None if absent or the stage has no presets).

    Raises UsageError if NAME is not one of ``presets``.
    """
    if not presets:
        return None
    pre = ArgumentParser(add_help=False)
    pre.add_argument("--preset", default=None)
    known, _ = pre.parse_known_args(sys.argv[1:] if argv is None else list(argv))
    if known.preset is not None and known.preset not in presets:
        raise UsageError(f"--preset {known.preset!r}: must be one of {', '.join(presets)}")
    return known.preset


def with_preset(defaults: dict, presets: dict | None, name: str | None) -> dict:
    """``defaults`` (``{group: dataclass instance}``) with preset ``name``'s field overrides
    (``presets[name]`` = ``{group: {field: value}}``) applied; options given on the command line still win."""
    out = {group: dataclasses.replace(d) for group, d in defaults.items()}
    for group, fields in ((presets or {}).get(name) or {}).items():
        out[group] = dataclasses.replace(out.get(group) or GROUPS[group](), **fields)
    return out


def parser(prog: str, description: str, *groups: str, defaults: dict | None = None,
           forecast_batch_flag: str = "--batch-size", presets: dict | None = None,
           exclude: tuple[str, ...] = ()) -> argparse.ArgumentParser:
    """An argparse parser with the options of the named setting ``groups`` (keys of :data:`GROUPS`).

    ``defaults`` = ``{group: dataclass instance}`` overrides a group's defaults (e.g. a stage's training
    defaults). ``forecast_batch_flag`` spells :attr:`ForecastSettings.gen_batch_size` (training stages use
    ``--batch-size`` for training, so they call it ``--gen-batch-size``). ``presets`` (``{name: {group: {field:
    value}}}``) adds ``--preset``; the caller passes the preset's defaults in ``defaults`` (:func:`with_preset`).
    ``exclude`` leaves out options of these field names (a grid sets ``lr`` and ``rank`` itself).
    """
    d = {name: (defaults or {}).get(name) or cls() for name, cls in GROUPS.items()}
    p = ArgumentParser(prog=prog, description=description)
    if presets:
        p.add_argument("--preset", choices=list(presets), default=None,
                       help="scaled-down defaults: " + "; ".join(
                           f"{name}: " + ", ".join(f"{k}={v}" for fields in groups_.values()
                                                   for k, v in fields.items())
                           for name, groups_ in presets.items()) + " (options given explicitly still win)")
    r, dt, f, lo, t, ls = d["run"], d["data"], d["forecast"], d["lora"], d["train"], d["loss"]
    if "run" in groups:
        g = p.add_argument_group("run")
        g.add_argument("--model", default=os.environ.get(MODEL_ENV_VAR, r.model),
                       help=f"HF-layout model directory or Hub repo id (default: ${MODEL_ENV_VAR} or {r.model})")
        g.add_argument("--device", default=r.device,
                       help="auto, cpu, cuda, cuda:N or mps (Apple silicon) (default: auto = cuda if available, "
                            "else mps if available, else cpu)")
        g.add_argument("--precision", default=r.precision, choices=PRECISIONS,
                       help="compute dtype; auto = bf16 on CUDA GPUs of compute capability >= 8.0 and on CPUs with "
                            "native bf16, float16 on older CUDA GPUs (T4, V100) and on Apple silicon, else float32; "
                            "should float16 overflow, use float32")
        g.add_argument("--seed", type=int, default=r.seed, help=f"random seed (default {r.seed})")
        g.add_argument("--out", default=r.out, help="output directory (default: runs/<stage>)")
        g.add_argument("--ledger", default=r.ledger,
                       help="FLOP ledger file (default: $MINIQWEN_LEDGER or runs/flops_ledger.jsonl)")
        g.add_argument("--force", action="store_true", help="run even if the FLOP budget would be exceeded")
        g.add_argument("--resume", action="store_true", help="continue the run already in --out")
        g.add_argument("--overwrite", action="store_true", help="replace the results already in --out")
    if "data" in groups:
        g = p.add_argument_group("data")
        g.add_argument("--data", default=dt.data, help="Lotka-Volterra HDF5 file (default: $MINIQWEN_DATA, "
                       "data/lotka_volterra_data.h5 or ../shared/data/lotka_volterra_data.h5)")
        g.add_argument("--decimals", type=int, default=dt.decimals, help=f"decimals per value (default {dt.decimals})")
        g.add_argument("--scale-quantile", type=float, default=dt.scale_quantile,
                       help="LLMTIME scale = this quantile of the training values / --scale-target (default 0.99)")
        g.add_argument("--scale-target", type=float, default=dt.scale_target,
                       help="value the quantile maps to (default 10)")
        g.add_argument("--encoding", default=dt.encoding, choices=ENCODINGS,
                       help="how values are written: decimal (1.23,0.05) or integer (123,5: no decimal point, no "
                            f"leading zeros, as in LLMTIME; fewer tokens per step) (default {dt.encoding})")
    if "forecast" in groups:
        g = p.add_argument_group("forecasting")
        g.add_argument("--split", default=f.split, choices=SPLITS, help=f"trajectories to forecast (default {f.split})")
        g.add_argument("--limit", type=_none_or(int), default=f.limit,
                       help="forecast the first N trajectories of the split (default: all)")
        g.add_argument("--context-steps", type=int, default=f.context_steps,
                       help=f"observed time steps in the prompt (default {f.context_steps})")
        g.add_argument("--horizon", type=int, default=f.horizon, help=f"time steps to forecast (default {f.horizon})")
        g.add_argument("--prompt", default=f.prompt, choices=["raw", "chat"],
                       help="raw LLMTIME continuation or a Qwen chat instruction (default raw)")
        g.add_argument("--samples", type=int, default=f.samples, help="1 = greedy (default); N = median of N samples")
        g.add_argument("--temperature", type=float, default=f.temperature, help="sampling temperature (--samples > 1)")
        g.add_argument("--top-p", type=float, default=f.top_p, help="nucleus mass (--samples > 1)")
        g.add_argument(forecast_batch_flag, dest="gen_batch_size", type=int, default=f.gen_batch_size,
                       help=f"prompts per generation batch (default {f.gen_batch_size})")
        g.add_argument("--plots", type=int, default=f.plots, help=f"forecasts drawn per PNG (default {f.plots})")
    if "lora" in groups:
        g = p.add_argument_group("LoRA")
        if "rank" not in exclude:
            g.add_argument("--rank", type=int, default=lo.rank, help=f"LoRA rank (default {lo.rank})")
        g.add_argument("--lora-alpha", type=float, default=lo.lora_alpha,
                       help="LoRA scaling numerator; the update is scaled by lora_alpha/rank (default: = rank)")
        g.add_argument("--targets", default=",".join(lo.targets),
                       help=f"comma-separated projections (default {','.join(lo.targets)})")
        g.add_argument("--head-bias", action=argparse.BooleanOptionalAction, default=lo.head_bias,
                       help="also train a bias on the output head (lm_head), zero at start: + vocab_size parameters "
                            f"and 1 FLOP per logit; saved with the adapter (default {lo.head_bias})")
    if "train" in groups:
        g = p.add_argument_group("training")
        if "lr" not in exclude:
            g.add_argument("--lr", type=float, default=t.lr, help=f"AdamW learning rate (default {t.lr:g})")
        g.add_argument("--lr-schedule", default=t.lr_schedule, choices=LR_SCHEDULES,
                       help="constant, or cosine: decay from --lr to 0 at --max-steps (SGDR without restarts; a "
                            "resume must keep --max-steps) (default " + t.lr_schedule + ")")
        g.add_argument("--warmup-steps", type=int, default=t.warmup_steps,
                       help=f"linear warm-up of the learning rate over the first N steps (default {t.warmup_steps})")
        g.add_argument("--batch-size", type=int, default=t.batch_size, help=f"chunks per step (default {t.batch_size})")
        g.add_argument("--context-length", type=int, default=t.context_length,
                       help=f"tokens per training chunk (default {t.context_length})")
        g.add_argument("--stride", type=_none_or(int), default=t.stride,
                       help="offset between chunk starts (default: = context length)")
        g.add_argument("--max-steps", type=int, default=t.max_steps, help=f"optimizer steps (default {t.max_steps})")
        g.add_argument("--train-limit", type=_none_or(int), default=t.train_limit,
                       help="use only the first N training trajectories (default: all)")
        g.add_argument("--weight-decay", type=float, default=t.weight_decay, help="AdamW weight decay (default 0)")
        g.add_argument("--max-grad-norm", type=_none_or(float), default=t.max_grad_norm,
                       help=f"clip the gradient norm to this (default {t.max_grad_norm}; none = no clipping)")
        g.add_argument("--eval-every", type=int, default=t.eval_every,
                       help=f"steps between validation losses (default {t.eval_every}; 0 = start and end only)")
        g.add_argument("--eval-batches", type=int, default=t.eval_batches,
                       help=f"validation subset = this many batches (default {t.eval_batches}; 0 = all)")
        g.add_argument("--no-eval-at-start", action="store_true", default=not t.eval_at_start,
                       help="skip the step-0 validation loss" + ("" if t.eval_at_start else " (this stage's default)"))
        g.add_argument("--early-stop", dest="early_stop_patience", type=int, default=t.early_stop_patience,
                       help=f"stop after this many evaluations without improvement (default "
                            f"{t.early_stop_patience}; 0 = off)")
        g.add_argument("--restore-best", action=argparse.BooleanOptionalAction, default=t.restore_best,
                       help=f"end with the best-validation-loss adapter (default {t.restore_best})")
        g.add_argument("--select-by", default=t.select_by, choices=["loss", "forecast"],
                       help="best adapter (early stopping, --restore-best) by validation loss or by validation "
                            f"forecast error where the stage measures it (default {t.select_by})")
        g.add_argument("--checkpoint-every", type=int, default=t.checkpoint_every,
                       help=f"steps between checkpoints (default {t.checkpoint_every})")
        g.add_argument("--loss-vocabulary", default=t.loss_vocabulary, choices=["full", "numeric"],
                       help="training loss over the full vocabulary (the coursework's) or only the numeric alphabet "
                            f"(a different, cheaper objective; default {t.loss_vocabulary})")
        g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=t.compile,
                       help=f"torch.compile the training forward/backward (default {t.compile}; for CUDA)")
        g.add_argument("--no-progress", action="store_true", default=not t.progress, help="no progress bar")
    if "loss" in groups:
        g = p.add_argument_group("validation loss")
        g.add_argument("--loss-limit", type=_none_or(int), default=ls.loss_limit,
                       help="validation trajectories for the token loss (default: all; 0 = skip)")
        g.add_argument("--context-length", dest="loss_context_length", type=int, default=ls.loss_context_length,
                       help=f"tokens per validation-loss chunk (default {ls.loss_context_length})")
        g.add_argument("--loss-batch-size", type=int, default=ls.loss_batch_size,
                       help=f"chunks per validation-loss batch (default {ls.loss_batch_size})")
    return p


def _flag(p: argparse.ArgumentParser, field_name: str) -> str:
    """The command-line spelling of a settings field in parser ``p`` (``--field-name`` if none is found)."""
    for action in p._actions:
        if action.dest == field_name and action.option_strings:
            return action.option_strings[0]
    return "--" + field_name.replace("_", "-")


def parse(p: argparse.ArgumentParser, argv=None) -> dict:
    """Parse ``argv`` with ``p`` into ``{group: settings dataclass}`` for every group ``p`` has, plus the values of
    any other options under their own names; every dataclass is validated.

    Raises:
        UsageError: one line naming the option, its value and what is allowed (exit status 2 via :func:`run_cli`).
    """
    args = vars(p.parse_args(argv))
    out: dict = {}
    fields_of = {name: {f.name for f in dataclasses.fields(cls)} for name, cls in GROUPS.items()}
    if "no_eval_at_start" in args:
        args["eval_at_start"] = not args.pop("no_eval_at_start")
    if "no_progress" in args:
        args["progress"] = not args.pop("no_progress")
    if "targets" in args and isinstance(args["targets"], str):
        args["targets"] = tuple(t.strip() for t in args["targets"].split(","))
    used = set()
    for name, cls in GROUPS.items():
        present = {k: args[k] for k in fields_of[name] if k in args}
        # a group is present when the parser has any option of it that no earlier group claimed
        if not (set(present) - used):
            continue
        out[name] = cls(**present)
        used |= set(present)
    for key, value in args.items():
        if key not in used:
            out[key] = value
    try:
        for s in out.values():
            if dataclasses.is_dataclass(s):
                s.validate()
    except OptionError as err:
        raise UsageError(f"{_flag(p, err.field)} {err.value!r}: {err.allowed}") from None
    return out


def run_cli(main) -> None:
    """Run ``main()`` and turn the errors a user can fix into one clear line on stderr and exit status 2."""
    from lora import AdapterError

    from .training import CheckpointError, distributed

    try:
        sys.exit(main())
    except (UsageError, DataError, WeightsError, ConfigError, BudgetExceededError, LedgerError, AdapterError,
            CheckpointError, FileNotFoundError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:  # the file system (read-only, full, not a directory, permissions): one line, the path
        where = f"{err.filename}: " if err.filename else ""
        print(f"error: {where}{err.strerror or err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        distributed.finish()  # under torchrun: release the ranks waiting for training jobs, leave the group


def given(p: argparse.ArgumentParser, argv, dest: str) -> bool:
    """Whether the option that sets ``dest`` appears in ``argv`` (default ``sys.argv[1:]``) in any spelling
    argparse accepts (``--context-length 40``, ``--context-length=40``, an accepted abbreviation): "an explicit
    option wins over a value read from an earlier stage's results"."""
    unset = object()
    p.set_defaults(**{dest: unset})
    try:
        args, _ = p.parse_known_args(sys.argv[1:] if argv is None else list(argv))
    finally:
        p.set_defaults(**{dest: None})
    return getattr(args, dest, unset) is not unset
