"""Training a LoRA adapter, one job per file: :mod:`.loop` (:func:`train_lora`, its named steps in order),
:mod:`.steps` (the steps a run repeats: batch, optimizer step, evaluation, checkpoint), :mod:`.state` (where a run
is), :mod:`.checkpoint` (the only owner of the checkpoint layout), :mod:`.loss` (the objective and the validation
loss), :mod:`.distributed` (torchrun + DDP: the process group, sums over ranks)."""

from .checkpoint import CheckpointError, checkpoint_step, find_checkpoint, read_checkpoint
from .loop import read_log, train_lora
from .loss import autocast_context, next_token_loss, validation_loss, validation_subset
from .state import TrainState

__all__ = ["CheckpointError", "TrainState", "checkpoint_step", "autocast_context", "find_checkpoint", "next_token_loss",
           "read_checkpoint", "read_log", "train_lora", "validation_loss", "validation_subset"]
