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

from lora import DEFAULT_LORA_TARGETS
from miniqwen.atomic import atomic_write
from miniqwen.config import ConfigError, Qwen2Config
from miniqwen.flop_count import COMPONENTS, forward_flops, forward_flops_breakdown

from .lib.budget import BUDGET, Ledger, LedgerError
from .lib.cli import ArgumentParser, run_cli
from .lib.plans import stage_plans, stage_settings
from .lib.run_directory import claim_out, record_written
from .lib.tables import ledger_table

__all__ = ["main", "stage_plans"]


CONTEXTS = (128, 512, 768)
LORA_RANKS = (0, 2, 4, 8)


def load_config(model_dir: str | Path | None) -> Qwen2Config:
    """``Qwen2Config`` from ``model_dir/config.json``, or the Qwen2.5-0.5B defaults when ``model_dir`` is None.

    Raises:
        ConfigError: ``model_dir`` is not a directory, has no config.json, or it is not a valid Qwen2 config.
    """
    if model_dir is None:
        return Qwen2Config()
    path = Path(model_dir)
    if not path.is_dir():
        raise ConfigError(f"--model {path}: not a directory (expected a Hugging Face model directory)")
    return Qwen2Config.from_json(path / "config.json")


def component_tables(config: Qwen2Config, contexts=CONTEXTS, ranks=LORA_RANKS) -> dict:
    """Per-component FLOPs of ONE forward pass, batch 1, for each context (no cache, logits everywhere).

    Returns ``{"forward": {context: {component: FLOPs}}, "lora": {rank: {context: FLOPs}},
    "total_forward": {rank: {context: FLOPs}}, "total_training": {rank: {context: 3×FLOPs}}}`` (ints; LoRA on
    q_proj and v_proj).
    """
    out = {"forward": {}, "lora": {}, "total_forward": {}, "total_training": {}}
    for n in contexts:
        out["forward"][n] = forward_flops_breakdown(config, 1, n)
    for r in ranks:
        out["lora"][r], out["total_forward"][r], out["total_training"][r] = {}, {}, {}
        for n in contexts:
            bd = forward_flops_breakdown(config, 1, n, lora_rank=r, lora_targets=DEFAULT_LORA_TARGETS)
            out["lora"][r][n] = bd["lora"]
            out["total_forward"][r][n] = sum(bd.values())
            out["total_training"][r][n] = 3 * sum(bd.values())
    return out


def per_token(config: Qwen2Config, context: int = 512) -> dict[str, float]:
    """Forward FLOPs per token at ``context`` (batch 1, no LoRA), three ways (floats, FLOPs/token):

    ``all_logits``: a ``context``-token pass with lm_head on every position, divided by ``context`` (training);
    ``last_logit``: the same with lm_head only on the last position (prompt prefill);
    ``no_lm_head``: the same without lm_head at all;
    ``decode_step``: one new token against a cache of ``context − 1`` tokens (generation; needs one logit).
    """
    full = forward_flops_breakdown(config, 1, context)
    return {
        "all_logits": sum(full.values()) / context,
        "last_logit": forward_flops(config, 1, context, logits_to_keep=1) / context,
        "no_lm_head": (sum(full.values()) - full["lm_head"]) / context,
        "decode_step": float(forward_flops(config, 1, 1, cache_len=context - 1, logits_to_keep=1)),
    }


def _e(x) -> str:
    return f"{x:.3e}"


def render(config: Qwen2Config, source: str, ledger: Ledger, plan: dict | None = None,
           budget: int = BUDGET) -> tuple[str, dict]:
    """(Markdown text, JSON-ready dict) of all four tables; ``plan`` defaults to :func:`plans.stage_plans`. A broken
    ledger is reported in its section."""
    comp = component_tables(config)
    tok = per_token(config)
    plan = plan if plan is not None else stage_plans(config)
    md = [f"# FLOP tables ({source})", "",
          f"L={config.num_hidden_layers}, d={config.hidden_size}, I={config.intermediate_size}, "
          f"Hq={config.num_attention_heads}, Hkv={config.num_key_value_heads}, D={config.head_dim}, "
          f"V={config.vocab_size}. Coursework FLOP rules (see miniqwen/flop_count.py); training = 3x forward; "
          f"budget {budget:.0e}.", "",
          "## (a) One forward pass, batch 1, per component", "",
          "| component | " + " | ".join(f"context {n}" for n in CONTEXTS) + " |",
          "| --- |" + " ---: |" * len(CONTEXTS)]
    for name in COMPONENTS:
        if name == "lora":
            continue
        md.append(f"| {name} | " + " | ".join(_e(comp["forward"][n][name]) for n in CONTEXTS) + " |")
    for r in LORA_RANKS[1:]:
        md.append(f"| lora (r={r}, q,v) | " + " | ".join(_e(comp["lora"][r][n]) for n in CONTEXTS) + " |")
    for key, label in (("total_forward", "forward total"), ("total_training", "training step (3x)")):
        for r in LORA_RANKS:
            md.append(f"| **{label}, r={r}** | " + " | ".join(f"**{_e(comp[key][r][n])}**" for n in CONTEXTS)
                      + " |")
    md += ["", "## (b) Forward FLOPs per token at context 512 (batch 1, no LoRA)", "",
           "| how | FLOPs / token |", "| --- | ---: |",
           f"| 512-token pass, lm_head on every position (training) | {_e(tok['all_logits'])} |",
           f"| 512-token pass, lm_head on the last position only (prefill) | {_e(tok['last_logit'])} |",
           f"| 512-token pass, no lm_head at all | {_e(tok['no_lm_head'])} |",
           f"| one decode step against 511 cached tokens | {_e(tok['decode_step'])} |",
           "", "## (c) The full-scale plan: every stage at its default settings", "",
           "Each stage's own `plan` function at its own defaults (`python -m experiments.<stage>` with no scale "
           "options), the same function the stage checks against the ledger before it starts. Prompt and chunk "
           "counts are upper bounds (every forecast step at its longest), so real runs cost less.", "",
           "| stage | part | FLOPs | % budget | cumulative % |", "| --- | --- | ---: | ---: | ---: |"]
    notes = stage_settings()
    total = 0
    for stage, parts in plan.items():
        for part, flops in parts.items():
            total += flops
            md.append(f"| {stage} | {part} | {_e(flops)} | {100 * flops / budget:.2f}% | "
                      f"{100 * total / budget:.1f}%{' **OVER BUDGET**' if total > budget else ''} |")
    try:
        spent = spent_by_stage(ledger)
    except LedgerError:
        spent = {}
    md += ["", "| stage | default settings | planned FLOPs | % budget | spent so far (ledger) |",
           "| --- | --- | ---: | ---: | ---: |"]
    md += [f"| {st} | {notes.get(st, '')} | {_e(sum(parts.values()))} | {100 * sum(parts.values()) / budget:.1f}% | "
           f"{_e(spent.get(st, 0))} |" for st, parts in plan.items()]
    md.append(f"| **total** | | **{_e(total)}** | **{100 * total / budget:.1f}%** | "
              f"**{_e(sum(spent.values()))}** |")
    if total > budget:
        md += ["", f"**The plan exceeds the budget by {_e(total - budget)} FLOPs**; lower the stages' default "
               "steps."]
    md += ["", f"## (d) Ledger so far ({ledger.path})", ""]
    ledger_json: dict = {"path": str(ledger.path)}
    try:
        md.append(ledger_table(ledger, budget))  # raises first when the ledger is unreadable: `spent` is its sums
        ledger_json.update(by_stage=spent, total=sum(spent.values()))
    except LedgerError as err:
        md.append(f"**ledger unreadable:** {err}")
        ledger_json["error"] = str(err)
    data = {
        "source": source, "config": config.to_dict(), "budget": budget, "lora_targets": list(DEFAULT_LORA_TARGETS),
        "components": {k: {str(n): v for n, v in table.items()} if k == "forward" else
                       {str(r): {str(n): v for n, v in d.items()} for r, d in table.items()}
                       for k, table in comp.items()},
        "per_token_512": tok, "plan": plan, "plan_total": total, "ledger": ledger_json,
    }
    return "\n".join(md) + "\n", data


def spent_by_stage(ledger: Ledger) -> dict[str, int]:
    """``{stage: FLOPs}`` charged to ``ledger``, in order of each stage's first entry. Raises LedgerError like
    :meth:`Ledger.entries`."""
    out: dict[str, int] = {}
    for e in ledger.entries():
        out[e["stage"]] = out.get(e["stage"], 0) + e["flops"]
    return out


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
