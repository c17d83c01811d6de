"""Judge each lever against its baseline on the same validation trajectories, paired, per trajectory type: the
trained forecasts kept by each run (``predictions_trained.csv``) are compared with the paired bootstrap of
``experiments.lib.compare`` on all trajectories and on the damped and sustained ones (``experiments.lib.by_type``).

    python scripts/compare_levers.py --data FILE --base results/levers/dataset_300 \
        --lever results/levers/series_300 [--lever results/levers/decimals3_300 ...] --out results/levers/comparison
        [--trajectories 840-899]

Writes ``--out``.md (the tables) and ``--out``.json. A lever "wins" on a species when the paired 95 % interval of its
mean MSE minus the baseline's lies below zero on all trajectories.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data import load_trajectories  # noqa: E402
from experiments.lib import by_type, compare, forecast_files  # noqa: E402
from experiments.lib.side_by_side import indices_range  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--base", required=True)
    p.add_argument("--lever", action="append", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--trajectories", default=None, help="only trajectories A-B (inclusive), e.g. those held out")
    a = p.parse_args()
    data = load_trajectories(a.data).trajectories
    base_dir = Path(a.base)
    C = json.loads((base_dir / "results.json").read_text())["evaluations"]["lora"]["context_steps"]
    idx, base = forecast_files.read_predictions(base_dir / "predictions_trained.csv")
    span = indices_range(a.trajectories, None, "--trajectories") if a.trajectories else idx
    lo, hi = span.min(), span.max()
    keep = (idx >= lo) & (idx <= hi)
    idx, base = idx[keep], base[keep]
    H = base.shape[1]
    truth = data[idx, C:C + H].astype(np.float64)
    types = by_type.trajectory_types(data[idx, :C])
    md, out = [f"# Levers against `{base_dir.name}` on {len(idx)} trajectories ({idx[0]}–{idx[-1]}), {C}→{H}", "",
               by_type.RULE, ""], {"base": base_dir.name, "types": types.tolist(), "levers": {}}
    for lever in a.lever:
        lever_dir = Path(lever)
        lidx, pred = forecast_files.read_predictions(lever_dir / "predictions_trained.csv")
        lidx, pred = lidx[(lidx >= lo) & (lidx <= hi)], pred[(lidx >= lo) & (lidx <= hi)]
        if lidx.tolist() != idx.tolist():
            raise SystemExit(f"error: {lever_dir} forecast other trajectories than {base_dir}")
        entry = {"by_type": by_type.by_type({lever_dir.name: pred, base_dir.name: base}, truth, types,
                                            reference=lever_dir.name), "paired": {}}
        md += [f"## `{lever_dir.name}` against `{base_dir.name}`", ""]
        for label in ("all", *by_type.TYPES):
            rows = np.ones(len(idx), bool) if label == "all" else types == label
            if rows.sum() < 2:
                continue
            paired = compare.compare_forecasts(pred[rows], base[rows], truth[rows], names=(lever_dir.name,
                                               base_dir.name), indices=idx[rows], seed=0)
            entry["paired"][label] = paired
            md += [f"### {label} ({rows.sum()} trajectories)", "", compare.comparison_table([paired], legend=False), ""]
        entry["wins"] = {s: entry["paired"]["all"]["species"][s]["mse"]["ci_high"] < 0 for s in ("prey", "predator")}
        md += [f"Paired 95 % interval of the mean MSE difference below zero on all trajectories: "
               f"prey {entry['wins']['prey']}, predator {entry['wins']['predator']}.", "",
               by_type.by_type_table(entry["by_type"], reference=lever_dir.name), ""]
        out["levers"][lever_dir.name] = entry
    Path(a.out + ".md").write_text("\n".join(md) + "\n")
    Path(a.out + ".json").write_text(json.dumps(out, indent=1) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
