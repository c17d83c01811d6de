"""Where a training run is: the counters a checkpoint stores besides tensors. A leaf of the training package: the
loop, its steps and the checkpoint code all read it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainState:
    """Where a run is: what a checkpoint stores besides tensors (all JSON-ready)."""

    step: int = 0
    epoch: int = 0
    position: int = 0          # next chunk of this epoch's permutation
    train_flops: int = 0       # already 3× forward
    eval_flops: int = 0
    charged_train: int = 0     # what the ledger already holds of the two above
    charged_eval: int = 0
    best_val_loss: float | None = None         # at the best step: the lowest unless select_by is "forecast"
    best_forecast_score: float | None = None   # at the best step (when the stage gives a forecast scorer)
    best_step: int | None = None
    evals_since_best: int = 0
    last_val_loss: float | None = None
    stopped_early: bool = False
