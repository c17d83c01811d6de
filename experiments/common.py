"""What every experiment shares: command-line options, loading data and model with clear errors, seeding, output."""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data import DataError, LotkaVolterraData, fit_scale, load_trajectories, resolve_data_path, split_indices
from miniqwen import ConfigError, WeightsError, load_pretrained
from miniqwen.loading import DEFAULT_MODEL

from .budget import BudgetExceededError, Ledger, LedgerError

MODEL_ENV_VAR = "MINIQWEN_MODEL"


class UsageError(ValueError):
    """Options that cannot work together (e.g. a horizon longer than the data); reported in one line."""


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """Options shared by all stages: model, data, split scaling, device, dtype, seed, output, ledger."""
    parser.add_argument("--model", default=os.environ.get(MODEL_ENV_VAR, DEFAULT_MODEL),
                        help=f"HF-layout model directory or Hub repo id (default: ${MODEL_ENV_VAR} or {DEFAULT_MODEL})")
    parser.add_argument("--data", default=None,
                        help="Lotka-Volterra HDF5 file (default: $MINIQWEN_DATA, data/lotka_volterra_data.h5, "
                             "or ../shared/data/lotka_volterra_data.h5)")
    parser.add_argument("--decimals", type=int, default=2, help="decimals per value in LLMTIME text (default 2)")
    parser.add_argument("--scale-quantile", type=float, default=0.99,
                        help="alpha = this quantile of the training values / --scale-target (default 0.99)")
    parser.add_argument("--scale-target", type=float, default=10.0, help="value the quantile maps to (default 10)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="weights dtype (default: float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: runs/<stage>)")
    parser.add_argument("--ledger", default=None, help="FLOP ledger file (default: $MINIQWEN_LEDGER or "
                                                       "runs/flops_ledger.jsonl)")
    parser.add_argument("--force", action="store_true", help="run even if the FLOP budget would be exceeded")


@dataclass
class Dataset:
    """The loaded data with its split and the LLMTIME scale α (fitted on the training split only)."""

    data: LotkaVolterraData
    splits: dict[str, np.ndarray]
    alpha: float

    def trajectories(self, split: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(indices (n,), trajectories (n, T, 2))`` of the first ``limit`` trajectories of ``split``."""
        idx = self.splits[split][:limit]
        return idx, self.data.trajectories[idx]


def load_dataset(args: argparse.Namespace) -> Dataset:
    """Load and validate ``--data``, split it 80/10/10 by trajectory and fit α on the training split."""
    data = load_trajectories(resolve_data_path(args.data))
    splits = split_indices(data.n_systems)
    alpha = fit_scale(data.trajectories[splits["train"]], args.scale_quantile, args.scale_target)
    return Dataset(data, splits, alpha)


def weights_label(model: str | os.PathLike) -> str:
    """What the weights are, for results: the first line of a PROVENANCE.txt beside them (the offline dequantized
    build writes one), else ``model`` as given (a directory or Hub repo id)."""
    provenance = Path(model) / "PROVENANCE.txt"
    return provenance.read_text().splitlines()[0] if provenance.is_file() else str(model)


def load_model(args: argparse.Namespace):
    """``(model, tokenizer)`` from ``--model`` on ``--device`` in ``--dtype``."""
    return load_pretrained(args.model, dtype=args.dtype, device=args.device)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def output_dir(args: argparse.Namespace, stage: str) -> Path:
    """``--out`` or ``runs/<stage>``, created."""
    out = Path(args.out) if args.out else Path("runs") / stage
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_json(path: Path, obj) -> None:
    """Write ``obj`` as indented JSON atomically (temp file + rename), so a crash never leaves half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_jsonable) + "\n")
    os.replace(tmp, path)


def _jsonable(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def run_cli(main) -> None:
    """Run ``main()`` and turn the errors a user can fix into one clear line on stderr and exit status 2."""
    try:
        sys.exit(main())
    except (UsageError, DataError, WeightsError, ConfigError, BudgetExceededError, LedgerError,
            FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def ledger_from(args: argparse.Namespace) -> Ledger:
    """The FLOP ledger named by ``--ledger`` (or the default)."""
    return Ledger(args.ledger)
