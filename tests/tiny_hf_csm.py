"""A tiny random transformers CsmForConditionalGeneration in HF format: the parity tests' reference."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import torch
from trained_tokenizers import BOS, EOS, train_byte_level
from transformers import CsmConfig, CsmDepthDecoderConfig, CsmForConditionalGeneration, MimiConfig

NQ, CB, TEXT_VOCAB = 4, 64, 300
ROPE = {  # Llama-3 scaling in HF's form, with a small original context so every band is used
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}


def rel_err(ours: mx.array | np.ndarray, ref: torch.Tensor | np.ndarray | mx.array) -> float:
    """max |ours - ref| / max |ref|"""
    a = np.asarray(ours, dtype=np.float64)
    b = ref.detach().double().numpy() if isinstance(ref, torch.Tensor) else np.asarray(ref, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def build(seed: int = 0) -> CsmForConditionalGeneration:
    torch.manual_seed(seed)
    mimi = MimiConfig(
        hidden_size=32, num_filters=8, codebook_size=CB, codebook_dim=16,
        vector_quantization_hidden_dimension=16, num_quantizers=NQ, num_semantic_quantizers=1,
        num_hidden_layers=1, intermediate_size=64, num_attention_heads=2, num_key_value_heads=2,
        upsample_groups=32, sliding_window=16, max_position_embeddings=256,
    )  # fmt: skip
    depth = CsmDepthDecoderConfig(
        num_codebooks=NQ, backbone_hidden_size=64, vocab_size=CB + 3, hidden_size=32,
        intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=NQ + 1, rope_parameters=dict(ROPE),
    )  # fmt: skip
    cfg = CsmConfig(
        num_codebooks=NQ, vocab_size=CB + 3, text_vocab_size=TEXT_VOCAB, hidden_size=64,
        intermediate_size=128, num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2,
        max_position_embeddings=256, pad_token_id=TEXT_VOCAB - 2, codebook_pad_token_id=CB + 2,
        codebook_eos_token_id=0, bos_token_id=0, audio_token_id=TEXT_VOCAB - 2,
        audio_eos_token_id=TEXT_VOCAB - 1, rope_parameters=dict(ROPE),
        depth_decoder_config=depth.to_dict(), codec_config=mimi.to_dict(),
    )  # fmt: skip
    model = CsmForConditionalGeneration(cfg).eval()
    # Random init leaves norms at 1 and makes every layer look alike; perturb so a swapped tensor shows.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def save(path: Path) -> Path:
    """The model in HF format plus a tokenizer.json trained in-process; returns the directory."""
    build().save_pretrained(path)
    train_byte_level([BOS, EOS], vocab_size=TEXT_VOCAB - 10).save(str(path / "tokenizer.json"))
    return path
