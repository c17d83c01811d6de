"""The damped simulator against the coursework file's statistics, and the synthetic fallback set used when no
coursework file is found (generated once into a cache, reused, marked "synthetic" in results). Small and fast; never
reads the real file (its statistics are the constants below, measured once; see docs/synthetic-data.md)."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

import data.lotka_volterra as lv
from data import DataError, load_trajectories, resolve_data_path
from data.simulate import main as simulate_main
from data.simulate import simulate
from experiments.lib.by_type import amplitude_ratio

# Measured on the coursework file lotka_volterra_data.h5 (1000 x 100 x 2, /time = linspace(0, 200, 100)):
COURSEWORK_DAMPED_SHARE = 0.589  # amplitude_ratio(first 80 steps) < 0.8, all 1000 trajectories
COURSEWORK_QUANTILES = {  # 1, 50, 99 % of all values, per species
    "prey": (0.0720, 1.314, 7.115),
    "predator": (0.0172, 0.524, 1.699),
}


@pytest.fixture(scope="module")
def damped_set():
    return simulate(n_systems=400, n_steps=100, t_max=200.0, seed=11, model="damped")


def test_damped_share_matches_coursework(damped_set):
    trajectories, time = damped_set
    np.testing.assert_allclose(np.diff(time), 200.0 / 99)  # the coursework grid
    share = float((amplitude_ratio(trajectories[:, :80]) < 0.8).mean())
    assert abs(share - COURSEWORK_DAMPED_SHARE) < 0.08, share  # 400 systems: sampling sd ~ 0.025


def test_damped_value_ranges_match_coursework(damped_set):
    trajectories, _ = damped_set
    assert np.all(np.isfinite(trajectories)) and np.all(trajectories > 0)
    for k, species in enumerate(("prey", "predator")):
        low, median, high = np.quantile(trajectories[..., k].astype(np.float64), [0.01, 0.5, 0.99])
        t_low, t_median, t_high = COURSEWORK_QUANTILES[species]
        assert abs(median / t_median - 1) < 0.15, (species, median)
        assert abs(high / t_high - 1) < 0.2, (species, high)
        assert t_low / 3 < low < t_low * 3, (species, low)


def test_classic_mode_is_undamped_and_unchanged():
    trajectories, _ = simulate(n_systems=50, n_steps=100, t_max=200.0, seed=0, model="classic")
    assert (amplitude_ratio(trajectories[:, :80]) < 0.8).sum() == 0
    np.testing.assert_array_equal(trajectories, simulate(n_systems=50, n_steps=100, t_max=200.0, seed=0)[0])
    with pytest.raises(ValueError, match="model must be one of"):
        simulate(n_systems=2, model="noisy")


def test_cli_marks_file_synthetic(tmp_path):
    out = tmp_path / "sim.h5"
    assert simulate_main(["--out", str(out), "--n-systems", "3", "--steps", "10", "--t-max", "20"]) == 0
    data = load_trajectories(out)
    assert data.synthetic and "model=damped" in data.source
    np.testing.assert_array_equal(data.trajectories, simulate(3, 10, 20.0, seed=0, model="damped")[0])
    assert simulate_main(["--out", str(out), "--n-systems", "3", "--steps", "10", "--model", "classic"]) == 0
    assert "model=classic" in load_trajectories(out).source


@pytest.fixture
def no_coursework(tmp_path, monkeypatch):
    """No --data, no MINIQWEN_DATA, no default file; the cache in tmp_path/cache. Returns the expected cache file."""
    monkeypatch.delenv("MINIQWEN_DATA", raising=False)
    monkeypatch.setattr(lv, "default_data_candidates", lambda: [tmp_path / "a.h5", tmp_path / "b.h5"])
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "miniqwen" / lv.SYNTHETIC_FILENAME


def test_fallback_generates_once_then_reuses(no_coursework, tmp_path, monkeypatch, capsys):
    assert not no_coursework.exists()
    path = resolve_data_path(None)
    assert path == no_coursework and path.is_file()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no coursework data file found: using the synthetic set" in err
    assert str(path) in err and "not the coursework file" in err
    data = load_trajectories(path)
    assert data.trajectories.shape == (1000, 100, 2) and data.trajectories.dtype == np.float32
    assert data.time.shape == (100,) and data.time[-1] == 200.0 and data.synthetic
    first_bytes, first_stat = path.read_bytes(), path.stat()

    import data.simulate

    def refuse(*args, **kwargs):
        raise AssertionError("the cached synthetic set was simulated again")

    monkeypatch.setattr(data.simulate, "simulate", refuse)
    assert resolve_data_path(None) == path  # reused, not regenerated
    assert path.stat().st_mtime_ns == first_stat.st_mtime_ns and path.read_bytes() == first_bytes
    assert not list(path.parent.glob("*.tmp"))
    monkeypatch.undo()

    # the same seed gives the same bytes in a fresh cache
    monkeypatch.delenv("MINIQWEN_DATA", raising=False)
    monkeypatch.setattr(lv, "default_data_candidates", lambda: [tmp_path / "a.h5"])
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "other_cache"))
    again = resolve_data_path(None)
    assert again != path and again.read_bytes() == first_bytes


def test_coursework_file_wins_over_fallback(no_coursework, tmp_path):
    (tmp_path / "b.h5").touch()
    assert resolve_data_path(None) == tmp_path / "b.h5"
    assert not no_coursework.exists()


def test_explicit_missing_data_is_still_an_error(no_coursework, tmp_path, monkeypatch):
    missing = tmp_path / "no_such.h5"
    with pytest.raises(DataError, match="no_such.h5"):
        load_trajectories(resolve_data_path(missing))
    monkeypatch.setenv("MINIQWEN_DATA", str(missing))
    with pytest.raises(DataError, match="no_such.h5"):
        load_trajectories(None)
    assert not no_coursework.exists()


def test_unwritable_cache_is_a_data_error(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.delenv("MINIQWEN_DATA", raising=False)
    monkeypatch.setattr(lv, "default_data_candidates", lambda: [])
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    with pytest.raises(DataError, match="cannot write the synthetic dataset"):
        resolve_data_path(None)


def test_stage_results_record_synthetic(no_coursework, tmp_path, capsys):
    from experiments import classical

    out = tmp_path / "classical"
    code = classical.main(["--context-steps", "30", "--horizon", "5", "--orders", "1,2", "--limit", "3",
                           "--parrot-lengths", "1,2", "--no-ode", "--plots", "0", "--out", str(out),
                           "--ledger", str(tmp_path / "ledger.jsonl")])
    assert code == 0
    assert "no coursework data file found" in capsys.readouterr().err
    record = json.loads((out / "results.json").read_text())["data"]
    assert record["synthetic"] is True and "data.simulate model=damped" in record["source"]
    assert record["file"] == lv.SYNTHETIC_FILENAME and record["n_trajectories"] == 1000


def test_coursework_like_file_has_no_synthetic_mark(tmp_path):
    from experiments.lib.dataset import load_dataset
    from experiments.lib.settings import DataSettings

    path = tmp_path / "plain.h5"
    with h5py.File(path, "w") as file:  # written without a source attribute, like the coursework file
        file.create_dataset("trajectories", data=simulate(20, 30, 60.0, seed=1)[0])
        file.create_dataset("time", data=np.linspace(0, 60.0, 30))
    record = load_dataset(DataSettings(data=str(path))).record()
    assert "synthetic" not in record and "source" not in record
