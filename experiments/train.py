"""Train LoRA on token-chunk files from the command line (the training loop without a stage around it; the tests
use it to kill and resume a real process).

    python -m experiments.train --model DIR --train-chunks train.safetensors [--val-chunks val.safetensors] \\
        --out runs/x [--rank 4 --lr 1e-5 --batch-size 4 --max-steps 100 ...] [--resume] [--no-ledger]
    torchrun --standalone --nproc_per_node 2 -m experiments.train ...   # one run over 2 processes (global batch)

Chunk files hold two int64 tensors ``input_ids`` and ``attention_mask`` [M, L] (:func:`save_chunks`).
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from data.chunks import Chunks
from miniqwen import load_pretrained

from . import settings
from .budget import Ledger
from .training import distributed, train


def save_chunks(chunks: Chunks, path: str | os.PathLike) -> None:
    """Write ``chunks`` to a safetensors file (tensors ``input_ids`` and ``attention_mask``, [M, L] int64)."""
    save_file({"input_ids": chunks.input_ids.contiguous(), "attention_mask": chunks.attention_mask.contiguous()},
              str(path))


def load_chunks(path: str | os.PathLike) -> Chunks:
    """Read chunks written by :func:`save_chunks`. Raises UsageError naming the file if it is missing or not one."""
    try:
        t = load_file(str(path))
    except (FileNotFoundError, SafetensorError, OSError) as err:
        raise settings.UsageError(f"{path}: not a readable chunk file ({err})") from None
    if set(t) != {"input_ids", "attention_mask"}:
        raise settings.UsageError(f"{path}: expected tensors input_ids and attention_mask, found {sorted(t)}")
    return Chunks(input_ids=t["input_ids"].long(), attention_mask=t["attention_mask"].long())


def main(argv=None) -> int:
    p = settings.parser("python -m experiments.train", __doc__.split("\n\n")[0], "run", "lora", "train")
    p.add_argument("--train-chunks", required=True, help="safetensors file from save_chunks")
    p.add_argument("--val-chunks", default=None, help="safetensors file from save_chunks (optional)")
    p.add_argument("--stage", default="train", help="ledger stage name (default 'train')")
    p.add_argument("--no-ledger", action="store_true", help="charge nothing (tiny test models only)")
    p.add_argument("--kill-after-step", type=int, default=None,
                   help="testing aid: SIGKILL this process right after step K (simulates a crash)")
    p.add_argument("--kill-rank", type=int, default=None,
                   help="testing aid, under torchrun: only rank R is killed by --kill-after-step (default: every rank)")
    s = settings.parse(p, argv)
    run = s["run"]
    if run.out is None:
        raise settings.UsageError("--out is required")
    train_chunks = load_chunks(s["train_chunks"])
    val_chunks = load_chunks(s["val_chunks"]) if s["val_chunks"] else None
    precision = "float32" if run.precision == "auto" else run.precision
    model, _ = load_pretrained(run.model, dtype="float32", device=distributed.device(run.device or "cpu"))

    def on_step(step: int) -> None:
        if step == s["kill_after_step"] and s["kill_rank"] in (None, distributed.rank()):
            os.kill(os.getpid(), signal.SIGKILL)

    summary = train(model, train_chunks, val_chunks, s["train"], Path(run.out), lora=s["lora"], seed=run.seed,
                    stage=s["stage"], precision=precision, ledger=None if s["no_ledger"] else Ledger(run.ledger),
                    resume=run.resume, force=run.force, on_step=on_step)
    if distributed.is_main():
        print(json.dumps({k: v for k, v in summary.items() if k not in ("settings", "lora")}, indent=2))
    return 0


if __name__ == "__main__":
    settings.run_cli(main)
