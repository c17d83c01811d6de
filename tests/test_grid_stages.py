"""End to end on a tiny random model and simulated data: the grid (with a kill in the middle of a point and an
exact resume), the context-length study and the final run, and the plan they share with experiments.flops."""

import json

import pytest

from experiments import sweep
from experiments.lib.budget import Ledger
from experiments.flops import spent_by_stage




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
    # every point beside the untrained model on the same trajectories, with paired intervals, in results and README
    paired = results["details"]["vs_untrained"]
    assert [(c["a"], c["b"]) for c in paired] == [(r["name"], "untrained") for r in grid["rows"]]
    assert all(c["n"] == len(results["evaluations"]["untrained"]["trajectories"]) for c in paired)
    assert f"| {grid['rows'][0]['name']} vs untrained | prey |" in (whole / "README.md").read_text()

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


@pytest.fixture(scope="module")
def chain(tiny_full_vocab, sim_file, tmp_path_factory):
    """sweep -> context_length (from the sweep's choice) -> final (from both), as a user runs them."""
    from experiments import context_length, final

    root = tmp_path_factory.mktemp("chain")
    ledger = root / "flops_ledger.jsonl"
    assert sweep.main(common(tiny_full_vocab, sim_file, root / "sweep", ledger)
                      + ["--lrs", "1e-3", "--ranks", "2,4", "--max-steps", "2", "--checkpoint-every", "1"]) == 0
    assert context_length.main(common(tiny_full_vocab, sim_file, root / "context_length", ledger)
                               + ["--from-sweep", str(root / "sweep"), "--contexts", "32,48", "--max-steps", "3",
                                  "--eval-every", "0"]) == 0
    args = common(tiny_full_vocab, sim_file, root / "final", ledger)
    i = args.index("--context-length")
    assert final.main(args[:i] + args[i + 2:] + ["--from-sweep", str(root / "sweep"), "--from-context", str(root / "context_length"),
                         "--split", "test", "--max-steps", "3", "--eval-every", "1", "--orders", "1,2",
                         ]) == 0
    return root


def test_context_length_study_takes_the_sweeps_choice(chain):
    picked = json.loads((chain / "sweep" / "results.json").read_text())["details"]["selection"]["chosen"]
    out = chain / "context_length"
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["train"]["lr"] == picked["lr"] and results["settings"]["lora"]["rank"] == picked["rank"]
    rows = results["details"]["contexts"]
    assert [r["context_length"] for r in rows] == [32, 48] and all(r["steps"] == 3 for r in rows)
    assert rows[1]["train_flops"] > rows[0]["train_flops"]  # equal steps, unequal compute
    assert set(results["details"]["untrained_val_loss"]) == {"32", "48"}
    assert (out / "horizon_mae.png").is_file() and (out / "contexts.csv").is_file()
    assert results["flops"]["total"] <= results["flops"]["planned"]
    assert spent_by_stage(Ledger(chain / "flops_ledger.jsonl"))["context_length"] == results["flops"]["total"]
    # the final run took lr and rank from the sweep and the context length from the study
    fin = json.loads((chain / "final" / "results.json").read_text())
    best = results["details"]["selection"]["chosen"]["context_length"]
    assert fin["settings"]["train"]["context_length"] == best and fin["settings"]["lora"]["rank"] == picked["rank"]


def test_report_renders_the_grid_the_context_study_and_the_final_run(chain, tmp_path):
    from experiments import report

    assert report.main(["--results", str(chain), "--out", str(chain / "REPORT.md")]) == 0
    text = (chain / "REPORT.md").read_text()
    for heading in ("## Learning rate × LoRA rank", "## Context length", "## Final run on the test split",
                    "## Compute"):
        assert heading in text, heading
    assert "Selection rule: lowest validation forecast MSE" in text and "heatmap_forecast_mse.png" in text
    assert "PFLOPs of training" in text and "final/horizon_mae.png" in text


def test_final_run_resumes_and_evaluates_on_test_beside_classical(tiny_full_vocab, sim_file, tmp_path):
    from experiments import final

    args = common(tiny_full_vocab, sim_file, tmp_path / "final", tmp_path / "ledger.jsonl") + [
        "--split", "test", "--lr", "1e-3", "--rank", "2", "--max-steps", "6", "--eval-every", "2",
        "--checkpoint-every", "2", "--early-stop", "5", "--orders", "1,2"]

    def kill(step):
        if step == 3:
            raise Killed

    with pytest.raises(Killed):
        final.main(args, on_step=kill)
    assert final.main(args + ["--resume"]) == 0
    whole = tmp_path / "whole"
    assert final.main(common(tiny_full_vocab, sim_file, whole, tmp_path / "l2.jsonl") + args[len(common(
        tiny_full_vocab, sim_file, whole, tmp_path / "l2.jsonl")):]) == 0
    resumed = json.loads((tmp_path / "final" / "results.json").read_text())
    fresh = json.loads((whole / "results.json").read_text())
    names = {k for k in resumed["evaluations"] if not k.startswith("parrot(")}  # context parroting beside them
    assert len(resumed["evaluations"]) == len(names) + 1
    assert names == {"untrained", "lora", "persistence", "ar(1)", "ar(2)", "var(1)",
                     "var(2)", "lv_ode"} & names | {"untrained", "lora"}
    assert {"persistence", "lv_ode"} <= names and len(names) == 6
    assert resumed["evaluations"]["lora"]["metrics"] == fresh["evaluations"]["lora"]["metrics"]
    assert resumed["evaluations"]["lora"]["split"] == "test"
    assert resumed["details"]["training"]["steps"] == 6
    for name in ("horizon_mae.png", "horizon_by_type.png", "README.md", "peft_adapter/adapter_config.json"):
        assert (tmp_path / "final" / name).is_file(), name
    assert Ledger(tmp_path / "ledger.jsonl").total() == resumed["flops"]["total"]
    # every forecast is kept: the run's metrics are recomputed from its predictions files and the data alone
    from data import load_trajectories
    from experiments.lib import by_type, runs

    rescored = by_type.rescore(tmp_path / "final", load_trajectories(sim_file).trajectories)
    tags = {"lora": "trained", "untrained": "untrained", **{k: runs.file_tag(k) for k in resumed["evaluations"]
                                                          if k not in ("lora", "untrained")}}
    for name, evaluation in resumed["evaluations"].items():
        indices, metrics = rescored[tags[name]]
        assert indices == evaluation["trajectories"], name
        for species in ("prey", "predator"):
            for key in ("mse", "mae", "r2"):
                assert metrics[species][key] == pytest.approx(evaluation["metrics"][species][key], rel=1e-12), name
    assert sorted(resumed["details"]["by_type"]["summary"]) <= ["all", "damped", "sustained"]


def test_plan_total_is_the_sum_of_the_stages_own_plans_at_their_defaults(tmp_path):
    import dataclasses

    from experiments import baseline, context_length, final, flops, lora_default
    from experiments.lib.costs import Sizes
    from experiments.lib.settings import GROUPS
    from miniqwen.config import Qwen2Config

    assert flops.main(["--out", str(tmp_path), "--ledger", str(tmp_path / "l.jsonl")]) == 0
    data = json.loads((tmp_path / "flop_tables.json").read_text())
    config, sizes = Qwen2Config(), Sizes()

    def d(stage):  # what each stage's parser gives when no option is passed
        parsed = {}
        for name, cls in GROUPS.items():
            parsed[name] = stage.DEFAULTS.get(name) or cls()
        return parsed

    own = {
        "baseline": baseline.plan(config, sizes, d(baseline)["forecast"], d(baseline)["loss"]),
        "lora_default": lora_default.plan(config, sizes, *(d(lora_default)[g] for g in ("forecast", "lora", "train"))),
        "sweep": sweep.plan(config, sizes, *(d(sweep)[g] for g in ("forecast", "lora", "train"))),
        "context_length": context_length.plan(config, sizes, *(d(context_length)[g] for g in ("forecast", "lora",
                                                                                             "train"))),
        "final": final.plan(config, sizes, *(d(final)[g] for g in ("forecast", "lora", "train"))),
    }
    assert data["plan_total"] == sum(sum(p.values()) for p in own.values()) <= 10**17
    assert {k: sum(v.values()) for k, v in data["plan"].items()} == {k: sum(v.values()) for k, v in own.items()}
    # the parsers' defaults are the DEFAULTS the plan reads
    for stage, group in ((sweep, "train"), (context_length, "train"), (final, "train"), (lora_default, "train")):
        parsed = stage.build_parser().parse_args([])
        assert parsed.max_steps == stage.DEFAULTS[group].max_steps
        assert parsed.batch_size == stage.DEFAULTS[group].batch_size
    # a change of a stage's defaults changes the plan
    before = sum(sum(p.values()) for p in flops.stage_plans(config).values())
    original = sweep.DEFAULTS["train"]
    try:
        sweep.DEFAULTS["train"] = dataclasses.replace(original, max_steps=original.max_steps + 100)
        assert sum(sum(p.values()) for p in flops.stage_plans(config).values()) > before
    finally:
        sweep.DEFAULTS["train"] = original
