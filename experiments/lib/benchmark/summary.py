"""What a benchmark run records about itself, the targets of the speed issue judged from its results, and the
README-ready Markdown table of them."""

from __future__ import annotations

import platform
from pathlib import Path

import torch

from miniqwen import cpu_supports_bf16

from ..loader import weights_label
from . import hf
from .harness import memory_method


def run_record(model: str, device: torch.device, dtype: str, sections: list[str], settings: dict) -> dict:
    """The head of ``benchmark.json``: the weights (label and directory name, never a path), device, default
    ``dtype``, threads, machine, library versions, how memory is measured, the ``sections`` run and ``settings``."""
    return {"benchmark": 2, "weights": weights_label(model), "model": Path(model).name,
            "device": str(device), "dtype": dtype, "threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(),
            "cpu_native_bf16": cpu_supports_bf16(), "torch": torch.__version__, **hf.versions(),
            "python": platform.python_version(), "memory_method": memory_method(device), "sections": sections,
            "settings": settings}


def _row(target: str, value: float, met: bool | None, note: str = "") -> dict:
    return {"target": target, "value": value, "met": met, "note": note}


def _training_targets(results: dict) -> list[dict]:
    train, default = results.get("train", {}).get("by_dtype", {}), results["dtype"]
    if "float32" not in train or default not in train:
        return []
    speed = train["float32"]["transformers_peft"]["seconds"] / train[default]["ours"]["seconds"]
    return [_row(f"training step, ours in {default} >= 2.5x transformers+PEFT in float32", speed, speed >= 2.5)]


def _loss_targets(results: dict) -> list[dict]:
    default = results["dtype"]
    if "loss" not in results or default == "float32":
        return []
    rel = results["loss"]["relative_difference_percent"]
    return [_row(f"validation loss in {default} within 0.5% of float32", rel, abs(rel) <= 0.5,
                 f"{results['loss']['chunks']} validation chunks")]


def _forecast_targets(results: dict) -> list[dict]:
    if "forecast" not in results:
        return []
    f = results["forecast"]
    n, full = f["trajectories"], f["trajectories"] == 100
    note = "" if full else f"measured on {n} trajectories, scaled to 100: not judged"
    rows = [_row("forecasting the 100 validation trajectories in < 5 min", f["ours"]["seconds"] * 100 / n,
                 f["ours"]["seconds"] < 300 if full else None, note)]
    if f["speedup_vs_transformers_batch1"] is not None:
        rows.append(_row(">= 20x transformers generate at batch 1", f["speedup_vs_transformers_batch1"],
                         f["speedup_vs_transformers_batch1"] >= 20,
                         f"batch 1 extrapolated from {f['batch1']['sample']}"))
    rows.append(_row(">= 4x transformers generate batched", f["speedup_vs_transformers_batched"],
                     f["speedup_vs_transformers_batched"] >= 4))
    ours_p, their_p = f["ours"]["parsed_fraction"], f["transformers_batched"]["parsed_fraction"]
    rows.append(_row("same parse rate as transformers generate", ours_p - their_p, ours_p >= their_p,
                     f"ours {ours_p:.0%}, transformers {their_p:.0%}"))
    return rows


def _decoding_targets(results: dict) -> list[dict]:
    batch1 = [r for r in results.get("throughput", []) if r["batch"] == 1 and "fraction_of_memory_bandwidth" in r]
    if not batch1:
        return []
    fraction = batch1[0]["fraction_of_memory_bandwidth"]
    return [_row("decoding at batch 1 reads the weights at >= 60% of the memory bandwidth", fraction, fraction >= 0.6,
                 f"{batch1[0]['weights_gb_per_s']:.1f} GB/s of weights, "
                 f"memory read at {results['memory_bandwidth']['gb_per_s_read']:.1f} GB/s")]


def _forward_targets(results: dict) -> list[dict]:
    bf16 = results.get("forward", {}).get("by_dtype", {}).get("bfloat16", {}).get("ours", {})
    if "fraction_of_matmul_peak" not in bf16:
        return []
    return [_row("bf16 forward >= 70% of the bf16 matmul peak", bf16["fraction_of_matmul_peak"],
                 bf16["fraction_of_matmul_peak"] >= 0.7)]


def check_targets(results: dict) -> list[dict]:
    """The speed issue's targets, each ``{"target", "value", "met" (None = not judged), "note"}``, from what the
    run measured (a target whose section did not run is left out)."""
    return (_training_targets(results) + _loss_targets(results) + _forecast_targets(results)
            + _decoding_targets(results) + _forward_targets(results))


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 120 else f"{seconds:.1f} s"


def _pct(r: dict) -> str:
    return f" ({r['fraction_of_matmul_peak']:.0%} of peak)" if "fraction_of_matmul_peak" in r else ""


def _side_by_side_lines(results: dict) -> list[str]:
    lines = []
    for key, theirs, label in (("forward", "transformers", "forward {batch} × {seq_len}"),
                               ("train", "transformers_peft", "LoRA training step {batch} × {context_length}")):
        section = results.get(key)
        for dtype, r in (section or {}).get("by_dtype", {}).items():
            lines.append(f"| {label.format(**section)} | {dtype} | {r['ours']['seconds']:.2f} s{_pct(r['ours'])} | "
                         f"{r[theirs]['seconds']:.2f} s{_pct(r[theirs])} | {r['speedup']:.2f}× |")
    return lines


def _forecast_lines(f: dict) -> list[str]:
    b1 = f["batch1"]["extrapolated_seconds"]
    lines = [f"| forecast {f['trajectories']} trajectories, batch {f['batch_size']} | {f['dtype']} | "
             f"{_duration(f['ours']['seconds'])}, {f['ours']['parsed_fraction']:.0%} parsed | "
             f"{_duration(f['transformers_batched']['seconds'])}, "
             f"{f['transformers_batched']['parsed_fraction']:.0%} parsed | "
             f"{f['speedup_vs_transformers_batched']:.1f}× |"]
    if f["speedup_vs_transformers_batch1"] is not None:
        lines += [f"| same, batch 1 (extrapolated from {f['batch1']['sample']}) | {f['dtype']} | "
                  f"{_duration(b1['ours'])} | {_duration(b1['transformers'])} | "
                  f"{f['speedup_vs_transformers_batch1']:.1f}× (vs ours batched) |"]
    return lines


def _throughput_lines(results: dict) -> list[str]:
    lines = []
    for r in results.get("throughput", []):
        share = (f" ({r['fraction_of_memory_bandwidth']:.0%} of the read bandwidth)"
                 if "fraction_of_memory_bandwidth" in r else "")
        lines += [f"| decoding step, batch {r['batch']}, full head (miniqwen only) | {results['dtype']} | "
                  f"{1e3 * r['decode_seconds_per_step']:.0f} ms, weights read at {r['weights_gb_per_s']:.1f} GB/s"
                  f"{share} | | |"]
    return lines


def _target_lines(targets: list[dict]) -> list[str]:
    lines = ["", "| target | measured | met |", "| --- | ---: | --- |"]
    for t in targets:
        met = "not judged" if t["met"] is None else ("met" if t["met"] else "**not met**")
        lines.append(f"| {t['target']} | {t['value']:.3g} | {met}{' — ' + t['note'] if t['note'] else ''} |")
    return lines


def markdown(results: dict) -> str:
    """A README table of the side-by-side sections and the targets."""
    lines = [f"Weights: {results['weights']}; {results['device']}, {results['threads']} threads, torch "
             f"{results['torch']}, transformers {results['transformers']}, peft {results['peft']}.", "",
             "| measurement | dtype | miniqwen | transformers(+PEFT) | ratio |", "| --- | --- | ---: | ---: | ---: |"]
    lines += _side_by_side_lines(results)
    if "forecast" in results:
        lines += _forecast_lines(results["forecast"])
    lines += _throughput_lines(results)
    if "matmul_peak" in results:
        lines += ["", "Matmul peak: " + ", ".join(f"{d} {r['gflops_per_s']:.3g} GFLOP/s ({r['size']}²)"
                                                  for d, r in results["matmul_peak"].items()) + "."]
    if results.get("targets"):
        lines += _target_lines(results["targets"])
    return "\n".join(lines) + "\n"
