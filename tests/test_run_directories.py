"""Run directories: a stage writes, replaces and removes only a directory a stage made, as its run record says.
``--overwrite`` never deletes what the user owns (the clone, ``.``, a directory of notes, a file beside a run, a
ledger kept in the run), a symbolic-link ``--out`` is followed or refused, ``~`` is expanded, a damaged run record,
point.json or untrained.json is one line naming it, one stage at a time holds a directory (an OS lock) and one
process a sweep or search point, every stage (flops, benchmark, train, report) keeps the same rules, and
``--from-*`` directories are runs of their stage. Every refusal is exit status 2 and one line naming the option or
file, and every file the user had is unchanged (by checksum), the ledger included."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from conftest import (REPO, baseline_args, checksums, cli, error_line, exit_err_out, fake_run, lora_args, record,
                      refused, snapshot, stage_args, user_dir)
from experiments import (baseline, benchmark, context_length, final, flops, lora_default, report, search, sweep,
                         train)
from experiments.lib import points
from experiments.lib.budget import Ledger
from experiments.lib.run_directory import RECORD, inspect_out


# ------------------------------------------------------------------------------------- --overwrite deletes only runs

def fake_clone(root: Path) -> Path:
    clone = root / "clone"
    (clone / ".git" / "objects").mkdir(parents=True)
    (clone / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (clone / "README.md").write_text("# my project\n")
    (clone / "experiments").mkdir()
    (clone / "experiments" / "baseline.py").write_text("print('mine')\n")
    return clone


@pytest.mark.parametrize("flags", [["--overwrite"], []], ids=["overwrite", "plain"])
@pytest.mark.parametrize("out", [".", ".."])
def test_out_dot_in_a_clone_is_refused_and_the_clone_survives(env, tmp_path, capsys, monkeypatch, out, flags):
    clone = fake_clone(tmp_path)
    work = clone / "experiments" if out == ".." else clone
    monkeypatch.chdir(work)
    before = snapshot(tmp_path, env["ledger"])
    code, err = cli(baseline.main, baseline_args(env, out) + flags, capsys)
    line = refused(code, err, f"--out {out}", "no stage wrote")
    assert "README.md" in line or "baseline.py" in line
    assert snapshot(tmp_path, env["ledger"]) == before


def test_the_current_directory_is_never_emptied_even_when_it_is_a_run(env, baseline_run, tmp_path, capsys,
                                                                      monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(baseline_run, run)
    monkeypatch.chdir(run)
    before = snapshot(tmp_path, env["ledger"])
    code, err = cli(baseline.main, baseline_args(env, ".") + ["--overwrite"], capsys)
    refused(code, err, "--out .", "current directory")
    assert snapshot(tmp_path, env["ledger"]) == before


@pytest.mark.parametrize("stage,flags", [(baseline, []), (baseline, ["--overwrite"]), (lora_default, ["--resume"]),
                                         (lora_default, ["--overwrite"]), (sweep, ["--shard", "0/2"]),
                                         (sweep, ["--collect"])],
                         ids=["baseline", "baseline-overwrite", "lora-resume", "lora-overwrite", "sweep-shard",
                              "sweep-collect"])
def test_a_directory_of_user_files_is_not_a_run(env, tmp_path, capsys, stage, flags):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes\n")
    before = snapshot(tmp_path, env["ledger"])
    args = baseline_args(env, out) if stage is baseline else lora_args(env, out)
    code, err = cli(stage.main, args + flags, capsys)
    line = refused(code, err, f"--out {out}", "notes.txt", "no stage wrote")
    assert "already holds results" not in line
    assert snapshot(tmp_path, env["ledger"]) == before


def test_overwrite_replaces_a_run_but_not_a_file_put_beside_it(env, baseline_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(baseline_run, out)
    record = json.loads((out / RECORD).read_text())
    assert record["stage"] == "baseline" and record["weights"]["sha256"] and record["data"]["sha256"]
    assert "results.json" in record["written"]
    # no flag: refused, saying what is there
    before = snapshot(tmp_path, env["ledger"])
    code, err = cli(baseline.main, baseline_args(env, out), capsys)
    refused(code, err, f"--out {out}", "already holds a baseline run", "--overwrite")
    assert snapshot(tmp_path, env["ledger"]) == before
    # a file the user put in the run directory is not the stage's to delete
    (out / "my-analysis.txt").write_text("keep me\n")
    before = snapshot(tmp_path, env["ledger"])
    code, err = cli(baseline.main, baseline_args(env, out) + ["--overwrite"], capsys)
    refused(code, err, "--overwrite", "my-analysis.txt")
    assert snapshot(tmp_path, env["ledger"]) == before
    # without it, the run is replaced
    (out / "my-analysis.txt").unlink()
    assert baseline.main(baseline_args(env, out) + ["--overwrite"]) == 0
    assert json.loads((out / "results.json").read_text())["stage"] == "baseline"


def test_a_ledger_kept_in_the_run_directory_is_never_removed_with_it(env, tmp_path, capsys):
    out = tmp_path / "run"
    args = baseline_args(env, out)
    args[args.index("--ledger") + 1] = str(out / "ledger.jsonl")
    assert baseline.main(args) == 0
    assert "ledger.jsonl" not in json.loads((out / RECORD).read_text())["written"]
    before = snapshot(tmp_path)
    code, err = cli(baseline.main, args + ["--overwrite"], capsys)
    refused(code, err, "--overwrite", "ledger.jsonl")
    assert snapshot(tmp_path) == before


@pytest.fixture(scope="module")
def run_dir(env):
    """A finished baseline run (read only: copy it to change it)."""
    out = env["root"] / "reliability_run"
    assert baseline.main(baseline_args(env, out)) == 0
    return out


@pytest.mark.filterwarnings("ignore")
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


@pytest.mark.filterwarnings("ignore")
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


# ------------------------------------------------------------------------------------------------ where --out points

def test_a_symlinked_out_is_followed_by_overwrite_and_a_dangling_one_is_refused(env, baseline_run, tmp_path,
                                                                                capsys):
    target = tmp_path / "target"
    shutil.copytree(baseline_run, target)
    link = tmp_path / "link"
    link.symlink_to(target, target_is_directory=True)
    assert baseline.main(baseline_args(env, link) + ["--overwrite"]) == 0
    assert link.is_symlink() and (target / "results.json").is_file() and (target / RECORD).is_file()

    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    before = snapshot(tmp_path, env["ledger"])
    for flags in ([], ["--overwrite"]):
        code, err = cli(baseline.main, baseline_args(env, dangling) + flags, capsys)
        refused(code, err, f"--out {dangling}", "does not exist")
    assert snapshot(tmp_path, env["ledger"]) == before


@pytest.mark.parametrize("flags", [[], ["--overwrite"]])
def test_out_that_is_a_file_is_refused(env, tmp_path, capsys, flags):
    out = tmp_path / "results.json"
    out.write_text('{"stage": "baseline"}\n')
    before = snapshot(tmp_path, env["ledger"])
    code, err = cli(baseline.main, baseline_args(env, out) + flags, capsys)
    refused(code, err, f"--out {out}", "not a directory")
    assert snapshot(tmp_path, env["ledger"]) == before


def test_out_under_a_file_is_one_line(env, tmp_path, capsys):
    (tmp_path / "results.json").write_text("{}\n")
    out = tmp_path / "results.json" / "sub"
    before = snapshot(tmp_path, env["ledger"])
    code, err = cli(baseline.main, baseline_args(env, out), capsys)
    refused(code, err, f"--out {out}")
    assert snapshot(tmp_path, env["ledger"]) == before


def test_out_expands_the_home_directory(env, tmp_path, monkeypatch):
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    assert baseline.main(baseline_args(env, "~/runs/b")) == 0
    assert (home / "runs" / "b" / "results.json").is_file()
    assert not (work / "~").exists()


# ----------------------------------------------------------------------------------- run records and damaged records

def test_committed_runs_are_runs_only_with_their_record():
    """A results/ directory is a run of its stage only if it holds its run record (run.json); one made before run
    records is nobody's run (never resumed or emptied); a recorded run holds nothing its record does not list."""
    runs = sorted(p.parent for p in (REPO / "results").glob("*/results.json"))
    assert runs
    for run in runs:
        found = inspect_out(run)
        if (run / RECORD).is_file():
            stage = json.loads((run / "results.json").read_text())["stage"]
            assert (found.kind, found.stage) == ("run", stage), run
            assert found.not_written_by_a_stage() == [], run
        else:
            assert found.kind == "foreign", run
    assert inspect_out(REPO).kind == "foreign"


def test_a_damaged_run_record_is_refused_naming_it(env, lora_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(lora_run, out)
    (out / RECORD).write_text("{garbage")
    before = snapshot(tmp_path, env["ledger"])
    for flags in (["--resume"], ["--overwrite"], []):
        code, err = cli(lora_default.main, lora_args(env, out) + flags, capsys)
        refused(code, err, str(out / RECORD))
    assert snapshot(tmp_path, env["ledger"]) == before


DAMAGE = {"garbage": b"{not json", "0 bytes": b"", "a list": b"[]", "not utf-8": b"\xff\xfe{",
          "no evaluation": None}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_point_json_is_one_line_naming_it(setup, tmp_path, capsys, damage):
    out, ledger = tmp_path / "out", setup / "ledger.jsonl"
    base = ["--model", str(tmp_path / "no-model"), "--data", str(setup / "lv.h5"), "--out", str(out), "--ledger",
            str(ledger), "--lrs", "1e-3", "--ranks", "2"]
    path = out / "points" / "lr0.001_rank2" / "point.json"
    path.parent.mkdir(parents=True)
    record(out, "sweep")
    if DAMAGE[damage] is None:
        path.write_text(json.dumps({"settings": {}, "name": "lr0.001_rank2", "lr": 1e-3, "rank": 2,
                                    "context_length": 512, "training": {}, "train_loss_last_10": None}))
    else:
        path.write_bytes(DAMAGE[damage])
    before = checksums(setup), path.read_bytes()
    code, err, _ = exit_err_out(sweep.main, [*base, "--collect"], capsys)
    line = error_line(code, err, str(path))
    assert "--overwrite" not in line  # --collect refuses --overwrite: it must not advise it
    assert (checksums(setup), path.read_bytes()) == before


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_untrained_json_is_one_line_before_any_work(tiny_full_vocab, sim_file, tmp_path, capsys, damage):
    out, ledger = tmp_path / "out", tmp_path / "ledger.jsonl"
    Ledger(ledger).charge("earlier", 777, "train")
    (out / "training").mkdir(parents=True)  # an interrupted lora_default run
    record(out, "lora_default")
    path = out / "untrained.json"
    path.write_bytes(DAMAGE[damage] if DAMAGE[damage] is not None else json.dumps({"settings": {}}).encode())
    before = checksums(out)
    argv = stage_args(tiny_full_vocab, sim_file, out, ledger) + [
        "--batch-size", "2", "--context-length", "48", "--max-steps", "2", "--eval-batches", "1", "--resume"]
    code, err, _ = exit_err_out(lora_default.main, argv, capsys)
    error_line(code, err, str(path), "delete it")
    assert Ledger(ledger).total() == 777
    after = checksums(out)
    after.pop("run.json"), before.pop("run.json")  # the run's own record gains the weights' identity
    assert after == before


# -------------------------------------------------------------------- one stage per directory, one process per point

@pytest.mark.filterwarnings("ignore")
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


@pytest.mark.filterwarnings("ignore")
def test_a_refused_stage_leaves_no_directory_behind(env, tmp_path, capsys):
    out = tmp_path / "a" / "new"
    refused(*cli(lora_default.main, lora_args(env, out) + ["--resume"], capsys), "nothing to resume")
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("stage", ["sweep shard", "sweep", "search"])
def test_a_second_copy_of_a_running_point_is_refused(tiny_full_vocab, sim_file, tmp_path, capsys, stage):
    out, ledger = tmp_path / "out", tmp_path / "ledger.jsonl"
    Ledger(ledger).charge("earlier", 777, "train")
    argv = stage_args(tiny_full_vocab, sim_file, out, ledger) + [
        "--lrs", "1e-3", "--ranks", "2,4", "--batch-size", "2", "--context-length", "48", "--eval-batches", "1",
        "--gen-batch-size", "2"]
    if stage == "sweep shard":
        argv += ["--shard", "0/1", "--max-steps", "2"]
    elif stage == "sweep":
        argv += ["--max-steps", "2", "--resume"]
    else:
        argv += ["--min-steps", "2", "--eta", "2", "--rungs", "2", "--resume"]
    # the first copy, still running, holds the lock of its point
    held = out / "points" / "lr0.001_rank4"
    held.mkdir(parents=True)
    record(out, "search" if stage == "search" else "sweep")
    fd = os.open(held / points.LOCK, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        before = checksums(tmp_path)
        main = search.main if stage == "search" else sweep.main
        code, err, _ = exit_err_out(main, argv, capsys)
        error_line(code, err, "lr0.001_rank4", str(held / points.LOCK), "another process")
        assert Ledger(ledger).total() == 777  # nothing spent, nothing charged
        assert not (out / "untrained.json").exists() and not (held / "training").exists()
        assert not (out / "points" / "lr0.001_rank2" / "training").exists()
        # only the run record and the other points' (empty) lock files are new
        assert {k: v for k, v in checksums(tmp_path).items()
                if not k.endswith(("run.json", points.LOCK)) or k in before} == before
    finally:
        os.close(fd)


def test_a_point_killed_before_its_checkpoint_keeps_its_lock(tmp_path):
    point = tmp_path / "points" / "p"
    (point / "training").mkdir(parents=True)
    (point / "training" / "log.jsonl").write_text("")
    (point / points.LOCK).write_text("")
    points.clear_point(point)
    assert [p.name for p in point.iterdir()] == [points.LOCK]


# ------------------------------------------------------------------------------------ the same rules for every stage

@pytest.fixture
def clone(tmp_path):
    return user_dir(tmp_path / "clone", {".git/HEAD": "ref: refs/heads/main\n", "keep.txt": "keep\n",
                                         "src/app.py": "print('mine')\n"})


@pytest.mark.filterwarnings("ignore")
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


@pytest.mark.filterwarnings("ignore")
def test_flops_replaces_its_own_run_only_with_overwrite(env, tmp_path, capsys):
    out = tmp_path / "flops"
    assert flops.main(["--out", str(out), "--ledger", str(env["ledger"])]) == 0
    assert set(json.loads((out / RECORD).read_text())["written"]) == {RECORD, "flop_tables.md", "flop_tables.json"}
    before = snapshot(tmp_path)
    refused(*cli(flops.main, ["--out", str(out), "--ledger", str(env["ledger"])], capsys), "--overwrite")
    assert snapshot(tmp_path) == before
    assert flops.main(["--out", str(out), "--ledger", str(env["ledger"]), "--overwrite"]) == 0


@pytest.mark.filterwarnings("ignore")
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


def test_benchmark_never_replaces_its_results_without_overwrite(env, tmp_path, capsys):
    bench = ["--model", str(env["model"]), "--sections", "peak", "--repeats", "1", "--peak-size", "8",
             "--bandwidth-mib", "1", "--device", "cpu"]
    out = tmp_path / "results"
    assert benchmark.main(bench + ["--out", str(out)]) == 0
    assert "benchmark.json" in json.loads((out / RECORD).read_text())["written"]
    before = snapshot(tmp_path)
    code, err = cli(benchmark.main, bench + ["--data", str(env["data"]), "--out", str(out)], capsys)
    refused(code, err, f"--out {out}", "already holds a benchmark run", "--overwrite")
    assert snapshot(tmp_path) == before
    assert benchmark.main(bench + ["--out", str(out), "--overwrite"]) == 0


# ------------------------------------------------------------------------------------ --from-* is a run of its stage

@pytest.mark.filterwarnings("ignore")
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


def test_every_committed_run_holds_its_record_and_current_study_keys():
    """The committed results are in the one on-disk format (``scripts/migrate_results.py --check`` finds nothing to
    migrate): every run directory a stage made holds its run record, every study's point keys are current."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "scripts/migrate_results.py", "--check"], cwd=REPO, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_committed_checkpoint_is_verified_by_the_current_reader():
    """The committed training checkpoints (the final run's, each search point's) are in the one on-disk format: the
    reader a ``--resume`` uses verifies every file's checksum and its state.json's own, and finds the loop state a
    resume continues from. (Resuming them exactly also needs the weights they were trained on, which are not on
    every machine; the kill/resume tests of tests/test_train.py show a resume is exact.)"""
    from experiments.lib.training.checkpoint import find_checkpoint, read_checkpoint
    from experiments.lib.training.state import TrainState

    checkpoints = sorted({find_checkpoint(p.parent.parent) for p in (REPO / "results").rglob("checkpoint/state.json")})
    assert len(checkpoints) >= 10, checkpoints
    for path in checkpoints:
        state = read_checkpoint(path).state
        assert TrainState(**state["loop"]).step > 0, path
