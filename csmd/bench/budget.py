"""The least work a frame and a prefill can do: bytes read per frame and FLOPs per prefill.

Bytes are counted from the model's own arrays, so the count is right for any storage: fp32, bf16, or an
MLX-quantized linear (packed weight + scales + biases). For csm-1b in fp32 (`random:csm-1b`):

    backbone, once per frame     16 layers (16 x 243.3 MB) + final norm + codebook0 head (16.8 MB)
                                 + 33 embedding rows (1 text + 32 audio, 8 KiB each)    = 3909.7 MB
    depth decoder, per step      4 layers (4 x 111.2 MB) + final norm + projection (8.4 MB)
                                 + audio_head[k] slice (1024 x 2051 x 4 = 8.4 MB)
                                 + 1 audio embedding row (8 KiB)                         =  461.4 MB
    frame = backbone + 31 decoder steps + the projection of the backbone state
          + the KV caches (backbone over 300 rows: 16 x 2 x 512 x 4 x 301, + 4.3 MB decoder = 24.0 MB)
          = 18.25 GB

bf16 halves every term; 8-bit and 4-bit shrink the linears, embeddings and audio_head to about 1.0625 and
0.5625 bytes per weight (bf16 scales and biases included), not the norms: 4.86 GB and 2.58 GB per frame.
A scheme per part (quantization.py) is counted the same way, each array at its own precision: the decoder
part is read 31 times a frame, so backbone=8,decoder=4 reads 3.08 GB and backbone=4,decoder=8 4.38 GB.
A 300-row prefill (backbone only; csmd computes no logits while prefilling) is
2 x 300 x 973.1 M linear weights + attention over the causal triangle = 590 GFLOP.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from csmd.model.config import CsmConfig, TransformerConfig
from csmd.model.csm import CSM


@dataclass
class FrameBudget:
    backbone_bytes: int  # weights the backbone step reads once per frame
    decoder_step_bytes: int  # weights one depth-decoder step reads
    decoder_steps: int  # num_codebooks - 1 (31)
    kv_bytes: int  # backbone and decoder KV caches read over the frame
    total_bytes: int

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _arrays(module: nn.Module) -> list[mx.array]:
    """Every array of a module: weights, and for a quantized layer its scales and biases."""
    return list(dict(tree_flatten(module.parameters())).values())


def param_bytes(module: nn.Module) -> int:
    return sum(int(a.nbytes) for a in _arrays(module))


def row_bytes(table: nn.Module | mx.array) -> int:
    """One row (leading index) of a table: each of its arrays' bytes / rows.

    An embedding lookup reads only the rows it needs; audio_head[k] is one row of a [31, ...] stack, a
    float array or, quantized, a module of packed weights, scales and biases.
    """
    arrays = [table] if isinstance(table, mx.array) else _arrays(table)
    return sum(int(a.nbytes) // int(a.shape[0]) for a in arrays)


def backbone_bytes(model: CSM) -> int:
    """Backbone layers + final norm + codebook-0 head + one embedding row per column.

    csmd embeds every column of a row, masked ones included: 1 text row and one audio row per codebook.
    """
    rows = row_bytes(model.text_embeddings) + model.config.num_codebooks * row_bytes(model.audio_embeddings)
    return param_bytes(model.backbone) + param_bytes(model.codebook0_head) + rows


def decoder_step_bytes(model: CSM) -> int:
    """One depth-decoder step: its layers and norm, the projection of its input, one audio_head slice, one code row."""
    return (
        param_bytes(model.decoder)
        + param_bytes(model.projection)
        + row_bytes(model.audio_head)
        + row_bytes(model.audio_embeddings)
    )


def kv_read_bytes(cfg: TransformerConfig, positions: int, itemsize: int) -> int:
    """Keys and values of every layer over `positions` cached positions."""
    return cfg.num_layers * 2 * cfg.num_kv_heads * cfg.dim_per_head * positions * itemsize


def frame_budget(model: CSM, context_rows: int, kv_dtype: mx.Dtype | None = None) -> FrameBudget:
    """Bytes one frame must read after `context_rows` rows of context, the backbone's KV cache in `kv_dtype`
    (default: the activations' dtype).

    The decoder runs num_codebooks - 1 steps; the first sees 2 rows (the projected backbone state and
    codebook 0), so the projection is read once more than the steps. Decoder step k attends over k + 1
    positions.
    """
    cfg = model.config
    itemsize = model.activation_dtype().size
    backbone_itemsize = kv_dtype.size if kv_dtype is not None else itemsize
    steps = cfg.num_codebooks - 1
    backbone = backbone_bytes(model)
    step = decoder_step_bytes(model)
    kv = kv_read_bytes(cfg.backbone, context_rows + 1, backbone_itemsize) + sum(
        kv_read_bytes(cfg.decoder, k + 1, itemsize) for k in range(1, steps + 1)
    )
    total = backbone + steps * step + param_bytes(model.projection) + kv
    return FrameBudget(backbone, step, steps, kv, total)


def linear_weights_per_layer(cfg: TransformerConfig) -> int:
    """q, k, v, output projections and the three SwiGLU matrices of one block (csm-1b backbone: 60.8 M)."""
    q_out = cfg.num_heads * cfg.dim_per_head
    kv_out = cfg.num_kv_heads * cfg.dim_per_head
    attention = cfg.hidden_size * (2 * q_out + 2 * kv_out)
    return attention + 3 * cfg.hidden_size * cfg.intermediate_size


def prefill_flops(cfg: CsmConfig, rows: int) -> int:
    """FLOPs of prefilling `rows` rows into an empty backbone cache.

    2 FLOPs (multiply, add) per linear weight per row, plus QK^T and AV over the causal triangle of
    rows (rows + 1) / 2 query-key pairs: 2 x 2 x heads x head_dim per pair. Norms, RoPE and softmax are
    O(rows x hidden) and left out (< 0.1 %).
    """
    t = cfg.backbone
    pairs = rows * (rows + 1) // 2
    attention = 4 * t.num_heads * t.dim_per_head * pairs
    return t.num_layers * (2 * rows * linear_weights_per_layer(t) + attention)
