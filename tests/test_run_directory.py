"""A stage writes, resumes and removes only a run directory a stage made (issue 20, "Losses"): ``--overwrite`` never
deletes what the user owns (the clone, ``.``, a directory of notes, a file beside a run), ``--resume`` continues
only a run of the same stage on the same data and weights (refused before anything is spent), stages that do not
train refuse ``--resume``, a symbolic-link ``--out`` is followed or refused, ``~`` is expanded, and the benchmark
never replaces a benchmark.json without ``--overwrite``. Every refusal is exit status 2 and one line naming the
option or file, and every file the user had is unchanged (by checksum), the ledger included."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, write_sim_file, write_tiny_checkpoint
from experiments import baseline, benchmark, classical, context_length, final, lora_default, sweep
from experiments.lib.budget import Ledger
from experiments.lib.run_directory import RECORD, inspect_out
from experiments.lib.session import Session
from experiments.lib.settings import DataSettings, RunSettings
from experiments.lib.cli import run_cli
from experiments.lib.errors import UsageError


# ------------------------------------------------------------------------------------------------------ helpers

def snapshot(*roots: Path) -> dict:
    """{path: sha256 (files) / "-> target" (links) / "dir"} of everything under ``roots``, dotfiles included."""
    out = {}
    for root in roots:
        root = Path(root)
        if not root.exists() and not root.is_symlink():
            out[str(root)] = None
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                p = Path(dirpath) / name
                if p.is_symlink():
                    out[str(p)] = "-> " + os.readlink(p)
                elif p.is_dir():
                    out[str(p)] = "dir"
                else:
                    out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
        if root.is_file():
            out[str(root)] = hashlib.sha256(root.read_bytes()).hexdigest()
    return out


def cli(main, argv, capsys):
    """(exit status, stderr) of ``main(argv)`` run as the command line runs it."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        run_cli(lambda: main(argv))
    return info.value.code, capsys.readouterr().err


def refused(code, err, *words):
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for w in words:
        assert w in lines[0], (w, err)
    return lines[0]


@pytest.fixture(scope="module")
def env(tiny_full_vocab, sim_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("rundir")
    ledger = root / "ledger.jsonl"
    Ledger(ledger).charge("earlier", 12345, "train")
    return {"model": tiny_full_vocab, "data": sim_file, "ledger": ledger, "root": root}


def common(env, out) -> list[str]:
    return ["--model", str(env["model"]), "--data", str(env["data"]), "--ledger", str(env["ledger"]),
            "--out", str(out), "--device", "cpu", "--precision", "float32", "--limit", "2", "--context-steps", "8",
            "--horizon", "3", "--plots", "0"]


def baseline_args(env, out) -> list[str]:
    return common(env, out) + ["--gen-batch-size", "2", "--loss-limit", "0"]


def lora_args(env, out) -> list[str]:
    return common(env, out) + ["--gen-batch-size", "2", "--batch-size", "2", "--context-length", "48",
                               "--eval-batches", "1", "--eval-every", "0", "--checkpoint-every", "1",
                               "--no-progress"]


@pytest.fixture(scope="module")
def baseline_run(env):
    """A finished baseline run directory (read only: copy it to change it)."""
    out = env["root"] / "baseline_run"
    assert baseline.main(baseline_args(env, out)) == 0
    return out


@pytest.fixture(scope="module")
def lora_run(env):
    """A lora_default run of 2 steps (read only: copy it to change it)."""
    out = env["root"] / "lora_run"
    assert lora_default.main(lora_args(env, out) + ["--max-steps", "2"]) == 0
    return out


@pytest.fixture(scope="module")
def other_weights(tmp_path_factory):
    """A checkpoint of the same architecture as ``tiny_full_vocab`` but other weights (another seed)."""
    path = tmp_path_factory.mktemp("other-weights")
    write_tiny_checkpoint(path, tie=True, seed=1, vocab_size=151936, hidden_size=32, intermediate_size=48,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    return path


# ------------------------------------------------------------------------------- --overwrite deletes only runs

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


# ------------------------------------------------------------------------------------- --resume is the same run

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


def fake_run(path: Path, stage: str, legacy: bool) -> Path:
    """A run directory of ``stage``: with a run record, or (``legacy``) as runs were before them."""
    path.mkdir(parents=True)
    selection = {"chosen": {"lr": 1e-3, "rank": 2, "context_length": 48}}
    (path / "results.json").write_text(json.dumps({"stage": stage, "settings": {}, "weights": "w",
                                                   "details": {"selection": selection}}) + "\n")
    (path / "untrained.json").write_text('{"settings": {}, "untrained": {}}\n')
    (path / "README.md").write_text(f"# {stage}\n")
    (path / "training").mkdir()
    (path / "training" / "log.jsonl").write_text("")
    if not legacy:
        (path / RECORD).write_text(json.dumps({"made_by": "miniqwen", "stage": stage, "weights": None}) + "\n")
    return path


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


def test_resume_with_nothing_there_is_refused(env, tmp_path, capsys):
    out = tmp_path / "new"
    code, err = cli(lora_default.main, lora_args(env, out) + ["--resume"], capsys)
    refused(code, err, "--resume", "nothing to resume")
    assert not out.exists()


def test_a_damaged_run_record_is_refused_naming_it(env, lora_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(lora_run, out)
    (out / RECORD).write_text("{garbage")
    before = snapshot(tmp_path, env["ledger"])
    for flags in (["--resume"], ["--overwrite"], []):
        code, err = cli(lora_default.main, lora_args(env, out) + flags, capsys)
        refused(code, err, str(out / RECORD))
    assert snapshot(tmp_path, env["ledger"]) == before


# ----------------------------------------------------------------------------------------------------- benchmark

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


@pytest.mark.parametrize("argv,option", [
    (["--threads", "0"], "--threads"), (["--threads", "-2"], "--threads"),
    (["--throughput-batches", "0"], "--throughput-batches"), (["--counting-lengths", "0"], "--counting-lengths"),
    (["--counting-lengths", "-4"], "--counting-lengths"), (["--loss-context", "1"], "--loss-context"),
    (["--device", "banana"], "--device"), (["--thread", "2"], "--thread"),
] + ([(["--device", "cuda"], "--device")] if not __import__("torch").cuda.is_available() else []))
def test_benchmark_refuses_bad_options_before_any_work(tmp_path, capsys, monkeypatch, argv, option):
    import time

    started = time.perf_counter()
    monkeypatch.setattr(benchmark, "matmul_peak", lambda *a, **k: pytest.fail("a section ran"))
    out = tmp_path / "bench"
    code, err = cli(benchmark.main, ["--model", str(tmp_path / "no-model"), "--out", str(out),
                                     "--sections", "peak", *argv], capsys)
    refused(code, err, option)
    assert not out.exists() and time.perf_counter() - started < 30


def test_a_read_only_out_is_one_line_naming_it_and_nothing_is_spent(env, tmp_path, capsys, monkeypatch):
    """A read-only file system (simulated: the tests run as root, which a read-only mode bit does not stop; the
    same cases were checked by hand on a read-only tmpfs): each stage stops with one line naming the path and the
    error, before any FLOP is spent or charged."""
    import errno
    import pathlib

    from experiments import flops, report

    read_only = tmp_path / "ro"
    real_mkdir = pathlib.Path.mkdir

    def mkdir(self, *args, **kwargs):
        if str(self).startswith(str(read_only)):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)
    before = snapshot(env["ledger"])
    refused(*cli(baseline.main, baseline_args(env, read_only / "b"), capsys), "--out", "Read-only file system")
    refused(*cli(flops.main, ["--out", str(read_only / "f")], capsys), str(read_only / "f"), "Read-only file system")
    refused(*cli(report.main, ["--results", str(tmp_path), "--ledger", str(env["ledger"]), "--out",
                               str(read_only / "R.md")], capsys), str(read_only), "Read-only file system")
    assert snapshot(env["ledger"]) == before and not read_only.exists()


@pytest.mark.parametrize("asked, resolved, saved, reused", [
    ("auto", "float32", "float32", True),
    ("auto", "float32", "bfloat16", False),  # auto picked bf16 on the machine that wrote it, float32 here
    ("bfloat16", "bfloat16", "bfloat16", True),
    ("float32", "float32", "bfloat16", False),
    ("auto", "bfloat16", "auto", True),  # a file from before the dtype was recorded: taken at its word
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
                              precision=resolved, charged=[])
    session.charge = lambda kind, flops, *a, **k: session.charged.append(flops)
    session.run_key = lambda: {"model": "m", "precision": resolved, "seed": session.run.seed}
    forecast = ForecastSettings()
    key = runs.as_record(run=session.run, data=session.data_settings, forecast=forecast)
    key["run"] = {"model": "m", "precision": saved, "seed": key["run"]["seed"]}
    path = tmp_path / "untrained.json"
    path.write_text(json.dumps({"settings": key, "untrained": old.__dict__}))
    new = Evaluation("untrained", "test", [0], 8, 2, metrics, flops=7)

    def forecast_again(session, forecaster, forecast, tag, title, *, predictions, **kw):
        predictions["untrained"] = np.zeros((1, 2, 2))
        return new
    monkeypatch.setattr(runs, "llm_forecaster", lambda *a: None)
    monkeypatch.setattr(runs, "forecast_and_save", forecast_again)
    got = runs.untrained_evaluation(session, forecast, "test", path, reuse=True)
    assert got.flops == (5 if reused else 7) and session.charged == ([] if reused else [7])
    if not reused:
        assert json.loads(path.read_text())["settings"]["run"]["precision"] == resolved
