"""Mimi's split residual vector quantizer: 1 semantic level and up to 31 acoustic levels.

Both halves quantize the same latent, each through its own input projection; residual coding happens only
inside each half. Distances are computed in fp32 (near-ties would flip codes otherwise).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from csmd.audio.mimi.config import QuantizerConfig
from csmd.kernels import dense


class Codebook(nn.Module):
    def __init__(self, bins: int, dimension: int):
        super().__init__()
        self.embedding_sum = mx.zeros((bins, dimension))
        self.cluster_usage = mx.ones((bins,))
        self._embedding = self.embedding_sum
        self._half_sq_norm = mx.zeros((bins,))

    def prepare(self) -> None:
        """The codebook as trained: running sums over usage counts (recomputed after every load)."""
        usage = mx.maximum(self.cluster_usage, 1e-5)[:, None]
        self._embedding = (self.embedding_sum / usage).astype(mx.float32)
        self._half_sq_norm = 0.5 * (self._embedding**2).sum(axis=-1)

    def encode(self, x: mx.array) -> mx.array:
        # argmin ||x - e||^2 == argmin (||e||^2 / 2 - x.e): one matmul, no [N, bins, D] difference tensor.
        # (dense: a streaming step's one row reads the 2 MB codebook at the memory's speed, several times
        # faster than MLX's matmul, 32 times a frame; BENCHMARKS.md, "Figures moved out of the code")
        return mx.argmin(self._half_sq_norm - dense(x, self._embedding), axis=-1)

    def decode(self, codes: mx.array) -> mx.array:
        return self._embedding[codes]


class Projection(nn.Module):
    """A kernel-1 convolution without bias (as the checkpoint stores it), applied as a matmul."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.weight = mx.zeros((cout, cin, 1))
        self._w = self.weight[:, :, 0]

    def prepare(self) -> None:
        self._w = mx.contiguous(self.weight[:, :, 0])  # [out, in], as dense reads it

    def __call__(self, x: mx.array) -> mx.array:
        """x [B, T, in] -> [B, T, out], one stream (batch row) at a time.

        dense picks its kernel by the number of rows (a streaming step's one row: the native product, which
        beats MLX's matmul, BENCHMARKS.md), and each kernel sums in its own order: taken together, a batch of
        streams (model.decode_together) would give each stream other floats than it gets alone.
        """
        if x.ndim == 3 and x.shape[0] > 1:
            return mx.concatenate([dense(x[b : b + 1], self._w) for b in range(x.shape[0])])
        return dense(x, self._w)


class ResidualQuantizer(nn.Module):
    def __init__(self, levels: int, latent: int, cfg: QuantizerConfig):
        super().__init__()
        self.input_proj = Projection(latent, cfg.dimension)
        self.output_proj = Projection(cfg.dimension, latent)
        self.codebooks = [Codebook(cfg.bins, cfg.dimension) for _ in range(levels)]
        self._tables = mx.zeros((levels, cfg.bins, cfg.dimension))

    def prepare(self) -> None:
        """Every level's codebook in one [levels, bins, dim] array, so decoding is a single gather."""
        self.input_proj.prepare()
        self.output_proj.prepare()
        for codebook in self.codebooks:
            codebook.prepare()
        self._tables = mx.stack([codebook._embedding for codebook in self.codebooks])
        for level, codebook in enumerate(self.codebooks):
            codebook._embedding = self._tables[level]  # a view: the codebooks are held once

    def encode(self, x: mx.array, levels: int) -> mx.array:
        """[B, T, latent] -> codes [B, T, levels]."""
        residual = self.input_proj(x)
        codes = []
        for codebook in self.codebooks[:levels]:
            code = codebook.encode(residual)
            residual = residual - codebook.decode(code)
            codes.append(code)
        return mx.stack(codes, axis=-1)

    def decode(self, codes: mx.array) -> mx.array:
        """codes [B, T, levels] -> [B, T, latent]; fewer levels just sum fewer vectors."""
        levels = codes.shape[-1]
        return self.output_proj(self._tables[mx.arange(levels), codes].sum(axis=-2))


class SplitQuantizer(nn.Module):
    def __init__(self, latent: int, cfg: QuantizerConfig):
        super().__init__()
        self.n_semantic = cfg.n_q_semantic
        self.semantic = ResidualQuantizer(cfg.n_q_semantic, latent, cfg)
        self.acoustic = ResidualQuantizer(cfg.n_q - cfg.n_q_semantic, latent, cfg)

    def prepare(self) -> None:
        self.semantic.prepare()
        self.acoustic.prepare()

    def encode(self, x: mx.array, num_codebooks: int) -> mx.array:
        codes = self.semantic.encode(x, self.n_semantic)
        if num_codebooks > self.n_semantic:
            codes = mx.concatenate([codes, self.acoustic.encode(x, num_codebooks - self.n_semantic)], axis=-1)
        return codes

    def decode(self, codes: mx.array) -> mx.array:
        latent = self.semantic.decode(codes[..., : self.n_semantic])
        if codes.shape[-1] > self.n_semantic:
            latent = latent + self.acoustic.decode(codes[..., self.n_semantic :])
        return latent
