"""``experiments.forecast.forecast``, the Python API under ``python -m experiments.forecast``: the classical methods
import no torch; the API gives the numbers the command line writes (a classical method, and the tiny model with
samples); the CSV's own time and column names carry into forecast.csv and the plot; long CSVs give a bounded
context; a FIFO is refused unopened; progress bars only when asked for off a terminal; parroting's fallbacks."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data import load_trajectories
from data.series import not_a_regular_file
from conftest import REPO, run_forecast
from experiments import forecast
from experiments.lib import defaults
from experiments.lib import series_forecast as sf
from experiments.lib.parroting import ContextParroting
from experiments.lib.errors import UsageError
from experiments.lib.forecast_core import PARROT_LENGTHS, parrot_fallbacks, parrot_note



run = run_forecast


def read_rows(path):
    return list(csv.DictReader(Path(path).open()))


def cycle(T: int) -> np.ndarray:
    t = np.arange(T)
    return np.c_[2 + np.sin(t / 3), 2 + np.cos(t / 3)]


# ------------------------------------------------------------------------------------------------ no torch

def test_the_classical_methods_import_no_torch():
    code = ("import sys, numpy as np; import experiments.forecast as f; t = np.arange(40); "
            "x = np.c_[2 + np.sin(t / 3), 2 + np.cos(t / 3)]; "
            "r = [f.forecast(x, 5, method=m, time=t * 0.5) for m in ('var', 'ar', 'parrot', 'persistence', 'lv')]; "
            "assert all(np.isfinite(a.values).all() and a.values.shape == (5, 2) for a in r); "
            "bad = [m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'pandas'))]; "
            "assert not bad, bad; print('ok')")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_parrot_lengths_are_the_stages():
    assert PARROT_LENGTHS == defaults.PARROT_LENGTHS


# ------------------------------------------------------------------------------------------------ API = CLI

@pytest.mark.parametrize("method", ["var", "parrot"])
def test_the_api_gives_what_the_command_line_writes(sim_file, tmp_path, capsys, method):
    code, _, err = run(["--data", sim_file, "--index", 4, "--method", method, "--context-steps", 24, "--horizon", 6,
                        "--out", tmp_path / "out"], capsys)
    assert code == 0, err
    data = load_trajectories(sim_file)
    result = forecast.forecast(data.trajectories[4][:24], 6, method=method, time=data.time[:24])
    rows = read_rows(tmp_path / "out" / "forecast.csv")
    assert np.array_equal([[float(r["prey"]), float(r["predator"])] for r in rows], result.values)
    assert np.array_equal([float(r["time"]) for r in rows], result.times)
    np.testing.assert_allclose(result.times, data.time[24:30], rtol=1e-9)
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert record["chosen"] == result.settings["chosen"] and result.quantiles is None and result.texts == []
    assert result.flops == 0 and result.settings["method"] == method and result.settings["context_steps"] == 24
    if method == "parrot":
        assert record["fallbacks"] == result.settings["fallbacks"] == {"persistence": 0, "short_period": 0}


def test_the_api_gives_what_the_command_line_writes_with_the_model(tiny_full_vocab, sim_file, tmp_path, capsys):
    code, _, err = run(["--data", sim_file, "--index", 1, "--context-steps", 16, "--horizon", 3, "--samples", 3,
                        "--model", tiny_full_vocab, "--out", tmp_path / "out"], capsys)
    assert code == 0, err
    data = load_trajectories(sim_file)
    result = forecast.forecast(data.trajectories[1][:16], 3, model=str(tiny_full_vocab), samples=3,
                               time=data.time[:16], progress=False)
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert result.texts == record["texts"] and len(result.texts) == 3 and result.flops == record["flops"] > 0
    assert result.settings["text_format"] == record["text_format"] and set(result.quantiles) == {0.1, 0.9}
    assert result.samples.shape == (3, 3, 2) and result.values.shape == (3, 2)
    assert read_rows(tmp_path / "out" / "forecast.csv") == [
        {k: str(v) for k, v in row.items()} for row in sf.forecast_rows(result)]


# ------------------------------------------------------------------------------------------------ API input

class FakeFrame:
    """Just what the API reads of a pandas DataFrame: ``columns`` and ``frame[name]``."""

    def __init__(self, **columns):
        self._data = {k: np.asarray(v) for k, v in columns.items()}
        self.columns = list(self._data)

    def __getitem__(self, name):
        return self._data[name]


def test_a_dataframe_gives_its_columns_and_times():
    x, t = cycle(30), np.arange(30) * 2.0 + 1900
    plain = forecast.forecast(x, 4, method="var", time=t)
    for frame in [FakeFrame(year=t, Hare=x[:, 0], Lynx=x[:, 1])] + (
            [__import__("pandas").DataFrame({"year": t, "Hare": x[:, 0], "Lynx": x[:, 1]})]
            if __import__("importlib").util.find_spec("pandas") else []):
        result = forecast.forecast(frame, 4, method="var", columns=("Hare", "Lynx"), time="year")
        assert result.columns == ("Hare", "Lynx") and np.array_equal(result.values, plain.values)
        assert result.times.tolist() == [1960.0, 1962.0, 1964.0, 1966.0]
    named = forecast.forecast(FakeFrame(T=t, PREY=x[:, 0], Predator=x[:, 1]), 4, method="var")
    assert named.columns == ("PREY", "Predator") and np.array_equal(named.times, plain.times)
    with pytest.raises(UsageError, match="columns="):
        forecast.forecast(FakeFrame(a=t, b=x[:, 0], c=x[:, 1]), 4, method="var")


@pytest.mark.parametrize("kwargs, words", [
    ({"method": "arima"}, ["method='arima'", "var"]),
    ({"horizon": 0}, ["horizon=0"]),
    ({"method": "var", "adapter": "x"}, ["adapter=", "method='llm' only"]),
    ({"method": "ar", "model": "x"}, ["model="]),
    ({"method": "var", "samples": 3}, ["samples="]),
    ({"llmtime_scale": -1.0}, ["llmtime_scale=-1.0"]),
    ({"context": np.ones((10, 3))}, ["context", "(10, 3)"]),
    ({"context": -cycle(10)}, ["context", ">= 0"]),
    ({"time": np.arange(5)}, ["time", "10"]),
    ({"method": "var", "context": cycle(3)}, ["method='var'", "too few"]),
])
def test_bad_arguments_are_one_line_naming_the_argument(kwargs, words):
    args = {"context": cycle(10), "horizon": 3, "method": "persistence"} | kwargs
    with pytest.raises(UsageError) as err:
        forecast.forecast(**args)
    assert all(w in str(err.value) for w in words) and "\n" not in str(err.value), err.value


def test_uneven_times_continue_with_the_last_time_step():
    t = np.array([0.0, 1.0, 3.0, 4.0, 4.5])
    result = forecast.forecast(cycle(5), 3, method="persistence", time=t)
    assert result.times.tolist() == [5.0, 5.5, 6.0]


# ------------------------------------------------------------------------------------------------ names, times

def test_the_csvs_names_and_times_carry_into_the_outputs(tmp_path, capsys, monkeypatch):
    x = cycle(40)
    path = tmp_path / "hudson.csv"
    path.write_text("Year,Hare,Lynx,note\n" + "".join(f"{1900 + 2 * i},{a},{b},n{i}\n"
                                                       for i, (a, b) in enumerate(x)))
    figures = []
    monkeypatch.setattr(sf, "_save", lambda fig, where, dpi: figures.append(fig))
    code, stdout, err = run(["--data", path, "--columns", "Hare,Lynx", "--method", "var", "--horizon", 3,
                             "--out", tmp_path / "out"], capsys)
    assert code == 0, err
    rows = read_rows(tmp_path / "out" / "forecast.csv")
    assert list(rows[0]) == ["step", "Year", "Hare", "Lynx"]
    assert [float(r["Year"]) for r in rows] == [1980.0, 1982.0, 1984.0]
    ax = figures[0].axes[0]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert ax.get_xlabel() == "Year" and "Hare (forecast)" in legend and "Lynx (context)" in legend
    assert not any("prey" in t for t in legend)
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert record["input"]["columns"] == ["Hare", "Lynx"] and record["input"]["time_column"] == "Year"
    # --time-column names it; a default column that is not a time is ignored, a named one is refused
    (tmp_path / "t.csv").write_text("note,when,Hare,Lynx\n" + "".join(f"x{i},{i / 4},{a},{b}\n"
                                                                       for i, (a, b) in enumerate(x)))
    args = ["--data", tmp_path / "t.csv", "--columns", "Hare,Lynx", "--method", "persistence", "--horizon", 2]
    assert run(args + ["--time-column", "when", "--out", tmp_path / "w"], capsys)[0] == 0
    assert read_rows(tmp_path / "w" / "forecast.csv")[0] == {"step": "1", "when": "10.0", "Hare": str(x[-1, 0]),
                                                             "Lynx": str(x[-1, 1])}
    assert run(args + ["--out", tmp_path / "d"], capsys)[0] == 0
    assert list(read_rows(tmp_path / "d" / "forecast.csv")[0]) == ["step", "Hare", "Lynx"]
    code, _, err = run(args + ["--time-column", "note", "--out", tmp_path / "n"], capsys)
    assert code == 2 and "'note'" in err and "not a number" in err and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------------ long and odd input

def test_a_long_csv_gives_a_bounded_context(tmp_path, capsys):
    T = 20_000
    x = cycle(T)
    path = tmp_path / "big.csv"
    path.write_text("time,prey,predator\n" + "".join(f"{i},{a:.5f},{b:.5f}\n" for i, (a, b) in enumerate(x)))
    code, stdout, err = run(["--data", path, "--method", "var", "--horizon", 4, "--out", tmp_path / "out"], capsys)
    assert code == 0, err
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert record["context_steps"] == 80 and record["input"]["rows"] == T and record["holdout_steps"] == 4
    assert max(map(int, record["mse_by_choice"])) <= 20
    assert [float(r["time"]) for r in read_rows(tmp_path / "out" / "forecast.csv")] == [T, T + 1, T + 2, T + 3]
    expected = forecast.forecast([[float(f"{v:.5f}") for v in row] for row in x[-80:]], 4, method="var").values
    np.testing.assert_allclose([[float(r["prey"]), float(r["predator"])]
                                for r in read_rows(tmp_path / "out" / "forecast.csv")], expected, rtol=1e-12)
    assert "context the last 80" in stdout and "--context-steps" in forecast.build_parser().format_help()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
@pytest.mark.parametrize("name", ["series.csv", "series.h5"])
def test_a_fifo_is_refused_before_it_is_opened(tmp_path, capsys, name):
    fifo = tmp_path / name
    os.mkfifo(fifo)
    assert not_a_regular_file(fifo) == "a FIFO"
    code, _, err = run(["--data", fifo, "--method", "persistence", "--out", tmp_path / "out"]
                       + (["--index", 0] if name.endswith(".h5") else []), capsys)
    assert code == 2 and str(fifo) in err and "not a regular file" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ progress bars

def test_progress_bars_only_when_asked_for_off_a_terminal(tiny_full_vocab, sim_file, tmp_path, capsys):
    args = ["--data", sim_file, "--index", 2, "--context-steps", 8, "--horizon", 2, "--model", tiny_full_vocab]
    code, _, err = run(args + ["--out", tmp_path / "a"], capsys)  # stderr is captured: not a terminal
    assert code == 0 and "%|" not in err, err
    code, _, err = run(args + ["--out", tmp_path / "b", "--progress"], capsys)
    assert code == 0 and "%|" in err, err


# ------------------------------------------------------------------------------------------------ parroting

def test_parroting_fallbacks_are_counted_and_said():
    flat, alternating = np.ones((12, 2)), np.tile([[1.0, 2.0], [2.0, 1.0]], (6, 1))  # periods 1 and 2
    parrot = ContextParroting(3, min_lag=1)
    parrot.predict(np.stack([flat, alternating]), 4)
    assert parrot.lags.tolist() == [1, 2]
    assert parrot_fallbacks(parrot) == {"persistence": 1, "short_period": 2}  # both periods are shorter than m = 3

    class Old:  # a forecaster from before fallback_counts(): counted from its lags and m
        m, n_fallback, lags = 3, 0, np.array([1, 2, 5])

    assert parrot_fallbacks(Old()) == {"persistence": 1, "short_period": 2}
    assert "persistence" in parrot_note(3, 1, {"persistence": 1, "short_period": 1})
    assert "window of 2 steps, shorter than its match of 3" in parrot_note(3, 2, {"persistence": 0,
                                                                                  "short_period": 1})
    assert parrot_note(3, 7, {"persistence": 0, "short_period": 0}) is None
