"""Native CPU kernels for csmd, built as an MLX C++ extension when csmd is installed.

The extension links against libmlx's C++ API, whose ABI changes between
releases, so it refuses to load under any MLX other than the one it was built
against (reinstall csmd to rebuild it).
"""

import mlx.core as _mx

from ._build_info import mlx_version

if _mx.__version__ != mlx_version:
    raise ImportError(
        f"csmd_native was built against mlx {mlx_version} but mlx {_mx.__version__} is installed; "
        "reinstall csmd to rebuild it (pip install --force-reinstall --no-deps <csmd source>) "
        "or install that mlx version"
    )

from ._ext import (
    _pool_fault,  # noqa: F401  (a test hook: tests/test_native_pool.py)
    _pool_roundtrip_us,  # noqa: F401  (for native/bench_kernels.py)
    causal_conv_step,
    causal_softmax,
    conv_transpose_step,
    cpu_features,
    depth_frame,
    depth_frame_batch,
    elu,
    get_effective_matvec_mode,
    get_effective_prefill_mode,
    get_matvec_mode,
    get_prefill_mode,
    matmul,
    mimi_ring_write,
    mimi_transformer,
    num_threads,
    panel_conv,
    panel_matmul,
    quantized_matmul,
    set_matvec_mode,
    set_num_threads,
    set_prefill_mode,
    set_variant,
    swiglu,
    transformer_step,
    transformer_step_batch,
)

__all__ = [
    "causal_conv_step",
    "causal_softmax",
    "conv_transpose_step",
    "cpu_features",
    "depth_frame",
    "depth_frame_batch",
    "elu",
    "get_effective_matvec_mode",
    "get_effective_prefill_mode",
    "get_matvec_mode",
    "get_prefill_mode",
    "matmul",
    "mimi_ring_write",
    "mimi_transformer",
    "mlx_version",
    "num_threads",
    "panel_conv",
    "panel_matmul",
    "quantized_matmul",
    "set_matvec_mode",
    "set_num_threads",
    "set_prefill_mode",
    "set_variant",
    "swiglu",
    "transformer_step",
    "transformer_step_batch",
]
