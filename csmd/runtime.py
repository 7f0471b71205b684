"""Where and how MLX runs: device, memory and cache limits, and a report of what is in effect."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import mlx.core as mx

from csmd import _blas
from csmd.kernels import native

DEVICES = ("auto", "cpu", "gpu")
MLX_VERSION: str = mx.__version__  # type: ignore[attr-defined]


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


def jit_cache_dir() -> Path:
    """Where MLX's CPU backend keeps the kernels it compiles for `mx.compile`d graphs (csmd's Mimi steps):
    std::filesystem::temp_directory_path() / "mlx" / <version> / "cpu", the temp directory being the first of
    TMPDIR, TMP, TEMP and TEMPDIR that is set (libstdc++'s rule), else /tmp."""
    temp = next((os.environ[name] for name in ("TMPDIR", "TMP", "TEMP", "TEMPDIR") if os.environ.get(name)), "/tmp")
    return Path(temp) / "mlx" / MLX_VERSION / "cpu"


def jit_notice(device: mx.Device | None = None) -> str | None:
    """A line announcing MLX's first compilation of CPU kernels, or None when none is coming: on Linux, MLX
    compiles each new fused kernel with g++ (when `g++` runs) into jit_cache_dir() and reuses it from there
    in every later process, so only a run that finds the cache empty pays it."""
    device = device or mx.default_device()
    if device != mx.cpu or not sys.platform.startswith("linux") or shutil.which("g++") is None:
        return None
    cache = jit_cache_dir()
    if cache.is_dir() and any(cache.glob("*.so")):
        return None
    return (
        f"csmd: first run of MLX {MLX_VERSION} here: it compiles its fused CPU kernels with g++ into {cache} "
        "(seconds, up to half a minute on the reference path); later runs reuse them"
    )


def announce(file: TextIO | None = None) -> None:
    """Print, before the model loads, which kernels run and what that costs, and whether MLX is about to
    compile its CPU kernels for the first time (what `say`, `serve` and `talk` tell the user)."""
    out = file or sys.stderr
    print(native.status_line(), file=out)
    notice = jit_notice()
    if notice:
        print(notice, file=out)
