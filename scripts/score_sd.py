"""Add each rung record's bootstrap score SD (``scores.score_sd``) to a search run made before scores had one,
from its per-trajectory CSVs and the data file alone (run once on results/search_cpu):

    python scripts/score_sd.py --search results/search_cpu --data FILE
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data import load_trajectories  # noqa: E402
from experiments.lib import scores  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--search", required=True)
    p.add_argument("--data", required=True)
    a = p.parse_args()
    data = load_trajectories(a.data).trajectories
    for path in sorted(Path(a.search).glob("points/*/rung*.json")):
        record = json.loads(path.read_text())
        rows = list(csv.DictReader(open(path.with_name(f"per_trajectory_rung{record['rung']}.csv"))))
        idx = np.array([int(r["trajectory"]) for r in rows])
        C, H = record["evaluation"]["context_steps"], record["evaluation"]["horizon"]
        truth, last = data[idx, C:C + H].astype(np.float64), data[idx, C - 1:C].astype(np.float64)
        reference = scores.per_trajectory_mse(np.repeat(last, H, axis=1), truth)
        mse = {s: np.array([float(r[f"mse_{s}"]) for r in rows]) for s in ("prey", "predator")}
        assert abs(scores.robust_score(mse, reference) - record["score"]) < 1e-9, path
        record["score_sd"] = scores.score_sd(mse, reference, record["settings"]["run"]["seed"])
        path.write_text(json.dumps(record, indent=2) + "\n")
        print(f"{path}: score {record['score']:.4f} ± {record['score_sd']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
