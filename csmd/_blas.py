"""Give MLX's CPU backend a fast BLAS on Linux, before `mlx.core` is first imported.

MLX's Linux wheels link the netlib *reference* BLAS, which runs fp32 matmuls (the whole CPU path of an fp32
model) about 35x slower than OpenBLAS or BLIS. libmlx resolves `cblas_sgemm` through the global symbol
scope, so loading a fast library with RTLD_GLOBAL first makes MLX use it. The choice is checked against
numpy once MLX is imported; a mismatch is reported, never hidden (see `check`).

CSMD_BLAS selects it: "auto" (default: BLIS, then OpenBLAS, if installed), "off", or a library path/soname.
Imported after mlx.core, csmd can no longer do this, and warns. A library that does not load is a UserError,
raised by `check_setting()` and `check()` rather than while csmd is imported.
"""

from __future__ import annotations

import ctypes
import os
import sys
import warnings

from csmd import environment
from csmd.errors import UserError

_AUTO = ("libblis.so.4", "libopenblas.so.0")
loaded: str | None = None  # the library in use, or None for MLX's bundled one
problem: UserError | None = None  # CSMD_BLAS named a library that did not load


def preload() -> str | None:
    global loaded, problem
    choice = environment.value("CSMD_BLAS") or "auto"
    if choice == "off" or not sys.platform.startswith("linux"):
        return None
    if "mlx.core" in sys.modules:  # too late: libmlx has bound its BLAS symbols
        warnings.warn(
            "mlx.core was imported before csmd, so MLX keeps its bundled reference BLAS (fp32 matmuls about 35x "
            "slower); import csmd first (or set CSMD_BLAS=off to keep MLX's BLAS without this warning)",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    # BLIS runs one thread unless told otherwise; a second core halves prefill (BENCHMARKS.md).
    os.environ.setdefault("BLIS_NUM_THREADS", str(os.cpu_count() or 1))
    for name in _AUTO if choice == "auto" else (choice,):
        try:
            ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            if choice != "auto":
                problem = UserError(
                    f"CSMD_BLAS must be auto, off, or the soname or path of a BLAS library that loads (such as "
                    f"{' or '.join(_AUTO)}), got {choice!r}"
                )
            continue
        loaded = name
        return name
    return None


def check_setting() -> None:
    """Raise the UserError of a CSMD_BLAS that named a library that did not load."""
    if problem is not None:
        raise problem


def check() -> None:
    """Compare an MLX matmul with numpy's; raise if the preloaded BLAS gives wrong numbers (or the setting
    was bad)."""
    check_setting()
    if loaded is None:
        return
    import mlx.core as mx
    import numpy as np

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((64, 96), dtype=np.float32), rng.standard_normal((96, 33), dtype=np.float32)
    ours = np.array(mx.array(a) @ mx.array(b))
    if not np.allclose(ours, a @ b, rtol=1e-3, atol=1e-3):
        raise RuntimeError(f"{loaded} gives wrong matmul results with MLX; run with CSMD_BLAS=off")
