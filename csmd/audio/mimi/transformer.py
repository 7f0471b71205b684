"""Mimi's encoder/decoder transformer: 8 pre-norm layers, LayerScale, exact GELU, interleaved RoPE on 25 Hz
positions, and a causal window of `context` steps (each step sees itself and the 249 before it).

Streaming state per layer: the keys and values of the last `context - 1` steps, plus the absolute position
of the next step. That is all a new step can attend to, so memory stays flat however long the stream, and a
step sees exactly what it would see offline: streaming equals offline at any length. (Kyutai's PyTorch ring
holds `context` slots and is written before it is read, so for streams past the window the first of each
pair of steps there sees one key fewer than offline; csmd follows the offline definition.)
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from csmd.audio.mimi.config import MimiTransformerConfig


class Attention(nn.Module):
    def __init__(self, cfg: MimiTransformerConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.context = cfg.context
        self.max_period = cfg.max_period
        self.in_proj = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.out_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def __call__(self, x: mx.array, position: int, past: tuple[mx.array, mx.array] | None) -> tuple[mx.array, Any]:
        batch, steps, dims = x.shape
        head_dim = dims // self.num_heads
        qkv = self.in_proj(x).reshape(batch, steps, 3, self.num_heads, head_dim).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        # Kyutai's weights pair dims (2i, 2i+1): the "traditional" layout; angles in fp32.
        q = mx.fast.rope(q, head_dim, traditional=True, base=self.max_period, scale=1.0, offset=position)
        k = mx.fast.rope(k, head_dim, traditional=True, base=self.max_period, scale=1.0, offset=position)
        if past is not None:
            k = mx.concatenate([past[0], k], axis=2)
            v = mx.concatenate([past[1], v], axis=2)
        # Query i is at position + i; key j at position - n_past + j. Allowed: 0 <= q - k < context.
        n_past = k.shape[2] - steps
        delta = mx.arange(steps)[:, None] + n_past - mx.arange(k.shape[2])[None, :]
        mask = (delta >= 0) & (delta < self.context)
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=head_dim**-0.5, mask=mask)
        keep = self.context - 1
        new_past = (k[:, :, -keep:], v[:, :, -keep:]) if keep > 0 else None
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(batch, steps, dims)), new_past


class MLP(nn.Module):
    def __init__(self, cfg: MimiTransformerConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.d_model, cfg.dim_feedforward, bias=False)
        self.fc2 = nn.Linear(cfg.dim_feedforward, cfg.d_model, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(nn.gelu(self.fc1(x)))  # exact (erf) GELU, as trained


class Layer(nn.Module):
    def __init__(self, cfg: MimiTransformerConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.layer_scale_1 = mx.ones((cfg.d_model,))
        self.norm2 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.layer_scale_2 = mx.ones((cfg.d_model,))

    def __call__(self, x: mx.array, position: int, past: Any) -> tuple[mx.array, Any]:
        h, past = self.attn(self.norm1(x), position, past)
        x = x + self.layer_scale_1 * h
        return x + self.layer_scale_2 * self.mlp(self.norm2(x)), past


class MimiTransformer(nn.Module):
    """[B, T, d_model] -> [B, T, d_model]; state = (next position, per-layer past keys/values)."""

    def __init__(self, cfg: MimiTransformerConfig):
        super().__init__()
        self.layers = [Layer(cfg) for _ in range(cfg.num_layers)]

    def __call__(self, x: mx.array, state: Any) -> tuple[mx.array, Any]:
        position, pasts = state if state is not None else (0, [None] * len(self.layers))
        new_pasts = []
        for layer, past in zip(self.layers, pasts, strict=True):
            x, past = layer(x, position, past)
            new_pasts.append(past)
        return x, (position + x.shape[1], new_pasts)
