"""The benchmark's command line: its sections, its parser, and the checks of every option (and of ``--out``) that
run before any section does."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from miniqwen.loading import DEFAULT_MODEL

from ..cli import ArgumentParser
from ..errors import UsageError
from ..settings import MODEL_ENV_VAR

SECTIONS = ("peak", "counting", "throughput", "forward", "train", "loss", "forecast")
#: the sections that run transformers (+PEFT) beside miniqwen, and what they import
NEEDS_TRANSFORMERS = {"forward": ("transformers",), "train": ("transformers", "peft"), "forecast": ("transformers",)}
#: the sections that read the data file
NEEDS_DATA = ("forward", "train", "loss", "forecast")
#: options that must be >= 1, then those that must be >= 0
POSITIVE = ("repeats", "peak_size", "bandwidth_mib", "bookkeeping_repeats", "prompt_len", "new_tokens",
            "forward_batch", "forward_seq", "train_batch", "train_context", "loss_batch_size", "trajectories",
            "gen_batch_size", "context_steps", "horizon")
NON_NEGATIVE = ("batch1_sample", "loss_chunks", "decimals")


def _ints(text: str) -> list[int]:
    """Comma-separated integers (one trailing comma allowed, as in every list option); an empty element between
    commas is an error (ValueError: argparse names the option), not skipped."""
    items = text.split(",")
    if items and not items[-1].strip():
        items.pop()
    if not items or any(not x.strip() for x in items):
        raise ValueError(text)
    return [int(x) for x in items]


def build_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The parser of every benchmark option, with its default; values are checked by :func:`check_options`."""
    p = ArgumentParser(prog=prog, description=description)
    a = p.add_argument
    a("--model", default=os.environ.get(MODEL_ENV_VAR, DEFAULT_MODEL),
      help=f"HF-layout model directory or Hub repo id (default: ${MODEL_ENV_VAR} or {DEFAULT_MODEL})")
    a("--data", default=None, help="Lotka-Volterra HDF5 file (default: $MINIQWEN_DATA, then the usual places)")
    a("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    a("--precision", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
      help="the default dtype compared beside float32 (auto: bf16 on CUDA and on CPUs with native bf16)")
    a("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    a("--sections", default=",".join(SECTIONS), help=f"comma-separated, any of {','.join(SECTIONS)} (default all)")
    a("--repeats", type=int, default=3, help="timed repeats per measurement, after a warm-up (default 3)")
    a("--out", type=Path, default=Path("runs/benchmark"), help="output directory (default runs/benchmark)")
    a("--overwrite", action="store_true", help="replace a benchmark.json / benchmark.md already in --out")
    a("--peak-size", type=int, default=2048, help="n of the n × n matmul peak (default 2048)")
    a("--bandwidth-mib", type=int, default=1024,
      help="MiB read (summed) to measure the memory read bandwidth (default 1024)")
    a("--counting-lengths", type=_ints, default=[1, 128, 512], help="forward lengths timed with/without counting")
    a("--bookkeeping-repeats", type=int, default=300, help="repeats of the counting bookkeeping (default 300)")
    a("--throughput-batches", type=_ints, default=[1, 8, 20], help="decode batch sizes (default 1,8,20)")
    a("--prompt-len", type=int, default=256, help="throughput prompt length (default 256)")
    a("--new-tokens", type=int, default=16, help="throughput decoding steps (default 16)")
    a("--forward-batch", type=int, default=4, help="forward batch (default 4)")
    a("--forward-seq", type=int, default=512, help="forward length (default 512)")
    a("--train-batch", type=int, default=4, help="training batch (default 4, the coursework's)")
    a("--train-context", type=int, default=512, help="training context length (default 512, the coursework's)")
    a("--loss-chunks", type=int, default=16, help="validation chunks for the loss comparison (default 16; 0 = all)")
    a("--loss-context", type=int, default=512, help="validation chunk length (default 512)")
    a("--loss-batch-size", type=int, default=4, help="validation chunks per batch (default 4)")
    a("--trajectories", type=int, default=100, help="validation trajectories forecast (default 100 = all)")
    a("--batch1-sample", type=int, default=3, help="trajectories timed at batch 1, then extrapolated (default 3)")
    a("--gen-batch-size", type=int, default=20, help="forecast batch size, both sides (default 20)")
    a("--context-steps", type=int, default=80, help="observed steps per forecast (default 80)")
    a("--horizon", type=int, default=20, help="forecast steps (default 20)")
    a("--decimals", type=int, default=2, help="decimals per value in the LLMTIME text (default 2)")
    return p


def check_device(name: str | None) -> None:
    """Refuse (UsageError naming --device) a device that is not cpu, cuda or cuda:N, or CUDA where there is none."""
    if name is None:
        return
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name!r}: must be cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name!r}: CUDA is not available on this machine (use cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def _check_lists(args: argparse.Namespace) -> None:
    for name, low in (("counting_lengths", 1), ("throughput_batches", 1)):
        values = getattr(args, name)
        if not values or min(values) < low:
            raise UsageError(f"--{name.replace('_', '-')} {','.join(map(str, values)) or repr('')}: must be "
                             f"comma-separated integers >= {low}")


def _sections(text: str) -> list[str]:
    sections = [s.strip() for s in text.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown or not sections:
        raise UsageError(f"--sections {text!r}: must be comma-separated names among {', '.join(SECTIONS)}")
    return sections


def _check_bounds(args: argparse.Namespace) -> None:
    for names, low in ((POSITIVE, 1), (NON_NEGATIVE, 0)):
        for name in names:
            if getattr(args, name) < low:
                raise UsageError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= {low}")


def check_options(args: argparse.Namespace) -> list[str]:
    """Check the parsed options (expanding ``~`` in ``args.out``) and return the sections to run, in the given
    order. Raises UsageError naming the first bad option; reads no file and loads nothing."""
    args.out = args.out.expanduser()
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads {args.threads}: must be an integer >= 1 (or left out for torch's choice)")
    _check_lists(args)
    if args.loss_context < 2:
        raise UsageError(f"--loss-context {args.loss_context}: must be >= 2 (a chunk needs a token to predict)")
    check_device(args.device)
    sections = _sections(args.sections)
    _check_bounds(args)
    return sections


def packages_needed(sections: list[str]) -> list[str]:
    """The third-party packages (sorted) that ``sections`` need beside miniqwen: transformers, peft."""
    return sorted({m for s in sections for m in NEEDS_TRANSFORMERS.get(s, ())})
