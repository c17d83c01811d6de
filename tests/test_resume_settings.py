"""Every setting that defines a run is compared before the model loads (issue 35, item 4), for every training stage:
a finished tiny run of final, search, sweep and context_length, resumed with another seed, LLMTIME format, batch,
forecast, LoRA or training setting (the search's grid and schedule, the chosen lr and rank) is refused with exit
status 2 and one line naming the option, before the model loads, with the run directory byte-identical and the
ledger unchanged; resumed with the same settings it goes on, and a sweep or context study may grow. A run whose record holds no fingerprint of its
weights (the migrated records of runs made before runs recorded one) is refused in one line, never crashed on."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import cli, snapshot, with_option, write_sim_file
from experiments import context_length, final, search, sweep
from experiments.lib import loader

STAGES = {
    "sweep": (sweep, ["--lrs", "1e-3", "--ranks", "2"]),
    "search": (search, ["--lrs", "1e-3,1e-2", "--ranks", "2", "--min-steps", "1", "--eta", "2", "--rungs", "1"]),
    "context_length": (context_length, ["--contexts", "32,48", "--lr", "1e-3", "--rank", "2"]),
    "final": (final, ["--lr", "1e-3", "--rank", "2", "--orders", "1,2", "--peer-indices", "none", "--score-limit",
                      "2"]),
}

#: (option, another value) that a resume of every training stage must refuse
EVERY_STAGE = [("--seed", "1"), ("--decimals", "3"), ("--scaling", "series"), ("--batch-size", "1"),
               ("--limit", "1"), ("--samples", "2")]
#: … and of each stage, its own: the search's grid and schedule (its rungs keep the best of the whole grid), the lr,
#: rank and context a study or the final run trains (not a sweep's --lrs/--ranks nor the study's --contexts: each
#: point is a run of its own, and a grid may grow, :func:`test_a_grid_may_grow_on_a_resume`)
OWN = {"sweep": [("--context-length", "32"), ("--targets", "q_proj")],
       "search": [("--lrs", "1e-3"), ("--ranks", "4"), ("--min-steps", "2"), ("--eta", "3"), ("--rungs", "2"),
                  ("--context-length", "32")],
       "context_length": [("--rank", "4"), ("--lr", "1e-2"), ("--targets", "q_proj")],
       "final": [("--rank", "4"), ("--lr", "1e-2"), ("--context-length", "32")]}
CASES = [(stage, option, value) for stage in STAGES for option, value in EVERY_STAGE + OWN[stage]]


def argv(stage: str, model, data, out, ledger) -> list[str]:
    return [str(a) for a in ["--model", model, "--data", data, "--out", out, "--ledger", ledger, "--device", "cpu",
                             "--precision", "float32", "--limit", "2", "--context-steps", "8", "--horizon", "2",
                             "--gen-batch-size", "2", "--plots", "0", "--batch-size", "2", "--context-length", "48",
                             "--eval-batches", "1", "--max-steps", "1", "--checkpoint-every", "1", "--no-progress",
                             *STAGES[stage][1]]]


@pytest.fixture(scope="module")
def finished(tiny_full_vocab, tmp_path_factory):
    """{stage: (its finished tiny run directory, the arguments that made it)} (read only: copy a run to use it)."""
    root = tmp_path_factory.mktemp("resume-settings")
    data = write_sim_file(root / "lv.h5", n_systems=40, n_steps=30, t_max=60.0, seed=1)
    runs = {}
    for stage, (module, _) in STAGES.items():
        args = argv(stage, tiny_full_vocab, data, root / stage, root / f"{stage}.jsonl")
        assert module.main(args) == 0
        runs[stage] = root / stage, args
    return runs


@pytest.fixture
def copy_of(finished, tmp_path):
    """A copy of a stage's finished run and its ledger under ``tmp_path``, with the arguments that continue it."""
    def make(stage):
        run, args = finished[stage]
        out, ledger = tmp_path / stage, tmp_path / "ledger.jsonl"
        shutil.copytree(run, out, symlinks=True)
        shutil.copyfile(run.parent / f"{stage}.jsonl", ledger)
        args = with_option(with_option(args, "--out", str(out)), "--ledger", str(ledger))
        return out, ledger, args + ["--resume"]
    return make


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if the weights are loaded: a refused resume is refused before the model loads."""
    def load_model(*args, **kwargs):
        pytest.fail("the model was loaded before the resume was refused")
    monkeypatch.setattr(loader, "load_model", load_model)


@pytest.mark.parametrize("stage,option,value", CASES, ids=[f"{s}{o}={v}" for s, o, v in CASES])
def test_a_resume_with_another_defining_setting_is_refused_before_the_model_loads(copy_of, no_model, capsys, stage,
                                                                                   option, value):
    out, ledger, args = copy_of(stage)
    before = snapshot(out, ledger)
    code, err = cli(STAGES[stage][0].main, with_option(args, option, value), capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    line = lines[0]
    assert line.startswith(f"error: {option} "), line
    assert f"the run in {out} was made with {option} " in line and f"resume with the same {option}," in line, line
    assert line.replace(str(out), "").count("--") <= 4, line  # the option it names (and --out), not every one
    assert snapshot(out, ledger) == before  # the run directory byte for byte, the ledger


def test_a_sweep_shard_with_another_setting_is_refused_too(copy_of, no_model, capsys):
    out, ledger, args = copy_of("sweep")
    before = snapshot(out, ledger)
    args = with_option([a for a in args if a != "--resume"], "--seed", "1") + ["--shard", "0/2"]
    code, err = cli(sweep.main, args, capsys)
    assert code == 2 and err.strip().startswith("error: --seed 1: the run in") and len(err.strip().splitlines()) == 1
    assert snapshot(out, ledger) == before


@pytest.mark.parametrize("stage,option,value", [("sweep", "--lrs", "1e-3,1e-2"), ("context_length", "--contexts",
                                                                                   "32,48,40")])
def test_a_grid_may_grow_on_a_resume(copy_of, stage, option, value):
    """A sweep's points (a context study's contexts) are runs of their own: a resume with more of them reads the
    finished ones back and trains the new ones; the table holds them all."""
    out, ledger, args = copy_of(stage)
    assert STAGES[stage][0].main(with_option(args, option, value)) == 0
    names = [r["name"] for r in json.loads((out / "results.json").read_text())["details"][
        "grid" if stage == "sweep" else "contexts"]]
    assert len(names) == len(value.split(",")), names


@pytest.mark.parametrize("stage", list(STAGES))
def test_a_resume_with_the_same_settings_goes_on(copy_of, stage):
    """The settings as the run recorded them (the grid as parsed, the points' own fields left out) compare equal:
    the resume is not refused, and may change what does not define the run (how often it checkpoints)."""
    out, ledger, args = copy_of(stage)
    assert STAGES[stage][0].main(with_option(args, "--checkpoint-every", "2")) == 0
    assert json.loads((out / "results.json").read_text())["stage"] == stage


def test_a_run_recorded_without_a_weights_fingerprint_is_not_resumed(copy_of, no_model, capsys):
    out, ledger, args = copy_of("sweep")
    record = json.loads((out / "run.json").read_text())
    record["weights"] = {"label": record["weights"]["label"], "name": record["weights"]["name"], "sha256": None}
    record["migrated"] = "scripts/migrate_results.py: the record was written after the run, from its files"
    (out / "run.json").write_text(json.dumps(record, indent=2) + "\n")
    before = snapshot(out, ledger)
    code, err = cli(sweep.main, args, capsys)
    assert code == 2 and err.strip() == (
        f"error: --resume: the run in {out} recorded no weights fingerprint (it was made before runs recorded one): "
        "it cannot be resumed; choose another --out"), err
    assert snapshot(out, ledger) == before
