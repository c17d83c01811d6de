"""Give every committed run directory the run record a stage writes today (``run.json``), once.

    python scripts/migrate_results.py [--results results] [--check]

Runs committed before stages kept a run record hold only their ``results.json`` (or, for ``flops`` and
``benchmark``, their tables). A directory is a run only if it holds the record the project wrote
(``experiments.lib.run_directory``), so without one such a run can be neither resumed, replaced with ``--overwrite``
nor read by ``--from-sweep`` / ``--from-context``. This script writes the record from what the directory already
says: the stage and settings of its results.json, its data file and checksum, its weights' label; ``written`` lists
every top-level entry. The weights' fingerprint was not recorded then, so ``weights.sha256`` is null: such a run is
read, replaced and reported like any other, and ``--resume`` refuses it (its weights cannot be checked). Nothing
else is changed. It also rewrites the study keys of the committed studies' point and rung records in the current
form (:func:`migrate_point_keys`), and gives a final run its paired comparisons (:func:`migrate_final_comparisons`).
``--check`` lists what would be written and exits 1 if anything is missing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.lib import compare, forecast_files  # noqa: E402
from experiments.lib.points import CONTEXT_FIELDS, GRID_FIELDS, without_point_fields  # noqa: E402
from experiments.lib.run_directory import RECORD  # noqa: E402
from miniqwen.atomic import atomic_write  # noqa: E402

#: directories written by a stage that keeps no results.json, by the file that shows which stage
TABLE_STAGES = {"flop_tables.json": "flops", "benchmark.json": "benchmark"}


def first_commit_date(path: Path) -> str | None:
    """The ISO date of the first commit that added ``path`` (None outside git)."""
    try:
        out = subprocess.run(["git", "log", "--diff-filter=A", "--format=%aI", "--", str(path)], cwd=path.parent,
                             capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return None
    return out[-1] if out else None


def record_for(run: Path) -> dict | None:
    """The run record ``run`` should hold, or None when no stage wrote it (a script's output, a folder of runs)."""
    results = run / "results.json"
    record = {"made_by": "miniqwen", "stage": None, "created": first_commit_date(run),
              "migrated": "scripts/migrate_results.py: the record was written after the run, from its files",
              "settings": {}, "data": None, "weights": None,
              "written": sorted({p.name for p in run.iterdir()} | {RECORD})}
    if results.is_file():
        saved = json.loads(results.read_text())
        if not isinstance(saved.get("stage"), str):
            return None
        settings, data = saved.get("settings") or {}, saved.get("data") or {}
        model = (settings.get("run") or {}).get("model")
        record.update(stage=saved["stage"], settings=settings,
                      data={"file": data.get("file"), "sha256": data.get("sha256")} if data else None,
                      weights={"label": saved.get("weights"), "name": model, "sha256": None})
        return record
    for table, stage in TABLE_STAGES.items():
        if (run / table).is_file():
            record["stage"] = stage
            return record
    return None


#: what each study's points vary, by stage (the fields left out of a point's study key)
POINT_FIELDS = {"sweep": GRID_FIELDS, "search": GRID_FIELDS, "context_length": CONTEXT_FIELDS}
#: the compute dtype the committed CPU studies ran in, which their keys recorded only as "auto" (docs/findings.md)
COMMITTED_PRECISION = "bfloat16"


def migrate_point_keys(run: Path, stage: str, check: bool) -> list[Path]:
    """Rewrite the study keys of a study's point and rung records (``points/*/point.json``, ``rung*.json``) in the
    current form (``points.study_key``): without the fields the points vary, which are named under "points_vary",
    and the compute dtype as resolved. Returns the records that were (or, with ``check``, would be) rewritten."""
    changed = []
    for path in sorted((run / "points").glob("*/*.json")) if stage in POINT_FIELDS else []:
        record = json.loads(path.read_text())
        key = record.get("settings") if isinstance(record, dict) else None
        if not isinstance(key, dict) or "points_vary" in key:
            continue
        key = without_point_fields(key, POINT_FIELDS[stage])
        key["points_vary"] = list(POINT_FIELDS[stage])
        if key.get("run", {}).get("precision") == "auto":
            key["run"]["precision"] = COMMITTED_PRECISION
        record["settings"] = key
        changed.append(path)
        if not check:
            atomic_write(path, json.dumps(record, indent=2) + "\n")
    return changed


def migrate_final_comparisons(run: Path, check: bool) -> bool:
    """Give a final run made before the stage wrote its paired comparisons (``details.comparisons`` of its
    results.json) those comparisons, computed from its per-trajectory CSVs as the report computed them for it (the
    LoRA model against each other forecaster, :func:`compare.compare_files`). Returns whether it was (or, with
    ``check``, would be) written."""
    path = run / "results.json"
    saved = json.loads(path.read_text()) if path.is_file() else None
    if not isinstance(saved, dict) or saved.get("stage") != "final" or "comparisons" in saved.get("details", {}):
        return False
    if not check:
        trained, horizon = run / forecast_files.TRAINED_CSV, saved["evaluations"]["lora"]["horizon"]
        saved["details"]["comparisons"] = [
            c for other in sorted(run.glob("per_trajectory_*.csv")) if other.name != forecast_files.TRAINED_CSV
            if (c := compare.compare_files(trained, other, ("lora", other.stem.removeprefix("per_trajectory_")),
                                           horizon, saved["seed"])) is not None]
        atomic_write(path, json.dumps(saved, indent=2) + "\n")
    return True


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default="results")
    p.add_argument("--check", action="store_true", help="only list the directories that lack a record")
    a = p.parse_args()
    missing = []
    for run in sorted(d for d in Path(a.results).rglob("*") if d.is_dir()):
        if (run / RECORD).exists() or any((parent / RECORD).exists() for parent in run.parents):
            continue
        record = record_for(run)
        if record is None:
            continue
        missing.append(run)
        print(f"{'lacks' if a.check else 'writing'} {run / RECORD} ({record['stage']})")
        if not a.check:
            atomic_write(run / RECORD, json.dumps(record, indent=2) + "\n")
    for record_path in sorted(Path(a.results).rglob(RECORD)):
        stage = json.loads(record_path.read_text()).get("stage")
        for path in migrate_point_keys(record_path.parent, stage, a.check):
            missing.append(path)
            print(f"{'old study key in' if a.check else 'rewrote the study key of'} {path}")
        if migrate_final_comparisons(record_path.parent, a.check):
            missing.append(record_path.parent)
            print(f"{'no paired comparisons in' if a.check else 'wrote the paired comparisons of'} "
                  f"{record_path.parent / 'results.json'}")
    return 1 if a.check and missing else 0


if __name__ == "__main__":
    raise SystemExit(main())
