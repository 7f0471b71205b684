"""Audio file I/O and sample plumbing: everything in csmd is 24 kHz mono float32 in [-1, 1].

File decoding/encoding is libsndfile (via ``soundfile``) and resampling is libsoxr (via ``soxr``);
this module only validates, mixes down and turns their failures into errors that name the file.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from csmd.errors import UserError

SAMPLE_RATE = 24_000

# Extension -> (libsndfile major format, default subtype). PCM_16 is plenty for speech and keeps files small.
_WRITE_FORMATS = {".wav": ("WAV", "PCM_16"), ".flac": ("FLAC", "PCM_16"), ".ogg": ("OGG", "VORBIS")}
# libsndfile clamps a truncated data chunk to what is present and only says so in its log, as
# "data : <header size> (should be <bytes present>)"; that log line is the one place this is visible.
_TRUNCATED_DATA = re.compile(r"data\s*:\s*(\d+)\s*\(should be (\d+)\)")
_BLOCK_ALIGN = re.compile(r"Block Align\s*:\s*(\d+)")
# Data sizes that writers streaming to a pipe put in the header because they cannot know the length yet.
_LENGTH_UNKNOWN = (0xFFFFFFFF, 0x7FFFFFFF)


class AudioFileError(UserError, ValueError):
    """An audio file could not be read or written; the message names the file and the problem."""


def _check_rate(rate: int, name: str) -> None:
    # bool is an int subclass; a rate of True is a bug, not 1 Hz.
    if isinstance(rate, bool) or not isinstance(rate, int | np.integer) or rate <= 0:
        raise ValueError(f"{name} must be a positive int (Hz), got {rate!r}")


def _check_float_pcm(pcm: np.ndarray, what: str) -> np.ndarray:
    pcm = np.asarray(pcm)
    if pcm.ndim not in (1, 2):
        raise ValueError(f"{what}: pcm must be 1-D [frames] or 2-D [frames, channels], got shape {pcm.shape}")
    if not np.issubdtype(pcm.dtype, np.floating):
        # Integer PCM silently treated as float would be ~32768x too loud; make the caller convert.
        raise ValueError(f"{what}: pcm must be a float array, got {pcm.dtype} (use int16_to_float first)")
    return pcm


def to_mono(pcm: np.ndarray) -> np.ndarray:
    """[frames] or [frames, channels] -> [frames] float32; the mixdown is the mean of the channels."""
    pcm = _check_float_pcm(pcm, "to_mono")
    if pcm.ndim == 1:
        return pcm.astype(np.float32)  # astype copies, so the result never aliases the caller's buffer
    if pcm.shape[1] == 0:
        raise ValueError("to_mono: pcm has 0 channels")
    return pcm.mean(axis=1, dtype=np.float32)


def resample(pcm: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """Resample 1-D or [frames, channels] float audio with soxr 'HQ' (a proper anti-aliasing filter)."""
    pcm = _check_float_pcm(pcm, "resample")
    _check_rate(from_rate, "from_rate")
    _check_rate(to_rate, "to_rate")
    pcm = pcm.astype(np.float32)
    if from_rate == to_rate:
        return pcm
    return np.asarray(soxr.resample(pcm, int(from_rate), int(to_rate), quality="HQ"), dtype=np.float32)


def float_to_int16(pcm: np.ndarray) -> np.ndarray:
    """Clip to [-1, 1], scale by 32767 and round half to even (np.rint) -> int16.

    The scale is symmetric, so -1.5 and -1.0 both map to -32767: -32768 is never produced.
    """
    pcm = np.asarray(pcm)
    if not np.issubdtype(pcm.dtype, np.floating):
        raise ValueError(f"float_to_int16: pcm must be a float array, got {pcm.dtype}")
    if not np.all(np.isfinite(pcm)):
        raise ValueError("float_to_int16: pcm contains NaN or inf")
    return np.rint(np.clip(pcm, -1.0, 1.0) * 32767.0).astype(np.int16)


def int16_to_float(pcm: np.ndarray) -> np.ndarray:
    """int16 -> float32 by dividing by 32768 (libsndfile's convention), so the result is in [-1, 1)."""
    pcm = np.asarray(pcm)
    if pcm.dtype != np.int16:
        raise ValueError(f"int16_to_float: pcm must be int16, got {pcm.dtype}")
    return pcm.astype(np.float32) / np.float32(32768.0)


def read_audio(path: str | os.PathLike[str], *, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Any file libsndfile reads (WAV, FLAC, OGG, ...) -> mono float32 in [-1, 1] at `sample_rate`.

    Channels are mixed down by their mean, and the audio is resampled with soxr 'HQ' if the file's rate
    differs. A truncated WAV (its header promises more data than the file holds) raises AudioFileError,
    even when the cut falls on a frame boundary (libsndfile would quietly read the part that is there):
    the file is not what was recorded, and the caller should know. A header whose data size is a
    streaming writer's placeholder (0xFFFFFFFF) is not a truncation.
    """
    _check_rate(sample_rate, "sample_rate")
    name = os.fspath(path)
    p = Path(name)
    # libsndfile reports these as "System error." / "Format not recognised."; say what is really wrong.
    if not p.exists():
        raise AudioFileError(f"{name!r}: no such file")
    if not p.is_file():
        raise AudioFileError(f"{name!r}: not a regular file")
    if p.stat().st_size == 0:
        raise AudioFileError(f"{name!r}: file is empty (0 bytes)")
    try:
        with sf.SoundFile(name) as f:
            rate, log = f.samplerate, f.extra_info
            if rate <= 0:  # libsndfile 1.2 refuses these at open, but don't rely on that.
                raise AudioFileError(f"{name!r}: header gives an invalid sample rate of {rate}")
            data = f.read(dtype="float32", always_2d=True)
    except sf.LibsndfileError as e:
        if "SF_INFO struct incomplete" in e.error_string:
            # What libsndfile says for e.g. a WAV header with sample rate 0 or 0 channels.
            raise AudioFileError(
                f"{name!r}: invalid audio header (sample rate, channel count or frame size is 0): {e.error_string}"
            ) from e
        raise AudioFileError(f"{name!r}: cannot read as audio: {e.error_string}") from e
    except (sf.SoundFileError, RuntimeError) as e:  # decoder failures surface as plain RuntimeError too
        raise AudioFileError(f"{name!r}: cannot read as audio: {e}") from e

    if (cut := _TRUNCATED_DATA.search(log)) and (align := _BLOCK_ALIGN.search(log)):
        claimed, present, block = int(cut[1]), int(cut[2]), int(align[1])
        if claimed > present and claimed not in _LENGTH_UNKNOWN and block > 0:
            if present % block:
                where = "cut mid-frame"
            elif present < block:
                where = "no complete frame left"
            else:
                where = f"{present // block} of {claimed // block} frames"
            raise AudioFileError(
                f"{name!r}: truncated: header claims {claimed} data bytes, file holds {present} "
                f"({where}; frames are {block} bytes)"
            )
    if data.shape[0] == 0:
        raise AudioFileError(f"{name!r}: file has zero audio frames")
    if not np.all(np.isfinite(data)):  # only possible for float-encoded files
        raise AudioFileError(f"{name!r}: file contains NaN or inf samples")
    mono = resample(to_mono(data), rate, sample_rate)
    # Float files and resampler overshoot (Gibbs ringing) can step outside [-1, 1]; the contract is [-1, 1].
    return np.clip(mono, -1.0, 1.0, out=mono)


def check_writable(path: str | os.PathLike[str]) -> None:
    """Raise AudioFileError unless `write_audio(path, ...)` can work: a known extension, in a directory that
    exists and that we may write to. Cheap: for checking an output path before any work."""
    name = os.fspath(path)
    p = Path(name)
    ext = p.suffix.lower()
    if ext not in _WRITE_FORMATS:
        allowed = ", ".join(_WRITE_FORMATS)
        raise AudioFileError(f"{name!r}: unknown extension {ext or '(none)'!r} for writing; use one of {allowed}")
    directory = p.parent
    if not directory.is_dir():
        what = "is not a directory" if directory.exists() else "does not exist"
        raise AudioFileError(f"{name!r}: cannot write there: directory {os.fspath(directory)!r} {what}")
    if p.is_dir():
        raise AudioFileError(f"{name!r}: is a directory")
    if not os.access(directory, os.W_OK | os.X_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise AudioFileError(f"{name!r}: cannot write there: permission denied")


def write_audio(
    path: str | os.PathLike[str],
    pcm: np.ndarray,
    *,
    sample_rate: int = SAMPLE_RATE,
    subtype: str | None = None,
) -> None:
    """Write float audio, 1-D or [frames, channels], to `path`; clips to [-1, 1] first.

    The format comes from the extension: .wav -> PCM_16, .flac -> PCM_16, .ogg -> VORBIS by default;
    `subtype` (a libsndfile subtype such as "FLOAT" or "PCM_24") overrides it. Refuses NaN/inf and empty
    audio (read_audio would reject a zero-frame file anyway).
    """
    _check_rate(sample_rate, "sample_rate")
    name = os.fspath(path)
    check_writable(name)  # libsndfile would only say "System error."
    fmt, default_subtype = _WRITE_FORMATS[Path(name).suffix.lower()]
    subtype = subtype or default_subtype
    if not sf.check_format(fmt, subtype):
        raise AudioFileError(f"{name!r}: subtype {subtype!r} is not valid for {fmt} files")
    pcm = _check_float_pcm(pcm, f"write_audio {name!r}")
    if pcm.shape[0] == 0 or (pcm.ndim == 2 and pcm.shape[1] == 0):
        raise AudioFileError(f"{name!r}: refusing to write empty audio (shape {pcm.shape})")
    if not np.all(np.isfinite(pcm)):
        raise AudioFileError(f"{name!r}: refusing to write audio containing NaN or inf")
    # Clip here rather than rely on each libsndfile encoder's out-of-range handling (SFC_SET_CLIPPING is
    # an option, not a guarantee), so every format sees the same samples.
    clipped = np.clip(pcm, -1.0, 1.0).astype(np.float32)
    try:
        sf.write(name, clipped, int(sample_rate), subtype=subtype, format=fmt)
    except (sf.SoundFileError, RuntimeError) as e:
        raise AudioFileError(f"{name!r}: cannot write: {e}") from e
