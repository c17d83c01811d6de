"""The ``peak`` section: this machine's matmul peak (the denominator of every "fraction of peak") and its memory
read bandwidth (what decoding's weight reads are compared with)."""

from __future__ import annotations

import statistics

import torch

from .harness import MIB, timed


@torch.no_grad()
def matmul_peak(size: int, dtypes: list[str], repeats: int, device: torch.device) -> dict:
    """``{dtype: {"size", "gflops_per_s" (median), "gflops_per_s_best", "seconds_all"}}`` of a [size, size] ×
    [size, size] matmul (2·size³ FLOPs) on ``device``."""
    out = {}
    for name in dtypes:
        a, b = (torch.randn(size, size, device=device).to(getattr(torch, name)) for _ in range(2))
        a @ b  # warm-up
        seconds = [timed(lambda: a @ b, device) for _ in range(max(repeats, 3))]
        flops = 2 * size**3
        out[name] = {"size": size, "gflops_per_s": flops / statistics.median(seconds) / 1e9,
                     "gflops_per_s_best": flops / min(seconds) / 1e9, "seconds_all": seconds}
    return out


@torch.no_grad()
def memory_bandwidth(mib: int, repeats: int, device: torch.device) -> dict:
    """``{"mib", "gb_per_s_read" (median), "seconds_all"}``: summing a ``mib``-MiB float32 tensor on ``device``
    reads it once (GB = 10⁹ bytes); what decoding's weight reads are compared with. A copy, which also writes,
    gave about half this rate here."""
    x = torch.ones(mib * MIB // 4, device=device)
    x.sum()  # warm-up
    seconds = [timed(lambda: x.sum(), device) for _ in range(max(repeats, 3))]
    return {"mib": mib, "gb_per_s_read": mib * MIB / statistics.median(seconds) / 1e9, "seconds_all": seconds}
