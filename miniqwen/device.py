"""Which dtype to compute in: bfloat16 where the hardware multiplies it natively, else float32.

bf16 halves the bytes of every weight read, and decoding one token at a time is bound by reading the weights, so
bf16 pays wherever the matmuls run on bf16 instructions: on CUDA GPUs, and on CPUs with AVX512-BF16 (Intel Cooper
Lake and later, AMD Zen 4 and later), AMX-BF16 (Intel Sapphire Rapids and later) or Arm's BF16 extension. On other
CPUs bf16 is emulated by converting to float32, which is slower than plain float32.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

#: CPU feature names (as in torch.cpu.get_capabilities() or /proc/cpuinfo) that mean native bf16 arithmetic.
BF16_CPU_FEATURES = ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16")


def _cpuinfo_flags(path: str | Path = "/proc/cpuinfo") -> set[str]:
    """The CPU feature flags listed in ``path`` (x86 ``flags``, Arm ``Features`` lines); empty if unreadable."""
    try:
        text = Path(path).read_text()
    except OSError:
        return set()
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return flags


@functools.cache
def cpu_supports_bf16() -> bool:
    """True when this CPU has native bf16 matmul instructions (any of :data:`BF16_CPU_FEATURES`).

    Asks torch (``torch.cpu.get_capabilities()``, torch >= 2.8) and, where torch does not say, the kernel's
    ``/proc/cpuinfo``. Never raises: False when neither can tell.
    """
    capabilities = getattr(torch.cpu, "get_capabilities", None)
    if capabilities is not None:
        try:
            caps = capabilities()
        except RuntimeError:
            caps = {}
        if any(caps.get(name, False) is True for name in BF16_CPU_FEATURES):
            return True
    return any(name in _cpuinfo_flags() for name in BF16_CPU_FEATURES)


def default_compute_dtype(device: torch.device | str) -> torch.dtype:
    """``torch.bfloat16`` on CUDA and on CPUs with native bf16 (:func:`cpu_supports_bf16`), else ``torch.float32``.

    Raises:
        RuntimeError: if ``device`` is not a valid device string (torch's error).
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16
    if device.type == "cpu" and cpu_supports_bf16():
        return torch.bfloat16
    return torch.float32
