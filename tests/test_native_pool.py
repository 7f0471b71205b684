"""The native thread pool hands a failure in any thread back to the caller (native/src/kernels/driver.h).

A worker's exception used to be swallowed, which left the rows of its chunk unwritten and the product silently
wrong. Now the caller rethrows it: through the extension's test hook for both kinds of pool job, and through
MLX for a real kernel that runs out of memory, it reaches Python as an exception.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import mlx.core as mx
import numpy as np
import pytest

if os.environ.get("CSMD_REQUIRE_NATIVE") == "1":
    import csmd_native
else:
    csmd_native = pytest.importorskip("csmd_native")


@pytest.fixture
def two_threads() -> Iterator[None]:
    before = csmd_native.num_threads()
    csmd_native.set_num_threads(2)
    yield
    csmd_native.set_num_threads(before)


@pytest.mark.parametrize("job", ["run", "chunks"])
@pytest.mark.parametrize(("error", "raised"), [("bad_alloc", MemoryError), ("runtime_error", RuntimeError)])
def test_a_worker_exception_reaches_the_caller(two_threads: None, job: str, error: str, raised: type) -> None:
    with pytest.raises(raised):
        csmd_native._pool_fault(job, error)


def test_the_pool_works_after_a_failed_job(two_threads: None) -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4096, 512), dtype=np.float32)
    x = rng.standard_normal((1, 512), dtype=np.float32)
    for job in ("run", "chunks"):
        with pytest.raises(RuntimeError):
            csmd_native._pool_fault(job, "runtime_error")
        got = np.array(csmd_native.matmul(mx.array(x), mx.array(w)))  # a chunked job on the same pool
        np.testing.assert_allclose(got, x @ w.T, rtol=1e-4, atol=1e-4)


def test_the_hook_checks_its_arguments() -> None:
    with pytest.raises(ValueError, match="job"):
        csmd_native._pool_fault("walk", "bad_alloc")
    with pytest.raises(ValueError, match="error"):
        csmd_native._pool_fault("run", "segfault")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS is enforced on Linux only")
def test_a_kernel_out_of_memory_is_a_python_error() -> None:
    """A 1 GiB input's many-row product needs a packed copy of it; with the address space capped below that,
    the allocation fails inside the kernel, on MLX's stream thread: the eval raises, the process lives on."""
    code = textwrap.dedent("""
        import resource, csmd, csmd_native, mlx.core as mx
        x, w = mx.ones((262144, 1024)), mx.ones((16, 1024))
        mx.eval(x, w, csmd_native.matmul(x[:70], w))  # the pool and the code paths exist before the cap
        with open("/proc/self/status") as f:
            vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize"))
        resource.setrlimit(resource.RLIMIT_AS, (vm + (300 << 20), resource.RLIM_INFINITY))
        try:
            mx.eval(csmd_native.matmul(x, w))
        except Exception as exc:
            print("raised", type(exc).__name__, exc)
        else:
            print("no error")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("raised") and "bad_alloc" in done.stdout, done.stdout
