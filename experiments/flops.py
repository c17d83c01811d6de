"""FLOP tables for the coursework: per-component costs, per-token cost, the planned cost of every stage, the ledger.

Usage::

    python -m experiments.flops [--out runs/flops] [--ledger PATH] [--model DIR] [--overwrite]

Prints everything and writes ``<out>/flop_tables.md`` and ``<out>/flop_tables.json`` in a run directory (with its
run record; an earlier one is replaced only with ``--overwrite``, a directory of other files never). All numbers come from the
closed form :func:`miniqwen.flop_count.forward_flops_breakdown` (coursework FLOP rules; tested equal to what the model
modules count), for ``config.json`` in ``--model DIR`` or, without it, :class:`miniqwen.config.Qwen2Config`'s
defaults (Qwen2.5-0.5B-Instruct). Nothing here runs a model: it takes well under a second.

The plan is derived, not written down: every stage's own ``plan`` function at the stage's own default settings
(:func:`experiments.lib.plans.stage_plans`), so changing a stage's defaults changes the plan. Conventions: training =
3× forward, evaluation/generation = 1× forward.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from miniqwen.atomic import atomic_write
from miniqwen.config import ConfigError

from .lib.budget import Ledger
from .lib.cli import ArgumentParser, run_cli
from .lib.flop_tables import load_config, render
from .lib.plans import stage_plans
from .lib.run_directory import claim_out, record_written

__all__ = ["main", "stage_plans"]


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code (2 for a bad --model, else 0). Raises LedgerError for a ledger that is
    not one (``run_cli``: one line, exit 2), before anything is written."""
    parser = ArgumentParser(prog="python -m experiments.flops", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/flops", help="output directory (default runs/flops)")
    parser.add_argument("--ledger", default=None, help="ledger file (default $MINIQWEN_LEDGER or "
                                                       "runs/flops_ledger.jsonl)")
    parser.add_argument("--model", default=None, help="model directory with config.json (default: "
                                                      "Qwen2.5-0.5B-Instruct's sizes)")
    parser.add_argument("--overwrite", action="store_true", help="replace the flops run already in --out")
    args = parser.parse_args(argv)
    out = Path(args.out).expanduser()
    try:
        config = load_config(args.model)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    ledger = Ledger(args.ledger)
    ledger.entries()  # a ledger that is not one is refused (LedgerError, one line) before anything is written
    claim_out(out, "flops", {"model": args.model}, overwrite=args.overwrite)
    source = f"config from {args.model}" if args.model else "Qwen2Config() defaults = Qwen2.5-0.5B-Instruct"
    text, data = render(config, source, ledger)
    print(text)
    atomic_write(out / "flop_tables.md", text)
    atomic_write(out / "flop_tables.json", json.dumps(data, indent=2) + "\n")
    record_written(out, ignore=(str(ledger.path),))
    print(f"wrote {out / 'flop_tables.md'} and {out / 'flop_tables.json'}")
    return 0


if __name__ == "__main__":
    run_cli(main)
