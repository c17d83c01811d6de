"""The one way a stage loads the base model, and the one block it computes bf16 in where bf16 is emulated.

    loaded = load_model(run.model, run.device, run.precision)   # weights + tokenizer, device and dtype resolved
    with emulation(loaded.device, loaded.precision):            # every stage holds this around its work
        ...forecast, train...

Every stage that computes with the model loads it here: :class:`session.Session` (baseline, lora_default, sweep,
context_length, search, final), ``experiments.forecast`` (:func:`series_forecast.llm_forecast`), ``experiments.train``
and ``scripts/reforecast.py``. The device and the compute dtype are resolved in one place (:func:`placement`:
``--device auto`` by :func:`training.distributed.device`, ``--precision auto`` by :func:`resolve_precision`), the
weights are loaded strictly (:func:`miniqwen.load_pretrained`) and a tokenizer whose ids do not fit the embedding is
refused. :func:`emulation` is the bf16 emulation (:class:`miniqwen.emulation.Float32Matmuls`, on a CPU without bf16
instructions: :func:`miniqwen.device.emulated_precision`) as a ``with`` block, left when the stage's work is done.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from miniqwen import WeightsError
from miniqwen.device import emulated_precision
from miniqwen.emulation import Float32Matmuls
from miniqwen.loading import resolve_model_dir

from .training import distributed


def weights_label(model: str) -> str:
    """What the weights are, for results: the first line of a PROVENANCE.txt beside them (the offline dequantized
    build writes one), without its closing full stop so that it reads inside a sentence, else ``model`` as given (a
    Hub repo id, or a directory's name)."""
    path = Path(model).expanduser()
    provenance = path / "PROVENANCE.txt"
    if provenance.is_file():
        return provenance.read_text().splitlines()[0].rstrip(".")
    return path.name if path.is_dir() else str(model)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``precision`` as given, or for ``"auto"`` the dtype :func:`miniqwen.device.default_compute_dtype` picks on
    ``device``: "bfloat16" on CUDA GPUs of compute capability >= 8.0 and on CPUs with native bf16 matrix products,
    "float16" on older CUDA GPUs (T4, V100) and on Apple silicon (MPS), else "float32"."""
    if precision != "auto":
        return precision
    from miniqwen.device import default_compute_dtype

    return str(default_compute_dtype(device)).removeprefix("torch.")


def placement(device: str | torch.device | None, precision: str) -> tuple[torch.device, str]:
    """``(device, compute dtype name)`` for ``--device`` (None or "auto": CUDA, else MPS, else the CPU; under
    torchrun ``cuda:LOCAL_RANK``) and ``--precision`` ("auto": by device, :func:`resolve_precision`). Resolving a
    resolved pair gives it back."""
    where = distributed.device(device)
    return where, resolve_precision(precision, where)


@dataclass
class Loaded:
    """A loaded base model: ``model`` (eval mode) and ``tokenizer``, the ``device`` and compute dtype
    (``precision``, a name) they were resolved to, and ``weights``, the weights' label (:func:`weights_label`)."""

    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    precision: str
    weights: str


def load_model(model: str, device: str | torch.device | None = None, precision: str = "auto", *,
               weights_dtype: str | None = None, check_tokenizer: bool = True) -> Loaded:
    """Load ``model`` (a Hub repo id or an HF-layout directory) and its tokenizer on ``device`` in ``precision``,
    both resolved by :func:`placement`.

    ``weights_dtype``: hold the weights in this dtype instead of the compute dtype (``experiments.train`` keeps
    float32 weights and autocasts to ``precision``). ``check_tokenizer`` False: the caller tokenizes nothing
    (``experiments.train`` reads token chunks, checked against ``config.vocab_size``), so a tokenizer.json with more
    ids than the embedding is not refused. Loads through ``miniqwen.load_pretrained`` as it is at call time.

    Raises:
        WeightsError: bad or missing weights or tokenizer.json, or (``check_tokenizer``) a tokenizer whose ids do
            not fit the embedding. ConfigError: a bad config.json.
    """
    import miniqwen

    where, dtype = placement(device, precision)
    model_dir = resolve_model_dir(model)
    net, tokenizer = miniqwen.load_pretrained(model_dir, dtype=getattr(torch, weights_dtype or dtype), device=where)
    if check_tokenizer and tokenizer.vocab_size > net.config.vocab_size:  # ids past the embedding: an IndexError
        raise WeightsError(f"{model_dir}: config.json's vocab_size {net.config.vocab_size} is smaller than the "
                           f"{tokenizer.vocab_size} token ids of its tokenizer.json: the tokenizer is not these "
                           "weights' (use the model's own tokenizer.json)")
    return Loaded(net.eval(), tokenizer, where, dtype, weights_label(model))


_emulating = 0  # depth of the emulation blocks entered (only the outermost one enters Float32Matmuls)


@contextmanager
def emulation(device: str | torch.device | None, precision: str):
    """Within it, bf16 matmuls run in float32 kernels (:class:`miniqwen.emulation.Float32Matmuls`) when
    ``precision`` on ``device`` (resolved by :func:`placement`) is bf16 on a CPU without bf16 instructions
    (:func:`miniqwen.device.emulated_precision`), whose note is then printed to stderr; elsewhere it does
    nothing. Nested blocks (``llm_forecast`` inside the forecast stage's) neither enter it again nor repeat the
    note. Yields True when bf16 is emulated. Left on the way out, also on an exception."""
    global _emulating
    note = emulated_precision(*placement(device, precision))
    if note is None or _emulating:
        yield note is not None
        return
    print(note, file=sys.stderr)
    _emulating += 1
    try:
        with Float32Matmuls():
            yield True
    finally:
        _emulating -= 1
