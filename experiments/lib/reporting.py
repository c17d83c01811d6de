"""The sections of REPORT.md, each rendered from the stages' ``results.json`` files (:class:`results.Results`) and
the FLOP ledger; :func:`render` puts them together. Runs no model and spends no FLOPs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from . import compare, forecast_files, tables
from .budget import BUDGET, Ledger, LedgerError
from .errors import UsageError
from .plots import plot_horizon_errors
from .results import Evaluation, Results
from .scores import TIE_RULE
from .run_directory import dig, read_json
from .tables import evaluation_table, format_number, horizon_growth, ledger_table, tie_note


def _score(e: Evaluation) -> float:
    """The ranking criterion: the mean of the prey and predator MSE (data units²)."""
    return (e.metrics["prey"]["mse"] + e.metrics["predator"]["mse"]) / 2


def _row(label: str, e: Evaluation, flops=None) -> str:
    p, q = e.metrics["prey"], e.metrics["predator"]
    cells = [(e.parsed_fraction, ".0%"), (p["mse"], ".4f"), (p["mae"], ".4f"), (p["r2"], ".3f"), (q["mse"], ".4f"),
             (q["mae"], ".4f"), (q["r2"], ".3f"), (e.validation_loss, ".4f"),
             (e.flops if flops is None else flops, ".3g")]
    return f"| {label} | {len(e.trajectories)} | " + " | ".join(format_number(v, s) for v, s in cells) + " |"


HEADER = ["| forecaster | trajectories | parsed | prey MSE | prey MAE | prey R² | predator MSE | predator MAE | "
          "predator R² | val. loss | FLOPs |", "| --- |" + " ---: |" * 10]


def comparison_groups(results: dict[str, Results]) -> dict[tuple, list[tuple[str, Evaluation]]]:
    """Evaluations of every stage grouped by (split, context_steps, horizon, trajectories): only those scored on
    exactly the same trajectories are compared. Labels are ``<run dir>: <forecaster>``."""
    groups: dict[tuple, list] = {}
    for run, r in results.items():
        for e in r.evaluations.values():
            key = (e.split, e.context_steps, e.horizon, tuple(e.trajectories))
            group = groups.setdefault(key, [])
            if e.forecaster == "persistence" and any(x.forecaster == "persistence" for _, x in group):
                continue  # the same numbers from every stage that scored it: show it once
            group.append((f"{run}: {e.forecaster}", e))
    return groups


def _image(results_root: Path, run: str, name: str, root: Path, alt: str) -> list[str]:
    path = (results_root / run / name).resolve()
    return [f"![{alt}]({os.path.relpath(path, root)})", ""] if path.is_file() else []


def vs_untrained(results_root: Path, run: str, r: Results, trained: dict[str, str]) -> list[str]:
    """Each trained forecaster of run ``run`` against its untrained model, trajectory by trajectory, from the
    per-trajectory CSVs the stage wrote (``trained``: ``{label: CSV path relative to the run}``): the paired
    bootstrap table of :func:`compare.against_reference`, or nothing where the files do not pair."""
    _, md = compare.against_untrained(results_root / run, trained, next(iter(r.evaluations.values())).horizon,
                                      r.seed)
    return ["Trajectory by trajectory against the untrained model:", "", md, ""] if md else []


def grid_section(results: dict[str, Results], results_root: Path, root: Path) -> list[str]:
    """The lr × rank grid: its table, the selection and whether validation loss agrees, the heat maps."""
    md = []
    for run, r in results.items():
        if r.stage != "sweep":
            continue
        sel, d = r.details["selection"], r.details
        agree = ("Validation loss picks the same point" if sel["same_winner"] else
                 f"Validation loss would have picked lr {sel['chosen_by_val_loss']['lr']:g}, rank "
                 f"{sel['chosen_by_val_loss']['rank']}")
        tie = tie_note(sel).strip()
        rho = sel.get("spearman_forecast_mse_vs_val_loss")
        md += ["## Learning rate × LoRA rank (coursework 3b)", "", f"**{run}** — {d['scale'].rstrip('.')}.", "",
               d["table_markdown"], "",
               f"Selection rule: {sel['rule']} → **lr {sel['chosen']['lr']:g}, rank {sel['chosen']['rank']}**. "
               f"{agree}; Spearman ρ between the two rankings over the grid = {format_number(rho, '.2f')}. "
               + (f"{tie} " if tie else "")
               + "The untrained row is the same base model on the same trajectories and validation chunks.", ""]
        md += vs_untrained(results_root, run, r, {x["name"]: forecast_files.point_csv(x["name"]) for x in d["grid"]
                                                  if "name" in x})
        md += _image(results_root, run, "heatmap_forecast_mse.png", root, "forecast MSE heat map")
        md += _image(results_root, run, "heatmap_val_loss.png", root, "validation loss heat map")
        md += _image(results_root, run, "loss_curves.png", root, "training curves")
    return md


def context_section(results: dict[str, Results], results_root: Path, root: Path) -> list[str]:
    """The context-length study: the table at equal steps, compute per run, error growth with the horizon."""
    md = []
    for run, r in results.items():
        if r.stage != "context_length":
            continue
        rows, d = r.details["contexts"], r.details
        growth = [f"context {x['context_length']}: {x['horizon_growth']:.2f}" for x in rows]
        if "untrained" in r.evaluations:
            growth.insert(0, f"untrained: {horizon_growth(r.evaluations['untrained'].metrics):.2f}")
        md += ["## Context length (coursework 3b)", "", f"**{run}** — {d['scale'].rstrip('.')}.", "",
               d["table_markdown"], "",
               "Equal steps are not equal compute: " + "; ".join(
                   f"context {x['context_length']}: {x['train_flops'] / 1e15:.3f} PFLOPs of training, forecast MSE "
                   f"gain over the untrained model {format_number(x['forecast_mse_gain_per_pflop'], '.3g')} per PFLOP"
                   for x in rows) + ".", "",
               "Error growth with the horizon (MAE over the last quarter of the forecast steps / the first quarter; "
               "if short windows teach only short-range continuation, the shortest window grows fastest): "
               + ", ".join(growth) + ".", ""]
        md += vs_untrained(results_root, run, r, {f"context {x['context_length']}": forecast_files.point_csv(x["name"])
                                                  for x in rows if "name" in x})
        md += _image(results_root, run, "horizon_mae.png", root, "MAE by forecast step per context length")
    return md


def _search_records(run_dir: Path) -> list[list[dict]]:
    """The rung records a search has written so far (``points/<name>/rung<k>.json``), grouped by rung; unreadable
    ones are left out (the stage itself refuses them on --resume)."""
    rungs: dict[int, list[dict]] = {}
    for path in sorted(run_dir.glob("points/*/rung*.json")):
        try:
            record = read_json(path)  # None for a FIFO or garbage: never blocks
            tables.search_rows([[record]])  # has every field the table reads
        except (OSError, ValueError, KeyError, TypeError):
            continue
        rungs.setdefault(int(record["rung"]), []).append(record)
    return [rungs[k] for k in sorted(rungs)]


def search_section(results: dict[str, Results], results_root: Path, root: Path) -> list[str]:
    """The successive-halving search: its table, selection and each point against the untrained model; a search
    still running (a run record, no results.json yet) is shown from the rung records it has written, said so."""
    md = []
    running = [d for d in sorted(results_root.glob("**/run.json")) if not (d.parent / "results.json").exists()
               and dig(read_json(d), "stage") == "search"]
    for run, r in [(k, v) for k, v in results.items() if v.stage == "search"] + [
            (str(d.parent.relative_to(results_root)), None) for d in running]:
        run_dir = results_root / run
        done = _search_records(run_dir)
        rows = tables.search_rows(done)
        if r is None and not rows:
            continue
        md += ["## Successive-halving search over learning rate × rank", ""]
        if r is not None:
            sel = r.details["selection"]
            table = r.details["table_markdown"]
            if any(x.get("score_sd") is not None for x in rows):  # SDs added to its rung records since: show them
                base, u = r.details.get("untrained_score"), r.evaluations.get("untrained")
                untrained = None if not base or u is None else {
                    "score": base["score"], "median_mse": base["median_mse"], "val_loss": u.validation_loss,
                    "prey_r2": u.metrics["prey"]["r2"], "predator_r2": u.metrics["predator"]["r2"],
                    "parsed_fraction": u.parsed_fraction}
                winner = next((x for records in done[-1:] for x in records if x["name"] == sel["chosen"]["point"]),
                              None)
                table = tables.search_table(rows, winner, untrained)
                table += (f"\n\n± SD: the score's bootstrap standard deviation over the scoring trajectories "
                          f"(`scores.score_sd`); {halving_tie_rule()}.")
            md += [f"**{run}** — {r.details['scale'].rstrip('.')}.", "", table, "",
                   f"Selection: {sel['rule']} → **{sel['chosen']['point']} at {sel['chosen']['steps']} steps**.", ""]
        else:
            points = {x["name"] for x in rows}
            md += [f"**{run}** — in progress: {len(rows)} rung records of {len(points)} points so far (the stage's "
                   "`--resume` continues it); the untrained model's score is computed when the search finishes.", "",
                   tables.search_table(rows, untrained=_untrained_row(run_dir)), ""]
        horizon = next((x["evaluation"]["horizon"] for records in done for x in records), 20)
        _, paired = compare.against_untrained(
            run_dir, {f"{x['name']} @ {x['steps']}": forecast_files.point_csv(x["name"], x["rung"]) for x in rows},
            horizon,
            r.seed if r is not None else 0)
        md += ["Each point against the untrained model, trajectory by trajectory:", "", paired, ""] if paired else []
        md += _image(results_root, run, "rungs.png", root, "search rungs")
    return md


def halving_tie_rule() -> str:
    """The search's tie rule, as :mod:`experiments.lib.scores` states it."""
    return "ties: " + TIE_RULE


def _untrained_row(run_dir: Path) -> dict | None:
    """The untrained reference row of a running search, from what it saved: medians of its per-trajectory CSV and
    the validation loss in untrained.json (the score needs persistence on the data, so it is left out)."""
    try:
        _, errors = forecast_files.read_errors(run_dir / forecast_files.UNTRAINED_CSV)
        saved = read_json(run_dir / "untrained.json")  # None for a FIFO or garbage: never blocks
        metrics, losses = saved["untrained"]["metrics"], saved.get("validation_loss") or {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return {"score": None, "val_loss": next(iter(losses.values()), None),
            "median_mse": {sp: float(np.median(errors[sp]["mse"])) for sp in ("prey", "predator")},
            "prey_r2": metrics["prey"]["r2"], "predator_r2": metrics["predator"]["r2"],
            "parsed_fraction": saved["untrained"]["parsed_fraction"]}


def final_section(results: dict[str, Results], results_root: Path, root: Path) -> list[str]:
    """The final run on the test split beside the untrained model and the classical forecasters."""
    md = []
    for run, r in results.items():
        if r.stage != "final":
            continue
        tr = r.details["training"]
        md += ["## Final run on the test split (coursework 3c)", "",
               f"**{run}** — {r.details['scale'].rstrip('.')}; FLOPs "
               f"{format_number(r.flops.get('total'), '.3g')} (training {format_number(tr.get('train_flops'), '.3g')})"
               ".", "", r.details["table_markdown"], ""]
        paired = r.details.get("comparisons")
        if paired:
            md += ["The LoRA model against each forecaster, trajectory by trajectory:", "",
                   compare.summary_table(paired), ""]
        md += _image(results_root, run, "horizon_mae.png", root, "MAE by forecast step, final run")
        md += _image(results_root, run, "forecasts_trained.png", root, "final forecasts")
        md += _image(results_root, run, "training/loss_curve.png", root, "final training curve")
    return md


#: what the report reads from a stage's results.json beyond the schema (dotted paths into ``details``; names
#: after ":" are evaluations; "contexts[].x": key x of every row)
READS = {
    "baseline": [":zero-shot"],
    "lora_default": [":lora"],
    "sweep": ["selection.rule", "selection.chosen.lr", "selection.chosen.rank", "selection.chosen_by_val_loss.lr",
              "selection.chosen_by_val_loss.rank", "selection.same_winner", "scale", "table_markdown"],
    "context_length": ["contexts[].context_length", "contexts[].horizon_growth", "contexts[].train_flops",
                       "contexts[].forecast_mse_gain_per_pflop", "scale", "table_markdown"],
    "search": ["selection.rule", "selection.chosen.point", "selection.chosen.steps", "scale", "table_markdown"],
    "final": ["training", "scale", "table_markdown"],
}


def check_readable(results: dict[str, Results], results_root: Path) -> None:
    """Refuse (UsageError naming the file and the missing part) a results.json the report would fail on halfway:
    one of the schema whose stage's details lack what its section reads (:data:`READS`)."""
    for run, r in results.items():
        for need in READS.get(r.stage, []):
            value, ok = r.details, True
            if need.startswith(":"):
                ok = isinstance(r.evaluations, dict) and need[1:] in r.evaluations
            else:
                head, _, key = need.partition("[].")
                for part in head.split("."):
                    value = value.get(part) if isinstance(value, dict) else None
                if key:
                    ok = isinstance(value, list) and bool(value) and all(isinstance(x, dict) and key in x
                                                                         for x in value)
                else:
                    ok = value is not None
            if not ok:
                what = f"the evaluation {need[1:]!r}" if need.startswith(":") else f"details.{need}"
                raise UsageError(f"{results_root / run / 'results.json'}: this {r.stage} results.json has no {what}, "
                                 "which the report reads (damaged, edited or partial): restore it, or move it out of "
                                 "--results")


#: the report's first line and the start of its third: how the report recognises a file it wrote
TITLE, GENERATED = "# miniqwen — report", "Generated by `python -m experiments.report`"


def written_by_report(path: Path) -> bool:
    """Whether the file ``path`` starts as :func:`render` starts every report (its title, a blank line, the
    "Generated by" line); False for anything else or a file that cannot be read."""
    if not path.is_file():  # a FIFO would block the read
        return False
    try:
        with open(path, encoding="utf-8") as f:
            head = [f.readline() for _ in range(3)]
    except (OSError, ValueError):
        return False
    return head[0].rstrip("\n") == TITLE and head[1].strip() == "" and head[2].startswith(GENERATED)


LLM_FORECASTERS = ("zero-shot", "untrained", "lora")


def test_split_section(results: dict[str, Results], ledger: Ledger, results_root: Path) -> list[str]:
    """Every evaluation of the test split by a language model so far, in the order the ledger first charged its
    run: the stages' results (an LLM forecaster with split "test") and the re-forecasts of ``scripts/reforecast.py``
    (a results.json with "committed_lora_metrics"), each with its R² — so that a reader sees how often the test
    split was looked at."""
    import json

    first: dict[str, str] = {}
    for e in ledger.entries() if ledger.path.is_file() else []:
        first.setdefault(str(e.get("run")).split("/")[0], e.get("time", ""))
    rows = []
    for run, r in results.items():
        for name, e in r.evaluations.items():
            if e.split == "test" and e.forecaster in LLM_FORECASTERS:
                rows.append((first.get(Path(run).name, ""), run, name, e.metrics))
    for path in sorted(results_root.glob("*/results.json")):
        raw = read_json(path)  # None for a FIFO or garbage (find_results has warned about it)
        if isinstance(raw, dict) and "committed_lora_metrics" in raw and raw.get("split", "test") == "test":
            how = (f", median of {raw['samples']} samples at temperature {raw.get('temperature')}"
                   if (raw.get("samples") or 1) > 1 else "")
            rows.append((first.get(path.parent.name, ""), path.parent.name,
                         f"lora (re-forecast of {raw['run']}{how})", raw["evaluations"]["lora"]["metrics"]))
    if not rows:
        return []
    md = ["## Every look at the test split", "",
          "Each language-model evaluation of the test split so far, in the order its run was first charged (the "
          "classical forecasters, which spend no FLOPs and choose nothing on the test split, are not listed).", "",
          "| first charged | run | forecaster | prey R² | predator R² |", "| --- | --- | --- | ---: | ---: |"]
    for time, run, name, m in sorted(rows, key=lambda x: (x[0], x[1], x[2])):
        md.append(f"| {time[:10] or '–'} | {run} | {name} | {m['prey']['r2']:.3f} | {m['predator']['r2']:.3f} |")
    return md + [""]


def render(results: dict[str, Results], ledger: Ledger, results_root: Path, figures: Path, root: Path) -> str:
    """The report's Markdown for ``results`` (``{directory under results_root: Results}``); horizon-error PNGs are
    written to ``figures``; links are relative to ``root`` (the report's directory)."""
    md = [TITLE, "", GENERATED + " from the committed results; every number below is read from a "
          "`results.json` (settings, weights and data checksum recorded beside it).", ""]
    weights = sorted({r.weights for r in results.values() if r.weights})
    data = sorted({(r.data.get("file"), r.data.get("sha256")) for r in results.values()})
    synthetic = sorted({r.data["source"] for r in results.values() if r.data.get("synthetic") and r.data.get("source")})
    md += ["**Weights:** " + "; ".join(weights) if weights else "**Weights:** –",
           "", "**Data:** " + "; ".join(f"`{f}` (sha256 {s[:12]}…)" for f, s in data), ""]
    md += [f"**Synthetic data:** {'; '.join(synthetic)}.", ""] if synthetic else []

    baselines = {k: r for k, r in results.items() if r.stage == "baseline"}
    examples = next((r.details.get("examples") for r in baselines.values() if r.details.get("examples")), None)
    if examples:
        md += ["## Tokenized examples (coursework 2a)", ""]
        for ex in examples:
            md += [f"Trajectory {ex['trajectory']}, first {len(ex['raw'])} steps:", "",
                   f"- raw (prey, predator): `{np.round(np.array(ex['raw']), 4).tolist()}`",
                   f"- LLMTIME text: `{ex['text']}`", f"- token ids: `{ex['token_ids']}`", ""]

    if baselines:
        md += ["## Zero-shot forecasting (coursework 2b)", "", *HEADER]
        for run, r in baselines.items():
            e, p = r.evaluations["zero-shot"], r.evaluations.get("persistence")
            f = r.settings.get("forecast", {})
            md.append(_row(f"{run} ({e.split}, {f.get('prompt')} prompt, {f.get('samples')} sample(s))", e))
            if p:
                md.append(_row(f"{run}: persistence", p, 0))
        md += ["", "Errors in the data's units over the horizon; R² against the mean of the true values; validation "
               "loss in nats per token (untrained model).", ""]

    loras = {k: r for k, r in results.items() if r.stage == "lora_default"}
    if loras:
        md += ["## LoRA with the default hyperparameters against the untrained model (coursework 3a)", ""]
        for run, r in loras.items():
            t, tr = r.settings.get("train", {}), r.details.get("training", {})
            lo = r.settings.get("lora", {})
            trained = r.evaluations["lora"]
            md += [f"**{run}** — rank {lo.get('rank')} on {', '.join(lo.get('targets', []))}, lr {t.get('lr')}, "
                   f"batch {t.get('batch_size')}, context {t.get('context_length')}, {tr.get('steps')} steps; "
                   f"forecasts of {len(trained.trajectories)} {trained.split} trajectories; FLOPs "
                   f"{format_number(r.flops.get('total'), '.3g')}.", "", evaluation_table(r.evaluations), ""]
            md += vs_untrained(results_root, run, r, {"lora": forecast_files.TRAINED_CSV})

    md += grid_section(results, results_root, root)
    md += context_section(results, results_root, root)
    md += search_section(results, results_root, root)
    md += final_section(results, results_root, root)

    md += test_split_section(results, ledger, results_root)
    groups = comparison_groups(results)

    def stage_of(label: str) -> str:
        return results[label.split(": ")[0]].stage

    classical_keys = [k for k, items in groups.items() if any(stage_of(lbl) == "classical" for lbl, _ in items)]
    if classical_keys:
        md += ["## Classical forecasters beside the LLM, on the same trajectories", "",
               "Persistence, AR(p) per species and VAR(p) over both species (least squares on each trajectory's "
               "own context, p chosen on the validation split) and the Lotka–Volterra ODE fitted to each context. "
               "They run no language model and spend **no FLOPs** of the budget. Ranked by the mean of prey and "
               "predator MSE.", ""]
        for key in classical_keys:
            split, cs, h, traj = key
            items = sorted(groups[key], key=lambda x: _score(x[1]))
            md += [f"### {split} split: {len(traj)} trajectories, {cs} steps observed → {h} forecast", "", *HEADER]
            md += [_row(label, e) for label, e in items]
            best_label, best = items[0]
            llm = [(lbl, e) for lbl, e in items if stage_of(lbl) != "classical" and e.forecaster in LLM_FORECASTERS]
            md.append("")
            if llm:
                lbl, e = llm[0]
                rank = [x[0] for x in items].index(lbl) + 1
                verdict = ("the LLM is the best forecaster here" if rank == 1 else
                           f"**{best.forecaster} beats the best LLM forecast** ({lbl}: rank {rank} of "
                           f"{len(items)}; mean MSE {_score(e):.4f} against {_score(best):.4f})")
                md += [f"Verdict: {verdict}.", ""]
            else:
                md += [f"No LLM forecast was scored on exactly these trajectories; best: {best_label}.", ""]
            png = (figures / f"horizon_mae_{split}_{len(traj)}.png").resolve()
            curves = {lbl: e.metrics for lbl, e in items}
            if plot_horizon_errors(png, curves, f"MAE by forecast step — {split}, {len(traj)} trajectories"):
                md += [f"![MAE by forecast step]({os.path.relpath(png, root)})", ""]

    pngs = sorted(p.resolve() for run in results for p in (results_root / run).rglob("*.png"))
    if pngs:
        md += ["## Figures drawn by the stages", ""]
        md += [f"- [{os.path.relpath(p, root)}]({os.path.relpath(p, root)})" for p in pngs]
        md.append("")

    md += ["## Compute: every experiment against the 1e17 budget", ""]
    try:
        md.append(ledger_table(ledger, BUDGET))
        md += ["", f"Ledger: `{ledger.path.name}` ({len(ledger.entries())} entries). Training is charged 3× its "
               "forward FLOPs, evaluation and generation 1× (coursework rules, `miniqwen/flop_count.py`)."]
    except LedgerError as err:
        md.append(f"**ledger unreadable:** {err}")
    md += ["", "| run | stage | generate | eval | train | total | planned |", "| --- | --- |" + " ---: |" * 5]
    for run, r in results.items():
        fl = r.flops
        md.append(f"| {run} | {r.stage} | " + " | ".join(format_number(fl.get(k, 0), ".3g") for k in
                                                        ("generate", "eval", "train", "total", "planned")) + " |")
    return "\n".join(md) + "\n"
