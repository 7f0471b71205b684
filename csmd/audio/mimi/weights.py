"""Mimi checkpoint tensors in any published naming -> csmd's Mimi naming (PyTorch layouts kept).

Three namings exist: Kyutai's (`encoder.model.3.conv.conv.weight`, the moshi file CSM uses), HF's
(`encoder.layers.3.conv.weight`, written by transformers' converter for `kyutai/mimi`, and found under
`codec_model.` in HF CSM checkpoints) and csmd's own (`encoder.layers.3.weight`, what the model code reads).
HF split the attention in_proj into q/k/v and permuted the q/k rows for half-split RoPE; csmd uses Kyutai's
interleaved RoPE, so those rows are permuted back. Layout changes for MLX are the model code's business.
"""

from __future__ import annotations

import os
import re

import mlx.core as mx

from csmd.audio.mimi.config import MimiConfig
from csmd.model.errors import CheckpointError, check_shapes
from csmd.model.weights import CODEC_PREFIX, read_tensors

_KYUTAI_SEANET = re.compile(r"^(encoder|decoder)\.model\.(\d+)\.(block\.[13]\.)?(?:conv\.conv|convtr\.convtr)\.")
_KYUTAI_LAYER = re.compile(r"^(encoder|decoder)_transformer\.transformer\.layers\.(\d+)\.(.+)$")
_KYUTAI_RVQ = re.compile(
    r"^quantizer\.rvq_(first|rest)\.(?:(input_proj|output_proj)\.weight|vq\.layers\.(\d+)\._codebook\.(\w+))$"
)
_HF_SEANET = re.compile(r"^(encoder|decoder)\.layers\.(\d+)\.(block\.[13]\.)?conv\.")
_HF_LAYER = re.compile(r"^(encoder|decoder)_transformer\.layers\.(\d+)\.(.+)$")
_HF_RVQ = re.compile(
    r"^quantizer\.(semantic|acoustic)_residual_vector_quantizer\."
    r"(?:(input_proj|output_proj)\.weight|layers\.(\d+)\.codebook\.(\w+))$"
)
_CODEBOOK = re.compile(r"^quantizer\.(semantic|acoustic)\.codebooks\.(\d+)\.")
_RVQ = {"first": "semantic", "rest": "acoustic", "semantic": "semantic", "acoustic": "acoustic"}
_BUFFERS = {"embedding_sum": "embedding_sum", "embed_sum": "embedding_sum", "cluster_usage": "cluster_usage"}
_UNUSED_BUFFERS = ("_initialized", "initialized")  # training-time flags, meaningless at inference

_NORMS = ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias")
# Transformer layer part -> csmd part. The released file says in_proj_weight (nn.MultiheadAttention style);
# moshi's own state_dict() says in_projs.0.weight since 0.2 (a load hook maps the file's names).
_KYUTAI_PARTS = {
    "self_attn.in_proj_weight": "attn.in_proj.weight", "self_attn.in_proj.weight": "attn.in_proj.weight",
    "self_attn.in_projs.0.weight": "attn.in_proj.weight", "self_attn.out_proj.weight": "attn.out_proj.weight",
    "self_attn.out_projs.0.weight": "attn.out_proj.weight",
    "linear1.weight": "mlp.fc1.weight", "linear2.weight": "mlp.fc2.weight",
    "layer_scale_1.scale": "layer_scale_1", "layer_scale_2.scale": "layer_scale_2",
    **{n: n for n in _NORMS},
}  # fmt: skip
_HF_PARTS = {
    "self_attn.o_proj.weight": "attn.out_proj.weight", "mlp.fc1.weight": "mlp.fc1.weight",
    "mlp.fc2.weight": "mlp.fc2.weight",
    "self_attn_layer_scale.scale": "layer_scale_1", "mlp_layer_scale.scale": "layer_scale_2",
    **{n.replace("norm1", "input_layernorm").replace("norm2", "post_attention_layernorm"): n for n in _NORMS},
}  # fmt: skip
_HF_QKV = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")
# (magnitude, direction) of the two weight-norm APIs: torch.nn.utils.weight_norm, then parametrizations.
_PARAMETRIZED = "parametrizations.weight.original"
_WEIGHT_NORM = (("weight_g", "weight_v"), (_PARAMETRIZED + "0", _PARAMETRIZED + "1"))
_KYUTAI_HINT = re.compile(r"^((en|de)coder\.model\.|quantizer\.rvq_|(en|de)coder_transformer\.transformer\.)")
_HF_HINT = re.compile(r"(^|\.)(conv\.(weight|bias)|self_attn\.|\w+_residual_vector_quantizer\.)")


def _specs(cfg: MimiConfig) -> dict[str, tuple[tuple[int, ...], int]]:
    """csmd name -> (shape, fan-in); fan-in 0 marks vectors. SEANet indices follow Kyutai (see config.py)."""
    sn, tf, qz = cfg.seanet, cfg.transformer, cfg.quantizer
    specs: dict[str, tuple[tuple[int, ...], int]] = {}

    def conv(name: str, c_in: int, c_out: int, k: int) -> None:
        specs[f"{name}.weight"], specs[f"{name}.bias"] = ((c_out, c_in, k), c_in * k), ((c_out,), 0)

    def resblock(name: str, dim: int) -> None:
        conv(f"{name}.block.1", dim, dim // sn.compress, sn.residual_kernel_size)
        conv(f"{name}.block.3", dim // sn.compress, dim, 1)

    n = len(sn.ratios)
    conv("encoder.layers.0", 1, sn.n_filters, sn.kernel_size)
    for j, ratio in enumerate(reversed(sn.ratios)):
        dim = sn.n_filters * 2**j
        resblock(f"encoder.layers.{1 + 3 * j}", dim)
        conv(f"encoder.layers.{3 + 3 * j}", dim, 2 * dim, 2 * ratio)
    conv(f"encoder.layers.{2 + 3 * n}", sn.n_filters * 2**n, sn.dimension, sn.last_kernel_size)
    conv("decoder.layers.0", sn.dimension, sn.n_filters * 2**n, sn.kernel_size)
    for j, ratio in enumerate(sn.ratios):
        dim = sn.n_filters * 2 ** (n - j)
        # ConvTranspose keeps PyTorch's [in, out, k]; with k = 2 * stride each output sums 2 * in terms.
        specs[f"decoder.layers.{2 + 3 * j}.weight"] = ((dim, dim // 2, 2 * ratio), 2 * dim)
        specs[f"decoder.layers.{2 + 3 * j}.bias"] = ((dim // 2,), 0)
        resblock(f"decoder.layers.{3 + 3 * j}", dim // 2)
    conv(f"decoder.layers.{2 + 3 * n}", sn.n_filters, 1, sn.last_kernel_size)

    d, ff = tf.d_model, tf.dim_feedforward
    for side in ("encoder", "decoder"):
        for layer in range(tf.num_layers):
            p = f"{side}_transformer.layers.{layer}."
            specs[p + "attn.in_proj.weight"] = ((3 * d, d), d)
            specs[p + "attn.out_proj.weight"] = ((d, d), d)
            specs[p + "mlp.fc1.weight"], specs[p + "mlp.fc2.weight"] = ((ff, d), d), ((d, ff), ff)
            for v in (*_NORMS, "layer_scale_1", "layer_scale_2"):
                specs[p + v] = ((d,), 0)
    stride = round(cfg.encoder_frame_rate / cfg.frame_rate)
    specs["downsample.weight"] = ((sn.dimension, sn.dimension, 2 * stride), sn.dimension * 2 * stride)
    specs["upsample.weight"] = ((sn.dimension, 1, 2 * stride), 2)  # depthwise: 2 taps reach each output
    for rvq, levels in (("semantic", qz.n_q_semantic), ("acoustic", qz.n_q - qz.n_q_semantic)):
        specs[f"quantizer.{rvq}.input_proj.weight"] = ((qz.dimension, sn.dimension, 1), sn.dimension)
        specs[f"quantizer.{rvq}.output_proj.weight"] = ((sn.dimension, qz.dimension, 1), qz.dimension)
        for q in range(levels):
            specs[f"quantizer.{rvq}.codebooks.{q}.cluster_usage"] = ((qz.bins,), 0)
            specs[f"quantizer.{rvq}.codebooks.{q}.embedding_sum"] = ((qz.bins, qz.dimension), 0)
    return specs


def expected_shapes(cfg: MimiConfig) -> dict[str, tuple[int, ...]]:
    return {name: shape for name, (shape, _) in _specs(cfg).items()}


def from_kyutai_naming(tensors: dict[str, mx.array], cfg: MimiConfig) -> dict[str, mx.array]:
    """Kyutai (moshi) names -> csmd names. Unknown names pass through, so check_tensors reports them."""
    out: dict[str, mx.array] = {}
    for name, value in tensors.items():
        if name.endswith(_UNUSED_BUFFERS):
            continue
        new = name
        if m := _KYUTAI_SEANET.match(name):
            new = f"{m[1]}.layers.{m[2]}.{m[3] or ''}{name[m.end() :]}"
        elif (m := _KYUTAI_LAYER.match(name)) and m[3] in _KYUTAI_PARTS:
            new = f"{m[1]}_transformer.layers.{m[2]}.{_KYUTAI_PARTS[m[3]]}"
        elif name in ("downsample.conv.conv.conv.weight", "upsample.convtr.convtr.convtr.weight"):
            new = name.split(".")[0] + ".weight"
        elif m := _KYUTAI_RVQ.match(name):
            new = _rvq_name(m)
        out[new] = value
    return out


def from_hf_naming(tensors: dict[str, mx.array], cfg: MimiConfig) -> dict[str, mx.array]:
    """HF names (also under `codec_model.`) -> csmd names, q/k rows back in interleaved-RoPE order."""
    out: dict[str, mx.array] = {}
    qkv: dict[str, dict[str, mx.array]] = {}  # csmd in_proj name -> HF part -> tensor
    for name, value in tensors.items():
        name = name.removeprefix(CODEC_PREFIX)
        if name.endswith(_UNUSED_BUFFERS):
            continue
        new = name
        if m := _HF_SEANET.match(name):
            new = f"{m[1]}.layers.{m[2]}.{m[3] or ''}{name[m.end() :]}"
        elif (m := _HF_LAYER.match(name)) and m[3] in _HF_QKV:
            qkv.setdefault(f"{m[1]}_transformer.layers.{m[2]}.attn.in_proj.weight", {})[m[3]] = value
            continue
        elif m and m[3] in _HF_PARTS:
            new = f"{m[1]}_transformer.layers.{m[2]}.{_HF_PARTS[m[3]]}"
        elif name in ("downsample.conv.weight", "upsample.conv.weight"):
            new = name.split(".")[0] + ".weight"
        elif m := _HF_RVQ.match(name):
            new = _rvq_name(m)
        out[new] = value
    for new, parts in qkv.items():
        if missing := [p for p in _HF_QKV if p not in parts]:
            raise CheckpointError(f"{new!r}: the HF checkpoint lacks its {missing[0]}")
        q, k, v = (parts[p] for p in _HF_QKV)
        heads = cfg.transformer.num_heads
        out[new] = mx.concatenate([_unpermute_rope_rows(q, heads), _unpermute_rope_rows(k, heads), v])
    return out


def _rvq_name(m: re.Match[str]) -> str:
    rvq = _RVQ[m[1]]
    if m[2]:
        return f"quantizer.{rvq}.{m[2]}.weight"
    return f"quantizer.{rvq}.codebooks.{m[3]}.{_BUFFERS.get(m[4], m[4])}"


def _unpermute_rope_rows(weight: mx.array, num_heads: int) -> mx.array:
    """Undo the HF converter's `view(h, hd/2, 2, d).transpose(1, 2)`: HF row p*hd/2 + i is Kyutai's 2i + p."""
    rows, cols = weight.shape
    half = rows // num_heads // 2
    return weight.reshape(num_heads, 2, half, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def _fold_weight_norm(tensors: dict[str, mx.array], source: str) -> dict[str, mx.array]:
    """w = g * v / ||v||, the norm over every dim but 0 (a ConvTranspose's input channel), as in torch."""
    out = dict(tensors)
    for g_suffix, v_suffix in _WEIGHT_NORM:
        for name in tensors:
            if not name.endswith((g_suffix, v_suffix)):
                continue
            base = name.removesuffix(g_suffix).removesuffix(v_suffix)
            if base + "weight" in out:
                continue  # this pair is already folded
            g_name, v_name = base + g_suffix, base + v_suffix
            for have, lack in ((g_name, v_name), (v_name, g_name)):
                if have in tensors and lack not in tensors:
                    raise CheckpointError(f"{source}: weight-norm tensor {have!r} has no partner {lack!r}")
            g, v = out.pop(g_name), out.pop(v_name)
            v32 = v.astype(mx.float32)
            norm = mx.sqrt(mx.sum(v32 * v32, axis=tuple(range(1, v.ndim)), keepdims=True))
            out[base + "weight"] = (g.astype(mx.float32) * v32 / norm).astype(v.dtype)
    return out


def _naming(tensors: dict[str, mx.array]) -> str:
    if any(_KYUTAI_HINT.match(n) for n in tensors):
        return "kyutai"
    return "hf" if any(_HF_HINT.search(n) for n in tensors) else "csmd"


def to_csmd_naming(tensors: dict[str, mx.array], cfg: MimiConfig, source: str) -> dict[str, mx.array]:
    """Any naming -> csmd naming; weight norm folded, levels past cfg.quantizer.n_q dropped, then checked."""
    if any(k.startswith(CODEC_PREFIX) for k in tensors):  # an HF CSM checkpoint: only its codec is Mimi
        tensors = {k.removeprefix(CODEC_PREFIX): v for k, v in tensors.items() if k.startswith(CODEC_PREFIX)}
    tensors = _fold_weight_norm(tensors, source)
    naming = _naming(tensors)
    try:
        if naming == "kyutai":
            tensors = from_kyutai_naming(tensors, cfg)
        elif naming == "hf":
            tensors = from_hf_naming(tensors, cfg)
    except CheckpointError as exc:
        raise CheckpointError(f"{source}: {exc}") from exc
    # Kyutai's file has 32 levels; deeper ones only refine the residual, so a config with fewer levels can
    # drop them (moshi's set_num_codebooks truncates the same way).
    semantic = cfg.quantizer.n_q_semantic
    keep = {"semantic": semantic, "acoustic": cfg.quantizer.n_q - semantic}
    tensors = {k: v for k, v in tensors.items() if not ((m := _CODEBOOK.match(k)) and int(m[2]) >= keep[m[1]])}
    check_tensors(tensors, cfg, source)
    return tensors


def check_tensors(tensors: dict[str, mx.array], cfg: MimiConfig, source: str) -> None:
    """A missing, unexpected or mis-shaped tensor is an error that names it."""
    expected = expected_shapes(cfg)
    missing = [k for k in expected if k not in tensors]
    levels = sum(1 for k in tensors if _CODEBOOK.match(k) and k.endswith(".embedding_sum"))
    if any(_CODEBOOK.match(k) for k in missing) and levels < cfg.quantizer.n_q:  # name the real cause
        raise CheckpointError(
            f"{source}: holds {levels} quantizer levels, the config needs {cfg.quantizer.n_q} "
            f"(missing tensor {missing[0]!r})"
        )
    check_shapes(tensors, expected, source)


def load_mimi_tensors(path: str | os.PathLike[str], cfg: MimiConfig) -> dict[str, mx.array]:
    """A Mimi checkpoint (Kyutai, HF `kyutai/mimi`, an HF CSM checkpoint's codec, or csmd) in csmd naming."""
    return to_csmd_naming(read_tensors(path), cfg, str(path))


def random_tensors(cfg: MimiConfig, seed: int = 0) -> dict[str, mx.array]:
    """Random tensors of the real shapes whose decode stays finite and O(1). They do not speak."""
    out: dict[str, mx.array] = {}
    key = mx.random.key(seed)
    for name, (shape, fan_in) in _specs(cfg).items():
        key, sub = mx.random.split(key)
        if name.endswith("cluster_usage"):
            out[name] = mx.random.uniform(0.5, 2.0, shape, key=sub)
        elif name.endswith("embedding_sum"):  # scaled by usage, so the embedding itself is ~N(0, 1)
            usage = out[name.removesuffix("embedding_sum") + "cluster_usage"]
            out[name] = mx.random.normal(shape, key=sub) * usage[:, None]
        elif "layer_scale" in name:
            out[name] = mx.random.uniform(0.01, 0.1, shape, key=sub)
        elif ".norm" in name and name.endswith("weight"):
            out[name] = mx.random.uniform(0.9, 1.1, shape, key=sub)
        elif fan_in == 0:  # biases
            out[name] = 0.02 * mx.random.normal(shape, key=sub)
        else:
            out[name] = mx.random.normal(shape, key=sub) / fan_in**0.5
    return out
