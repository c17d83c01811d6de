"""Cut tokenized texts into fixed-length training chunks.

Each token sequence (one encoded trajectory) is cut independently into windows
of ``context_length`` tokens; windows never span two sequences. Short windows
are right-padded and masked, so the training loss must ignore positions with
``attention_mask == 0`` (e.g. labels = input_ids with -100 where the mask is 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np
import torch


class Tokenizer(Protocol):
    """Anything with ``encode(text) -> list[int]`` (e.g. a Hugging Face tokenizer)."""

    def encode(self, text: str) -> list[int]: ...


def tokenize_texts(tokenizer: Tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Tokenize every text with ``tokenizer.encode``.

    Args:
        tokenizer: object with ``encode(text: str) -> list[int]``. Whatever the
            tokenizer adds by itself (e.g. special tokens) is kept.
        texts: sequence of strings (a bare ``str`` is rejected, since iterating
            it would tokenize single characters).

    Returns:
        One list of int token ids per text, same order.

    Raises:
        TypeError: if ``texts`` is a single string or contains a non-string.
    """
    if isinstance(texts, str):
        raise TypeError("tokenize_texts: texts must be a sequence of strings, not a single string.")
    sequences = []
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"tokenize_texts: texts[{index}] is a {type(text).__name__}, expected str.")
        sequences.append([int(token) for token in tokenizer.encode(text)])
    return sequences


@dataclass
class Chunks:
    """A batch of fixed-length token windows.

    Attributes:
        input_ids: ``torch.long`` tensor of shape ``(M, L)``; M windows of L tokens.
        attention_mask: ``torch.long`` tensor of shape ``(M, L)``; 1 = real
            token, 0 = right padding.

    ``len(chunks)`` is M; ``chunks[i]`` is a dict with both tensors' row i, so
    a Chunks object can be used directly as a map-style torch Dataset.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    def __post_init__(self) -> None:
        if self.input_ids.ndim != 2 or self.input_ids.shape != self.attention_mask.shape:
            raise ValueError(
                "Chunks: input_ids and attention_mask must both have shape (M, L), got "
                f"{tuple(self.input_ids.shape)} and {tuple(self.attention_mask.shape)}."
            )

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[index], "attention_mask": self.attention_mask[index]}


def _window_starts(length: int, context_length: int, stride: int) -> list[int]:
    """Start offsets 0, stride, 2*stride, ... until a window reaches the end of the sequence."""
    starts = [0]
    while starts[-1] + context_length < length:
        starts.append(starts[-1] + stride)
    return starts


def make_chunks(
    token_sequences: Sequence[Sequence[int]],
    context_length: int,
    stride: int | None = None,
    pad_id: int = 0,
) -> Chunks:
    """Cut each token sequence into sliding windows of ``context_length`` tokens.

    Windows of a sequence of length n start at 0, stride, 2*stride, ... and
    stop at the first window that reaches the end of the sequence, so every
    token is covered and no window adds nothing new. A sequence shorter than
    ``context_length`` gives one window. Windows shorter than
    ``context_length`` are right-padded with ``pad_id`` (mask 0). Empty
    sequences are skipped. Windows are ordered by sequence, then start.

    Example: length 10, context_length 4, stride 4 -> tokens [0:4], [4:8],
    [8:10] + 2 padding; with stride 2 -> [0:4], [2:6], [4:8], [6:10].

    Args:
        token_sequences: list of token-id lists.
        context_length: window length L (>= 2, since next-token training needs
            at least an input and a target).
        stride: offset between window starts (1 <= stride <= L); default L,
            i.e. non-overlapping windows.
        pad_id: id used for padding positions.

    Returns:
        Chunks with tensors of shape ``(M, L)``, M = total number of windows
        (``(0, L)`` if every sequence is empty).

    Raises:
        ValueError: if context_length < 2, stride < 1 or stride > context_length.
    """
    context_length = int(context_length)
    if context_length < 2:
        raise ValueError(f"make_chunks: context_length must be >= 2, got {context_length}.")
    stride = context_length if stride is None else int(stride)
    if not 1 <= stride <= context_length:
        raise ValueError(
            f"make_chunks: stride must satisfy 1 <= stride <= context_length ({context_length}), got {stride}."
        )

    windows: list[np.ndarray] = []
    for sequence in token_sequences:
        tokens = np.asarray(sequence, dtype=np.int64).reshape(-1)
        if tokens.size == 0:
            continue
        for start in _window_starts(tokens.size, context_length, stride):
            windows.append(tokens[start : start + context_length])

    input_ids = np.full((len(windows), context_length), pad_id, dtype=np.int64)
    attention_mask = np.zeros((len(windows), context_length), dtype=np.int64)
    for row, window in enumerate(windows):
        input_ids[row, : window.size] = window
        attention_mask[row, : window.size] = 1
    return Chunks(input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(attention_mask))


def chunk_texts(
    tokenizer: Tokenizer,
    texts: Sequence[str],
    context_length: int,
    stride: int | None = None,
    pad_id: int = 0,
) -> Chunks:
    """Tokenize ``texts`` and cut them into chunks: ``make_chunks(tokenize_texts(...), ...)``.

    See :func:`tokenize_texts` and :func:`make_chunks` for shapes and errors.
    """
    return make_chunks(tokenize_texts(tokenizer, texts), context_length, stride=stride, pad_id=pad_id)
