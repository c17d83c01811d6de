"""Every stage's default settings and presets, in one place: the stages build their parsers from these, and the FLOP
plan (:mod:`experiments.lib.plans`, ``python -m experiments.flops``) prices the same values, so the two cannot drift.

``DEFAULTS[stage]`` is ``{group: settings dataclass}`` (groups as in :data:`experiments.lib.settings.GROUPS`; a group
left out takes its dataclass defaults); ``PRESETS[stage]`` is ``{preset: {group: {field: value}}}``, applied over
the defaults by :func:`experiments.lib.cli.with_preset` (options given on the command line still win). Full scale
means a CUDA GPU; the ``cpu`` preset is the scale run on the project's 2-core CPU.
"""

from __future__ import annotations

from .settings import ForecastSettings, LoRASettings, LossSettings, TrainSettings

#: validation trajectories the baseline's token loss covers by default: the first 20 (40 chunks of 512 tokens, ~1.5
#: min on 2 CPU cores), so that the main job takes about 6 minutes there instead of 12, 6.5 of which were the loss
#: over all 100; ``--loss-limit all`` measures it over every validation trajectory, as the committed results/baseline_*
#: runs did
BASELINE_LOSS_LIMIT = 20
#: the coursework's learning-rate × rank grid (the sweep's, and the search's points)
GRID_LRS = (1e-5, 5e-5, 1e-4)
GRID_RANKS = (2, 4, 8)
#: training context lengths the context study compares
CONTEXT_LENGTHS = (128, 512, 768)
#: steps of the search's first rung, N, at full scale (None) and per preset
SEARCH_MIN_STEPS = {None: 300, "cpu": 100}
#: context-parroting match lengths m tried on the validation split (the classical stage, the side-by-side tables and
#: the forecast command)
PARROT_LENGTHS = (1, 2, 3, 5, 8, 12, 16, 20)

DEFAULTS = {
    #: every validation trajectory forecast, the validation loss over the first BASELINE_LOSS_LIMIT of them
    "baseline": {"forecast": ForecastSettings(gen_batch_size=100),
                 "loss": LossSettings(loss_limit=BASELINE_LOSS_LIMIT)},
    #: the coursework's default LoRA run; the forecasts cover the whole validation split
    "lora_default": {"train": TrainSettings(lr=1e-5, batch_size=4, context_length=512, max_steps=1_000,
                                            eval_every=250, eval_batches=8, checkpoint_every=250),
                     "forecast": ForecastSettings(gen_batch_size=100)},
    #: 500 steps per point at the coursework's batch 4 × context 512, 100 validation trajectories
    "sweep": {"train": TrainSettings(batch_size=4, context_length=512, max_steps=500, eval_every=100,
                                     eval_batches=8, eval_at_start=False, checkpoint_every=100),
              "forecast": ForecastSettings(limit=100, gen_batch_size=100, plots=2)},
    #: 1,000 steps per context at batch 4, 100 validation trajectories; lr and rank are priced at the grid's dearest
    #: rank and replaced by the sweep's choice when it is known
    "context_length": {"train": TrainSettings(lr=1e-4, batch_size=4, max_steps=1_000, eval_every=200,
                                              eval_batches=8, eval_at_start=False, checkpoint_every=100),
                       "lora": LoRASettings(rank=8),
                       "forecast": ForecastSettings(limit=100, gen_batch_size=100, plots=2)},
    #: rungs of 300 / 900 / 2,700 steps at the coursework's batch 4 × context 512, 100 validation trajectories
    "search": {"train": TrainSettings(batch_size=4, context_length=512, max_steps=2_700, eval_every=0,
                                      eval_batches=8, eval_at_start=False, checkpoint_every=100),
               "forecast": ForecastSettings(limit=100, gen_batch_size=100, plots=0)},
    #: up to 3,000 steps at batch 4 × 768 tokens, stopping after 5 evaluations without a new best validation score;
    #: priced at rank 8 and replaced by the search's (or the sweep's and the context study's) choices when known
    "final": {"train": TrainSettings(lr=1e-4, batch_size=4, context_length=768, max_steps=3_000, eval_every=100,
                                     eval_batches=8, early_stop_patience=5, restore_best=True, select_by="forecast",
                                     checkpoint_every=100),
              "lora": LoRASettings(rank=8),
              "forecast": ForecastSettings(split="test", limit=None, gen_batch_size=100, plots=4)},
}

PRESETS = {
    #: the same forecasts (about 5 minutes in bf16), without the validation loss
    "baseline": {"cpu": {"loss": {"loss_limit": 0}}},
    #: the scale of the committed LoRA runs (60 steps at context 256, 20 trajectories; ~11 min)
    "lora_default": {"cpu": {"train": {"context_length": 256, "max_steps": 60, "eval_every": 30, "eval_batches": 4,
                                       "checkpoint_every": 30},
                             "forecast": {"limit": 20}}},
    #: 100 steps per point at context 256 with the numeric-alphabet loss, 50 trajectories
    "sweep": {"cpu": {"train": {"context_length": 256, "max_steps": 100, "eval_every": 0, "eval_batches": 4,
                                "checkpoint_every": 25, "loss_vocabulary": "numeric"},
                      "forecast": {"limit": 50, "gen_batch_size": 25}}},
    #: 200 steps per context with the numeric-alphabet loss, 50 validation trajectories
    "context_length": {"cpu": {"train": {"max_steps": 200, "eval_every": 100, "eval_batches": 4,
                                         "checkpoint_every": 25, "loss_vocabulary": "numeric"},
                               "forecast": {"limit": 50, "gen_batch_size": 25}}},
    #: rungs of 100 / 300 / 900 steps at context 512 with the numeric-alphabet loss, 50 validation trajectories
    #: (several sittings: --resume)
    "search": {"cpu": {"train": {"eval_batches": 4, "checkpoint_every": 25, "loss_vocabulary": "numeric"},
                       "forecast": {"limit": 50, "gen_batch_size": 50}}},
    #: up to 1,000 steps at batch 4 × 512 tokens with the numeric-alphabet loss (several sittings: --resume)
    "final": {"cpu": {"train": {"context_length": 512, "max_steps": 1_000, "eval_batches": 4, "checkpoint_every": 25,
                                "loss_vocabulary": "numeric"},
                      "forecast": {"gen_batch_size": 25}}},
}
