"""Where and in which precision a model runs: the device, autocast's dtype and default, and glibc's malloc
setting for CPU training (`reuse_freed_memory`)."""
from __future__ import annotations

import ctypes
import platform

import torch


def amp_dtype(device: torch.device) -> torch.dtype:
    """Autocast precision: bf16 where the hardware has it (no loss scaling needed), else fp16 on CUDA."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16


def cpu_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX-512 BF16 or AMX). Without it autocast emulates
    bf16: on an AVX2 EPYC EfficientNet-Lite0 128 trained at 3.2 img/s under autocast against 33 in
    fp32. torch exposes the check only privately, so an older or newer torch without it says no."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def slow_amp_warning(device: torch.device) -> str | None:
    """One line when autocast on `device` would be slower than fp32 (a CPU without native bf16)."""
    if device.type != "cpu" or cpu_native_bf16():
        return None
    return ("this CPU has no native bf16 (no AVX-512 BF16 or AMX), so autocast emulates it: about 10x "
            "slower than fp32 (measured 3.2 against 33 img/s); drop --amp True")


def default_amp(device: torch.device) -> bool:
    """train.py's default precision: autocast on CUDA. Off on a CPU even with native bf16: there bf16
    trained EfficientNet-Lite0 128 about 1.5x faster, but in 5-fold person CVs on real faces it changed
    macro F1 by -0.040 (95% interval -0.077 to -0.003) with the 3-bin age head and by +0.018 (-0.015
    to +0.051) with the years head (docs/results.md, "What wins"): not safe by default, so opt-in (--amp True)."""
    return device.type == "cuda"


def default_reuse_memory(device: torch.device) -> bool:
    """train.py's --reuse_memory default: on where the model runs on the CPU (`reuse_freed_memory`)."""
    return device.type == "cpu"


def reuse_freed_memory() -> bool:
    """Make glibc's malloc keep the memory a process frees and hand it out again.

    By default glibc maps every block over 32 MiB afresh and unmaps it when freed (smaller ones
    also go back once the heap's free top passes a threshold); the kernel then zero-fills each 4 KiB
    page on its first touch, every training step, for every activation and every float batch. Kept
    in the heap, the same pages are reused. Measured on 2 cores, side by side (docs/benchmark.md):
    training steps 7-9% faster (DlibFaceResNet 150, EfficientNet-Lite0 128), a 64x3x224x224 float
    batch made from uint8 in about half the time. Resident memory stays at the run's peak
    instead of falling back between steps. Process-wide and lasting: call it once, in a CPU run's
    main process, before the DataLoader forks its workers (they inherit it). False where the C library
    is not glibc (macOS, Windows, musl): nothing changes there."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process already runs on
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    # no mmap'd blocks at all (so large ones come from the reusable heap), and never trim the heap
    return mallopt(m_mmap_max, 0) == 1 and mallopt(m_trim_threshold, 2**31 - 1) == 1


def resolve_device(name: str = "auto") -> torch.device:
    """`auto`: the first CUDA device when there is one, else the CPU; otherwise torch's own names.
    A CUDA or MPS device this machine lacks is a ValueError here, not a driver traceback at the
    first tensor moved to it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown --device {name!r}; e.g. auto, cpu, cuda, cuda:1") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: no CUDA device is available on this machine; use --device cpu or auto")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"--device {name}: this machine has {count} CUDA device(s), "
                             f"cuda:0..cuda:{count - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS (Apple GPU) is not available on this machine; use --device cpu or auto")
    return device
