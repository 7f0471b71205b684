"""Where and how MLX runs: device, memory and cache limits, and a report of what is in effect."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from csmd import _blas
from csmd.kernels import native

DEVICES = ("auto", "cpu", "gpu")


@dataclass(frozen=True)
class RuntimeSettings:
    device: str = "auto"  # auto: the GPU where MLX has one (Metal or CUDA), else the CPU
    memory_limit_gb: float | None = None  # MLX's soft limit on memory it allocates
    cache_limit_gb: float | None = None  # how much freed memory MLX may keep for reuse


def gpu_backend() -> str | None:
    if mx.metal.is_available():
        return "metal"
    if hasattr(mx, "cuda") and mx.cuda.is_available():
        return "cuda"
    return None


def apply(settings: RuntimeSettings) -> None:
    """Validate and apply; every problem is a ValueError that says what is allowed."""
    if settings.device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {settings.device!r}")
    backend = gpu_backend()
    if settings.device == "gpu" and backend is None:
        raise ValueError("device 'gpu' asked for, but this MLX build has no GPU backend here (use cpu)")
    use_gpu = settings.device == "gpu" or (settings.device == "auto" and backend is not None)
    mx.set_default_device(mx.gpu if use_gpu else mx.cpu)
    for name, value, setter in (
        ("memory_limit_gb", settings.memory_limit_gb, mx.set_memory_limit),
        ("cache_limit_gb", settings.cache_limit_gb, mx.set_cache_limit),
    ):
        if value is None:
            continue
        if value < 0:
            raise ValueError(f"{name} must be >= 0 GB, got {value}")
        setter(int(value * 2**30))
    _blas.check()


def describe() -> dict[str, Any]:
    """What `csmd info` prints: versions, device, backend and the limits in force."""
    device = mx.default_device()
    on_gpu = device == mx.gpu
    return {
        "mlx": getattr(mx, "__version__", "unknown"),
        "device": "gpu" if on_gpu else "cpu",
        "backend": gpu_backend() if on_gpu else "cpu",
        "gpu_available": gpu_backend() or "no",
        "cpu_blas": _blas.loaded or "MLX bundled (reference BLAS on Linux: slow fp32 matmul)",
        "memory_limit_gb": round(mx.get_memory_limit() / 2**30, 2),
        "cache_limit_gb": _cache_limit_gb(),
        "active_memory_gb": round(mx.get_active_memory() / 2**30, 3),
        "peak_memory_gb": round(mx.get_peak_memory() / 2**30, 3),
        **native.describe(),
    }


def _cache_limit_gb() -> float:
    # MLX has no getter for the cache limit; setting returns the previous value, so set it back.
    previous = mx.set_cache_limit(0)
    mx.set_cache_limit(previous)
    return round(previous / 2**30, 2)


def release_memory() -> None:
    """Give memory that is free but kept for reuse back to the system: MLX's buffer cache and, with glibc,
    the malloc arenas' free pages. For a long-running process after a load spike (the daemon calls it when
    sessions close, on its model thread); whatever is needed again is simply allocated again."""
    mx.clear_cache()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Any:
    if not sys.platform.startswith("linux"):
        return None  # other allocators (macOS's) return freed pages by themselves
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # a libc without it (musl): nothing more to give back
        return None
