"""Planned FLOPs of what the stages run, from the closed forms in :mod:`miniqwen.flop_count` — the one place a plan is
priced (the stages check it against the ledger before they start, ``experiments.flops`` prints the full plan).
Conventions: training = 3× forward (backward = 2× forward), evaluation and generation = 1× forward."""

from __future__ import annotations

from data import max_tokens_per_step, numeric_alphabet
from lora import DEFAULT_LORA_TARGETS
from miniqwen.flop_count import forward_flops, generation_flops, loss_flops

from .settings import ForecastSettings, LoRASettings, LossSettings, TrainSettings
from .training.loss import validation_subset


def forecast_cost(config, prompt_lengths: list[int], horizon: int, decimals: int, forecast: ForecastSettings,
                  lora: LoRASettings | None = None, head_rows: int | None = None, encoding: str = "decimal") -> int:
    """Upper bound on the FLOPs of :class:`evaluation.LLMForecaster` for prompts of ``prompt_lengths`` tokens.

    Prompts are batched by length as the forecaster does, each batch costed with
    :func:`miniqwen.flop_count.generation_flops` for its prompts' lengths, every row assumed to generate the full
    ``max_tokens_per_step(decimals, encoding) · horizon`` tokens. ``lora`` adds the adapters' cost (and the head
    bias's add, R per decoded position, with ``lora.head_bias``); ``head_rows`` =
    rows of the output head computed while decoding (None = the whole vocabulary); ``encoding``: the LLMTIME text's,
    "decimal" or "integer".
    """
    lens = sorted(prompt_lengths)
    max_new = max_tokens_per_step(decimals, encoding) * horizon
    rank, targets = (lora.rank, tuple(lora.targets)) if lora else (0, ())
    total = 0
    for start in range(0, len(lens), forecast.gen_batch_size):
        batch = lens[start : start + forecast.gen_batch_size]
        total += generation_flops(config, batch, max_new, len(batch), rank, targets or DEFAULT_LORA_TARGETS,
                                  num_samples=forecast.samples, head_rows=head_rows,
                                  head_bias=bool(lora and lora.head_bias))
    return total


def chunk_pass_flops(config, batch_size: int, context_length: int, lora: LoRASettings | None = None,
                     loss_rows: int | None = None) -> int:
    """One forward + loss over ``batch_size`` full chunks of ``context_length`` tokens (1× convention); with
    ``loss_rows`` = K the output head and the softmax cover K tokens only (the restricted loss). ``lora.head_bias``
    adds the bias's add: V (or K) FLOPs per position."""
    rank, targets = (lora.rank, tuple(lora.targets)) if lora else (0, DEFAULT_LORA_TARGETS)
    return forward_flops(config, batch_size, context_length, lora_rank=rank, lora_targets=targets,
                         head_rows=loss_rows, head_bias=bool(lora and lora.head_bias)) + \
        loss_flops(loss_rows or config.vocab_size, batch_size * (context_length - 1))


def validation_loss_cost(config, n_chunks: int, batch_size: int, context_length: int,
                         lora: LoRASettings | None = None) -> int:
    """FLOPs of a validation loss over ``n_chunks`` chunks in batches of ``batch_size`` (an upper bound: every
    position a real target)."""
    return sum(chunk_pass_flops(config, min(batch_size, n_chunks - s), context_length, lora)
               for s in range(0, n_chunks, batch_size))


def evaluations_ahead(train: TrainSettings, start_step: int = 0) -> int:
    """Validation-loss evaluations a run of ``train`` does from ``start_step``: step 0 (if ``eval_at_start`` and
    starting at 0), every multiple of ``eval_every`` still ahead, and the last step if it is not one of them."""
    e, n = train.eval_every, 0
    if train.max_steps > start_step:
        n = (train.max_steps // e - start_step // e) if e else 0
        n += 0 if e and train.max_steps % e == 0 else 1
    if start_step == 0 and train.eval_at_start:
        n += 1
    return n


def training_cost(config, train: TrainSettings, lora: LoRASettings, val_rows: int, start_step: int = 0,
                  loss_rows: int | None = None) -> int:
    """FLOPs a training run will be charged from ``start_step`` to ``train.max_steps``: 3× (forward + loss) per
    step (``loss_rows`` = K for the restricted loss), plus 1× per validation-loss evaluation over ``val_rows``
    chunks (0 = no evaluation; always the full vocabulary). An upper bound: every position is taken as a real target
    and early stopping is ignored."""
    steps = max(0, train.max_steps - start_step)
    per_eval = validation_loss_cost(config, val_rows, train.batch_size, train.context_length, lora)
    n_evals = evaluations_ahead(train, start_step) if val_rows else 0
    step = chunk_pass_flops(config, train.batch_size, train.context_length, lora, loss_rows)
    return 3 * steps * step + n_evals * per_eval


# ---------------------------------------------------------------------------------------------------------------
# Sizes a plan needs: exact ones from a stage's data and tokenizer, or bounds that need neither
# ---------------------------------------------------------------------------------------------------------------

#: trajectories per split and time steps per trajectory of the coursework's data (1000 systems split 80/10/10)
SPLIT_TRAJECTORIES, TRAJECTORY_STEPS = 100, 100


class Sizes:
    """The sizes a plan depends on: a forecast's prompt token counts, the validation rows the training loop
    evaluates, the chunks of a validation-loss pass and the numeric head's rows (for the LLMTIME text's
    ``decimals`` and ``encoding``, "decimal" or "integer").

    Without data (``Sizes(decimals, encoding)``, what ``experiments.flops`` plans with) each is an upper bound:
    every prompt step at :func:`data.llmtime.max_tokens_per_step` tokens, every split of
    :data:`SPLIT_TRAJECTORIES` trajectories of :data:`TRAJECTORY_STEPS` steps, the validation subset always full.
    A stage with its data and tokenizer gives the exact counts (:func:`runs.exact_sizes`): ``prompt_lengths``
    (``forecast -> [n] tokens``), ``chunk_count`` (``(split, limit, context_length, stride) -> chunks``) and
    ``head_rows``."""

    def __init__(self, decimals: int = 2, encoding: str = "decimal", *, head_rows: int | None = None,
                 prompt_lengths=None, chunk_count=None):
        self.decimals, self.encoding = decimals, encoding
        self.per_step = max_tokens_per_step(decimals, encoding)
        # the alphabet, end and padding tokens
        self.head_rows = len(numeric_alphabet(encoding)) + 2 if head_rows is None else head_rows
        self._prompt_lengths, self._chunk_count = prompt_lengths, chunk_count

    def prompt_lengths(self, forecast: ForecastSettings) -> list[int]:
        """Prompt tokens of each trajectory ``forecast`` forecasts (a list, one per trajectory)."""
        if self._prompt_lengths is not None:
            return self._prompt_lengths(forecast)
        n = min(forecast.limit or SPLIT_TRAJECTORIES, SPLIT_TRAJECTORIES)
        return [forecast.context_steps * self.per_step + 1] * n

    def val_rows(self, train: TrainSettings) -> int:
        """Rows of the fixed validation subset the training loop evaluates (:func:`training.loss.validation_subset`
        of the validation chunks; without data, ``eval_batches × batch_size``)."""
        size = train.eval_batches * train.batch_size
        if self._chunk_count is None:
            return size
        return len(validation_subset(self._chunk_count("validation", None, train.context_length, train.stride), size,
                                     seed=0))  # its size does not depend on the seed

    def loss_chunks(self, loss: LossSettings) -> int:
        """Chunks of ``loss.loss_context_length`` tokens a validation-loss pass over ``loss.loss_limit`` validation
        trajectories evaluates."""
        if self._chunk_count is not None:
            return self._chunk_count("validation", loss.loss_limit, loss.loss_context_length, None)
        n = min(SPLIT_TRAJECTORIES if loss.loss_limit is None else loss.loss_limit, SPLIT_TRAJECTORIES)
        return n * -(-(TRAJECTORY_STEPS * self.per_step) // loss.loss_context_length)

    def loss_rows(self, train: TrainSettings) -> int | None:
        """Head rows of the training loss: K for the numeric vocabulary, None for the full one."""
        return self.head_rows if train.loss_vocabulary == "numeric" else None


def lora_run_cost(config, sizes, forecast: ForecastSettings, lora: LoRASettings, train: TrainSettings,
                  start_step: int = 0, forecasts: int = 1) -> dict[str, int]:
    """``{"training": …, "forecast": …}``: one LoRA run from ``start_step`` (:func:`training_cost`) and
    ``forecasts`` forecasts of ``forecast``'s trajectories with the adapter (:func:`forecast_cost`); ``sizes`` is
    :class:`Sizes`."""
    return {"training": training_cost(config, train, lora, sizes.val_rows(train), start_step, sizes.loss_rows(train)),
            "forecast": forecasts * forecast_cost(config, sizes.prompt_lengths(forecast), forecast.horizon,
                                                  sizes.decimals, forecast, lora, head_rows=sizes.head_rows,
                                                  encoding=sizes.encoding)}


def untrained_forecast_cost(config, sizes, forecast: ForecastSettings) -> int:
    """FLOPs of forecasting ``forecast``'s trajectories with the base model (no adapters)."""
    return forecast_cost(config, sizes.prompt_lengths(forecast), forecast.horizon, sizes.decimals, forecast,
                         head_rows=sizes.head_rows, encoding=sizes.encoding)


def lora_stage_cost(config, sizes, forecast: ForecastSettings, lora: LoRASettings, train: TrainSettings,
                    start_step: int = 0, untrained: bool = True) -> dict[str, int]:
    """A stage of one LoRA run (``lora_default``, ``final``): the untrained forecast (if ``untrained``), training
    from ``start_step`` (an upper bound: early stopping ignored) and the trained forecast."""
    run = lora_run_cost(config, sizes, forecast, lora, train, start_step)
    return {"untrained forecast": untrained_forecast_cost(config, sizes, forecast) if untrained else 0,
            "training": run["training"], "trained forecast": run["forecast"]}


def baseline_cost(config, sizes, forecast: ForecastSettings, loss: LossSettings) -> dict[str, int]:
    """The zero-shot stage: its forecast and (unless ``loss_limit`` is 0) the validation loss."""
    costs = {"forecast": untrained_forecast_cost(config, sizes, forecast)}
    if loss.loss_limit != 0:
        costs["validation loss"] = validation_loss_cost(config, sizes.loss_chunks(loss), loss.loss_batch_size,
                                                        loss.loss_context_length)
    return costs
