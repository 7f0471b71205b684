"""Quantization schemes: how many bits each part of a CSM is stored in, one scheme for every command.

A CSM has two parts, each quantized alike or left in the model's dtype:
- `backbone`: the backbone stack, the text embeddings and the codebook-0 head (read once per frame);
- `decoder`: the depth-decoder stack, the projection, the audio codebook heads and the audio embeddings
  (read by each of a frame's 31 depth-decoder steps). The native whole-frame depth decoder reads all of
  these in one format, so they are one part; the backbone's audio-embedding lookups read any format.

Written as the flag says it: `4` or `8` (both parts), or `backbone=B,decoder=D` with B and D each 4, 8 or
`none`. In a csmd directory's config.json a uniform scheme is `{"bits": B, "group_size": G}`, as before
per-part schemes existed (so older csmd reads it), and a mixed one `{"backbone": B, "decoder": D,
"group_size": G}` with null for a part left unquantized.

Nothing here imports MLX: the CLI parses `--quantize` before loading anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PARTS = ("backbone", "decoder")
BITS = (4, 8)
GROUP_SIZE = 64  # MLX's affine groups along each row's input, what the native kernels read
UNQUANTIZED = "none"
# The CSM attributes each part holds (the first component of a parameter's or module's path).
PART_MEMBERS = {
    "backbone": ("backbone", "text_embeddings", "codebook0_head"),
    "decoder": ("decoder", "projection", "audio_head", "audio_embeddings"),
}
SYNTAX = "4, 8 or backbone=B,decoder=D (B, D each 4, 8 or none)"
# What `csmd bench precision` compares unless told otherwise: both uniform schemes and the two mixed ones.
BENCHMARK_SCHEMES = ("4", "8", "backbone=4,decoder=8", "backbone=8,decoder=4")


@dataclass(frozen=True)
class QuantizationScheme:
    """Bits per part (None: left in the model's dtype); at least one part is quantized."""

    backbone: int | None
    decoder: int | None
    group_size: int = GROUP_SIZE

    def __post_init__(self) -> None:
        for part in PARTS:
            bits = self.bits(part)
            if bits is not None and bits not in BITS:
                raise ValueError(f"{part}: quantize to 4 or 8 bits, not {bits}")
        if self.backbone is None and self.decoder is None:
            raise ValueError("a scheme quantizes at least one part")
        if self.group_size < 1:
            raise ValueError(f"group size must be >= 1, not {self.group_size}")

    @classmethod
    def uniform(cls, bits: int, group_size: int = GROUP_SIZE) -> QuantizationScheme:
        return cls(bits, bits, group_size)

    def bits(self, part: str) -> int | None:
        if part not in PARTS:
            raise ValueError(f"unknown part {part!r}; the parts are {', '.join(PARTS)}")
        value: int | None = getattr(self, part)
        return value

    @property
    def uniform_bits(self) -> int | None:
        """The bits of both parts when they are the same, else None."""
        return self.backbone if self.backbone == self.decoder else None

    # -- the flag's text -----------------------------------------------------------------------------

    @classmethod
    def parse(cls, text: str) -> QuantizationScheme:
        """`4`, `8`, or `backbone=B,decoder=D` (either order, both parts named); ValueError otherwise."""
        text = text.strip()
        if text in {str(b) for b in BITS}:
            return cls.uniform(int(text))
        parts: dict[str, int | None] = {}
        for item in text.split(","):
            name, sep, value = (s.strip() for s in item.partition("="))
            if not sep or name not in PARTS:
                raise ValueError(f"expected {SYNTAX}, not {text!r}")
            if name in parts:
                raise ValueError(f"{name} is given twice in {text!r}")
            if value != UNQUANTIZED and value not in {str(b) for b in BITS}:
                raise ValueError(f"{name}: expected 4, 8 or {UNQUANTIZED}, not {value!r}")
            parts[name] = None if value == UNQUANTIZED else int(value)
        missing = [p for p in PARTS if p not in parts]
        if missing:
            raise ValueError(f"{text!r} does not say {' or '.join(missing)}'s bits (4, 8 or none)")
        if all(bits is None for bits in parts.values()):
            raise ValueError(f"{text!r} quantizes nothing (leave the flag out for float weights)")
        return cls(parts["backbone"], parts["decoder"])

    def __str__(self) -> str:
        """The flag's text, which `parse` reads back."""
        if self.uniform_bits is not None:
            return str(self.uniform_bits)
        return ",".join(f"{p}={self.bits(p) or UNQUANTIZED}" for p in PARTS)

    def describe(self) -> str:
        """For people: `4-bit`, or `backbone 4-bit, decoder 8-bit` (`unquantized` for a part left alone)."""
        if self.uniform_bits is not None:
            return f"{self.uniform_bits}-bit"
        return ", ".join(f"{p} {_bits_text(self.bits(p))}" for p in PARTS)

    # -- config.json ---------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        if self.uniform_bits is not None:
            return {"bits": self.uniform_bits, "group_size": self.group_size}
        return {"backbone": self.backbone, "decoder": self.decoder, "group_size": self.group_size}

    @classmethod
    def from_dict(cls, data: object) -> QuantizationScheme:
        """What `to_dict` wrote (or a config of one `bits` for all); ValueError for anything else."""
        if not isinstance(data, dict):
            raise ValueError(f"expected an object, not {data!r}")
        group_size = data.get("group_size", GROUP_SIZE)
        if not isinstance(group_size, int):
            raise ValueError(f"group_size must be an integer, not {group_size!r}")
        if "bits" in data:
            if set(data) - {"bits", "group_size"}:
                raise ValueError(f"'bits' is for every part: no per-part keys beside it ({sorted(data)})")
            return cls.uniform(_stored_bits(data["bits"], "bits"), group_size)
        unknown = set(data) - {*PARTS, "group_size"}
        if unknown or any(p not in data for p in PARTS):
            raise ValueError(f"expected 'bits' or both of {', '.join(PARTS)} (and 'group_size'), not {sorted(data)}")
        backbone = _stored_optional_bits(data["backbone"], "backbone")
        return cls(backbone, _stored_optional_bits(data["decoder"], "decoder"), group_size)


def part_of(path: str) -> str:
    """The part a CSM parameter or module belongs to, from its path (`backbone.layers.0.attn.q_proj`)."""
    head = path.split(".", 1)[0]
    for part, members in PART_MEMBERS.items():
        if head in members:
            return part
    raise ValueError(f"{path!r} is in no part of the model ({', '.join(PARTS)})")


def _stored_bits(value: object, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value not in BITS:
        raise ValueError(f"{what} must be 4 or 8, not {value!r}")
    return value


def _stored_optional_bits(value: object, what: str) -> int | None:
    return None if value is None else _stored_bits(value, what)


def _bits_text(bits: int | None) -> str:
    return "unquantized" if bits is None else f"{bits}-bit"
