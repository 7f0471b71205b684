"""Kyutai's PyTorch Mimi (moshi) with random weights, and transformers' converter: codec references."""

from __future__ import annotations

import copy

import torch
from moshi.models import loaders

HF_CONFIG = dict(
    hidden_size=32, num_filters=8, codebook_size=64, codebook_dim=16, vector_quantization_hidden_dimension=16,
    num_quantizers=4, num_semantic_quantizers=1, num_hidden_layers=1, intermediate_size=64,
    num_attention_heads=2, num_key_value_heads=2, upsample_groups=32, sliding_window=16,
    max_position_embeddings=256,
)  # fmt: skip


def build_moshi(seed: int = 0, full_size: bool = False) -> torch.nn.Module:
    """moshi's Mimi with TINY's shapes (or the real ones), every tensor random and distinct."""
    torch.manual_seed(seed)
    if full_size:
        model = loaders.get_mimi(None, device="cpu", num_codebooks=32)
    else:
        cfg = copy.deepcopy(loaders._mimi_config)
        cfg["seanet"].update(dimension=32, n_filters=8)
        cfg["quantizer"].update(dimension=16, n_q=4, bins=64, input_dimension=32, output_dimension=32)
        cfg["transformer"].update(
            d_model=32, num_heads=2, num_layers=1, dim_feedforward=64, input_dimension=32,
            output_dimensions=[32], context=16,
        )  # fmt: skip
        model = loaders.get_mimi(None, mimi_config=cfg, num_codebooks=4, device="cpu")
    with torch.no_grad():  # init leaves usage at 1, sums at 0 and layer scales at 0.01: make each distinct
        for name, buf in model.named_buffers():
            if name.endswith("cluster_usage"):
                buf.uniform_(0.5, 2.0)
        for name, buf in model.named_buffers():
            if name.endswith("embedding_sum"):
                usage = dict(model.named_buffers())[name.replace("embedding_sum", "cluster_usage")]
                buf.copy_(torch.randn_like(buf) * usage[:, None])
        for name, p in model.named_parameters():
            if "layer_scale" in name:
                p.uniform_(0.01, 0.1)
            elif "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def kyutai_file(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict under the released file's names (moshi >= 0.2 says in_projs.0 for in_proj_weight)."""
    out = {}
    for k, v in model.state_dict().items():
        k = k.replace("self_attn.in_projs.0.weight", "self_attn.in_proj_weight")
        out[k.replace("self_attn.out_projs.0.", "self_attn.out_proj.")] = v.detach().clone().contiguous()
    return out


# transformers' convert_mimi_checkpoint_to_pytorch.py, verbatim: substring renames in this order.
CONVERT_LIST = [
    ("conv.conv.conv", "conv"), ("convtr.convtr.convtr", "conv"),
    ("conv.conv", "conv"), ("convtr.convtr", "conv"),
    ("quantizer.rvq_first.vq", "quantizer.semantic_residual_vector_quantizer"),
    ("quantizer.rvq_first", "quantizer.semantic_residual_vector_quantizer"),
    ("quantizer.rvq_rest.vq", "quantizer.acoustic_residual_vector_quantizer"),
    ("quantizer.rvq_rest", "quantizer.acoustic_residual_vector_quantizer"),
    ("_codebook", "codebook"), ("_initialized", "initialized"), ("embedding_sum", "embed_sum"),
    ("encoder.model", "encoder.layers"), ("decoder.model", "decoder.layers"),
    ("encoder_transformer.transformer", "encoder_transformer"),
    ("decoder_transformer.transformer", "decoder_transformer"),
    ("linear1", "mlp.fc1"), ("linear2", "mlp.fc2"), ("self_attn.out_proj", "self_attn.o_proj"),
    ("norm1", "input_layernorm"), ("norm2", "post_attention_layernorm"),
    ("layer_scale_1", "self_attn_layer_scale"), ("layer_scale_2", "mlp_layer_scale"),
]  # fmt: skip


def hf_convert(state: dict[str, torch.Tensor], num_heads: int) -> dict[str, torch.Tensor]:
    """The converter's `_convert_model` on a Kyutai file's state dict."""

    def permute(w: torch.Tensor) -> torch.Tensor:  # "permute for sliced rotary"
        d1, d2 = w.shape
        return w.view(num_heads, d1 // num_heads // 2, 2, d2).transpose(1, 2).reshape(d1, d2)

    out = {}
    for k, v in state.items():
        for old, new in CONVERT_LIST:
            k = k.replace(old, new)
        if "in_proj_weight" in k:
            q, kk, vv = v.chunk(3)
            out[k.replace("in_proj_weight", "q_proj.weight")] = permute(q).contiguous()
            out[k.replace("in_proj_weight", "k_proj.weight")] = permute(kk).contiguous()
            out[k.replace("in_proj_weight", "v_proj.weight")] = vv.contiguous()
        else:
            out[k] = v
    return out
