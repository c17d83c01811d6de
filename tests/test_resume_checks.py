"""``--resume`` continues only the same run: a run of the same stage, on the same data and weights, in the same
compute dtype, with every setting that defines the run, compared before the model loads or anything is spent (and
compared by its files for a run recorded before its settings were); what does not define the run (plots, max steps,
evaluation and checkpoint intervals, progress bars) may change, stages that do not train refuse ``--resume``, and a
directory that holds nothing to resume, or is not a run, is refused. Every refusal is exit status 2 and one line,
with nothing of the user's changed and nothing charged to the ledger."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import (baseline_args, checksums, cli, error_line, exit_err_out, fake_run, lora_args, record, refused,
                      snapshot, tiny_run, train_stage_argv, user_dir, with_option, write_sim_file,
                      write_tiny_checkpoint)
from data.chunks import make_chunks
from experiments import baseline, classical, context_length, final, lora_default, sweep
from experiments import train as train_cli
from experiments.lib.errors import UsageError
from experiments.lib.session import Session
from experiments.lib.settings import DataSettings, LoRASettings, RunSettings
from experiments.lib.training import CheckpointError, train_lora as train
from experiments.train import save_chunks


# ------------------------------------------------------------------------------------------- a run of the same stage

@pytest.mark.parametrize("stage", [baseline, classical])
def test_stages_that_do_not_train_refuse_resume(env, baseline_run, tmp_path, capsys, stage):
    out = tmp_path / "run"
    shutil.copytree(baseline_run, out)
    before = snapshot(tmp_path, env["ledger"])
    args = baseline_args(env, out) if stage is baseline else ["--data", str(env["data"]), "--out", str(out),
                                                              "--ledger", str(env["ledger"])]
    code, err = cli(stage.main, args + ["--resume"], capsys)
    refused(code, err, "--resume", "nothing to resume", stage.STAGE)
    assert snapshot(tmp_path, env["ledger"]) == before


@pytest.mark.parametrize("legacy", [False, True], ids=["record", "legacy"])
@pytest.mark.parametrize("stage,theirs", [(baseline, "final"), (lora_default, "final"),
                                          (context_length, "sweep"), (final, "lora_default"),
                                          (sweep, "context_length")])
def test_resume_refuses_another_stages_run(env, tmp_path, capsys, stage, theirs, legacy):
    out = fake_run(tmp_path / "theirs", theirs, legacy)
    before = snapshot(tmp_path, env["ledger"])
    args = baseline_args(env, out) if stage is baseline else lora_args(env, out)
    if stage is context_length:  # the case: --from-sweep D --out D --resume
        args += ["--from-sweep", str(out), "--contexts", "32,48"]
    if stage is final:
        args += ["--orders", "1,2", "--early-stop", "0"]
    code, err = cli(stage.main, args + ["--resume"], capsys)
    if stage is baseline:
        refused(code, err, "--resume", "nothing to resume")
    elif legacy and stage is context_length:  # --from-sweep is checked first: no record, no sweep run
        refused(code, err, f"--from-sweep {out}", "no miniqwen run record")
    elif legacy:  # no run record: files no stage wrote, whatever their names
        refused(code, err, f"--out {out}", "no stage wrote")
    else:
        refused(code, err, f"--out {out}", f"holds a {theirs} run, not a {stage.STAGE} run")
    assert snapshot(tmp_path, env["ledger"]) == before


def test_resume_with_nothing_there_is_refused(env, tmp_path, capsys):
    out = tmp_path / "new"
    code, err = cli(lora_default.main, lora_args(env, out) + ["--resume"], capsys)
    refused(code, err, "--resume", "nothing to resume")
    assert not out.exists()


@pytest.mark.filterwarnings("ignore")
def test_resume_into_a_users_directory_is_refused_as_not_a_run(env, tmp_path, capsys, no_model):
    out = user_dir(tmp_path / "mine", {"README.md": "# my project\n", "training/notes.txt": "my notes\n"})
    before = snapshot(tmp_path, env["ledger"])
    line = refused(*cli(lora_default.main, lora_args(env, out) + ["--resume"], capsys), f"--out {out}",
                   "not a run", "nothing to resume", "README.md", "training")
    assert line.startswith("error: --resume")
    assert snapshot(tmp_path, env["ledger"]) == before


# -------------------------------------------------------------------------------------- on the same weights and data

@pytest.fixture(scope="module")
def other_weights(tmp_path_factory):
    """A checkpoint of the same architecture as ``tiny_full_vocab`` but other weights (another seed)."""
    path = tmp_path_factory.mktemp("other-weights")
    write_tiny_checkpoint(path, tie=True, seed=1, vocab_size=151936, hidden_size=32, intermediate_size=48,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    return path


def test_resume_on_other_weights_is_refused_before_anything_is_spent(env, lora_run, other_weights, tmp_path,
                                                                      capsys):
    out = tmp_path / "run"
    shutil.copytree(lora_run, out)
    before = snapshot(tmp_path, env["ledger"])
    args = lora_args(env, out) + ["--max-steps", "3", "--resume"]
    i = args.index("--model")
    code, err = cli(lora_default.main, args[:i + 1] + [str(other_weights)] + args[i + 2:], capsys)
    refused(code, err, f"--model {other_weights}", "other weights")
    assert snapshot(tmp_path, env["ledger"]) == before  # untrained.json, its CSV, the checkpoint, the ledger
    # the same weights under another name (a copy elsewhere) are the same weights: the resume goes on
    moved = tmp_path / "moved-weights"
    shutil.copytree(env["model"], moved)
    assert lora_default.main(args[:i + 1] + [str(moved)] + args[i + 2:]) == 0
    assert json.loads((out / "training" / "summary.json").read_text())["steps"] == 3


def test_resume_on_other_data_is_refused_before_anything_is_spent(env, tmp_path):
    other = write_sim_file(tmp_path / "other.h5", n_systems=40, n_steps=30, t_max=60.0, seed=7)
    out = tmp_path / "run"
    Session("lora_default", RunSettings(out=str(out), model=str(env["model"])), DataSettings(data=str(env["data"])),
            trains=True)
    (out / "untrained.json").write_text("{}\n")
    before = snapshot(tmp_path)
    with pytest.raises(UsageError, match=r"--resume: .* was run on data lv\.h5 .*other\.h5.*--data"):
        Session("lora_default", RunSettings(out=str(out), model=str(env["model"]), resume=True),
                DataSettings(data=str(other)), trains=True)
    assert snapshot(tmp_path) == before


# -------------------------------------------- with the settings that define the run, compared before the model loads

@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if the weights are loaded: a refused resume must be refused before the model loads."""
    from experiments.lib import loader

    def load_model(*args, **kwargs):
        pytest.fail("the model was loaded before the resume was refused")
    monkeypatch.setattr(loader, "load_model", load_model)


RESUME_CHANGES = [("--seed", "1"), ("--decimals", "3"), ("--encoding", "integer"), ("--scaling", "series"),
                  ("--scale-quantile", "0.9"), ("--scale-target", "5"), ("--lr", "0.001"), ("--rank", "2"),
                  ("--lora-alpha", "8"), ("--targets", "q_proj"), ("--head-bias", None), ("--context-length", "40"),
                  ("--batch-size", "1"), ("--train-limit", "4"), ("--loss-vocabulary", "numeric"),
                  ("--lr-schedule", "cosine"), ("--limit", "1"), ("--horizon", "2"), ("--context-steps", "7"),
                  ("--split", "test"), ("--gen-batch-size", "1"), ("--samples", "2"), ("--prompt", "chat"),
                  ("--precision", "bfloat16")]


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("option,value", RESUME_CHANGES, ids=[o for o, _ in RESUME_CHANGES])
def test_a_resume_with_another_defining_setting_is_refused_before_anything_is_loaded(
        env, lora_run, tmp_path, capsys, no_model, option, value):
    out = tmp_path / "run"
    shutil.copytree(lora_run, out)
    before = snapshot(tmp_path, env["ledger"])
    # the run's own --max-steps: with the cosine schedule another one would be a second difference
    args = with_option(lora_args(env, out) + ["--max-steps", "2", "--resume"], option, value)
    line = refused(*cli(lora_default.main, args, capsys), f"the run in {out} was made with", "resume with the same",
                   "or choose another --out")
    typed = option if value is None else f"{option} {value}"
    assert line.startswith(f"error: {typed}"), line
    assert line.replace(str(out), "").count("--") <= 6, line  # the option it names (and --out), not all
    assert snapshot(tmp_path, env["ledger"]) == before  # untrained.json, the checkpoint, the record, the ledger


@pytest.mark.filterwarnings("ignore")
def test_a_resume_on_other_data_is_refused_before_anything_is_loaded(env, lora_run, tmp_path, capsys, no_model):
    out = tmp_path / "run"
    shutil.copytree(lora_run, out)
    other = write_sim_file(tmp_path / "other.h5", n_systems=40, n_steps=30, t_max=60.0, seed=7)
    before = snapshot(tmp_path, env["ledger"])
    args = with_option(lora_args(env, out) + ["--max-steps", "3", "--resume"], "--data", str(other))
    refused(*cli(lora_default.main, args, capsys), "--resume", "other.h5", "--data")
    assert snapshot(tmp_path, env["ledger"]) == before


@pytest.mark.filterwarnings("ignore")
def test_a_damaged_checkpoint_is_refused_before_the_model_loads(env, lora_run, tmp_path, capsys, no_model):
    out = tmp_path / "run"
    shutil.copytree(lora_run, out)
    adapter = out / "training" / "checkpoint" / "adapter.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:-8])
    before = snapshot(tmp_path, env["ledger"])
    refused(*cli(lora_default.main, lora_args(env, out) + ["--max-steps", "3", "--resume"], capsys), str(adapter),
            "checksum")
    assert snapshot(tmp_path, env["ledger"]) == before


@pytest.mark.filterwarnings("ignore")
def test_a_resume_may_change_what_does_not_define_the_run(env, lora_run, tmp_path):
    """--plots, --max-steps, --eval-every, --checkpoint-every and --no-progress may differ: the resume goes on
    from the checkpoint and reads the untrained forecast back (untrained.json unchanged, not charged again)."""
    out = tmp_path / "run"
    shutil.copytree(lora_run, out)
    untrained = snapshot(out / "untrained.json")
    spent = [json.loads(line) for line in env["ledger"].read_text().splitlines() if line.strip()]
    args = lora_args(env, out) + ["--max-steps", "3", "--resume", "--plots", "1"]
    args = with_option(with_option(args, "--eval-every", "3"), "--checkpoint-every", "2")
    assert lora_default.main(args) == 0
    assert json.loads((out / "training" / "summary.json").read_text())["steps"] == 3
    assert snapshot(out / "untrained.json") == untrained
    charged = [json.loads(line) for line in env["ledger"].read_text().splitlines() if line.strip()][len(spent):]
    assert not any(e.get("what") == "untrained forecast" for e in charged), charged


@pytest.mark.parametrize("change", [["--lr", "0.5"], ["--rank", "4"], ["--seed", "3"], ["--loss-vocabulary",
                                                                                         "numeric"], "data"])
def test_resume_with_changed_settings_is_one_line(tiny_dir, tmp_path, capsys, change):
    ledger = tmp_path / "ledger.jsonl"
    argv = [*train_stage_argv(tiny_dir, tmp_path, ledger), "--rank", "2", "--lr", "0.01"]
    assert train_cli.main([*argv, "--max-steps", "2"]) == 0
    if change == "data":
        g = torch.Generator().manual_seed(3)
        save_chunks(make_chunks([torch.randint(1, 128, (40,), generator=g).tolist() for _ in range(6)], 16),
                    tmp_path / "chunks.safetensors")
        change = []
    before, ledger_before = checksums(tmp_path / "run"), ledger.read_text()
    code, err, _ = exit_err_out(train_cli.main, [*argv, *change, "--max-steps", "4", "--resume"], capsys)
    if change and change[0] == "--loss-vocabulary":  # numeric needs a tokenizer's alphabet: refused either way
        assert code == 2 and len(err.strip().splitlines()) == 1, err
    else:
        error_line(code, err, "checkpoint", "differ" if not change else "cannot resume with different settings")
    assert checksums(tmp_path / "run") == before and ledger.read_text() == ledger_before


def test_a_point_made_with_other_settings_advises_only_what_works(setup, tmp_path, capsys):
    out = tmp_path / "out"
    path = out / "points" / "lr0.001_rank2" / "point.json"
    path.parent.mkdir(parents=True)
    record(out, "sweep")
    evaluation = {"forecaster": "x", "split": "validation", "trajectories": [1], "context_steps": 8, "horizon": 3,
                  "metrics": {s: {"mse": 1.0, "mae": 1.0, "r2": 0.0} for s in ("prey", "predator")}}
    path.write_text(json.dumps({"settings": {"other": 1}, "name": "lr0.001_rank2", "lr": 1e-3, "rank": 2,
                                "context_length": 512, "evaluation": evaluation, "train_loss_last_10": 1.0,
                                "training": {"steps": 1, "epochs": 1.0, "val_loss": 1.0, "train_flops": 1,
                                             "eval_flops": 1}}))
    argv = ["--model", str(tmp_path / "m"), "--data", str(setup / "lv.h5"), "--out", str(out), "--ledger",
            str(setup / "ledger.jsonl"), "--lrs", "1e-3", "--ranks", "2"]
    code, err, _ = exit_err_out(sweep.main, [*argv, "--collect"], capsys)
    assert "other settings" in error_line(code, err, str(path)) and "--overwrite" not in err
    code, err, _ = exit_err_out(sweep.main, [*argv, "--shard", "0/1"], capsys)
    assert "--overwrite" not in error_line(code, err, str(path))


# ----------------------------------------------------------------------------------------- in the same compute dtype

def test_a_resume_in_another_compute_dtype_is_refused_with_the_option_to_pass(tmp_path):
    """The checkpoint records the dtype it was trained in (as resolved: --precision auto picks float32 on a CPU
    without native bf16, bfloat16 on one with it); a resume in another dtype is refused, naming the one to pass,
    and the same dtype continues."""
    model, chunks, settings = tiny_run(tmp_path)
    out = tmp_path / "run"
    train(model, chunks, chunks, settings, out, lora=LoRASettings(rank=2), precision="float32")
    assert json.loads((out / "checkpoint" / "state.json").read_text())["precision"] == "float32"
    saved = {p.name: p.read_bytes() for p in (out / "checkpoint").iterdir()}
    model2, _, settings2 = tiny_run(tmp_path, max_steps=6)
    with pytest.raises(CheckpointError) as info:
        train(model2, chunks, chunks, settings2, out, lora=LoRASettings(rank=2), resume=True, precision="bfloat16")
    message = str(info.value)
    assert "precision: checkpoint float32 vs now bfloat16" in message and "--precision float32" in message
    assert "\n" not in message and {p.name: p.read_bytes() for p in (out / "checkpoint").iterdir()} == saved
    model3, _, settings3 = tiny_run(tmp_path, max_steps=6)
    train(model3, chunks, chunks, settings3, out, lora=LoRASettings(rank=2), resume=True, precision="float32")
    assert json.loads((out / "checkpoint" / "state.json").read_text())["loop"]["step"] == 6
    # what a stage asks before it spends anything
    from experiments.lib.training import checkpoint_step
    assert checkpoint_step(out) == checkpoint_step(out, "float32") == 6
    with pytest.raises(CheckpointError, match="--precision float32"):
        checkpoint_step(out, "bfloat16")


@pytest.mark.parametrize("asked, resolved, saved, reused", [
    ("auto", "float32", "float32", True),
    ("auto", "float32", "bfloat16", False),  # auto picked bf16 on the machine that wrote it, float32 here
    ("bfloat16", "bfloat16", "bfloat16", True),
    ("float32", "float32", "bfloat16", False),
])
def test_an_untrained_evaluation_is_reused_only_in_the_same_compute_dtype(tmp_path, monkeypatch, asked, resolved,
                                                                          saved, reused):
    """untrained.json records the dtype as resolved; --resume reads it back only when this run computes in the
    same one, and otherwise forecasts (and charges) again."""
    from types import SimpleNamespace

    from experiments.lib import runs
    from experiments.lib.results import Evaluation
    from experiments.lib.settings import ForecastSettings

    metrics = {s: {"mse": 1.0, "mae": 1.0, "r2": 0.0} for s in ("prey", "predator")}
    old = Evaluation("untrained", "test", [0], 8, 2, metrics, flops=5)
    session = SimpleNamespace(run=RunSettings(model="m", precision=asked), data_settings=DataSettings(),
                              precision=resolved, charged=[], model=None, tokenizer=None, dataset=None, progress=None,
                              weights="w")
    session.charge = lambda kind, flops, *a, **k: session.charged.append(flops)
    session.run_key = lambda: {"model": "m", "precision": resolved, "seed": session.run.seed}
    forecast = ForecastSettings()
    key = runs.as_record(run=session.run, data=session.data_settings, forecast=forecast)
    key["run"] = {"model": "m", "precision": saved, "seed": key["run"]["seed"]}
    path = tmp_path / "untrained.json"
    path.write_text(json.dumps({"settings": key, "untrained": old.__dict__}))
    new = Evaluation("untrained", "test", [0], 8, 2, metrics, flops=7)

    def forecast_again(dataset, forecaster, forecast, out, tag, title, weights, *, predictions, **kw):
        predictions["untrained"] = np.zeros((1, 2, 2))
        return new
    monkeypatch.setattr(runs, "llm_forecaster", lambda *a: None)
    monkeypatch.setattr(runs, "forecast_and_save", forecast_again)
    got = runs.untrained_evaluation(session, forecast, "test", path, reuse=True)
    assert got.flops == (5 if reused else 7) and session.charged == ([] if reused else [7])
    if not reused:
        assert json.loads(path.read_text())["settings"]["run"]["precision"] == resolved


def test_a_resume_cannot_take_steps_back(env, lora_run, tmp_path, capsys, no_model):
    """A finished run of 2 steps resumed with --max-steps 1 is refused before the model loads; nothing changes."""
    out = tmp_path / "run"
    shutil.copytree(lora_run, out)
    before = snapshot(tmp_path, env["ledger"])
    refused(*cli(lora_default.main, lora_args(env, out) + ["--max-steps", "1", "--resume"], capsys),
            "--max-steps 1", "already taken 2 steps")
    assert snapshot(tmp_path, env["ledger"]) == before
