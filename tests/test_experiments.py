"""End-to-end runs of the experiment scripts on a tiny random model (full Qwen vocabulary) and simulated data."""

import csv
import json

import numpy as np
import pytest

from experiments import baseline
from experiments.lib.budget import Ledger




@pytest.mark.parametrize("prompt,samples", [("raw", 1), ("chat", 2)])
def test_baseline_end_to_end(tiny_full_vocab, sim_file, tmp_path, prompt, samples, capsys):
    out, ledger = tmp_path / "out", tmp_path / "ledger.jsonl"
    code = baseline.main([
        "--model", str(tiny_full_vocab), "--data", str(sim_file), "--limit", "3", "--context-steps", "8",
        "--horizon", "3", "--gen-batch-size", "2", "--prompt", prompt, "--samples", str(samples), "--loss-limit", "2",
        "--loss-context-length", "64", "--out", str(out), "--ledger", str(ledger), "--device", "cpu",
    ])
    assert code == 0
    printed = capsys.readouterr().out
    assert "preprocessed text" in printed and "token ids" in printed
    results = json.loads((out / "results.json").read_text())
    zero_shot = results["evaluations"]["zero-shot"]
    assert len(zero_shot["trajectories"]) == 3
    for species in ("prey", "predator"):
        m = zero_shot["metrics"][species]
        assert np.isfinite([m["mse"], m["mae"]]).all() and len(m["mae_by_step"]) == 3
    assert 0.0 <= zero_shot["parsed_fraction"] <= 1.0
    assert results["details"]["validation_loss"]["tokens"] > 0
    # what was charged is what results.json reports, and the plan was an upper bound
    assert Ledger(ledger).total() == results["flops"]["total"] > 0
    assert results["flops"]["total"] <= results["flops"]["planned"]
    with open(out / "per_trajectory.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 3
    assert len((out / "generations.jsonl").read_text().splitlines()) == 3


def test_baseline_missing_data_is_a_clear_error(tiny_full_vocab, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        from experiments.lib.cli import run_cli

        run_cli(lambda: baseline.main(["--model", str(tiny_full_vocab), "--data", str(tmp_path / "none.h5"),
                                       "--ledger", str(tmp_path / "l.jsonl"), "--out", str(tmp_path)]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "none.h5" in err and "data.simulate" in err


def test_baseline_missing_model_is_a_clear_error(sim_file, tmp_path, capsys):
    from experiments.lib.cli import run_cli

    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: baseline.main(["--model", str(tmp_path / "no-model"), "--data", str(sim_file),
                                       "--context-steps", "5", "--horizon", "2",
                                       "--ledger", str(tmp_path / "l.jsonl"), "--out", str(tmp_path)]))
    assert exit_info.value.code == 2
    assert "no-model" in capsys.readouterr().err


def test_baseline_refuses_over_budget(tiny_full_vocab, sim_file, tmp_path, capsys):
    from experiments.lib.cli import run_cli

    ledger = Ledger(tmp_path / "l.jsonl")
    ledger.charge("earlier", 10**17, "train")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: baseline.main(["--model", str(tiny_full_vocab), "--data", str(sim_file), "--limit", "1",
                                       "--context-steps", "5", "--horizon", "2", "--ledger", str(ledger.path),
                                       "--out", str(tmp_path / "o"), "--device", "cpu"]))
    assert exit_info.value.code == 2
    assert "--force" in capsys.readouterr().err
