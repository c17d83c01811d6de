"""End to end on a tiny random model and simulated data: the grid (with a kill in the middle of a point and an
exact resume), the context-length study and the final run, and the plan they share with experiments.flops."""

import json

import pytest

from conftest import write_tiny_checkpoint
from data.simulate import simulate, write_h5
from experiments import sweep
from experiments.budget import Ledger


@pytest.fixture(scope="module")
def tiny_full_vocab(tmp_path_factory, tokenizer_dir):
    path = tmp_path_factory.mktemp("tiny-full-vocab")
    write_tiny_checkpoint(path, tie=True, vocab_size=151936, hidden_size=32, intermediate_size=48,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    return path


@pytest.fixture(scope="module")
def sim_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("sim") / "lv.h5"
    traj, time = simulate(n_systems=40, n_steps=30, t_max=60.0, seed=1)
    write_h5(path, traj, time)
    return path


def common(model, data, out, ledger):
    return ["--model", str(model), "--data", str(data), "--out", str(out), "--ledger", str(ledger),
            "--device", "cpu", "--precision", "float32", "--limit", "3", "--context-steps", "8", "--horizon", "3",
            "--gen-batch-size", "2", "--plots", "1", "--batch-size", "2", "--context-length", "48",
            "--eval-batches", "1", "--no-progress"]


def grid_args(model, data, out, ledger):
    return common(model, data, out, ledger) + ["--lrs", "1e-3,1e-2", "--ranks", "2,4", "--max-steps", "4",
                                               "--checkpoint-every", "2", "--eval-every", "2"]


class Killed(Exception):
    pass


def test_sweep_resumes_after_a_kill_and_ends_with_the_same_table(tiny_full_vocab, sim_file, tmp_path):
    whole, ledger_whole = tmp_path / "whole", tmp_path / "whole.jsonl"
    assert sweep.main(grid_args(tiny_full_vocab, sim_file, whole, ledger_whole)) == 0
    grid = json.loads((whole / "grid.json").read_text())
    assert len(grid["rows"]) == 4 and {(r["lr"], r["rank"]) for r in grid["rows"]} == {
        (1e-3, 2), (1e-3, 4), (1e-2, 2), (1e-2, 4)}
    for name in ("grid.csv", "heatmap_val_loss.png", "heatmap_forecast_mse.png", "loss_curves.png", "README.md"):
        assert (whole / name).is_file(), name
    results = json.loads((whole / "results.json").read_text())
    assert results["details"]["selection"]["rule"].startswith("lowest validation forecast MSE")
    assert Ledger(ledger_whole).total() == results["flops"]["total"] <= results["flops"]["planned"]

    # killed after step 3 of the third point (its checkpoint is at step 2), then resumed
    part, ledger_part = tmp_path / "part", tmp_path / "part.jsonl"

    def kill(point, step):
        if point == "lr0.01_rank2" and step == 3:
            raise Killed

    with pytest.raises(Killed):
        sweep.main(grid_args(tiny_full_vocab, sim_file, part, ledger_part), on_step=kill)
    assert (part / "points" / "lr0.001_rank4" / "point.json").is_file()
    assert not (part / "points" / "lr0.01_rank2" / "point.json").exists()
    assert sweep.main(grid_args(tiny_full_vocab, sim_file, part, ledger_part) + ["--resume"]) == 0
    resumed = json.loads((part / "grid.json").read_text())
    assert resumed["rows"] == grid["rows"]  # bit-exact: losses, metrics and FLOPs
    assert resumed["selection"] == grid["selection"]
    # each point charged once for its forecast; finished points are read back, not redone
    forecasts = [e for e in (json.loads(line) for line in ledger_part.read_text().splitlines())
                 if e["kind"] == "generate"]
    assert len(forecasts) == 5  # the untrained forecast and four points
