"""Checkpoint files -> CSM parameters: Sesame's names, HF transformers' names, and csmd's own format.

csmd's parameter names are Sesame's (see llama.py), so Sesame checkpoints load as they are. HF checkpoints
are renamed, and their q/k rows un-permuted: HF's conversion reordered them so that half-split
("rotate_half") RoPE equals Sesame's interleaved RoPE; csmd uses the interleaved form for every checkpoint.
HF checkpoints also carry the Mimi codec under `codec_model.*`; those tensors are returned separately.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from csmd import progress
from csmd.arrays import materialize
from csmd.model.config import CsmConfig
from csmd.model.csm import CSM, QuantizedCodebookHeads
from csmd.model.errors import CheckpointError, check_shapes
from csmd.model.quantization import QuantizationScheme, part_of
from csmd.model.torch_pickle import load_torch_state_dict

CSMD_FORMAT = "csmd"
QUANT_PARAM_DTYPE = mx.bfloat16  # group scales and biases of the weights `quantize` makes
CSMD_FORMAT_VERSION = 1

# HF name -> Sesame name, for the parts outside the layers.
_HF_TOP = {
    "embed_text_tokens.weight": "text_embeddings.weight",
    "backbone_model.embed_tokens.embed_text_tokens.weight": "text_embeddings.weight",  # older convert_csm.py
    "backbone_model.embed_tokens.embed_audio_tokens.weight": "audio_embeddings.weight",
    "depth_decoder.model.inputs_embeds_projector.weight": "projection.weight",
    "lm_head.weight": "codebook0_head.weight",
    "depth_decoder.codebooks_head.weight": "audio_head",
    "backbone_model.norm.weight": "backbone.norm.scale",
    "depth_decoder.model.norm.weight": "decoder.norm.scale",
}
# HF's depth decoder keeps a tied copy of the audio embeddings; Sesame reuses one table.
_HF_TIED_COPY = "depth_decoder.model.embed_tokens.weight"
_HF_LAYER = re.compile(r"^(backbone_model|depth_decoder\.model)\.layers\.(\d+)\.(.+)$")
_HF_LAYER_PARTS = {
    "input_layernorm.weight": "sa_norm.scale",
    "post_attention_layernorm.weight": "mlp_norm.scale",
    "self_attn.q_proj.weight": "attn.q_proj.weight",
    "self_attn.k_proj.weight": "attn.k_proj.weight",
    "self_attn.v_proj.weight": "attn.v_proj.weight",
    "self_attn.o_proj.weight": "attn.output_proj.weight",
    "mlp.gate_proj.weight": "mlp.w1.weight",
    "mlp.up_proj.weight": "mlp.w3.weight",
    "mlp.down_proj.weight": "mlp.w2.weight",
}
CODEC_PREFIX = "codec_model."


@dataclass
class Checkpoint:
    """Parameters in csmd (Sesame) naming, plus the Mimi tensors an HF checkpoint bundles."""

    params: dict[str, mx.array]
    codec: dict[str, mx.array]


def read_tensors(path: str | os.PathLike[str]) -> dict[str, mx.array]:
    """All tensors of a safetensors file, a sharded safetensors index, or a torch `.pt` file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.name.endswith(".index.json"):
        return _read_sharded(path)
    if path.suffix in (".pt", ".pth", ".ckpt", ".bin"):
        return load_torch_state_dict(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: unknown checkpoint type (expected .safetensors, .pt or .index.json)")
    try:
        tensors = mx.load(str(path))
    except Exception as exc:  # MLX reports truncation and bad headers as plain runtime errors
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {exc}") from exc
    assert isinstance(tensors, dict)
    return tensors


def _read_sharded(index: Path) -> dict[str, mx.array]:
    try:
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{index}: not a safetensors index (need a 'weight_map'): {exc}") from exc
    tensors: dict[str, mx.array] = {}
    for shard in sorted(set(weight_map.values())):
        tensors.update(read_tensors(index.parent / shard))
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
        raise CheckpointError(f"{index}: shards lack tensors listed in the index, e.g. {missing[0]!r}")
    return tensors


def is_hf_naming(tensors: dict[str, mx.array]) -> bool:
    return any(k.startswith(("backbone_model.", "depth_decoder.")) for k in tensors)


def _unpermute_rope_rows(weight: mx.array, num_heads: int) -> mx.array:
    """Undo HF's permute_for_rope: within each head, HF row p*d/2 + i is Sesame row 2i + p."""
    out_dims, in_dims = weight.shape
    head_dim = out_dims // num_heads
    return weight.reshape(num_heads, 2, head_dim // 2, in_dims).transpose(0, 2, 1, 3).reshape(out_dims, in_dims)


def permute_rope_rows(weight: mx.array, num_heads: int) -> mx.array:
    """Sesame -> HF row order (what transformers' convert_csm.py does); tests use it to write HF files."""
    out_dims, in_dims = weight.shape
    head_dim = out_dims // num_heads
    return weight.reshape(num_heads, head_dim // 2, 2, in_dims).transpose(0, 2, 1, 3).reshape(out_dims, in_dims)


def from_hf_naming(tensors: dict[str, mx.array], cfg: CsmConfig) -> Checkpoint:
    params: dict[str, mx.array] = {}
    codec: dict[str, mx.array] = {}
    unexpected = []
    for name, value in tensors.items():
        if name.startswith(CODEC_PREFIX):
            codec[name.removeprefix(CODEC_PREFIX)] = value
        elif name in _HF_TOP:
            params[_HF_TOP[name]] = value  # may overwrite the tied copy below; both hold the same table
        elif name == _HF_TIED_COPY:
            # save_pretrained may keep only this side of the tie; the backbone's copy wins if both exist.
            params.setdefault("audio_embeddings.weight", value)
        elif match := _HF_LAYER.match(name):
            stack, layer, part = match.groups()
            if part not in _HF_LAYER_PARTS:
                unexpected.append(name)
                continue
            ours = "backbone" if stack == "backbone_model" else "decoder"
            heads_cfg = cfg.backbone if ours == "backbone" else cfg.decoder
            if part == "self_attn.q_proj.weight":
                value = _unpermute_rope_rows(value, heads_cfg.num_heads)
            elif part == "self_attn.k_proj.weight":
                value = _unpermute_rope_rows(value, heads_cfg.num_kv_heads)
            params[f"{ours}.layers.{layer}.{_HF_LAYER_PARTS[part]}"] = value
        else:
            unexpected.append(name)
    if unexpected:
        raise CheckpointError(f"unexpected tensor {unexpected[0]!r} in HF checkpoint ({len(unexpected)} in all)")
    return Checkpoint(params, codec)


def expected_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    flat = tree_flatten(model.parameters())
    assert isinstance(flat, list)
    return {name: tuple(value.shape) for name, value in flat}


def check_params(params: dict[str, mx.array], model: nn.Module, source: str) -> None:
    """A missing, unexpected or mis-shaped tensor is an error that names it."""
    check_shapes(params, expected_shapes(model), source)


def cast_floats(params: dict[str, mx.array], dtype: mx.Dtype) -> dict[str, mx.array]:
    """Float tensors to `dtype`, except quantization scales and biases, which keep the dtype they were stored in
    (bf16 from csmd's `quantize`): casting them up would be exact but would make every frame read more bytes."""
    return {k: v.astype(dtype) if _is_float(v) and not _is_quant_param(k) else v for k, v in params.items()}


def _is_float(value: mx.array) -> bool:
    return mx.issubdtype(value.dtype, mx.floating)


def _is_quant_param(name: str) -> bool:
    return name.endswith((".scales", ".biases"))


def build_model(
    cfg: CsmConfig,
    params: dict[str, mx.array],
    dtype: mx.Dtype,
    source: str,
    quantization: QuantizationScheme | None = None,
) -> CSM:
    """A CSM holding `params` (csmd naming), checked against the config, in `dtype`. The tensors are read (or
    generated, for random weights) one at a time, with a progress bar in bytes when that takes a while."""
    model = CSM(cfg)
    if quantization:
        quantize(model, quantization, layout_only=True)
    check_params(params, model, source)
    cast = cast_floats(params, dtype)
    progress.evaluate(cast.values(), f"{'building' if source.startswith('random:') else 'loading'} {source}")
    model.update(tree_unflatten(list(cast.items())))
    materialize(model)
    return model


def _quantizable(module: nn.Module, group_size: int) -> bool:
    return isinstance(module, nn.Linear | nn.Embedding) and module.weight.shape[-1] % group_size == 0


def quantize(model: CSM, scheme: QuantizationScheme | int, *, layout_only: bool = False) -> None:
    """Affine-quantize each part's projections and embeddings (and the codebook heads) in MLX's layout, at
    the part's bits (`scheme`, or one number of bits for every part); a part the scheme leaves alone keeps
    the model's dtype.

    Group scales and biases are bf16 whatever the model's dtype: MLX quantizes the weights as bf16, as it does
    for a bf16 model. In fp32 they would be 2 of the 10 bytes per 16 weights at 4 bits, read every frame (for
    the bytes and times, see BENCHMARKS.md, "bf16 group scales and biases"). Rounding them costs nothing next
    to the 4-bit steps. The products still run in the activations' dtype.
    `layout_only`: only give the modules the quantized layout (lazily), for a checkpoint's weights to replace.
    """
    if isinstance(scheme, int):
        scheme = QuantizationScheme.uniform(scheme)
    group_size = scheme.group_size

    def bits_for(path: str, module: nn.Module) -> int | None:
        return scheme.bits(part_of(path)) if _quantizable(module, group_size) else None

    for path, module in model.named_modules():
        if bits_for(path, module) is not None:
            module.weight = module.weight.astype(QUANT_PARAM_DTYPE)

    def predicate(path: str, module: nn.Module) -> bool | dict[str, Any]:
        bits = bits_for(path, module)
        return False if bits is None else {"group_size": group_size, "bits": bits, "mode": "affine"}

    nn.quantize(model, class_predicate=predicate)
    # The depth decoder reads one codebook head per step: 31 x 2.1 M weights a frame, worth quantizing too.
    head_bits = scheme.bits(part_of("audio_head"))
    if head_bits and isinstance(model.audio_head, mx.array) and model.config.decoder.hidden_size % group_size == 0:
        model.audio_head = QuantizedCodebookHeads(model.audio_head.astype(QUANT_PARAM_DTYPE), group_size, head_bits)
        model.weights_changed()
    if layout_only:  # the caller replaces every weight: computing these would only waste time
        return
    # Quantize now (with a progress bar), not lazily inside the first forward pass.
    progress.evaluate(dict(tree_flatten(model.parameters())).values(), f"quantizing to {scheme.describe()}")


def random_params(cfg: CsmConfig, dtype: mx.Dtype, seed: int = 0) -> dict[str, mx.array]:
    """Random weights of the real shapes, scaled so activations stay finite. They do not speak."""
    params = {}
    for i, (name, shape) in enumerate(sorted(expected_shapes(CSM(cfg)).items())):
        if name.endswith("scale"):
            params[name] = mx.ones(shape, dtype=dtype)
        else:
            std = 1.0 / (shape[-2] if name == "audio_head" else shape[-1]) ** 0.5
            if name.endswith("embeddings.weight"):
                std = 0.02
            params[name] = (std * mx.random.normal(shape, key=mx.random.key(seed * 100_003 + i))).astype(dtype)
    return params


def save_csmd(
    model: CSM, directory: Path, quantization: QuantizationScheme | None, extra: dict[str, Any] | None = None
) -> None:
    """csmd's own format: `model.safetensors` in csmd naming beside `config.json` (which also gets `extra`);
    `quantization` is how `model` was quantized (None: not at all)."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(directory / "model.safetensors"), tensors, metadata={"format": CSMD_FORMAT})
    meta: dict[str, Any] = {
        "format": CSMD_FORMAT,
        "format_version": CSMD_FORMAT_VERSION,
        "dtype": str(model.activation_dtype()).removeprefix("mlx.core."),
        "quantization": quantization.to_dict() if quantization else None,
        "model": model.config.to_dict(),
        **(extra or {}),
    }
    (directory / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
