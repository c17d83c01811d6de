"""Issue 20, the rest of its list: a silently wrong result is refused, damaged state and bad values end in one line
(exit status 2) before anything is spent, and what the user had is unchanged (by checksum) — LoRA scales, point
locks, orders, splits, decoding, chunk files, damaged records, resumes, seeds, vocabularies, SLURM variables,
reports, ledgers, batch sizes; and the messages that named the wrong thing."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import stat

import numpy as np
import pytest
import torch

from data import decode
from data.chunks import make_chunks
from data.simulate import simulate, write_h5
from experiments import baseline, classical, context_length, final, lora_default, report, search, sweep
from experiments.lib import grid, runs, studies, tables
from experiments import train as train_cli
from experiments.lib.budget import BudgetExceededError, Ledger, LedgerError
from experiments.lib.cli import run_cli
from experiments.lib.errors import UsageError
from experiments.train import save_chunks
from miniqwen.atomic import atomic_write


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("refusals")
    write_h5(root / "lv.h5", *simulate(n_systems=20, n_steps=30, seed=0))
    Ledger(root / "ledger.jsonl").charge("earlier", 12345, "train")
    return root


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A 128-token model (with the real tokenizer when it is beside the repository): for experiments.train."""
    from conftest import write_tiny_checkpoint

    path = tmp_path_factory.mktemp("tiny128")
    write_tiny_checkpoint(path, tie=True)
    return path


def run(main, argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main(argv))
    captured = capsys.readouterr()
    return exit_info.value.code, captured.err, captured.out


def one_line(code, err, *words):
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert all(w in lines[0] for w in words), err
    return lines[0]


def checksums(root) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def record(out, stage: str):
    """Make ``out`` a run directory of ``stage`` (its run record, as a stage writes it first): a directory without
    one is nobody's run."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.json").write_text(json.dumps({"made_by": "miniqwen", "stage": stage, "weights": None,
                                              "written": []}) + "\n")
    return out


def stage_args(model, data, out, ledger):
    return ["--model", str(model), "--data", str(data), "--out", str(out), "--ledger", str(ledger), "--device", "cpu",
            "--precision", "float32", "--limit", "2", "--context-steps", "8", "--horizon", "3", "--no-progress"]


# ----------------------------------------------------------------------------------- refused before any work

BEFORE_ANY_WORK = [
    (lora_default, ["--lora-alpha", "1e30"], "--lora-alpha"),
    (lora_default, ["--rank", "1", "--lora-alpha", "20000"], "--lora-alpha"),
    (sweep, ["--lora-alpha", "30000", "--ranks", "2,4"], "--lora-alpha"),
    (lora_default, ["--seed", "4294967296"], "--seed"),
    (baseline, ["--seed", str(2**40)], "--seed"),
    (final, ["--orders", "1,-2"], "--orders"), (final, ["--orders", "1.5,2"], "--orders"),
    (final, ["--orders", "1,,2"], "--orders"), (final, ["--orders", "1,٢"], "--orders"),
    (final, ["--orders", "0"], "--orders"), (classical, ["--orders", "1,-2"], "--orders"),
    (classical, ["--orders", "+2"], "--orders"), (classical, ["--parrot-lengths", "1_0"], "--parrot-lengths"),
    (classical, ["--split", "train", "--splits", "test"], "--split"),
    (context_length, ["--lr", "0"], "--lr"), (final, ["--rank", "0"], "--rank"),
    (context_length, ["--contexts", "0"], "--contexts"), (context_length, ["--contexts", "1"], "--contexts"),
    (context_length, ["--contexts", "64,٢"], "--contexts"),
    (final, ["--eval-every", "0"], "--eval-every"),
]


@pytest.mark.parametrize("stage,argv,option", BEFORE_ANY_WORK,
                         ids=[f"{s.__name__.split('.')[-1]} {' '.join(a)}" for s, a, _ in BEFORE_ANY_WORK])
def test_refused_before_any_work(setup, tmp_path, capsys, stage, argv, option):
    before = checksums(setup)
    out = tmp_path / "out"
    code, err, _ = run(stage.main, ["--model", str(tmp_path / "no-model"), "--data", str(setup / "lv.h5"), "--out",
                                    str(out), "--ledger", str(setup / "ledger.jsonl"), *argv], capsys)
    line = one_line(code, err, option)
    assert "no-model" not in err and not out.exists()
    assert checksums(setup) == before
    if option == "--lr":
        assert "lr=" not in line  # the option, not the field
    if option == "--eval-every":
        assert line.startswith("error: --eval-every 0")  # what the user gave, not --early-stop (a stage default)


def test_contexts_0_and_1_get_one_wording(setup, tmp_path, capsys):
    lines = []
    for value in ("0", "1"):
        code, err, _ = run(context_length.main, ["--model", str(tmp_path / "m"), "--data", str(setup / "lv.h5"),
                                                 "--out", str(tmp_path / "o"), "--contexts", value], capsys)
        lines.append(one_line(code, err, "--contexts").replace(value, "N"))
    assert lines[0] == lines[1]


def test_lora_scale_limit_accepts_ordinary_alphas():
    from experiments.lib.settings import LoRASettings

    for rank, alpha in ((1, 1.0), (8, 16.0), (4, 0.5), (1, 1e4)):
        LoRASettings(rank=rank, lora_alpha=alpha).validate()


# ------------------------------------------------------------------------------------------- the point locks

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
    fd = os.open(held / studies.LOCK, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        before = checksums(tmp_path)
        main = search.main if stage == "search" else sweep.main
        code, err, _ = run(main, argv, capsys)
        one_line(code, err, "lr0.001_rank4", str(held / studies.LOCK), "another process")
        assert Ledger(ledger).total() == 777  # nothing spent, nothing charged
        assert not (out / "untrained.json").exists() and not (held / "training").exists()
        assert not (out / "points" / "lr0.001_rank2" / "training").exists()
        # only the run record and the other points' (empty) lock files are new
        assert {k: v for k, v in checksums(tmp_path).items()
                if not k.endswith(("run.json", studies.LOCK)) or k in before} == before
    finally:
        os.close(fd)


def test_a_point_killed_before_its_checkpoint_keeps_its_lock(tmp_path):
    point = tmp_path / "points" / "p"
    (point / "training").mkdir(parents=True)
    (point / "training" / "log.jsonl").write_text("")
    (point / studies.LOCK).write_text("")
    studies.clear_point(point)
    assert [p.name for p in point.iterdir()] == [studies.LOCK]


# ------------------------------------------------------------------------------------------ damaged records

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
    code, err, _ = run(sweep.main, [*base, "--collect"], capsys)
    line = one_line(code, err, str(path))
    assert "--overwrite" not in line  # --collect refuses --overwrite: it must not advise it
    assert (checksums(setup), path.read_bytes()) == before


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
    code, err, _ = run(sweep.main, [*argv, "--collect"], capsys)
    assert "other settings" in one_line(code, err, str(path)) and "--overwrite" not in err
    code, err, _ = run(sweep.main, [*argv, "--shard", "0/1"], capsys)
    assert "--overwrite" not in one_line(code, err, str(path))


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
    code, err, _ = run(lora_default.main, argv, capsys)
    one_line(code, err, str(path), "delete it")
    assert Ledger(ledger).total() == 777
    after = checksums(out)
    after.pop("run.json"), before.pop("run.json")  # the run's own record gains the weights' identity
    assert after == before


# ------------------------------------------------------------------------------- late failures come first

def test_a_batch_larger_than_the_chunks_is_refused_before_the_untrained_forecast(tiny_full_vocab, sim_file,
                                                                                 tmp_path, capsys):
    out, ledger = tmp_path / "out", tmp_path / "ledger.jsonl"
    Ledger(ledger).charge("earlier", 777, "train")
    argv = stage_args(tiny_full_vocab, sim_file, out, ledger) + ["--batch-size", "1000", "--context-length", "48",
                                                                  "--max-steps", "2"]
    code, err, _ = run(lora_default.main, argv, capsys)
    one_line(code, err, "--batch-size 1000", "chunks")
    assert Ledger(ledger).total() == 777 and not (out / "untrained.json").exists()


def test_a_batch_torchrun_cannot_share_is_refused(monkeypatch):
    chunks = make_chunks([list(range(1, 40))] * 4, 8)
    from experiments.lib.settings import TrainSettings

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UsageError, match=r"--batch-size 3: .* 2 processes .* divisible by 2"):
        runs.check_batch(chunks, TrainSettings(batch_size=3, context_length=8))
    runs.check_batch(chunks, TrainSettings(batch_size=4, context_length=8))


# ------------------------------------------------------------------------------------ experiments.train input

def _chunk_file(path, ids, mask):
    from safetensors.torch import save_file

    save_file({"input_ids": ids.contiguous(), "attention_mask": mask.contiguous()}, str(path))
    return path


CHUNK_CASES = {
    "all-zero mask": (lambda ids, mask: (ids, torch.zeros_like(mask)), ["chunks.safetensors", "no token to predict"]),
    "id past the vocabulary": (lambda ids, mask: (ids.index_fill(1, torch.tensor([3]), 500), mask),
                               ["chunks.safetensors", "token id 500", "0..127"]),
    "negative id": (lambda ids, mask: (ids.index_fill(1, torch.tensor([0]), -1), mask), ["token id -1"]),
    "shapes differ": (lambda ids, mask: (ids, mask[:, :8]), ["chunks.safetensors", "same shape"]),
    "3-D ids": (lambda ids, mask: (ids[None], mask[None]), ["chunks.safetensors", "[chunks, tokens]"]),
    "mask of 2s": (lambda ids, mask: (ids, mask * 2), ["attention_mask", "0 and 1"]),
    "other width": (lambda ids, mask: (ids[:, :12], mask[:, :12]), ["--context-length 16", "12 tokens"]),
    "batch too large": (None, ["--batch-size 100", "18 chunks"]),
}


@pytest.mark.parametrize("case", list(CHUNK_CASES))
def test_experiments_train_refuses_chunks_it_cannot_learn_from(tiny_dir, tmp_path, capsys, case):
    g = torch.Generator().manual_seed(2)
    chunks = make_chunks([torch.randint(1, 128, (40,), generator=g).tolist() for _ in range(6)], 16)
    edit, words = CHUNK_CASES[case]
    assert len(chunks) == 18
    ids, mask = (chunks.input_ids, chunks.attention_mask) if edit is None else edit(chunks.input_ids,
                                                                                      chunks.attention_mask)
    path = _chunk_file(tmp_path / "chunks.safetensors", ids, mask)
    ledger = tmp_path / "ledger.jsonl"
    Ledger(ledger).charge("earlier", 777, "train")
    before = checksums(tmp_path)
    code, err, _ = run(train_cli.main, ["--model", str(tiny_dir), "--train-chunks", str(path), "--out",
                                        str(tmp_path / "run"), "--ledger", str(ledger), "--context-length", "16",
                                        "--batch-size", "100" if case == "batch too large" else "2", "--max-steps",
                                        "2", "--no-progress", "--precision", "float32"], capsys)
    one_line(code, err, *words)
    assert checksums(tmp_path) == before and not (tmp_path / "run").exists()


@pytest.mark.parametrize("change", [["--lr", "0.5"], ["--rank", "4"], ["--seed", "3"], ["--loss-vocabulary",
                                                                                         "numeric"], "data"])
def test_resume_with_changed_settings_is_one_line(tiny_dir, tmp_path, capsys, change):
    g = torch.Generator().manual_seed(2)
    save_chunks(make_chunks([torch.randint(1, 128, (40,), generator=g).tolist() for _ in range(6)], 16),
                tmp_path / "chunks.safetensors")
    ledger = tmp_path / "ledger.jsonl"
    argv = ["--model", str(tiny_dir), "--train-chunks", str(tmp_path / "chunks.safetensors"), "--out",
            str(tmp_path / "run"), "--ledger", str(ledger), "--context-length", "16", "--batch-size", "2",
            "--checkpoint-every", "1", "--eval-every", "0", "--no-progress", "--precision", "float32", "--rank", "2",
            "--lr", "0.01"]
    assert train_cli.main([*argv, "--max-steps", "2"]) == 0
    if change == "data":
        g = torch.Generator().manual_seed(3)
        save_chunks(make_chunks([torch.randint(1, 128, (40,), generator=g).tolist() for _ in range(6)], 16),
                    tmp_path / "chunks.safetensors")
        change = []
    before, ledger_before = checksums(tmp_path / "run"), ledger.read_text()
    code, err, _ = run(train_cli.main, [*argv, *change, "--max-steps", "4", "--resume"], capsys)
    if change and change[0] == "--loss-vocabulary":  # numeric needs a tokenizer's alphabet: refused either way
        assert code == 2 and len(err.strip().splitlines()) == 1, err
    else:
        one_line(code, err, "checkpoint", "differ" if not change else "cannot resume with different settings")
    assert checksums(tmp_path / "run") == before and ledger.read_text() == ledger_before


# -------------------------------------------------------------------------------------- data, weights, env

def test_all_zero_trajectories_are_one_line_naming_the_file(tmp_path, capsys):
    traj, time = simulate(n_systems=20, n_steps=30, seed=0)
    write_h5(tmp_path / "zeros.h5", np.zeros_like(traj), time)
    before = checksums(tmp_path)
    code, err, _ = run(baseline.main, ["--model", str(tmp_path / "m"), "--data", str(tmp_path / "zeros.h5"),
                                       "--out", str(tmp_path / "out"), "--ledger", str(tmp_path / "l.jsonl")],
                       capsys)
    one_line(code, err, str(tmp_path / "zeros.h5"), "LLMTIME scale")
    assert checksums(tmp_path) == before and not (tmp_path / "out").exists()


def test_a_tokenizer_with_more_ids_than_the_model_is_refused_at_load(tiny_dir, tokenizer_dir, setup, tmp_path,
                                                                       capsys):
    assert (tiny_dir / "tokenizer.json").read_bytes() == (tokenizer_dir / "tokenizer.json").read_bytes()
    before = checksums(setup)
    code, err, _ = run(baseline.main, ["--model", str(tiny_dir), "--data", str(setup / "lv.h5"), "--out",
                                       str(tmp_path / "out"), "--ledger", str(setup / "ledger.jsonl"), "--limit", "1",
                                       "--context-steps", "5", "--horizon", "2", "--precision", "float32"], capsys)
    one_line(code, err, "vocab_size 128", "151", "tokenizer.json")
    assert checksums(setup) == before


@pytest.mark.parametrize("environ", [{"SLURM_ARRAY_TASK_ID": "abc", "SLURM_ARRAY_TASK_COUNT": "2"},
                                     {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "two"},
                                     {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "2",
                                      "SLURM_ARRAY_TASK_MIN": "x"}])
def test_a_bad_slurm_array_variable_is_one_line(setup, tmp_path, capsys, monkeypatch, environ):
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    bad = next(name for name, value in environ.items() if not value.isdigit())
    code, err, _ = run(sweep.main, ["--model", str(tmp_path / "m"), "--data", str(setup / "lv.h5"), "--out",
                                    str(tmp_path / "out"), "--ledger", str(setup / "ledger.jsonl")], capsys)
    one_line(code, err, bad, "SLURM")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------- decoding numbers

@pytest.mark.parametrize("text, alpha", [("1e308,1.0", 10.0), ("1.0,9e307", 4.0), ("١٢,1.0", 1.0),
                                         ("1.0,٣.٥", 1.0), ("۱.۰,1", 1.0), ("1.0,1e400", 1.0)])
def test_decode_refuses_overflow_and_other_scripts_digits(text, alpha):
    decoded = decode(text, alpha, expected_steps=1)
    assert decoded.n_invalid == 1 and not decoded.complete and np.isnan(decoded.values).all()


def test_decode_values_unchanged_for_ordinary_text():
    decoded = decode("1.23,0.45;10.5,3", 2.5, expected_steps=2)
    assert decoded.complete and decoded.values.tolist() == (np.array([[1.23, 0.45], [10.5, 3.0]]) * 2.5).tolist()
    decoded = decode("123,45", 2.5, encoding="integer", decimals=2)
    assert decoded.complete and decoded.values.tolist() == [[1.23 * 2.5, 0.45 * 2.5]]


# ----------------------------------------------------------------------------------------------- the report

def test_report_on_a_results_json_without_its_selection_is_one_line(tmp_path, capsys):
    from conftest import REPO

    results = tmp_path / "results"
    (results / "sweep").mkdir(parents=True)
    raw = json.loads((REPO / "results" / "sweep_cpu" / "results.json").read_text())
    del raw["details"]["selection"]
    (results / "sweep" / "results.json").write_text(json.dumps(raw))
    (results / "flops_ledger.jsonl").write_text("")
    before = checksums(tmp_path)
    code, err, _ = run(report.main, ["--results", str(results), "--out", str(tmp_path / "REPORT.md")], capsys)
    one_line(code, err, str(results / "sweep" / "results.json"), "details.selection")
    assert checksums(tmp_path) == before and not (tmp_path / "REPORT.md").exists()


# ----------------------------------------------------------------------------------------------- the ledger

def test_a_fifo_as_the_ledger_is_refused_not_read(setup, tmp_path, capsys):
    fifo = tmp_path / "ledger.fifo"
    os.mkfifo(fifo)
    with pytest.raises(LedgerError, match="FIFO"):
        Ledger(fifo)
    code, err, _ = run(baseline.main, ["--model", str(tmp_path / "m"), "--data", str(setup / "lv.h5"), "--out",
                                       str(tmp_path / "out"), "--ledger", str(fifo)], capsys)
    one_line(code, err, str(fifo), "not a regular file", "--ledger")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("spent, planned", [(10**17, 1), (10**17 - 1, 2), (99_990 * 10**12, 20 * 10**12)])
def test_the_budget_message_shows_the_difference(tmp_path, spent, planned):
    ledger = Ledger(tmp_path / "ledger.jsonl")
    ledger.charge("earlier", spent, "train")
    with pytest.raises(BudgetExceededError) as info:
        ledger.check(planned)
    import re

    message = str(info.value)
    start, end, budget = re.search(r"from (\S+) to (\S+), over the budget of (\S+) by", message).groups()
    assert start != end and end != budget, message


# --------------------------------------------------------------------------------------------- atomic modes

def test_atomic_writes_keep_the_mode_or_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        new = atomic_write(tmp_path / "new.txt", "x")
        assert stat.S_IMODE(new.stat().st_mode) == 0o640
        shared = tmp_path / "shared.jsonl"
        shared.write_text("")
        os.chmod(shared, 0o664)
        atomic_write(shared, "y")
        assert stat.S_IMODE(shared.stat().st_mode) == 0o664 and shared.read_text() == "y"
        atomic_write(tmp_path / "by_fn.bin", lambda tmp: tmp.write_bytes(b"z"))
        assert stat.S_IMODE((tmp_path / "by_fn.bin").stat().st_mode) == 0o640
    finally:
        os.umask(old)
    ledger = Ledger(tmp_path / "group.jsonl")
    (tmp_path / "group.jsonl").write_text("")
    os.chmod(tmp_path / "group.jsonl", 0o660)
    ledger.charge("x", 1, "train")
    assert stat.S_IMODE((tmp_path / "group.jsonl").stat().st_mode) == 0o660


def test_a_full_disk_names_the_file_it_could_not_write(tmp_path, monkeypatch, capsys):
    """ENOSPC comes with no file name: atomic writes, CSVs and PNGs re-raise it naming their file, and a stage
    reports it as one line naming that path (checked by hand on a full tmpfs as well)."""
    import errno

    import matplotlib.figure

    from experiments import flops
    from experiments.lib.evaluation import write_csv
    from experiments.lib.plots import _save
    from miniqwen.atomic import naming

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError) as info:
        with naming(tmp_path / "a.png"):
            full()
    assert info.value.filename == str(tmp_path / "a.png") and info.value.errno == errno.ENOSPC
    with pytest.raises(OSError) as info:
        atomic_write(tmp_path / "results.json", full)
    assert info.value.filename == str(tmp_path / "results.json") and not list(tmp_path.glob(".*.tmp"))
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full)
    with pytest.raises(OSError) as info:
        _save(matplotlib.figure.Figure(), tmp_path / "p.png", 110)
    assert info.value.filename == str(tmp_path / "p.png")
    monkeypatch.setattr("csv.DictWriter.writerows", full)
    with pytest.raises(OSError) as info:
        write_csv(tmp_path / "t.csv", [{"a": 1}])
    assert info.value.filename == str(tmp_path / "t.csv")
    monkeypatch.setattr("miniqwen.atomic.os.fsync", full)  # the stage's own write, through run_cli
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: flops.main(["--out", str(tmp_path / "f")]))
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err == f"error: {tmp_path / 'f' / 'run.json'}: No space left on device"


# ------------------------------------------------------------------------------------- messages and choices

def test_classical_honours_split(setup, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--data", str(setup / "lv.h5"), "--out", str(out), "--ledger", str(setup / "ledger.jsonl"), "--split",
            "train", "--limit", "3", "--context-steps", "12", "--horizon", "3", "--orders", "1,2", "--no-ode",
            "--plots", "0"]
    assert classical.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert {k.split("/")[1] for k in results["evaluations"]} == {"train"}
    assert results["settings"]["forecast"]["split"] == "train" and results["settings"]["splits"] == ["train"]


def test_baseline_plots_0_says_no_png_and_no_progress_shows_no_bars(tiny_full_vocab, sim_file, tmp_path, capsys):
    out = tmp_path / "out"
    argv = stage_args(tiny_full_vocab, sim_file, out, tmp_path / "ledger.jsonl") + ["--plots", "0", "--loss-limit",
                                                                                      "0"]
    assert baseline.main(argv) == 0
    captured = capsys.readouterr()
    wrote = [line for line in captured.out.splitlines() if line.startswith("wrote ")]
    assert wrote and "forecasts.png" not in wrote[-1] and "results.json" in wrote[-1]
    assert not (out / "forecasts.png").exists()
    assert "forecasting (" not in captured.err and "decoding" not in captured.err


def test_a_tie_in_the_grid_is_said():
    row = {"forecast_mse": 1.0, "val_loss": 2.0}
    rows = [{**row, "lr": 1e-3, "rank": 2}, {**row, "lr": 1e-3, "rank": 4, "val_loss": 1.0},
            {**row, "lr": 1e-2, "rank": 2, "forecast_mse": 3.0}]
    chosen = grid.selection(rows)
    assert chosen["chosen"] == {"lr": 1e-3, "rank": 2} and chosen["tied_with"] == [{"lr": 1e-3, "rank": 4}]
    note = tables.tie_note(chosen)
    assert "Tie" in note and "lr 0.001, rank 4" in note and "first in grid order" in note
    rows[1]["forecast_mse"] = 1.5
    assert grid.selection(rows)["tied_with"] == [] and tables.tie_note(grid.selection(rows)) == ""
