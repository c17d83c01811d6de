"""Reliability, round 4: a run directory is what a stage wrote (its run record, never a guess from file names), one
stage per directory at a time (an OS lock), every stage keeps the same directory rules, list options read numbers
as scalar options do, ``--from-*`` directories are runs of their stage, and inputs are checked (adapter weights,
ledgers, weight decay, scale target, context lengths), and a ``--resume`` compares every setting that defines the run
before the model loads (8) and refuses a directory that is not a run (9). Every refusal is exit status 2 and one
line, with nothing of the user's changed and nothing charged to the ledger. No forecast runs where a refusal is
expected."""

from __future__ import annotations

import fcntl
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from experiments import (baseline, benchmark, context_length, final, flops, lora_default, report, search, sweep,
                         train)
from experiments.lib.run_directory import RECORD
from conftest import write_sim_file
from test_run_directory import (baseline_args, cli, env, fake_run, lora_args, lora_run, refused,  # noqa: F401
                                snapshot)

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def run_dir(env):
    """A finished baseline run (read only: copy it to change it)."""
    out = env["root"] / "reliability_run"
    assert baseline.main(baseline_args(env, out)) == 0
    return out


def user_dir(root, files: dict):
    """A directory of the user's files ({relative path: text})."""
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


# ------------------------------------------------------------------- 1. a run is what a stage recorded it wrote

@pytest.mark.parametrize("files", [
    {"README.md": "# mine\n", "training/notes.txt": "my notes\n"},
    {"results.json": '{"stage": "my-experiment", "acc": 0.9}\n', "per_trajectory.csv": "a,b\n1,2\n"},
    {"results.json": '{"stage": "baseline"}\n', "untrained.json": "{}\n"},
], ids=["training-folder", "results-with-stage", "stage-file-names"])
@pytest.mark.parametrize("stage,flags", [(baseline, ["--overwrite"]), (lora_default, ["--overwrite"]),
                                         (lora_default, ["--resume"])], ids=["baseline", "lora", "lora-resume"])
def test_a_directory_without_a_run_record_is_never_emptied(env, tmp_path, capsys, files, stage, flags):
    out = user_dir(tmp_path / "mine", files)
    before = snapshot(tmp_path, env["ledger"])
    args = baseline_args(env, out) if stage is baseline else lora_args(env, out)
    refused(*cli(stage.main, args + flags, capsys), f"--out {out}", "no stage wrote")
    assert snapshot(tmp_path, env["ledger"]) == before


def test_overwrite_removes_only_what_the_record_lists(env, run_dir, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    # a file named like a stage's but not in the record is the user's: refused, naming it
    (out / "forecasts_mine.png").write_bytes(b"mine")
    before = snapshot(tmp_path, env["ledger"])
    refused(*cli(baseline.main, baseline_args(env, out) + ["--overwrite"], capsys), "forecasts_mine.png")
    assert snapshot(tmp_path, env["ledger"]) == before
    (out / "forecasts_mine.png").unlink()
    assert baseline.main(baseline_args(env, out) + ["--overwrite"]) == 0
    assert json.loads((out / RECORD).read_text())["stage"] == "baseline"


# -------------------------------------------------------------------------------- 2. one stage per directory

def test_a_second_stage_into_a_locked_directory_is_refused(env, run_dir, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    fd = os.open(out, os.O_RDONLY)  # another process's stage, as far as this one can tell
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        before = snapshot(tmp_path, env["ledger"])
        for stage, flags in ((baseline, ["--overwrite"]), (lora_default, ["--resume"])):
            args = baseline_args(env, out) if stage is baseline else lora_args(env, out)
            refused(*cli(stage.main, args + flags, capsys), f"--out {out}", "another stage is running")
        refused(*cli(flops.main, ["--out", str(out), "--ledger", str(env["ledger"])], capsys), "another stage")
        assert snapshot(tmp_path, env["ledger"]) == before
    finally:
        os.close(fd)  # the lock dies with its holder: the stage runs now
    assert baseline.main(baseline_args(env, out) + ["--overwrite"]) == 0


def test_a_refused_stage_leaves_no_directory_behind(env, tmp_path, capsys):
    out = tmp_path / "a" / "new"
    refused(*cli(lora_default.main, lora_args(env, out) + ["--resume"], capsys), "nothing to resume")
    assert not (tmp_path / "a").exists()


# ----------------------------------------------------------------------------- 3. the same rules for every stage

@pytest.fixture
def clone(tmp_path):
    return user_dir(tmp_path / "clone", {".git/HEAD": "ref: refs/heads/main\n", "keep.txt": "keep\n",
                                         "src/app.py": "print('mine')\n"})


@pytest.mark.parametrize("flags", [[], ["--overwrite"]], ids=["plain", "overwrite"])
def test_flops_benchmark_and_train_refuse_a_user_directory(env, clone, tmp_path, capsys, flags):
    before = snapshot(tmp_path, env["ledger"])
    refused(*cli(flops.main, ["--out", str(clone), "--ledger", str(env["ledger"])] + flags, capsys),
            f"--out {clone}", "no stage wrote")
    refused(*cli(benchmark.main, ["--model", str(env["model"]), "--out", str(clone), "--sections", "peak",
                                  "--repeats", "1", "--peak-size", "8", "--bandwidth-mib", "1", "--device", "cpu"]
                 + flags, capsys), f"--out {clone}", "no stage wrote")
    chunks = tmp_path / "chunks.safetensors"
    train.save_chunks(type("C", (), {"input_ids": torch.ones(4, 8, dtype=torch.long),
                                     "attention_mask": torch.ones(4, 8, dtype=torch.long)})(), chunks)
    before[str(chunks)] = snapshot(chunks)[str(chunks)]
    refused(*cli(train.main, ["--model", str(env["model"]), "--train-chunks", str(chunks), "--out", str(clone),
                              "--ledger", str(env["ledger"]), "--context-length", "8", "--batch-size", "2",
                              "--max-steps", "1", "--device", "cpu", "--no-progress"] + flags, capsys),
            f"--out {clone}", "no stage wrote")
    assert snapshot(tmp_path, env["ledger"]) == before


def test_flops_replaces_its_own_run_only_with_overwrite(env, tmp_path, capsys):
    out = tmp_path / "flops"
    assert flops.main(["--out", str(out), "--ledger", str(env["ledger"])]) == 0
    assert set(json.loads((out / RECORD).read_text())["written"]) == {RECORD, "flop_tables.md", "flop_tables.json"}
    before = snapshot(tmp_path)
    refused(*cli(flops.main, ["--out", str(out), "--ledger", str(env["ledger"])], capsys), "--overwrite")
    assert snapshot(tmp_path) == before
    assert flops.main(["--out", str(out), "--ledger", str(env["ledger"]), "--overwrite"]) == 0


def test_report_never_overwrites_a_file_it_did_not_write(env, tmp_path, capsys):
    results = tmp_path / "results"
    results.mkdir()
    mine = user_dir(tmp_path, {"R.md": "# my own notes\n"}) / "R.md"
    before = snapshot(tmp_path, env["ledger"])
    for flags in ([], ["--overwrite"]):
        refused(*cli(report.main, ["--results", str(results), "--ledger", str(env["ledger"]), "--out", str(mine)]
                     + flags, capsys), f"--out {mine}", "not a report")
    assert snapshot(tmp_path, env["ledger"]) == before
    out = tmp_path / "REPORT.md"
    assert report.main(["--results", str(results), "--ledger", str(env["ledger"]), "--out", str(out)]) == 0
    refused(*cli(report.main, ["--results", str(results), "--ledger", str(env["ledger"]), "--out", str(out)],
                 capsys), "--overwrite")
    assert report.main(["--results", str(results), "--ledger", str(env["ledger"]), "--out", str(out),
                        "--overwrite"]) == 0


# -------------------------------------------------------------------- 4. list elements follow the scalar rules

@pytest.mark.parametrize("stage,option,value", [
    (search, "--lrs", "\u0661e-4"), (search, "--ranks", "2,\u0664"), (sweep, "--lrs", "1e-4,\u0665e-5"),
    (context_length, "--contexts", "32,\u0664\u0668"), (search, "--lrs", "1e-4,nan"), (sweep, "--lrs", "inf"),
    (context_length, "--contexts", "32,1e3"),
])
def test_list_options_refuse_what_a_scalar_option_refuses(env, tmp_path, capsys, stage, option, value):
    out = tmp_path / "out"
    before = snapshot(tmp_path, env["ledger"])
    refused(*cli(stage.main, lora_args(env, out) + [option, value], capsys), option)
    assert snapshot(tmp_path, env["ledger"]) == before and not out.exists()


# -------------------------------------------------------------------------- 5. --from-* is a run of its stage

def test_final_from_search_refuses_a_sweep_and_a_conflicting_lr(env, tmp_path, capsys):
    a_sweep = fake_run(tmp_path / "sweep", "sweep", legacy=False)
    a_search = fake_run(tmp_path / "search", "search", legacy=False)  # chose lr 1e-3, rank 2, context 48
    unrecorded = fake_run(tmp_path / "old", "search", legacy=True)
    out = tmp_path / "final"
    before = snapshot(tmp_path, env["ledger"])
    args = lora_args(env, out) + ["--orders", "1,2", "--early-stop", "0"]
    refused(*cli(final.main, args + ["--from-search", str(a_sweep)], capsys), f"--from-search {a_sweep}",
            "a sweep run, not a search run")
    refused(*cli(final.main, args + ["--from-search", str(unrecorded)], capsys), "no miniqwen run record")
    refused(*cli(final.main, args + ["--from-sweep", str(a_search)], capsys), "not a sweep run")
    refused(*cli(context_length.main, lora_args(env, out) + ["--from-sweep", str(a_search), "--contexts", "32,48"],
                 capsys), "not a sweep run")
    for option, value in (("--lr", "1e-2"), ("--rank", "4"), ("--context-length", "32")):
        i = args.index(option) if option in args else None
        argv = args[:i] + args[i + 2:] if i is not None else args
        refused(*cli(final.main, argv + ["--from-search", str(a_search), option, value], capsys), option,
                "--from-search")
    assert snapshot(tmp_path, env["ledger"]) == before and not out.exists()


# ---------------------------------------------------------------------------------------- 6. inputs checked

def test_an_adapter_with_nan_weights_is_refused_naming_the_file(tmp_path):
    from lora import AdapterError, apply_lora, load_adapter, save_adapter
    from lora.io import ADAPTER_WEIGHTS
    from miniqwen import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = Qwen2ForCausalLM(config)
    apply_lora(model, 2, 2.0, ["q_proj", "v_proj"])
    save_adapter(model, tmp_path / "adapter")
    weights = tmp_path / "adapter" / ADAPTER_WEIGHTS
    state = load_file(str(weights))
    key = next(iter(state))
    state[key][0, 0] = float("nan")
    save_file(state, str(weights))
    with pytest.raises(AdapterError, match=f"{weights.name}.*NaN or infinite"):
        load_adapter(Qwen2ForCausalLM(config), weights.parent)


def test_report_refuses_a_ledger_that_is_not_one(env, tmp_path, capsys):
    results = tmp_path / "results"
    results.mkdir()
    ledger = user_dir(tmp_path, {"notes.txt": "a line of text\n"}) / "notes.txt"
    before = snapshot(tmp_path)
    refused(*cli(report.main, ["--results", str(results), "--ledger", str(ledger), "--out",
                               str(tmp_path / "R.md")], capsys), str(ledger))
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("option,value", [("--weight-decay", "1"), ("--weight-decay", "5"),
                                          ("--scale-target", "1e30"), ("--scale-target", "1e10")])
def test_weight_decay_and_scale_target_out_of_range_are_refused(env, tmp_path, capsys, option, value):
    out = tmp_path / "out"
    before = snapshot(env["ledger"])
    refused(*cli(lora_default.main, lora_args(env, out) + [option, value], capsys), option)
    assert snapshot(env["ledger"]) == before and not out.exists()


# ------------------------------------------------------------------------- 7. contexts the model has positions for

def test_a_context_longer_than_the_models_positions_is_refused(env, tmp_path, capsys):
    out = tmp_path / "out"
    positions = json.loads((env["model"] / "config.json").read_text())["max_position_embeddings"]
    before = snapshot(env["ledger"])
    line = refused(*cli(context_length.main, lora_args(env, out) + ["--contexts", f"32,{positions + 1}"], capsys),
                   "--contexts", str(positions))
    assert "max_position_embeddings" in line
    assert snapshot(env["ledger"]) == before and not out.exists()


# ------------------------------------------------- 8. a resume compares the settings that define the run first

def with_option(args: list[str], option: str, value: str | None) -> list[str]:
    """``args`` with ``option`` set to ``value`` (replaced where it is given, else added; a flag when None)."""
    if option in args:
        i = args.index(option)
        return args[:i + 1] + [value] + args[i + 2:]
    return args + [option] + ([] if value is None else [value])


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if the weights are loaded: a refused resume must be refused before the model loads."""
    from experiments.lib import session

    def load_pretrained(*args, **kwargs):
        pytest.fail("the model was loaded before the resume was refused")
    monkeypatch.setattr(session, "load_pretrained", load_pretrained)


RESUME_CHANGES = [("--seed", "1"), ("--decimals", "3"), ("--encoding", "integer"), ("--scaling", "series"),
                  ("--scale-quantile", "0.9"), ("--scale-target", "5"), ("--lr", "0.001"), ("--rank", "2"),
                  ("--lora-alpha", "8"), ("--targets", "q_proj"), ("--head-bias", None), ("--context-length", "40"),
                  ("--batch-size", "1"), ("--train-limit", "4"), ("--loss-vocabulary", "numeric"),
                  ("--lr-schedule", "cosine"), ("--limit", "1"), ("--horizon", "2"), ("--context-steps", "7"),
                  ("--split", "test"), ("--gen-batch-size", "1"), ("--samples", "2"), ("--prompt", "chat"),
                  ("--precision", "bfloat16")]


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


def test_a_resume_on_other_data_is_refused_before_anything_is_loaded(env, lora_run, tmp_path, capsys, no_model):
    out = tmp_path / "run"
    shutil.copytree(lora_run, out)
    other = write_sim_file(tmp_path / "other.h5", n_systems=40, n_steps=30, t_max=60.0, seed=7)
    before = snapshot(tmp_path, env["ledger"])
    args = with_option(lora_args(env, out) + ["--max-steps", "3", "--resume"], "--data", str(other))
    refused(*cli(lora_default.main, args, capsys), "--resume", "other.h5", "--data")
    assert snapshot(tmp_path, env["ledger"]) == before


def test_a_run_recorded_before_its_settings_were_is_compared_by_its_files(env, lora_run, tmp_path, capsys,
                                                                          no_model):
    """A run whose record holds only the run and data settings (made before the record kept every group): the
    forecast settings are read from its results.json and untrained.json, the training ones from its checkpoint."""
    out = tmp_path / "run"
    shutil.copytree(lora_run, out)
    record = json.loads((out / RECORD).read_text())
    record["settings"] = {k: v for k, v in record["settings"].items() if k in ("run", "data")}
    (out / RECORD).write_text(json.dumps(record))
    os.unlink(out / "results.json")  # as if interrupted: untrained.json and the checkpoint are what it has
    before = snapshot(tmp_path, env["ledger"])
    for option, value in (("--limit", "1"), ("--rank", "2"), ("--lr", "0.001"), ("--seed", "1")):
        args = with_option(lora_args(env, out) + ["--max-steps", "3", "--resume"], option, value)
        refused(*cli(lora_default.main, args, capsys), f"{option} {value}:", "was made with")
    assert snapshot(tmp_path, env["ledger"]) == before


def test_a_damaged_checkpoint_is_refused_before_the_model_loads(env, lora_run, tmp_path, capsys, no_model):
    out = tmp_path / "run"
    shutil.copytree(lora_run, out)
    adapter = out / "training" / "checkpoint" / "adapter.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:-8])
    before = snapshot(tmp_path, env["ledger"])
    refused(*cli(lora_default.main, lora_args(env, out) + ["--max-steps", "3", "--resume"], capsys), str(adapter),
            "checksum")
    assert snapshot(tmp_path, env["ledger"]) == before


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


# --------------------------------------------------------------- 9. a directory that is not a run is not resumed

def test_resume_into_a_users_directory_is_refused_as_not_a_run(env, tmp_path, capsys, no_model):
    out = user_dir(tmp_path / "mine", {"README.md": "# my project\n", "training/notes.txt": "my notes\n"})
    before = snapshot(tmp_path, env["ledger"])
    line = refused(*cli(lora_default.main, lora_args(env, out) + ["--resume"], capsys), f"--out {out}",
                   "not a run", "nothing to resume", "README.md", "training")
    assert line.startswith("error: --resume")
    assert snapshot(tmp_path, env["ledger"]) == before
