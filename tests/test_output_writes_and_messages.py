"""What a stage writes and what it says: atomic writes keep a file's mode or follow the umask, a full disk or a
read-only ``--out`` stops a stage with one line naming the path before anything is spent or charged, the budget
message shows the difference between the totals it names, and a tie in the grid is said."""

from __future__ import annotations

import os
import stat

import pytest

from conftest import baseline_args, cli, refused, snapshot
from experiments import baseline
from experiments import sweep
from experiments.lib import tables
from experiments.lib.budget import BudgetExceededError, Ledger
from experiments.lib.cli import run_cli
from miniqwen.atomic import atomic_write


# ---------------------------------------------------------------------------------------------- files a stage writes

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


# ---------------------------------------------------------------------------------------------------------- messages

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


def test_a_tie_in_the_grid_is_said():
    row = {"forecast_mse": 1.0, "val_loss": 2.0}
    rows = [{**row, "lr": 1e-3, "rank": 2}, {**row, "lr": 1e-3, "rank": 4, "val_loss": 1.0},
            {**row, "lr": 1e-2, "rank": 2, "forecast_mse": 3.0}]
    chosen = sweep.selection(rows)
    assert chosen["chosen"] == {"lr": 1e-3, "rank": 2} and chosen["tied_with"] == [{"lr": 1e-3, "rank": 4}]
    note = tables.tie_note(chosen)
    assert "Tie" in note and "lr 0.001, rank 4" in note and "first in grid order" in note
    rows[1]["forecast_mse"] = 1.5
    assert sweep.selection(rows)["tied_with"] == [] and tables.tie_note(sweep.selection(rows)) == ""
