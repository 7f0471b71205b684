"""One face for the ops the model runs, choosing per device.

- On the CPU with the native extension loaded (csmd_native): native primitives (quantized matrix products
  that read each weight byte once, across all cores; a fused decoder step).
- Elsewhere (Apple GPUs, CUDA, or no extension): MLX's own ops (`mx.fast.*`, `mx.quantized_matmul`).
- `reference` holds the plain-MLX definition of each op; it is also the oracle of the tests.

The model calls these functions, never the backends directly, so a device or a kernel is swapped in one place.
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
import mlx.nn as nn

from csmd.kernels import native, reference

rms_norm = reference.rms_norm
rope_interleaved = reference.rope_interleaved


def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """silu(gate) * up, the MLP's activation; natively in fp32 for float32 and bfloat16 inputs of one shape (MLX's
    CPU sigmoid runs on one core at ~17 ns a value, a tenth of a csm-1b prefill)."""
    if (
        gate.dtype in (mx.float32, mx.bfloat16)
        and gate.dtype == up.dtype
        and gate.shape == up.shape
        and native_has("swiglu")
    ):
        assert native.module is not None
        out: mx.array = native.module.swiglu(gate.astype(mx.float32), up.astype(mx.float32))
        return out.astype(gate.dtype)
    return reference.swiglu(gate, up)


def quantized_matmul(
    x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, group_size: int, bits: int
) -> mx.array:
    """x @ dequantize(w).T, MLX's affine layout."""
    if native.module is not None and native.active():
        return native.module.quantized_matmul(x, w, scales, biases, group_size=group_size, bits=bits)
    return reference.quantized_matmul(x, w, scales, biases, group_size, bits)


def linear(x: mx.array, layer: nn.Module) -> mx.array:
    """A bias-free projection by a float `nn.Linear` or an affine-quantized `nn.QuantizedLinear`."""
    if "bias" in layer:
        return layer(x)
    if isinstance(layer, nn.QuantizedLinear):
        if getattr(layer, "mode", "affine") == "affine":
            return quantized_matmul(x, layer["weight"], layer["scales"], layer["biases"], layer.group_size, layer.bits)
        return layer(x)
    weight = layer["weight"]
    if native.module is not None and native.active() and _native_dense(x, weight):
        return native.module.matmul(x, weight)
    return layer(x)


# Up to this many rows, the native product that reads each weight row once for all rows (fewrows.h) beats
# BLAS; beyond, BLAS's packed GEMM wins (BENCHMARKS.md, "Mimi codec"), as does the native panel GEMM for
# packed convolution weights. Not the limit inside csmd_native.matmul (kMatmulFewRowsMax, 8, in
# native/src/matmul.cpp): that one is the crossover against the native blocked GEMM, which the few-row product
# beats for longer.
FEW_ROWS = 4


def dense(x: mx.array, weight: mx.array) -> mx.array:
    """x @ weight.T for a float32 or bfloat16 weight [out, in], in fp32 when x is fp32.

    Mimi's streaming steps multiply 2 rows by large matrices: that is bound by reading the weights, which
    the native kernel does at close to the memory bandwidth and BLAS (packing for a GEMM) at about half.
    """
    rows = x.size // x.shape[-1] if x.ndim else 0
    if native.module is not None and native.active() and 1 <= rows <= FEW_ROWS:
        return native.module.matmul(x, weight)
    return x @ weight.T.astype(x.dtype)


def _native_dense(x: mx.array, weight: mx.array) -> bool:
    """bf16 and fp32 weights, any rows: MLX's CPU bf16 matmul runs on one core; for fp32, one row is a
    bandwidth-bound matvec that beats BLAS's GEMM path, and many rows go through the native blocked GEMM,
    which prefills faster than MLX's matmul with BLIS (BENCHMARKS.md, "fp32 prefill through the native GEMM
    too")."""
    return weight.dtype in (mx.bfloat16, mx.float32)


def attention(q: mx.array, keys: mx.array, values: mx.array, scale: float, causal: bool) -> mx.array:
    """Grouped-query attention of q [B, heads, T, D] over keys/values [B, kv heads, S, D]; "causal" is aligned
    to the last key (new rows after a cached prefix)."""
    if causal and q.dtype == mx.float32 and native_has("causal_softmax"):
        return _prefill_attention(q, keys, values, scale)
    return reference.attention(q, keys, values, scale, causal)


def _prefill_attention(q: mx.array, keys: mx.array, values: mx.array, scale: float) -> mx.array:
    """Causal attention as two batched matmuls (BLAS) around the native causal softmax. MLX's CPU fallback
    for `scaled_dot_product_attention` computes the same products but spends most of its time in a slow
    scalar exp."""
    batch, heads, rows, dim = q.shape
    kv_heads = keys.shape[1]
    # The query heads sharing one kv head (heads h * rep .. h * rep + rep - 1) become one [rep * rows, D] block.
    grouped = (q * scale).reshape(batch, kv_heads, heads // kv_heads * rows, dim)
    assert native.module is not None
    scores = (grouped @ keys.swapaxes(-1, -2)).reshape(batch, kv_heads, heads // kv_heads, rows, -1)
    probs = native.module.causal_softmax(scores).reshape(batch, kv_heads, heads // kv_heads * rows, -1)
    return (probs @ values).reshape(batch, heads, rows, dim)


def fused_step_available(x: mx.array) -> bool:
    """The native one-token transformer step can run here (CPU, extension loaded, one sequence)."""
    return native_has("transformer_step") and x.shape[0] == 1


def transformer_step(
    x: mx.array,
    weights: list[mx.array],
    cache_k: mx.array,
    cache_v: mx.array,
    position: int,
    inv_freqs: mx.array,
    num_heads: int,
    num_kv_heads: int,
    eps: float,
    group_size: int,
    bits: int,
) -> tuple[mx.array, mx.array, mx.array]:
    """Every layer of a Llama stack for one token at `position`, as one native primitive.

    x: [1, hidden] float32; cache_k/v: [layers, kv heads, positions, head dim] float32 or bfloat16 (widened
    as read), read for the positions before `position`. `weights` per layer: sa_norm scale, q, k, v, o,
    mlp_norm scale, w1, w3, w2, each projection as (w, scales, biases) when `bits` is 4 or 8, or one float32
    [out, in] matrix when `bits` is 0. Returns the last layer's output (before the final norm) and this
    position's keys and values, [layers, kv heads, head dim] in the cache's dtype, which the caller stores
    (in place, as a slice update). With a bfloat16 cache they come rounded, and this step's own attention
    used them rounded: what every later step reads, and what the MLX path computes (it writes the new
    position into the cache, then attends over what the cache holds).
    """
    assert native.module is not None
    h, k, v = native.module.transformer_step(
        x, weights, cache_k, cache_v, position, inv_freqs, num_heads, num_kv_heads, eps, group_size, bits
    )
    return h, k, v


def fused_step_batch_available() -> bool:
    """The native transformer step over several rows at once can run here (CPU, extension loaded, a build
    that has it)."""
    return native_has("transformer_step_batch")


def transformer_step_batch(
    x: mx.array,
    weights: list[mx.array],
    caches_k: Sequence[mx.array],
    caches_v: Sequence[mx.array],
    positions: Sequence[int],
    inv_freqs: mx.array,
    num_heads: int,
    num_kv_heads: int,
    eps: float,
    group_size: int,
    bits: int,
) -> tuple[mx.array, mx.array, mx.array]:
    """`transformer_step` for B rows (1 to 64) as one native primitive that reads each weight once for all.

    x: [B, hidden] float32; row b is the token at positions[b] of its own context, whose cache is caches_k[b] /
    caches_v[b], [layers, kv heads, T_b, head dim], all float32 or all bfloat16 (the lengths T_b may differ).
    Returns h [B, hidden] (before the final norm) and the rows' new keys and values, [B, layers, kv heads,
    head dim] in the caches' dtype: row b of each is bit for bit what `transformer_step` gives for row b
    alone, and the caller stores it in row b's cache.
    """
    assert native.module is not None
    h, k, v = native.module.transformer_step_batch(
        x, weights, caches_k, caches_v, positions, inv_freqs, num_heads, num_kv_heads, eps, group_size, bits
    )
    return h, k, v


def depth_frame(
    x0: mx.array,
    stack: list[mx.array],
    inv_freqs: mx.array,
    norm: mx.array,
    heads: list[mx.array],
    embeddings: list[mx.array],
    projection: list[mx.array],
    noise: mx.array,
    num_heads: int,
    num_kv_heads: int,
    eps: float,
    group_size: int,
    bits: int,
    *,
    temperature: float,
    top_k: int,
    top_p: float,
    min_p: float,
    codebook_size: int,
) -> mx.array:
    """CSM's depth decoder for a frame as one native primitive: the codes of codebooks 1..C, int32 [C].

    x0: float32 [2, hidden], the decoder's first two rows. Per codebook: a step through `stack` (as for
    `transformer_step`), the final norm, the codebook's head, the sampling rule (ids >= codebook_size masked,
    temperature, top-k, min-p, top-p, then argmax(logits + noise[k]); greedy when temperature is 0), and the
    picked code's embedding row through `projection` as the next input. Weight formats: see csmd_native.
    """
    assert native.module is not None
    return native.module.depth_frame(
        x0, stack, inv_freqs, norm, heads, embeddings, projection, noise, num_heads, num_kv_heads, eps,
        group_size, bits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
        codebook_size=codebook_size,
    )  # fmt: skip


def depth_frame_batch_available() -> bool:
    """The native depth-decoder frame over several rows at once can run here (CPU, extension loaded, a build
    that has it)."""
    return native_has("depth_frame_batch")


def depth_frame_batch(
    x0: mx.array,
    stack: list[mx.array],
    inv_freqs: mx.array,
    norm: mx.array,
    heads: list[mx.array],
    embeddings: list[mx.array],
    projection: list[mx.array],
    noise: mx.array,
    num_heads: int,
    num_kv_heads: int,
    eps: float,
    group_size: int,
    bits: int,
    *,
    temperature: Sequence[float],
    top_k: Sequence[int],
    top_p: Sequence[float],
    min_p: Sequence[float],
    codebook_size: Sequence[int],
) -> mx.array:
    """`depth_frame` for B rows (1 to 64) as one native primitive: the codes of codebooks 1..C, int32 [B, C].

    x0: float32 [B, 2, hidden]; noise: float32 [B, C, vocab], or shape [0] when every row is greedy. Each
    sampling argument holds one value per row, so greedy and sampled rows mix. Every step, head and
    projection reads each weight once for all rows; row b's codes are bit for bit what `depth_frame` gives
    for row b alone.
    """
    assert native.module is not None
    codes: mx.array = native.module.depth_frame_batch(
        x0, stack, inv_freqs, norm, heads, embeddings, projection, noise, num_heads, num_kv_heads, eps,
        group_size, bits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
        codebook_size=codebook_size,
    )  # fmt: skip
    return codes


def native_available() -> bool:
    """The native kernels serve the current device (CPU, extension loaded, not switched off)."""
    return native.module is not None and native.active()


def mimi_transformer_available() -> bool:
    """The native Mimi stack can run here (an older build of the extension may lack it)."""
    return native_has("mimi_transformer") and native_has("mimi_ring_write")


def mimi_transformer(
    x: mx.array,
    weights: list[mx.array],
    past_k: mx.array,
    past_v: mx.array,
    position: mx.array,
    inv_freqs: mx.array,
    num_heads: int,
    context: int,
    eps: float,
) -> tuple[mx.array, mx.array, mx.array]:
    """Mimi's whole transformer stack for the few steps of x [B, T, D], as one native primitive.

    past_k/past_v: [layers, B, context - 1, D], rings of the steps before `position` (int32); returns the
    output and the T steps' keys and values [layers, B, T, D] (for mimi_ring_write). See
    csmd_native.mimi_transformer for the weight order; csmd/audio/mimi/transformer.py's MLX layers are the
    reference.
    """
    assert native.module is not None
    y, k, v = native.module.mimi_transformer(x, weights, past_k, past_v, position, inv_freqs, num_heads, context, eps)
    return y, k, v


def mimi_ring_write(ring: mx.array, rows: mx.array, position: mx.array) -> mx.array:
    """ring [L, B, P, D] with rows [L, B, T, D] (the steps from `position` on) in their slots, natively: in place
    when MLX can donate the ring's buffer. csmd/audio/mimi/transformer.py's ring_write is the reference."""
    assert native.module is not None
    ring = native.module.mimi_ring_write(ring, rows, position)
    return ring


PANEL = 16  # output columns per packed panel (native/src/kernels/panel_gemm.h)


def pack_panels(weight: mx.array) -> mx.array | None:
    """A constant float32 weight [N, K] packed for `panel_matmul`, [ceil(N / 16), K, 16] with zero rows past
    N; None when the native kernels do not serve this device (then nothing is packed)."""
    if not native_has("panel_matmul"):
        return None
    n, k = weight.shape
    panels = -(-n // PANEL)
    padded = mx.pad(weight.astype(mx.float32), [(0, panels * PANEL - n), (0, 0)])
    return mx.contiguous(padded.reshape(panels, PANEL, k).transpose(0, 2, 1))


def panel_matmul(x: mx.array, packed: mx.array, n: int, bias: mx.array | None = None) -> mx.array:
    """x [..., K] @ W.T (+ bias) -> [..., n] for W packed by `pack_panels`, as one native product.

    For many-row products with constant weights (Mimi's SEANet convolutions), where it is faster than BLAS
    (BENCHMARKS.md, "Native streaming codec") and, on a busy machine, does not wait for threads that the OS
    has not scheduled.
    """
    assert native.module is not None
    out: mx.array = native.module.panel_matmul(x, packed, n, bias)
    return out


def panel_conv(x: mx.array, packed: mx.array, n: int, bias: mx.array | None, kernel: int, stride: int) -> mx.array:
    """A causal convolution of x [B, L, C] (its left context already prepended) -> [B, T, n]: the product of
    each output's window (kernel * C consecutive floats of the time-major input) with W [n, kernel * C],
    packed by `pack_panels`, without unfolding the windows into a copy."""
    assert native.module is not None
    out: mx.array = native.module.panel_conv(x, packed, n, bias, kernel, stride)
    return out


def causal_conv_step(
    x: mx.array,
    state: mx.array | None,
    weight: mx.array,
    n: int,
    bias: mx.array | None,
    residual: mx.array | None,
    kernel: int,
    stride: int,
    elu_input: bool,
) -> tuple[mx.array, mx.array | None]:
    """One streaming step of a causal convolution as one native primitive, with the ELU of its input, the
    concatenation with its state, its bias and a residual sum fused in; csmd/audio/mimi/seanet.py's
    CausalConv1d is the reference. `weight` [n, kernel * C] as is (a few rows) or packed by `pack_panels`."""
    assert native.module is not None
    y, new_state = native.module.causal_conv_step(x, state, weight, n, bias, residual, kernel, stride, elu_input)
    return y, new_state


def conv_transpose_step(
    x: mx.array, state: mx.array, weight: mx.array, n: int, bias: mx.array | None, stride: int, elu_input: bool
) -> tuple[mx.array, mx.array]:
    """One streaming step of a causal transposed convolution (kernel 2 * stride) as one native primitive, the
    ELU of its input and the overlap-add with its state fused in; seanet.py's CausalConvTranspose1d is the
    reference."""
    assert native.module is not None
    y, new_state = native.module.conv_transpose_step(x, state, weight, n, bias, stride, elu_input)
    return y, new_state


def native_has(name: str) -> bool:
    """The native kernels serve this device and the loaded extension has `name` (older builds may not)."""
    return native_available() and hasattr(native.module, name)


def native_elu(x: mx.array) -> mx.array:
    """ELU (alpha 1) of float32 x as one native SIMD loop; csmd/audio/mimi/fastmath.elu is the reference."""
    assert native.module is not None
    out: mx.array = native.module.elu(x)
    return out
