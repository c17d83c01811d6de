"""A training checkpoint is verified before it is trusted: a damaged or edited one (adapter, optimizer, RNG state,
state.json) is one clear error naming the file and is never resumed, and nothing in it is overwritten; a new
checkpoint replaces the old one only once verified; lost state is never a silent restart; a checkpoint
without its state.json checksum is refused; and Ctrl-C charges the steps it discards."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import exit_err, tiny_run, train_stage_argv
from experiments.lib.budget import Ledger
from experiments.lib.settings import LoRASettings
from experiments.lib.training import CheckpointError, read_log, train_lora as train


# ----------------------------------------------------------------------------------------------- damaged checkpoints

@pytest.mark.parametrize("damage", ["flip adapter bytes", "truncate optimizer", "empty rng", "garble state",
                                    "delete state", "empty best adapter"])
def test_a_damaged_checkpoint_is_a_clear_error_and_is_never_resumed(tmp_path, damage):
    model, chunks, settings = tiny_run(tmp_path)
    out = tmp_path / "run"
    train(model, chunks, chunks, settings, out, lora=LoRASettings(rank=2))
    ckpt = out / "checkpoint"
    target = {"flip adapter bytes": "adapter.safetensors", "truncate optimizer": "optimizer.safetensors",
              "empty rng": "rng.safetensors", "garble state": "state.json", "delete state": "state.json",
              "empty best adapter": "best_adapter.safetensors"}[damage]
    data = (ckpt / target).read_bytes()
    if damage == "flip adapter bytes":
        data = data[:-8] + bytes(b ^ 0xFF for b in data[-8:])
    elif damage == "truncate optimizer":
        data = data[: len(data) // 2]
    elif damage == "garble state":
        data = b"{not json"
    else:
        data = b""
    if damage == "delete state":
        (ckpt / target).unlink()
    else:
        (ckpt / target).write_bytes(data)
    saved = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    model2, _, settings2 = tiny_run(tmp_path, max_steps=6)
    with pytest.raises(CheckpointError) as info:
        train(model2, chunks, chunks, settings2, out, lora=LoRASettings(rank=2), resume=True)
    message = str(info.value)
    assert (target in message) or ("nothing to resume" in message and "lost" in message)
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == saved  # nothing was overwritten


def test_a_new_checkpoint_replaces_the_old_only_when_verified(tmp_path, monkeypatch):
    from experiments.lib.training import checkpoint as ckpt_module

    model, chunks, settings = tiny_run(tmp_path, max_steps=4, checkpoint_every=2)
    out = tmp_path / "run"
    calls = {"n": 0}
    real = ckpt_module.read_checkpoint

    def failing_verify(path):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint (step 4) fails its verification
            raise CheckpointError(f"{path}: simulated corrupt write")
        return real(path)

    monkeypatch.setattr(ckpt_module, "read_checkpoint", failing_verify)
    with pytest.raises(CheckpointError, match="simulated"):
        train(model, chunks, chunks, settings, out, lora=LoRASettings(rank=2))
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["loop"]["step"] == 2  # the previous good checkpoint is still the checkpoint


def test_resume_with_nothing_to_resume_says_so(tmp_path):
    model, chunks, settings = tiny_run(tmp_path)
    with pytest.raises(CheckpointError, match="nothing to resume"):
        train(model, chunks, chunks, settings, tmp_path / "fresh", lora=LoRASettings(rank=2), resume=True)


def test_lost_state_after_training_is_not_a_silent_restart(tmp_path):
    model, chunks, settings = tiny_run(tmp_path)
    out = tmp_path / "run"
    train(model, chunks, chunks, settings, out, lora=LoRASettings(rank=2))
    shutil.rmtree(out / "checkpoint")
    model2, _, _ = tiny_run(tmp_path)
    with pytest.raises(CheckpointError, match="lost"):
        train(model2, chunks, chunks, settings, out, lora=LoRASettings(rank=2), resume=True)


def test_resume_from_a_corrupt_checkpoint_exits_2_and_changes_nothing(setup, tiny_dir, tmp_path, capsys):
    from experiments import train as train_cli

    ledger = tmp_path / "ledger.jsonl"
    argv = train_stage_argv(tiny_dir, tmp_path, ledger)
    assert train_cli.main([*argv, "--max-steps", "2"]) == 0
    adapter = tmp_path / "run" / "checkpoint" / "adapter.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:-4] + b"\x00\x00\x80\x7f")  # last weight becomes inf
    ledger_before = ledger.read_text()
    code, err = exit_err(train_cli.main, [*argv, "--max-steps", "4", "--resume"], capsys)
    assert code == 2 and "adapter.safetensors" in err and "checksum" in err, err
    assert ledger.read_text() == ledger_before


# ---------------------------------------------------------------------------------------------- an edited state.json

def _edit_state(state: dict, edit: str) -> dict:
    if edit.startswith("no checksum"):  # refused for that alone, whatever else is edited
        state.pop("state_sha256")
        edit = edit.removeprefix("no checksum").removeprefix(", ")
    if edit == "step 1000":
        state["loop"]["step"] = 1000
    elif edit == "step -3":
        state["loop"]["step"] = -3
    elif edit == "unknown key":
        state["loop"]["steps_done"] = 4
    elif edit == "no rng":
        del state["rng"]
    elif edit == "no settings":
        del state["settings"]
    return state


@pytest.mark.parametrize("edit", ["step 1000", "step -3", "unknown key", "no rng", "no settings", "no checksum",
                                  "no checksum, step 1000", "no checksum, step -3",
                                  "no checksum, unknown key", "no checksum, no rng", "no checksum, no settings"])
def test_an_edited_state_json_is_refused_not_believed(tmp_path, edit):
    model, chunks, settings = tiny_run(tmp_path)
    out = tmp_path / "run"
    train(model, chunks, chunks, settings, out, lora=LoRASettings(rank=2))
    file = out / "checkpoint" / "state.json"
    file.write_text(json.dumps(_edit_state(json.loads(file.read_text()), edit)))
    saved = {p.name: p.read_bytes() for p in (out / "checkpoint").iterdir()}
    model2, _, settings2 = tiny_run(tmp_path, max_steps=6)
    with pytest.raises(CheckpointError) as info:
        train(model2, chunks, chunks, settings2, out, lora=LoRASettings(rank=2), resume=True)
    message = str(info.value)
    assert "state.json" in message and "\n" not in message, message
    if edit.startswith("no checksum"):  # every checkpoint the project wrote has it (the committed ones included)
        assert "state.json: no checksum" in message, message
    assert {p.name: p.read_bytes() for p in (out / "checkpoint").iterdir()} == saved


def test_an_edited_state_json_exits_2_naming_it_and_changes_nothing(setup, tiny_dir, tmp_path, capsys):
    from experiments import train as train_cli

    ledger = tmp_path / "ledger.jsonl"
    argv = train_stage_argv(tiny_dir, tmp_path, ledger)
    assert train_cli.main([*argv, "--max-steps", "2"]) == 0
    file = tmp_path / "run" / "checkpoint" / "state.json"
    state = json.loads(file.read_text())
    state["loop"]["step"] = 1000
    file.write_text(json.dumps(state))
    before = {p: p.read_bytes() for p in sorted((tmp_path / "run").rglob("*")) if p.is_file()}
    ledger_before = ledger.read_text()
    code, err = exit_err(train_cli.main, [*argv, "--max-steps", "4", "--resume"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and str(file) in err and "checksum" in err, err
    assert ledger.read_text() == ledger_before
    assert {p: p.read_bytes() for p in sorted((tmp_path / "run").rglob("*")) if p.is_file()} == before


# ---------------------------------------------------------------------------------------------- interrupted training

def test_ctrl_c_charges_the_steps_since_the_last_checkpoint_as_discarded(tmp_path):
    """Stopped by Ctrl-C after step 3 with checkpoints every 2 steps, the run charges step 3 (marked discarded)
    before it stops; resumed from step 2 it charges steps 3 and 4 again, so the ledger holds the uninterrupted
    run's FLOPs plus the discarded step, and the resumed weights equal the uninterrupted run's."""
    model, chunks, settings = tiny_run(tmp_path)

    def ctrl_c(step):
        if step == 3:
            raise KeyboardInterrupt

    ledger = Ledger(tmp_path / "ledger.jsonl")
    with pytest.raises(KeyboardInterrupt):
        train(model, chunks, chunks, settings, tmp_path / "run", lora=LoRASettings(rank=2), ledger=ledger,
              on_step=ctrl_c)
    discarded = [e for e in ledger.entries() if "discarded" in e]
    assert [(e["kind"], e["step"]) for e in discarded] == [("train", 3)]
    model2, _, _ = tiny_run(tmp_path)
    resumed = train(model2, chunks, chunks, settings, tmp_path / "run", lora=LoRASettings(rank=2), ledger=ledger,
                    resume=True)
    whole_ledger = Ledger(tmp_path / "whole.jsonl")
    model3, _, _ = tiny_run(tmp_path)
    whole = train(model3, chunks, chunks, settings, tmp_path / "whole", lora=LoRASettings(rank=2),
                  ledger=whole_ledger)
    log = read_log(tmp_path / "whole" / "log.jsonl")
    after_2 = [e for e in log if e["step"] == 2][-1]  # step 2 and its evaluation: charged at the checkpoint
    step_3 = [e for e in log if e["kind"] == "train" and e["step"] == 3][0]
    assert discarded[0]["flops"] == step_3["flops_so_far"] - after_2["flops_so_far"] > 0
    assert resumed["total_flops"] == whole["total_flops"]
    assert ledger.total() == whole_ledger.total() + discarded[0]["flops"]
    for (name, a), (_, b) in zip(model2.state_dict().items(), model3.state_dict().items()):
        assert torch.equal(a, b), name
