"""Mimi hyperparameters. `mimi` is Kyutai's released codec (as CSM uses it, 32 codebooks); `tiny` is for tests.

The layer indices of SEANet follow Kyutai's `nn.Sequential` numbering, which checkpoint names carry:
encoder: 0 conv, then per ratio (reversed) [ResBlock x n_residual_layers, ELU, strided conv], then ELU, conv.
decoder: 0 conv, then per ratio [ELU, transposed conv, ResBlock x n_residual_layers], then ELU, conv.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class SeanetConfig:
    dimension: int = 512  # latent channels
    n_filters: int = 64
    ratios: tuple[int, ...] = (8, 6, 5, 4)  # decoder order; the encoder uses them reversed
    kernel_size: int = 7
    residual_kernel_size: int = 3
    last_kernel_size: int = 3
    compress: int = 2  # ResBlock hidden = channels // compress
    n_residual_layers: int = 1

    @property
    def hop_length(self) -> int:
        hop = 1
        for r in self.ratios:
            hop *= r
        return hop


@dataclass(frozen=True)
class MimiTransformerConfig:
    d_model: int = 512
    num_heads: int = 8
    num_layers: int = 8
    dim_feedforward: int = 2048
    context: int = 250  # each step attends to itself and the 249 before it
    max_period: float = 10_000.0
    norm_eps: float = 1e-5


@dataclass(frozen=True)
class QuantizerConfig:
    dimension: int = 256  # codebook vectors
    n_q: int = 32  # levels in the checkpoint: n_q_semantic + acoustic
    bins: int = 2048
    n_q_semantic: int = 1


@dataclass(frozen=True)
class MimiConfig:
    sample_rate: int = 24_000
    frame_rate: float = 12.5
    seanet: SeanetConfig = field(default_factory=SeanetConfig)
    transformer: MimiTransformerConfig = field(default_factory=MimiTransformerConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    num_codebooks: int = 32  # codebooks in use (CSM: all 32); must be <= quantizer.n_q

    def __post_init__(self) -> None:
        if not 1 <= self.num_codebooks <= self.quantizer.n_q:
            raise ValueError(f"num_codebooks must be in 1..{self.quantizer.n_q}, got {self.num_codebooks}")
        if self.seanet.n_residual_layers != 1:
            raise ValueError("csmd's Mimi supports n_residual_layers=1 (Kyutai's release)")
        if self.encoder_frame_rate != 2 * self.frame_rate:
            raise ValueError("the latent must run at twice the code frame rate (a stride-2 down/upsample)")

    @property
    def encoder_frame_rate(self) -> float:
        return self.sample_rate / self.seanet.hop_length

    @property
    def frame_size(self) -> int:
        """Samples per code frame: 1920 (80 ms) for the real codec."""
        return int(self.sample_rate / self.frame_rate)

    def with_codebooks(self, n: int) -> MimiConfig:
        return dataclasses.replace(self, num_codebooks=n)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MimiConfig:
        """The inverse of `to_dict` (csmd's own config files)."""
        d = dict(data)
        seanet = dict(d.pop("seanet"))
        seanet["ratios"] = tuple(seanet["ratios"])
        return cls(
            seanet=SeanetConfig(**seanet),
            transformer=MimiTransformerConfig(**d.pop("transformer")),
            quantizer=QuantizerConfig(**d.pop("quantizer")),
            **d,
        )


MIMI = MimiConfig()

# Same shapes as ENVIRONMENT.md's tiny moshi / HF configs (410,313 parameters), so one set of random
# weights can be written in both namings.
TINY = MimiConfig(
    sample_rate=24_000,
    frame_rate=12.5,
    seanet=SeanetConfig(dimension=32, n_filters=8),
    transformer=MimiTransformerConfig(d_model=32, num_heads=2, num_layers=1, dim_feedforward=64, context=16),
    quantizer=QuantizerConfig(dimension=16, n_q=4, bins=64),
    num_codebooks=4,
)

PRESETS = {"mimi": MIMI, "tiny": TINY}


def from_hf_config(cfg: dict[str, Any], num_codebooks: int | None = None) -> MimiConfig:
    """Read a transformers `MimiConfig` (kyutai/mimi's config.json, or `codec_config` of an HF CSM one)."""
    seanet = SeanetConfig(
        dimension=cfg.get("hidden_size", 512),
        n_filters=cfg.get("num_filters", 64),
        ratios=tuple(cfg.get("upsampling_ratios", (8, 6, 5, 4))),
        kernel_size=cfg.get("kernel_size", 7),
        residual_kernel_size=cfg.get("residual_kernel_size", 3),
        last_kernel_size=cfg.get("last_kernel_size", 3),
        compress=cfg.get("compress", 2),
        n_residual_layers=cfg.get("num_residual_layers", 1),
    )
    rope = cfg.get("rope_parameters") or {}
    transformer = MimiTransformerConfig(
        d_model=cfg.get("hidden_size", 512),
        num_heads=cfg.get("num_attention_heads", 8),
        num_layers=cfg.get("num_hidden_layers", 8),
        dim_feedforward=cfg.get("intermediate_size", 2048),
        context=cfg.get("sliding_window", 250),
        max_period=float(rope.get("rope_theta", cfg.get("rope_theta", 10_000.0))),
        norm_eps=cfg.get("norm_eps", 1e-5),
    )
    quantizer = QuantizerConfig(
        dimension=cfg.get("codebook_dim", 256),
        n_q=cfg.get("num_quantizers", 32),
        bins=cfg.get("codebook_size", 2048),
        n_q_semantic=cfg.get("num_semantic_quantizers", 1),
    )
    return MimiConfig(
        sample_rate=cfg.get("sampling_rate", 24_000),
        frame_rate=float(cfg.get("frame_rate") or 12.5),
        seanet=seanet,
        transformer=transformer,
        quantizer=quantizer,
        num_codebooks=num_codebooks or quantizer.n_q,
    )
