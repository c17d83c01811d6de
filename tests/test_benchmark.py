"""The side-by-side benchmark (miniqwen vs transformers + PEFT) runs end to end on a tiny random model and simulated
data, and writes every section; no timing is asserted."""

import json

import pytest
import torch

from experiments import benchmark
from experiments.lib.benchmark.forecast_speed import forecast_side_by_side
from experiments.lib.benchmark.throughput import decode_weight_bytes

pytest.importorskip("transformers")
pytest.importorskip("peft")

SMALL = ["--repeats", "1", "--peak-size", "64", "--bandwidth-mib", "1", "--counting-lengths", "1,8",
         "--bookkeeping-repeats", "3", "--throughput-batches", "1,2", "--prompt-len", "8", "--new-tokens", "2", "--forward-batch", "2",
         "--forward-seq", "16", "--train-batch", "2", "--train-context", "16", "--loss-chunks", "2",
         "--loss-context", "16", "--loss-batch-size", "2", "--trajectories", "3", "--batch1-sample", "1",
         "--gen-batch-size", "2", "--context-steps", "8", "--horizon", "3", "--device", "cpu"]




def test_benchmark_writes_every_section(tiny_full_vocab, sim_file, tmp_path, capsys):
    out = tmp_path / "bench"
    code = benchmark.main(["--model", str(tiny_full_vocab), "--data", str(sim_file), "--out", str(out), *SMALL])
    assert code == 0
    results = json.loads((out / "benchmark.json").read_text())
    for key in ("weights", "model", "device", "dtype", "threads", "torch", "transformers", "peft", "memory_method",
                "settings", "data", "matmul_peak", "counting_bookkeeping", "counting_overhead", "throughput",
                "forward", "train", "loss", "forecast", "seconds", "peak_memory_mib_after", "targets"):
        assert key in results, key
    assert str(tmp_path) not in (out / "benchmark.json").read_text()  # no machine paths
    assert results["model"] == tiny_full_vocab.name
    dtypes = ["float32"] + ([results["dtype"]] if results["dtype"] != "float32" else [])
    assert list(results["matmul_peak"]) == dtypes
    assert results["memory_bandwidth"]["gb_per_s_read"] > 0
    for r in results["throughput"]:
        assert r["weights_gb_per_s"] > 0 and r["fraction_of_memory_bandwidth"] > 0
    for section, theirs in (("forward", "transformers"), ("train", "transformers_peft")):
        assert list(results[section]["by_dtype"]) == dtypes
        for r in results[section]["by_dtype"].values():
            for side in ("ours", theirs):
                assert {"seconds", "seconds_all", "gflops_per_s", "fraction_of_matmul_peak"} <= set(r[side])
            assert "speedup" in r
    fp32 = results["forward"]["by_dtype"]["float32"]
    assert fp32["max_abs_logit_difference"] < 1e-4
    first = results["train"]["by_dtype"]["float32"]["first_step_loss"]
    assert first["ours"] == pytest.approx(first["transformers_peft"], rel=1e-5)
    forecast = results["forecast"]
    assert forecast["trajectories"] == 3 and forecast["batch1"]["sample"] == 1
    for side in ("ours", "transformers_batched"):
        assert 0.0 <= forecast[side]["parsed_fraction"] <= 1.0
    assert forecast["transformers_constraints"]["allowed_tokens_only"] is True
    assert {"speedup_vs_transformers_batched", "speedup_vs_transformers_batch1"} <= set(forecast)
    assert all({"target", "value", "met", "note"} == set(t) for t in results["targets"])
    assert "| forward" in (out / "benchmark.md").read_text()


@torch.no_grad()
def test_forward_logits_equal_transformers_in_fp32(tiny_full_vocab):
    from experiments.lib.benchmark import hf as benchmark_hf
    from miniqwen import load_pretrained

    ours, _ = load_pretrained(tiny_full_vocab, dtype=torch.float32, device="cpu")
    theirs = benchmark_hf.load_model(tiny_full_vocab, torch.float32, torch.device("cpu"))
    ids = torch.randint(0, 151936, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ours(ids), theirs(input_ids=ids, use_cache=False).logits, rtol=1e-4, atol=1e-5)


def test_greedy_forecasts_agree_with_transformers_generate(tiny_full_vocab, sim_file):
    """Under the same constraints, transformers' generate continues the prompts as miniqwen does (fp32)."""
    result = forecast_side_by_side(tiny_full_vocab, str(sim_file), 3, 0, 2, "float32", torch.device("cpu"),
                                   context_steps=8, horizon=3)
    assert result["transformers_batched"]["same_text_as_ours"] == 1.0
    assert result["ours"]["parsed_fraction"] == result["transformers_batched"]["parsed_fraction"]


def test_unknown_section_is_a_usage_error():
    from experiments.lib.errors import UsageError

    with pytest.raises(UsageError, match="--sections"):
        benchmark.main(["--sections", "forward,nope"])


@pytest.mark.parametrize("tie", [True, False])
def test_decode_weight_bytes_counts_every_matrix_once_but_the_embedding(tie):
    from miniqwen import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=100, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    d, i, kv = 16, 24, 2 * 4  # kv = num_key_value_heads · head_dim
    layer = (d * d + d) + 2 * (d * kv + kv) + d * d + 3 * d * i + 2 * d  # q, k, v (+ biases), o, MLP, 2 norms
    head = 100 * d  # lm_head, read whole; the untied embedding is not counted (a step reads B of its rows)
    assert decode_weight_bytes(model) == 2 * (2 * layer + d + head)
