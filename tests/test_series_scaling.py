"""Per-series LLMTIME scaling (``--scaling series``): an offset and a scale per species fitted on each trajectory's
own context (``data.llmtime.fit_series_scale``), used for training text and prompts alike."""

import json

import numpy as np
import pytest

from conftest import toy_lora_argv
from data import SeriesScale, decode, encode, fit_series_scale


def damped(steps=100, decay=0.03, size=1.0):
    t = np.arange(steps)
    env = np.exp(-decay * t)
    return size * np.stack([2 + env * np.sin(2 * np.pi * t / 17), 1.5 + 0.5 * env * np.cos(2 * np.pi * t / 17)], 1)


def test_the_context_fills_the_digits_whatever_its_size():
    x = damped()[:80]
    s = fit_series_scale(x)
    z = s.to_text_units(x)
    assert np.quantile(z, 0.99, axis=0) == pytest.approx([10, 10]) and (z.min(axis=0) > 2.2).all()
    assert z.min(axis=0) == pytest.approx([10 * 0.3 / 1.3] * 2, rel=0.05)
    # the offset sits 0.3 ranges below the minimum, per species
    lo, hi = x.min(0), x.max(0)
    np.testing.assert_allclose(s.offset, lo - 0.3 * (hi - lo))


def test_a_scaled_series_is_written_as_the_same_text():
    x = damped()[:80]
    text = encode(x, fit_series_scale(x))
    assert encode(1024 * x, fit_series_scale(1024 * x)) == text  # 1024: exact in binary floating point
    assert encode(x + 0, fit_series_scale(x)) == text


@pytest.mark.parametrize("encoding", ["decimal", "integer"])
def test_encode_then_decode_gives_the_values_back_to_the_written_precision(encoding):
    x = damped()
    s = fit_series_scale(x[:80])
    back = decode(encode(x, s, 3, encoding), s, encoding=encoding, decimals=3).values
    assert np.abs(back - x).max(axis=0) == pytest.approx(np.zeros(2), abs=1) and \
        (np.abs(back - x).max(axis=0) <= 0.5e-3 * np.asarray(s.scale) + 1e-12).all()
    assert decode("1.00,abc", s, expected_steps=2).n_missing == 1  # unparsed rows stay NaN, never offset


def test_a_decaying_oscillation_keeps_its_digits_under_series_scaling():
    """The point of the lever: at one dataset-wide scale the last 20 steps of a decaying oscillation are a wiggle in
    the last digit; fitted on the context they span many distinct values."""
    x = damped(decay=0.05)
    dataset_text = encode(x[80:], 0.6)
    series_text = encode(x[80:], fit_series_scale(x[:80]))
    distinct = lambda text: len({v for step in text.split(";") for v in step.split(",")})  # noqa: E731
    assert distinct(series_text) > 2 * distinct(dataset_text)  # the context range is set by its early, larger cycles


def test_values_below_the_offset_are_written_as_zero_and_bad_input_is_refused():
    s = SeriesScale((1.0, 1.0), (0.5, 0.5))
    assert encode(np.array([[0.5, 3.0]]), s) == "0.00,4.00"
    with pytest.raises(ValueError, match="shape"):
        fit_series_scale(np.ones((3, 3)))
    with pytest.raises(ValueError, match="non-negative"):
        fit_series_scale(-np.ones((3, 2)))
    assert fit_series_scale(np.ones((5, 2))).scale == pytest.approx((0.1, 0.1))  # a constant series


def test_a_lora_run_with_series_scaling_records_it_and_forecasts_in_data_units(tiny_full_vocab, tmp_path):
    from experiments import lora_default
    from experiments.lib.adapter_card import read_card

    argv = toy_lora_argv(tiny_full_vocab, tmp_path, "1e-3", "--scaling", "series")
    assert lora_default.main(argv) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["settings"]["data"]["scaling"] == "series" and results["data"]["scaling"] == "series"
    card = read_card(tmp_path / "run" / "peft_adapter")
    assert card.scale_fit["scaling"] == "series" and card.scale_fit["beta"] == 0.3
    for name in ("untrained", "lora"):
        assert np.isfinite(results["evaluations"][name]["metrics"]["prey"]["mse"])
    # a dataset-scaled run into the same directory is another run: --resume refuses it
    from experiments.lib import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.run_cli(lambda: lora_default.main(argv[:-2] + ["--resume"]))
    assert exit_info.value.code == 2


def test_the_dataset_writes_each_training_trajectory_at_its_own_scaling(sim_file):
    from experiments.lib.dataset import load_dataset
    from experiments.lib.settings import SERIES_FIT_STEPS, DataSettings

    ds = load_dataset(DataSettings(data=str(sim_file), scaling="series"))
    idx, trajectories = ds.trajectories("train", 3)
    for text, t in zip(ds.texts("train", 3), trajectories):
        assert text == encode(t, fit_series_scale(t[:SERIES_FIT_STEPS]), ds.decimals)
    assert ds.context_scaler() is not None and load_dataset(DataSettings(data=str(sim_file))).context_scaler() is None
