"""The native CPU kernels (the `csmd_native` extension, built when csmd is installed): whether they loaded,
and why not.

The extension is built against one exact MLX version and checks it at import. If it was not built (csmd
installed with CSMD_BUILD_NATIVE=0) or fails to load, csmd runs on the reference path: `csmd info` says so, and
`status_line()` is the one line `say`, `serve` and `talk` print about it. `CSMD_KERNELS` picks:
`auto` (native on the CPU when loaded), `native` (insist: an error if it did not load) or `reference`.
`CSMD_MATVEC` picks how one-row quantized products round the activations: `auto` (the default: `int8` on the
AVX2 and AVX-512 VNNI kernels, the faster mode there, else `int16`), `int16` (~2e-5 relative per product),
`int8` (~0.6% per product for 4-bit weights; 8-bit ones keep int16) or `exact` (float). `CSMD_PREFILL` picks
how products of many rows (a prefill) with quantized or bf16 weights compute: `auto` (the default: `bf16` where
the CPU multiplies bf16 pairs natively, AVX-512 BF16, else `fp32`), `bf16` (activations and weights rounded to
bf16, fp32 sums: ~2e-3 relative per product) or `fp32`; fp32 weights always compute in fp32. `CSMD_VARIANT` and
`CSMD_THREADS`: see csmd/environment.py, which checks every one of them.
"""

from __future__ import annotations

import platform
import subprocess
import sys
from types import ModuleType
from typing import Any

import mlx.core as mx

from csmd import environment
from csmd.errors import UserError

CHOICES = environment.KERNELS
MATVEC_MODES = environment.MATVEC_MODES
PREFILL_MODES = environment.PREFILL_MODES

# What the reference path costs on the CPU: BENCHMARKS.md's 4-bit csm-1b frame through MLX's own ops, against
# the native kernels' frame in README's status.
REFERENCE_COST = "a 4-bit csm-1b frame about 60x slower; see the README, section Kernels"

module: ModuleType | None = None
load_error: str | None = None
try:
    import csmd_native as _native

    module = _native
except ModuleNotFoundError as exc:
    if exc.name not in ("csmd_native", "csmd_native._ext", "csmd_native._build_info"):
        raise  # a dependency of the extension is missing: a broken install, not a choice
    load_error = "not built (csmd was installed with CSMD_BUILD_NATIVE=0, or not installed)"
except ImportError as exc:  # built for another MLX, or a library it links did not load
    load_error = str(exc) or type(exc).__name__


def apply_variant() -> str:
    """Select the extension's kernel variant from CSMD_VARIANT (default auto: the best this CPU runs), e.g.
    `avx2` on an AVX-512 machine to measure what an AVX2-only one would run; returns it. An unknown variant,
    or one this CPU cannot run, is a UserError."""
    value = environment.choice("CSMD_VARIANT", environment.VARIANTS)
    if module is not None:
        try:
            module.set_variant(value)
        except ValueError:
            raise UserError(
                f"CSMD_VARIANT must be auto or a kernel variant this CPU runs ({', '.join(_runnable_variants())}), "
                f"got {value!r}"
            ) from None
    return value


def _runnable_variants() -> list[str]:
    assert module is not None
    current = module.cpu_features()["variant"]
    runnable = []
    for name in environment.VARIANTS[1:]:
        try:
            module.set_variant(name)
        except ValueError:
            continue
        runnable.append(name)
    module.set_variant(current)
    return runnable


def apply_matvec_mode() -> str:
    """Set the extension's one-row rounding from CSMD_MATVEC (default auto); returns the mode."""
    value = environment.choice("CSMD_MATVEC", MATVEC_MODES)
    if module is not None:
        module.set_matvec_mode(value)
    return value


def apply_prefill_mode() -> str:
    """Set the extension's many-row products from CSMD_PREFILL (default auto); returns the setting. `bf16` on
    kernels without the bf16 GEMM (a CPU without AVX-512 BF16, or CSMD_VARIANT below avx512vnni) is a UserError."""
    value = environment.choice("CSMD_PREFILL", PREFILL_MODES)
    if module is not None:
        try:
            if not hasattr(module, "set_prefill_mode"):  # a build from before the setting: fp32 only
                if value == "bf16":
                    raise ValueError(value)
                return value
            module.set_prefill_mode(value)
        except ValueError:
            variant = module.cpu_features()["variant"]
            raise UserError(
                f"CSMD_PREFILL=bf16 needs a CPU with AVX-512 BF16 and the avx512vnni kernels (this one runs "
                f"{variant}); use auto or fp32"
            ) from None
    return value


def _apply_environment() -> UserError | None:
    """Apply CSMD_VARIANT, CSMD_MATVEC and CSMD_PREFILL and check every variable of the kernels; the first bad
    one is kept (not raised: this runs at import) for check_environment() and the first kernel op to raise."""
    try:
        apply_variant()
        apply_matvec_mode()
        apply_prefill_mode()
        environment.threads()  # read by the extension's thread pool itself (qmatmul.cpp)
        environment.choice("CSMD_KERNELS", CHOICES)
    except UserError as exc:
        return exc
    return None


environment_error = _apply_environment()


def check_environment() -> None:
    """Raise the UserError of a bad CSMD_KERNELS, CSMD_VARIANT, CSMD_MATVEC, CSMD_PREFILL or CSMD_THREADS, if
    any."""
    if environment_error is not None:
        raise environment_error
    choice()


def choice() -> str:
    value = environment.choice("CSMD_KERNELS", CHOICES)
    if value == "native" and module is None:
        raise UserError(f"CSMD_KERNELS=native, but the native kernels did not load: {load_error}")
    return value


def active(device: mx.Device | None = None) -> bool:
    """Native kernels serve this device: the CPU, with the extension loaded and not switched off."""
    if environment_error is not None:
        raise environment_error
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
    for name in ("avx2", "fma", "avx512vnni", "avx512bf16", "asimd"):
        features[name] = name in flags or name.replace("avx512", "avx512_") in flags  # Linux: avx512_vnni
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
        info["native_extension"] = f"{_short(load_error)}; the reference path runs"
    else:
        info["native_extension"] = (
            f"loaded (built for mlx {module.mlx_version}, variant {module.cpu_features().get('variant')}, "
            f"{_threads()}, matvec {_matvec_setting()}, prefill {_prefill_setting()})"
        )
    return info


def _matvec_setting() -> str:
    """The matvec mode as `csmd info` shows it: `auto (int8)` names what auto means on this CPU."""
    assert module is not None
    mode, effective = module.get_matvec_mode(), module.get_effective_matvec_mode()
    return f"{mode} ({effective})" if mode == "auto" else mode


def _prefill_setting() -> str:
    """The prefill mode as `csmd info` shows it: `auto (bf16)` names what auto means here. An extension built
    before the setting existed computes every prefill in fp32."""
    assert module is not None
    if not hasattr(module, "get_prefill_mode"):
        return "fp32"
    mode, effective = module.get_prefill_mode(), module.get_effective_prefill_mode()
    return f"{mode} ({effective})" if mode == "auto" else mode


def status_line(device: mx.Device | None = None) -> str:
    """One line on which kernels run on `device` (default: MLX's default device) and, when it is the
    reference path on the CPU, why and what that costs."""
    device = device or mx.default_device()
    if device != mx.cpu:
        return "csmd: running on the GPU with MLX's own kernels"
    setting = choice()
    if module is None:
        return f"csmd: native CPU kernels {_short(load_error)}; the reference path runs, {REFERENCE_COST}"
    if setting == "reference":
        return f"csmd: CSMD_KERNELS=reference: the reference path runs (MLX's own ops), {REFERENCE_COST}"
    features = module.cpu_features()
    return (
        f"csmd: native CPU kernels ({features.get('variant')}, {_threads()}, matvec {_matvec_setting()}, "
        f"prefill {_prefill_setting()})"
    )


def _threads() -> str:
    assert module is not None
    n = module.num_threads()
    return f"{n} thread" if n == 1 else f"{n} threads"


def _short(reason: str | None) -> str:
    reason = reason or "not loaded"
    return reason if reason.startswith("not built") else f"not loaded ({reason})"
