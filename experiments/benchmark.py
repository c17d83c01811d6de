"""Speed benchmarks (recorded in the README, never asserted in tests).

    python -m experiments.benchmark [--model DIR] [--repeats 5] [--out runs/benchmark]

Measures (1) the overhead of FLOP counting: the same forward pass timed with and without an active
:class:`miniqwen.flops.FlopCounter`, interleaved, median of ``--repeats``, and the counter's bookkeeping alone (on a
24-layer model too narrow for the arithmetic to hide it); (2) prefill throughput (tokens/s) and
KV-cached decoding throughput at several batch sizes. Without ``--model`` it uses the Qwen2.5-0.5B shape with random
weights (same cost as the real model). Writes ``benchmark.json``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from miniqwen import FlopCounter, KVCache, Qwen2Config, Qwen2ForCausalLM, load_pretrained

from .results import write_json
from .settings import run_cli


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@torch.no_grad()
def counting_overhead(model, batch: int, seq_len: int, repeats: int) -> dict:
    """Median seconds of one forward pass [batch, seq_len] without and with a FlopCounter, and the overhead."""
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len))
    model(ids)  # warm-up

    def counted():
        with FlopCounter():
            model(ids)

    plain, with_counter = [], []
    for _ in range(repeats):  # interleaved, so drifts in machine load hit both alike
        plain.append(_time(lambda: model(ids)))
        with_counter.append(_time(counted))
    a, b = statistics.median(plain), statistics.median(with_counter)
    return {"batch": batch, "seq_len": seq_len, "seconds_plain": a, "seconds_counting": b,
            "overhead_percent": 100 * (b - a) / a}


def counting_bookkeeping(repeats: int = 300) -> dict:
    """Absolute cost of counting, isolated: a 24-layer model as narrow as possible (hidden 64), where the Python
    bookkeeping is all the counter adds, timed with and without counting (median of ``repeats``, interleaved).
    This is what counting adds to any 24-layer forward pass, whatever its width."""
    tiny = Qwen2ForCausalLM(Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=24,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()
    result = counting_overhead(tiny, 1, 8, repeats)
    result["added_ms"] = 1e3 * (result["seconds_counting"] - result["seconds_plain"])
    return result


@torch.no_grad()
def throughput(model, batch: int, prompt_len: int, new_tokens: int) -> dict:
    """Prefill tokens/s over ``batch × prompt_len`` and decode tokens/s over ``new_tokens`` cached steps."""
    cache = KVCache(model.config, batch, prompt_len + new_tokens, dtype=next(model.parameters()).dtype)
    ids = torch.randint(0, 1000, (batch, prompt_len))
    prefill = _time(lambda: model(ids, cache=cache, logits_to_keep=1))
    step = torch.randint(0, 1000, (batch, 1))
    decode = _time(lambda: [model(step, cache=cache) for _ in range(new_tokens)])
    return {"batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
            "prefill_tokens_per_s": batch * prompt_len / prefill, "decode_tokens_per_s": batch * new_tokens / decode,
            "decode_seconds_per_step": decode / new_tokens}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.benchmark", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="HF-layout model directory (default: random Qwen2.5-0.5B shape)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--out", type=Path, default=Path("runs/benchmark"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.model:
        model, _ = load_pretrained(args.model, dtype=torch.float32, device="cpu")
        label = str(args.model)
    else:
        model, label = Qwen2ForCausalLM(Qwen2Config()).eval(), "random weights, Qwen2.5-0.5B shape"
    bookkeeping = counting_bookkeeping()
    print(f"counting bookkeeping per 24-layer forward: {bookkeeping['added_ms']:.2f} ms")
    results = {"model": label, "counting_bookkeeping": bookkeeping, "device": "cpu", "dtype": "float32", "threads": torch.get_num_threads(),
               "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
               "counting_overhead": [counting_overhead(model, 1, n, args.repeats) for n in (1, 128, 512)],
               "throughput": [throughput(model, b, 256, 16) for b in (1, 8, 20)]}
    for r in results["counting_overhead"]:
        print(f"forward [1, {r['seq_len']:3d}]: {r['seconds_plain'] * 1e3:8.1f} ms plain, "
              f"{r['seconds_counting'] * 1e3:8.1f} ms counting  ({r['overhead_percent']:+.2f}%)")
    for r in results["throughput"]:
        print(f"batch {r['batch']:2d}: prefill {r['prefill_tokens_per_s']:7.1f} tok/s, decode "
              f"{r['decode_tokens_per_s']:7.1f} tok/s ({r['decode_seconds_per_step'] * 1e3:.0f} ms/step)")
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "benchmark.json", results)
    print(f"wrote {args.out / 'benchmark.json'}")
    return 0


if __name__ == "__main__":
    run_cli(main)
