"""Timing and memory of one call: wall seconds with CUDA work finished, medians of interleaved repeats, and the peak
memory a call needed (CUDA allocator, or the resident set high-water mark where Linux lets it be reset)."""

from __future__ import annotations

import gc
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

MIB = 2**20

_PROCESS_PEAK = 0  # the largest resident set seen, kept across the per-call resets below


def sync(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (CUDA; nothing to wait for on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device = torch.device("cpu")) -> float:
    """Wall seconds of ``fn()`` (CUDA work finished before and after)."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def _proc_status(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status (e.g. VmRSS, VmHWM) in bytes; None where there is no /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _max_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def reset_peak(device: torch.device) -> int:
    """Start measuring a call's peak memory: reset the high-water mark where the OS allows it (Linux:
    /proc/self/clear_refs; CUDA: the allocator's peak) and return the bytes in use now."""
    global _PROCESS_PEAK
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    _PROCESS_PEAK = max(_PROCESS_PEAK, _proc_status("VmHWM") or _max_rss_bytes())
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (and ru_maxrss) to the current RSS
    except OSError:
        pass
    return _proc_status("VmRSS") or 0


def peak_since(device: torch.device, start: int) -> float | None:
    """MiB the call since :func:`reset_peak` needed above what was in use at its start (None if the peak
    cannot be reset here, e.g. without /proc)."""
    global _PROCESS_PEAK
    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated(device) - start) / MIB
    peak = _proc_status("VmHWM")
    if peak is None:
        return None
    _PROCESS_PEAK = max(_PROCESS_PEAK, peak)
    return max(peak - start, 0) / MIB


def memory_method(device: torch.device) -> str:
    """How peak memory is measured on ``device`` (recorded in the results)."""
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated, reset before each call"
    if os.access("/proc/self/clear_refs", os.W_OK) and _proc_status("VmHWM") is not None:
        return ("resident set high-water mark (VmHWM) above the RSS at the call's start, reset before each call "
                "through /proc/self/clear_refs (memory the C heap kept from an earlier call and reuses is not seen; "
                "large tensors, which are mapped and unmapped, are)")
    return "not per call: only the process's max RSS (ru_maxrss, cumulative) is available"


def process_peak_mib(device: torch.device) -> float:
    """The most memory in use so far: the process's largest resident set (CPU; cumulative over all sections)
    or, on CUDA, the allocator's peak since the last per-call reset."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / MIB
    return max(_PROCESS_PEAK, _proc_status("VmHWM") or _max_rss_bytes()) / MIB


def measured(fn, device: torch.device):
    """``(fn(), wall seconds, peak extra MiB)`` of one call (see :func:`interleaved`)."""
    start = reset_peak(device)
    sync(device)
    t0 = time.perf_counter()
    value = fn()
    sync(device)
    seconds = time.perf_counter() - t0
    return value, seconds, peak_since(device, start)


def interleaved(calls: dict, repeats: int, device: torch.device) -> dict:
    """Run every ``calls[name]()`` ``repeats`` times, alternating which goes first; per name ``{"seconds"
    (median), "seconds_all", "peak_extra_mib" (most memory a call needed above what was in use before it)}``."""
    out = {name: {"seconds_all": [], "peak_extra_mib": None} for name in calls}
    names = list(calls)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            _, seconds, extra = measured(calls[name], device)
            out[name]["seconds_all"].append(seconds)
            if extra is not None:
                out[name]["peak_extra_mib"] = max(out[name]["peak_extra_mib"] or 0.0, extra)
    for result in out.values():
        result["seconds"] = statistics.median(result["seconds_all"])
    return out


def add_rates(times: dict, flops: int, dtype: str, peak: dict | None) -> None:
    """Add ``"gflops_per_s"`` (``flops`` / median seconds / 10⁹) to every side of ``times`` (from
    :func:`interleaved`), and ``"fraction_of_matmul_peak"`` where ``peak`` (from the ``peak`` section) has ``dtype``."""
    for result in times.values():
        result["gflops_per_s"] = flops / result["seconds"] / 1e9
        if peak and dtype in peak:
            result["fraction_of_matmul_peak"] = result["gflops_per_s"] / peak[dtype]["gflops_per_s"]


def dtype_names(default: str) -> list[str]:
    """The dtypes a section compares: float32, then ``default`` if it is another."""
    return ["float32"] + ([default] if default != "float32" else [])


def free_memory() -> None:
    """Give memory back after the caller has deleted its models."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
