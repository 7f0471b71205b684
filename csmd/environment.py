"""The CSMD_* environment variables that tune csmd, each read and checked against what it allows.

| variable | values (default first) | read by |
| --- | --- | --- |
| CSMD_BLAS | auto, off, a library soname or path | _blas.py, when csmd is imported |
| CSMD_KERNELS | auto, native, reference | kernels/native.py, at every op |
| CSMD_VARIANT | auto, scalar, avx2, avx512vnni, neon (one this CPU runs) | kernels/native.py, at import |
| CSMD_MATVEC | auto, int16, int8, exact | kernels/native.py, at import |
| CSMD_PREFILL | auto, bf16, fp32 (bf16: a CPU with AVX-512 BF16) | kernels/native.py, at import |
| CSMD_THREADS | a whole number of threads, 1 to 256 (default: the physical cores) | the native thread pool |

An empty value means the default, as if unset. A bad value is a UserError that names the variable and what it
allows. Nothing raises it while csmd is imported: the modules keep what they found, `check()` raises it (the
CLI calls it before any command), and so does the first use of what the variable configures.
"""

from __future__ import annotations

import os
import re

from csmd.errors import UserError

KERNELS = ("auto", "native", "reference")
VARIANTS = ("auto", "scalar", "avx2", "avx512vnni", "neon")
MATVEC_MODES = ("auto", "int16", "int8", "exact")
PREFILL_MODES = ("auto", "bf16", "fp32")
MAX_THREADS = 256  # the native pool's limit (set_num_threads)


def value(name: str) -> str | None:
    """The variable's value, or None when it is unset or empty."""
    return os.environ.get(name) or None


def choice(name: str, allowed: tuple[str, ...]) -> str:
    """One of `allowed` (the first is the default); anything else is a UserError."""
    got = value(name)
    if got is None:
        return allowed[0]
    if got not in allowed:
        raise UserError(f"{name} must be one of {', '.join(allowed)}, got {got!r}")
    return got


def threads() -> int | None:
    """CSMD_THREADS as a number of threads, or None for the default."""
    got = value("CSMD_THREADS")
    if got is None:
        return None
    if not re.fullmatch(r"[0-9]+", got) or not 1 <= int(got) <= MAX_THREADS:
        raise UserError(f"CSMD_THREADS must be a whole number of threads from 1 to {MAX_THREADS}, got {got!r}")
    return int(got)


def check() -> None:
    """Raise the UserError of the first bad CSMD_* variable, if any (the CLI's first step)."""
    from csmd import _blas
    from csmd.kernels import native

    _blas.check_setting()
    native.check_environment()
