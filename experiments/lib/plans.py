"""What each stage will spend, in FLOPs, before it starts: one pricing function per stage (the one the stage checks
against the ledger, :meth:`Session.check`) and the plan of every stage at its defaults (:func:`stage_plans`, for
``python -m experiments.flops``). Every price comes from :mod:`experiments.lib.costs`, i.e. the closed form of
:mod:`miniqwen.flop_count`, and the defaults from :mod:`experiments.lib.defaults`, so the plan is what the stages
run."""

from __future__ import annotations

from miniqwen.config import Qwen2Config

from . import points
from .costs import Sizes, baseline_cost, lora_stage_cost
from .defaults import CONTEXT_LENGTHS, DEFAULTS, GRID_LRS, GRID_RANKS
from .settings import GROUPS, ForecastSettings, LoRASettings, LossSettings, TrainSettings

#: the stages of the coursework, in the order they run, that spend FLOPs (classical and report spend none)
STAGES = ("baseline", "lora_default", "sweep", "context_length", "final")


def baseline(config, sizes, forecast: ForecastSettings, loss: LossSettings) -> dict[str, int]:
    """The baseline stage: the zero-shot forecast and the validation loss."""
    return baseline_cost(config, sizes, forecast, loss)


def lora_default(config, sizes, forecast: ForecastSettings, lora: LoRASettings,
                 train: TrainSettings) -> dict[str, int]:
    """The default LoRA run from scratch: the untrained forecast, training and the trained forecast (the stage
    checks the same costs from its checkpoint when resumed)."""
    return lora_stage_cost(config, sizes, forecast, lora, train)


def sweep(config, sizes, forecast: ForecastSettings, lora: LoRASettings, train: TrainSettings, lrs=GRID_LRS,
          ranks=GRID_RANKS) -> dict[str, int]:
    """The whole learning-rate × rank grid from scratch."""
    return points.study_cost(config, sizes, forecast, points.grid_points(lora, train, lrs, ranks))


def context_length(config, sizes, forecast: ForecastSettings, lora: LoRASettings, train: TrainSettings,
                   contexts=CONTEXT_LENGTHS) -> dict[str, int]:
    """The whole context-length study from scratch."""
    return points.study_cost(config, sizes, forecast, points.context_points(lora, train, contexts))


def final(config, sizes, forecast: ForecastSettings, lora: LoRASettings, train: TrainSettings,
          start_step: int = 0, untrained: bool = True) -> dict[str, int]:
    """The final run: the untrained test forecast (if ``untrained``), training from ``start_step`` (an upper bound:
    early stopping ignored) and the trained test forecast."""
    return lora_stage_cost(config, sizes, forecast, lora, train, start_step, untrained)


def _defaults(stage: str) -> dict:
    return {name: DEFAULTS[stage].get(name) or cls() for name, cls in GROUPS.items()}


def stage_plans(config: Qwen2Config, sizes=None) -> dict[str, dict[str, int]]:
    """``{stage: {part: FLOPs}}``: every stage's plan from scratch at its default settings
    (:data:`experiments.lib.defaults.DEFAULTS`), priced by the function above that the stage itself checks against
    the ledger, with ``sizes`` (default :class:`costs.Sizes` without data: upper bounds on prompt and chunk counts,
    so no data or tokenizer is needed)."""
    sizes = sizes or Sizes()
    b, ld, sw, cl, fi = (_defaults(s) for s in STAGES)
    return {
        "baseline": baseline(config, sizes, b["forecast"], b["loss"]),
        "lora_default": lora_default(config, sizes, ld["forecast"], ld["lora"], ld["train"]),
        "sweep": sweep(config, sizes, sw["forecast"], sw["lora"], sw["train"]),
        "context_length": context_length(config, sizes, cl["forecast"], cl["lora"], cl["train"]),
        "final": final(config, sizes, fi["forecast"], fi["lora"], fi["train"]),
    }


def stage_settings() -> dict[str, str]:
    """One line per stage saying what its default settings are (for the plan table)."""
    def steps(stage: str, up_to: str = "") -> str:
        tr = DEFAULTS[stage]["train"]
        return f"batch {tr.batch_size}, {up_to}{tr.max_steps:,} steps"

    ld, sw, fi = DEFAULTS["lora_default"]["train"], DEFAULTS["sweep"]["train"], DEFAULTS["final"]["train"]
    return {
        "baseline": "zero-shot forecasts of the 100 validation trajectories (80 -> 20 steps) + validation loss",
        "lora_default": f"lr {ld.lr:g}, rank 4, context {ld.context_length}, {steps('lora_default')}; forecasts "
                        "before and after",
        "sweep": f"{len(GRID_LRS)} lr x {len(GRID_RANKS)} ranks, context {sw.context_length}, {steps('sweep')} "
                 "per point",
        "context_length": f"contexts {', '.join(map(str, CONTEXT_LENGTHS))}, {steps('context_length')} each "
                          f"(priced at rank {DEFAULTS['context_length']['lora'].rank})",
        "final": f"context {fi.context_length}, {steps('final', 'up to ')}, rank {DEFAULTS['final']['lora'].rank}; "
                 "test forecasts before and after",
    }
