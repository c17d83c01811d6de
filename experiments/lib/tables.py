"""What a run writes for people to read: Markdown tables of evaluations and of the ledger, the printed summary, the
command line that made a run and the README.md of its directory, and the short sentences the study tables carry."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from miniqwen.atomic import atomic_write

from .budget import BUDGET, Ledger, check_budget, sci
from .results import Evaluation


def format_number(x, spec: str = ".4f") -> str:
    """``x`` formatted with ``spec``, or "–" for a missing value (None or NaN), for Markdown tables."""
    return "–" if x is None or (isinstance(x, float) and np.isnan(x)) else format(x, spec)


def evaluation_table(evaluations: dict[str, Evaluation]) -> str:
    """Markdown table, one column per evaluation: validation loss, per-species MSE / MAE / R², parse rate, FLOPs."""
    names = list(evaluations)
    rows = [("validation loss (nats/token)", [e.validation_loss for e in evaluations.values()], ".4f")]
    for species in ("prey", "predator"):
        for key, label, spec in (("mse", "MSE", ".4f"), ("mae", "MAE", ".4f"), ("r2", "R²", ".3f")):
            rows.append((f"{species} {label}", [e.metrics[species][key] for e in evaluations.values()], spec))
    rows.append(("forecasts parsed completely", [e.parsed_fraction for e in evaluations.values()], ".0%"))
    fallbacks = [(e.settings or {}).get("fallbacks") for e in evaluations.values()]
    if any(isinstance(f, dict) for f in fallbacks):  # classical forecasters: trajectories given persistence
        rows.append(("persistence fallbacks (trajectories)",
                     [f.get("persistence") if isinstance(f, dict) else None for f in fallbacks], "d"))
        if any(isinstance(f, dict) and "short_period" in f for f in fallbacks):
            rows.append(("period shorter than the match (trajectories)",
                         [f.get("short_period") if isinstance(f, dict) else None for f in fallbacks], "d"))
    rows.append(("forecast FLOPs", [e.flops for e in evaluations.values()], ".3g"))
    lines = ["| metric | " + " | ".join(names) + " |", "| --- |" + " ---: |" * len(names)]
    lines += [f"| {label} | " + " | ".join(format_number(v, spec) for v in values) + " |"
              for label, values, spec in rows]
    return "\n".join(lines)


def print_evaluation(evaluation: Evaluation, reference: Evaluation | None = None) -> None:
    """One line per species: MSE / MAE / R² (and the reference's, e.g. persistence, for scale)."""
    print(f"{evaluation.forecaster}: {len(evaluation.trajectories)} trajectories of {evaluation.split}, "
          f"{100 * evaluation.parsed_fraction:.0f}% parsed completely ({evaluation.steps_invalid} invalid, "
          f"{evaluation.steps_missing} missing steps)")
    for name in ("prey", "predator"):
        m = evaluation.metrics[name]
        line = f"  {name:9s} MSE {m['mse']:.4f}  MAE {m['mae']:.4f}  R² {m['r2']:.3f}"
        if reference is not None:
            p = reference.metrics[name]
            line += f"   ({reference.forecaster}: MSE {p['mse']:.4f}  MAE {p['mae']:.4f}  R² {p['r2']:.3f})"
        print(line)


def command_line(module: str, argv) -> str:
    """The command that ran ``module`` with ``argv`` (default ``sys.argv[1:]``), absolute paths shortened to their
    last part so that no machine path lands in committed results."""
    words = sys.argv[1:] if argv is None else list(argv)
    return " ".join([f"python -m {module}"] + [Path(w).name if Path(w).is_absolute() else w for w in words])


def write_run_readme(path: Path, title: str, command: str, body: str) -> None:
    """A short README.md for a run directory: the title, the command that produced it, the body (tables)."""
    atomic_write(path, f"# {title}\n\n`{command}`\n\n{body}\n")


def tie_note(chosen: dict) -> str:
    """A sentence saying which points tied with the chosen one ("" when none did)."""
    tied = chosen.get("tied_with") or []
    if not tied:
        return ""
    names = "; ".join(f"lr {t['lr']:g}, rank {t['rank']}" for t in tied)
    return (f" Tie: {names} {'has' if len(tied) == 1 else 'have'} the same forecast MSE as the chosen point; the "
            "first in grid order (lr outer, rank inner) was chosen.")


def horizon_growth(metrics: dict) -> float:
    """How fast the error grows with the horizon: mean MAE (both species) over the last quarter of the steps divided
    by that over the first quarter."""
    values = [(a + b) / 2 for a, b in zip(metrics["prey"]["mae_by_step"], metrics["predator"]["mae_by_step"])]
    q = max(1, len(values) // 4)
    return float(sum(values[-q:]) / max(sum(values[:q]), 1e-12))


def search_rows(rungs: list[list[dict]]) -> list[dict]:
    """One flat row per point and rung of a successive-halving search (``rungs``: each rung's records, as
    :mod:`experiments.lib.halving` writes them), for search.csv and :func:`search_table`."""
    rows = []
    for records in rungs:
        for r in records:
            m = r["evaluation"]["metrics"]
            rows.append({"rung": r["rung"], "name": r["name"], "lr": r["lr"], "rank": r["rank"], "steps": r["steps"],
                         "score": r["score"], "score_sd": r.get("score_sd"), "val_loss": r["val_loss"],
                         "prey_median_mse": r["median_mse"]["prey"],
                         "predator_median_mse": r["median_mse"]["predator"], "prey_mse": m["prey"]["mse"],
                         "predator_mse": m["predator"]["mse"], "prey_r2": m["prey"]["r2"],
                         "predator_r2": m["predator"]["r2"], "parsed_fraction": r["evaluation"]["parsed_fraction"],
                         "train_flops": r["training"]["train_flops"] + r["training"]["eval_flops"],
                         "forecast_flops": r["evaluation"]["flops"]})
    return rows


def search_table(rows: list[dict], winner: dict | None = None, untrained: dict | None = None) -> str:
    """A search's Markdown table: the untrained reference row first (``untrained``: ``{"score", "val_loss",
    "median_mse": {"prey", "predator"}, "prey_r2", "predator_r2", "parsed_fraction"}``, a value None where unknown),
    then one row per :func:`search_rows` row, the ``winner`` (a rung record) in bold."""
    fmt = format_number
    lines = ["| rung | point | steps | score | ± SD | val loss | prey median MSE | predator median MSE | prey R² | "
             "predator R² | parsed |", "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    if untrained is not None:
        u = untrained
        lines.append(f"| – | untrained | 0 | {fmt(u['score'])} | {fmt(u.get('score_sd'))} | {fmt(u['val_loss'])} | "
                     f"{fmt(u['median_mse']['prey'])} | {fmt(u['median_mse']['predator'])} | "
                     f"{fmt(u['prey_r2'], '.3f')} | {fmt(u['predator_r2'], '.3f')} | {u['parsed_fraction']:.0%} |")
    for r in rows:
        bold = "**" if winner and (r["name"], r["rung"]) == (winner["name"], winner["rung"]) else ""
        lines.append(f"| {r['rung']} | {bold}{r['name']}{bold} | {r['steps']} | {bold}{fmt(r['score'])}{bold} | "
                     f"{fmt(r.get('score_sd'))} | {fmt(r['val_loss'])} | {fmt(r['prey_median_mse'])} | {fmt(r['predator_median_mse'])} | "
                     f"{fmt(r['prey_r2'], '.3f')} | {fmt(r['predator_r2'], '.3f')} | {r['parsed_fraction']:.0%} |")
    return "\n".join(lines)


def ledger_table(ledger: Ledger, budget: int = BUDGET) -> str:
    """The coursework's final FLOP table in Markdown: one row per stage (stage, kind(s), FLOPs, % of ``budget``)
    and a total (only the total for an empty ledger). Raises LedgerError like :meth:`Ledger.entries`, and
    ValueError (naming the ledger) when ``budget`` is not a positive integer."""
    budget = check_budget(budget, ledger.path)
    stages: dict[str, dict] = {}
    for e in ledger.entries():
        row = stages.setdefault(e["stage"], {"kinds": [], "flops": 0})
        if e["kind"] not in row["kinds"]:
            row["kinds"].append(e["kind"])
        row["flops"] += e["flops"]
    lines = ["| stage | kind | FLOPs | % of budget |", "| --- | --- | ---: | ---: |"]
    lines += [f"| {stage} | {', '.join(row['kinds'])} | {sci(row['flops'])} | {100 * row['flops'] / budget:.2f}% |"
              for stage, row in stages.items()]
    total = sum(row["flops"] for row in stages.values())
    lines.append(f"| **total** | | **{sci(total)}** | **{100 * total / budget:.2f}%** |")
    return "\n".join(lines)
