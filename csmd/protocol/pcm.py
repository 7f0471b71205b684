"""PCM bytes <-> float32 samples for the two wire formats (mono, little-endian, no header)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from csmd.protocol.errors import ProtocolError
from csmd.protocol.messages import FORMATS, SAMPLE_WIDTH

_S16_SCALE = 32767.0  # symmetric: +1.0 -> 32767 and -1.0 -> -32767, so encode(decode(x)) is stable


def _check_format(format: str) -> None:
    if format not in FORMATS:
        raise ProtocolError("bad_field", f"unknown pcm format {format!r}; expected one of {FORMATS}", field="format")


def encode_pcm(samples: npt.ArrayLike, format: str) -> bytes:
    """Mono float samples (nominally in [-1, 1]) as wire bytes.

    pcm_s16le clips to [-1, 1] (NaN becomes silence), scales by 32767 and rounds to nearest; pcm_f32le is exact.
    Raises ValueError for anything but a 1-D array, ProtocolError "bad_field" for an unknown format.
    """
    _check_format(format)
    x = np.asarray(samples, dtype=np.float32)
    if x.ndim != 1:
        raise ValueError(f"pcm must be mono (a 1-D array), got shape {x.shape}")
    if format == "pcm_f32le":
        return x.astype("<f4", copy=False).tobytes()
    # nan_to_num first: casting NaN to an integer is undefined (and warns).
    clipped = np.clip(np.nan_to_num(x, nan=0.0, posinf=1.0, neginf=-1.0), -1.0, 1.0)
    return np.rint(clipped * _S16_SCALE).astype("<i2").tobytes()


def decode_pcm(data: bytes, format: str) -> npt.NDArray[np.float32]:
    """Wire bytes as a new, writable float32 array; ProtocolError "bad_field" if the size is not whole samples."""
    _check_format(format)
    width = SAMPLE_WIDTH[format]
    if len(data) % width:
        raise ProtocolError(
            "bad_field", f"pcm has {len(data)} bytes, not a multiple of the {format} sample width {width}", field="pcm"
        )
    if format == "pcm_f32le":
        return np.frombuffer(data, dtype="<f4").astype(np.float32)
    return (np.frombuffer(data, dtype="<i2") / np.float32(_S16_SCALE)).astype(np.float32)
