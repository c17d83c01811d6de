"""Beyond one process, on CPU: one training run over 2 processes (torchrun + DDP, gloo) against one process on the
same global batch, a killed rank and its resume (also with another number of processes), the grid's points over
concurrent shard jobs sharing one results directory and one ledger, and the ledger's lock under 2 × 200 appends."""

import json
import os
import signal
import subprocess
import sys
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, write_tiny_checkpoint
from data.chunks import make_chunks
from experiments import sweep
from experiments.sweep import shard_of
from experiments.lib.budget import Ledger
from experiments.lib.settings import TrainSettings
from experiments.lib.errors import UsageError
from experiments.train import save_chunks
from experiments.lib.training import read_log

L = 16
#: subprocesses: one thread each (bit-reproducible between runs), never sharded by a SLURM array around the tests
ENV = {**{k: v for k, v in os.environ.items() if not k.startswith("SLURM_ARRAY")}, "OMP_NUM_THREADS": "1",
       "PYTHONPATH": str(REPO)}


def launch(module: str, *args, nproc: int | None = None, wait: bool = True, env=None):
    """``python -m module args`` as one process, or under torchrun with ``nproc`` processes (gloo on CPU)."""
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] if nproc else []
    cmd = [sys.executable, *torchrun, "-m", module, *map(str, args)]
    if not wait:
        return subprocess.Popen(cmd, env=env or ENV, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
    return subprocess.run(cmd, env=env or ENV, cwd=REPO, capture_output=True, text=True, timeout=180)


def random_chunks(n_seqs, seed):
    """Chunks of width L cut from random token sequences of random lengths (some rows right padded)."""
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(1, 128, (int(torch.randint(5, 40, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n_seqs)]
    return make_chunks(seqs, L)


# ---------------------------------------------------------------------------------------------------- one run, DDP
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny checkpoint, chunk files (24 training, 10 validation chunks) and the one-process reference run."""
    root = tmp_path_factory.mktemp("ddp")
    write_tiny_checkpoint(root / "model", tie=False)
    save_chunks(random_chunks(13, seed=6), root / "train.safetensors")
    save_chunks(random_chunks(6, seed=7), root / "val.safetensors")

    def train(out, *extra, nproc=None):
        return launch("experiments.train", "--model", root / "model", "--out", root / out, "--ledger",
                      root / f"{out}.jsonl", "--train-chunks", root / "train.safetensors", "--val-chunks",
                      root / "val.safetensors", "--context-length", L, "--batch-size", 4, "--lr", "1e-2",
                      "--max-steps", 8, "--checkpoint-every", 2, "--eval-every", 3, "--eval-batches", 2,
                      "--early-stop", 0, "--no-progress", "--stage", "test", "--device", "cpu", *extra,
                      nproc=nproc)

    done = train("one")
    assert done.returncode == 0, done.stderr
    return root, train


def adapter(run_dir):
    return load_file(str(run_dir / "adapter" / "adapter.safetensors"))


def assert_same_adapter(a, b):
    """Equal within fp32 tolerance: the sums over ranks are taken in another order than one process takes them."""
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=2e-6, msg=k)
    assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k)  # training did move B


def test_two_processes_train_the_same_adapter_and_charge_the_same_flops(tiny):
    root, train = tiny
    done = train("ddp", nproc=2)
    assert done.returncode == 0, done.stdout + done.stderr
    assert_same_adapter(adapter(root / "one"), adapter(root / "ddp"))
    one, ddp = Ledger(root / "one.jsonl"), Ledger(root / "ddp.jsonl")
    assert ddp.total() == one.total() > 0  # FLOPs summed over ranks once; only rank 0 charges
    assert [(e["kind"], e["flops"], e["step"]) for e in ddp.entries()] == \
        [(e["kind"], e["flops"], e["step"]) for e in one.entries()]
    log_one, log_ddp = read_log(root / "one" / "log.jsonl"), read_log(root / "ddp" / "log.jsonl")
    assert [(e["kind"], e["step"], e.get("tokens"), e["flops_so_far"]) for e in log_ddp] == \
        [(e["kind"], e["step"], e.get("tokens"), e["flops_so_far"]) for e in log_one]  # one log, global counts
    for a, b in zip(log_one, log_ddp):
        assert b.get("loss", b.get("val_loss")) == pytest.approx(a.get("loss", a.get("val_loss")), rel=1e-6)
    summary = json.loads((root / "ddp" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["settings"]["batch_size"] == 4  # the global batch


def test_a_killed_rank_stops_the_job_and_resume_finishes_it(tiny):
    root, train = tiny
    killed = train("killed", "--kill-after-step", 5, "--kill-rank", 1, nproc=2)  # checkpoint at step 4
    assert killed.returncode != 0  # torchrun stops rank 0 and reports the failure (no hang: launch() times out)
    assert json.loads((root / "killed" / "checkpoint" / "state.json").read_text())["loop"]["step"] == 4
    resumed = train("killed", "--resume", nproc=2)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert resumed.stderr.count("resuming") == 1  # rank 0 speaks for the run
    assert_same_adapter(adapter(root / "one"), adapter(root / "killed"))
    assert Ledger(root / "killed.jsonl").total() == Ledger(root / "one.jsonl").total()  # nothing lost or doubled
    assert [e["step"] for e in read_log(root / "killed" / "log.jsonl")] == \
        [e["step"] for e in read_log(root / "one" / "log.jsonl")]


def test_a_one_process_run_resumes_on_two_processes(tiny):
    root, train = tiny
    killed = train("switch", "--kill-after-step", 5)
    assert killed.returncode == -signal.SIGKILL
    resumed = train("switch", "--resume", nproc=2)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert_same_adapter(adapter(root / "one"), adapter(root / "switch"))
    assert Ledger(root / "switch.jsonl").total() == Ledger(root / "one.jsonl").total()


def test_global_batch_must_split_evenly_and_non_training_stages_refuse_torchrun(tmp_path, monkeypatch):
    from experiments.lib.session import Session
    from experiments.lib.settings import DataSettings, RunSettings
    from experiments.lib.training import train_lora

    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it; both refusals come before any process group
    chunks = random_chunks(8, seed=1)
    with pytest.raises(UsageError, match="batch size 3 is the global batch.*2 processes"):
        train_lora(None, chunks, None, TrainSettings(batch_size=3, context_length=L), tmp_path)
    with pytest.raises(UsageError, match="does not train"):
        Session("baseline", RunSettings(out=str(tmp_path / "b")), DataSettings())


# ---------------------------------------------------------------------------------------------------- the grid
@pytest.fixture(scope="module")
def grid(tmp_path_factory, tokenizer_dir):
    """A tiny full-vocabulary model, simulated data, and the 2 × 2 grid run by one process."""
    from data.simulate import simulate, write_h5

    root = tmp_path_factory.mktemp("grid")
    write_tiny_checkpoint(root / "model", tie=True, vocab_size=151936, hidden_size=32, intermediate_size=48,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    write_h5(root / "lv.h5", *simulate(n_systems=40, n_steps=30, t_max=60.0, seed=1))

    def args(out):
        return ["--model", root / "model", "--data", root / "lv.h5", "--out", root / out, "--ledger",
                root / f"{out}.jsonl", "--device", "cpu", "--precision", "float32", "--limit", 3,
                "--context-steps", 8, "--horizon", 3, "--gen-batch-size", 2, "--plots", 1, "--batch-size", 2,
                "--context-length", 48, "--eval-batches", 1, "--no-progress", "--lrs", "1e-3,1e-2", "--ranks",
                "2,4", "--max-steps", 4, "--checkpoint-every", 2, "--eval-every", 2]

    done = launch("experiments.sweep", *args("one"))
    assert done.returncode == 0, done.stdout + done.stderr
    return root, args


def test_shards_run_concurrently_and_collect_the_same_table(grid):
    root, args = grid
    # shard 0 by flag, shard 1 as a SLURM array task would be told, at the same time, into one --out and ledger
    slurm = {**ENV, "SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_MIN": "3", "SLURM_ARRAY_TASK_COUNT": "2"}
    jobs = [launch("experiments.sweep", *args("shared"), "--shard", "0/2", wait=False),
            launch("experiments.sweep", *args("shared"), wait=False, env=slurm)]
    outputs = [job.communicate(timeout=180)[0] for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0], outputs
    assert "points lr0.001_rank2, lr0.01_rank2 of 4" in outputs[0]
    assert "points lr0.001_rank4, lr0.01_rank4 of 4" in outputs[1]
    assert not (root / "shared" / "untrained.json").exists()  # the reference is --collect's, computed once

    with pytest.raises(UsageError, match=r"2 of 6 points are not finished.*lr0\.1_rank2, lr0\.1_rank4"):
        sweep.main([str(a) for a in args("shared")] + ["--lrs", "1e-3,1e-2,1e-1", "--collect"])  # last --lrs wins
    done = launch("experiments.sweep", *args("shared"), "--collect")
    assert done.returncode == 0, done.stdout + done.stderr

    one, shared = (json.loads((root / d / "grid.json").read_text()) for d in ("one", "shared"))
    assert shared["rows"] == one["rows"] and shared["selection"] == one["selection"]  # bit-exact
    results = [json.loads((root / d / "results.json").read_text()) for d in ("one", "shared")]
    assert results[1]["details"]["table_markdown"] == results[0]["details"]["table_markdown"]
    assert {k: results[1]["flops"][k] for k in ("train", "eval", "generate", "total")} == \
        {k: results[0]["flops"][k] for k in ("train", "eval", "generate", "total")}
    ledger = Ledger(root / "shared.jsonl")
    assert ledger.total() == Ledger(root / "one.jsonl").total() == results[0]["flops"]["total"]
    charged = Counter(e.get("what") for e in ledger.entries() if e.get("what"))
    assert charged == Counter(["untrained forecast", "untrained validation loss, context 48"]
                              + [f"forecast {r['name']}" for r in one["rows"]])  # each point once


def test_the_sweep_under_torchrun_matches_one_process(grid):
    root, args = grid
    done = launch("experiments.sweep", *args("ddp"), nproc=2)
    assert done.returncode == 0, done.stdout + done.stderr
    one, ddp = (json.loads((root / d / "grid.json").read_text()) for d in ("one", "ddp"))
    for a, b in zip(one["rows"], ddp["rows"]):
        assert b.keys() == a.keys() and b["name"] == a["name"]
        assert {k: v for k, v in b.items() if k != "name"} == pytest.approx({k: v for k, v in a.items()
                                                                              if k != "name"}, rel=1e-5)
    assert Ledger(root / "ddp.jsonl").total() == Ledger(root / "one.jsonl").total()
    assert len(Ledger(root / "ddp.jsonl").entries()) == len(Ledger(root / "one.jsonl").entries())
    summary = json.loads((root / "ddp" / "points" / "lr0.01_rank4" / "training" / "summary.json").read_text())
    assert summary["processes"] == 2


def test_shard_selection():
    assert shard_of("1/3", {}) == (1, 3)
    assert shard_of(None, {}) is None
    assert shard_of(None, {"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "4"}) == (2, 4)
    assert shard_of("0/2", {"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "4"}) == (0, 2)
    for bad in ("3/3", "1", "a/b", "-1/2"):
        with pytest.raises(UsageError, match="--shard"):
            shard_of(bad, {})
    with pytest.raises(UsageError, match="SLURM array"):
        shard_of(None, {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "4"})


def test_ledger_lock_holds_for_two_processes_of_200_appends(tmp_path):
    code = ("import sys\nfrom experiments.lib.budget import Ledger\nledger = Ledger(sys.argv[1])\n"
            "for i in range(200):\n    ledger.charge(sys.argv[2], 1, 'eval', i=i)\n")
    jobs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "ledger.jsonl"), f"job{j}"], env=ENV,
                             cwd=REPO) for j in range(2)]
    assert [job.wait(timeout=120) for job in jobs] == [0, 0]
    entries = Ledger(tmp_path / "ledger.jsonl").entries()
    assert len(entries) == 400 and Ledger(tmp_path / "ledger.jsonl").total() == 400
    for j in range(2):
        assert [e["i"] for e in entries if e["stage"] == f"job{j}"] == list(range(200))
