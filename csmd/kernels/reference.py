"""The pure-MLX reference of every fused op: what csmd computes, written plainly.

It runs on any device, it is what the model uses when no faster kernel applies, and it is the oracle the
tests hold the native kernels to.
"""

from __future__ import annotations

import mlx.core as mx


def quantized_matmul(
    x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, group_size: int, bits: int
) -> mx.array:
    """x @ dequantize(w).T in MLX's affine layout (weight = scale * q + bias per group along the input).

    In x's dtype: MLX would compute fp32 x against bf16 scales in bf16; the native kernels use fp32.
    """
    scales, biases = scales.astype(x.dtype), biases.astype(x.dtype)
    return mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=group_size, bits=bits)


def rms_norm(x: mx.array, scale: mx.array, eps: float) -> mx.array:
    return mx.fast.rms_norm(x, scale, eps)


def rope_interleaved(x: mx.array, position: int, periods: mx.array) -> mx.array:
    """Rotate pairs (x[2i], x[2i+1]) of the last axis by position / periods[i]; x is [B, H, T, D], T from `position`."""
    rotated = mx.fast.rope(
        x.astype(mx.float32), x.shape[-1], traditional=True, base=None, scale=1.0, offset=position, freqs=periods
    )
    return rotated.astype(x.dtype)


def attention(q: mx.array, keys: mx.array, values: mx.array, scale: float, causal: bool) -> mx.array:
    """Grouped-query attention; "causal" is aligned to the last key (new rows after a cached prefix)."""
    return mx.fast.scaled_dot_product_attention(q, keys, values, scale=scale, mask="causal" if causal else None)


def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    return gate * mx.sigmoid(gate) * up
