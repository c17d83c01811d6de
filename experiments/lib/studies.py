"""Named LoRA runs ("points") on one loaded base model, each trained, forecast and saved in its own directory, so
that a study of many points (the lr × rank grid, the context-length study) skips finished points and resumes an
interrupted one exactly. A point is finished when its ``point.json`` exists; until then its ``training/``
checkpoint is what a ``--resume`` continues from.

    out/untrained.json              the base model's forecast and validation losses, computed once
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

import numpy as np

from data import Chunks

from . import compare, errors, results, runs, settings
from .classical_forecasters import Persistence
from .costs import lora_run_cost, untrained_forecast_cost, validation_loss_cost
from .evaluation import evaluate
from .errors import UsageError
from .results import Evaluation, write_json
from .run_directory import POINT_LOCK, check_run_of
from .session import Session
from .settings import ForecastSettings, LoRASettings, TrainSettings
from .training import checkpoint_step, read_log, validation_loss, validation_subset

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


def study_key(session: Session, forecast: ForecastSettings, lora: LoRASettings, train: TrainSettings,
              varies: tuple[str, ...] = ()) -> dict:
    """What every point of a study must share (model, compute dtype as resolved, seed, data, forecast and base
    settings): a point saved under another key is refused rather than mixed into the table. The fields the points
    vary (``varies``: names of :class:`LoRASettings` / :class:`TrainSettings` fields, e.g. ``("lr", "rank")``) are
    left out of their sections and named under "points_vary"; each point's own values are in its record."""
    key = {"run": session.run_key(), **settings.as_record(data=session.data_settings, forecast=forecast, lora=lora,
                                                          train=train)}
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


@contextmanager
def locked(session: Session, names):
    """Hold the lock of every point in ``names`` (``out/points/<name>/.lock``, an exclusive ``fcntl.flock``) for
    the duration, so that no two processes run the same point (two copies of one shard): a lock another process
    holds is refused at once, before anything is spent.

    Raises UsageError naming the point and its lock file."""
    with ExitStack() as stack:
        for name in names:
            directory = session.out / "points" / name
            directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(directory / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
            stack.callback(os.close, fd)  # closing releases the lock
            if fcntl is None:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise UsageError(f"--out {session.out}: point {name} is being run by another process right now "
                                 f"(it holds {directory / LOCK}); wait for it to finish, or run other points "
                                 "(another --shard)") from None
            except OSError as err:  # a file system without flock (some network mounts): run unlocked, say so
                print(f"warning: cannot lock {directory / LOCK} ({err.strerror or err}); make sure no other job runs "
                      f"point {name}", file=sys.stderr)
        yield


def point_directory(session: Session, name: str, may_restart: bool = True) -> Path:
    """``out/points/<name>``, made if absent. With ``may_restart``, what a point killed before its first checkpoint
    left there is removed first: nothing of it was kept or charged, so it starts again."""
    out = session.out / "points" / name
    if may_restart and out.exists() and checkpoint_step(out / "training") == 0:
        clear_point(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


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


def read_point(path: Path, key: dict, session: Session | None = None) -> dict:
    """The finished point's record in ``path`` (point.json), made with study key ``key``.

    Raises UsageError naming the file if it is damaged or was made with other settings."""
    record = results.read_record(path, _valid_point, "delete it and run again with --resume to forecast the point "
                                 "again from its checkpoint, or choose another --out")
    if not same_study(record["settings"], key):
        overwrite = "" if getattr(session, "join", False) else " or --overwrite"
        raise UsageError(f"{path} was made with other settings than these; give the same settings, or use another "
                         f"--out{overwrite}")
    return record


def scan(session: Session, points: list[Point], key: dict) -> tuple[dict, dict]:
    """``(finished {name: point record}, start steps {name: checkpoint step, or None if finished})``.

    Raises UsageError if a finished point was made with another study key."""
    done, start_steps = {}, {}
    for point in points:
        path = session.out / "points" / point.name / "point.json"
        if path.is_file():
            done[point.name], start_steps[point.name] = read_point(path, key, session), None
        elif (session.out / "points" / point.name / "training").exists():
            start_steps[point.name] = checkpoint_step(session.out / "points" / point.name / "training",
                                                      session.precision)
    return done, start_steps


def plan(config, sizes, forecast: ForecastSettings, points: list[Point], start_steps: dict | None = None,
         untrained: bool = True) -> dict[str, int]:
    """Planned FLOPs of a study: the untrained forecast and validation loss at each distinct context (once, if
    ``untrained``) and, for every point not finished (``start_steps[name] is None``), its training from its
    checkpoint step and its forecast. ``sizes``: :class:`costs.NominalSizes` or :class:`runs.SessionSizes`."""
    start_steps = start_steps or {}
    costs = {"untrained": 0}
    if untrained:
        costs["untrained"] = untrained_forecast_cost(config, sizes, forecast) + sum(
            validation_loss_cost(config, sizes.val_rows(t), t.batch_size, t.context_length)
            for t in _by_context(points).values())
    for p in points:
        if p.name in start_steps and start_steps[p.name] is None:
            continue
        costs[p.name] = sum(lora_run_cost(config, sizes, forecast, p.lora, p.train, start_steps.get(p.name, 0))
                            .values())
    return costs


def _by_context(points: list[Point]) -> dict[tuple, TrainSettings]:
    return {(p.train.context_length, p.train.stride): p.train for p in points}


class ChunkCache:
    """Training and validation chunks of a session, cut once per (context length, stride)."""

    def __init__(self, session: Session):
        self.session, self._cache = session, {}

    def __call__(self, train: TrainSettings) -> tuple[Chunks, Chunks]:
        key = (train.context_length, train.stride)
        if key not in self._cache:
            self._cache[key] = runs.training_chunks(self.session, train)
        return self._cache[key]


def validation_chunks(chunks: Chunks, train: TrainSettings, seed: int) -> Chunks:
    """The fixed validation subset the training loop evaluates (same draw, same seed)."""
    idx = validation_subset(len(chunks), train.eval_batches * train.batch_size, seed)
    return Chunks(chunks.input_ids[idx], chunks.attention_mask[idx])


def untrained(session: Session, forecast: ForecastSettings, points: list[Point], chunks: ChunkCache,
              path: Path) -> tuple[Evaluation, dict[int, float], int]:
    """The base model's forecast (saved and reused on --resume) and its validation loss at every context length of
    ``points``, on the same validation subsets the points are scored on. Returns ``(evaluation, {context_length:
    validation loss}, FLOPs of those losses)``; the evaluation's own ``validation_loss`` is the first context's."""
    evaluation = runs.untrained_evaluation(session, forecast, "base model", path, session.run.resume)
    saved = runs.read_untrained(path)
    losses, flops = saved.get("validation_loss", {}), saved.get("validation_loss_flops", 0)
    for (context_length, _), train in _by_context(points).items():
        if str(context_length) in losses:
            continue
        val = validation_chunks(chunks(train)[1], train, session.run.seed)
        losses[str(context_length)], spent = validation_loss(session.model, val, train.batch_size, session.precision,
                                                             progress=False)
        flops += spent
        saved.update(validation_loss=losses, validation_loss_flops=flops)
        write_json(path, saved)
        session.charge("eval", spent, path, what=f"untrained validation loss, context {context_length}")
    by_context = {int(k): v for k, v in losses.items()}
    evaluation.validation_loss = by_context[points[0].train.context_length]
    return evaluation, by_context, flops


def run(session: Session, forecast: ForecastSettings, point: Point, chunks: ChunkCache, key: dict,
        on_step=None, export: bool = False) -> dict:
    """Train, forecast and save one point (``point.json`` last: its presence means the point is finished), then
    charge its forecast. Returns the point record."""
    out = point_directory(session, point.name)
    t = point.train
    print(f"\n=== {point.name}: lr {t.lr:g}, rank {point.lora.rank}, context {t.context_length}, "
          f"{t.max_steps} steps ===")
    evaluation, summary = runs.train_and_forecast(session, forecast, point.lora, t, chunks(t), out,
                                                  f"{t.context_length}-token windows", on_step=on_step,
                                                  export=export)
    evaluation.forecaster = point.name
    losses = [e["loss"] for e in read_log(out / "training" / "log.jsonl") if e["kind"] == "train"]
    record = {"settings": key, "name": point.name, "lr": t.lr, "rank": point.lora.rank,
              "context_length": t.context_length, "evaluation": dataclasses.asdict(evaluation),
              "training": {k: summary[k] for k in ("steps", "epochs", "val_loss", "best_val_loss", "train_flops",
                                                   "eval_flops", "seconds_this_session")},
              "train_loss_last_10": float(np.mean(losses[-10:])) if losses else None}
    path = write_json(out / "point.json", record)
    session.charge("generate", evaluation.flops, path, what=f"forecast {point.name}")
    return record


def run_all(session: Session, forecast: ForecastSettings, points: list[Point], key: dict, on_step=None,
            export: bool = False, reference: bool = True) -> tuple[list[dict], Evaluation | None, dict, int]:
    """Check the study's plan against the ledger, then run every point not finished (finished ones are read back).
    Returns ``(records in the order of points, untrained evaluation, {context: untrained validation loss},
    planned FLOPs)``. ``on_step(point name, step)`` is called after every training step. ``reference=False`` (a
    shard of a study, :mod:`experiments.sweep`): no untrained evaluation, returned as ``None`` and ``{}``."""
    done, _ = scan(session, points, key)
    with locked(session, [p.name for p in points if p.name not in done]):
        done, start_steps = scan(session, points, key)  # again: another job may have finished some meanwhile
        path = session.out / "untrained.json"
        reuse = session.run.resume and path.is_file()
        chunks = ChunkCache(session)
        for train in _by_context([p for p in points if p.name not in done]).values():
            chunks(train)  # cut (and checked against the batch size) before anything is spent
        planned = session.check(plan(session.model.config, runs.SessionSizes(session), forecast, points,
                                     start_steps, untrained=reference and not reuse))
        base, untrained_losses = (untrained(session, forecast, points, chunks, path)[:2] if reference else (None, {}))
        records = []
        for point in points:
            if point.name in done:
                print(f"{point.name}: finished earlier, read back")
                records.append(done[point.name])
                continue
            hook = (lambda step, n=point.name: on_step(n, step)) if on_step else None
            records.append(run(session, forecast, point, chunks, key, on_step=hook, export=export))
    return records, base, untrained_losses, planned


def forecast_mse(metrics: dict) -> float:
    """The selection score of every study: mean over the two species of the forecast MSE (data units²)."""
    return float((metrics["prey"]["mse"] + metrics["predator"]["mse"]) / 2)


def table_rows(records: list[dict]) -> list[dict]:
    """One flat row per point (for CSV): settings, losses, per-species forecast metrics, FLOPs."""
    rows = []
    for r in records:
        m, e = r["evaluation"]["metrics"], r["evaluation"]
        rows.append({"name": r["name"], "lr": r["lr"], "rank": r["rank"], "context_length": r["context_length"],
                     "steps": r["training"]["steps"], "train_loss_last_10": r["train_loss_last_10"],
                     "val_loss": r["training"]["val_loss"], "forecast_mse": forecast_mse(m),
                     "prey_mse": m["prey"]["mse"], "predator_mse": m["predator"]["mse"],
                     "prey_mae": m["prey"]["mae"], "predator_mae": m["predator"]["mae"], "prey_r2": m["prey"]["r2"],
                     "predator_r2": m["predator"]["r2"], "parsed_fraction": e["parsed_fraction"],
                     "train_flops": r["training"]["train_flops"] + r["training"]["eval_flops"],
                     "flops": r["training"]["train_flops"] + r["training"]["eval_flops"] + e["flops"]})
    return rows


def charged_flops(records: list[dict], reference: Evaluation, path: Path) -> dict[str, int]:
    """FLOPs of a study by kind, as its parts were charged: generate, train, eval."""
    saved = runs.read_untrained(path)
    return {"generate": reference.flops + sum(r["evaluation"]["flops"] for r in records),
            "train": sum(r["training"]["train_flops"] for r in records),
            "eval": saved.get("validation_loss_flops", 0) + sum(r["training"]["eval_flops"] for r in records)}


def study_results(session: Session, forecast: ForecastSettings, records: list[dict], untrained: Evaluation,
                  planned: int, varies: tuple[str, ...], **settings) -> tuple[results.Results, str]:
    """The results of a study of points (the sweep, the context study): every point's evaluation beside the
    untrained model's and persistence's on the same trajectories, the plan, the FLOPs charged, and each point against
    the untrained model trajectory by trajectory (``details["vs_untrained"]``, paired bootstrap intervals,
    :func:`compare.against_reference`). ``settings``: the settings dataclasses to record, without the fields the
    points vary (``varies``, as in :func:`study_key`). Returns ``(results,
    Markdown of the paired table)``; the caller adds its own details and finishes the session."""
    indices, _, contexts, truth = session.dataset.forecast_set(forecast)
    _, _, persistence = evaluate(Persistence(), contexts, truth, forecast.split, indices)
    out = session.results(forecast=forecast, **settings)
    out.settings = without_point_fields(out.settings, varies)
    out.evaluations = {"untrained": untrained, **{r["name"]: Evaluation(**r["evaluation"]) for r in records},
                       "persistence": persistence}
    out.flops["planned"] = planned
    for kind, flops in charged_flops(records, untrained, session.out / "untrained.json").items():
        out.add_flops(kind, flops)
    trained = {r["name"]: compare.point_csv(r["name"]) for r in records}
    paired, markdown = compare.against_untrained(session.out, trained, forecast.horizon, session.run.seed)
    out.details["vs_untrained"] = paired
    return out, markdown
