"""The command line: the only code that touches argparse.

A stage builds its parser from the settings groups it needs (:func:`parser`), and :func:`parse` turns the command
line into the dataclasses of :mod:`experiments.lib.settings`, validating every value before any data is read, any
model loaded or any FLOP spent. :func:`run_cli` runs a stage's ``main`` and turns the errors a user can fix into one
line and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from data import ENCODINGS, SCALINGS, DataError
from miniqwen import ConfigError, WeightsError

from .budget import BudgetExceededError, LedgerError
from .errors import CheckpointError, OptionError, UsageError
from .run_directory import cli_locks, share_lock
from .settings import GROUPS, LR_SCHEDULES, MODEL_ENV_VAR, PRECISIONS, SPLITS


def _none_or(kind):
    """An option's type: ``kind``, or None for "none" / "all". An empty value is an error, not "all": an empty
    shell variable must not quietly widen a run to the whole split."""
    def convert(text: str):
        if not text.strip():
            raise ValueError("empty")
        return None if text.lower() in ("none", "all") else kind(text)
    convert.__name__ = kind.__name__
    return convert


#: the options that take a comma-separated list of numbers (each element read by a scalar option's rules; the
#: stage checks its range)
NUMBER_LISTS = ("lrs", "ranks", "contexts", "orders", "parrot_lengths", "peer_indices", "counting_lengths",
                "throughput_batches")


class ArgumentParser(argparse.ArgumentParser):
    """argparse without abbreviations (``--context-len`` is not taken for ``--context-length``: a stage that checks
    which options were given explicitly matches their full spelling) whose errors are a :class:`UsageError`: one
    line "error: …" and exit status 2 through :func:`run_cli`, like every other refusal."""

    def __init__(self, *args, **kwargs):
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def error(self, message):
        raise UsageError(f"{message} (see {self.prog} --help)")

    def _get_value(self, action, arg_string):
        # int() and float() also read other scripts' digits ("٢" is 2): a number on the command line is ASCII, in a
        # list option's every element as in a scalar option
        kind = getattr(action.type, "__name__", None)
        if kind in ("int", "float") and isinstance(arg_string, str) and not arg_string.isascii():
            self.error(f"argument {'/'.join(action.option_strings) or action.dest}: invalid {kind} value: "
                       f"{arg_string!r}")
        if action.dest in NUMBER_LISTS and isinstance(arg_string, str) and not arg_string.isascii():
            self.error(f"argument {'/'.join(action.option_strings)}: invalid value {arg_string!r}: must be "
                       "comma-separated numbers in ASCII digits")
        return super()._get_value(action, arg_string)


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
           presets: dict | None = None, exclude: tuple[str, ...] = (),
           scores_forecasts: bool = False) -> argparse.ArgumentParser:
    """An argparse parser with the options of the named setting ``groups`` (keys of :data:`GROUPS`).

    ``defaults`` = ``{group: dataclass instance}`` overrides a group's defaults (e.g. a stage's training
    defaults). One option, one meaning: ``--batch-size`` and ``--context-length`` are always the training batch
    and chunk; generation has ``--gen-batch-size``, the validation loss ``--loss-batch-size`` and
    ``--loss-context-length``. ``presets`` (``{name: {group: {field:
    value}}}``) adds ``--preset``; the caller passes the preset's defaults in ``defaults`` (:func:`with_preset`).
    ``exclude`` leaves out options of these field names (a grid sets ``lr`` and ``rank`` itself).
    ``scores_forecasts``: the stage scores validation forecasts while it trains, so ``--select-by forecast`` is
    offered (elsewhere only ``loss``: refused when parsed, before anything is spent).
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
        g.add_argument("--scaling", default=dt.scaling, choices=SCALINGS,
                       help="dataset: one LLMTIME scale fitted on the training split; series: an offset and a scale "
                            "per species fitted on each trajectory's own context (LLMTIME's per-series scaling) "
                            f"(default {dt.scaling})")
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
        g.add_argument("--gen-batch-size", type=int, default=f.gen_batch_size,
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
        g.add_argument("--select-by", default=t.select_by,
                       choices=["loss", "forecast"] if scores_forecasts else ["loss"],
                       help="best adapter (early stopping, --restore-best) by validation loss" +
                            (" or by validation forecast error" if scores_forecasts else "") +
                            f" (default {t.select_by})")
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
        g.add_argument("--loss-context-length", type=int, default=ls.loss_context_length,
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
    # the shards of a sweep share one --out (each point has its own lock); --collect and --overwrite do not
    share_lock("shard" in args and not args.get("collect") and not args.get("overwrite"))
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


def check_positions(model: str, lengths, option: str, strict: bool = True) -> None:
    """Refuse (UsageError naming ``option``) a training context in ``lengths`` longer than the positions of
    ``model`` (config.json's ``max_position_embeddings``; the weights are not read). Raises WeightsError or
    ConfigError for a model that cannot be found or has no valid config.json — unless not ``strict``: then such a
    model is left for the loader to refuse (with its own, fuller message)."""
    from miniqwen.config import Qwen2Config
    from miniqwen.loading import resolve_model_dir

    try:
        positions = Qwen2Config.from_json(resolve_model_dir(model) / "config.json").max_position_embeddings
    except (WeightsError, ConfigError, OSError, ValueError):
        if strict:
            raise
        return
    too_long = [n for n in lengths if n > positions]
    if too_long:
        raise UsageError(f"{option} {','.join(map(str, too_long))}: longer than the {positions} positions of the "
                         f"model (max_position_embeddings in {model}'s config.json)")


def one_line(message) -> str:
    """``message`` (an exception or text) as the one line :func:`run_cli` prints: a message of several lines (e.g.
    a list of the tensors that do not fit, one per line) has its lines joined with "; "."""
    return "; ".join(part.strip() for part in str(message).splitlines() if part.strip())


def run_cli(main) -> None:
    """Run ``main()`` and turn the errors a user can fix into one clear line on stderr and exit status 2. The run
    directory a stage inspects is locked for the whole command (:func:`run_directory.cli_locks`): a second stage into
    it is refused."""
    from lora import AdapterError

    from .training import distributed

    try:
        with cli_locks():
            sys.exit(main())
    except (UsageError, DataError, WeightsError, ConfigError, BudgetExceededError, LedgerError, AdapterError,
            CheckpointError, FileNotFoundError, FileExistsError) as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:  # the file system (read-only, full, not a directory, permissions): one line, the path
        where = f"{err.filename}: " if err.filename else ""
        print(f"error: {one_line(f'{where}{err.strerror or err}')}", file=sys.stderr)
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
