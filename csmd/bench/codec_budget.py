"""What one streamed Mimi frame must read and compute to decode, from the model's own arrays.

A frame of codes decodes to `upsample stride` latent steps and `frame_size` samples. The transformer runs
those steps as a few rows, so it reads every projection once (bound by DRAM bandwidth) and its attention
reads the past keys and values (rings that each step updates in place: a few rows written). Each
SEANet convolution then runs on as many rows as its input has steps at that rate: with at most
`kernels.FEW_ROWS` rows it reads its weights once and is bound by bandwidth too; with more it is a GEMM on
the panel-packed copy, bound by the machine's matmul rate. The floor is the reading at the measured DRAM
bandwidth plus the GEMMs at the measured GEMM rate, with nothing overlapping.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import mlx.nn as nn

from csmd.audio.mimi.model import Mimi
from csmd.audio.mimi.seanet import CausalConv1d, CausalConvTranspose1d
from csmd.bench.budget import param_bytes
from csmd.kernels import FEW_ROWS


@dataclass
class DecodeBudget:
    transformer_bytes: int  # the decoder transformer's parameters, as stored
    state_bytes: int  # past keys and values, read by the attention
    few_row_bytes: int  # SEANet convolutions with at most FEW_ROWS rows: their weights, read once
    gemm_bytes: int  # the other convolutions' weights (small; they stay in cache between rows)
    gemm_flops: int  # the other convolutions' multiply-adds x 2

    @property
    def total_bytes(self) -> int:
        return self.transformer_bytes + self.state_bytes + self.few_row_bytes + self.gemm_bytes

    def floor_ms(self, bandwidth_gbs: float, gemm_gflops: float) -> float:
        return 1000 * (self.total_bytes / (bandwidth_gbs * 1e9) + self.gemm_flops / (gemm_gflops * 1e9))

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "total_bytes": self.total_bytes}


def decode_budget(mimi: Mimi, batch: int = 1) -> DecodeBudget:
    """The budget of one streamed frame of `batch` streams at the steady state (the attention window full)."""
    cfg = mimi.config
    steps = mimi.upsample.stride  # latent steps per frame
    transformer = param_bytes(mimi.decoder_transformer)
    tc = cfg.transformer
    kv = 2 * tc.num_layers * batch * (tc.context - 1) * tc.d_model * 4  # float32 keys and values
    few_row = gemm_bytes = gemm_flops = 0
    rows = batch * steps
    for layer in _convolutions(mimi.decoder.layers):
        if isinstance(layer, CausalConv1d):
            rows //= layer.stride
        weights = layer._w
        if rows <= FEW_ROWS:
            few_row += int(weights.nbytes)
        else:  # (the MLX path, without packed panels, multiplies the same weights)
            gemm_bytes += int((weights if layer._packed is None else layer._packed).nbytes)
            gemm_flops += 2 * rows * int(weights.size)
        if isinstance(layer, CausalConvTranspose1d):
            rows *= layer.stride
    return DecodeBudget(transformer, kv, few_row, gemm_bytes, gemm_flops)


def _convolutions(layers: list[nn.Module]) -> list[CausalConv1d | CausalConvTranspose1d]:
    """The decoder's convolutions in order, a ResBlock's two included (ELUs have no weights)."""
    out: list[CausalConv1d | CausalConvTranspose1d] = []
    for layer in layers:
        if isinstance(layer, CausalConv1d | CausalConvTranspose1d):
            out.append(layer)
        elif hasattr(layer, "block"):
            out += [m for m in layer.block if isinstance(m, CausalConv1d)]
    return out
