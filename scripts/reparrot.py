"""Put the corrected parroting forecaster into a committed final run's tables, in place, from its kept files.

    python scripts/reparrot.py --run results/final_search_cpu --data FILE

The final run ``results/final_search_cpu`` was made before parroting got its Theiler window (no candidate window
overlapping the query, lag >= 2: ``parroting.parrot_match``); its ``parrot(20)`` column is the old rule,
which falls back to persistence on 40 of its 100 test trajectories. The run cannot be resumed on this machine's
weights build, and it need not be: parroting needs no model. This script

* chooses the match length on the validation split as the final stage does (``validated_forecasters``), forecasts
  the run's test trajectories and its peer trajectories with it, and writes ``per_trajectory_<tag>.csv`` and
  ``predictions_<tag>.csv``;
* replaces the old parroting evaluation in results.json (``evaluations``, ``best_classical``, ``comparisons`` and the
  peer table's evaluations), keeping the old one under ``details.parroting_replaced`` with the reason;
* recomputes every paired comparison of the LoRA model from the committed per-trajectory CSVs (and checks that the
  rows of the other forecasters come out exactly as committed), and rewrites the README's tables.

The LoRA model's per-trajectory errors on the peer trajectories were not kept, so the peer table's paired rows against
parroting cannot be recomputed: they are removed, and the README says so. Nothing is charged (no model runs).
"""

from __future__ import annotations

import argparse
import hashlib
import dataclasses
import json
import re
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data import load_trajectories, split_indices  # noqa: E402
from experiments.lib import compare, forecast_files, runs  # noqa: E402
from experiments.lib.parroting import parrot_lengths_for  # noqa: E402
from experiments.lib.side_by_side import validated_forecasters  # noqa: E402
from experiments.lib.defaults import PARROT_LENGTHS  # noqa: E402
from experiments.lib.run_directory import RECORD  # noqa: E402
from experiments.lib.evaluation import evaluate, per_trajectory_rows, prediction_rows, write_csv  # noqa: E402
from experiments.lib.results import Evaluation, _jsonable  # noqa: E402
from experiments.lib.tables import evaluation_table  # noqa: E402
from miniqwen.atomic import atomic_write  # noqa: E402


def as_evaluation(saved: dict) -> Evaluation:
    return Evaluation(**{k: v for k, v in saved.items() if k in Evaluation.__dataclass_fields__})


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True)
    p.add_argument("--data", required=True)
    a = p.parse_args()
    run = Path(a.run)
    record = json.loads((run / "results.json").read_text())
    data = load_trajectories(a.data)
    if hashlib.sha256(data.path.read_bytes()).hexdigest() != record["data"]["sha256"]:
        sys.exit(f"error: --data {a.data} is not the data {run} was run on")
    evaluations, details = record["evaluations"], record["details"]
    old = [k for k in evaluations if k.startswith("parrot(")]
    lora = evaluations["lora"]
    C, H, seed = lora["context_steps"], lora["horizon"], record["settings"]["run"]["seed"]
    val = split_indices(data.n_systems)["validation"]
    dt = float(data.time[1] - data.time[0])
    classical, _ = validated_forecasters(data.trajectories[val, :C], data.trajectories[val, C:C + H], range(1, 21),
                                         dt, parrot_lengths=parrot_lengths_for(C, PARROT_LENGTHS))
    parrot = next(f for f in classical if f.name.startswith("parrot("))
    tag = runs.file_tag(parrot.name)

    def forecast(indices: np.ndarray, split: str, write: bool):
        contexts = data.trajectories[indices, :C]
        truth = data.trajectories[indices, C:C + H].astype(np.float64)
        forecasts, pred, evaluation = evaluate(parrot, contexts, truth, split, indices, parrot.settings())
        evaluation.settings["fallbacks"] = parrot.fallback_counts()
        if write:
            write_csv(run / forecast_files.csv_name(tag), per_trajectory_rows(indices, pred, truth, forecasts))
            write_csv(run / forecast_files.predictions_name(tag), prediction_rows(indices, pred))
        return evaluation

    test = forecast(np.asarray(lora["trajectories"]), lora["split"], write=True)
    print(f"{parrot.name} on {len(test.trajectories)} {test.split} trajectories: prey R² "
          f"{test.metrics['prey']['r2']:.3f}, predator R² {test.metrics['predator']['r2']:.3f}, fallbacks "
          f"{test.settings['fallbacks']}")

    # every paired row of the LoRA model recomputed from the per-trajectory CSVs; the others must come out as committed
    trained_csv = run / forecast_files.TRAINED_CSV
    others = {name: run / forecast_files.csv_name(runs.file_tag(name)) for name in evaluations
              if name not in ("lora", *old)}
    others[parrot.name] = run / forecast_files.csv_name(tag)
    comparisons = [compare.compare_files(trained_csv, path, ("lora", label), H, seed) for label, path in others.items()]
    committed = {c["b"]: c for c in details["comparisons"]}
    for c in comparisons:
        if c["b"] in committed and json.dumps(c, sort_keys=True) != json.dumps(committed[c["b"]], sort_keys=True):
            sys.exit(f"error: lora vs {c['b']} recomputed from the CSVs differs from the committed row")
    replaced = {"old": {k: evaluations[k] for k in old},
                "why": "the old parroting rule took candidate windows overlapping the query (the query shifted by one "
                       "step was always nearest on a smooth series: persistence on 40 of these 100 trajectories); "
                       "replaced from the run's files by scripts/reparrot.py with the Theiler-window rule"}
    evaluations = {k: v for k, v in evaluations.items() if k not in old}
    evaluations[parrot.name] = _jsonable(dataclasses.asdict(test))
    record["evaluations"] = evaluations
    details["comparisons"] = comparisons
    details["parroting_replaced"] = replaced
    for species in ("prey", "predator"):
        scores = {k: v["metrics"][species]["mse"] for k, v in evaluations.items() if k not in ("untrained", "lora")}
        details["best_classical"][species] = min(scores, key=scores.get)
    table = evaluation_table({k: as_evaluation(v) for k, v in evaluations.items()})
    details["table_markdown"] = table

    readme = (run / "README.md").read_text()
    readme = readme.replace(readme[readme.index("| metric |"):readme.index("\n\n", readme.index("| metric |"))], table,
                            1)
    start = readme.index("| A vs B |")
    readme = readme[:start] + compare.comparison_table(comparisons, legend=False) + readme[
        readme.index("\n\n", start):]
    best = details["best_classical"]
    readme = re.sub(r"Best classical forecaster by MSE: prey [^,]+, predator [^.]+\.",
                    f"Best classical forecaster by MSE: prey {best['prey']}, predator {best['predator']}.", readme)

    peer = details.get("peer_trajectories")
    if peer:
        lo, hi = peer["indices"]  # the first and last trajectory
        peer_eval = forecast(np.arange(lo, hi + 1), "mixed", write=False)  # as the stage records peers
        peer["evaluations"] = {k: v for k, v in peer["evaluations"].items() if k not in old}
        peer["evaluations"][parrot.name] = _jsonable(dataclasses.asdict(peer_eval))
        peer["comparisons"] = [c for c in peer["comparisons"] if c["b"] not in old]
        peer_table = evaluation_table({k: as_evaluation(v) for k, v in peer["evaluations"].items()})
        head = readme.index("### Trajectories")
        first = readme.index("| metric |", head)
        readme = readme[:first] + peer_table + readme[readme.index("\n\n", first):]
        rows = [line for line in readme[head:].splitlines() if any(f"| lora vs {o} |" in line for o in old)]
        for line in rows:
            readme = readme.replace(line + "\n", "")
        note = (f"\n\n{parrot.name} replaced the old parroting rule here from the run's files "
                f"(scripts/reparrot.py); the LoRA model's per-trajectory errors on these trajectories were not kept, "
                f"so its paired rows against {parrot.name} are not given.")
        end = readme.find("\n\n", readme.index("| A vs B |", head)) if "| A vs B |" in readme[head:] else len(readme)
        readme = readme[:end] + note + readme[end:]
    note = (f"\n\n**Parroting corrected after the run** (`python scripts/reparrot.py --run {run.name} --data "
            f"{Path(a.data).name}`): {parrot.name}, chosen on validation with the Theiler-window rule, replaces "
            f"{', '.join(old)} (which fell back to persistence on 40 of these trajectories); every paired row was "
            "recomputed from the committed per-trajectory CSVs.\n")
    readme = readme.rstrip("\n") + note
    atomic_write(run / "README.md", readme)
    atomic_write(run / "results.json", json.dumps(record, indent=2) + "\n")
    for name in old:  # the old rule's files go (its forecasts are those of parrot_match with min_lag=1)
        for path in (run / forecast_files.csv_name(runs.file_tag(name)), run / forecast_files.predictions_name(runs.file_tag(name))):
            path.unlink(missing_ok=True)
    written = json.loads((run / RECORD).read_text())
    written["written"] = sorted(p.name for p in run.iterdir())
    atomic_write(run / RECORD, json.dumps(written, indent=2) + "\n")
    print(f"rewrote {run}/results.json and README.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
