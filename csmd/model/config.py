"""Model hyperparameters: the two Llama-3.2 transformers of CSM and the frame layout around them.

`csm-1b` holds the exact numbers of Sesame's checkpoint; `tiny` is a few-kilobyte model for tests.
Configs round-trip through plain dicts (csmd's own `config.json`) and can be read from a
transformers `CsmConfig` dict, so a checkpoint's config file is the source of truth when it has one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 frequency scaling, in torchtune's terms (HF's equivalent form converts losslessly)."""

    factor: float = 32.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class TransformerConfig:
    """One Llama-3.2 decoder stack, without embedding or LM head (CSM supplies its own)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    max_seq_len: int
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500_000.0
    rope_scaling: RopeScaling | None = field(default_factory=RopeScaling)

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    def validate(self, name: str) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"{name}: num_heads ({self.num_heads}) must be a multiple of num_kv_heads")
        if self.dim_per_head % 2:
            raise ValueError(f"{name}: head_dim ({self.dim_per_head}) must be even for RoPE")


@dataclass(frozen=True)
class CsmConfig:
    """CSM: a backbone over 33-column frames, a codebook-0 head, and a depth decoder for codebooks 1..N-1."""

    backbone: TransformerConfig
    decoder: TransformerConfig
    text_vocab_size: int = 128_256
    audio_vocab_size: int = 2051  # per codebook: 2048 Mimi codes + 3 ids Mimi never produces
    audio_codebook_size: int = 2048  # the codes Mimi can decode
    num_codebooks: int = 32
    bos_token_id: int = 128_000
    eos_token_id: int = 128_001

    def __post_init__(self) -> None:
        self.backbone.validate("backbone")
        self.decoder.validate("decoder")
        if not 0 < self.audio_codebook_size <= self.audio_vocab_size:
            raise ValueError("audio_codebook_size must be in 1..audio_vocab_size")
        if self.decoder.max_seq_len < self.num_codebooks:
            raise ValueError("the depth decoder needs at least num_codebooks positions")

    @property
    def num_columns(self) -> int:
        """Columns of one backbone row: every audio codebook plus the text token."""
        return self.num_codebooks + 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CsmConfig:
        def transformer(d: dict[str, Any]) -> TransformerConfig:
            d = dict(d)
            scaling = d.pop("rope_scaling", None)
            return TransformerConfig(**d, rope_scaling=RopeScaling(**scaling) if scaling else None)

        d = dict(data)
        return cls(backbone=transformer(d.pop("backbone")), decoder=transformer(d.pop("decoder")), **d)


def _hf_rope(cfg: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    """(theta, scaling) from an HF config; accepts both `rope_parameters` (v5) and `rope_scaling` (v4)."""
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 500_000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise ValueError(f"unsupported rope_type {kind!r} (csmd implements 'default' and 'llama3')")
    return theta, RopeScaling(
        factor=float(params["factor"]),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(params["original_max_position_embeddings"]),
    )


def _hf_transformer(cfg: dict[str, Any], max_seq_len: int) -> TransformerConfig:
    theta, scaling = _hf_rope(cfg)
    return TransformerConfig(
        hidden_size=cfg["hidden_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=cfg["num_attention_heads"],
        num_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
        intermediate_size=cfg["intermediate_size"],
        max_seq_len=max_seq_len,
        head_dim=cfg.get("head_dim"),
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
        rope_theta=theta,
        rope_scaling=scaling,
    )


def from_hf_config(cfg: dict[str, Any]) -> CsmConfig:
    """Read a transformers `CsmConfig` (the `config.json` of an HF-format CSM checkpoint)."""
    depth = cfg["depth_decoder_config"]
    num_codebooks = cfg.get("num_codebooks", 32)
    vocab = cfg.get("vocab_size", 2051)
    return CsmConfig(
        backbone=_hf_transformer(cfg, cfg.get("max_position_embeddings", 2048)),
        # The depth decoder only ever sees num_codebooks positions (HF's table has one spare).
        decoder=_hf_transformer(depth, num_codebooks),
        text_vocab_size=cfg.get("text_vocab_size", 128_256),
        audio_vocab_size=vocab,
        # HF puts the pad id (2050) right after the real codes and two more ids before it.
        audio_codebook_size=min(vocab, cfg.get("codebook_pad_token_id", vocab - 1) - 2),
        num_codebooks=num_codebooks,
        bos_token_id=cfg.get("bos_token_id", 128_000),
        eos_token_id=cfg.get("eos_token_id") or 128_001,
    )


CSM_1B = CsmConfig(
    backbone=TransformerConfig(
        hidden_size=2048,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        intermediate_size=8192,
        max_seq_len=2048,
    ),
    decoder=TransformerConfig(
        hidden_size=1024, num_layers=4, num_heads=8, num_kv_heads=2, intermediate_size=8192, max_seq_len=32
    ),
)

# Small enough to build in milliseconds, but with GQA, several layers and Llama-3 scaling that bites
# (original context 16, so the scaled and smoothed frequency bands are both exercised). Its window is
# csm-1b's 2048 rows, so that every default of the commands (a 20 s reply, a 300-row prefill) fits it too.
_TINY_ROPE = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16)
TINY = CsmConfig(
    backbone=TransformerConfig(
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=128,
        max_seq_len=2048,
        rope_scaling=_TINY_ROPE,
    ),
    decoder=TransformerConfig(
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        intermediate_size=64,
        max_seq_len=4,
        rope_scaling=_TINY_ROPE,
    ),
    text_vocab_size=300,
    audio_vocab_size=67,
    audio_codebook_size=64,
    num_codebooks=4,
    bos_token_id=1,
    eos_token_id=2,
)

PRESETS: dict[str, CsmConfig] = {"csm-1b": CSM_1B, "tiny": TINY}


def preset(name: str) -> CsmConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}") from None
