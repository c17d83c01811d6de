"""Damaged or wrong input files get one clear line naming the file and the problem, before any work is spent, and
never a silently wrong result: config.json, tokenizer.json, sharded-checkpoint indexes, weights (non-finite, a
broken weights directory), LoRA adapters, trajectory data, chunk files for experiments.train, a results.json without
its selection, FLOP ledgers (a symbolic link, a FIFO, a directory, a text file, bad numbers), and model output text
that would decode to an overflow or to another script's digits."""

from __future__ import annotations

import json
import math
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import (checksums, cli, error_line, exit_err, exit_err_out, lora_args, refused, snapshot, user_dir,
                      write_stand_in_tokenizer)
from data import decode
from data.chunks import make_chunks
from data.simulate import simulate, write_h5
from experiments import baseline, report
from experiments import train as train_cli
from experiments.lib.budget import Ledger, LedgerError
from experiments.lib.tables import ledger_table
from miniqwen import ConfigError, Qwen2Config, QwenTokenizer, WeightsError, load_pretrained
from miniqwen import loading


TINY = dict(model_type="qwen2", vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0,
            rms_norm_eps=1e-6, tie_word_embeddings=True)


def write_config(path, raw) -> "os.PathLike":
    file = path / "config.json"
    file.write_text(raw if isinstance(raw, str) else json.dumps(raw))
    return file


def one_line(err) -> str:
    msg = str(err.value)
    assert "\n" not in msg, msg
    return msg


# ------------------------------------------------------------------------------------------------------- config.json

def test_tiny_config_is_valid(tmp_path):
    cfg = Qwen2Config.from_json(write_config(tmp_path, TINY))
    assert cfg.head_dim == 16 and cfg.rope_theta == 10000.0


@pytest.mark.parametrize("field, value", [
    ("num_attention_heads", 0), ("num_key_value_heads", 0), ("num_attention_heads", -4),
    ("hidden_size", 0), ("hidden_size", -64), ("num_hidden_layers", 0), ("num_hidden_layers", -1),
    ("intermediate_size", 0), ("intermediate_size", -96), ("vocab_size", 0), ("vocab_size", -128),
    ("max_position_embeddings", 0),
    ("hidden_size", "64"), ("num_hidden_layers", True), ("num_attention_heads", 4.0), ("vocab_size", None),
    ("intermediate_size", [96]), ("head_dim", 0), ("head_dim", "16"), ("head_dim", 7),
    ("rms_norm_eps", 0), ("rms_norm_eps", -1e-6), ("rms_norm_eps", float("nan")), ("rms_norm_eps", "1e-6"),
    ("rope_theta", 0.0), ("rope_theta", -10000.0), ("rope_theta", float("inf")), ("rope_theta", True),
    ("rope_theta", None), ("tie_word_embeddings", "false"), ("tie_word_embeddings", 0),
    ("eos_token_id", -1), ("eos_token_id", "151645"), ("bos_token_id", 1.5), ("torch_dtype", 16),
    ("hidden_act", "gelu"),
])
def test_bad_config_field_names_file_field_and_value(tmp_path, field, value):
    file = write_config(tmp_path, {**TINY, field: value})  # json writes NaN/Infinity, which json.loads reads back
    with pytest.raises(ConfigError) as err:
        Qwen2Config.from_json(file)
    msg = one_line(err)
    assert str(file) in msg and field in msg and repr(value) in msg, msg


@pytest.mark.parametrize("overrides, words", [
    (dict(num_attention_heads=4, num_key_value_heads=3), ["num_attention_heads 4", "num_key_value_heads 3"]),
    (dict(num_attention_heads=6, num_key_value_heads=2), ["hidden_size 64", "num_attention_heads 6"]),
    (dict(rope_theta=10000.0, rope_parameters={"rope_theta": 20000.0}), ["rope_theta", "20000.0"]),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), ["rope_scaling", "yarn"]),
    (dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0}), ["rope_parameters", "linear"]),
    (dict(rope_scaling="yarn"), ["rope_scaling"]),
    (dict(layer_types=["full_attention", "sliding_attention", "full_attention"]), ["layer_types", "sliding"]),
    (dict(use_sliding_window=True, sliding_window=4096), ["use_sliding_window"]),
    (dict(quantization_config={"quant_method": "awq"}), ["quantization_config"]),
    (dict(eos_token_id=[]), ["eos_token_id"]),
])
def test_inconsistent_or_unsupported_config(tmp_path, overrides, words):
    file = write_config(tmp_path, {**TINY, **overrides})
    with pytest.raises(ConfigError) as err:
        Qwen2Config.from_json(file)
    msg = one_line(err)
    assert str(file) in msg and all(w in msg for w in words), msg


def test_config_accepted_variants(tmp_path):
    """What transformers writes (rope_theta in rope_parameters, both agreeing, layer_types all full, sliding window
    configured but off, kv heads null = MHA, eos as a list) still loads."""
    cfg = Qwen2Config.from_dict({**TINY, "rope_theta": None, "rope_parameters": {"rope_theta": 5e5,
                                                                                  "rope_type": "default"},
                                 "layer_types": ["full_attention"] * 3, "use_sliding_window": False,
                                 "sliding_window": 4096, "max_window_layers": 1, "eos_token_id": [7, 8]})
    assert cfg.rope_theta == 5e5 and cfg.eos_token_id == 7
    cfg = Qwen2Config.from_dict({**TINY, "num_key_value_heads": None, "rope_scaling": None,
                                 "rope_parameters": {"rope_theta": 10000.0}})
    assert cfg.num_key_value_heads == 4 and cfg.head_dim == 16
    cfg = Qwen2Config.from_dict({**TINY, "num_attention_heads": 6, "head_dim": 12})  # head_dim given: no d % Hq
    assert cfg.head_dim == 12


def test_config_constructor_checks_too():
    with pytest.raises(ConfigError, match=r"num_key_value_heads must be a positive integer, got 0"):
        Qwen2Config(num_key_value_heads=0)
    with pytest.raises(ConfigError, match=r"hidden_size must be a positive integer, got '896'"):
        Qwen2Config(hidden_size="896")


@pytest.mark.parametrize("text, words", [
    ("[1, 2, 3]", ["JSON object", "list"]),
    ('"qwen2"', ["JSON object", "str"]),
    ("42", ["JSON object", "int"]),
    ("null", ["JSON object", "NoneType"]),
    ("not json at all", ["not a JSON file"]),
    ('{"hidden_size": 64,', ["not a JSON file"]),
    ("", ["not a JSON file"]),
])
def test_config_file_not_a_json_object(tmp_path, text, words):
    file = write_config(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        Qwen2Config.from_json(file)
    msg = one_line(err)
    assert str(file) in msg and all(w in msg for w in words), msg


def test_config_file_not_utf8_or_a_directory(tmp_path):
    file = tmp_path / "config.json"
    file.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match="not a JSON file") as err:
        Qwen2Config.from_json(file)
    assert str(file) in one_line(err)
    (tmp_path / "d" / "config.json").mkdir(parents=True)
    with pytest.raises(ConfigError) as err:
        Qwen2Config.from_json(tmp_path / "d" / "config.json")
    assert str(tmp_path / "d" / "config.json") in one_line(err)


def test_load_pretrained_bad_config_before_weights(tmp_path):
    write_config(tmp_path, {**TINY, "num_attention_heads": 0})
    (tmp_path / "model.safetensors").write_bytes(b"never read")
    with pytest.raises(ConfigError, match="num_attention_heads must be a positive integer, got 0"):
        load_pretrained(tmp_path, device="cpu")


# ---------------------------------------------------------------------------------------------------- tokenizer.json

@pytest.mark.parametrize("content, words", [
    (b"{}", ["not a valid tokenizer.json"]),
    (b"[]", ["not a valid tokenizer.json"]),
    (b"garbage", ["not a valid tokenizer.json"]),
    (b"\xff\xfe\x00\x01", ["not a valid tokenizer.json"]),
    (b"", ["not a valid tokenizer.json"]),
])
def test_bad_tokenizer_file(tmp_path, content, words):
    file = tmp_path / "tokenizer.json"
    file.write_bytes(content)
    for arg in (file, tmp_path):
        with pytest.raises(WeightsError) as err:
            QwenTokenizer.from_file(arg)
        msg = one_line(err)
        assert str(file) in msg and all(w in msg for w in words), msg


def test_missing_tokenizer_or_not_qwen(tmp_path):
    with pytest.raises(WeightsError, match="no tokenizer.json") as err:
        QwenTokenizer.from_file(tmp_path)
    assert str(tmp_path / "tokenizer.json") in one_line(err)
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(WeightsError, match=r"<\|im_end\|>") as err:
        QwenTokenizer.from_file(tmp_path)
    assert str(tmp_path / "tokenizer.json") in one_line(err)


def test_load_pretrained_bad_tokenizer_before_weights(tmp_path):
    write_config(tmp_path, TINY)
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"never read")
    with pytest.raises(WeightsError, match="not a valid tokenizer.json") as err:
        load_pretrained(tmp_path, device="cpu")
    assert str(tmp_path / "tokenizer.json") in one_line(err)
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(WeightsError, match="no tokenizer.json"):
        load_pretrained(tmp_path, device="cpu")


def test_weights_error_is_one_class():
    import miniqwen.tokenizer

    assert loading.WeightsError is WeightsError is miniqwen.tokenizer.WeightsError


def test_a_tokenizer_with_more_ids_than_the_model_is_refused_at_load(tiny_dir, tokenizer_dir, setup, tmp_path,
                                                                       capsys):
    assert (tiny_dir / "tokenizer.json").read_bytes() == (tokenizer_dir / "tokenizer.json").read_bytes()
    before = checksums(setup)
    code, err, _ = exit_err_out(baseline.main, ["--model", str(tiny_dir), "--data", str(setup / "lv.h5"), "--out",
                                                str(tmp_path / "out"), "--ledger", str(setup / "ledger.jsonl"),
                                                "--limit", "1", "--context-steps", "5", "--horizon", "2",
                                                "--precision", "float32"], capsys)
    error_line(code, err, "vocab_size 128", "151", "tokenizer.json")
    assert checksums(setup) == before


# ----------------------------------------------------------------------------------------------- sharded checkpoints

def sharded_dir(tmp_path, source_dir):
    """``tmp_path`` as a two-shard copy of the single-file checkpoint in ``source_dir``; returns the index path."""
    state = load_file(str(source_dir / "model.safetensors"))
    names = sorted(state)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(tmp_path / shard))
    for name in ("config.json", "tokenizer.json"):
        (tmp_path / name).write_bytes((source_dir / name).read_bytes())
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": {k: s for s, keys in shards.items() for k in keys}}))
    return index


def test_valid_sharded_checkpoint_loads(tiny_checkpoint, tmp_path):
    path, ref = tiny_checkpoint
    sharded_dir(tmp_path, path)
    model, _ = load_pretrained(tmp_path, device="cpu")
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref(ids).logits, atol=1e-5, rtol=0)


def _tiny_dir(tmp_path):
    """config + stand-in tokenizer, and no weights: errors about the index must come before any shard is read."""
    write_config(tmp_path, TINY)
    write_stand_in_tokenizer(tmp_path / "tokenizer.json")
    return tmp_path / "model.safetensors.index.json"


@pytest.mark.parametrize("text, words", [
    ("not json", ["cannot read it as JSON"]),
    ("", ["cannot read it as JSON"]),
    ("[1, 2]", ["expected a JSON object", "list"]),
    ('"weight_map"', ["expected a JSON object", "str"]),
    ("{}", ["'weight_map'", "NoneType"]),
    ('{"weight_map": ["model.safetensors"]}', ["'weight_map'", "list"]),
    ('{"weight_map": "model.safetensors"}', ["'weight_map'", "str"]),
    ('{"weight_map": {}}', ["'weight_map' is empty"]),
    ('{"weight_map": {"lm_head.weight": 1}}', ["lm_head.weight", "1"]),
    ('{"weight_map": {"lm_head.weight": null}}', ["lm_head.weight", "None"]),
    ('{"weight_map": {"lm_head.weight": ["a.safetensors"]}}', ["lm_head.weight"]),
    ('{"weight_map": {"lm_head.weight": "/etc/passwd"}}', ["/etc/passwd", "not a file inside"]),
    ('{"weight_map": {"lm_head.weight": "../x.safetensors"}}', ["../x.safetensors", "not a file inside"]),
    ('{"weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors"}}',
     ["model-00001-of-00002.safetensors", "does not exist"]),
])
def test_bad_sharded_index(tmp_path, text, words):
    index = _tiny_dir(tmp_path)
    index.write_text(text)
    with pytest.raises(WeightsError) as err:
        load_pretrained(tmp_path, device="cpu")
    msg = one_line(err)
    assert str(index) in msg and all(w in msg for w in words), msg


def test_index_not_utf8(tmp_path):
    index = _tiny_dir(tmp_path)
    index.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(WeightsError, match="cannot read it as JSON") as err:
        load_pretrained(tmp_path, device="cpu")
    assert str(index) in one_line(err)


def test_missing_shard_found_before_any_shard_is_read(tmp_path, monkeypatch):
    index = _tiny_dir(tmp_path)
    save_file({"a": torch.zeros(2)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    index.write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors",
                                                "b": "model-00002-of-00002.safetensors"}}))
    read = []
    monkeypatch.setattr(loading, "load_file", lambda f: read.append(f) or {})
    with pytest.raises(WeightsError, match="model-00002-of-00002.safetensors'?, but .* does not exist") as err:
        load_pretrained(tmp_path, device="cpu")
    assert str(index) in one_line(err) and read == []


def test_tensor_in_two_shards_or_not_float(tmp_path):
    index = _tiny_dir(tmp_path)
    save_file({"a": torch.zeros(2), "b": torch.zeros(2)}, str(tmp_path / "s1.safetensors"))
    save_file({"b": torch.ones(2)}, str(tmp_path / "s2.safetensors"))
    index.write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}))
    with pytest.raises(WeightsError, match=r"s2.safetensors: 1 tensors also found in an earlier shard: \['b'\]"):
        load_pretrained(tmp_path, device="cpu")
    save_file({"b": torch.ones(2, dtype=torch.int32)}, str(tmp_path / "s2.safetensors"))
    save_file({"a": torch.zeros(2)}, str(tmp_path / "s1.safetensors"))
    with pytest.raises(WeightsError, match=r"s2.safetensors: tensor b has dtype torch.int32"):
        load_pretrained(tmp_path, device="cpu")


# ----------------------------------------------------------------------------------------------------------- weights

@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_weights_are_refused_at_load_naming_the_tensor(tiny_checkpoint, tmp_path, value):
    path, _ = tiny_checkpoint
    for name in ("config.json", "tokenizer.json"):
        (tmp_path / name).write_bytes((path / name).read_bytes())
    tensors = load_file(str(path / "model.safetensors"))
    bad = "model.layers.1.mlp.down_proj.weight"
    tensors[bad] = tensors[bad].clone()
    tensors[bad][3, 5] = value
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(WeightsError) as err:
        load_pretrained(tmp_path, device="cpu")
    msg = one_line(err)
    assert bad in msg and str(tmp_path / "model.safetensors") in msg and "NaN or infinite" in msg, msg


def test_non_finite_weights_stop_a_stage_with_one_line_and_no_charge(tiny_full_vocab, sim_file, tmp_path, capsys):
    from experiments import baseline
    from experiments.lib.cli import run_cli

    model = tmp_path / "model"
    model.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (model / name).write_bytes((tiny_full_vocab / name).read_bytes())
    tensors = load_file(str(tiny_full_vocab / "model.safetensors"))
    tensors["model.norm.weight"] = torch.full_like(tensors["model.norm.weight"], float("nan"))
    save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})
    ledger = Ledger(tmp_path / "ledger.jsonl")
    ledger.charge("earlier", 10, "train")
    before = ledger.path.read_bytes()
    with pytest.raises(SystemExit) as info:
        run_cli(lambda: baseline.main(["--model", str(model), "--data", str(sim_file), "--ledger", str(ledger.path),
                                       "--out", str(tmp_path / "out"), "--device", "cpu", "--limit", "1",
                                       "--context-steps", "5", "--horizon", "2", "--loss-limit", "0"]))
    lines = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(lines) == 1 and "model.norm.weight" in lines[0], lines
    assert ledger.path.read_bytes() == before
    assert not (tmp_path / "out" / "results.json").exists()


def test_weights_fingerprint_names_the_weights_not_the_directory(tiny_checkpoint, tmp_path):
    from conftest import write_tiny_checkpoint

    path, _ = tiny_checkpoint
    copy = tmp_path / "renamed"
    copy.mkdir()
    for f in path.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    assert loading.weights_fingerprint(copy) == loading.weights_fingerprint(path)
    other = tmp_path / "other"
    write_tiny_checkpoint(other, tie=json.loads((path / "config.json").read_text())["tie_word_embeddings"], seed=5)
    assert loading.weights_fingerprint(other) != loading.weights_fingerprint(path)  # same shapes, other values
    (copy / "config.json").unlink()
    os.mkfifo(copy / "config.json")  # reading a FIFO would block: it is refused as not a regular file
    with pytest.raises(ConfigError, match="not a regular file"):
        loading.weights_fingerprint(copy)


def test_bad_dtype_argument(tmp_path):
    with pytest.raises(ValueError, match="unknown dtype 'nn'"):
        load_pretrained(tmp_path, dtype="nn", device="cpu")
    with pytest.raises(ValueError, match="floating-point"):
        load_pretrained(tmp_path, dtype="int64", device="cpu")


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
    code, err = exit_err(baseline.main, ["--model", str(model_dir), "--data", str(setup / "lv.h5"), "--out",
                                         str(tmp_path / "out"), "--ledger", str(setup / "ledger.jsonl"), "--limit", "1",
                                         "--context-steps", "5", "--horizon", "2"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and expected in err, err
    assert (setup / "ledger.jsonl").read_text() == ledger_before


# ----------------------------------------------------------------------------------------------------- LoRA adapters

@pytest.mark.filterwarnings("ignore")
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


# ----------------------------------------------------------------------------------- trajectory data and chunk files

def test_all_zero_trajectories_are_one_line_naming_the_file(tmp_path, capsys):
    traj, time = simulate(n_systems=20, n_steps=30, seed=0)
    write_h5(tmp_path / "zeros.h5", np.zeros_like(traj), time)
    before = checksums(tmp_path)
    code, err, _ = exit_err_out(baseline.main, ["--model", str(tmp_path / "m"), "--data", str(tmp_path / "zeros.h5"),
                                                "--out", str(tmp_path / "out"), "--ledger", str(tmp_path / "l.jsonl")],
                                capsys)
    error_line(code, err, str(tmp_path / "zeros.h5"), "LLMTIME scale")
    assert checksums(tmp_path) == before and not (tmp_path / "out").exists()


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
    code, err, _ = exit_err_out(train_cli.main, ["--model", str(tiny_dir), "--train-chunks", str(path), "--out",
                                                 str(tmp_path / "run"), "--ledger", str(ledger), "--context-length",
                                                 "16", "--batch-size", "100" if case == "batch too large" else "2",
                                                 "--max-steps", "2", "--no-progress", "--precision", "float32"],
                                capsys)
    error_line(code, err, *words)
    assert checksums(tmp_path) == before and not (tmp_path / "run").exists()


# -------------------------------------------------------------------------------------------------- decoding numbers

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


# ----------------------------------------------------------------------------------------------------- results files

def test_report_on_a_results_json_without_its_selection_is_one_line(tmp_path, capsys):
    from conftest import REPO

    results = tmp_path / "results"
    (results / "sweep").mkdir(parents=True)
    raw = json.loads((REPO / "results" / "sweep_cpu" / "results.json").read_text())
    del raw["details"]["selection"]
    (results / "sweep" / "results.json").write_text(json.dumps(raw))
    (results / "flops_ledger.jsonl").write_text("")
    before = checksums(tmp_path)
    code, err, _ = exit_err_out(report.main, ["--results", str(results), "--out", str(tmp_path / "REPORT.md")], capsys)
    error_line(code, err, str(results / "sweep" / "results.json"), "details.selection")
    assert checksums(tmp_path) == before and not (tmp_path / "REPORT.md").exists()


# -------------------------------------------------------------------------------------------------------- the ledger

def test_ledger_through_symlink_stays_one_file(tmp_path):
    a, b = tmp_path / "A", tmp_path / "B"
    a.mkdir()
    b.mkdir()
    target, link = a / "ledger.jsonl", b / "ledger.jsonl"
    Ledger(target).charge("first", 5, "eval")
    link.symlink_to(target)
    via_link = Ledger(link)
    via_link.charge("baseline_eval", 10**13, "generate")
    via_link.charge("lora_default", 3 * 10**15, "train")
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert [e["stage"] for e in Ledger(target).entries()] == ["first", "baseline_eval", "lora_default"]
    assert Ledger(target).total() == via_link.total() == 5 + 10**13 + 3 * 10**15
    assert sorted(p.name for p in a.iterdir()) == ["ledger.jsonl", "ledger.jsonl.lock"]  # no temp file left
    assert sorted(p.name for p in b.iterdir()) == ["ledger.jsonl"]  # lock and temp beside the target only


def test_ledger_dangling_link_and_linked_directory(tmp_path):
    real = tmp_path / "real"
    link = tmp_path / "dangling.jsonl"
    link.symlink_to(real / "sub" / "ledger.jsonl")  # target (and its directory) do not exist yet
    Ledger(link).charge("s", 7, "eval")
    assert link.is_symlink() and Ledger(real / "sub" / "ledger.jsonl").total() == 7
    (tmp_path / "runs").symlink_to(real / "sub", target_is_directory=True)
    Ledger(tmp_path / "runs" / "ledger.jsonl").charge("s", 8, "eval")
    assert (tmp_path / "runs").is_symlink() and Ledger(link).total() == 15


BAD_FLOPS = [float("nan"), float("inf"), float("-inf"), -1, -1.0, 1.5, True, "5", None, [5]]


@pytest.mark.parametrize("flops", BAD_FLOPS, ids=repr)
def test_ledger_charge_refuses_bad_flops(tmp_path, flops):
    path = tmp_path / "l.jsonl"
    ledger = Ledger(path)
    ledger.charge("a", 1, "eval")
    with pytest.raises(ValueError) as err:
        ledger.charge("b", flops, "eval")
    msg = one_line(err)
    assert str(path) in msg and "flops" in msg, msg
    assert ledger.total() == 1 and len(path.read_text().splitlines()) == 1


def test_ledger_charge_refuses_non_finite_details(tmp_path):
    path = tmp_path / "l.jsonl"
    with pytest.raises(ValueError, match="JSON-serialisable") as err:
        Ledger(path).charge("a", 1, "eval", loss=math.nan)
    assert str(path) in one_line(err) and not path.exists()


def test_ledger_accepts_integral_numbers(tmp_path):
    np = pytest.importorskip("numpy")
    ledger = Ledger(tmp_path / "l.jsonl")
    assert ledger.charge("a", np.int64(5), "eval")["flops"] == 5
    assert ledger.charge("a", 2e15, "eval")["flops"] == 2 * 10**15
    assert type(ledger.entries()[0]["flops"]) is int and ledger.total() == 5 + 2 * 10**15


@pytest.mark.parametrize("planned", BAD_FLOPS, ids=repr)
def test_ledger_check_refuses_bad_plan(tmp_path, planned, capsys):
    path = tmp_path / "l.jsonl"
    with pytest.raises(ValueError) as err:
        Ledger(path).check(planned)
    msg = one_line(err)
    assert str(path) in msg and "planned" in msg, msg
    assert capsys.readouterr().out == ""  # refused before printing a (meaningless) budget line


@pytest.mark.parametrize("budget", [0, -1, float("nan"), float("inf"), 0.5, "1e17", None, True])
def test_ledger_refuses_bad_budget(tmp_path, budget):
    path = tmp_path / "l.jsonl"
    ledger = Ledger(path)
    ledger.charge("a", 1, "eval")
    for call in (lambda: ledger.check(1, budget=budget), lambda: ledger_table(ledger, budget)):
        with pytest.raises(ValueError) as err:
            call()
        msg = one_line(err)
        assert str(path) in msg and "budget" in msg, msg


def test_ledger_error_names_file_when_path_is_a_directory(tmp_path):
    (tmp_path / "l.jsonl").mkdir()
    with pytest.raises(LedgerError) as err:
        Ledger(tmp_path / "l.jsonl").total()
    assert str(tmp_path / "l.jsonl") in one_line(err)


def test_a_fifo_as_the_ledger_is_refused_not_read(setup, tmp_path, capsys):
    fifo = tmp_path / "ledger.fifo"
    os.mkfifo(fifo)
    with pytest.raises(LedgerError, match="FIFO"):
        Ledger(fifo)
    code, err, _ = exit_err_out(baseline.main, ["--model", str(tmp_path / "m"), "--data", str(setup / "lv.h5"), "--out",
                                                str(tmp_path / "out"), "--ledger", str(fifo)], capsys)
    error_line(code, err, str(fifo), "not a regular file", "--ledger")
    assert not (tmp_path / "out").exists()


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
        code, err = exit_err(report.main, ["--results", str(results), "--ledger", str(ledger), "--out",
                                           str(tmp_path / "REPORT.md")], capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and all(w in lines[0] for w in words), err
    code, err = exit_err(report.main, ["--results", str(results), "--out", str(tmp_path)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--out" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo.jsonl", "results"]
    assert [p.name for p in results.iterdir()] == ["flops_ledger.jsonl"]  # not even the figures directory


@pytest.mark.filterwarnings("ignore")
def test_report_refuses_a_ledger_that_is_not_one(env, tmp_path, capsys):
    results = tmp_path / "results"
    results.mkdir()
    ledger = user_dir(tmp_path, {"notes.txt": "a line of text\n"}) / "notes.txt"
    before = snapshot(tmp_path)
    refused(*cli(report.main, ["--results", str(results), "--ledger", str(ledger), "--out",
                               str(tmp_path / "R.md")], capsys), str(ledger))
    assert snapshot(tmp_path) == before


def test_a_fifo_as_chunk_file_is_refused_before_it_is_opened(env, tmp_path, capsys):
    """Opening a FIFO blocks until something writes to it: ``experiments.train`` refuses one by name instead."""
    fifo = tmp_path / "chunks.safetensors"
    os.mkfifo(fifo)
    args = ["--model", str(env["model"]), "--train-chunks", str(fifo), "--out", str(tmp_path / "t"), "--no-ledger",
            "--device", "cpu", "--max-steps", "1"]
    refused(*cli(train_cli.main, args, capsys), str(fifo), "FIFO")
    assert not (tmp_path / "t").exists()


def test_a_refusal_after_the_run_record_leaves_no_record_behind(env, tmp_path, capsys):
    """A stage that begins a new run in an empty --out and is then refused (here: a data file too small to have a
    validation trajectory) takes its run record back: --out is as it was, nothing is charged."""
    from experiments import lora_default

    small = tmp_path / "one.h5"
    write_h5(small, *simulate(n_systems=1, n_steps=30, seed=0))
    before = snapshot(tmp_path, env["ledger"])
    args = lora_args({**env, "data": small}, tmp_path / "run") + ["--max-steps", "2"]
    refused(*cli(lora_default.main, args, capsys))
    assert not (tmp_path / "run").exists()
    after = snapshot(tmp_path, env["ledger"])
    assert after == before


def test_the_report_skips_damaged_results_with_a_warning_and_never_blocks(baseline_run, tmp_path, capsys):
    """A results.json of garbage, one whose flops are not an object, and one that is a FIFO, beside a good run:
    the report is written from the good run, each bad file named in a one-line warning; nothing blocks."""
    res = tmp_path / "res"
    shutil.copytree(baseline_run, res / "good")
    for name, text in (("garbage", "{not json"), ("nan_flops", None)):
        (res / name).mkdir()
        if text is None:
            raw = json.loads((res / "good" / "results.json").read_text())
            raw["flops"] = float("nan")
            text = json.dumps(raw)
        (res / name / "results.json").write_text(text)
    (res / "fifo").mkdir()
    os.mkfifo(res / "fifo" / "results.json")
    code, err = cli(report.main, ["--results", str(res), "--out", str(tmp_path / "R.md")], capsys)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning: skipped")]
    assert len(warnings) == 3 and all(any(n in w for w in warnings) for n in ("garbage", "nan_flops", "fifo"))
    assert "good" in (tmp_path / "R.md").read_text()


@pytest.mark.parametrize("stage", ["sweep", "search"])
def test_a_study_refused_at_the_model_leaves_no_point_directories(env, tmp_path, capsys, stage):
    """A grid or search whose --model is missing is refused in one line, and the --out it began (its record and
    the point directories it made to lock them) is taken back: nothing of it is left."""
    from experiments import search, sweep

    args = lora_args({**env, "model": tmp_path / "no-such-model"}, tmp_path / "out") + [
        "--max-steps", "2", "--lrs", "1e-3,2e-3", "--ranks", "2"]
    if stage == "search":
        args += ["--min-steps", "1", "--eta", "2", "--rungs", "2"]
    refused(*cli({"sweep": sweep.main, "search": search.main}[stage], args, capsys), "no-such-model")
    assert not (tmp_path / "out").exists()


def test_train_refuses_a_ledger_that_is_not_one_before_writing(env, tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a ledger\n")
    chunks = tmp_path / "c.safetensors"
    train_cli.save_chunks(make_chunks(torch.randint(0, 100, (4, 17)).tolist(), 16), chunks)
    args = ["--model", str(env["model"]), "--train-chunks", str(chunks), "--out", str(tmp_path / "t"), "--ledger",
            str(notes), "--device", "cpu", "--context-length", "16", "--batch-size", "2", "--max-steps", "1"]
    refused(*cli(train_cli.main, args, capsys), "notes.txt")
    assert not (tmp_path / "t").exists() and notes.read_text() == "not a ledger\n"
