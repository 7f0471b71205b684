"""What this machine can do at best: DRAM read bandwidth with all cores, and the fp32 GEMM rate.

These are the denominators of `csmd bench frame`'s floors: a batch-1 frame reads every weight once per
use and does two FLOPs per weight, so it is bound by DRAM bandwidth; a 300-row prefill reuses each
weight 300 times, so it is bound by the matmul rate.

Bandwidth kernels stream a buffer far larger than the last-level cache (512 MiB against tens of MiB of
L3), so every byte comes from DRAM, and do one multiply-add or less per element read, so arithmetic never
limits them. Whichever kernel reads fastest is taken: what the hardware can do is a maximum, and a slow
kernel only measures itself (MLX's `mx.sum` runs on one thread and reads at a tenth of the others here).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import mlx.core as mx
import numpy as np

MIB = 2**20


@dataclass
class MachineRates:
    bandwidth_gbs: float  # best of the read kernels, 1e9 bytes per second
    gemm_gflops: float  # MLX fp32 matmul through the BLAS csmd preloads
    read_numpy_dot_gbs: float
    read_mlx_matvec_gbs: float
    read_mlx_sum_gbs: float
    gemm_numpy_gflops: float  # for reference: numpy's own OpenBLAS on the same shapes
    buffer_mib: int
    gemm_size: int

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _best_seconds(run: Callable[[], object], repeats: int) -> float:
    """Fastest of `repeats` timed calls after one untimed one (page faults, thread start-up, caches)."""
    run()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def read_numpy_dot(buffer_bytes: int, repeats: int) -> float:
    """GB/s of np.dot(x, x) over float64: OpenBLAS's ddot splits the vector over all cores (2 FLOPs / 8 bytes)."""
    x = np.random.default_rng(0).standard_normal(buffer_bytes // 8)
    return buffer_bytes / _best_seconds(lambda: np.dot(x, x), repeats) / 1e9


def read_mlx_matvec(buffer_bytes: int, repeats: int) -> float:
    """GB/s of an fp32 [rows, 4096] @ [4096] matvec in MLX: the very sgemv a batch-1 frame runs per weight."""
    cols = 4096
    m = mx.random.uniform(shape=(max(1, buffer_bytes // 4 // cols), cols))
    v = mx.ones((cols,))
    mx.eval(m, v)
    return m.nbytes / _best_seconds(lambda: mx.eval(m @ v), repeats) / 1e9


def read_mlx_sum(buffer_bytes: int, repeats: int) -> float:
    """GB/s of mx.sum over fp32: MLX's own reduction (one thread on CPU, so usually not the best)."""
    x = mx.random.uniform(shape=(buffer_bytes // 4,))
    mx.eval(x)
    return x.nbytes / _best_seconds(lambda: mx.eval(mx.sum(x)), repeats) / 1e9


def gemm_mlx(n: int, repeats: int) -> float:
    """GFLOP/s of an fp32 n x n x n MLX matmul (2 n^3 FLOPs)."""
    a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
    mx.eval(a, b)
    return 2 * n**3 / _best_seconds(lambda: mx.eval(a @ b), repeats) / 1e9


def gemm_numpy(n: int, repeats: int) -> float:
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)
    return 2 * n**3 / _best_seconds(lambda: a @ b, repeats) / 1e9


def _significant(value: float, digits: int = 4) -> float:
    """`value` to `digits` significant digits: a rate slowed a thousandfold by a busy machine stays above 0."""
    return float(f"{value:.{digits}g}")


def measure(buffer_mib: int = 512, gemm_size: int = 2048, repeats: int = 5) -> MachineRates:
    """Measure now, in this process, so the numbers share the benchmark's load (the machine may be shared)."""
    size = buffer_mib * MIB
    dot, matvec, total = read_numpy_dot(size, repeats), read_mlx_matvec(size, repeats), read_mlx_sum(size, repeats)
    return MachineRates(
        bandwidth_gbs=round(max(dot, matvec, total), 2),
        gemm_gflops=_significant(gemm_mlx(gemm_size, repeats)),
        read_numpy_dot_gbs=round(dot, 2),
        read_mlx_matvec_gbs=round(matvec, 2),
        read_mlx_sum_gbs=round(total, 2),
        gemm_numpy_gflops=_significant(gemm_numpy(gemm_size, repeats)),
        buffer_mib=buffer_mib,
        gemm_size=gemm_size,
    )
