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

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from data.chunks import Chunks
from data.series import not_a_regular_file

from .lib import cli, errors, loader, settings
from .lib.budget import Ledger
from .lib.loader import emulation
from .lib.run_directory import claim_out, inspect_out, record_written
from .lib.training import distributed
from .lib.costs import training_cost
from .lib.training.checkpoint import checkpoint_step
from .lib.training.loop import check_chunks, train_lora
from .lib.training.loss import validation_subset


def save_chunks(chunks: Chunks, path: str | os.PathLike) -> None:
    """Write ``chunks`` to a safetensors file (tensors ``input_ids`` and ``attention_mask``, [M, L] int64)."""
    save_file({"input_ids": chunks.input_ids.contiguous(), "attention_mask": chunks.attention_mask.contiguous()},
              str(path))


def load_chunks(path: str | os.PathLike) -> Chunks:
    """Read chunks written by :func:`save_chunks`. Raises UsageError naming the file if it is missing or not one
    (a FIFO or device is refused before it is opened: reading it would block)."""
    if kind := not_a_regular_file(path):
        raise errors.UsageError(f"{path}: not a chunk file ({kind})")
    try:
        t = load_file(str(path))
    except (FileNotFoundError, SafetensorError, OSError) as err:
        raise errors.UsageError(f"{path}: not a readable chunk file ({err})") from None
    if set(t) != {"input_ids", "attention_mask"}:
        raise errors.UsageError(f"{path}: expected tensors input_ids and attention_mask, found {sorted(t)}")
    ids, mask = t["input_ids"], t["attention_mask"]
    if ids.ndim != 2 or mask.shape != ids.shape:
        raise errors.UsageError(f"{path}: input_ids {list(ids.shape)} and attention_mask {list(mask.shape)} must "
                                "both be [chunks, tokens] of the same shape")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise errors.UsageError(f"{path}: input_ids are {str(ids.dtype).removeprefix('torch.')}, not integers")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise errors.UsageError(f"{path}: attention_mask holds values other than 0 and 1")
    return Chunks(input_ids=ids.long(), attention_mask=mask.long())


def check_chunk_file(chunks: Chunks, path, vocab_size: int) -> None:
    """Refuse (UsageError naming the file) chunks the loop would learn nothing from or fail on: none, token ids
    outside the model's vocabulary, no token to predict (an all-zero mask: the loss would read 0.0). Their width and
    number against the settings are the loop's own check (``training.loop.check_chunks``)."""
    ids, mask = chunks.input_ids, chunks.attention_mask
    if len(ids) == 0:
        raise errors.UsageError(f"{path}: holds no chunks")
    outside = (ids < 0) | (ids >= vocab_size)
    if bool(outside.any()):
        raise errors.UsageError(f"{path}: token id {int(ids[outside][0])} is outside the model's vocabulary "
                                f"0..{vocab_size - 1} ({int(outside.sum())} such ids)")
    if not bool((mask[:, 1:] * mask[:, :-1]).any()):
        raise errors.UsageError(f"{path}: the attention_mask leaves no token to predict (a target needs itself "
                                "and the token before it marked 1): the loss would be a meaningless 0.0")


def main(argv=None) -> int:
    p = cli.parser("python -m experiments.train", __doc__.split("\n\n")[0], "run", "lora", "train")
    p.add_argument("--train-chunks", required=True, help="safetensors file from save_chunks")
    p.add_argument("--val-chunks", default=None, help="safetensors file from save_chunks (optional)")
    p.add_argument("--stage", default="train", help="ledger stage name (default 'train')")
    p.add_argument("--no-ledger", action="store_true", help="charge nothing (tiny test models only)")
    p.add_argument("--kill-after-step", type=int, default=None,
                   help="testing aid: SIGKILL this process right after step K (simulates a crash)")
    p.add_argument("--kill-rank", type=int, default=None,
                   help="testing aid, under torchrun: only rank R is killed by --kill-after-step (default: every rank)")
    s = cli.parse(p, argv)
    if not s["stage"].strip():  # the ledger line it would be charged under needs a name
        raise errors.UsageError("--stage '': the ledger stage name must not be empty")
    for option in ("kill_after_step", "kill_rank"):  # a step or rank that never comes would kill nothing, silently
        if s[option] is not None and s[option] < (1 if option == "kill_after_step" else 0):
            raise errors.UsageError(f"--{option.replace('_', '-')} {s[option]}: must be "
                                    f"{'a step >= 1' if option == 'kill_after_step' else 'a rank >= 0'}")
    run = s["run"]
    if run.out is None:
        raise errors.UsageError("--out is required")
    if s["train"].loss_vocabulary != "full":  # chunk files do not say which alphabet their text was written in
        raise errors.UsageError("--loss-vocabulary numeric: experiments.train trains on token chunks whose "
                                "numeric alphabet it cannot know; use the full vocabulary (or a stage)")
    out = Path(run.out).expanduser()
    if distributed.is_main():
        inspect_out(out)  # under the command line: locks --out for the whole run before anything is read
    train_chunks = load_chunks(s["train_chunks"])
    val_chunks = load_chunks(s["val_chunks"]) if s["val_chunks"] else None
    # float32 weights, autocast to --precision ("auto": float32); the chunks are checked against config.vocab_size
    loaded = loader.load_model(run.model, run.device or "cpu", "float32" if run.precision == "auto" else run.precision,
                               weights_dtype="float32", check_tokenizer=False)
    model = loaded.model
    check_chunk_file(train_chunks, s["train_chunks"], model.config.vocab_size)
    if val_chunks is not None:
        check_chunk_file(val_chunks, s["val_chunks"], model.config.vocab_size)
    check_chunks(train_chunks, val_chunks, s["train"])  # against --batch-size and --context-length

    ledger = None if s["no_ledger"] else Ledger(run.ledger)
    if ledger is not None:  # priced and checked once, here, before --out is written in (a bad ledger: one line)
        start = checkpoint_step(out, loaded.precision) if run.resume else 0
        val_rows = (len(validation_subset(len(val_chunks), s["train"].eval_batches * s["train"].batch_size, run.seed))
                    if val_chunks is not None and len(val_chunks) else 0)
        ledger.check(training_cost(model.config, s["train"], s["lora"], val_rows, start), force=run.force)
    if distributed.is_main():  # the same directory rules as every stage (a user's directory is never written in)
        claim_out(out, "train", settings.as_record(run=run, lora=s["lora"], train=s["train"]),
                  overwrite=run.overwrite, resume=run.resume)

    def on_step(step: int) -> None:
        if step == s["kill_after_step"] and s["kill_rank"] in (None, distributed.rank()):
            os.kill(os.getpid(), signal.SIGKILL)

    with emulation(loaded.device, loaded.precision):  # bf16 emulated where this CPU has none
        summary = train_lora(model, train_chunks, val_chunks, s["train"], out, lora=s["lora"], seed=run.seed,
                             stage=s["stage"], precision=loaded.precision, ledger=ledger, resume=run.resume,
                             on_step=on_step)
    if distributed.is_main():
        record_written(out, ignore=(str(ledger.path),) if ledger else ())
        print(json.dumps({k: v for k, v in summary.items() if k not in ("settings", "lora")}, indent=2))
    return 0


if __name__ == "__main__":
    cli.run_cli(main)
