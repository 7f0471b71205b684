"""The native CPU kernels (the optional `csmd_native` extension): whether they loaded, and why not.

The extension is built against one exact MLX version and checks it at import. If it is missing or fails to
load, csmd runs on the reference path and `csmd info` says so; nothing fails silently. `CSMD_KERNELS` picks:
`auto` (native on the CPU when loaded), `native` (insist: an error if it did not load) or `reference`.
`CSMD_MATVEC` picks how one-row quantized products round the activations: `auto` (the default: `int8` on the
AVX2 and AVX-512 VNNI kernels, the faster mode there, else `int16`), `int16` (~2e-5 relative per product),
`int8` (~0.6% per product for 4-bit weights; 8-bit ones keep int16) or `exact` (float).
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from types import ModuleType
from typing import Any

import mlx.core as mx

CHOICES = ("auto", "native", "reference")
MATVEC_MODES = ("auto", "int16", "int8", "exact")

module: ModuleType | None = None
load_error: str | None = None
try:
    import csmd_native as _native

    module = _native
except ImportError as exc:  # missing, or built for another MLX: both mean "reference path"
    load_error = str(exc) or type(exc).__name__


def apply_variant() -> str:
    """Select the extension's kernel variant from CSMD_VARIANT (default auto: the best this CPU runs), e.g.
    `avx2` on an AVX-512 machine to measure what an AVX2-only one would run; returns it. An unknown variant,
    or one this CPU cannot run, is a ValueError."""
    value = os.environ.get("CSMD_VARIANT", "auto")
    if module is not None:
        module.set_variant(value)
    return value


def apply_matvec_mode() -> str:
    """Set the extension's one-row rounding from CSMD_MATVEC (default auto); returns the mode."""
    value = os.environ.get("CSMD_MATVEC", "auto")
    if value not in MATVEC_MODES:
        raise ValueError(f"CSMD_MATVEC must be one of {', '.join(MATVEC_MODES)}, got {value!r}")
    if module is not None:
        module.set_matvec_mode(value)
    return value


if module is not None:
    apply_variant()
    apply_matvec_mode()


def choice() -> str:
    value = os.environ.get("CSMD_KERNELS", "auto")
    if value not in CHOICES:
        raise ValueError(f"CSMD_KERNELS must be one of {', '.join(CHOICES)}, got {value!r}")
    if value == "native" and module is None:
        raise RuntimeError(f"CSMD_KERNELS=native, but the native kernels did not load: {load_error}")
    return value


def active(device: mx.Device | None = None) -> bool:
    """Native kernels serve this device: the CPU, with the extension loaded and not switched off."""
    device = device or mx.default_device()
    return module is not None and device == mx.cpu and choice() != "reference"


def cpu_features() -> dict[str, Any]:
    """What the CPU offers (from the extension when loaded, else from the OS)."""
    if module is not None:
        return dict(module.cpu_features())
    arch = platform.machine()
    flags = _os_cpu_flags()
    if arch.lower() in ("arm64", "aarch64"):
        flags.add("asimd")  # Advanced SIMD is part of every ARMv8-A core (macOS does not list it)
    features: dict[str, Any] = {"arch": arch}
    for name in ("avx2", "fma", "avx512vnni", "asimd"):
        features[name] = name in flags
    return features


def _os_cpu_flags() -> set[str]:
    """The CPU's feature flags as the OS lists them, lowercase: /proc/cpuinfo on Linux, sysctl on macOS (Intel
    Macs; Apple silicon lists none of these); empty where neither answers."""
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/cpuinfo") as f:
                line = next((x for x in f if x.startswith(("flags", "Features"))), "")
        except OSError:
            return set()
        return set(line.partition(":")[2].lower().split())
    if sys.platform == "darwin":
        keys = ("machdep.cpu.features", "machdep.cpu.leaf7_features")
        try:
            out = subprocess.run(["sysctl", "-n", *keys], capture_output=True, text=True, timeout=5, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return set()
        return {flag.replace("1.0", "") for flag in out.stdout.lower().split()}  # "AVX1.0" is avx
    return set()


def describe() -> dict[str, Any]:
    """The `csmd info` lines about kernels."""
    features = cpu_features()
    present = [name for name, value in features.items() if value is True]
    info: dict[str, Any] = {"kernels": choice(), "cpu": " ".join([str(features.get("arch")), *present])}
    if module is None:
        info["native_extension"] = f"not loaded ({load_error}); the reference path runs"
    else:
        info["native_extension"] = (
            f"loaded (built for mlx {module.mlx_version}, variant {module.cpu_features().get('variant')}, "
            f"{module.num_threads()} threads, matvec {_matvec_setting()})"
        )
    return info


def _matvec_setting() -> str:
    """The matvec mode as `csmd info` shows it: `auto (int8)` names what auto means on this CPU."""
    assert module is not None
    mode, effective = module.get_matvec_mode(), module.get_effective_matvec_mode()
    return f"{mode} ({effective})" if mode == "auto" else mode
