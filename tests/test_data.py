"""Tests for the `data` package. Small and fast; uses simulated data, never the real file."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from data import (
    SPLITS,
    DataError,
    chunk_texts,
    decode,
    encode,
    fit_scale,
    load_trajectories,
    make_chunks,
    resolve_data_path,
    split_indices,
    tokenize_texts,
)
from data.simulate import main as simulate_main
from data.simulate import simulate, write_h5


class CharTokenizer:
    """One token id per character (its code point)."""

    def encode(self, text: str) -> list[int]:
        return [ord(ch) for ch in text]


@pytest.fixture(scope="module")
def small_sim():
    return simulate(n_systems=6, n_steps=20, t_max=40.0, seed=3)


# ----------------------------------------------------------------------------- LLMTIME


@pytest.mark.parametrize("decimals", [0, 1, 2, 3, 5])
@pytest.mark.parametrize("alpha", [0.6, 1.0, 3.7])
def test_encode_decode_round_trip(small_sim, decimals, alpha):
    trajectory = small_sim[0][1].astype(np.float64)
    text = encode(trajectory, alpha, decimals=decimals)
    decoded = decode(text, alpha, expected_steps=trajectory.shape[0])
    assert decoded.complete
    assert decoded.values.shape == trajectory.shape
    bound = 0.5 * 10.0**-decimals * alpha + 1e-9 * max(1.0, alpha)
    assert np.max(np.abs(decoded.values - trajectory)) <= bound


def test_encode_format():
    trajectory = np.array([[1.234, 0.45], [1.3, 0.414], [0.0, 12.0]])
    assert encode(trajectory, 1.0) == "1.23,0.45;1.30,0.41;0.00,12.00"
    assert encode(trajectory * 2, 2.0, decimals=1) == "1.2,0.5;1.3,0.4;0.0,12.0"
    assert encode(np.array([[-0.0, 0.0]]), 1.0) == "0.00,0.00"
    assert encode(np.zeros((0, 2)), 1.0) == ""


@pytest.mark.parametrize(
    "bad",
    [np.array([[1.0, -0.1]]), np.array([[np.nan, 1.0]]), np.array([[np.inf, 1.0]]), np.ones((3, 3)), np.ones(4)],
)
def test_encode_rejects_bad_input(bad):
    with pytest.raises(ValueError):
        encode(bad, 1.0)


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_alpha_raises(alpha):
    with pytest.raises(ValueError):
        encode(np.ones((2, 2)), alpha)
    with pytest.raises(ValueError):
        decode("1,2", alpha)


def test_fit_scale_rule_and_train_only():
    trajectories, _ = simulate(n_systems=20, n_steps=10, t_max=20.0, seed=1)
    splits = split_indices(len(trajectories))
    train = trajectories[splits["train"]]
    alpha = fit_scale(train)
    assert alpha == pytest.approx(np.quantile(train.astype(np.float64), 0.99) / 10.0)
    assert np.quantile(train / alpha, 0.99) == pytest.approx(10.0)
    changed = trajectories.copy()
    changed[splits["validation"]] *= 100.0
    changed[splits["test"]] = 0.0
    assert fit_scale(changed[splits["train"]]) == alpha
    assert fit_scale(train, quantile=0.5, target=1.0) == pytest.approx(np.median(train.astype(np.float64)))


@pytest.mark.parametrize("bad", [np.zeros((0, 5, 2)), np.array([1.0, np.nan]), np.array([1.0, -1.0]), np.zeros((3, 2))])
def test_fit_scale_rejects_bad_input(bad):
    with pytest.raises(ValueError):
        fit_scale(bad)


GARBAGE = [
    "",
    "   ",
    ";",
    ";;;",
    "abc",
    "1.2.3,4",
    "1,2,3",
    "1",
    ",",
    "1,",
    ",1",
    "nan,1",
    "inf,1",
    "1e999,1",
    "-1,2",
    "1_0,2",
    "0x1,2",
    "\n\t;\n",
    "1,2;;3,4",
    "🙂,🙂",
    "1 2,3",
    "1,2;" * 3 + "garbage" + ";",
    "\x00\xff",
]


@pytest.mark.parametrize("text", GARBAGE)
@pytest.mark.parametrize("expected_steps", [None, 0, 2, 5])
def test_decode_never_raises_on_garbage(text, expected_steps):
    result = decode(text, 0.5, expected_steps=expected_steps)
    n_rows = result.values.shape[0]
    assert result.values.shape[1] == 2
    if expected_steps is not None:
        assert n_rows == expected_steps
    n_nan_rows = int(np.isnan(result.values).any(axis=1).sum())
    assert n_nan_rows == result.n_invalid + result.n_missing
    assert np.all(result.values[~np.isnan(result.values)] >= 0)


@pytest.mark.parametrize(
    "text, expected_steps, n_rows, n_invalid, n_missing",
    [
        ("", None, 0, 0, 0),
        ("", 3, 3, 0, 3),
        (";;;", None, 3, 3, 0),
        ("1,2,3", None, 1, 1, 0),
        ("1.2.3,4", None, 1, 1, 0),
        ("1,2;", None, 1, 0, 0),
        ("1,2;;", None, 2, 1, 0),
        (" 1 , 2 ; 3,4 ;\n", None, 2, 0, 0),
        ("1,2;x;3,4;-1,2;5,6", None, 5, 2, 0),
        ("1,2;x;3,4;-1,2;5,6", 3, 3, 1, 0),
        ("1,2;x;3,4", 5, 5, 1, 2),
        ("1,2;3,4;5,6", 2, 2, 0, 0),
    ],
)
def test_decode_counts(text, expected_steps, n_rows, n_invalid, n_missing):
    result = decode(text, 2.0, expected_steps=expected_steps)
    assert result.values.shape == (n_rows, 2)
    assert (result.n_invalid, result.n_missing) == (n_invalid, n_missing)
    assert result.complete == (n_invalid == 0 and n_missing == 0)


def test_decode_half_valid_values():
    result = decode("1.00,2.00;oops;3.00,4.00;1,2,3", 0.5, expected_steps=6)
    expected = np.array([[0.5, 1.0], [np.nan, np.nan], [1.5, 2.0], [np.nan, np.nan], [np.nan, np.nan], [np.nan, np.nan]])
    np.testing.assert_allclose(result.values, expected)
    assert (result.n_invalid, result.n_missing, result.complete) == (2, 2, False)


def test_decode_argument_errors():
    with pytest.raises(ValueError):
        decode("1,2", 1.0, expected_steps=-1)


# ----------------------------------------------------------------------------- splits


def test_split_boundaries():
    splits = split_indices(1000)
    assert tuple(splits) == SPLITS
    assert (splits["train"][0], splits["train"][-1], len(splits["train"])) == (0, 799, 800)
    assert (splits["validation"][0], splits["validation"][-1], len(splits["validation"])) == (800, 899, 100)
    assert (splits["test"][0], splits["test"][-1], len(splits["test"])) == (900, 999, 100)
    small = split_indices(50)
    assert [len(small[name]) for name in SPLITS] == [40, 5, 5]
    np.testing.assert_array_equal(np.concatenate([small[name] for name in SPLITS]), np.arange(50))
    explicit = split_indices(1000, train_end=800, validation_end=900)
    for name in SPLITS:
        np.testing.assert_array_equal(explicit[name], splits[name])
    assert [len(v) for v in split_indices(10, train_end=7, validation_end=10).values()] == [7, 3, 0]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(n=0),
        dict(n=10, train_fraction=0.0),
        dict(n=10, train_fraction=0.95, validation_fraction=0.1),
        dict(n=10, train_fraction=-0.1),
        dict(n=10, train_end=0),
        dict(n=10, train_end=11),
        dict(n=10, train_end=8, validation_end=7),
        dict(n=10, train_end=8, validation_end=11),
    ],
)
def test_impossible_splits_raise(kwargs):
    with pytest.raises(ValueError):
        split_indices(**kwargs)


# ----------------------------------------------------------------------------- HDF5 loading


def _write_raw(path: Path, **datasets) -> Path:
    with h5py.File(path, "w") as file:
        for name, value in datasets.items():
            file.create_dataset(name, data=value)
    return path


def test_schema_round_trip(tmp_path, small_sim):
    trajectories, time = small_sim
    path = write_h5(tmp_path / "nested" / "lv.h5", trajectories, time)
    data = load_trajectories(path)
    assert data.path == path
    assert data.trajectories.dtype == np.float32 and data.time.dtype == np.float64
    np.testing.assert_array_equal(data.trajectories, trajectories)
    np.testing.assert_array_equal(data.time, time)
    assert (data.n_systems, data.n_steps) == (6, 20)
    assert not list((tmp_path / "nested").glob("*.tmp"))


GOOD_TRAJ = np.ones((3, 4, 2), dtype=np.float32)
GOOD_TIME = np.arange(4, dtype=np.float64)


def _nan_traj():
    values = GOOD_TRAJ.copy()
    values[1, 2, 0] = np.nan
    return values


def _negative_traj():
    values = GOOD_TRAJ.copy()
    values[2, 3, 1] = -0.5
    return values


@pytest.mark.parametrize(
    "datasets, fragment",
    [
        (dict(trajectories=GOOD_TRAJ), "missing dataset '/time'"),
        (dict(time=GOOD_TIME), "missing dataset '/trajectories'"),
        (dict(trajectories=np.ones((3, 4), dtype=np.float32), time=GOOD_TIME), "shape"),
        (dict(trajectories=np.ones((3, 4, 3), dtype=np.float32), time=GOOD_TIME), "shape"),
        (dict(trajectories=GOOD_TRAJ, time=np.arange(5.0)), "'/time' has shape"),
        (dict(trajectories=GOOD_TRAJ, time=np.ones((4, 1))), "'/time' has shape"),
        (dict(trajectories=_nan_traj(), time=GOOD_TIME), "1 non-finite value(s) (NaN or inf); first at index (1, 2, 0)"),
        (dict(trajectories=_negative_traj(), time=GOOD_TIME), "1 negative value(s)"),
        (dict(trajectories=GOOD_TRAJ, time=np.array([0.0, 1.0, 1.0, 2.0])), "strictly increasing"),
    ],
)
def test_bad_hdf5_contents_raise(tmp_path, datasets, fragment):
    path = _write_raw(tmp_path / "bad_file.h5", **datasets)
    with pytest.raises(DataError) as info:
        load_trajectories(path)
    assert "bad_file.h5" in str(info.value)
    assert fragment in str(info.value)


def test_missing_file_raises_with_advice(tmp_path):
    path = tmp_path / "no_such_file.h5"
    with pytest.raises(DataError) as info:
        load_trajectories(path)
    message = str(info.value)
    assert "no_such_file.h5" in message
    assert "--data" in message and "MINIQWEN_DATA" in message and "python -m data.simulate" in message


def test_not_hdf5_raises(tmp_path):
    path = tmp_path / "garbage_bytes.h5"
    path.write_bytes(b"this is not an HDF5 file\x00\x01\x02" * 10)
    with pytest.raises(DataError, match="garbage_bytes.h5"):
        load_trajectories(path)


def test_data_error_is_value_error():
    assert issubclass(DataError, ValueError)


def test_resolve_data_path(tmp_path, monkeypatch):
    explicit = tmp_path / "explicit.h5"
    assert resolve_data_path(explicit) == explicit
    monkeypatch.setenv("MINIQWEN_DATA", str(tmp_path / "from_env.h5"))
    assert resolve_data_path(None) == tmp_path / "from_env.h5"
    assert resolve_data_path(explicit) == explicit


def test_resolve_data_path_nothing_found_falls_back_to_synthetic(tmp_path, monkeypatch):
    import data.lotka_volterra as lv

    monkeypatch.delenv("MINIQWEN_DATA", raising=False)
    monkeypatch.setattr(lv, "default_data_candidates", lambda: [tmp_path / "a.h5", tmp_path / "b.h5"])
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    fallback = resolve_data_path(None)
    assert fallback == tmp_path / "cache" / "miniqwen" / lv.SYNTHETIC_FILENAME and fallback.is_file()
    assert load_trajectories(fallback).synthetic
    (tmp_path / "b.h5").touch()
    assert resolve_data_path(None) == tmp_path / "b.h5"


# ----------------------------------------------------------------------------- chunks


def test_chunks_non_overlapping_with_padding():
    chunks = make_chunks([list(range(1, 11))], context_length=4, pad_id=-1)
    assert len(chunks) == 3
    assert chunks.input_ids.dtype == torch.long and chunks.attention_mask.dtype == torch.long
    assert chunks.input_ids.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, -1, -1]]
    assert chunks.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]]


def test_chunks_exact_multiple_has_no_empty_window():
    chunks = make_chunks([list(range(8))], context_length=4)
    assert chunks.input_ids.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert bool(chunks.attention_mask.all())


def test_chunks_stride_overlap():
    chunks = make_chunks([list(range(10))], context_length=4, stride=2)
    assert chunks.input_ids.tolist() == [[0, 1, 2, 3], [2, 3, 4, 5], [4, 5, 6, 7], [6, 7, 8, 9]]
    assert bool(chunks.attention_mask.all())
    chunks = make_chunks([list(range(11))], context_length=4, stride=3, pad_id=99)
    assert chunks.input_ids.tolist() == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9], [9, 10, 99, 99]]
    assert chunks.attention_mask[-1].tolist() == [1, 1, 0, 0]


def test_chunks_several_sequences_and_short_ones():
    chunks = make_chunks([[5, 6], [], [7, 8, 9, 10, 11]], context_length=4)
    assert chunks.input_ids.tolist() == [[5, 6, 0, 0], [7, 8, 9, 10], [11, 0, 0, 0]]
    assert chunks.attention_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert make_chunks([[]], context_length=4).input_ids.shape == (0, 4)
    item = chunks[1]
    assert item["input_ids"].tolist() == [7, 8, 9, 10] and item["attention_mask"].tolist() == [1, 1, 1, 1]


def test_chunk_texts_and_mask_matches_tokens():
    tokenizer = CharTokenizer()
    texts = ["1.00,2.00;3.00,4.00", "5.5,6.6"]
    assert tokenize_texts(tokenizer, texts)[1] == [ord(ch) for ch in texts[1]]
    chunks = chunk_texts(tokenizer, texts, context_length=8, stride=5)
    real_tokens = chunks.input_ids[chunks.attention_mask.bool()]
    assert set(real_tokens.tolist()) <= {ord(ch) for ch in "".join(texts)}
    assert bool((chunks.input_ids[~chunks.attention_mask.bool()] == 0).all())
    # every mask row is a prefix of ones followed by zeros (right padding)
    mask = chunks.attention_mask
    assert bool((mask[:, 1:] <= mask[:, :-1]).all())
    # the concatenation of non-overlapping parts reproduces each text
    first = make_chunks(tokenize_texts(tokenizer, texts[:1]), context_length=8)
    decoded = "".join(chr(t) for t in first.input_ids[first.attention_mask.bool()].tolist())
    assert decoded == texts[0]
    with pytest.raises(TypeError):
        tokenize_texts(tokenizer, "a single string")


@pytest.mark.parametrize("kwargs", [dict(context_length=1), dict(context_length=4, stride=0), dict(context_length=4, stride=5)])
def test_chunks_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        make_chunks([[1, 2, 3]], **kwargs)


# ----------------------------------------------------------------------------- simulator


def test_simulator_deterministic_positive_finite(small_sim):
    trajectories, time = small_sim
    assert trajectories.shape == (6, 20, 2) and trajectories.dtype == np.float32
    assert time.shape == (20,) and time.dtype == np.float64
    assert time[0] == 0.0 and time[-1] == 40.0
    assert np.all(np.isfinite(trajectories)) and np.all(trajectories > 0)
    again, _ = simulate(n_systems=6, n_steps=20, t_max=40.0, seed=3)
    np.testing.assert_array_equal(trajectories, again)
    other, _ = simulate(n_systems=6, n_steps=20, t_max=40.0, seed=4)
    assert not np.array_equal(trajectories, other)


def test_simulator_cli(tmp_path, capsys):
    out = tmp_path / "sub" / "sim.h5"
    assert simulate_main(["--out", str(out), "--n-systems", "4", "--steps", "12", "--t-max", "30", "--seed", "2"]) == 0
    assert str(out) in capsys.readouterr().out
    data = load_trajectories(out)
    assert data.trajectories.shape == (4, 12, 2)
    np.testing.assert_array_equal(data.trajectories, simulate(4, 12, 30.0, seed=2, model="damped")[0])
    assert simulate_main(["--out", str(out), "--n-systems", "4", "--steps", "12", "--t-max", "30", "--seed", "2",
                          "--model", "classic"]) == 0
    np.testing.assert_array_equal(load_trajectories(out).trajectories, simulate(4, 12, 30.0, seed=2)[0])
