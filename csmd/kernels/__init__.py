"""One face for the ops the model runs, choosing per device.

- On the CPU with the native extension loaded (csmd_native): native primitives (quantized matrix products
  that read each weight byte once, across all cores; a fused decoder step).
- Elsewhere (Apple GPUs, CUDA, or no extension): MLX's own ops (`mx.fast.*`, `mx.quantized_matmul`).
- `reference` holds the plain-MLX definition of each op; it is also the oracle of the tests.

The model calls these functions, never the backends directly, so a device or a kernel is swapped in one place.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from csmd.kernels import native, reference

rms_norm = reference.rms_norm
rope_interleaved = reference.rope_interleaved
attention = reference.attention
swiglu = reference.swiglu


def quantized_matmul(
    x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, group_size: int, bits: int
) -> mx.array:
    """x @ dequantize(w).T, MLX's affine layout."""
    if native.module is not None and native.active():
        return native.module.quantized_matmul(x, w, scales, biases, group_size=group_size, bits=bits)
    return reference.quantized_matmul(x, w, scales, biases, group_size, bits)


def linear(x: mx.array, layer: nn.Module) -> mx.array:
    """A bias-free projection by a float `nn.Linear` or an affine-quantized `nn.QuantizedLinear`."""
    if isinstance(layer, nn.QuantizedLinear) and getattr(layer, "mode", "affine") == "affine" and "bias" not in layer:
        return quantized_matmul(x, layer["weight"], layer["scales"], layer["biases"], layer.group_size, layer.bits)
    return layer(x)
