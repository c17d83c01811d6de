"""Successive halving (experiments.search) on a tiny random model and simulated data: the schedule, the robust
score, rungs that continue points exactly (a point taken to 3N in two rungs equals one trained to 3N straight), and a
kill inside a rung that resumes to the same table."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from experiments import search

from experiments.lib import halving, scores
from experiments.lib.budget import Ledger
from experiments.lib.errors import UsageError
from safetensors.torch import load_file

from test_grid_stages import Killed, common


#: a search of 4 points over 2 rungs of 2 and 4 steps
SEARCH_OPTIONS = ["--lrs", "1e-3,1e-2", "--ranks", "2,4", "--min-steps", "2", "--eta", "2", "--rungs", "2",
                  "--checkpoint-every", "1"]


def search_args(model, data, out, ledger):
    return common(model, data, out, ledger) + SEARCH_OPTIONS


def assert_continued_equals_straight(search_dir, row: dict, straight_args: list) -> None:
    """The adapter of the search's point ``row`` (taken to ``row["steps"]`` over rungs, in ``search_dir``) equals
    that of the same point trained to those steps straight by the sweep, run with ``straight_args`` (the common
    options, ``--out`` naming the straight run's directory)."""
    from experiments import sweep

    straight = Path(straight_args[straight_args.index("--out") + 1])
    assert sweep.main(straight_args + ["--lrs", f"{row['lr']:g}", "--ranks", str(row["rank"]), "--max-steps",
                                       str(row["steps"]), "--eval-every", "0", "--checkpoint-every", "1",
                                       "--no-eval-at-start"]) == 0
    adapter = Path("points") / row["name"] / "training" / "adapter" / "adapter.safetensors"
    a, b = load_file(search_dir / adapter), load_file(straight / adapter)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_schedule_keeps_one_over_eta_and_multiplies_the_steps():
    assert halving.schedule(9, 100, 3, 3) == [(100, 9), (300, 3), (900, 1)]
    assert halving.schedule(4, 2, 2, 2) == [(2, 4), (4, 2)]
    assert halving.schedule(1, 5, 3, 2) == [(5, 1), (15, 1)]
    with pytest.raises(UsageError, match="--rungs 4"):
        halving.schedule(9, 100, 3, 4)
    with pytest.raises(UsageError, match="--eta 1"):
        halving.schedule(9, 100, 1, 3)
    with pytest.raises(UsageError, match="--min-steps 0"):
        halving.schedule(9, 0, 3, 3)


def test_robust_score_is_relative_to_persistence_and_ignores_one_blow_up():
    reference = {"prey": np.array([1.0, 1.0, 1.0]), "predator": np.array([0.1, 0.1, 0.1])}
    assert scores.robust_score(reference, reference) == pytest.approx(1.0)
    half = {"prey": np.array([0.5, 0.5, 0.5]), "predator": np.array([0.05, 0.05, 0.05])}
    assert scores.robust_score(half, reference) == pytest.approx(0.5)
    blown = {"prey": np.array([0.5, 0.5, 1e6]), "predator": np.array([0.05, 0.05, 0.05])}
    assert scores.robust_score(blown, reference) == pytest.approx(0.5)
    records = [{"name": "a", "score": 0.7}, {"name": "b", "score": float("nan")}, {"name": "c", "score": 0.7},
               {"name": "d", "score": 0.2}]
    assert halving.survivors(records, 2) == ["d", "a"]  # NaN last, ties in grid order


def test_search_continues_points_exactly_and_resumes_after_a_kill(tiny_full_vocab, sim_file, tmp_path):
    whole, ledger_whole = tmp_path / "whole", tmp_path / "whole.jsonl"
    assert search.main(search_args(tiny_full_vocab, sim_file, whole, ledger_whole)) == 0
    results = json.loads((whole / "results.json").read_text())
    rows = results["details"]["rows"]
    assert [r["rung"] for r in rows] == [0, 0, 0, 0, 1, 1]
    assert all(r["steps"] == 2 for r in rows[:4]) and all(r["steps"] == 4 for r in rows[4:])
    kept = halving.survivors([r for r in rows if r["rung"] == 0], 2)
    assert [r["name"] for r in rows[4:]] == [n for n in ["lr0.001_rank2", "lr0.001_rank4", "lr0.01_rank2",
                                                         "lr0.01_rank4"] if n in kept]
    assert results["details"]["selection"]["chosen"]["point"] in kept
    assert Ledger(ledger_whole).total() == results["flops"]["total"] <= results["flops"]["planned"]
    assert results["details"]["untrained_score"]["score"] > 0  # the untrained model's row, scored the same way
    assert "| – | untrained | 0 |" in (whole / "README.md").read_text()
    for name in ("search.csv", "README.md", "untrained.json"):
        assert (whole / name).is_file(), name
    # lr and rank differ by point: neither results.json's settings nor a rung record's study key holds one of them
    assert "lr" not in results["settings"]["train"] and "rank" not in results["settings"]["lora"]
    assert results["settings"]["search"]["lrs"] == [1e-3, 1e-2] and results["settings"]["search"]["ranks"] == [2, 4]
    for r in rows:
        key = json.loads((whole / "points" / r["name"] / f"rung{r['rung']}.json").read_text())["settings"]
        assert key["points_vary"] == ["lr", "rank"] and "lr" not in key["train"] and "rank" not in key["lora"]

    # a point taken to 4 steps over two rungs has the weights of one trained to 4 steps straight
    name = rows[4]["name"]
    assert rows[4]["steps"] == 4
    assert_continued_equals_straight(whole, rows[4], common(tiny_full_vocab, sim_file, tmp_path / "straight",
                                                            tmp_path / "straight.jsonl"))

    # killed inside rung 1 (after step 3 of its first point, checkpointed at 3), then resumed: the same table
    part, ledger_part = tmp_path / "part", tmp_path / "part.jsonl"

    def kill(point, step):
        if point == name and step == 3:
            raise Killed

    with pytest.raises(Killed):
        search.main(search_args(tiny_full_vocab, sim_file, part, ledger_part), on_step=kill)
    assert (part / "points" / name / "rung0.json").is_file() and not (part / "points" / name / "rung1.json").exists()
    # the report shows the finished search and, from its rung records, the one still running; both beside the
    # untrained model with paired intervals
    from experiments import report

    assert report.main(["--results", str(tmp_path), "--ledger", str(ledger_whole), "--out",
                        str(tmp_path / "REPORT.md")]) == 0
    text = (tmp_path / "REPORT.md").read_text()
    assert text.count("## Successive-halving search") == 2 and "**part** — in progress: 4 rung records" in text
    assert f"Selection: {results['details']['selection']['rule']}" in text
    assert text.count(f"| {rows[0]['name']} @ 2 vs untrained | prey |") == 2
    assert "vs untrained" in (whole / "README.md").read_text()
    assert search.main(search_args(tiny_full_vocab, sim_file, part, ledger_part) + ["--resume"]) == 0
    resumed = json.loads((part / "results.json").read_text())
    assert resumed["details"]["rows"] == rows
    assert resumed["details"]["selection"] == results["details"]["selection"]


def test_a_study_key_leaves_out_what_its_points_vary():
    from experiments.lib.points import same_study, without_point_fields

    key = {"run": {"seed": 0}, "lora": {"targets": ["q_proj"]}, "train": {"batch_size": 4},
           "points_vary": ["lr", "rank"]}
    point = {"run": {"seed": 0}, "lora": {"targets": ["q_proj"], "rank": 2}, "train": {"batch_size": 4, "lr": 1e-5}}
    assert same_study(key, key)
    assert without_point_fields(point, ["lr", "rank"]) == {k: v for k, v in key.items() if k != "points_vary"}
    # a field the points do not vary has to agree
    assert not same_study({**key, "train": {"batch_size": 8}}, key)
    assert not same_study({**key, "lora": {"targets": ["v_proj"]}}, key)
    assert not same_study({**key, "points_vary": ["lr"]}, key)


def test_the_final_run_continues_the_search_winners_run_and_selects_by_forecast_from_there(
        tiny_full_vocab, sim_file, tmp_path):
    from experiments import final

    found, ledger = tmp_path / "search", tmp_path / "ledger.jsonl"
    assert search.main(search_args(tiny_full_vocab, sim_file, found, ledger)) == 0
    chosen = json.loads((found / "results.json").read_text())["details"]["selection"]["chosen"]
    args = common(tiny_full_vocab, sim_file, tmp_path / "final", ledger)
    i = args.index("--context-length")  # the search's choice
    assert final.main(args[:i] + args[i + 2:] + ["--from-search", str(found), "--max-steps", "8", "--eval-every",
                                                 "2", "--orders", "1,2", "--peer-indices", "none"]) == 0
    out = tmp_path / "final"
    assert json.loads((out / "continued_from.json").read_text())["step"] == chosen["steps"] == 4
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["train"]["lr"] == chosen["lr"] and results["settings"]["lora"]["rank"] == chosen["rank"]
    # the search selected by validation loss; the final run by forecast score, from the continued step on
    summary = json.loads((out / "training" / "summary.json").read_text())
    assert summary["select_by"] == "forecast" and summary["steps"] == 8 and summary["best_step"] in (6, 8)
    from experiments.lib.training import read_log

    log = read_log(out / "training" / "log.jsonl")
    searched = read_log(found / "points" / chosen["point"] / "training" / "log.jsonl")
    train = [e for e in log if e["kind"] == "train"]
    assert [e["step"] for e in train] == list(range(1, 9))
    assert train[:4] == [e for e in searched if e["kind"] == "train"]  # the first four steps are the search's
    assert all("forecast_score" in e for e in log if e["kind"] == "eval" and e["step"] > 4)


def test_search_refuses_a_schedule_that_depends_on_the_run_length(tiny_full_vocab, sim_file, tmp_path):
    with pytest.raises(UsageError, match="--lr-schedule cosine"):
        search.main(search_args(tiny_full_vocab, sim_file, tmp_path / "s", tmp_path / "l.jsonl")
                    + ["--lr-schedule", "cosine"])
    assert not (tmp_path / "s").exists() and not (tmp_path / "l.jsonl").exists()


def test_a_study_key_holds_the_resolved_dtype():
    """Points computed in another dtype are not mixed into a study: the key records the dtype as resolved."""
    from experiments.lib.points import same_study

    key = {"run": {"model": "m", "precision": "float32", "seed": 0}, "train": {"batch_size": 4}}
    bf16 = {**key, "run": {**key["run"], "precision": "bfloat16"}}
    assert same_study(key, key) and not same_study(bf16, key)