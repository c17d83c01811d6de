"""How much of the final run's kept checkpoint is selection luck: its curve smoothed, and its score on the validation
trajectories it was not selected on.

    python scripts/selection_noise.py --data FILE [--run results/final_search_cpu]
        [--greedy results/levers/final_greedy_validation] [--out results/levers/selection]

The final run kept the adapter of the step whose forecast score (``scores.SCORE_RULE`` on the first 50 validation
trajectories, 800-849) was lowest among 16 evaluations. This reads only committed files: the run's training log
(the scores by step), and the kept adapter's greedy forecasts of all 100 validation trajectories with persistence's
(``--greedy``, written by ``scripts/reforecast.py``). It writes ``--out``.json and ``--out``.md:

* the curve and its centred 3-point moving average, and the step each picks;
* the kept adapter's score with its bootstrap SD (``scores.score_sd``) on 800-849 (selected on), on 850-899 (never
  used to choose anything about this adapter) and on all 100: the gap between the first two is the winner's curse.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data import load_trajectories  # noqa: E402
from experiments.lib import forecast_files  # noqa: E402
from experiments.lib.scores import per_trajectory_mse, robust_score, score_sd  # noqa: E402
from experiments.lib.training.loop import read_log  # noqa: E402
from miniqwen.atomic import atomic_write  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="the data file the run was made on (the truth)")
    p.add_argument("--run", default="results/final_search_cpu")
    p.add_argument("--greedy", default="results/levers/final_greedy_validation")
    p.add_argument("--out", default="results/levers/selection")
    a = p.parse_args()
    run, greedy, out = Path(a.run), Path(a.greedy), Path(a.out)
    evals = [e for e in read_log(run / "training" / "log.jsonl") if e["kind"] == "eval" and "forecast_score" in e]
    steps = np.array([e["step"] for e in evals])
    scores = np.array([e["forecast_score"] for e in evals])
    smooth = np.array([scores[max(i - 1, 0):i + 2].mean() for i in range(len(scores))])
    kept = json.loads((run / "results.json").read_text())["details"]["training"]["best_step"]

    ids, lora = forecast_files.read_predictions(greedy / forecast_files.predictions_name("trained"))
    ids_p, persistence = forecast_files.read_predictions(greedy / forecast_files.predictions_name("persistence"))
    assert list(ids) == list(ids_p)
    data = load_trajectories(a.data)
    saved = json.loads((greedy / "results.json").read_text())["evaluations"]["lora"]
    C, H = saved["context_steps"], saved["horizon"]
    truth = data.trajectories[np.asarray(ids), C:C + H].astype(np.float64)
    parts = {"800-849 (selected on)": np.asarray(ids) < 850, "850-899 (held out)": np.asarray(ids) >= 850,
             "800-899 (all 100)": np.ones(len(ids), bool)}
    rows = {}
    for name, rows_of in parts.items():
        mse = per_trajectory_mse(lora[rows_of], truth[rows_of])
        ref = per_trajectory_mse(persistence[rows_of], truth[rows_of])
        rows[name] = {"n": int(rows_of.sum()), "score": robust_score(mse, ref), "sd": score_sd(mse, ref)}
    result = {"curve": [{"step": int(s), "score": float(v), "smoothed": float(m)}
                        for s, v, m in zip(steps, scores, smooth)],
              "argmin_raw": int(steps[scores.argmin()]), "argmin_smoothed": int(steps[smooth.argmin()]),
              "kept_step": kept, "kept_adapter_scores": rows,
              "smoothing": "centred moving average over 3 evaluations (2 at the ends)"}
    atomic_write(out.with_suffix(".json"), json.dumps(result, indent=2) + "\n")
    md = ["# Checkpoint selection of the final run, within its noise", "",
          f"`python scripts/selection_noise.py --run {run.name}` — from the run's training log and the kept "
          "adapter's greedy forecasts of the 100 validation trajectories. Score: "
          "mean over species of median per-trajectory MSE / persistence's (0 perfect, 1 persistence); SD: bootstrap "
          "over the scoring trajectories (1,000 resamples).", "",
          "| step | score (800-849) | smoothed |", "| ---: | ---: | ---: |",
          *[f"| {r['step']} | {r['score']:.4f} | {r['smoothed']:.4f} |" for r in result["curve"]], "",
          f"Lowest raw score: step {result['argmin_raw']}; lowest smoothed: step {result['argmin_smoothed']}; kept: "
          f"step {kept}.", "", "| the kept adapter on | trajectories | score ± SD |", "| --- | ---: | ---: |",
          *[f"| {k} | {v['n']} | {v['score']:.4f} ± {v['sd']:.4f} |" for k, v in rows.items()], ""]
    atomic_write(out.with_suffix(".md"), "\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
