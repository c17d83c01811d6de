"""Run directories: a stage writes, resumes and removes only a directory a stage made.

:func:`inspect_out` classifies an output directory (empty, a stage's run, a run made before run records, or someone
else's), :func:`why_protected` names the directories ``--overwrite`` must never empty, and
:func:`empty_run_directory` empties one. :class:`session.Session` applies these rules before any work is spent."""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UsageError

#: the run record a Session keeps in every run directory it makes: stage, settings, data and weights identity
RECORD = "run.json"
#: top-level names the stages write in a run directory (a record's ``written`` list adds what a finished run held)
STAGE_FILES = ("run.json", "results.json", "README.md", "untrained.json", "training", "points", "peft_adapter",
               "grid.csv", "grid.json", "contexts.csv", "contexts.json", "search.csv", "per_trajectory*.csv",
               "generations*.jsonl", "forecasts*.png", "horizon_*.png", "heatmap_*.png", "loss_curve*.png",
               "rungs.png", ".*.tmp")
#: what an interrupted run of a stage that trains leaves before its results.json (runs made before run records)
_PARTIAL_RUN = ("untrained.json", "training", "points")
REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class RunDirectory:
    """What an output directory holds. ``kind``: "empty" (absent, empty, or only a run record), "run" (made by a
    stage: it has a run record), "legacy" (made by a stage before run records: a results.json naming its stage, or
    an interrupted training run's files) or "foreign" (anything else). ``stage`` is the stage that made it (None if
    unknown), ``entries`` its top-level names."""

    path: Path
    kind: str
    stage: str | None = None
    record: dict | None = None
    entries: list[str] = field(default_factory=list)
    results: dict | None = None

    def listing(self, names: list[str] | None = None, limit: int = 5) -> str:
        names = self.entries if names is None else names
        return ", ".join(names[:limit]) + (f", … ({len(names)} in all)" if len(names) > limit else "")

    def not_written_by_a_stage(self) -> list[str]:
        """Top-level entries no stage wrote: neither a stage's file name nor listed in the record."""
        written = set((self.record or {}).get("written") or [])
        return [n for n in self.entries
                if n not in written and not any(fnmatch.fnmatchcase(n, pattern) for pattern in STAGE_FILES)]


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


def inspect_out(out: Path, option: str = "--out") -> RunDirectory:
    """Classify ``out`` (see :class:`RunDirectory`), following a symbolic link to its target.

    Raises UsageError: ``out`` is not a directory (a file, a link to nothing), cannot be listed, or holds a run
    record that is not one.
    """
    if out.is_symlink() and not out.exists():
        raise UsageError(f"{option} {out} is a symbolic link to {os.readlink(out)}, which does not exist")
    if not out.exists():
        return RunDirectory(out, "empty")
    if not out.is_dir():
        raise UsageError(f"{option} {out} is a file, not a directory: choose another {option}")
    try:  # an atomic write's temporary file (another job writing the record this instant) is nobody's content
        entries = sorted(n for n in os.listdir(out) if not fnmatch.fnmatchcase(n, ".*.tmp"))
    except OSError as err:
        raise UsageError(f"{option} {out}: cannot list it ({err.strerror})") from None
    if not entries:
        return RunDirectory(out, "empty")
    if RECORD in entries:
        record = read_json(out / RECORD)
        if not (isinstance(record, dict) and isinstance(record.get("stage"), str)
                and record.get("made_by") == "miniqwen"):
            raise UsageError(f"{option} {out}: {out / RECORD} is not a miniqwen run record (damaged or not ours): "
                             f"choose another {option}")
        if entries == [RECORD]:  # made, then refused or stopped before it wrote anything
            return RunDirectory(out, "empty", record["stage"], record, entries)
        return RunDirectory(out, "run", record["stage"], record, entries)
    results = read_json(out / "results.json") if "results.json" in entries else None
    if isinstance(results, dict) and isinstance(results.get("stage"), str):
        return RunDirectory(out, "legacy", results["stage"], None, entries, results)
    if "results.json" not in entries and any(n in entries for n in _PARTIAL_RUN):
        return RunDirectory(out, "legacy", None, None, entries)
    return RunDirectory(out, "foreign", None, None, entries)


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
    """Remove everything in ``out`` (a run directory; a link's target), not ``out`` itself; links are removed, not
    followed. Raises UsageError naming what could not be removed."""
    for child in sorted(out.iterdir()):
        try:
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
        except OSError as err:
            raise UsageError(f"--overwrite: cannot remove {child} ({err.strerror or err})") from None
