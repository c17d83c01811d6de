"""Parity of miniqwen's hand-written Qwen2 with transformers' Qwen2ForCausalLM on tiny random checkpoints."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from miniqwen import KVCache, Qwen2Config, WeightsError, generate, load_pretrained
from miniqwen.config import ConfigError



@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():
        yield


def test_logits_match_transformers(tiny_checkpoint):
    path, ref = tiny_checkpoint
    model, _ = load_pretrained(path, device="cpu")
    ids = torch.randint(0, 128, (3, 21), generator=torch.Generator().manual_seed(1))
    ours, theirs = model(ids), ref(ids).logits
    assert ours.shape == (3, 21, 128)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_tied_embeddings_share_storage(tiny_checkpoint):
    path, ref = tiny_checkpoint
    model, _ = load_pretrained(path, device="cpu")
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    assert tied == ref.config.tie_word_embeddings


def test_left_padded_batch_equals_each_row_alone(tiny_checkpoint):
    path, ref = tiny_checkpoint
    model, _ = load_pretrained(path, device="cpu")
    g = torch.Generator().manual_seed(2)
    rows = [torch.randint(1, 128, (n,), generator=g) for n in (9, 4, 13)]
    L = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), L, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, L - len(r):], mask[i, L - len(r):] = r, 1
    batched = model(ids, attention_mask=mask)
    for i, r in enumerate(rows):
        alone = model(r[None])
        torch.testing.assert_close(batched[i, L - len(r):], alone[0], atol=1e-5, rtol=0)
        # and the reference agrees when given the same positions (as its generate() would pass them)
        hf = ref(r[None]).logits
        torch.testing.assert_close(alone[0], hf[0], atol=1e-5, rtol=0)


def test_kv_cached_decoding_equals_full_forward(tiny_checkpoint):
    path, _ = tiny_checkpoint
    model, _ = load_pretrained(path, device="cpu")
    ids = torch.randint(0, 128, (2, 15), generator=torch.Generator().manual_seed(3))
    full = model(ids)
    cache = KVCache(model.config, 2, 15)
    steps = [model(ids[:, :8], cache=cache)]  # prefill 8 tokens, then one token at a time
    for t in range(8, 15):
        steps.append(model(ids[:, t : t + 1], cache=cache))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)
    assert cache.length == 15


def test_logits_to_keep_is_the_tail(tiny_checkpoint):
    path, _ = tiny_checkpoint
    model, _ = load_pretrained(path, device="cpu")
    ids = torch.randint(0, 128, (2, 10))
    torch.testing.assert_close(model(ids, logits_to_keep=3), model(ids)[:, -3:])


def test_sharded_equals_single_file(tiny_checkpoint, tmp_path):
    path, _ = tiny_checkpoint
    state = load_file(str(path / "model.safetensors"))
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for shard, keys in shards.items():
        save_file({k: state[k].contiguous() for k in keys}, str(tmp_path / shard))
        weight_map.update({k: shard for k in keys})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for name in ("config.json", "tokenizer.json"):
        if (path / name).exists():
            (tmp_path / name).write_bytes((path / name).read_bytes())
    if not (tmp_path / "tokenizer.json").exists():
        pytest.skip("no tokenizer.json to copy")
    single, _ = load_pretrained(path, device="cpu")
    sharded, _ = load_pretrained(tmp_path, device="cpu")
    ids = torch.randint(0, 128, (1, 12))
    assert torch.equal(single(ids), sharded(ids))


def test_greedy_generation_matches_transformers(tiny_checkpoint):
    path, ref = tiny_checkpoint
    model, _ = load_pretrained(path, device="cpu")
    prompts = [[5, 17, 33, 2, 9], [70, 3]]
    ours = generate(model, prompts, max_new_tokens=12, pad_token_id=0)
    for prompt, got in zip(prompts, ours):
        hf = ref.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                          pad_token_id=0)
        assert got == hf[0, len(prompt):].tolist()


def test_generation_constraint_stop_and_seeded_sampling(tiny_checkpoint):
    path, _ = tiny_checkpoint
    model, _ = load_pretrained(path, device="cpu")
    allowed = [3, 4, 5]
    out = generate(model, [[1, 2, 3]], 30, pad_token_id=0, allowed_token_ids=allowed, stop_token_id=4,
                   stop_count=2, temperature=1.0, seed=7, num_samples=3)
    assert len(out) == 3
    for row in out:
        assert set(row) <= set(allowed)
        assert row.count(4) == 2 or len(row) == 30
        if row.count(4) == 2:
            assert row[-1] == 4
    again = generate(model, [[1, 2, 3]], 30, pad_token_id=0, allowed_token_ids=allowed, stop_token_id=4,
                     stop_count=2, temperature=1.0, seed=7, num_samples=3)
    assert out == again
    # an EOS token ends a row and is not returned
    eos = generate(model, [[1, 2, 3]], 10, pad_token_id=0, allowed_token_ids=[9], eos_token_ids=[9])
    assert eos == [[]]


def test_missing_and_mismatched_weights_are_reported(tiny_checkpoint, tmp_path):
    path, _ = tiny_checkpoint
    state = load_file(str(path / "model.safetensors"))
    del state["model.layers.1.mlp.up_proj.weight"]
    state["model.layers.0.extra.weight"] = torch.zeros(2)
    save_file(state, str(tmp_path / "model.safetensors"))
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] = 80  # config no longer matches the weights
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "tokenizer.json").write_bytes((path / "tokenizer.json").read_bytes())
    with pytest.raises(WeightsError) as err:
        load_pretrained(tmp_path, device="cpu")
    msg = str(err.value)
    assert "missing" in msg and "model.layers.1.mlp.up_proj.weight" in msg
    assert "unexpected" in msg and "model.layers.0.extra.weight" in msg
    assert "shape mismatch" in msg and str(tmp_path) in msg


def test_corrupt_or_absent_weights(tiny_checkpoint, tmp_path):
    path, _ = tiny_checkpoint
    for name in ("config.json", "tokenizer.json"):
        (tmp_path / name).write_bytes((path / name).read_bytes())
    with pytest.raises(WeightsError, match="no model.safetensors"):
        load_pretrained(tmp_path, device="cpu")
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError, match="cannot read safetensors"):
        load_pretrained(tmp_path, device="cpu")
    with pytest.raises(WeightsError, match="no such model directory"):
        load_pretrained(tmp_path / "nope", device="cpu")


def test_config_rules(tmp_path):
    cfg = Qwen2Config.from_dict({"model_type": "qwen2", "rope_parameters": {"rope_theta": 123.0}, "hidden_size": 64,
                                 "num_attention_heads": 4, "num_key_value_heads": 2})
    assert cfg.rope_theta == 123.0 and cfg.head_dim == 16
    with pytest.raises(ConfigError, match="llama"):
        Qwen2Config.from_dict({"model_type": "llama"}, source="x/config.json")
    with pytest.raises(ConfigError, match="no config.json"):
        Qwen2Config.from_json(tmp_path / "config.json")
