"""The training runner: masked next-token loss, learning, FLOP charging, checkpoints and bit-identical resume."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, exit_err, train_stage_argv, write_tiny_checkpoint
from data.chunks import make_chunks
from experiments.lib.budget import BUDGET, Ledger
from experiments.lib.costs import training_cost
from experiments.lib.settings import LoRASettings, TrainSettings
from experiments.lib.errors import OptionError
from experiments.train import save_chunks
from experiments.lib.training import next_token_loss, read_log, train_lora as train_loop, validation_loss
from lora import apply_lora, load_adapter, lora_state_dict
from miniqwen import FlopCounter, Qwen2Config, Qwen2ForCausalLM
from miniqwen.flop_count import forward_flops, loss_flops

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2)
L = 16


def tiny_lora_model(seed=0, rank=4):
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(**TINY))
    apply_lora(model, rank=rank)
    return model


def random_chunks(n_seqs, seed, min_len=5, max_len=40):
    """Chunks (width L) cut from random token sequences of random lengths, so some rows are right padded."""
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(1, 128, (int(torch.randint(min_len, max_len, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n_seqs)]
    return make_chunks(seqs, L)


def config(**overrides):
    base = dict(lr=1e-2, batch_size=2, context_length=L, max_steps=6, eval_every=3, eval_batches=2,
                checkpoint_every=2, progress=False)
    base.update(overrides)
    return TrainSettings(**base)


def train(model, train_chunks, val_chunks, settings, out_dir, **kwargs):
    """The training loop under ledger stage "test", with the rank-4 q,v adapters tiny_lora_model attaches."""
    return train_loop(model, train_chunks, val_chunks, settings, out_dir, lora=LoRASettings(rank=4), stage="test",
                      **kwargs)


def test_padded_chunk_has_same_loss_as_unpadded():
    model = tiny_lora_model().eval()
    ids = torch.randint(1, 128, (1, 10), generator=torch.Generator().manual_seed(0))
    padded = torch.cat([ids, torch.zeros(1, 6, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 10), torch.zeros(1, 6)], dim=1).long()
    with torch.no_grad():
        plain_sum, plain_n = next_token_loss(model, ids, torch.ones_like(ids))
        pad_sum, pad_n = next_token_loss(model, padded, mask)
        # explicit reference: mean of -log softmax at the 9 real targets
        logp = torch.log_softmax(model(ids)[0, :-1], dim=-1)
        ref = -logp[torch.arange(9), ids[0, 1:]].sum()
    assert plain_n == pad_n == 9
    torch.testing.assert_close(pad_sum, plain_sum, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(plain_sum, ref, atol=1e-5, rtol=1e-6)
    # padding with other token ids changes nothing either (they are masked, never attended to or predicted)
    other = padded.clone()
    other[0, 10:] = 77
    with torch.no_grad():
        assert torch.equal(next_token_loss(model, other, mask)[0], pad_sum)


def test_loss_flops_counted_per_real_target():
    model = tiny_lora_model().eval()
    ids = torch.randint(1, 128, (2, L))
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    with torch.no_grad(), FlopCounter() as fc:
        next_token_loss(model, ids, mask)
    n = (L - 1) + 9
    assert fc.counts["loss"] == loss_flops(128, n) == n * (11 * 128 + 10) + n
    assert fc.total - fc.counts["loss"] == forward_flops(model.config, 2, L, lora_rank=4)


def test_training_decreases_loss_and_writes_outputs(tmp_path):
    model = tiny_lora_model()
    chunks = random_chunks(3, seed=1, min_len=30, max_len=33)  # few chunks: the model can memorise them
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    summary = train(model, chunks, chunks, config(max_steps=40, eval_every=10, checkpoint_every=20), tmp_path)
    log = read_log(tmp_path / "log.jsonl")
    train_losses = [e["loss"] for e in log if e["kind"] == "train"]
    val_losses = [e["val_loss"] for e in log if e["kind"] == "eval"]
    assert len(train_losses) == 40 and [e["step"] for e in log if e["kind"] == "eval"] == [0, 10, 20, 30, 40]
    assert sum(train_losses[-5:]) / 5 < 0.5 * sum(train_losses[:5]) / 5
    assert val_losses[-1] < 0.5 * val_losses[0]
    assert summary["steps"] == 40 and summary["best_val_loss"] == min(val_losses)
    for k, v in model.state_dict().items():  # only the LoRA matrices moved
        if k in frozen:
            assert torch.equal(v, frozen[k]), k
    for name in ("adapter/adapter.safetensors", "best_adapter/adapter.safetensors", "checkpoint/state.json",
                 "summary.json", "loss_curve.png"):
        assert (tmp_path / name).is_file(), name
    assert not (tmp_path / "checkpoint.tmp").exists()
    # the saved final adapter reproduces the trained model
    fresh = Qwen2ForCausalLM(Qwen2Config(**TINY))
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if "lora_" not in k}, strict=False)
    load_adapter(fresh, tmp_path / "adapter")
    assert all(torch.equal(a, b) for a, b in zip(lora_state_dict(fresh).values(), lora_state_dict(model).values()))


def test_flops_charged_to_ledger(tmp_path):
    model = tiny_lora_model()
    chunks = random_chunks(3, seed=2, min_len=48, max_len=49)  # all rows full: the loss runs on every target
    assert chunks.attention_mask.all()
    ledger = Ledger(tmp_path / "ledger.jsonl")
    cfg = config(max_steps=5, eval_every=2, eval_batches=1, checkpoint_every=2)
    summary = train(model, chunks, chunks, cfg, tmp_path / "run", ledger=ledger)
    step_forward = forward_flops(model.config, 2, L, lora_rank=4) + loss_flops(128, 2 * (L - 1))
    assert summary["train_flops"] == 5 * 3 * step_forward
    evals = 1 + 2 + 1  # step 0, steps 2 and 4, final step 5
    assert summary["eval_flops"] == evals * step_forward  # eval subset = 1 batch of 2 chunks, 1× forward
    # the plan (what a stage checks against the budget before it calls the loop) is what was spent
    assert training_cost(model.config, cfg, LoRASettings(rank=4), summary["val_chunks_evaluated"]) == \
        summary["total_flops"]
    entries = ledger.entries()
    assert {e["stage"] for e in entries} == {"test"}
    assert sum(e["flops"] for e in entries if e["kind"] == "train") == summary["train_flops"]
    assert sum(e["flops"] for e in entries if e["kind"] == "eval") == summary["eval_flops"]
    assert len([e for e in entries if e["kind"] == "train"]) == 3  # checkpoints at steps 2, 4, 5
    log = read_log(tmp_path / "run" / "log.jsonl")
    assert log[-1]["flops_so_far"] == summary["total_flops"]


def test_the_train_stage_prices_its_run_and_refuses_it_past_the_budget(tiny_dir, tmp_path, capsys):
    """The budget is checked once, where a stage prices its work (the loop only trains and charges): past it, the
    train stage exits 2 before --out is written or anything charged."""
    from experiments import train as train_cli

    ledger = Ledger(tmp_path / "ledger.jsonl")
    ledger.charge("earlier", BUDGET, "train")
    before = ledger.path.read_text()
    code, err = exit_err(train_cli.main, [*train_stage_argv(tiny_dir, tmp_path, ledger.path), "--max-steps", "2"],
                         capsys)
    assert code == 2 and "budget" in err.lower() and "--force" in err, err
    assert not (tmp_path / "run").exists() and ledger.path.read_text() == before


def test_an_existing_run_is_protected(tmp_path):
    chunks = random_chunks(4, seed=3)
    train(tiny_lora_model(), chunks, None, config(max_steps=2), tmp_path / "b")
    with pytest.raises(FileExistsError):
        train(tiny_lora_model(), chunks, None, config(max_steps=2), tmp_path / "b")
    with pytest.raises(ValueError, match="lr"):
        train(tiny_lora_model(), chunks, None, config(max_steps=4, lr=1e-3), tmp_path / "b", resume=True)
    with pytest.raises(ValueError, match="width"):
        train(tiny_lora_model(), chunks, None, config(context_length=8), tmp_path / "c")


def test_early_stopping(tmp_path):
    chunks = random_chunks(6, seed=4)
    # a learning rate so small that the weights' effect on the loss vanishes in fp32: no evaluation improves
    summary = train(tiny_lora_model(), chunks, chunks, config(lr=1e-30, max_steps=50, eval_every=1,
                                                              early_stop_patience=3), tmp_path)
    assert summary["stopped_early"] and summary["steps"] == 3 and summary["best_step"] == 0


def test_validation_loss_is_token_mean_over_chunks():
    model = tiny_lora_model().eval()
    chunks = random_chunks(5, seed=5)
    loss, fwd = validation_loss(model, chunks, batch_size=2)
    with torch.no_grad():
        total, n = next_token_loss(model, chunks.input_ids, chunks.attention_mask)
    assert loss == pytest.approx(float(total) / n, rel=1e-5)
    assert fwd > 0


def test_resume_after_kill_is_bit_identical(tmp_path, tokenizer_dir):
    model_dir = tmp_path / "model"
    write_tiny_checkpoint(model_dir, tie=False)
    save_chunks(random_chunks(13, seed=6), tmp_path / "train.safetensors")
    save_chunks(random_chunks(4, seed=7), tmp_path / "val.safetensors")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}

    def run(out, *extra):
        cmd = [sys.executable, "-m", "experiments.train", "--model", str(model_dir), "--out", str(tmp_path / out),
               "--train-chunks", str(tmp_path / "train.safetensors"), "--val-chunks", str(tmp_path / "val.safetensors"),
               "--ledger", str(tmp_path / f"{out}.ledger.jsonl"), "--context-length", str(L), "--batch-size", "3",
               "--lr", "1e-2", "--max-steps", "9", "--checkpoint-every", "2", "--eval-every", "3",
               "--eval-batches", "1", "--early-stop", "0", "--no-progress", "--stage", "test", *extra]
        return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)

    full = run("full")
    assert full.returncode == 0, full.stderr
    killed = run("resumed", "--kill-after-step", "5")  # checkpoint at 4, step 5 is lost and redone
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    state = json.loads((tmp_path / "resumed" / "checkpoint" / "state.json").read_text())
    assert state["loop"]["step"] == 4
    resumed = run("resumed", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr

    a = load_file(str(tmp_path / "full" / "adapter" / "adapter.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "adapter" / "adapter.safetensors"))
    assert a.keys() == b.keys() and len(a) == 2 * 3 * 2
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k)  # training did move B
    oa = load_file(str(tmp_path / "full" / "checkpoint" / "optimizer.safetensors"))
    ob = load_file(str(tmp_path / "resumed" / "checkpoint" / "optimizer.safetensors"))
    assert oa.keys() == ob.keys() and all(torch.equal(oa[k], ob[k]) for k in oa)
    # the log is the uninterrupted one (steps after the checkpoint were dropped and redone) …
    assert read_log(tmp_path / "full" / "log.jsonl") == read_log(tmp_path / "resumed" / "log.jsonl")
    # … and the ledger holds the same FLOPs: nothing charged twice, nothing lost
    full_ledger, resumed_ledger = Ledger(tmp_path / "full.ledger.jsonl"), Ledger(tmp_path / "resumed.ledger.jsonl")
    assert resumed_ledger.total() == full_ledger.total() > 0


def test_lora_default_end_to_end_on_tiny_model(tmp_path, tokenizer_dir):
    """``python -m experiments.lora_default`` at toy scale: data -> chunks -> untrained forecast -> LoRA training
    -> trained forecast -> results.json / README.md / PEFT adapter, FLOPs charged."""
    from data.simulate import simulate, write_h5
    from experiments import lora_default

    model_dir = tmp_path / "model"
    write_tiny_checkpoint(model_dir, tie=True, vocab_size=151936)  # the Qwen tokenizer's ids (padding 151643)
    write_h5(tmp_path / "lv.h5", *simulate(n_systems=20, n_steps=30, seed=0))
    ledger = tmp_path / "ledger.jsonl"
    argv = ["--model", str(model_dir), "--data", str(tmp_path / "lv.h5"), "--device", "cpu", "--out",
            str(tmp_path / "run"), "--ledger", str(ledger), "--train-limit", "4", "--limit", "2", "--context-steps",
            "8", "--horizon", "2", "--context-length", "48", "--batch-size", "2", "--max-steps", "3", "--eval-every",
            "2", "--eval-batches", "1", "--lr", "1e-3", "--no-progress"]
    assert lora_default.main(argv) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["details"]["training"]["steps"] == 3
    for side in ("untrained", "lora"):
        evaluation = results["evaluations"][side]
        assert set(evaluation["metrics"]) == {"prey", "predator"} and evaluation["validation_loss"] > 0
    assert "| prey MSE |" in results["details"]["table_markdown"]
    assert "| metric | untrained | lora |" in (tmp_path / "run" / "README.md").read_text()
    assert (tmp_path / "run" / "peft_adapter" / "adapter_model.safetensors").is_file()
    charged = Ledger(ledger).total()
    assert charged == results["flops"]["total"] <= results["flops"]["planned"]
    with pytest.raises(ValueError, match="--resume"):  # an existing run is never overwritten
        lora_default.main(argv)


def test_numeric_vocabulary_loss_is_a_softmax_over_those_tokens_and_counted(tmp_path):
    model = tiny_lora_model().eval()
    allowed = [3, 7, 9, 20, 41, 50]
    g = torch.Generator().manual_seed(8)
    ids = torch.tensor(allowed)[torch.randint(0, len(allowed), (2, L), generator=g)]
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    head = model.head_rows(allowed)
    with torch.no_grad(), FlopCounter() as fc:
        loss_sum, n = next_token_loss(model, ids, mask, head)
    with torch.no_grad():  # reference: the full logits, restricted to the allowed columns, then a softmax
        logits = model(ids)[:, :-1][:, :, allowed]
        keep = (mask[:, 1:] != 0) & (mask[:, :-1] != 0)
        column = torch.tensor([allowed.index(t) for t in ids[:, 1:][keep].tolist()])
        ref = torch.nn.functional.cross_entropy(logits[keep], column, reduction="sum")
    torch.testing.assert_close(loss_sum, ref, atol=1e-5, rtol=1e-6)
    assert fc.counts["loss"] == loss_flops(len(allowed), n)
    assert fc.total - fc.counts["loss"] == forward_flops(model.config, 2, L, lora_rank=4, head_rows=len(allowed))
    with pytest.raises(ValueError, match="outside the restricted"):
        next_token_loss(model, torch.full((1, 4), 5), torch.ones(1, 4, dtype=torch.long), head)
    # a training run with it is charged what its plan said (full rows: every position a target)
    chunks = make_chunks([torch.tensor(allowed)[torch.randint(0, 6, (48,), generator=g)].tolist()
                          for _ in range(3)], L)
    settings = config(max_steps=3, loss_vocabulary="numeric")
    summary = train(tiny_lora_model(), chunks, chunks, settings, tmp_path, loss_token_ids=allowed)
    assert training_cost(Qwen2Config(**TINY), settings, LoRASettings(rank=4), summary["val_chunks_evaluated"], 0,
                         len(set(allowed))) == summary["total_flops"]
    with pytest.raises(ValueError, match="loss_token_ids"):
        train(tiny_lora_model(), chunks, chunks, config(loss_vocabulary="numeric"), tmp_path / "b")


@pytest.mark.slow  # torch.compile from a cold inductor cache: ~1 min on 2 CPU cores (about 11 s once cached)
def test_compiled_training_matches_eager_and_counts_the_same(tmp_path):
    """--compile: torch.compile'd steps give the eager run's losses (to rounding) and exactly its counted FLOPs."""
    chunks = random_chunks(3, seed=2, min_len=48, max_len=49)
    summaries, losses = {}, {}
    for mode in (False, True):
        torch._dynamo.reset()
        out = tmp_path / ("compiled" if mode else "eager")
        summaries[mode] = train(tiny_lora_model(), chunks, chunks, config(max_steps=3, eval_every=0, compile=mode),
                                out)
        losses[mode] = [e["loss"] for e in read_log(out / "log.jsonl") if e["kind"] == "train"]
    assert summaries[True]["train_flops"] == summaries[False]["train_flops"] > 0
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)
    with pytest.raises(OptionError, match=r"^compile='yes': must be True or False$"):
        config(compile="yes").validate()


def test_a_checkpoint_written_before_the_refactor_resumes_exactly(tmp_path, tokenizer_dir):
    """A run killed after step 5 (checkpoint at step 4) by the code of 9e3835c, before issue 34's refactor
    (tests/data/resume_9e3835c/README.md), is resumed by this code to step 9 and ends bit-identical to this code's
    uninterrupted run: adapter, optimizer state and log. Bit-identity needs the float32 arithmetic of the machine
    that wrote the fixture: where this machine's differs (its first 4 logged steps do), the test is skipped."""
    import shutil

    fixture = tmp_path / "fixture"
    shutil.copytree(REPO / "tests" / "data" / "resume_9e3835c", fixture)
    shutil.copy(tokenizer_dir / "tokenizer.json", fixture / "model" / "tokenizer.json")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}

    def run(out, *extra):
        cmd = [sys.executable, "-m", "experiments.train", "--model", "model", "--out", out, "--train-chunks",
               "train.safetensors", "--val-chunks", "val.safetensors", "--ledger", f"{out}.ledger.jsonl",
               "--context-length", "16", "--batch-size", "3", "--lr", "1e-2", "--max-steps", "9",
               "--checkpoint-every", "2", "--eval-every", "3", "--eval-batches", "1", "--early-stop", "0",
               "--no-progress", "--stage", "test", *extra]
        done = subprocess.run(cmd, env=env, cwd=fixture, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return done

    old_steps = [e for e in read_log(fixture / "run" / "log.jsonl") if e["step"] <= 4]
    run("full")
    if [e for e in read_log(fixture / "full" / "log.jsonl") if e["step"] <= 4] != old_steps:
        pytest.skip("this machine's float32 arithmetic differs from the one that wrote the fixture (its first four "
                    "steps log other losses); exact resume is shown by test_resume_after_kill_is_bit_identical")
    assert "resuming" in run("run", "--resume").stderr
    for name in ("adapter/adapter.safetensors", "checkpoint/optimizer.safetensors"):
        a, b = load_file(str(fixture / "full" / name)), load_file(str(fixture / "run" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert read_log(fixture / "full" / "log.jsonl") == read_log(fixture / "run" / "log.jsonl")
    # a run directory with no named parent (--out full) is named by itself in the ledger ("full", not "/full")
    assert {e["run"] for e in Ledger(fixture / "full.ledger.jsonl").entries()} == {"full"}
