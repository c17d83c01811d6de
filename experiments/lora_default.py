"""LoRA fine-tuning of Qwen2.5-0.5B-Instruct on LLMTIME Lotka–Volterra text with the coursework's default
hyperparameters (rank 4 on q_proj and v_proj, learning rate 1e-5, batch size 4, context length 512, up to 10,000
steps), then the same evaluation as ``experiments.baseline`` before and after training.

    python -m experiments.lora_default --model DIR --data FILE [--max-steps N] [--context-length L] [--limit N] …

Steps: fit the LLMTIME scale on the training split; cut the training and validation trajectories into token chunks;
forecast ``--horizon`` steps after ``--context-steps`` observed steps of ``--limit`` validation trajectories with
the untrained model; train LoRA with :func:`experiments.train.train` (validation loss on a fixed subset of the
validation chunks at step 0, every ``--eval-every`` steps and at the end; checkpoints; ``--resume``); forecast the
same trajectories again with the trained adapter. Writes under ``--out`` (default ``runs/lora_default``):

    results.json            settings, untrained vs trained (validation loss, MSE/MAE/R² per species, parse rate),
                            persistence for scale, training summary, FLOPs, and the side-by-side table
    README.md               the table and the command that produced it
    training/               the training run (log.jsonl, loss_curve.png, adapter/, best_adapter/, checkpoint/)
    peft_adapter/           the trained adapter in PEFT's format (loadable with transformers + peft)
    untrained.json          the untrained forecast evaluation (reused by --resume)
    per_trajectory.csv, forecasts_untrained.png, forecasts_trained.png

Every FLOP is charged to the ledger under stage ``lora_default`` (generation and evaluation 1× forward, training 3×).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from data import chunk_texts, encode
from lora import apply_lora, count_trainable_parameters, export_peft

from . import common
from .forecasting import (
    add_forecast_args, evaluate_forecasts, forecast_plan, forecast_set, per_trajectory_rows, persistence_metrics,
    plot_forecasts, write_csv,
)
from .train import TrainConfig, add_train_args, config_from_args, planned_flops, read_log, train, validation_rows

STAGE = "lora_default"
DEFAULTS = TrainConfig(stage=STAGE, lr=1e-5, batch_size=4, context_length=512, max_steps=10_000, eval_every=500,
                       eval_batches=8, checkpoint_every=500)
#: settings that must match for a saved untrained evaluation to be reused
_FORECAST_KEYS = ("model", "data", "decimals", "scale_quantile", "scale_target", "limit", "context_steps", "horizon",
                  "prompt", "samples", "temperature", "top_p", "gen_batch_size", "seed", "dtype")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.lora_default", description=__doc__.split("\n\n")[0])
    common.add_common_args(p)
    add_train_args(p, DEFAULTS)
    p.add_argument("--train-limit", type=int, default=None,
                   help="use only the first N training trajectories (default: all)")
    p.add_argument("--limit", type=int, default=None,
                   help="validation trajectories to forecast before and after training (default: all)")
    add_forecast_args(p, batch_flag="--gen-batch-size")
    return p


def comparison_table(untrained: dict, trained: dict, persistence: dict) -> str:
    """Markdown table: validation loss, per-species MSE / MAE / R² and parse rate, untrained vs trained."""
    def fmt(x, spec):
        return "–" if x is None or (isinstance(x, float) and np.isnan(x)) else format(x, spec)

    rows = [("validation loss (nats/token)", untrained["val_loss"], trained["val_loss"], None, ".4f")]
    for species in ("prey", "predator"):
        for key, spec in (("mse", ".4f"), ("mae", ".4f"), ("r2", ".3f")):
            rows.append((f"{species} {key.upper() if key != 'r2' else 'R²'}", untrained["metrics"][species][key],
                         trained["metrics"][species][key], persistence[species][key], spec))
    rows.append(("forecasts parsed completely", untrained["parsed_fraction"], trained["parsed_fraction"], None, ".0%"))
    lines = ["| metric | untrained | trained (LoRA) | persistence |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {name} | {fmt(u, s)} | {fmt(t, s)} | {fmt(p, s)} |" for name, u, t, p, s in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    common.seed_everything(args.seed)
    out = common.output_dir(args, STAGE)
    ds = common.load_dataset(args)
    indices, trajectories, contexts, truth = forecast_set(ds, args)
    targets = tuple(t for t in args.targets.split(",") if t)
    if not args.resume and (out / "training" / "checkpoint").exists():
        raise common.UsageError(f"{out / 'training'} already holds a training run: pass --resume to continue it, "
                                "or choose another --out")

    model, tokenizer = common.load_model(args)
    device = next(model.parameters()).device
    config = config_from_args(args, STAGE, str(device), args.seed)
    config.validate()
    print(f"data: {ds.data.path}; alpha = {ds.alpha:.5g}; model {args.model} on {device}, "
          f"{next(model.parameters()).dtype}")

    # ---- data: whole trajectories as LLMTIME text, cut into token chunks
    _, train_traj = ds.trajectories("train", args.train_limit)
    val_idx_all, val_traj_all = ds.trajectories("validation")
    if len(train_traj) == 0 or len(val_traj_all) == 0:
        raise common.UsageError("need at least one training and one validation trajectory")
    pad = tokenizer.pad_token_id
    train_chunks = chunk_texts(tokenizer, [encode(t, ds.alpha, args.decimals) for t in train_traj],
                               args.context_length, stride=args.stride, pad_id=pad)
    val_chunks = chunk_texts(tokenizer, [encode(t, ds.alpha, args.decimals) for t in val_traj_all],
                             args.context_length, stride=args.stride, pad_id=pad)
    print(f"chunks: {len(train_chunks)} training ({len(train_traj)} trajectories), {len(val_chunks)} validation; "
          f"context {args.context_length}, stride {args.stride or args.context_length}")

    persistence = persistence_metrics(contexts, truth)

    # ---- budget: untrained + trained forecasts + training (what is left of it when resuming)
    untrained_path = out / "untrained.json"
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    forecast_settings = {k: settings.get(k) for k in _FORECAST_KEYS}
    saved_untrained = json.loads(untrained_path.read_text()) if untrained_path.is_file() else None
    reuse_untrained = bool(args.resume and saved_untrained and saved_untrained["settings"] == forecast_settings)
    gen_plain = forecast_plan(model.config, tokenizer, contexts, ds.alpha, args)
    gen_lora = forecast_plan(model.config, tokenizer, contexts, ds.alpha, args, args.rank, targets)
    start_step = 0
    checkpoint_state = out / "training" / "checkpoint" / "state.json"
    if args.resume and checkpoint_state.is_file():
        start_step = json.loads(checkpoint_state.read_text())["step"]
    train_plan = planned_flops(model.config, config, validation_rows(len(val_chunks), config), start_step,
                               args.rank, targets)
    plan = (0 if reuse_untrained else gen_plain) + train_plan + gen_lora
    print(f"planned FLOPs: untrained forecast {0 if reuse_untrained else gen_plain:.3e}, training {train_plan:.3e}, "
          f"trained forecast {gen_lora:.3e}")
    ledger = common.ledger_from(args)
    ledger.check(plan, force=args.force)

    # ---- untrained evaluation
    if reuse_untrained:
        untrained = saved_untrained["untrained"]
        print(f"reusing the untrained evaluation in {untrained_path}")
    else:
        fc0, pred0, untrained = evaluate_forecasts(model, tokenizer, args, ds.alpha, contexts, truth)
        ledger.charge(STAGE, untrained["flops"], "generate", what="untrained forecast", trajectories=len(indices))
        common.write_json(untrained_path, {"settings": forecast_settings, "untrained": untrained})
        plot_forecasts(out / "forecasts_untrained.png", ds.data.time, indices, trajectories, fc0, args.context_steps,
                       args.horizon, f"untrained, {args.prompt} prompt", args.plots)

    # ---- training
    torch.manual_seed(args.seed)  # the LoRA init (a resumed run loads its checkpoint instead)
    apply_lora(model, args.rank, args.alpha, targets)
    print(f"LoRA rank {args.rank} on {', '.join(targets)}: {count_trainable_parameters(model):,} trainable parameters")
    t0 = time.time()
    summary = train(model, train_chunks, val_chunks, config, out / "training", ledger=ledger, resume=args.resume,
                    force=args.force)
    train_seconds = time.time() - t0
    evals = [e for e in read_log(out / "training" / "log.jsonl") if e["kind"] == "eval"]
    untrained["val_loss"] = evals[0]["val_loss"] if evals and evals[0]["step"] == 0 else None
    export_peft(model, out / "peft_adapter", base_model_name_or_path=str(args.model))

    # ---- trained evaluation
    model.eval()
    fc1, pred1, trained = evaluate_forecasts(model, tokenizer, args, ds.alpha, contexts, truth)
    ledger.charge(STAGE, trained["flops"], "generate", what="trained forecast", trajectories=len(indices))
    trained["val_loss"] = summary["val_loss"]
    write_csv(out / "per_trajectory.csv", per_trajectory_rows(indices, pred1, truth, fc1))
    plot_forecasts(out / "forecasts_trained.png", ds.data.time, indices, trajectories, fc1, args.context_steps,
                   args.horizon, f"LoRA r={args.rank}, {summary['steps']} steps, {args.prompt} prompt", args.plots)

    table = comparison_table(untrained, trained, persistence)
    total_flops = summary["total_flops"] + trained["flops"] + untrained["flops"]
    results = {
        "stage": STAGE,
        "model": str(args.model),
        "weights": common.weights_label(args.model),
        "data": str(ds.data.path),
        "settings": settings,
        "alpha": ds.alpha,
        "forecast_trajectories": [int(i) for i in indices],
        "train_trajectories": len(train_traj),
        "chunks": {"train": len(train_chunks), "validation": len(val_chunks),
                   "validation_subset": summary["val_chunks_evaluated"]},
        "untrained": untrained,
        "trained": trained,
        "persistence_metrics": persistence,
        "training": summary,
        "flops": {"untrained_forecast": untrained["flops"], "training": summary["train_flops"],
                  "validation_loss": summary["eval_flops"], "trained_forecast": trained["flops"],
                  "total": total_flops, "planned_upper_bound": plan},
        "seconds": {"training_this_session": train_seconds},
        "table_markdown": table,
    }
    common.write_json(out / "results.json", results)
    command = "python -m experiments.lora_default " + " ".join(sys.argv[1:] if argv is None else argv)
    (out / "README.md").write_text(
        f"# LoRA, default hyperparameters\n\n`{command}`\n\n"
        f"Rank {args.rank} on {', '.join(targets)}, lr {args.lr:g}, batch {args.batch_size}, context "
        f"{args.context_length}, {summary['steps']} steps ({summary['epochs']:.2f} epochs of {len(train_chunks)} "
        f"chunks); forecasts of {len(indices)} validation trajectories ({args.context_steps} steps observed, "
        f"{args.horizon} forecast); validation loss on {summary['val_chunks_evaluated']} fixed validation chunks.\n\n"
        f"{table}\n\nFLOPs: {total_flops:.3e} (training {summary['train_flops']:.3e}, validation loss "
        f"{summary['eval_flops']:.3e}, forecasts {untrained['flops'] + trained['flops']:.3e}).\n")
    print("\n" + table)
    print(f"\nFLOPs {total_flops:.3e}; wrote {out}/results.json, README.md, training/, peft_adapter/")
    return 0


if __name__ == "__main__":
    common.run_cli(main)
