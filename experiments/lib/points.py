"""A study's points: named LoRA runs (the lr × rank grid, the context lengths), what they cost, and their directories
— one per point under ``out/points/<name>``, locked while a process runs it, finished once its ``point.json``
exists. Running them is :mod:`experiments.lib.studies`' job (and the search's, :mod:`experiments.lib.halving`).

    out/points/<name>/point.json    {"settings", "lr", "rank", "context_length", "evaluation", "training", ...}
    out/points/<name>/training/     the training run (log, checkpoint, adapters, loss curve)
    out/points/<name>/.lock         held (``fcntl.flock``) by the one process running the point (:func:`locked`)
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from . import errors, results
from .costs import lora_run_cost, untrained_forecast_cost, validation_loss_cost
from .errors import UsageError
from .run_directory import POINT_LOCK, check_run_of
from .settings import DataSettings, ForecastSettings, LoRASettings, TrainSettings, as_record
from .training.checkpoint import checkpoint_step

try:
    import fcntl
except ImportError:  # not POSIX: no lock, as for the ledger
    fcntl = None


#: the fields the points of the lr × rank grid (the sweep, the search) differ in, and those of the context study:
#: left out of the study key and of results.json's settings, since each point's record gives its own
GRID_FIELDS = ("lr", "rank")


CONTEXT_FIELDS = ("context_length",)


#: the lock file in a point's directory: the process running the point holds it
LOCK = POINT_LOCK


@dataclass
class Point:
    """One LoRA run of a study: its directory name and settings."""

    name: str
    lora: LoRASettings
    train: TrainSettings


def study_key(run_key: dict, data: DataSettings, forecast: ForecastSettings, lora: LoRASettings,
              train: TrainSettings, varies: tuple[str, ...] = ()) -> dict:
    """What every point of a study must share (model, compute dtype as resolved, seed, data, forecast and base
    settings): a point saved under another key is refused rather than mixed into the table. ``run_key``: the
    session's :meth:`session.Session.run_key`. The fields the points vary (``varies``: names of
    :class:`LoRASettings` / :class:`TrainSettings` fields, e.g. ``("lr", "rank")``) are left out of their sections
    and named under "points_vary"; each point's own values are in its record."""
    key = {"run": run_key, **as_record(data=data, forecast=forecast, lora=lora, train=train)}
    # of training, what changes a point's result (not how often it logs, checkpoints or shows progress; a field
    # as_record leaves out at its default, settings.RECORDED_UNLESS, stays out)
    key["train"] = {k: key["train"][k] for k in (*TrainSettings.RESUME_FIXED, "max_steps") if k in key["train"]}
    if varies:
        key = without_point_fields(key, varies)
        key["points_vary"] = list(varies)
    return key


def without_point_fields(record: dict, varies) -> dict:
    """A copy of a settings record (``{"lora": {...}, "train": {...}, ...}``) without the fields in ``varies`` in
    its "lora" and "train" sections: what a study's results.json records, since its points differ in them."""
    out = dict(record)
    for section in ("lora", "train"):
        if section in out:
            out[section] = {k: v for k, v in out[section].items() if k not in varies}
    return out


def same_study(saved: dict, key: dict) -> bool:
    """Whether a record's study key ``saved`` equals ``key`` (:func:`study_key`)."""
    return saved == key


def grid_axis(text: str, kind, flag: str, field: str | None = None) -> tuple:
    """Comma-separated values of a grid axis, each valid for its settings ``field`` (default: "lr" for floats,
    "rank" for integers; e.g. "context_length"). Raises UsageError naming ``flag``."""
    items = text.split(",")
    if items and not items[-1].strip():
        items.pop()  # one trailing comma, as every list option allows
    if any(not v.strip() for v in items):  # "32,,48": an element left out is an error, not skipped
        raise UsageError(f"{flag} {text!r}: an empty element; must be comma-separated values")
    try:
        values = tuple(kind(v) for v in items)
        if kind is int and not all(v.strip().isascii() and v.strip().isdigit() for v in text.split(",")
                                   if v.strip()):
            raise ValueError(text)  # int() also reads "+2", "1_0" and other scripts' digits
    except ValueError:
        raise UsageError(f"{flag} {text!r}: must be comma-separated {'positive integer' if kind is int else 'float'}"
                         "s") from None
    field = field or ("lr" if kind is float else "rank")
    check = LoRASettings if field in {f.name for f in dataclasses.fields(LoRASettings)} else TrainSettings
    for v in values:
        try:
            dataclasses.replace(check(), **{field: v}).validate()
        except errors.OptionError as err:
            raise UsageError(f"{flag} {text!r}: {v} {err.allowed}") from None
    if not values or len(set(values)) != len(values):
        raise UsageError(f"{flag} {text!r}: must be distinct values, at least one")
    return values


def point_name(lr: float, rank: int) -> str:
    """A grid point's directory name, e.g. ``lr0.0001_rank8`` (part of every record and path: never change it)."""
    return f"lr{lr:g}_rank{rank}"


def grid_points(lora: LoRASettings, train: TrainSettings, lrs, ranks) -> list[Point]:
    """The grid's points, learning rate outer, rank inner. Raises UsageError if a rank makes ``--lora-alpha``'s
    update scale absurd (:data:`settings.MAX_LORA_SCALE`)."""
    out = [Point(point_name(lr, rank), dataclasses.replace(lora, rank=rank), dataclasses.replace(train, lr=lr))
           for lr in lrs for rank in ranks]
    for p in out:
        try:
            p.lora.validate()
        except errors.OptionError as err:
            raise UsageError(f"--lora-alpha {err.value!r} with rank {p.lora.rank}: {err.allowed}") from None
    return out


def context_points(lora: LoRASettings, train: TrainSettings, contexts) -> list[Point]:
    """The context study's points: one per training context length in ``contexts``, named ``context<N>``."""
    return [Point(f"context{n}", lora, dataclasses.replace(train, context_length=n)) for n in contexts]


@contextmanager
def locked(out: Path, names):
    """Hold the lock of every point in ``names`` (``out/points/<name>/.lock``, an exclusive ``fcntl.flock``) for
    the duration, so that no two processes run the same point (two copies of one shard): a lock another process
    holds is refused at once, before anything is spent.

    Raises UsageError naming the point and its lock file."""
    with ExitStack() as stack:
        for name in names:
            directory = out / "points" / name
            directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(directory / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
            stack.callback(os.close, fd)  # closing releases the lock
            if fcntl is None:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise UsageError(f"--out {out}: point {name} is being run by another process right now "
                                 f"(it holds {directory / LOCK}); wait for it to finish, or run other points "
                                 "(another --shard)") from None
            except OSError as err:  # a file system without flock (some network mounts): run unlocked, say so
                print(f"warning: cannot lock {directory / LOCK} ({err.strerror or err}); make sure no other job runs "
                      f"point {name}", file=sys.stderr)
        yield


def point_directory(out: Path, name: str, may_restart: bool = True) -> Path:
    """``out/points/<name>``, made if absent. With ``may_restart``, what a point killed before its first checkpoint
    left there is removed first: nothing of it was kept or charged, so it starts again."""
    directory = out / "points" / name
    if may_restart and directory.exists() and checkpoint_step(directory / "training") == 0:
        clear_point(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def clear_point(directory: Path) -> None:
    """Remove what a point killed before its first checkpoint left in ``directory``, all but its lock."""
    for child in directory.iterdir():
        if child.name == LOCK:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def _valid_point(record: dict) -> None:
    for k in ("settings", "name", "lr", "rank", "context_length", "train_loss_last_10"):
        record[k]
    results.valid_evaluation(record["evaluation"])
    for k in ("steps", "epochs", "val_loss", "train_flops", "eval_flops"):
        record["training"][k]


def read_point(path: Path, key: dict, joined: bool = False) -> dict:
    """The finished point's record in ``path`` (point.json), made with study key ``key`` (``joined``: the study's
    output is shared with other jobs, which --overwrite would not respect).

    Raises UsageError naming the file if it is damaged or was made with other settings."""
    record = results.read_record(path, _valid_point, "delete it and run again with --resume to forecast the point "
                                 "again from its checkpoint, or choose another --out")
    if not same_study(record["settings"], key):
        overwrite = "" if joined else " or --overwrite"
        raise UsageError(f"{path} was made with other settings than these; give the same settings, or use another "
                         f"--out{overwrite}")
    return record


def scan(out: Path, precision: str, points: list[Point], key: dict, joined: bool = False) -> tuple[dict, dict]:
    """``(finished {name: point record}, start steps {name: checkpoint step, or None if finished})``.

    Raises UsageError if a finished point was made with another study key, or its checkpoint in another compute
    dtype than ``precision``."""
    done, start_steps = {}, {}
    for point in points:
        directory = out / "points" / point.name
        if (directory / "point.json").is_file():
            done[point.name], start_steps[point.name] = read_point(directory / "point.json", key, joined), None
        elif (directory / "training").exists():
            start_steps[point.name] = checkpoint_step(directory / "training", precision)
    return done, start_steps


def study_cost(config, sizes, forecast: ForecastSettings, points: list[Point], start_steps: dict | None = None,
               untrained: bool = True) -> dict[str, int]:
    """Planned FLOPs of a study: the untrained forecast and validation loss at each distinct context (once, if
    ``untrained``) and, for every point not finished (``start_steps[name] is None``), its training from its
    checkpoint step and its forecast. ``sizes``: :class:`costs.Sizes`."""
    start_steps = start_steps or {}
    costs = {"untrained": 0}
    if untrained:
        costs["untrained"] = untrained_forecast_cost(config, sizes, forecast) + sum(
            validation_loss_cost(config, sizes.val_rows(t), t.batch_size, t.context_length)
            for t in by_context(points).values())
    for p in points:
        if p.name in start_steps and start_steps[p.name] is None:
            continue
        costs[p.name] = sum(lora_run_cost(config, sizes, forecast, p.lora, p.train, start_steps.get(p.name, 0))
                            .values())
    return costs


def by_context(points: list[Point]) -> dict[tuple, TrainSettings]:
    """``{(context length, stride): training settings}`` of ``points``: one entry per way of cutting the chunks."""
    return {(p.train.context_length, p.train.stride): p.train for p in points}


def forecast_mse(metrics: dict) -> float:
    """The selection score of every study: mean over the two species of the forecast MSE (data units²)."""
    return float((metrics["prey"]["mse"] + metrics["predator"]["mse"]) / 2)


def add_choice_options(p, defaults: dict) -> None:
    """``--lr``, ``--rank`` and ``--from-sweep`` for a stage that trains the sweep's chosen point (explicit options
    win over the sweep's choice, which wins over ``defaults``; see :func:`choose`)."""
    p.add_argument("--lr", dest="chosen_lr", type=float, default=None,
                   help=f"learning rate (default: the sweep's choice, else {defaults['train'].lr:g})")
    p.add_argument("--rank", dest="chosen_rank", type=int, default=None,
                   help=f"LoRA rank (default: the sweep's choice, else {defaults['lora'].rank})")
    p.add_argument("--from-sweep", default=None, help="sweep output directory whose selection gives lr and rank")


def refuse_conflicts(s: dict, picked: dict, given) -> None:
    """With ``--from-search``, refuse (UsageError) an explicit ``--lr`` / ``--rank`` / ``--context-length`` other
    than the search's choice in ``picked``: the search's point is continued as it ran, so another value cannot be
    honoured. ``s`` are the parsed options, ``given(dest)`` says whether an option was on the command line."""
    if not s.get("from_search"):
        return
    for dest, option, key in (("chosen_lr", "--lr", "lr"), ("chosen_rank", "--rank", "rank"),
                              ("context_length", "--context-length", "context_length")):
        value = s[dest] if dest in s else s["train"].context_length
        if given(dest) and key in picked and value != picked[key]:
            raise UsageError(f"{option} {value:g}: --from-search {s['from_search']} chose {key} {picked[key]:g}; "
                             f"leave {option} out, or train without --from-search")


def chosen(directory: str | None, stage: str, key: str = "selection") -> dict:
    """The selection recorded in ``directory``/results.json by ``stage`` ({} if ``directory`` is None), e.g.
    ``{"lr": 1e-5, "rank": 2}`` from the sweep or ``{…, "context_length": 512}`` from the context study.

    Raises UsageError naming the file if it is missing or holds no selection."""
    if directory is None:
        return {}
    option = {"search": "--from-search", "sweep": "--from-sweep", "context_length": "--from-context"}.get(stage)
    if option:  # a run of that stage, by its run record, before anything in it is read
        check_run_of(Path(directory).expanduser(), stage, option)
    path = Path(directory) / "results.json"
    try:
        raw = json.loads(path.read_text())
        return dict(raw["details"][key]["chosen"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        raise UsageError(f"--from-{stage.replace('_', '-')} {directory}: no {stage} results.json with a selection "
                         f"there (run python -m experiments.{stage} first)") from None


def choose(s: dict, picked: dict, defaults: dict) -> tuple[LoRASettings, TrainSettings]:
    """The parsed ``s["lora"]`` / ``s["train"]`` with lr and rank from ``--lr`` / ``--rank``, else ``picked`` (a
    selection, :func:`chosen`), else ``defaults``. Raises OptionError (a UsageError) for an invalid value."""
    lr = s["chosen_lr"] if s["chosen_lr"] is not None else picked.get("lr", defaults["train"].lr)
    rank = s["chosen_rank"] if s["chosen_rank"] is not None else picked.get("rank", defaults["lora"].rank)
    lora, train = dataclasses.replace(s["lora"], rank=rank), dataclasses.replace(s["train"], lr=lr)
    try:
        lora.validate()
        train.validate()
    except errors.OptionError as err:  # name the option (or the selection the value came from)
        option = {"lr": "--lr", "rank": "--rank"}.get(err.field, "--" + err.field.replace("_", "-"))
        given = s.get(f"chosen_{err.field}") is not None or err.field not in picked
        source = "" if given else " (from the selection of --from-" + "/".join(
            k.removeprefix("from_").replace("_", "-") for k in ("from_sweep", "from_context", "from_search")
            if s.get(k)) + ")"
        raise UsageError(f"{option} {err.value!r}{source}: {err.allowed}") from None
    return lora, train
