"""Data pipeline for miniqwen: Lotka–Volterra trajectories -> LLMTIME text -> token chunks.

Independent of the model code: tokenization takes any object with
``encode(text: str) -> list[int]``.

* :mod:`data.lotka_volterra` – find (falling back to a cached synthetic set when no coursework file is found),
  load/validate the HDF5 file and split it.
* :mod:`data.llmtime` – LLMTIME scaling and text encoding/decoding, with or without
  the decimal point (``ENCODINGS``; Gruver et al. 2023, NeurIPS, section 3).
* :mod:`data.chunks` – tokenized fixed-length training windows.
* :mod:`data.series` – one two-species series from anyone's CSV (validated cell by cell) or the HDF5 file.
* :mod:`data.simulate` – synthetic data in the same schema, damped (Rosenzweig–MacArthur, tuned to the coursework
  file) or classic (``python -m data.simulate --out data/lotka_volterra_data.h5 [--model classic]``).
"""

from .chunks import Chunks, chunk_texts, make_chunks, tokenize_texts
from .llmtime import (ENCODINGS, NUMERIC_ALPHABET, SCALINGS, Decoded, SeriesScale, decode, encode, fit_scale,
                      fit_series_scale, max_tokens_per_step, numeric_alphabet)
from .lotka_volterra import (
    DATA_ENV_VAR,
    SPLITS,
    DataError,
    LotkaVolterraData,
    default_data_path,
    load_trajectories,
    resolve_data_path,
    split_indices,
    synthetic_data_path,
)
from .series import Series, SeriesError, is_hdf5, read_series_csv, read_trajectory

__all__ = [
    "DATA_ENV_VAR",
    "ENCODINGS",
    "NUMERIC_ALPHABET",
    "SPLITS",
    "Chunks",
    "DataError",
    "Decoded",
    "LotkaVolterraData",
    "Series",
    "SeriesError",
    "chunk_texts",
    "decode",
    "default_data_path",
    "encode",
    "fit_scale",
    "is_hdf5",
    "load_trajectories",
    "make_chunks",
    "max_tokens_per_step",
    "numeric_alphabet",
    "read_series_csv",
    "read_trajectory",
    "resolve_data_path",
    "split_indices",
    "synthetic_data_path",
    "tokenize_texts",
]
