"""Recipe options: a trainable lm_head bias (lora.head_bias) and a learning-rate schedule
(TrainSettings.lr_schedule / warmup_steps) — their math, FLOPs, parameters, save/load, PEFT export, exact resume,
and records that do not change when they are left at their defaults."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from data.chunks import make_chunks
from experiments.lib import cli, errors
from experiments.lib.costs import chunk_pass_flops, forecast_cost, training_cost
from experiments.lib.settings import ForecastSettings, LoRASettings, TrainSettings, as_record
from experiments.lib.errors import OptionError
from experiments.lib.training import read_log, train_lora as train
from lora import (
    AdapterError,
    BiasedHead,
    add_head_bias,
    apply_lora,
    count_trainable_parameters,
    export_peft,
    get_head_bias,
    has_head_bias,
    load_adapter,
    load_peft,
    lora_modules,
    lora_parameter_count,
    lora_state_dict,
    remove_head_bias,
    remove_lora,
    save_adapter,
)
from miniqwen import FlopCounter, Qwen2Config, Qwen2ForCausalLM, generate, load_pretrained
from miniqwen.flop_count import forward_flops, forward_flops_breakdown, generation_flops

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2)
V, D = TINY["vocab_size"], TINY["hidden_size"]
L = 16  # chunk width


class Killed(Exception):
    """Stands for a kill between two steps."""


def tiny_model(seed=0, tie=True):
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(**TINY, tie_word_embeddings=tie)).eval()


def randomize(model, seed=1):
    """Random lora_B and head bias (fresh ones are zero, which would hide a mistake in either)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)
        bias = get_head_bias(model)
        if bias is not None:
            bias.copy_(torch.randn(bias.shape, generator=g))


def random_chunks(n_seqs, seed, min_len=30, max_len=40):
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(1, V, (int(torch.randint(min_len, max_len, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n_seqs)]
    return make_chunks(seqs, L)


def config(**overrides):
    base = dict(lr=1e-2, batch_size=2, context_length=L, max_steps=6, eval_every=3, eval_batches=2,
                checkpoint_every=2, progress=False)
    base.update(overrides)
    return TrainSettings(**base)


# ---------------------------------------------------------------------------------------------------------------
# The head bias
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_zero_head_bias_leaves_logits_unchanged_and_only_it_is_added(tie):
    model = tiny_model(tie=tie)
    apply_lora(model, rank=4)
    ids = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids)
    lora_only = count_trainable_parameters(model)
    bias = add_head_bias(model)
    assert isinstance(model.lm_head, BiasedHead) and has_head_bias(model)
    assert bias.shape == (V,) and bias.dtype == torch.float32 and bias.requires_grad and not bias.any()
    assert model.lm_head.weight is (model.model.embed_tokens.weight if tie else model.lm_head.weight)
    assert not model.lm_head.weight.requires_grad  # the head's weight stays frozen (and tied)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), before, atol=0, rtol=0)
    # its parameter count: + vocab_size, in the closed form too
    assert count_trainable_parameters(model) == lora_only + V == lora_parameter_count(model.config, 4, head_bias=True)
    with pytest.raises(ValueError, match="already"):
        add_head_bias(model)
    # a non-zero bias is added to every position's logits, and the restricted head adds the same rows
    with torch.no_grad():
        bias.copy_(torch.randn(V, generator=torch.Generator().manual_seed(1)))
        after = model(ids)
        torch.testing.assert_close(after, before + bias, atol=1e-6, rtol=1e-6)
        rows = [3, 7, 9, 41, 100]
        torch.testing.assert_close(model(ids, head_rows=model.head_rows(rows)), after[..., rows], atol=1e-5, rtol=1e-5)
    # removing it (remove_head_bias, or remove_lora: the bias belongs to the adapter) restores the plain head
    removed = remove_head_bias(model)
    assert torch.equal(removed, bias.detach()) and type(model.lm_head) is torch.nn.Linear
    assert model.lm_head.bias is None and remove_head_bias(model) is None
    add_head_bias(model)
    remove_lora(model)
    assert not has_head_bias(model) and not lora_modules(model)
    with torch.no_grad():
        assert torch.equal(model(ids), tiny_model(tie=tie)(ids))


def test_head_bias_in_bfloat16_model_is_float32_and_cast():
    model = tiny_model().to(torch.bfloat16)
    apply_lora(model, rank=2)
    bias = add_head_bias(model)
    randomize(model)
    ids = torch.randint(0, V, (1, 5))
    with torch.no_grad():
        out = model(ids)
        ref = torch.nn.functional.linear(model.model(ids), model.lm_head.weight, bias.to(torch.bfloat16))
        restricted = model(ids, head_rows=model.head_rows([1, 2, 3]))
    assert bias.dtype == torch.float32 and out.dtype == torch.bfloat16 and restricted.dtype == torch.bfloat16
    assert torch.equal(out, ref)


def test_head_bias_flops_counted_exactly_in_full_and_restricted_head():
    model = tiny_model()
    apply_lora(model, rank=4)
    add_head_bias(model)
    cfg, B, T, K = model.config, 2, 11, 5
    ids = torch.randint(0, V, (B, T))
    with torch.no_grad(), FlopCounter() as full:
        model(ids)
    assert full.counts["lm_head"] == B * T * V * (2 * D - 1) + B * T * V  # matmul + the bias add, 1 per logit
    assert full.total == forward_flops(cfg, B, T, lora_rank=4, head_bias=True)
    assert full.total - forward_flops(cfg, B, T, lora_rank=4) == B * T * V
    head = model.head_rows(range(K))
    with torch.no_grad(), FlopCounter() as restricted:
        model(ids, head_rows=head)
    assert restricted.counts["lm_head"] == B * T * K * (2 * D - 1) + B * T * K
    assert restricted.total == forward_flops(cfg, B, T, lora_rank=4, head_rows=K, head_bias=True)
    with torch.no_grad(), FlopCounter() as last:
        model(ids, logits_to_keep=1)
    assert last.counts["lm_head"] == forward_flops_breakdown(cfg, B, T, 4, logits_to_keep=1, head_bias=True)[
        "lm_head"] == B * V * (2 * D - 1) + B * V
    # constrained generation is counted as its closed form says
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    with torch.no_grad(), FlopCounter() as gen:
        generate(model, prompts, 4, pad_token_id=0, allowed_token_ids=range(K))
    assert gen.total == generation_flops(cfg, [4, 3], 4, 2, 4, head_rows=K, head_bias=True)
    # the plans price it: V (or K) per position, × 3 for a training step
    with_bias, without = LoRASettings(rank=4, head_bias=True), LoRASettings(rank=4)
    assert chunk_pass_flops(cfg, B, T, with_bias) - chunk_pass_flops(cfg, B, T, without) == B * T * V
    assert chunk_pass_flops(cfg, B, T, with_bias, K) - chunk_pass_flops(cfg, B, T, without, K) == B * T * K
    forecast = ForecastSettings(gen_batch_size=2)
    assert forecast_cost(cfg, [4, 3], 2, 2, forecast, with_bias, head_rows=K) > forecast_cost(
        cfg, [4, 3], 2, 2, forecast, without, head_rows=K)


def test_head_bias_trains_with_the_adapters_and_is_charged_as_planned(tmp_path):
    chunks = random_chunks(3, seed=1, min_len=48, max_len=49)  # full rows: the plan's upper bound is exact
    model = tiny_model()
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    summary = train(model, chunks, chunks, config(max_steps=4), tmp_path / "full",
                    lora=LoRASettings(rank=4, head_bias=True), stage="test")
    bias = get_head_bias(model)
    assert bias is not None and bias.abs().sum() > 0  # it moved
    assert summary["trainable_parameters"] == lora_parameter_count(model.config, 4, head_bias=True)
    assert summary["lora"]["head_bias"] is True
    planned = training_cost(model.config, config(max_steps=4), LoRASettings(rank=4, head_bias=True),
                            summary["val_chunks_evaluated"])
    assert planned == summary["total_flops"]
    for k, v in model.state_dict().items():  # the base weights did not
        if k in frozen:
            assert torch.equal(v, frozen[k]), k
    saved = load_file(str(tmp_path / "full" / "adapter" / "adapter.safetensors"))
    assert torch.equal(saved["lm_head.bias"], bias.detach())
    assert json.loads((tmp_path / "full" / "adapter" / "adapter_config.json").read_text())["head_bias"] is True
    # with the numeric loss only the bias rows of the restricted head get a gradient
    allowed = [3, 7, 9, 20, 41, 50]
    g = torch.Generator().manual_seed(8)
    numeric = make_chunks([torch.tensor(allowed)[torch.randint(0, 6, (48,), generator=g)].tolist()
                           for _ in range(3)], L)
    model = tiny_model()
    summary = train(model, numeric, numeric, config(max_steps=3, loss_vocabulary="numeric"), tmp_path / "numeric",
                    lora=LoRASettings(rank=4, head_bias=True), stage="test", loss_token_ids=allowed)
    moved = set(torch.nonzero(get_head_bias(model)).flatten().tolist())
    assert moved and moved <= set(allowed)
    planned = training_cost(model.config, config(max_steps=3, loss_vocabulary="numeric"),
                            LoRASettings(rank=4, head_bias=True), summary["val_chunks_evaluated"], 0, len(set(allowed)))
    assert planned == summary["total_flops"]
    # a model whose adapters lack the bias the settings ask for is refused
    other = tiny_model()
    apply_lora(other, rank=4)
    with pytest.raises(ValueError, match="head_bias"):
        train(other, chunks, None, config(max_steps=1), tmp_path / "other", lora=LoRASettings(rank=4, head_bias=True),
              stage="test")


def test_head_bias_save_load_round_trip(tmp_path):
    model = tiny_model()
    apply_lora(model, rank=2, alpha=4)
    add_head_bias(model)
    randomize(model)
    save_adapter(model, tmp_path / "ad")
    config_ = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert config_["head_bias"] is True
    assert set(load_file(str(tmp_path / "ad" / "adapter.safetensors"))) == set(lora_state_dict(model))
    assert "lm_head.bias" in lora_state_dict(model)

    fresh = tiny_model()  # no LoRA yet: load_adapter attaches the adapters and the bias
    load_adapter(fresh, tmp_path / "ad")
    assert has_head_bias(fresh) and get_head_bias(fresh).requires_grad
    ids = torch.randint(0, V, (2, 7))
    with torch.no_grad():
        assert torch.equal(model(ids), fresh(ids))
    assert count_trainable_parameters(fresh) == count_trainable_parameters(model)

    plain = tiny_model()  # adapters attached without the bias: refused, naming the difference
    apply_lora(plain, rank=2, alpha=4)
    with pytest.raises(AdapterError, match="head_bias"):
        load_adapter(plain, tmp_path / "ad")
    # an adapter without a bias has no flag (configs as before) and does not fit a model with one
    remove_head_bias(model)
    save_adapter(model, tmp_path / "plain")
    assert "head_bias" not in json.loads((tmp_path / "plain" / "adapter_config.json").read_text())
    with pytest.raises(AdapterError, match="head_bias"):
        load_adapter(fresh, tmp_path / "plain")


def test_peft_export_with_head_bias_matches_transformers_plus_peft(tiny_checkpoint, tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    path, _ = tiny_checkpoint
    ours, _ = load_pretrained(path, device="cpu")
    torch.manual_seed(0)
    apply_lora(ours, rank=4, alpha=8, targets=("q_proj", "v_proj"))
    add_head_bias(ours)
    randomize(ours)
    out = tmp_path / "peft"
    out.mkdir()
    (out / "head_bias.safetensors").write_bytes(b"stale")  # replaced
    export_peft(ours, out, base_model_name_or_path=str(path))
    weights = load_file(str(out / "adapter_model.safetensors"))
    assert not any("lm_head" in k for k in weights)  # PEFT's file holds the LoRA tensors only
    bias = load_file(str(out / "head_bias.safetensors"))
    assert set(bias) == {"lm_head.bias"} and torch.equal(bias["lm_head.bias"], get_head_bias(ours).detach())

    # what a transformers + peft user does (lora.head_bias's docstring)
    base = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(base, out).eval()
    head = theirs.get_output_embeddings()
    assert head.bias is None
    head.bias = torch.nn.Parameter(bias["lm_head.bias"].to(head.weight.dtype), requires_grad=False)
    ids = torch.randint(0, V, (2, 13), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = ours(ids)
        torch.testing.assert_close(ref, theirs(input_ids=ids).logits, atol=1e-5, rtol=0)

    # and it is loaded back into one of our models
    fresh, _ = load_pretrained(path, device="cpu")
    load_peft(fresh, out)
    assert has_head_bias(fresh)
    with torch.no_grad():
        assert torch.equal(fresh(ids), ref)
    # exported again without a bias: the old bias file is removed, and the export fits only a bias-free model
    remove_head_bias(ours)
    export_peft(ours, out, base_model_name_or_path=str(path))
    assert not (out / "head_bias.safetensors").exists()
    with pytest.raises(AdapterError):
        load_peft(fresh, out)


# ---------------------------------------------------------------------------------------------------------------
# The learning-rate schedule
# ---------------------------------------------------------------------------------------------------------------

def test_schedule_values_at_known_steps():
    lr = 1e-3
    constant = TrainSettings(lr=lr, max_steps=10)
    assert [constant.learning_rate(s) for s in range(10)] == [lr] * 10  # exactly the given lr, as before
    cosine = TrainSettings(lr=lr, max_steps=10, warmup_steps=2, lr_schedule="cosine")
    expected = {0: lr / 2, 1: lr, 2: lr, 6: lr / 2, 9: lr * 0.5 * (1 + math.cos(math.pi * 7 / 8))}
    for step, value in expected.items():
        assert cosine.learning_rate(step) == pytest.approx(value, rel=1e-12, abs=0), step
    assert cosine.learning_rate(4) == pytest.approx(lr * (2 + math.sqrt(2)) / 4, rel=1e-12)  # cos(π/4)
    rates = [cosine.learning_rate(s) for s in range(10)]
    assert all(a >= b for a, b in zip(rates[1:], rates[2:])) and rates[-1] > 0  # decays, never reaches 0
    no_warmup = TrainSettings(lr=lr, max_steps=4, lr_schedule="cosine")
    assert [no_warmup.learning_rate(s) for s in range(4)] == pytest.approx(
        [lr, lr * (1 + math.sqrt(0.5)) / 2, lr / 2, lr * (1 - math.sqrt(0.5)) / 2], rel=1e-12)
    warm_constant = TrainSettings(lr=lr, max_steps=10, warmup_steps=4)
    assert [warm_constant.learning_rate(s) for s in range(6)] == pytest.approx([lr / 4, lr / 2, 3 * lr / 4, lr, lr,
                                                                                lr], rel=1e-12)
    assert cosine.schedule_depends_on_max_steps and not warm_constant.schedule_depends_on_max_steps


def test_schedule_settings_are_validated_and_parsed():
    for bad, field in ((dict(lr_schedule="linear"), "lr_schedule"), (dict(warmup_steps=-1), "warmup_steps"),
                       (dict(lr_schedule="cosine", max_steps=5, warmup_steps=5), "warmup_steps"),
                       (dict(warmup_steps=1.5), "warmup_steps")):
        with pytest.raises(OptionError) as info:
            TrainSettings(**bad).validate()
        assert info.value.field == field
    with pytest.raises(OptionError):
        LoRASettings(head_bias="yes").validate()
    TrainSettings(max_steps=5, warmup_steps=9).validate()  # a warm-up longer than the run: allowed when constant
    p = cli.parser("x", "test", "lora", "train")
    s = cli.parse(p, ["--head-bias", "--lr-schedule", "cosine", "--warmup-steps", "3", "--max-steps", "50"])
    assert s["lora"].head_bias is True and s["train"].lr_schedule == "cosine" and s["train"].warmup_steps == 3
    s = cli.parse(p, [])
    assert s["lora"].head_bias is False and s["train"].lr_schedule == "constant" and s["train"].warmup_steps == 0
    with pytest.raises(errors.UsageError, match="--warmup-steps"):
        cli.parse(p, ["--lr-schedule", "cosine", "--warmup-steps", "50", "--max-steps", "50"])
    with pytest.raises(errors.UsageError, match="--lr-schedule"):
        cli.parse(p, ["--lr-schedule", "step"])


def test_log_records_each_steps_lr(tmp_path):
    chunks = random_chunks(4, seed=2)
    cfg = config(max_steps=5, lr_schedule="cosine", warmup_steps=2, eval_every=0)
    train(tiny_model(), chunks, None, cfg, tmp_path, lora=LoRASettings(rank=4), stage="test")
    logged = [e["lr"] for e in read_log(tmp_path / "log.jsonl") if e["kind"] == "train"]
    assert logged == [cfg.learning_rate(s) for s in range(5)]


def test_cosine_run_with_head_bias_killed_and_resumed_is_bit_identical(tmp_path):
    chunks, val = random_chunks(13, seed=6), random_chunks(4, seed=7)
    lora = LoRASettings(rank=4, head_bias=True)
    cfg = config(max_steps=9, lr_schedule="cosine", warmup_steps=2, checkpoint_every=2, eval_every=3,
                 eval_batches=1)

    def kill(step):
        if step == 5:  # the checkpoint is at step 4: step 5 is lost and redone
            raise Killed

    full = train(tiny_model(), chunks, val, cfg, tmp_path / "full", lora=lora, stage="test")
    with pytest.raises(Killed):
        train(tiny_model(), chunks, val, cfg, tmp_path / "resumed", lora=lora, stage="test", on_step=kill)
    assert json.loads((tmp_path / "resumed" / "checkpoint" / "state.json").read_text())["loop"]["step"] == 4
    resumed = train(tiny_model(), chunks, val, cfg, tmp_path / "resumed", lora=lora, stage="test", resume=True)
    assert resumed["steps"] == full["steps"] == 9
    for name in ("adapter/adapter.safetensors", "checkpoint/optimizer.safetensors",
                 "checkpoint/best_adapter.safetensors"):
        a, b = load_file(str(tmp_path / "full" / name)), load_file(str(tmp_path / "resumed" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert "lm_head.bias" in load_file(str(tmp_path / "full" / "adapter" / "adapter.safetensors"))
    assert read_log(tmp_path / "full" / "log.jsonl") == read_log(tmp_path / "resumed" / "log.jsonl")


def test_resume_with_other_max_steps_is_refused_under_cosine_only(tmp_path):
    chunks = random_chunks(6, seed=3)
    cosine = config(max_steps=4, lr_schedule="cosine", eval_every=0)
    train(tiny_model(), chunks, None, cosine, tmp_path / "cos", lora=LoRASettings(rank=4), stage="test")
    with pytest.raises(ValueError, match=r"max_steps: checkpoint 4 vs now 6 \(the cosine"):
        train(tiny_model(), chunks, None, config(max_steps=6, lr_schedule="cosine", eval_every=0), tmp_path / "cos",
              lora=LoRASettings(rank=4), stage="test", resume=True)
    with pytest.raises(ValueError, match="lr_schedule: checkpoint 'cosine' vs now 'constant'"):
        train(tiny_model(), chunks, None, config(max_steps=4, eval_every=0), tmp_path / "cos",
              lora=LoRASettings(rank=4), stage="test", resume=True)
    # the same max_steps resumes (nothing left to do); a constant schedule, warm-up or not, may be continued
    train(tiny_model(), chunks, None, cosine, tmp_path / "cos", lora=LoRASettings(rank=4), stage="test", resume=True)
    warm = config(max_steps=4, warmup_steps=2, eval_every=0)
    train(tiny_model(), chunks, None, warm, tmp_path / "warm", lora=LoRASettings(rank=4), stage="test")
    summary = train(tiny_model(), chunks, None, config(max_steps=6, warmup_steps=2, eval_every=0), tmp_path / "warm",
                    lora=LoRASettings(rank=4), stage="test", resume=True)
    assert summary["steps"] == 6
    with pytest.raises(ValueError, match="warmup_steps: checkpoint 2 vs now 0"):
        train(tiny_model(), chunks, None, config(max_steps=8, eval_every=0), tmp_path / "warm",
              lora=LoRASettings(rank=4), stage="test", resume=True)
    with pytest.raises(ValueError, match="lora"):  # the head bias is part of what a resumed run must match
        train(tiny_model(), chunks, None, config(max_steps=8, warmup_steps=2, eval_every=0), tmp_path / "warm",
              lora=LoRASettings(rank=4, head_bias=True), stage="test", resume=True)


# ---------------------------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------------------------

#: as_record of the defaults, as written before these options existed (keys of running studies compare equal)
TRAIN_RECORD_BEFORE = {
    "lr": 1e-05, "batch_size": 4, "context_length": 512, "stride": None, "max_steps": 10000, "train_limit": None,
    "weight_decay": 0.0, "betas": [0.9, 0.999], "eps": 1e-08, "max_grad_norm": 1.0, "eval_every": 500,
    "eval_batches": 8, "eval_at_start": True, "early_stop_patience": 0, "restore_best": False, "select_by": "loss",
    "checkpoint_every": 500, "loss_vocabulary": "full", "compile": False, "progress": True,
}
LORA_RECORD_BEFORE = {"rank": 4, "lora_alpha": None, "targets": ["q_proj", "v_proj"]}


def test_records_hold_no_machine_paths(tmp_path):
    """File options are recorded by their names, also a ledger or output directory that does not exist yet when the
    record is written; a model directory by its name, a Hub id as given."""
    from experiments.lib.settings import RunSettings

    (tmp_path / "weights").mkdir()
    run = RunSettings(model=str(tmp_path / "weights"), out=str(tmp_path / "not-yet" / "out"),
                      ledger=str(tmp_path / "not-yet.jsonl"))
    assert {k: as_record(run=run)["run"][k] for k in ("model", "out", "ledger")} == {
        "model": "weights", "out": "out", "ledger": "not-yet.jsonl"}
    assert as_record(run=RunSettings(model="Qwen/Qwen2.5-0.5B-Instruct"))["run"]["model"] == "Qwen/Qwen2.5-0.5B-Instruct"


def test_records_with_the_defaults_are_unchanged(tmp_path):
    assert as_record(train=TrainSettings(), lora=LoRASettings()) == {"train": TRAIN_RECORD_BEFORE,
                                                                    "lora": LORA_RECORD_BEFORE}
    record = as_record(train=TrainSettings(lr_schedule="cosine", warmup_steps=3),
                       lora=LoRASettings(head_bias=True))
    assert record["train"] == {**TRAIN_RECORD_BEFORE, "lr_schedule": "cosine", "warmup_steps": 3}
    assert record["lora"] == {**LORA_RECORD_BEFORE, "head_bias": True}
    assert as_record(train=TrainSettings(warmup_steps=2))["train"] == {**TRAIN_RECORD_BEFORE, "warmup_steps": 2}
    # a checkpoint of a default run holds the record made before, so it and older ones resume alike
    chunks = random_chunks(4, seed=4)
    train(tiny_model(), chunks, None, config(max_steps=2, eval_every=0), tmp_path, lora=LoRASettings(rank=4),
          stage="test")
    state = json.loads((tmp_path / "checkpoint" / "state.json").read_text())
    assert "lr_schedule" not in state["settings"] and "warmup_steps" not in state["settings"]
    assert "head_bias" not in state["lora"]
    assert "head_bias" not in json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
