"""Forecast a committed run's split again with its kept adapter and keep every forecast: ``predictions_<tag>.csv``
for the LoRA model and every classical forecaster beside it, the damped/sustained tables and the MSE-by-step plot.

    python scripts/reforecast.py --run results/final_search_cpu --model DIR --data FILE --out DIR
                                 --ledger results/flops_ledger.jsonl [--split validation] [--samples 20 --temperature T]

Made for runs committed before forecasts were kept (the final run wrote per-trajectory errors only). The adapter is
the run's ``training/best_adapter`` (else ``training/adapter``); the split, context, horizon, LLMTIME scale, decimals,
encoding, prompt, precision and seed are read from the run's results.json (``--split`` forecasts another split's
trajectories; ``--samples N --temperature T`` takes the median of N samples, LLMTIME's point forecast, and writes its
10-90 % band as ``quantiles_trained.csv``); the classical forecasters are the
``experiments.final`` set, chosen on the validation split. The forecast's FLOPs are charged to ``--ledger``. Writes
``--out``/results.json (metrics, by type, the weights' fingerprint beside the run's) and README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data import fit_scale, load_trajectories, split_indices  # noqa: E402
from experiments.lib import by_type, compare, forecast_files, loader, runs  # noqa: E402
from experiments.lib.budget import Ledger  # noqa: E402
from experiments.lib.parroting import parrot_lengths_for  # noqa: E402
from experiments.lib.side_by_side import validated_forecasters  # noqa: E402
from experiments.lib.defaults import PARROT_LENGTHS  # noqa: E402
from experiments.lib.evaluation import LLMForecaster, evaluate, prediction_rows, write_csv  # noqa: E402
from experiments.lib.tables import evaluation_table  # noqa: E402
from lora import load_adapter, merged  # noqa: E402
from miniqwen.loading import weights_fingerprint  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name in ("--run", "--model", "--data", "--out", "--ledger"):
        p.add_argument(name, required=True)
    p.add_argument("--split", default=None, help="forecast this split instead of the run's")
    p.add_argument("--samples", type=int, default=None, help="median of N samples (default: the run's, greedy)")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (default: the run's)")
    p.add_argument("--limit", type=int, default=None, help="only the first N trajectories of the split")
    p.add_argument("--skip", type=int, default=0, help="leave out the first N trajectories of the split (before --limit)")
    p.add_argument("--gen-batch-size", type=int, default=None, help="prompts per batch (default: the run's)")
    a = p.parse_args()
    run, out = Path(a.run), Path(a.out)
    if out.exists() and any(out.iterdir()):
        sys.exit(f"error: --out {out} is not empty")
    record = json.loads((run / "results.json").read_text())
    settings, lora_eval = record["settings"], record["evaluations"]["lora"]
    f, d = settings["forecast"], settings["data"]
    data = load_trajectories(a.data)
    splits = split_indices(data.n_systems)
    indices = np.asarray(lora_eval["trajectories"] if a.split in (None, lora_eval["split"]) else splits[a.split])
    split = a.split or lora_eval["split"]
    indices = indices[a.skip:][:a.limit]
    samples = a.samples or f["samples"]
    temperature = f["temperature"] if a.temperature is None else a.temperature
    batch = a.gen_batch_size or f["gen_batch_size"]
    C, H = lora_eval["context_steps"], lora_eval["horizon"]
    contexts, truth = data.trajectories[indices, :C], data.trajectories[indices, C:C + H].astype(np.float64)
    scale = fit_scale(data.trajectories[splits["train"]], d["scale_quantile"], d["scale_target"])
    precision = settings["run"].get("precision", "bfloat16")
    precision = "bfloat16" if precision == "auto" else precision
    loaded = loader.load_model(a.model, None, precision)
    model, tokenizer = loaded.model, loaded.tokenizer
    adapter = run / "training" / ("best_adapter" if (run / "training" / "best_adapter").is_dir() else "adapter")
    load_adapter(model, adapter)
    out.mkdir(parents=True, exist_ok=True)
    with loader.emulation(loaded.device, loaded.precision), merged(model):  # bf16 emulated where this CPU has none
        forecaster = LLMForecaster(model, tokenizer, scale, d.get("decimals", 2), f["prompt"], samples,
                                   temperature, f["top_p"], batch, settings["run"]["seed"],
                                   name="lora", encoding=d.get("encoding", "decimal"), progress=True)
        forecasts, pred, lora = evaluate(forecaster, contexts, truth, split, indices,
                                         {"samples": samples, "temperature": temperature})
    band = None
    if samples > 1:  # the 10-90 % band of the samples, and how often it holds the truth
        with np.errstate(all="ignore"):
            q = np.nanquantile(forecasts.samples, [0.1, 0.9], axis=1)  # [2, n, H, 2]
        write_csv(out / "quantiles_trained.csv", [
            {"trajectory": int(t), "step": h + 1, "prey_q10": q[0, i, h, 0], "prey_q90": q[1, i, h, 0],
             "predator_q10": q[0, i, h, 1], "predator_q90": q[1, i, h, 1]}
            for i, t in enumerate(indices) for h in range(H)])
        inside = (q[0] <= truth) & (truth <= q[1])
        band = {"coverage_10_90": {s: float(inside[..., k].mean()) for k, s in enumerate(("prey", "predator"))},
                "mean_width": {s: float(np.nanmean(q[1, ..., k] - q[0, ..., k])) for k, s in
                               enumerate(("prey", "predator"))}}
    predictions, evaluations = {"lora": pred}, {"lora": lora}
    write_csv(out / forecast_files.predictions_name("trained"), prediction_rows(indices, pred))
    Ledger(a.ledger).charge("final", lora.flops, "generate", run=out.name,
                            what=f"re-forecast of {run.name}'s kept adapter on the {split} split ({samples} sample(s))")
    val = splits["validation"]
    dt = float(data.time[1] - data.time[0])
    classical, search = validated_forecasters(data.trajectories[val, :C], data.trajectories[val, C:C + H], range(1, 21),
                                              dt, parrot_lengths=parrot_lengths_for(C, PARROT_LENGTHS))
    for forecaster in classical:
        _, pred, evaluation = evaluate(forecaster, contexts, truth, split, indices, forecaster.settings())
        evaluation.settings["fallbacks"] = forecaster.fallback_counts()
        predictions[forecaster.name], evaluations[forecaster.name] = pred, evaluation
        write_csv(out / forecast_files.predictions_name(runs.file_tag(forecaster.name)), prediction_rows(indices, pred))
    saved = json.loads((run / "untrained.json").read_text())
    if "predictions" in saved and split == lora_eval["split"] and a.limit is None and not a.skip:
        predictions["untrained"] = np.asarray(saved["predictions"], dtype=np.float64)
        write_csv(out / forecast_files.predictions_name("untrained"), prediction_rows(indices, predictions["untrained"]))
    paired = [compare.compare_forecasts(predictions["lora"], v, truth, names=("lora", k), indices=indices, seed=0)
              for k, v in predictions.items() if k != "lora"]
    scale_line = (f"{run.name}'s kept adapter ({adapter.name}) re-forecast on {len(indices)} {split} "
                  f"trajectories, {C}→{H}, " + ("greedy" if samples == 1 else
                                                  f"median of {samples} samples at temperature {temperature:g}"))
    kinds = by_type.section(out, predictions, truth, contexts, "lora",
                            [n for n in predictions if n.startswith(("var(", "ar("))], scale_line)
    committed = {s: {k: lora_eval["metrics"][s][k] for k in ("mse", "mae", "r2")} for s in ("prey", "predator")}
    result = {"run": run.name, "adapter": adapter.name, "weights_sha256": weights_fingerprint(a.model),
              "run_weights": record.get("weights"), "precision": precision, "order_search": search,
              "evaluations": {k: dataclasses.asdict(e) for k, e in evaluations.items()},
              "committed_lora_metrics": committed, "comparisons": paired, "by_type": kinds, "band": band,
              "split": split, "samples": samples, "temperature": temperature}
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    table = evaluation_table(evaluations)
    (out / "README.md").write_text(
        f"# Re-forecast of {run.name} with its kept adapter\n\n`python scripts/reforecast.py --run {a.run} --model "
        f"{Path(a.model).name} --data {Path(a.data).name} --out {out.name if out.is_absolute() else a.out} --ledger "
        f"{Path(a.ledger).name}`\n\n"
        f"{scale_line}.\n\n{table}\n\nCommitted LoRA metrics of the run: {json.dumps(committed)}\n\n"
        f"### The LoRA model against each forecaster\n\n{compare.comparison_table(paired)}\n\n{kinds['markdown']}\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
