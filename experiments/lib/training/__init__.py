"""Training, one job per file: :mod:`.loop` (the loop and its state), :mod:`.checkpoint` (the only owner of the
checkpoint layout), :mod:`.loss` (the objective and the validation loss),
:mod:`.distributed` (torchrun + DDP: the process group, sums over ranks)."""

from .checkpoint import CheckpointError, checkpoint_step, find_checkpoint, read_checkpoint
from .loop import TrainState, read_log, train, validation_subset
from .loss import autocast_context, next_token_loss, validation_loss

__all__ = ["CheckpointError", "TrainState", "checkpoint_step", "autocast_context", "find_checkpoint", "next_token_loss",
           "read_checkpoint", "read_log", "train", "validation_loss", "validation_subset"]
