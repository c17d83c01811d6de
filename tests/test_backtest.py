"""Backtests on one's own series (``experiments.lib.backtest``, ``python -m experiments.forecast --backtest N``):
the origins are the last N the series allows; each forecast is the one ``forecast`` gives from the rows before its
origin; metrics and paired comparisons are over origins; the command line writes backtest.csv/json/png; misused
options are one line; the LLM is a method like the others (tiny model) and is loaded once."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from conftest import REPO, run_forecast
from experiments import forecast
from experiments.lib import backtest as bt
from experiments.lib import series_forecast as sf
from experiments.lib.compare import compare_to_best
from experiments.lib.errors import UsageError



run = run_forecast


def noisy_cycle(T: int, seed: int = 0) -> np.ndarray:
    t = np.arange(T)
    noise = np.random.default_rng(seed).normal(0, 0.05, (T, 2))
    return np.c_[2 + np.sin(t / 3), 2 + np.cos(t / 3)] + noise


def test_the_origins_are_the_last_n_the_series_allows():
    assert bt.origins(91, 5, 10) == [41, 51, 61, 71, 81]
    assert bt.origins(30, 3, 4, step=2) == [22, 24, 26]
    assert bt.origins(12, 1, 10) == [2]
    with pytest.raises(UsageError) as err:
        bt.origins(30, 4, 8)
    assert "n_origins=4" in str(err.value) and "only 3 origins" in str(err.value)


def test_each_forecast_is_the_apis_from_the_rows_before_its_origin():
    x, t = noisy_cycle(60), 1900 + np.arange(60.0)
    methods = ("var", "parrot", "persistence")
    result = bt.backtest(x, 3, 5, methods, time=t, context_steps=40, n_resamples=199)
    assert result.origins == [45, 50, 55] and result.times[:, 0].tolist() == [1945.0, 1950.0, 1955.0]
    np.testing.assert_array_equal(result.truth, np.stack([x[o : o + 5] for o in result.origins]))
    for m in methods:
        for i, o in enumerate(result.origins):
            alone = forecast.forecast(x[o - 40 : o], 5, method=m, time=t[o - 40 : o])
            np.testing.assert_array_equal(result.forecasts[m][i], alone.values)
            assert result.details[m][i] == alone.settings
    np.testing.assert_array_equal(result.forecasts["persistence"], np.repeat(x[[44, 49, 54]][:, None], 5, 1))
    err = result.forecasts["var"] - result.truth
    assert result.metrics["var"]["prey"]["mse"] == pytest.approx(np.mean(err[..., 0] ** 2), rel=1e-12)
    assert result.metrics["var"]["predator"]["mae"] == pytest.approx(np.mean(np.abs(err[..., 1])), rel=1e-12)
    expected = compare_to_best(result.forecasts, result.truth, result.origins, n_resamples=199)
    assert result.comparison["best"] == expected["best"] and result.comparison["origins"] == [45, 50, 55]
    pairs = [(c["a"], c["b"]) for c in result.comparison["comparisons"]]
    assert len(pairs) == len({frozenset(p) for p in pairs}) == 2  # each pair once, the best in both
    assert result.comparison["comparisons"][0] == expected["comparisons"][0]
    assert f"| {result.comparison['best']} (best) |" in result.table() and "| persistence |" in result.table()
    assert len(result.rows("Year")) == 3 * 3 * 5 and result.rows("Year")[0]["Year"] == 1945.0


@pytest.mark.parametrize("kwargs, words", [
    ({"n_origins": 0}, ["n_origins=0"]),
    ({"n_origins": 30}, ["n_origins=30", "only"]),
    ({"methods": ("var", "arima")}, ["methods=", "arima"]),
    ({"methods": ("var", "var")}, ["distinct"]),
    ({"step": 0}, ["step=0"]),
    ({"adapter": "x"}, ["adapter=", "method='llm' only"]),
    ({"methods": ("llm",), "llmtime_scale": "wide"}, ["llmtime_scale='wide'", "'fit'"]),
    ({"colour": 1}, ["colour=", "not an option"]),
    ({"n_origins": 6, "horizon": 9, "context_steps": 3}, ["origin", "3 rows of context", "too few"]),
])
def test_bad_backtests_are_one_line_naming_the_argument(kwargs, words):
    args = {"series": noisy_cycle(60), "n_origins": 2, "horizon": 5, "methods": ("var", "persistence")} | kwargs
    with pytest.raises(UsageError) as err:
        bt.backtest(**args)
    assert all(w in str(err.value) for w in words) and "\n" not in str(err.value), err.value


def test_the_command_line_writes_the_backtest(tmp_path, capsys):
    x = noisy_cycle(50)
    path = tmp_path / "pelts.csv"
    path.write_text("Year,Hare,Lynx\n" + "".join(f"{1850 + i},{float(a)!r},{float(b)!r}\n"
                                                  for i, (a, b) in enumerate(x)))
    out = tmp_path / "out"
    code, stdout, err = run(["--data", path, "--columns", "Hare,Lynx", "--backtest", 3, "--horizon", 4,
                             "--backtest-step", 2, "--methods", "var,persistence", "--context-steps", 30,
                             "--out", out], capsys)
    assert code == 0, err
    rows = list(csv.DictReader((out / "backtest.csv").open()))
    assert list(rows[0]) == ["origin", "method", "step", "Year", "Hare", "Lynx", "Hare_truth", "Lynx_truth"]
    assert len(rows) == 2 * 3 * 4 and [r["origin"] for r in rows[::4]] == ["42", "44", "46"] * 2
    api = bt.backtest(x, 3, 4, ("var", "persistence"), step=2, context_steps=30, time=1850 + np.arange(50.0))
    assert [float(r["Hare"]) for r in rows[:4]] == api.forecasts["var"][0, :, 0].tolist()
    assert float(rows[0]["Lynx_truth"]) == x[42, 1] and rows[0]["Year"] == "1892.0"
    record = json.loads((out / "backtest.json").read_text())
    assert record["metrics"] == api.metrics and record["origins"] == [42, 44, 46]
    assert record["comparison"]["best"] == api.comparison["best"] and record["origin_times"] == [1892, 1894, 1896]
    assert record["settings"] | {} == api.settings and (out / "backtest.png").stat().st_size > 0
    assert json.loads((out / "run.json").read_text())["backtest"]["methods"] == ["var", "persistence"]
    assert "| persistence" in stdout and "A vs B" in stdout


@pytest.mark.parametrize("argv, words", [
    (["--methods", "var"], ["--methods", "--backtest N only"]),
    (["--backtest-step", "2"], ["--backtest-step", "--backtest N only"]),
    (["--backtest", "2", "--method", "var"], ["--method", "--methods"]),
    (["--backtest", "2", "--methods", "var,arima"], ["--methods var,arima"]),
    (["--backtest", "40"], ["--backtest 40", "only"]),
    (["--backtest", "0"], ["--backtest 0"]),
    (["--backtest", "2", "--adapter", "x"], ["--adapter", "--method llm only"]),
])
def test_misused_backtest_options_are_one_line(tmp_path, capsys, argv, words):
    path = tmp_path / "s.csv"
    path.write_text("time,prey,predator\n" + "".join(f"{i},{a},{b}\n" for i, (a, b) in enumerate(noisy_cycle(40))))
    code, _, err = run(["--data", path, "--horizon", 5, "--out", tmp_path / "out", *argv], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and all(w in err for w in words), err
    assert not (tmp_path / "out").exists()


def test_the_llm_is_backtested_like_the_others_and_loaded_once(tiny_full_vocab, monkeypatch):
    import miniqwen

    loads = []
    real = miniqwen.load_pretrained
    monkeypatch.setattr(miniqwen, "load_pretrained", lambda *a, **k: loads.append(a) or real(*a, **k))
    x = noisy_cycle(30)
    with sf.keep_loaded():
        result = bt.backtest(x, 2, 3, ("llm", "persistence"), model=str(tiny_full_vocab), llmtime_scale="fit",
                             progress=False, context_steps=12)
    assert len(loads) == 1 and result.forecasts["llm"].shape == (2, 3, 2) and result.flops > 0
    for i, o in enumerate(result.origins):
        alone = forecast.forecast(x[o - 12 : o], 3, model=str(tiny_full_vocab), progress=False)
        assert result.details["llm"][i]["texts"] == alone.texts
        np.testing.assert_array_equal(result.forecasts["llm"][i], alone.values)
    assert len(loads) == 3  # outside keep_loaded, each forecast loads its own
    assert result.metrics["llm"]["steps_unparsed"] == int(np.isnan(result.forecasts["llm"]).any(-1).sum())


def test_the_hare_lynx_csv_reads_as_a_series():
    from data import read_series_csv

    series = read_series_csv(REPO / "docs" / "hare_lynx.csv", ("Hare", "Lynx"))
    assert series.rows == 91 and series.time[0] == 1845 and series.time[-1] == 1935
    assert series.values[0].tolist() == [19.58, 30.09] and series.values[-1].tolist() == [15.76, 35.4]
