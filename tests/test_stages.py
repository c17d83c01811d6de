"""The experiments layer: settings, session, results schema, the classical stage and the report."""


import numpy as np
import pytest

from conftest import write_sim_file
from experiments import classical, report
from experiments.lib import cli, errors, settings
from experiments.lib.budget import Ledger, LedgerError
from experiments.lib.results import Evaluation, Results, find_results
from experiments.lib.session import Session


@pytest.fixture(scope="module")
def sim_file(tmp_path_factory):
    """Longer than conftest's file: the classical stage below forecasts 30 -> 5 steps."""
    return write_sim_file(tmp_path_factory.mktemp("sim") / "lv.h5", n_systems=60, n_steps=40, t_max=80.0, seed=3)


def metrics(value):
    m = {"mse": value, "mae": value, "r2": 0.5, "mse_by_step": [value] * 3, "mae_by_step": [value] * 3}
    return {"prey": dict(m), "predator": dict(m)}


def test_results_round_trip(tmp_path):
    r = Results(stage="x", settings={"run": {"seed": 1}}, weights="w", data={"file": "f.h5", "sha256": "ab"}, seed=1,
                evaluations={"a": Evaluation("a", "validation", [800, 801], 30, 3, metrics(0.25), flops=7,
                                             validation_loss=float("nan"))})
    r.add_flops("generate", 7)
    r.add_flops("train", 30)
    path = r.write(tmp_path / "results.json")
    back = Results.load(path)
    assert back.flops == {"generate": 7, "train": 30, "total": 37}
    assert back.evaluations["a"].metrics == metrics(0.25) and back.evaluations["a"].validation_loss is None
    assert back.to_dict() == Results.load(back.write(tmp_path / "again.json")).to_dict()
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "results.json").write_text('{"not": "ours"}')
    assert list(find_results(tmp_path)) == ["."]
    with pytest.raises(ValueError, match="results.json"):
        Results.load(tmp_path / "sub" / "results.json")


def test_session_refuses_an_output_directory_that_holds_results(sim_file, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text('{"stage": "s"}')  # a stage's results, by its run record below
    (out / "run.json").write_text('{"made_by": "miniqwen", "stage": "s", "written": ["results.json", "run.json"]}')
    run = settings.RunSettings(out=str(out), ledger=str(tmp_path / "l.jsonl"))
    data = settings.DataSettings(data=str(sim_file))
    with pytest.raises(errors.UsageError, match="--overwrite"):
        Session("s", run, data)
    assert (out / "results.json").read_text() == '{"stage": "s"}'
    with pytest.raises(errors.UsageError, match="nothing to resume"):
        Session("s", settings.RunSettings(out=str(tmp_path / "empty"), resume=True), data)
    Session("s", settings.RunSettings(out=str(out), overwrite=True), data)
    assert not (out / "results.json").exists()


def test_results_are_written_before_the_ledger_is_charged(sim_file, tmp_path):
    ledger = tmp_path / "ledger.jsonl"
    ledger.write_text("torn line without newline")  # a ledger that fails at charge time
    session = Session("s", settings.RunSettings(out=str(tmp_path / "out"), ledger=str(ledger)),
                      settings.DataSettings(data=str(sim_file)))
    results = session.results()
    results.add_flops("generate", 123)
    with pytest.raises(LedgerError, match="results are safe"):
        session.finish(results, charge={"generate": 123})
    assert Results.load(tmp_path / "out" / "results.json").flops["generate"] == 123
    assert ledger.read_text() == "torn line without newline"


def test_settings_name_the_option_in_errors():
    p = cli.parser("x", "", "run", "data", "forecast", "lora", "train")
    with pytest.raises(errors.UsageError, match=r"^--gen-batch-size 0: must be an integer >= 1"):
        cli.parse(p, ["--gen-batch-size", "0"])
    with pytest.raises(errors.UsageError, match=r"^--lora-alpha 0\.0"):
        cli.parse(p, ["--lora-alpha", "0"])
    s = cli.parse(p, ["--targets", "q_proj,k_proj", "--max-grad-norm", "none", "--no-progress"])
    assert s["lora"].targets == ("q_proj", "k_proj") and s["train"].max_grad_norm is None
    assert s["train"].progress is False and s["run"].precision == "auto"


def test_classical_stage_end_to_end(sim_file, tmp_path):
    out, ledger = tmp_path / "classical", tmp_path / "ledger.jsonl"
    code = classical.main(["--data", str(sim_file), "--context-steps", "30", "--horizon", "5", "--orders", "1,2,3",
                           "--out", str(out), "--ledger", str(ledger), "--plots", "1"])
    assert code == 0
    r = Results.load(out / "results.json")
    assert {k.split("/")[1] for k in r.evaluations} == {"validation", "test"}
    names = {k.split("/")[0] for k in r.evaluations}
    assert "persistence" in names and "lv_ode" in names
    assert any(n.startswith("ar(") for n in names) and any(n.startswith("var(") for n in names)
    for e in r.evaluations.values():
        assert len(e.trajectories) == 6 and e.flops == 0 and np.isfinite(e.metrics["prey"]["mse"])
    assert r.weights is None and r.flops["total"] == 0
    assert Ledger(ledger).entries() == []  # no language model, nothing charged
    assert (out / "forecasts_persistence_test.png").is_file()


def test_report_renders_from_fixture_results(tmp_path):
    root = tmp_path / "results"
    idx = [900, 901, 902]
    common = dict(settings={"forecast": {"prompt": "raw", "samples": 1}}, weights="tiny", seed=0,
                  data={"file": "lv.h5", "sha256": "0" * 64})
    base = Results(stage="baseline", evaluations={
        "zero-shot": Evaluation("zero-shot", "test", idx, 30, 3, metrics(0.5), flops=10, validation_loss=1.1),
        "persistence": Evaluation("persistence", "test", idx, 30, 3, metrics(0.9))},
        details={"examples": [{"trajectory": 900, "raw": [[1.0, 2.0]], "text": "1.00,2.00", "token_ids": [1, 2]}]},
        **common)
    base.add_flops("generate", 10)
    clas = Results(stage="classical", evaluations={
        "var(2)/test": Evaluation("var(2)", "test", idx, 30, 3, metrics(0.2)),
        "persistence/test": Evaluation("persistence", "test", idx, 30, 3, metrics(0.9))}, **common)
    base.write((root / "baseline_test").mkdir(parents=True) or root / "baseline_test" / "results.json")
    clas.write((root / "classical").mkdir(parents=True) or root / "classical" / "results.json")
    Ledger(root / "flops_ledger.jsonl").charge("baseline", 10, "generate")
    assert report.main(["--results", str(root), "--out", str(tmp_path / "REPORT.md")]) == 0
    text = (tmp_path / "REPORT.md").read_text()
    assert "## Tokenized examples" in text and "1.00,2.00" in text
    assert "**var(2) beats the best LLM forecast**" in text
    assert "| **total** | | **10** |" in text.replace("1e+01", "10") or "| **total** |" in text
    assert (root / "report" / "horizon_mae_test_3.png").is_file()
