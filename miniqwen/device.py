"""Where to compute and in which dtype: the device ``auto`` picks, and the precision ``auto`` picks on it.

Device (``--device auto``, the default): CUDA if available, else Apple silicon's GPU (MPS) if available, else the CPU
(:func:`resolve_device`).

Precision (``--precision auto``, :func:`default_compute_dtype`):

* CUDA GPUs with native bf16 (compute capability >= 8.0: A100, H100, RTX 30xx and later): bfloat16, Qwen2.5's own
  dtype. Older GPUs (T4 — the free Colab GPU —, V100, capability 7.x) have no bf16 arithmetic: float16. Training
  then autocasts to float16 with a gradient scaler (``torch.amp.GradScaler``: the loss is scaled up before
  ``backward`` so that small gradients do not underflow float16, and steps whose gradients overflowed are
  skipped); the LoRA matrices stay float32 either way.
* Apple silicon (MPS): float16, which every Apple GPU computes natively. bfloat16 only when asked for and torch
  reports it on MPS (:func:`mps_supports_bf16`; macOS 14 and later).
* CPUs: bfloat16 where the matmuls run on bf16 instructions — AVX512-BF16 (Intel Cooper Lake and later, AMD Zen 4
  and later), AMX-BF16 (Intel Sapphire Rapids and later) or Arm's BF16 extension — else float32. bf16 halves the
  bytes of every weight read, and decoding one token at a time is bound by reading the weights, so bf16 pays where
  it is native. Elsewhere PyTorch's own bf16 matmuls are a slow fallback, so ``--precision bfloat16`` there runs
  them in float32 kernels on the bf16 values (:mod:`miniqwen.emulation`; the stages switch it on), and auto picks
  float32, the more precise of two at about the same speed. float16 is never chosen on a CPU (few CPUs multiply it
  natively), though ``--precision float16`` works there.

float16 has bf16's precision or better but a far smaller range (largest value 65,504, against bf16's and float32's
~3.4e38). Qwen2.5's activations stay finite in float16 on the tiny test model (``tests/test_device.py`` checks every
module's output); should a model's activations overflow it on some input, the loss or logits turn inf/NaN. The
fallback is float32 (``--precision float32``), or bfloat16 where the device has it: training stops with
:data:`FLOAT16_OVERFLOW` rather than train on a non-finite loss.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

#: CPU feature names (as in torch.cpu.get_capabilities() or /proc/cpuinfo) that mean native bf16 arithmetic.
BF16_CPU_FEATURES = ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16")

#: the first CUDA compute capability with native bf16 arithmetic (Ampere, sm_80)
BF16_CUDA_CAPABILITY = (8, 0)

#: the advice given when float16 overflows (a non-finite loss or logits)
FLOAT16_OVERFLOW = ("float16 overflowed (the model's activations exceeded float16's range, 65504): rerun with "
                    "--precision float32, or --precision bfloat16 where the device has it (CUDA compute capability "
                    ">= 8.0, CPUs with native bf16)")


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


def cuda_supports_bf16(device: torch.device | str = "cuda") -> bool:
    """True when the CUDA GPU ``device`` has native bf16 arithmetic: compute capability >= 8.0
    (``torch.cuda.get_device_capability``). Where the capability cannot be read (no CUDA here) it is assumed
    modern: True."""
    try:
        capability = torch.cuda.get_device_capability(torch.device(device))
    except (AssertionError, RuntimeError):  # torch without CUDA, or no GPU: nothing to ask
        return True
    return tuple(capability) >= BF16_CUDA_CAPABILITY


def mps_available() -> bool:
    """True when torch can compute on Apple silicon's GPU (``torch.backends.mps.is_available()``)."""
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


@functools.cache
def mps_supports_bf16() -> bool:
    """True when torch reports bfloat16 on MPS: it is available and a bf16 tensor can be made there (macOS 14 and
    later; torch raises on older systems). Never raises."""
    if not mps_available():
        return False
    try:
        torch.ones(1, dtype=torch.bfloat16, device="mps")
    except (RuntimeError, TypeError):
        return False
    return True


def resolve_device(requested: str | torch.device | None = None) -> torch.device:
    """``requested`` as a torch device; None or ``"auto"``: CUDA if available, else MPS if available, else CPU.

    Raises:
        RuntimeError: ``requested`` is not a valid device string (torch's error).
    """
    if requested is None or str(requested) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if mps_available() else "cpu")
    return torch.device(requested)


def default_compute_dtype(device: torch.device | str) -> torch.dtype:
    """The dtype ``--precision auto`` computes in on ``device`` (see the module docstring): on CUDA bfloat16 with
    compute capability >= 8.0 (:func:`cuda_supports_bf16`), else float16; float16 on MPS; on the CPU bfloat16 with
    native bf16 matmuls (:func:`cpu_supports_bf16`), else float32; float32 anywhere else.

    Raises:
        RuntimeError: if ``device`` is not a valid device string (torch's error).
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if cuda_supports_bf16(device) else torch.float16
    if device.type == "mps":
        return torch.float16
    if device.type == "cpu" and cpu_supports_bf16():
        return torch.bfloat16
    return torch.float32


def unsupported_precision(device: torch.device | str, precision: str) -> str | None:
    """Why ``precision`` (a dtype name) cannot run on ``device``, or None when it can. Only bfloat16 on an MPS
    device without it (:func:`mps_supports_bf16`) is refused; everything else runs (bf16 on a CUDA GPU older than
    capability 8.0 is emulated, slowly, but runs)."""
    if torch.device(device).type == "mps" and precision == "bfloat16" and not mps_supports_bf16():
        return "this torch/macOS has no bfloat16 on MPS (it needs macOS 14 or later): use float16 or float32"
    return None


def emulated_precision(device: torch.device | str, precision: str) -> str | None:
    """A one-line note when ``precision`` (a dtype name) runs on ``device`` without native arithmetic, else None:
    bfloat16 on a CPU without bf16 matmul instructions (:func:`cpu_supports_bf16` False). There PyTorch's own bf16
    matmuls are a slow fallback — measured on a 2-core AMD EPYC with AVX2 only (torch 2.13,
    ``results/benchmark_avx2/``): a 2048 x 2048 matmul at 0.31 GFLOP/s against 85 in float32, and a LoRA training
    step (batch 4 x 512) not finished after 5 minutes against 32 s in float32 — so the stages then run bf16 matmuls
    through :class:`miniqwen.emulation.Float32Matmuls` (float32 kernels on the bf16 values, about float32's
    speed)."""
    if torch.device(device).type == "cpu" and precision == "bfloat16" and not cpu_supports_bf16():
        return ("note: this CPU has no native bf16 arithmetic (AVX512-BF16, AMX-BF16 or Arm BF16), so bfloat16 is "
                "emulated: its matmuls run as float32 kernels on the bf16 values, at about float32's speed "
                "(--precision auto picks float32 here)")
    return None
