"""A Llama-3.2 decoder stack as CSM uses it: pre-norm blocks, GQA, interleaved Llama-3 RoPE, SwiGLU.

Parameter names follow Sesame's checkpoint (torchtune's `attn.output_proj`, `mlp.w1/w2/w3`, `sa_norm.scale`),
so Sesame weights load without renaming; the loader maps HF names onto these.

The KV cache is passed in explicitly, one `KVCache` per stack, and never hidden inside a module: a
conversation owns its cache, and the same weights serve every conversation.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from csmd import kernels
from csmd.model.config import RopeScaling, TransformerConfig


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
    """torchtune's `Llama3ScaledRoPE` frequencies: keep high ones, divide low ones, blend the band between."""
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if scaling is None:
        return inv
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    blended = (1 - smooth) * inv / scaling.factor + smooth * inv
    return np.where(wavelen < high_wavelen, inv, np.where(wavelen > low_wavelen, inv / scaling.factor, blended))


class RMSNorm(nn.Module):
    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.scale = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        # Accumulates in fp32 whatever the input dtype.
        return kernels.rms_norm(x, self.scale, self.eps)


class KVCache:
    """A stack's keys and values, [layers, B, kv heads, max_len, head_dim] each, and `offset`: how many
    positions hold data, one number for every layer.

    The cache may be stored narrower than the attention computes (a bfloat16 cache under fp32 activations:
    half the memory): new positions are rounded as they are written, and read back widened, by both the MLX
    path here and the native fused step.

    One array per stack (not per layer) so that a fused kernel can take the whole stack's cache in one
    argument and write it in place. A forward pass writes each layer's new positions through that layer's
    view (`layers[i]`, which reads `offset` and never moves it) and then `advance`s past them once; `trim`
    forgets positions from the end (the rows after them are run again).
    """

    def __init__(self, layers: int, batch: int, num_kv_heads: int, max_len: int, head_dim: int, dtype: mx.Dtype):
        self.keys = mx.zeros((layers, batch, num_kv_heads, max_len, head_dim), dtype=dtype)
        self.values = mx.zeros((layers, batch, num_kv_heads, max_len, head_dim), dtype=dtype)
        self.offset = 0

    @property
    def layers(self) -> list[LayerCache]:
        """A view per layer, made when asked: views kept here would each point back at the cache, a cycle that
        only the garbage collector frees, and with it a closed conversation's whole cache."""
        return [LayerCache(self, layer) for layer in range(self.keys.shape[0])]

    @property
    def max_len(self) -> int:
        return int(self.keys.shape[3])

    @property
    def dtype(self) -> mx.Dtype:
        return self.keys.dtype

    def room_for(self, rows: int) -> int:
        """Where `rows` more positions would end; raises if they do not fit."""
        end = self.offset + rows
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions requested, {self.max_len} available")
        return end

    def advance(self, rows: int) -> None:
        """Count `rows` more positions as filled, once every layer has written them."""
        self.offset = self.room_for(rows)

    def append_position(self, keys: mx.array, values: mx.array) -> None:
        """Write one new position of every layer (batch of one; keys/values [layers, kv heads, head_dim]).

        A slice update, which MLX does in place when nothing pending still reads the old arrays.
        """
        position = self.offset
        self.room_for(1)
        self.keys[:, 0, :, position, :] = keys
        self.values[:, 0, :, position, :] = values
        self.advance(1)

    def trim(self, n: int) -> int:
        """Forget the last `n` positions (at most all of them); returns how many were forgotten."""
        if n < 0:
            raise ValueError(f"cannot trim {n} positions")
        n = min(self.offset, n)
        self.offset -= n
        return n

    def state(self) -> list[mx.array]:
        """The arrays to evaluate so pending writes are materialised."""
        return [self.keys, self.values]


class LayerCache:
    """One layer's view of its stack's `KVCache`: it writes at the stack's `offset` and leaves moving it to
    the stack."""

    def __init__(self, cache: KVCache, layer: int):
        self.cache = cache
        self.layer = layer

    @property
    def offset(self) -> int:
        return self.cache.offset

    @property
    def keys(self) -> mx.array:
        """This layer's keys, [B, kv heads, max_len, head_dim] (positions from `offset` on are stale)."""
        return self.cache.keys[self.layer]

    @property
    def values(self) -> mx.array:
        return self.cache.values[self.layer]

    def update(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Write `keys`/`values` ([B, H, T, D]) after the filled part; return everything filled so far,
        these included, in the dtype of `keys`.

        The new positions come back as the cache holds them: in a narrower cache (bf16 under fp32 activations)
        rounded, as every later step will read them, and as the native fused step uses them."""
        cache, i, start = self.cache, self.layer, self.cache.offset
        end = cache.room_for(keys.shape[2])
        cache.keys[i, :, :, start:end, :] = keys
        cache.values[i, :, :, start:end, :] = values
        filled_keys, filled_values = cache.keys[i, :, :, :end, :], cache.values[i, :, :, :end, :]
        return filled_keys.astype(keys.dtype), filled_values.astype(values.dtype)


def make_cache(cfg: TransformerConfig, batch: int, dtype: mx.Dtype, max_len: int | None = None) -> KVCache:
    return KVCache(cfg.num_layers, batch, cfg.num_kv_heads, max_len or cfg.max_seq_len, cfg.dim_per_head, dtype)


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig, rope_periods: mx.array):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.dim_per_head
        self.scale = self.head_dim**-0.5
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * self.head_dim, bias=False)
        self.output_proj = nn.Linear(cfg.num_heads * self.head_dim, cfg.hidden_size, bias=False)
        self._rope_periods = rope_periods  # leading underscore: not a parameter

    def _heads(self, x: mx.array, count: int) -> mx.array:
        """[B, T, count * head_dim] -> [B, count, T, head_dim]."""
        batch, length, _ = x.shape
        return x.reshape(batch, length, count, self.head_dim).transpose(0, 2, 1, 3)

    def __call__(self, x: mx.array, cache: LayerCache) -> mx.array:
        batch, length, _ = x.shape
        q = self._heads(kernels.linear(x, self.q_proj), self.num_heads)
        k = self._heads(kernels.linear(x, self.k_proj), self.num_kv_heads)
        v = self._heads(kernels.linear(x, self.v_proj), self.num_kv_heads)
        # Sesame's weights expect the interleaved (torchtune "traditional") RoPE layout.
        q = kernels.rope_interleaved(q, cache.offset, self._rope_periods)
        k = kernels.rope_interleaved(k, cache.offset, self._rope_periods)
        keys, values = cache.update(k, v)
        out = kernels.attention(q, keys, values, self.scale, causal=length > 1)
        return kernels.linear(out.transpose(0, 2, 1, 3).reshape(batch, length, -1), self.output_proj)


class MLP(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dims: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dims, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dims, bias=False)
        self.w3 = nn.Linear(dims, hidden, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return kernels.linear(kernels.swiglu(kernels.linear(x, self.w1), kernels.linear(x, self.w3)), self.w2)


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig, rope_periods: mx.array):
        super().__init__()
        self.sa_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg, rope_periods)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)

    def __call__(self, x: mx.array, cache: LayerCache) -> mx.array:
        h = x + self.attn(self.sa_norm(x), cache)
        return h + self.mlp(self.mlp_norm(h))


class Transformer(nn.Module):
    """Blocks plus the final norm; input and output are hidden states ([B, T, hidden])."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.config = cfg
        periods = mx.array(1.0 / rope_inverse_frequencies(cfg.dim_per_head, cfg.rope_theta, cfg.rope_scaling))
        periods = periods.astype(mx.float32)
        self.layers = [Block(cfg, periods) for _ in range(cfg.num_layers)]
        self._inv_freqs = 1.0 / periods  # what the fused step takes: the same angles as the ops path
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def __call__(self, x: mx.array, cache: KVCache) -> mx.array:
        for layer, layer_cache in zip(self.layers, cache.layers, strict=True):
            x = layer(x, layer_cache)
        cache.advance(x.shape[1])
        return self.norm(x)


# Dense weight dtypes the fused step reads directly, with the `bits` value that tells it so.
_DENSE_BITS = {mx.float32: 0, mx.bfloat16: 16}


class StackWeights(NamedTuple):
    """A stack's weights in the order `kernels.transformer_step` takes them, and their format."""

    arrays: list[mx.array]
    group_size: int
    bits: int  # 0: float32, 16: bfloat16, 4 or 8: affine-quantized


def fused_step_weights(stack: Transformer) -> StackWeights | None:
    """The stack's weights for `kernels.transformer_step`, or None when the fused step cannot run this stack.

    It takes dense float32 or bfloat16 matrices (bits 0 or 16), or affine-quantized ones (bits 4 or 8), all
    projections alike, without biases.
    """
    weights: list[mx.array] = []
    formats: set[tuple[int, int]] = set()
    for layer in stack.layers:
        projections = [layer.attn.q_proj, layer.attn.k_proj, layer.attn.v_proj, layer.attn.output_proj]
        for norm, linears in (
            (layer.sa_norm, projections),
            (layer.mlp_norm, [layer.mlp.w1, layer.mlp.w3, layer.mlp.w2]),
        ):
            weights.append(norm.scale)
            for linear in linears:
                if "bias" in linear:
                    return None
                if isinstance(linear, nn.QuantizedLinear):
                    if getattr(linear, "mode", "affine") != "affine":
                        return None
                    weights += [linear["weight"], linear["scales"], linear["biases"]]
                    formats.add((linear.group_size, linear.bits))
                elif linear.weight.dtype in _DENSE_BITS:
                    weights.append(linear.weight)
                    formats.add((0, _DENSE_BITS[linear.weight.dtype]))
                else:
                    return None
    if len(formats) != 1:
        return None
    group_size, bits = formats.pop()
    return StackWeights(weights, group_size, bits)
