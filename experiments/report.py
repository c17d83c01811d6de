"""REPORT.md from the results on disk: a thin reader of ``results.json`` files (any depth under ``--results``) and the
FLOP ledger. It runs no model and spends no FLOPs.

    python -m experiments.report [--results results] [--ledger results/flops_ledger.jsonl] [--out REPORT.md]
                                 [--overwrite]

Sections (each only if its results exist): tokenized examples, zero-shot forecasting, LoRA with the default
hyperparameters against the untrained model, the lr × rank grid, the context-length study, the final run on the test
split, classical forecasters beside the LLM on the same trajectories (with the
plain verdict of which is better), error by forecast step (PNG), every figure the stages drew, and the FLOP table
of every experiment against the 1e17 budget. An existing ``--out`` is replaced only with ``--overwrite``, and only if
the report wrote it (its header lines); a ledger that is not one is refused.
"""

from __future__ import annotations

import stat
from pathlib import Path

from miniqwen.atomic import atomic_write

from .lib.budget import Ledger
from .lib.cli import ArgumentParser, run_cli
from .lib.errors import UsageError
from .lib.reporting import check_readable, render, written_by_report
from .lib.results import find_results


def main(argv=None) -> int:
    p = ArgumentParser(prog="python -m experiments.report", description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default="results", help="directory searched for results.json (default results)")
    p.add_argument("--ledger", default=None, help="FLOP ledger (default: <results>/flops_ledger.jsonl)")
    p.add_argument("--out", default="REPORT.md", help="report file (default REPORT.md)")
    p.add_argument("--overwrite", action="store_true", help="replace a report already at --out")
    args = p.parse_args(argv)
    root_results = Path(args.results).expanduser()
    if not root_results.is_dir():
        raise UsageError(f"--results {root_results}: not a directory")
    out = Path(args.out).expanduser()
    if out.is_dir():
        raise UsageError(f"--out {out} is a directory: give the report's file name (e.g. {out / 'REPORT.md'})")
    if out.exists() or out.is_symlink():
        if not written_by_report(out):
            raise UsageError(f"--out {out} exists and is not a report this command wrote: choose another --out")
        if not args.overwrite:
            raise UsageError(f"--out {out} already holds a report: pass --overwrite to replace it, or choose "
                             "another --out")
    ledger_path = Path(args.ledger).expanduser() if args.ledger else root_results / "flops_ledger.jsonl"
    if args.ledger and not ledger_path.exists():  # a typo would otherwise report "total 0 FLOPs"
        raise UsageError(f"--ledger {ledger_path}: no such file")
    if ledger_path.exists() and not stat.S_ISREG(ledger_path.stat().st_mode):  # a FIFO would block the read
        raise UsageError(f"{'--ledger ' if args.ledger else 'ledger '}{ledger_path}: not a regular file")
    ledger = Ledger(ledger_path)
    if ledger_path.exists():
        ledger.entries()  # LedgerError (one line) for a file that is not a ledger, before anything is written
    results = find_results(root_results)
    check_readable(results, root_results)
    figures = root_results / "report"
    figures.mkdir(parents=True, exist_ok=True)
    text = render(results, ledger, root_results, figures, out.resolve().parent)
    atomic_write(out, text)
    print(f"wrote {out} from {len(results)} results under {root_results}")
    return 0


if __name__ == "__main__":
    run_cli(main)
