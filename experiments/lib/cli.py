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

from data import DataError
from miniqwen import ConfigError, WeightsError

from .budget import BudgetExceededError, LedgerError
from .errors import CheckpointError, OptionError, UsageError
from .run_directory import cli_locks, share_lock
from .settings import GROUPS, MODEL_ENV_VAR, TITLES


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
    p = ArgumentParser(prog=prog, description=description)
    if presets:
        p.add_argument("--preset", choices=list(presets), default=None,
                       help="scaled-down defaults: " + "; ".join(
                           f"{name}: " + ", ".join(f"{k}={v}" for fields in groups_.values()
                                                   for k, v in fields.items())
                           for name, groups_ in presets.items()) + " (options given explicitly still win)")
    for group in groups:
        values = (defaults or {}).get(group) or GROUPS[group]()
        g = p.add_argument_group(TITLES[group])
        for f in dataclasses.fields(GROUPS[group]):
            if "help" in f.metadata and f.name not in exclude:
                _add_option(g, f, getattr(values, f.name), scores_forecasts)
    return p


def _add_option(g, f: dataclasses.Field, default, scores_forecasts: bool) -> None:
    """Add the option of settings field ``f`` (declared with :func:`settings.option`) to argument group ``g``, with
    the stage's ``default``."""
    m = f.metadata
    flag, action, choices = m["flag"] or "--" + f.name.replace("_", "-"), m["action"], m["choices"]
    shown = ",".join(default) if action == "names" else default
    help = m["help"].format(default=shown)
    if f.name == "model":
        default = os.environ.get(MODEL_ENV_VAR, default)
    if f.name == "select_by" and not scores_forecasts:  # only a stage that scores forecasts can select by them
        choices = ("loss",)
    kwargs = dict(dest=f.name, default=default, help=help)
    if action == "store_false":
        kwargs["help"] += "" if default else " (this stage's default)"
        g.add_argument(flag, action="store_false", **kwargs)
    elif action in ("store_true", "bool"):
        g.add_argument(flag, action="store_true" if action == "store_true" else argparse.BooleanOptionalAction,
                       **kwargs)
    elif action == "names":
        g.add_argument(flag, type=_names, **kwargs)
    else:
        kind = _none_or(m["type"]) if m["none"] else m["type"]
        g.add_argument(flag, type=kind, choices=list(choices) if choices else None, **kwargs)


def _names(text: str) -> tuple[str, ...]:
    """A comma-separated list of names as a tuple (``"q_proj, v_proj"`` -> ``("q_proj", "v_proj")``)."""
    return tuple(t.strip() for t in text.split(","))


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
