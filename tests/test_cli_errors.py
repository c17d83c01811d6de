"""Bad command-line values and broken run state end in one clear line and exit status 2, before any model is loaded
or any FLOP is spent, and nothing already on disk (results, ledger, checkpoints) changes."""

import json
import os
import shutil

import pytest
import torch

from data.chunks import make_chunks
from data.simulate import simulate, write_h5
from experiments import baseline, lora_default
from experiments.lib.budget import Ledger
from experiments.lib.settings import LoRASettings, TrainSettings
from experiments.lib.cli import run_cli
from experiments.lib.training import CheckpointError, read_log, train_lora as train
from miniqwen import Qwen2Config, Qwen2ForCausalLM


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    write_h5(root / "lv.h5", *simulate(n_systems=20, n_steps=30, seed=0))
    Ledger(root / "ledger.jsonl").charge("earlier", 12345, "train")
    return root


BASELINE = [
    (["--gen-batch-size", "-1"], "--gen-batch-size"), (["--gen-batch-size", "0"], "--gen-batch-size"),
    (["--decimals", "-1"], "--decimals"), (["--samples", "0"], "--samples"), (["--samples", "-2"], "--samples"),
    (["--loss-context-length", "0"], "--loss-context-length"), (["--loss-batch-size", "0"], "--loss-batch-size"),
    (["--top-p", "0"], "--top-p"), (["--scale-quantile", "2"], "--scale-quantile"),
    (["--scale-target", "0"], "--scale-target"), (["--device", "banana"], "--device"), (["--seed", "-1"], "--seed"),
    (["--plots", "-1"], "--plots"), (["--limit", "-1"], "--limit"), (["--loss-limit", "-1"], "--loss-limit"),
    (["--temperature", "-1", "--samples", "3"], "--temperature"), (["--context-steps", "0"], "--context-steps"),
    (["--horizon", "0"], "--horizon"), (["--temperature", "nan", "--samples", "2"], "--temperature"),
]
if not torch.cuda.is_available():
    BASELINE.append((["--device", "cuda"], "--device"))

LORA = [
    (["--lr", "-1"], "--lr"), (["--lr", "nan"], "--lr"), (["--rank", "0"], "--rank"), (["--rank", "-2"], "--rank"),
    (["--lora-alpha", "0"], "--lora-alpha"), (["--context-length", "1"], "--context-length"),
    (["--batch-size", "0"], "--batch-size"), (["--max-steps", "0"], "--max-steps"), (["--stride", "0"], "--stride"),
    (["--stride", "-5"], "--stride"), (["--targets", "nonsense"], "--targets"), (["--targets", ","], "--targets"),
    (["--eval-every", "-1"], "--eval-every"), (["--checkpoint-every", "0"], "--checkpoint-every"),
    (["--gen-batch-size", "0"], "--gen-batch-size"), (["--weight-decay", "-1"], "--weight-decay"),
    (["--max-grad-norm", "-1"], "--max-grad-norm"), (["--train-limit", "-1"], "--train-limit"),
    (["--limit", "-1"], "--limit"), (["--early-stop", "2", "--eval-every", "0"], "--early-stop"),
    (["--max-steps", "\u0662"], "--max-steps"), (["--lr", "\u0661e-4"], "--lr"),  # other scripts' digits
]


def run(main, argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main(argv))
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("stage,argv,option", [(baseline, a, o) for a, o in BASELINE] +
                         [(lora_default, a, o) for a, o in LORA],
                         ids=[f"baseline{' '.join(a)}" for a, _ in BASELINE] + [f"lora{' '.join(a)}" for a, _ in LORA])
def test_bad_option_is_one_line_before_any_work(setup, tmp_path, capsys, stage, argv, option):
    ledger_before = (setup / "ledger.jsonl").read_text()
    out = tmp_path / "out"
    # the model does not exist: an error about it would mean the option was not checked first
    code, err = run(stage.main, ["--model", str(tmp_path / "no-model"), "--data", str(setup / "lv.h5"),
                                 "--out", str(out), "--ledger", str(setup / "ledger.jsonl"), *argv], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and option in lines[0], err
    assert "no-model" not in err
    assert (setup / "ledger.jsonl").read_text() == ledger_before
    assert not out.exists()


def tiny_run(tmp_path, **overrides):
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    g = torch.Generator().manual_seed(1)
    chunks = make_chunks([torch.randint(1, 64, (40,), generator=g).tolist() for _ in range(6)], 16)
    settings = TrainSettings(**{**dict(lr=1e-2, batch_size=2, context_length=16, max_steps=4, eval_every=2,
                                       eval_batches=1, checkpoint_every=2, progress=False), **overrides})
    return model, chunks, settings


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


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from conftest import write_tiny_checkpoint

    path = tmp_path_factory.mktemp("tiny")
    write_tiny_checkpoint(path, tie=True)
    return path


def _break(model_dir, case):
    config = json.loads((model_dir / "config.json").read_text())
    if case == "zero heads":
        config["num_attention_heads"] = 0
    elif case == "zero kv heads":
        config["num_key_value_heads"] = 0
    if case == "config is a list":
        (model_dir / "config.json").write_text("[1, 2]")
    elif case == "empty tokenizer":
        (model_dir / "tokenizer.json").write_text("{}")
    elif case == "weight_map not a dict":
        (model_dir / "model.safetensors").rename(model_dir / "model-00001-of-00001.safetensors")
        (model_dir / "model.safetensors.index.json").write_text('{"weight_map": [1, 2]}')
    else:
        (model_dir / "config.json").write_text(json.dumps(config))
    return {"zero heads": "num_attention_heads", "zero kv heads": "num_key_value_heads",
            "config is a list": "config.json", "empty tokenizer": "tokenizer.json",
            "weight_map not a dict": "weight_map"}[case]


@pytest.mark.parametrize("case", ["zero heads", "zero kv heads", "config is a list", "empty tokenizer",
                                  "weight_map not a dict"])
def test_broken_weights_directory_is_one_line(setup, tiny_dir, tmp_path, capsys, case):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_dir, model_dir)
    expected = _break(model_dir, case)
    ledger_before = (setup / "ledger.jsonl").read_text()
    code, err = run(baseline.main, ["--model", str(model_dir), "--data", str(setup / "lv.h5"), "--out",
                                    str(tmp_path / "out"), "--ledger", str(setup / "ledger.jsonl"), "--limit", "1",
                                    "--context-steps", "5", "--horizon", "2"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and expected in err, err
    assert (setup / "ledger.jsonl").read_text() == ledger_before


def test_resume_from_a_corrupt_checkpoint_exits_2_and_changes_nothing(setup, tiny_dir, tmp_path, capsys):
    from experiments import train as train_cli
    from experiments.train import save_chunks

    g = torch.Generator().manual_seed(2)
    save_chunks(make_chunks([torch.randint(1, 128, (40,), generator=g).tolist() for _ in range(6)], 16),
                tmp_path / "chunks.safetensors")
    ledger = tmp_path / "ledger.jsonl"
    argv = ["--model", str(tiny_dir), "--train-chunks", str(tmp_path / "chunks.safetensors"), "--out",
            str(tmp_path / "run"), "--ledger", str(ledger), "--context-length", "16", "--batch-size", "2",
            "--checkpoint-every", "1", "--eval-every", "0", "--no-progress", "--precision", "float32"]
    assert train_cli.main([*argv, "--max-steps", "2"]) == 0
    adapter = tmp_path / "run" / "checkpoint" / "adapter.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:-4] + b"\x00\x00\x80\x7f")  # last weight becomes inf
    ledger_before = ledger.read_text()
    code, err = run(train_cli.main, [*argv, "--max-steps", "4", "--resume"], capsys)
    assert code == 2 and "adapter.safetensors" in err and "checksum" in err, err
    assert ledger.read_text() == ledger_before


# ------------------------------------------------------------------------------- issue 20: silent wrong results

def _edit_state(state: dict, edit: str) -> dict:
    if edit.startswith("legacy "):  # a checkpoint written before state.json had its own checksum
        state.pop("state_sha256")
        edit = edit.removeprefix("legacy ")
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


@pytest.mark.parametrize("edit", ["step 1000", "step -3", "unknown key", "no rng", "no settings",
                                  "legacy step 1000", "legacy step -3", "legacy unknown key", "legacy no rng",
                                  "legacy no settings"])
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
    assert {p.name: p.read_bytes() for p in (out / "checkpoint").iterdir()} == saved


def test_a_checkpoint_written_before_the_state_checksum_still_resumes(tmp_path):
    model, chunks, settings = tiny_run(tmp_path)
    out = tmp_path / "run"
    train(model, chunks, chunks, settings, out, lora=LoRASettings(rank=2))
    file = out / "checkpoint" / "state.json"
    state = json.loads(file.read_text())
    state.pop("state_sha256")
    file.write_text(json.dumps(state))
    model2, _, settings2 = tiny_run(tmp_path, max_steps=6)
    summary = train(model2, chunks, chunks, settings2, out, lora=LoRASettings(rank=2), resume=True)
    assert summary["steps"] == 6


def test_an_edited_state_json_exits_2_naming_it_and_changes_nothing(setup, tiny_dir, tmp_path, capsys):
    from experiments import train as train_cli
    from experiments.train import save_chunks

    g = torch.Generator().manual_seed(2)
    save_chunks(make_chunks([torch.randint(1, 128, (40,), generator=g).tolist() for _ in range(6)], 16),
                tmp_path / "chunks.safetensors")
    ledger = tmp_path / "ledger.jsonl"
    argv = ["--model", str(tiny_dir), "--train-chunks", str(tmp_path / "chunks.safetensors"), "--out",
            str(tmp_path / "run"), "--ledger", str(ledger), "--context-length", "16", "--batch-size", "2",
            "--checkpoint-every", "1", "--eval-every", "0", "--no-progress", "--precision", "float32"]
    assert train_cli.main([*argv, "--max-steps", "2"]) == 0
    file = tmp_path / "run" / "checkpoint" / "state.json"
    state = json.loads(file.read_text())
    state["loop"]["step"] = 1000
    file.write_text(json.dumps(state))
    before = {p: p.read_bytes() for p in sorted((tmp_path / "run").rglob("*")) if p.is_file()}
    ledger_before = ledger.read_text()
    code, err = run(train_cli.main, [*argv, "--max-steps", "4", "--resume"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and str(file) in err and "checksum" in err, err
    assert ledger.read_text() == ledger_before
    assert {p: p.read_bytes() for p in sorted((tmp_path / "run").rglob("*")) if p.is_file()} == before


@pytest.mark.parametrize("stage,argv,option", [
    ("final", ["--context-len", "40"], "--context-len"), ("final", ["--max-step", "3"], "--max-step"),
    ("baseline", ["--lim", "3"], "--lim"), ("lora_default", ["--pre", "cpu"], "--pre"),
    ("report", ["--led", "x.jsonl"], "--led"),
])
def test_abbreviated_options_are_refused_not_guessed(setup, tmp_path, capsys, stage, argv, option):
    import importlib

    main = importlib.import_module(f"experiments.{stage}").main
    ledger_before = (setup / "ledger.jsonl").read_text()
    out = tmp_path / "out"
    common = ["--results", str(tmp_path)] if stage == "report" else [
        "--model", str(tmp_path / "no-model"), "--data", str(setup / "lv.h5"), "--ledger",
        str(setup / "ledger.jsonl")]
    code, err = run(main, [*common, "--out", str(out), *argv], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and option in lines[0], err
    assert "no-model" not in err and not out.exists()
    assert (setup / "ledger.jsonl").read_text() == ledger_before


def test_report_refuses_a_ledger_that_is_not_there_or_not_a_file(tmp_path, capsys):
    from experiments import report

    results = tmp_path / "results"
    results.mkdir()
    (results / "flops_ledger.jsonl").write_text("")
    fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo)
    for ledger, words in ((tmp_path / "flops_ledgr.jsonl", ["--ledger", "flops_ledgr.jsonl", "no such file"]),
                          (fifo, ["--ledger", "fifo.jsonl", "not a regular file"]),
                          (tmp_path, ["--ledger", "not a regular file"])):
        code, err = run(report.main, ["--results", str(results), "--ledger", str(ledger), "--out",
                                      str(tmp_path / "REPORT.md")], capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and all(w in lines[0] for w in words), err
    code, err = run(report.main, ["--results", str(results), "--out", str(tmp_path)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--out" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo.jsonl", "results"]
    assert [p.name for p in results.iterdir()] == ["flops_ledger.jsonl"]  # not even the figures directory


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
