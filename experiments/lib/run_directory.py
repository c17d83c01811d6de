"""Run directories: a stage writes, resumes and removes only a directory a stage made, one stage at a time.

A directory is a run only if it holds the run record a stage wrote (:data:`RECORD`, marked ``"made_by":
"miniqwen"``); nothing is guessed from file names. :func:`inspect_out` classifies an output directory (empty, a
stage's run, or someone else's) and, under the command line (:func:`cli_locks`), holds an OS lock on it for the whole
stage; :func:`why_protected` names the directories ``--overwrite`` must never empty; :func:`empty_run_directory`
removes what a run's record lists and nothing else; :class:`RunDirectory` applies the rules, for every stage."""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from miniqwen.atomic import atomic_write

from .errors import UsageError

try:
    import fcntl
except ImportError:  # not POSIX: no locks
    fcntl = None

#: the run record a stage keeps in every run directory it makes: stage, settings, data and weights identity, and
#: (``written``) the top-level names the finished run holds
RECORD = "run.json"
#: top-level names a stage writes in a run directory before it finishes (an unfinished run's record lists nothing
#: yet): only ever matched inside a directory that holds a run record
STAGE_FILES = ("run.json", "results.json", "README.md", "untrained.json", "training", "points", "peft_adapter",
               "grid.csv", "grid.json", "contexts.csv", "contexts.json", "search.csv", "per_trajectory*.csv",
               "generations*.jsonl", "forecasts*.png", "horizon_*.png", "heatmap_*.png", "loss_curve*.png",
               "rungs.png", "continued_from.json", "checkpoint", "adapter", "log.jsonl", "summary.json", ".*.tmp")
REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Contents:
    """What an output directory holds. ``kind``: "empty" (absent, empty, or only a run record), "run" (it holds a
    stage's run record) or "foreign" (anything else). ``stage`` is the stage that made it, ``entries`` its
    top-level names."""

    path: Path
    kind: str
    stage: str | None = None
    record: dict | None = None
    entries: list[str] = field(default_factory=list)
    results: dict | None = None

    def listing(self, names: list[str] | None = None, limit: int = 5) -> str:
        """The first ``limit`` of ``names`` (default: the top-level entries) for a message, and how many in all."""
        names = self.entries if names is None else names
        return ", ".join(names[:limit]) + (f", … ({len(names)} in all)" if len(names) > limit else "")

    def owned(self) -> list[str]:
        """The top-level entries that are the run's: those its record lists as written; for a run that has not
        finished (its record lists nothing yet), its record and the names a stage writes while it runs."""
        if self.kind != "run":
            return []
        written = (self.record or {}).get("written")
        if isinstance(written, list) and written:
            return [n for n in self.entries if n in written or n == RECORD]
        return [n for n in self.entries if any(fnmatch.fnmatchcase(n, p) for p in STAGE_FILES)]

    def not_written_by_a_stage(self) -> list[str]:
        """Top-level entries that are not the run's (:meth:`owned`): ``--overwrite`` refuses to run beside them."""
        owned = set(self.owned())
        return [n for n in self.entries if n not in owned]


def read_json(path: Path):
    """The JSON in ``path``, or None when it is not a readable file of JSON (never raises)."""
    try:
        if not path.is_file():
            return None
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def dig(value, *keys):
    """``value[k1][k2]…`` through JSON objects, or None where a level is missing or not an object (for records and
    results files a user may have edited)."""
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def nonempty_object(value) -> dict | None:
    """``value`` if it is a non-empty JSON object, else None."""
    return value if isinstance(value, dict) and value else None


# ------------------------------------------------------------------------------------- one stage per directory

_locking = False  # True while a command line runs (cli_locks): inspect_out then locks the directory it inspects
_shared = False  # the command is one of several jobs that share the directory (sweep shards)
_held: dict[str, int] = {}  # resolved path -> the open directory whose lock this process holds
_created: list[Path] = []  # directories made only to lock them, removed again if the stage left them empty
#: the file a study locks each of its point directories with (``studies``)
POINT_LOCK = ".lock"
_new_records: list[Path] = []  # run records of new runs made by this command: taken back if it fails before writing


@contextlib.contextmanager
def cli_locks(shared: bool = False):
    """While a command runs: every directory :func:`inspect_out` looks at is locked for this process (an OS lock,
    ``flock``, released when the command ends or the process dies), and directories created only to lock them
    are removed again if the command left them empty."""
    global _locking, _shared
    _locking, _shared = True, shared
    try:
        yield
    except BaseException:
        for path in _new_records:  # a refusal or crash before the run wrote anything leaves --out as it was
            with contextlib.suppress(OSError):
                # the directory was empty when the record was written, so all under it is this command's; if that
                # is only point directories and their lock files (no result yet), it all goes
                made = [p for p in path.parent.rglob("*") if p.is_file() and p != path]
                if all(p.name == POINT_LOCK for p in made):
                    for p in made:
                        p.unlink()
                    for sub, _, _ in os.walk(path.parent, topdown=False):
                        if Path(sub) != path.parent:
                            Path(sub).rmdir()
                    path.unlink()
        raise
    finally:
        _new_records.clear()
        _locking = _shared = False
        for fd in _held.values():
            os.close(fd)
        _held.clear()
        for path in reversed(_created):
            with contextlib.suppress(OSError):
                path.rmdir()  # only if empty
        _created.clear()


def write_new_record(out: Path, record: dict) -> None:
    """Write the run record of a run this command begins in ``out`` (which exists). If ``out`` was empty, then under
    :func:`cli_locks` a command that fails before the run writes anything (beyond point directories and their
    locks) takes the record back, and the directory too if the lock made it: ``--out`` is left as it was."""
    fresh = not any(out.iterdir())
    atomic_write(out / RECORD, json.dumps(record, indent=2, default=str) + "\n")
    if fresh and _locking:
        _new_records.append(out / RECORD)


def share_lock(shared: bool) -> None:
    """Take the following directory locks shared (jobs that run side by side in one directory, e.g. the shards of
    a sweep) instead of exclusive."""
    global _shared
    _shared = shared


def lock_out(out: Path, option: str = "--out") -> None:
    """Lock ``out`` (a link's target; created if absent) for this process until the command ends; nothing is
    written in it. A no-op outside :func:`cli_locks` and where the file system has no locks.

    Raises UsageError: another stage holds ``out`` now, or it cannot be created.
    """
    if not _locking or fcntl is None:
        return
    target = Path(os.path.realpath(out))
    if str(target) in _held:
        return
    missing = [p for p in (target, *target.parents) if not p.exists()]
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"{option} {out}: cannot create it ({err.strerror or err})") from None
    _created.extend(reversed(missing))
    try:
        fd = os.open(target, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # not a directory (inspect_out says so) or unreadable (it cannot be listed either)
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if _shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UsageError(f"{option} {out}: another stage is running in it now: wait for it to finish, or choose "
                         f"another {option}") from None
    except OSError:  # a file system without locks (some network mounts): go on unlocked
        os.close(fd)
        return
    _held[str(target)] = fd


# ------------------------------------------------------------------------------------------- what a directory is

def inspect_out(out: Path, option: str = "--out") -> Contents:
    """Classify ``out`` (see :class:`Contents`), following a symbolic link to its target; under the command
    line, first lock it for this stage (:func:`lock_out`).

    Raises UsageError: ``out`` is not a directory (a file, a link to nothing), cannot be listed, holds a run record
    that is not one, or another stage is running in it.
    """
    if out.is_symlink() and not out.exists():
        raise UsageError(f"{option} {out} is a symbolic link to {os.readlink(out)}, which does not exist")
    if out.exists() and not out.is_dir():
        raise UsageError(f"{option} {out} is a file, not a directory: choose another {option}")
    lock_out(out, option)
    if not out.exists():
        return Contents(out, "empty")
    try:  # an atomic write's temporary file (another job writing the record this instant) is nobody's content
        entries = sorted(n for n in os.listdir(out) if not fnmatch.fnmatchcase(n, ".*.tmp"))
    except OSError as err:
        raise UsageError(f"{option} {out}: cannot list it ({err.strerror})") from None
    if not entries:
        return Contents(out, "empty")
    if RECORD not in entries:
        return Contents(out, "foreign", None, None, entries)
    record = read_json(out / RECORD)
    if not (isinstance(record, dict) and isinstance(record.get("stage"), str) and record.get("made_by") == "miniqwen"
            and isinstance(record.get("written", []), list)):
        raise UsageError(f"{option} {out}: {out / RECORD} is not a miniqwen run record (damaged or not ours): "
                         f"choose another {option}")
    results = read_json(out / "results.json") if "results.json" in entries else None
    kind = "empty" if entries == [RECORD] else "run"  # made, then refused or stopped before it wrote anything
    return Contents(out, kind, record["stage"], record, entries, results if isinstance(results, dict) else None)


def check_run_of(path: Path, stage: str, option: str) -> Contents:
    """``path`` as a finished run of ``stage`` (an input a stage reads, e.g. ``final --from-search DIR``), checked
    by its run record before anything in it is read.

    Raises UsageError naming ``option``: not a directory, no run record of ``stage``, or no results yet.
    """
    if not path.is_dir():
        raise UsageError(f"{option} {path}: not a directory")
    record = read_json(path / RECORD)
    if not (isinstance(record, dict) and record.get("made_by") == "miniqwen"):
        raise UsageError(f"{option} {path}: not a run of experiments.{stage} (it holds no miniqwen run record, "
                         f"{RECORD})")
    if record.get("stage") != stage:
        raise UsageError(f"{option} {path}: a {record.get('stage')} run, not a {stage} run")
    if not (path / "results.json").is_file():
        raise UsageError(f"{option} {path}: the {stage} run has no results.json yet (unfinished)")
    return Contents(path, "run", stage, record, sorted(os.listdir(path)))


def why_protected(path: Path) -> str | None:
    """Why ``path`` (resolved) must never be emptied: the root, the home directory, the repository, the current
    directory or one of its parents; else None."""
    cwd = Path.cwd().resolve()
    if path == Path(path.anchor):
        return "the file-system root"
    try:
        home = Path.home().resolve()
    except (RuntimeError, KeyError, OSError):
        home = None
    if path == home:
        return "your home directory"
    if path == cwd:
        return "the current directory"
    if path in cwd.parents:
        return "a parent of the current directory"
    if path == REPO_ROOT or path in REPO_ROOT.parents:
        return "the repository" if path == REPO_ROOT else "a parent of the repository"
    return None


def empty_run_directory(out: Path) -> None:
    """Remove the run in ``out`` (a link's target): only what its record lists (:meth:`Contents.owned`), never
    anything else; links are removed, not followed. Raises UsageError naming what could not be removed, or if
    ``out`` holds no run record."""
    found = inspect_out(out)
    if found.kind == "foreign":
        raise UsageError(f"--overwrite: --out {out} holds no run record ({RECORD}): nothing in it is a stage's")
    for name in found.owned():
        child = out / name
        try:
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
        except OSError as err:
            raise UsageError(f"--overwrite: cannot remove {child} ({err.strerror or err})") from None


# ----------------------------------------------------------------------------------- the one owner of --out

class RunDirectory:
    """The output directory of one command, and the one place that decides what may happen to it: a directory of
    files no stage wrote is refused; another run is replaced only with ``overwrite`` (and only what its record lists,
    never a protected directory, :func:`why_protected`), continued only with ``resume`` (or shared, ``join``, by the
    jobs of one study) and only if it is this ``stage``'s. Constructing it checks, under the command line locks
    (:func:`inspect_out`), and changes nothing; :meth:`begin` empties what ``overwrite`` replaces and writes the run
    record; :meth:`record_weights` adds the weights' identity; :meth:`finish` lists what the run holds.

    Attributes: ``path``; ``found`` (:class:`Contents`: what it held when checked); ``record`` (the run record, once
    :meth:`begin` wrote or kept it).

    Raises UsageError (one line, nothing changed): as above; ``resume`` with nothing to resume or in a directory
    that is not a run; a run of another stage with ``resume`` or ``join``; a run without ``resume``, ``overwrite``
    or ``join`` (``trains``: the message offers ``--resume``); ``overwrite`` of a protected directory or of a run
    beside other files.
    """

    def __init__(self, path: Path, stage: str, *, resume: bool = False, overwrite: bool = False, join: bool = False,
                 trains: bool = False, option: str = "--out"):
        self.path, self.stage, self.option, self.overwrite = Path(path), stage, option, overwrite
        self.record: dict | None = None
        out, found = self.path, inspect_out(self.path, option)
        if found.kind == "foreign" and resume and not join:
            raise UsageError(f"--resume: {option} {out} is not a run (it holds no run record, {RECORD}), so there is "
                             f"nothing to resume; it holds files no stage wrote ({found.listing()}): choose another "
                             f"{option}")
        if found.kind == "foreign":
            raise UsageError(f"{option} {out} holds files no stage wrote ({found.listing()}): choose another {option}")
        if found.kind == "empty" and resume and not join:
            raise UsageError(f"--resume: nothing to resume in {out} (it is empty or does not exist)")
        if found.kind == "run":
            if found.stage != stage and (resume or join):
                raise UsageError(f"{option} {out} holds a {found.stage} run, not a {stage} run: --resume continues "
                                 f"only a run of the same stage; choose another {option}")
            if not (resume or overwrite or join):
                advice = "--resume to continue it, " if trains and found.stage == stage else ""
                raise UsageError(f"{option} {out} already holds a {found.stage} run ({found.listing()}): pass "
                                 f"{advice}--overwrite to replace it, or choose another {option}")
            if overwrite:
                why = why_protected(out.resolve())
                if why:
                    raise UsageError(f"--overwrite: {option} {out} is {why}, which a stage never empties: choose "
                                     f"another {option}")
                extra = found.not_written_by_a_stage()
                if extra:
                    raise UsageError(f"--overwrite: {option} {out} holds a {found.stage} run but also files no stage "
                                     f"wrote ({found.listing(extra)}): move them away or choose another {option}")
        self.found = found

    @property
    def continues(self) -> bool:
        """It holds a run of this stage that the command continues (``resume`` or ``join``), not replaces."""
        return self.found.kind == "run" and not self.overwrite

    def begin(self, settings: dict, **identity) -> dict:
        """Empty the run ``overwrite`` replaces, create the directory (a link's target) and write the run record
        (the stage, ``settings`` and ``identity``, e.g. ``data=``, ``weights=``); or keep the record of the run
        being continued. A command that fails before the run writes anything takes a new record back
        (:func:`write_new_record`). Returns the record.

        Raises OSError naming the file that cannot be written."""
        if self.found.kind == "run" and self.overwrite:
            empty_run_directory(self.path)
            self.found = Contents(self.path, "empty")
        self.path.mkdir(parents=True, exist_ok=True)
        if self.found.kind == "run":
            self.record = self.found.record
            return self.record
        self.record = {"made_by": "miniqwen", "stage": self.stage,
                       "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "settings": settings,
                       **identity, "written": []}
        write_new_record(self.path, self.record)
        return self.record

    def check_same_run(self, data_file: str, data_sha256: str, weights_identity, model_option: str) -> None:
        """Refuse (UsageError) to continue the run found here on other data (``data_file``, ``data_sha256``) or on
        other weights (``weights_identity()``: label and sha256, asked for only if the run recorded weights), or a
        run whose record holds no fingerprint of its weights, before anything is spent. A no-op for a new run."""
        if not self.continues:
            return
        out, record = self.path, self.found.record or {}
        data = nonempty_object(dig(record, "data")) or {}
        if isinstance(data.get("sha256"), str) and data["sha256"] != data_sha256:
            raise UsageError(f"--resume: {self.option} {out} was run on data {data.get('file')} (sha256 "
                             f"{data['sha256'][:12]}…), not on {data_file} (sha256 {data_sha256[:12]}…): pass the "
                             f"same --data, or choose another {self.option}")
        recorded = nonempty_object(dig(record, "weights"))
        if not recorded:
            return  # the run stopped before it loaded the model: no weights used yet
        if not isinstance(recorded.get("sha256"), str):
            raise UsageError(f"--resume: the run in {out} recorded no weights fingerprint (it was made before runs "
                             f"recorded one): it cannot be resumed; choose another {self.option}")
        mine = weights_identity()
        if recorded["sha256"] != mine["sha256"]:
            raise UsageError(f"--model {model_option}: {self.option} {out} was run on other weights "
                             f"({recorded.get('label')}, sha256 {recorded['sha256'][:12]}…; these are "
                             f"{mine['label']}, sha256 {mine['sha256'][:12]}…): resume with the same --model, "
                             f"or choose another {self.option}")

    def record_weights(self, identity: dict, model_option: str) -> None:
        """Put the weights' ``identity`` (label, name, sha256) in the run record when the model is first loaded.

        Raises UsageError: the record already names other weights (another shard of a joined study ran on them);
        the record cannot be written."""
        record = read_json(self.path / RECORD)
        record = record if isinstance(record, dict) else dict(self.record or {})
        recorded = nonempty_object(dig(record, "weights"))
        if recorded and recorded.get("sha256") != identity["sha256"]:
            raise UsageError(f"--model {model_option}: {self.option} {self.path} was run on other weights "
                             f"({recorded.get('label')}): use the same --model, or choose another {self.option}")
        if not recorded:
            record["weights"] = identity
            try:
                atomic_write(self.path / RECORD, json.dumps(record, indent=2, default=str) + "\n")
            except OSError as err:
                raise UsageError(f"{self.option} {self.path}: cannot write {self.path / RECORD} "
                                 f"({err.strerror})") from None
            self.record = record

    def finish(self, ignore: tuple[str, ...] = ()) -> None:
        """List what the finished run holds in its record (:func:`record_written`), for a later ``--overwrite``."""
        record_written(self.path, ignore)


def claim_out(out: Path, stage: str, settings: dict, *, overwrite: bool = False, resume: bool = False,
              option: str = "--out") -> RunDirectory:
    """:class:`RunDirectory` checked and begun in one call, for the stages that keep no :class:`session.Session`
    (flops, benchmark, train): the run record holds ``settings``; :meth:`RunDirectory.finish` (or
    :func:`record_written`) completes it when the stage finishes. Raises UsageError as :class:`RunDirectory`."""
    directory = RunDirectory(out, stage, resume=resume, overwrite=overwrite, option=option)
    directory.begin(settings)
    return directory


def record_written(out: Path, ignore: tuple[str, ...] = ()) -> None:
    """List what ``out`` holds now in its run record (``written``), so that a later ``--overwrite`` removes exactly
    that; ``ignore`` names paths that are not the run's (a ledger kept in ``out``). Never raises."""
    try:
        record = read_json(out / RECORD)
        if not isinstance(record, dict):
            return
        skip = {os.path.realpath(p) for p in ignore} | {os.path.realpath(p) + ".lock" for p in ignore}
        record["written"] = sorted(n for n in os.listdir(out) if os.path.realpath(out / n) not in skip
                                   and not fnmatch.fnmatchcase(n, ".*.tmp"))
        atomic_write(out / RECORD, json.dumps(record, indent=2, default=str) + "\n")
    except OSError:
        pass
