"""Tests for the paired comparisons of forecasters (experiments/lib/compare.py). Small numpy problems only."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from experiments.lib.compare import (
    against_reference,
    compare_errors,
    compare_forecasts,
    compare_to_best,
    comparison_table,
    find_blowups,
    paired_interval,
    per_trajectory_errors,
    read_errors,
    summary_table,
)
from experiments.lib.evaluation import per_trajectory_rows, write_csv
from experiments.lib.results import Forecasts


def truth_and_noise(n=40, horizon=5, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(0.5, 3.0, size=(n, horizon, 2)), rng


def test_identical_forecasters_give_a_zero_interval_and_all_ties():
    truth, rng = truth_and_noise()
    pred = truth + 0.3 * rng.standard_normal(truth.shape)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DegenerateDataWarning, no RuntimeWarning
        c = compare_forecasts(pred, pred.copy(), truth, names=("x", "x again"))
    for species in ("prey", "predator"):
        for metric in ("mse", "mae"):
            m = c["species"][species][metric]
            assert m["diff_mean"] == 0.0 and m["diff_median"] == 0.0
            assert (m["ci_low"], m["ci_high"], m["ci_method"]) == (0.0, 0.0, "degenerate")
            assert (m["wins_a"], m["wins_b"], m["ties"]) == (0, 0, 40)
            assert m["mean_a"] == m["mean_b"] and m["median_a"] == m["median_b"]
    json.dumps(c)  # JSON-ready


def test_uniformly_worse_forecaster_loses_everywhere():
    truth, rng = truth_and_noise(n=30, horizon=8, seed=1)
    pred_b = truth + 0.1 + 0.01 * rng.standard_normal(truth.shape)
    pred_a = truth + 1.0 + 0.01 * rng.standard_normal(truth.shape)
    c = compare_forecasts(pred_a, pred_b, truth, names=("bad", "good"))
    for species in ("prey", "predator"):
        for metric in ("mse", "mae"):
            m = c["species"][species][metric]
            assert m["ci_method"] == "BCa"
            assert 0 < m["ci_low"] <= m["diff_mean"] <= m["ci_high"]  # excludes 0: A is worse
            assert (m["wins_a"], m["wins_b"], m["ties"]) == (0, 30, 0)
        assert c["species"][species]["mse"]["diff_mean"] == pytest.approx(1.0 - 0.01, abs=0.01)
    # reproducible: the same seed gives the same interval, another seed a slightly different one
    again = compare_forecasts(pred_a, pred_b, truth, seed=0)
    assert again["species"]["prey"]["mse"]["ci_low"] == c["species"]["prey"]["mse"]["ci_low"]
    other = compare_forecasts(pred_a, pred_b, truth, seed=1)
    assert other["species"]["prey"]["mse"]["ci_low"] == pytest.approx(c["species"]["prey"]["mse"]["ci_low"],
                                                                       rel=0.05)


def test_means_medians_and_wins_by_hand():
    truth = np.zeros((3, 1, 2))
    pred_a, pred_b = np.zeros((3, 1, 2)), np.zeros((3, 1, 2))
    pred_a[:, 0, 0] = [1.0, -2.0, 10.0]  # prey MSE [1, 4, 100], MAE [1, 2, 10]
    pred_b[:, 0, 0] = [0.0, 3.0, 1.0]  # prey MSE [0, 9, 1], MAE [0, 3, 1]
    errors = per_trajectory_errors(pred_a, truth)
    np.testing.assert_array_equal(errors["prey"]["mse"], [1, 4, 100])
    np.testing.assert_array_equal(errors["predator"]["mae"], [0, 0, 0])
    c = compare_forecasts(pred_a, pred_b, truth, n_resamples=999)
    mse, mae = c["species"]["prey"]["mse"], c["species"]["prey"]["mae"]
    assert (mse["mean_a"], mse["median_a"], mse["mean_b"], mse["median_b"]) == (35.0, 4.0, 10 / 3, 1.0)
    assert mse["diff_mean"] == pytest.approx(35 - 10 / 3) and mse["diff_median"] == 1.0  # median of [1, -5, 99]
    assert (mae["median_a"], mae["median_b"], mae["diff_median"]) == (2.0, 1.0, 1.0)  # median of [1, -1, 9]
    assert (mse["wins_a"], mse["wins_b"], mse["ties"]) == (1, 2, 0)
    assert c["species"]["predator"]["mse"]["ties"] == 3


def test_blowup_detection_finds_an_injected_outlier():
    truth, rng = truth_and_noise(n=50, horizon=6, seed=2)
    pred_a = truth + 0.2 * rng.standard_normal(truth.shape)
    pred_b = truth + 0.2 * rng.standard_normal(truth.shape)
    pred_a[17, :, 1] += 50.0  # trajectory 17 explodes in the predator forecast of A
    ids = np.arange(900, 950)
    c = compare_forecasts(pred_a, pred_b, truth, names=("A", "B"), indices=ids)
    blowups = c["species"]["predator"]["blowups"]
    assert [b["trajectory"] for b in blowups["a"]] == [917] and blowups["b"] == []
    hit = blowups["a"][0]
    assert hit["position"] == 17 and hit["rule"] == "factor+share" and hit["share_of_sum"] > 0.9
    assert hit["mse"] == pytest.approx(2500, rel=0.05) and hit["times_typical"] > 1000
    assert c["species"]["prey"]["blowups"] == {"a": [], "b": []}
    # without it, A's mean predator MSE is back at the level of B's
    without = c["species"]["predator"]["mean_mse_without_blowups"]
    assert without["a"] == pytest.approx(without["b"], rel=0.5)
    # the two rules separately
    assert find_blowups([1] * 20 + [11], [1] * 21, factor=10)[0]["rule"] == "factor"  # 11 of 31: no share
    share = find_blowups([1, 1, 5], [2, 2, 2])  # 5 of 7: more than half, and above the other's median
    assert [(b["position"], b["rule"]) for b in share] == [(2, "share")]
    assert find_blowups([1, 1, 2], [1, 1, 1]) == []
    assert find_blowups([1e-12, 1e-12, 1e-11], [1, 1, 1]) == []  # dominates a negligible sum: not a blow-up
    assert find_blowups([100.0] * 5, [1.0] * 5) == []  # uniformly worse is not a blow-up
    with pytest.raises(ValueError, match="one length"):
        find_blowups([1, 2], [1, 2, 3])


def test_paired_interval_edge_cases():
    assert paired_interval(np.array([2.5])) == {"low": None, "high": None, "method": "none"}
    assert paired_interval(np.full(7, -1.5)) == {"low": -1.5, "high": -1.5, "method": "degenerate"}
    d = np.zeros(30)
    d[4] = 1.0  # all but one difference equal: BCa is undefined or warns here; a finite interval anyway
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = paired_interval(d)
    assert out["method"] in ("BCa", "percentile") and 0 <= out["low"] <= out["high"] <= 1
    # two resamples: BCa's bias correction is infinite whenever both land on one side; then the percentile interval
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiny = [paired_interval(np.arange(5.0), n_resamples=2, seed=s) for s in range(20)]
    assert {t["method"] for t in tiny} == {"BCa", "percentile"}
    assert all(0 <= t["low"] <= t["high"] <= 4 for t in tiny)
    for bad in (np.array([]), np.array([1.0, np.nan]), np.ones((2, 2))):
        with pytest.raises(ValueError, match="differences"):
            paired_interval(bad)
    with pytest.raises(ValueError, match="confidence"):
        paired_interval(np.arange(5.0), confidence=1.5)


def test_bad_inputs_raise():
    truth = np.ones((4, 3, 2))
    with pytest.raises(ValueError, match=r"\[n, H, 2\]"):
        compare_forecasts(np.ones((4, 3, 2)), np.ones((4, 2, 2)), truth)
    with pytest.raises(ValueError, match="NaN"):
        compare_forecasts(np.full((4, 3, 2), np.nan), truth, truth)
    with pytest.raises(ValueError, match="one id per trajectory"):
        compare_forecasts(truth, truth, truth, indices=[1, 2])
    with pytest.raises(ValueError, match="no forecasts"):
        compare_to_best({}, truth)


def test_compare_to_best_and_table():
    truth, rng = truth_and_noise(n=20, horizon=4, seed=3)
    preds = {"persistence": truth + 1.0 * rng.standard_normal(truth.shape),
             "good": truth + 0.1 * rng.standard_normal(truth.shape),
             "middling": truth + 0.5 * rng.standard_normal(truth.shape)}
    out = compare_to_best(preds, truth, indices=range(100, 120), n_resamples=999)
    assert out["best"] == "good"
    pairs = [(c["a"], c["b"]) for c in out["comparisons"]]
    assert pairs == [("good", "persistence"), ("middling", "good"), ("persistence", "good")]
    assert out["comparisons"][0]["species"]["prey"]["mse"]["ci_high"] < 0  # the best beats persistence
    json.dumps(out)
    table = comparison_table(out["comparisons"])
    lines = table.split("\n\n")[0].splitlines()
    assert len(lines) == 2 + 3 * 2 * 2  # header, rule, comparisons x species x metrics
    assert lines[2].startswith("| good vs persistence | prey | MSE |") and "95% CI" in lines[0]
    assert "Blow-ups: a trajectory is a blow-up" in table
    assert "\n\n" not in comparison_table(out["comparisons"][0], legend=False)


def _write_errors(path, indices, pred, truth):
    write_csv(path, per_trajectory_rows(indices, pred, truth, Forecasts.from_values(pred)))


def test_comparisons_from_the_per_trajectory_csv_equal_those_from_the_predictions(tmp_path):
    """What a stage writes per trajectory is enough to pair two forecasters: the CSV round trip gives the same
    comparison as the predictions themselves, and against_reference skips what cannot be paired."""
    truth, rng = truth_and_noise(n=30)
    a, b = truth + 0.2 * rng.standard_normal(truth.shape), truth + 0.5 * rng.standard_normal(truth.shape)
    ids = list(range(800, 830))
    _write_errors(tmp_path / "a.csv", ids, a, truth)
    _write_errors(tmp_path / "b.csv", ids, b, truth)
    _write_errors(tmp_path / "other.csv", ids[::-1], b[::-1], truth[::-1])  # other trajectory order: no pairing
    direct = compare_forecasts(a, b, truth, ("a", "b"), ids, seed=3)
    read_ids, errors = read_errors(tmp_path / "a.csv")
    assert read_ids == ids
    from_files = compare_errors(errors, read_errors(tmp_path / "b.csv")[1], 5, ("a", "b"), ids, seed=3)
    assert json.dumps(from_files, sort_keys=True) == json.dumps(direct, sort_keys=True)
    found, md = against_reference(tmp_path / "b.csv", {"a": tmp_path / "a.csv", "other": tmp_path / "other.csv",
                                                       "missing": tmp_path / "nope.csv"}, "b", 5, seed=3)
    assert [c["a"] for c in found] == ["a"] and found[0]["species"] == direct["species"]
    assert md.startswith(summary_table(found)) and "paired bootstrap 95% interval" in md
    assert summary_table(found).count("\n") == 3  # header, rule, one row per species
    assert against_reference(tmp_path / "nope.csv", {"a": tmp_path / "a.csv"}, "b", 5) == ([], "")
    (tmp_path / "bad.csv").write_text("trajectory,mse_prey\n1,x\n")
    with pytest.raises(ValueError, match="bad.csv: not a per-trajectory error table"):
        read_errors(tmp_path / "bad.csv")
