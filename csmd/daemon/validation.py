"""What the daemon accepts: every field's range, checked as a message is read and before any work is done.

The protocol layer has checked types and protocol-level ranges (ids, counts, rates > 0). These are the model's
and the daemon's ranges; a value outside one is refused (a `RequestError`) with `invalid_params` (or
`context_overflow` for audio longer than the model's window) in a message that names the field, so that
nothing a client sends can reach the native kernels or the resampler out of range, or cost unbounded work.
docs/protocol.md lists them.
"""

from __future__ import annotations

import math
from typing import Final

from csmd.model.sampling import FRAME_MS, GenerationParams
from csmd.protocol import messages as m
from csmd.protocol.errors import RequestError

MAX_TEXT_BYTES: Final = 8192  # per segment or reply (UTF-8); the 2048-row window holds ~2048 tokens of text
MAX_SPEAKER: Final = 65535
MIN_AUDIO_RATE: Final = 8_000  # Hz: telephone audio ...
MAX_AUDIO_RATE: Final = 192_000  # ... to studio audio; soxr's cost (and its output) grow with the ratio


def _invalid(message: str) -> RequestError:
    return RequestError("invalid_params", message)


def check_text(text: str, field: str = "text") -> None:
    size = len(text.encode("utf-8"))
    if size > MAX_TEXT_BYTES:
        raise _invalid(f"{field!r} must be at most {MAX_TEXT_BYTES} bytes of UTF-8, got {size}")


def check_speaker(speaker: int) -> None:
    if speaker > MAX_SPEAKER:
        raise _invalid(f"'speaker' must be in [0, {MAX_SPEAKER}], got {speaker}")


def speak_params(msg: m.Speak, window: int) -> GenerationParams:
    """The generation parameters of a `speak`, every field in range; `window` is the model's row window."""
    check_text(msg.text)
    check_speaker(msg.speaker)
    if msg.max_frames is not None and not 1 <= msg.max_frames <= window:
        raise _invalid(f"'max_frames' must be in [1, {window}] (the model's window), got {msg.max_frames}")
    given = {
        name: getattr(msg, name)
        for name in ("temperature", "top_k", "top_p", "min_p", "seed", "max_frames")
        if getattr(msg, name) is not None
    }
    try:
        return GenerationParams().replace(**given)
    except ValueError as exc:  # its message names each field out of range and what is allowed
        raise _invalid(str(exc)) from exc


def check_context(msg: m.AddContext, window: int) -> None:
    """A `context.add`'s text, speaker and audio: the audio's rate, and its length against the window."""
    check_text(msg.text)
    check_speaker(msg.speaker)
    if msg.audio is None:
        return
    assert msg.rate is not None and msg.format is not None  # the protocol checked they come together
    if not MIN_AUDIO_RATE <= msg.rate <= MAX_AUDIO_RATE:
        raise _invalid(f"'rate' must be in [{MIN_AUDIO_RATE}, {MAX_AUDIO_RATE}] Hz, got {msg.rate}")
    samples = len(msg.audio) // m.SAMPLE_WIDTH[msg.format]
    if samples == 0:
        raise _invalid("'audio' is empty")
    # A segment needs a row per frame plus its closing frame (and its text rows, checked when it is added).
    frames = math.ceil(samples * m.SAMPLE_RATE / msg.rate / m.FRAME_SAMPLES)
    if frames + 1 > window:
        longest = (window - 1) * FRAME_MS / 1000
        raise RequestError(
            "context_overflow",
            f"'audio' is {samples / msg.rate:.2f} s long; a segment holds at most {longest:g} s (the model's window)",
        )
