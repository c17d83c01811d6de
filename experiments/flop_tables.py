"""The coursework's FLOP tables, from the closed form :func:`miniqwen.flops.forward_flops_breakdown` (tested equal to
what the model modules count): per-component costs of one forward pass, per-token costs, the planned cost of every
stage (:data:`PLAN`) and the ledger, rendered as Markdown and JSON. ``python -m experiments.flops`` prints them."""

from __future__ import annotations

from pathlib import Path

from miniqwen.config import ConfigError, Qwen2Config
from miniqwen.flops import COMPONENTS, DEFAULT_LORA_TARGETS, forward_flops, forward_flops_breakdown, generation_flops

from .budget import BUDGET, Ledger, LedgerError

CONTEXTS = (128, 512, 768)
LORA_RANKS = (0, 2, 4, 8)
LORA_TARGETS = DEFAULT_LORA_TARGETS

# Evaluation protocol shared by the stages: 100 validation trajectories, 80 observed steps (~10 tokens a step in
# the LLMTIME text format -> ~800 prompt tokens), then 20 forecast steps (~200 tokens) generated greedily with the
# KV cache, one trajectory per batch row (batching changes nothing: cost is linear in rows, padding excepted).
_EVAL = {"kind": "generate", "runs": 1, "trajectories": 100, "prompt_tokens": 800, "new_tokens": 200}
_TRAIN = {"kind": "train", "runs": 1, "batch_size": 4, "seq_len": 512, "lora_rank": 4}

#: Stage -> parts. Part kinds: "train" (runs × steps × training step at batch_size, seq_len, lora_rank),
#: "generate" (runs × trajectories × prompt + KV-cached generation), "eval" (runs × sequences × one forward pass
#: of seq_len tokens with logits everywhere, e.g. a validation loss). Edit freely.
PLAN: dict[str, list[dict]] = {
    "baseline": [{**_EVAL, "lora_rank": 0, "note": "untrained Qwen2.5-0.5B-Instruct, zero-shot"}],
    "lora_default": [
        {**_TRAIN, "steps": 10_000, "note": "coursework default settings: r=4, batch 4, context 512"},
        {**_EVAL, "lora_rank": 4},
    ],
    "sweep": [
        {**_TRAIN, "runs": 3, "steps": 300, "lora_rank": r, "note": f"r={r} x lr in (1e-5, 5e-5, 1e-4)"}
        for r in (2, 4, 8)
    ] + [{**_EVAL, "runs": 9, "lora_rank": 8, "note": "each of the 9 configs (priced at r=8, the dearest)"}],
    "context_length": [
        {**_TRAIN, "steps": 500, "seq_len": n, "lora_rank": 4, "note": f"context {n}, best lr"} for n in CONTEXTS
    ] + [{**_EVAL, "runs": 3, "lora_rank": 4}],
    "final": [
        {**_TRAIN, "steps": 1_000, "lora_rank": 8, "note": "best (rank, lr, context); priced at r=8, context 512"},
        {**_EVAL, "lora_rank": 8},
    ],
}


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
            bd = forward_flops_breakdown(config, 1, n, lora_rank=r, lora_targets=LORA_TARGETS)
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


def part_cost(config: Qwen2Config, part: dict) -> tuple[int, int, str]:
    """(FLOPs of one unit, number of units, unit name) for one plan part (see :data:`PLAN`).

    Raises:
        ValueError: unknown ``kind`` or a missing setting (the message names it).
    """
    kind, runs = part.get("kind"), part.get("runs", 1)
    r = part.get("lora_rank", 0)
    try:
        if kind == "train":
            unit = 3 * forward_flops(config, part["batch_size"], part["seq_len"], lora_rank=r,
                                     lora_targets=LORA_TARGETS)
            return unit, runs * part["steps"], "train step"
        if kind == "generate":
            unit = generation_flops(config, part["prompt_tokens"], part["new_tokens"], 1, lora_rank=r,
                                    lora_targets=LORA_TARGETS)
            return unit, runs * part["trajectories"], "trajectory"
        if kind == "eval":
            unit = forward_flops(config, 1, part["seq_len"], lora_rank=r, lora_targets=LORA_TARGETS)
            return unit, runs * part["sequences"], "sequence"
    except KeyError as err:
        raise ValueError(f"plan part {part} has no setting {err}") from None
    raise ValueError(f"plan part {part}: kind must be train, generate or eval, got {kind!r}")


def _settings(part: dict) -> str:
    keys = ("runs", "steps", "batch_size", "seq_len", "trajectories", "prompt_tokens", "new_tokens",
            "sequences", "lora_rank")
    text = ", ".join(f"{k}={part[k]}" for k in keys if k in part and not (k == "runs" and part[k] == 1))
    return text + (f" ({part['note']})" if part.get("note") else "")


def plan_costs(config: Qwen2Config, plan: dict[str, list[dict]] = PLAN, budget: int = BUDGET) -> list[dict]:
    """Cost of every part of ``plan``, in order, with stage subtotals and running totals.

    Returns a list of rows ``{"stage", "kind", "settings", "unit_flops", "units", "flops", "stage_flops",
    "cumulative", "over_budget"}``; ``over_budget`` is true when the running total passes ``budget``.
    """
    rows, cumulative = [], 0
    for stage, parts in plan.items():
        stage_total = 0
        for part in parts:
            unit, units, unit_name = part_cost(config, part)
            flops = unit * units
            stage_total += flops
            cumulative += flops
            rows.append({"stage": stage, "kind": part["kind"], "settings": _settings(part), "unit": unit_name,
                         "unit_flops": unit, "units": units, "flops": flops, "cumulative": cumulative,
                         "over_budget": cumulative > budget})
        for row in rows:
            if row["stage"] == stage:
                row["stage_flops"] = stage_total
    return rows


def _e(x) -> str:
    return f"{x:.3e}"


def render(config: Qwen2Config, source: str, ledger: Ledger, plan=PLAN, budget: int = BUDGET) -> tuple[str, dict]:
    """(Markdown text, JSON-ready dict) of all four tables. A broken ledger is reported in its section."""
    comp = component_tables(config)
    tok = per_token(config)
    rows = plan_costs(config, plan, budget)
    md = [f"# FLOP tables ({source})", "",
          f"L={config.num_hidden_layers}, d={config.hidden_size}, I={config.intermediate_size}, "
          f"Hq={config.num_attention_heads}, Hkv={config.num_key_value_heads}, D={config.head_dim}, "
          f"V={config.vocab_size}. Coursework FLOP rules (see miniqwen/flops.py); training = 3x forward; "
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
           "", "## (c) Planned cost of each stage", "",
           "| stage | kind | settings | FLOPs / unit | units | FLOPs | % budget | cumulative % |",
           "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        flag = " **OVER BUDGET**" if row["over_budget"] else ""
        md.append(f"| {row['stage']} | {row['kind']} | {row['settings']} | {_e(row['unit_flops'])} / "
                  f"{row['unit']} | {row['units']:,} | {_e(row['flops'])} | {100 * row['flops'] / budget:.2f}% | "
                  f"{100 * row['cumulative'] / budget:.1f}%{flag} |")
    stages: dict[str, int] = {}
    for row in rows:
        stages[row["stage"]] = row["stage_flops"]
    total = sum(stages.values())
    md += ["", "| stage | FLOPs | % budget |", "| --- | ---: | ---: |"]
    md += [f"| {s} | {_e(f)} | {100 * f / budget:.2f}%{' **OVER BUDGET alone**' if f > budget else ''} |"
           for s, f in stages.items()]
    md.append(f"| **total** | **{_e(total)}** | **{100 * total / budget:.1f}%** |")
    if total > budget:
        md += ["", f"**The plan exceeds the budget by {_e(total - budget)} FLOPs**; shrink steps in PLAN "
               f"(experiments/flops.py)."]
    md += ["", f"## (d) Ledger so far ({ledger.path})", ""]
    ledger_json: dict = {"path": str(ledger.path)}
    try:
        md.append(ledger.markdown_table(budget))
        ledger_json.update(by_stage=ledger.by_stage(), total=ledger.total())
    except LedgerError as err:
        md.append(f"**ledger unreadable:** {err}")
        ledger_json["error"] = str(err)
    data = {
        "source": source, "config": config.to_dict(), "budget": budget, "lora_targets": list(LORA_TARGETS),
        "components": {k: {str(n): v for n, v in table.items()} if k == "forward" else
                       {str(r): {str(n): v for n, v in d.items()} for r, d in table.items()}
                       for k, table in comp.items()},
        "per_token_512": tok, "plan": plan, "plan_costs": rows, "plan_total": total, "ledger": ledger_json,
    }
    return "\n".join(md) + "\n", data
