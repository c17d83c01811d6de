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
from pathlib import Path

import numpy as np

from data import chunk_texts, encode
from miniqwen.flops import forward_flops

from . import common
from .forecasting import (
    fill_missing, forecast, forecast_metrics, forecast_prompt, max_tokens_per_step, per_trajectory_rows,
    plot_forecasts, token_loss, write_csv,
)

STAGE = "baseline"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.baseline", description=__doc__.split("\n\n")[0])
    common.add_common_args(p)
    p.add_argument("--split", default="validation", choices=["train", "validation", "test"])
    p.add_argument("--limit", type=int, default=None, help="number of trajectories of the split (default: all)")
    p.add_argument("--context-steps", type=int, default=80, help="observed time steps in the prompt (default 80)")
    p.add_argument("--horizon", type=int, default=20, help="time steps to forecast (default 20)")
    p.add_argument("--prompt", default="raw", choices=["raw", "chat"],
                   help="raw LLMTIME continuation, or an instruction in the Qwen chat format")
    p.add_argument("--samples", type=int, default=1, help="1 = greedy; N = median of N samples (LLMTIME)")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature when --samples > 1")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus mass when --samples > 1")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generation batch (default 8)")
    p.add_argument("--loss-limit", type=int, default=None,
                   help="validation trajectories for the token loss (default: all of the validation split; 0 = skip)")
    p.add_argument("--context-length", type=int, default=512, help="tokens per validation-loss chunk (default 512)")
    p.add_argument("--plots", type=int, default=4, help="forecasts drawn in forecasts.png (default 4)")
    return p


def weights_label(model_dir) -> str:
    """First line of a PROVENANCE.txt beside the weights (e.g. the offline dequantized build), else the name."""
    provenance = Path(str(model_dir)) / "PROVENANCE.txt"
    return provenance.read_text().splitlines()[0] if provenance.is_file() else str(model_dir)


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


def planned_flops(config, prompt_lens, batch_size, samples, max_new, loss_chunks, loss_len) -> int:
    """Closed-form FLOPs of this run (an upper bound: every row generates ``max_new`` tokens)."""
    total, lens = 0, sorted(prompt_lens)  # forecast() batches prompts sorted by length
    for start in range(0, len(lens), batch_size):
        b, L = len(lens[start : start + batch_size]), max(lens[start : start + batch_size])
        total += forward_flops(config, b, L, logits_to_keep=1)
        total += sum(forward_flops(config, b * samples, 1, cache_len=L + i, logits_to_keep=1)
                     for i in range(max_new - 1))
    if loss_chunks:
        total += forward_flops(config, loss_chunks, loss_len)
    return total


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    common.seed_everything(args.seed)
    out = common.output_dir(args, STAGE)
    ds = common.load_dataset(args)
    T = ds.data.n_steps
    if args.context_steps < 1 or args.horizon < 1 or args.context_steps + args.horizon > T:
        raise common.UsageError(f"--context-steps + --horizon must be <= {T} time steps and both >= 1")
    indices, trajectories = ds.trajectories(args.split, args.limit)
    if len(indices) == 0:
        raise common.UsageError(f"split {args.split!r} is empty")
    print(f"data: {ds.data.path} ({ds.data.n_systems} trajectories x {T} steps); split {args.split}: "
          f"{len(indices)} trajectories; alpha = {ds.alpha:.5g} (fitted on {len(ds.splits['train'])} training "
          f"trajectories)")
    model, tokenizer = common.load_model(args)
    label = weights_label(args.model)
    print(f"model: {args.model} [{label}] on {next(model.parameters()).device}, "
          f"{next(model.parameters()).dtype}")
    examples = show_examples(tokenizer, trajectories, indices, ds.alpha, args.decimals)

    contexts = trajectories[:, : args.context_steps]
    truth = trajectories[:, args.context_steps : args.context_steps + args.horizon].astype(np.float64)
    prompt_lens = [len(tokenizer.encode(forecast_prompt(c, ds.alpha, args.decimals, args.horizon, args.prompt)))
                   for c in contexts]
    loss_idx, loss_traj = ds.trajectories("validation", args.loss_limit)
    loss_chunks = None
    if len(loss_idx):
        loss_chunks = chunk_texts(tokenizer, [encode(t, ds.alpha, args.decimals) for t in loss_traj],
                                  args.context_length, pad_id=tokenizer.pad_token_id)
    max_new = max_tokens_per_step(args.decimals) * args.horizon
    plan = planned_flops(model.config, prompt_lens, args.batch_size, args.samples, max_new,
                         len(loss_chunks) if loss_chunks else 0, args.context_length)
    ledger = common.ledger_from(args)
    ledger.check(plan, force=args.force)

    t0 = time.time()
    fc = forecast(model, tokenizer, contexts, args.horizon, ds.alpha, args.decimals, args.prompt, args.samples,
                  args.batch_size, args.seed, args.temperature, args.top_p)
    forecast_seconds = time.time() - t0
    ledger.charge(STAGE, fc.flops, "generate", split=args.split, trajectories=len(indices), samples=args.samples,
                  prompt=args.prompt, model=str(args.model))
    pred = fill_missing(fc.values, contexts.astype(np.float64))
    metrics = forecast_metrics(pred, truth)
    persistence = forecast_metrics(fill_missing(np.full_like(truth, np.nan), contexts.astype(np.float64)), truth)

    loss = None
    loss_seconds = 0.0
    if loss_chunks is not None:
        t1 = time.time()
        value, n_tokens, loss_flops = token_loss(model, loss_chunks, batch_size=max(1, args.batch_size // 2))
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
        "parsed_fraction": float(fc.complete.mean()),
        "steps_invalid": int(fc.n_invalid.sum()),
        "steps_missing": int(fc.n_missing.sum()),
        "metrics": metrics,
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
