"""Zero-shot forecasting with the untrained model (coursework 2a + 2b).

    python -m experiments.baseline --model DIR --data FILE [--limit N] [--samples 5] [--prompt chat] ...

Prints two preprocessed examples, forecasts ``--horizon`` steps after ``--context-steps`` observed steps of every
selected trajectory (batched, KV-cached, constrained to the numeric alphabet), and reports per species MSE, MAE,
R² and per-step MAE in the data's own units, the fraction of forecasts that parsed completely, the same metrics for
a persistence forecast (last observed value repeated, for scale), and the untrained model's token-level loss on the
validation chunks. Writes ``results.json``, ``per_trajectory.csv``, ``generations.jsonl`` and ``forecasts.png``
under ``--out`` and charges the FLOPs it used to the budget ledger.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from data import chunk_texts, encode
from miniqwen.flops import forward_flops

from . import common
from .forecasting import (
    add_forecast_args, evaluate_forecasts, forecast_plan, forecast_set, per_trajectory_rows, persistence_metrics,
    plot_forecasts, write_csv,
)
from .train import validation_loss

STAGE = "baseline"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.baseline", description=__doc__.split("\n\n")[0])
    common.add_common_args(p)
    add_forecast_args(p)
    p.add_argument("--split", default="validation", choices=["train", "validation", "test"])
    p.add_argument("--limit", type=int, default=None, help="number of trajectories of the split (default: all)")
    p.add_argument("--loss-limit", type=int, default=None,
                   help="validation trajectories for the token loss (default: all of the validation split; 0 = skip)")
    p.add_argument("--context-length", type=int, default=512, help="tokens per validation-loss chunk (default 512)")
    p.add_argument("--loss-batch-size", type=int, default=4, help="chunks per validation-loss batch (default 4)")
    return p


def show_examples(tokenizer, trajectories, indices, alpha, decimals, steps: int = 5) -> list[dict]:
    """Print and return two example sequences: raw values, LLMTIME text, token ids (first ``steps`` steps)."""
    examples = []
    for idx, traj in zip(indices[:2], trajectories[:2]):
        text = encode(traj[:steps], alpha, decimals)
        ids = tokenizer.encode(text)
        examples.append({"trajectory": int(idx), "raw": traj[:steps].tolist(), "text": text, "token_ids": ids})
        print(f"\nexample: trajectory {idx}, first {steps} steps")
        print("  raw (prey, predator):", np.array2string(traj[:steps], precision=4, separator=", ").replace("\n", ""))
        print("  preprocessed text:  ", text)
        print("  token ids:          ", ids)
    print()
    return examples


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    common.seed_everything(args.seed)
    out = common.output_dir(args, STAGE)
    ds = common.load_dataset(args)
    indices, trajectories, contexts, truth = forecast_set(ds, args, args.split)
    print(f"data: {ds.data.path} ({ds.data.n_systems} trajectories x {ds.data.n_steps} steps); split {args.split}: "
          f"{len(indices)} trajectories; alpha = {ds.alpha:.5g} (fitted on {len(ds.splits['train'])} training "
          f"trajectories)")
    model, tokenizer = common.load_model(args)
    label = common.weights_label(args.model)
    print(f"model: {args.model} [{label}] on {next(model.parameters()).device}, "
          f"{next(model.parameters()).dtype}")
    examples = show_examples(tokenizer, trajectories, indices, ds.alpha, args.decimals)

    loss_idx, loss_traj = ds.trajectories("validation", args.loss_limit)
    loss_chunks = None
    if len(loss_idx):
        loss_chunks = chunk_texts(tokenizer, [encode(t, ds.alpha, args.decimals) for t in loss_traj],
                                  args.context_length, pad_id=tokenizer.pad_token_id)
    plan = forecast_plan(model.config, tokenizer, contexts, ds.alpha, args)
    if loss_chunks is not None:
        plan += forward_flops(model.config, len(loss_chunks), args.context_length)
    ledger = common.ledger_from(args)
    ledger.check(plan, force=args.force)

    t0 = time.time()
    fc, pred, scores = evaluate_forecasts(model, tokenizer, args, ds.alpha, contexts, truth)
    forecast_seconds = time.time() - t0
    ledger.charge(STAGE, fc.flops, "generate", split=args.split, trajectories=len(indices), samples=args.samples,
                  prompt=args.prompt, model=str(args.model))
    metrics, persistence = scores["metrics"], persistence_metrics(contexts, truth)

    loss = None
    loss_seconds = 0.0
    if loss_chunks is not None:
        t1 = time.time()
        value, loss_flops = validation_loss(model, loss_chunks, args.loss_batch_size, next(model.parameters()).device)
        n_tokens = int((loss_chunks.attention_mask[:, 1:] * loss_chunks.attention_mask[:, :-1]).sum())
        loss_seconds = time.time() - t1
        ledger.charge(STAGE, loss_flops, "eval", what="validation loss", chunks=len(loss_chunks))
        loss = {"loss": value, "tokens": n_tokens, "chunks": len(loss_chunks), "trajectories": len(loss_idx),
                "context_length": args.context_length, "flops": loss_flops}

    results = {
        "stage": STAGE,
        "model": str(args.model),
        "weights": label,
        "data": str(ds.data.path),
        "settings": {k: (str(v) if k == "out" else v) for k, v in vars(args).items()},
        "alpha": ds.alpha,
        "trajectories": len(indices),
        **{k: scores[k] for k in ("parsed_fraction", "steps_invalid", "steps_missing", "metrics")},
        "persistence_metrics": persistence,
        "validation_loss": loss,
        "flops": {"generation": fc.flops, "validation_loss": loss["flops"] if loss else 0,
                  "total": fc.flops + (loss["flops"] if loss else 0), "planned_upper_bound": plan},
        "seconds": {"forecast": forecast_seconds, "validation_loss": loss_seconds},
        "mean_prompt_tokens": float(np.mean(fc.prompt_tokens)),
        "examples": examples,
    }
    common.write_json(out / "results.json", results)
    write_csv(out / "per_trajectory.csv", per_trajectory_rows(indices, pred, truth, fc))
    with open(out / "generations.jsonl", "w") as fh:
        for idx, texts in zip(indices, fc.texts):
            fh.write(json.dumps({"trajectory": int(idx), "texts": texts}) + "\n")
    plotted = plot_forecasts(out / "forecasts.png", ds.data.time, indices, trajectories, fc, args.context_steps,
                             args.horizon, f"zero-shot {args.prompt}, {args.samples} sample(s) — {label}", args.plots)

    print(f"\n{len(indices)} trajectories, {args.prompt} prompt, samples={args.samples}: "
          f"{100 * results['parsed_fraction']:.0f}% parsed completely "
          f"({results['steps_invalid']} invalid, {results['steps_missing']} missing steps)")
    for name in ("prey", "predator"):
        m, p = metrics[name], persistence[name]
        print(f"  {name:9s} MSE {m['mse']:.4f}  MAE {m['mae']:.4f}  R² {m['r2']:.3f}   "
              f"(persistence: MSE {p['mse']:.4f}  MAE {p['mae']:.4f}  R² {p['r2']:.3f})")
    if loss:
        print(f"  validation loss {loss['loss']:.4f} nats/token over {loss['tokens']} tokens")
    print(f"  FLOPs {results['flops']['total']:.3e}; forecast {forecast_seconds:.0f} s, loss {loss_seconds:.0f} s")
    print(f"wrote {out}/results.json, per_trajectory.csv, generations.jsonl" + (", forecasts.png" if plotted else ""))
    return 0


if __name__ == "__main__":
    common.run_cli(main)
