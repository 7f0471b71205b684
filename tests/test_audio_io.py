"""csmd.audio.io: file round trips, mixdown, resampling quality, int16 conversions and every error path."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from csmd.audio.io import (
    SAMPLE_RATE,
    AudioFileError,
    float_to_int16,
    int16_to_float,
    read_audio,
    resample,
    to_mono,
    write_audio,
)

INT16_STEP = 1 / 32767


def tone(freq: float, rate: int, seconds: float = 1.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(round(rate * seconds)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def wav_bytes(rate: int, data: bytes, *, channels: int = 1, claimed_len: int | None = None) -> bytes:
    """A 44-byte canonical PCM_16 RIFF/WAVE header followed by `data`; the header may lie about its length."""
    n = len(data) if claimed_len is None else claimed_len
    align = channels * 2
    fmt = struct.pack("<HHIIHH", 1, channels, rate, rate * align, align, 16)
    return (
        b"RIFF"
        + struct.pack("<I", min(36 + n, 0xFFFFFFFF))
        + b"WAVE"
        + b"fmt "
        + struct.pack("<I", 16)
        + fmt
        + (b"data" + struct.pack("<I", n) + data)
    )


def make(tmp_path: Path, name: str, content: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


def read_error(path: Path, fragment: str) -> None:
    with pytest.raises(AudioFileError, match=fragment) as info:
        read_audio(path)
    assert str(path) in str(info.value)  # every file error names the file


def peak_hz(pcm: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(pcm * np.hanning(len(pcm))))
    return float(np.fft.rfftfreq(len(pcm), 1 / rate)[np.argmax(spectrum)])


def steady_amplitude(pcm: np.ndarray) -> float:
    # RMS * sqrt(2) of the middle 80%, away from the resampler's edge transients.
    edge = len(pcm) // 10
    return float(np.sqrt(2 * np.mean(pcm[edge:-edge].astype(np.float64) ** 2)))


# --- round trips -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("ext", ["wav", "flac"])
def test_lossless_round_trip(tmp_path: Path, ext: str) -> None:
    # Amplitude 0.5: writing scales by 32767 but reading divides by 32768, a relative error of 1/32768 that
    # together with rounding stays within one int16 step only for |x| <= ~0.5.
    pcm = tone(440, SAMPLE_RATE, 0.5)
    write_audio(tmp_path / f"a.{ext}", pcm)
    back = read_audio(tmp_path / f"a.{ext}")
    assert back.dtype == np.float32 and back.shape == pcm.shape
    assert np.max(np.abs(back - pcm)) <= INT16_STEP
    assert sf.info(str(tmp_path / f"a.{ext}")).subtype == "PCM_16"


def test_ogg_vorbis_round_trip(tmp_path: Path) -> None:
    pcm = tone(440, SAMPLE_RATE, 1.0)
    write_audio(tmp_path / "a.ogg", pcm)
    assert sf.info(str(tmp_path / "a.ogg")).subtype == "VORBIS"
    back = read_audio(tmp_path / "a.ogg")
    assert abs(len(back) - len(pcm)) <= 1920  # "within a frame": one 80 ms Mimi frame at 24 kHz
    n = min(len(back), len(pcm))
    assert np.corrcoef(back[:n], pcm[:n])[0, 1] > 0.99  # Vorbis is lossy: shape, not samples


def test_write_subtype_override_and_clipping(tmp_path: Path) -> None:
    pcm = np.array([2.0, -2.0, 0.25, 1.0], dtype=np.float32)
    write_audio(tmp_path / "f.wav", pcm, subtype="FLOAT")
    assert sf.info(str(tmp_path / "f.wav")).subtype == "FLOAT"
    np.testing.assert_array_equal(read_audio(tmp_path / "f.wav"), [1.0, -1.0, 0.25, 1.0])


def test_stereo_file_is_mixed_to_mean(tmp_path: Path) -> None:
    left = tone(440, SAMPLE_RATE, 0.25)
    right = np.full_like(left, -0.2)
    write_audio(tmp_path / "s.wav", np.stack([left, right], axis=1))
    assert sf.info(str(tmp_path / "s.wav")).channels == 2
    back = read_audio(tmp_path / "s.wav")
    assert np.max(np.abs(back - (left + right) / 2)) <= INT16_STEP


# --- resampling -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [48_000, 16_000, 44_100])
def test_file_at_other_rate_is_resampled(tmp_path: Path, rate: int) -> None:
    seconds = 1.0
    write_audio(tmp_path / "r.wav", tone(1000, rate, seconds), sample_rate=rate)
    back = read_audio(tmp_path / "r.wav")
    assert abs(len(back) - seconds * SAMPLE_RATE) <= 1
    assert abs(peak_hz(back, SAMPLE_RATE) - 1000) <= 5
    assert steady_amplitude(back) == pytest.approx(0.5, rel=0.02)


def test_resample_removes_content_above_new_nyquist() -> None:
    # 48 kHz -> 24 kHz: a 13 kHz tone is above the new 12 kHz Nyquist and must be filtered out, not folded
    # down to 11 kHz. (An 11 kHz tone is *below* 12 kHz and is legitimately kept; see the next test.)
    x = tone(13_000, 48_000)
    energy_db = 10 * np.log10(np.mean(resample(x, 48_000, 24_000) ** 2) / np.mean(x**2))
    assert energy_db < -40
    # Linear interpolation (here: picking every other sample) aliases it at full strength.
    linear = np.interp(np.arange(24_000) * 2.0, np.arange(48_000), x)
    assert 10 * np.log10(np.mean(linear**2) / np.mean(x**2)) > -1


def test_resample_keeps_passband_and_shapes() -> None:
    x = tone(11_000, 48_000)
    y = resample(x, 48_000, 24_000)
    assert steady_amplitude(y) == pytest.approx(0.5, rel=0.05)
    stereo = resample(np.stack([x, -x], axis=1), 48_000, 16_000)
    assert stereo.shape == (16_000, 2) and stereo.dtype == np.float32
    same = resample(x.astype(np.float64), 48_000, 48_000)
    assert same.dtype == np.float32 and np.array_equal(same, x)


@pytest.mark.parametrize("bad", [0, -24_000, 24_000.0, True, "24000"])
def test_resample_rejects_bad_rates(bad: object) -> None:
    with pytest.raises(ValueError, match="must be a positive int"):
        resample(np.zeros(10, np.float32), bad, 24_000)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="to_rate must be a positive int"):
        resample(np.zeros(10, np.float32), 24_000, bad)  # type: ignore[arg-type]


def test_resample_and_to_mono_reject_bad_arrays() -> None:
    for fn in (lambda a: resample(a, 48_000, 24_000), to_mono):
        with pytest.raises(ValueError, match=r"1-D \[frames\] or 2-D \[frames, channels\]"):
            fn(np.zeros((2, 2, 2), np.float32))
        with pytest.raises(ValueError, match="must be a float array, got int16"):
            fn(np.zeros(4, np.int16))
    with pytest.raises(ValueError, match="0 channels"):
        to_mono(np.zeros((4, 0), np.float32))


def test_to_mono() -> None:
    stereo = np.array([[1.0, 0.0], [0.5, -0.5], [-1.0, -0.5]], dtype=np.float64)
    mono = to_mono(stereo)
    assert mono.dtype == np.float32
    np.testing.assert_array_equal(mono, [0.5, 0.0, -0.75])
    one = np.array([0.1, 0.2], np.float32)
    assert to_mono(one) is not one and np.array_equal(to_mono(one), one)


# --- int16 <-> float ----------------------------------------------------------------------------------------


def test_float_to_int16_clips_symmetrically_and_rounds() -> None:
    # Symmetric scale by 32767: -1.5 clips to -1.0 and maps to -32767, never -32768.
    x = np.array([1.5, -1.5, 1.0, -1.0, 0.0], dtype=np.float32)
    np.testing.assert_array_equal(float_to_int16(x), [32767, -32767, 32767, -32767, 0])
    y = np.array([100.4, 100.6, -100.6, -100.4, 2.5, 3.5], dtype=np.float64) / 32767
    out = float_to_int16(y)
    assert out.dtype == np.int16
    np.testing.assert_array_equal(out, [100, 101, -101, -100, 2, 4])  # nearest; halves go to even


def test_int16_to_float() -> None:
    out = int16_to_float(np.array([-32768, 32767, 0, 16384], dtype=np.int16))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, np.array([-1.0, 32767 / 32768, 0.0, 0.5], dtype=np.float32))
    small = np.arange(-16000, 16000, 7, dtype=np.int16)  # |x| < 16384 survives the 32768/32767 asymmetry
    np.testing.assert_array_equal(float_to_int16(int16_to_float(small)), small)


def test_conversions_validate_input() -> None:
    with pytest.raises(ValueError, match="must be a float array, got int16"):
        float_to_int16(np.zeros(3, np.int16))
    with pytest.raises(ValueError, match="NaN or inf"):
        float_to_int16(np.array([0.0, np.nan]))
    with pytest.raises(ValueError, match="must be int16, got float32"):
        int16_to_float(np.zeros(3, np.float32))


# --- read errors ------------------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    read_error(tmp_path / "nope.wav", "no such file")


def test_directory(tmp_path: Path) -> None:
    read_error(tmp_path, "not a regular file")


def test_random_bytes(tmp_path: Path) -> None:
    junk = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    read_error(make(tmp_path, "junk.wav", junk), "cannot read as audio")


def test_text_file(tmp_path: Path) -> None:
    read_error(make(tmp_path, "notes.txt", b"hello, this is not audio\n" * 20), "cannot read as audio")


def test_empty_file(tmp_path: Path) -> None:
    read_error(make(tmp_path, "empty.wav", b""), r"empty \(0 bytes\)")


def test_zero_frames(tmp_path: Path) -> None:
    read_error(make(tmp_path, "zero.wav", wav_bytes(24_000, b"")), "zero audio frames")


def test_sample_rate_zero_header(tmp_path: Path) -> None:
    # libsndfile 1.2 refuses to open it ("SF_INFO struct incomplete"); the user is told what that means.
    path = make(tmp_path, "rate0.wav", wav_bytes(0, b"\x01\x00" * 100))
    read_error(path, "invalid audio header.*sample rate")


def test_truncated_on_a_frame_boundary_is_an_error(tmp_path: Path) -> None:
    """libsndfile reads the 100 frames that are there without a word; the header promised 1000."""
    data = np.arange(1, 101, dtype="<i2").tobytes()
    path = make(tmp_path, "cut.wav", wav_bytes(24_000, data, claimed_len=2000))
    read_error(path, r"truncated: header claims 2000 data bytes, file holds 200 \(100 of 1000 frames")


def test_a_streaming_writers_placeholder_length_is_not_a_truncation(tmp_path: Path) -> None:
    data = np.arange(1, 101, dtype="<i2").tobytes()  # written to a pipe: the length was not known yet
    back = read_audio(make(tmp_path, "piped.wav", wav_bytes(24_000, data, claimed_len=0xFFFFFFFF)))
    np.testing.assert_array_equal(back, np.arange(1, 101) / 32768)


@pytest.mark.parametrize(
    ("channels", "data", "fragment"),
    [
        (1, b"\x01\x00" * 100 + b"\x01", r"201 \(cut mid-frame"),
        (2, b"\x01\x00" * 101, r"202 \(cut mid-frame; frames are 4 bytes"),
        (1, b"\x01", r"1 \(cut mid-frame; frames are 2 bytes"),
        (1, b"", r"0 \(no complete frame left"),
    ],
)
def test_truncated_badly_is_an_error(tmp_path: Path, channels: int, data: bytes, fragment: str) -> None:
    path = make(tmp_path, "cut.wav", wav_bytes(24_000, data, channels=channels, claimed_len=2000))
    read_error(path, "truncated: header claims 2000 data bytes, file holds " + fragment)


def test_read_rejects_bad_target_rate(tmp_path: Path) -> None:
    write_audio(tmp_path / "a.wav", tone(440, SAMPLE_RATE, 0.1))
    with pytest.raises(ValueError, match="sample_rate must be a positive int"):
        read_audio(tmp_path / "a.wav", sample_rate=0)


# --- write errors -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a.mp4", "a.WAV.bak", "noext"])
def test_write_unknown_extension(tmp_path: Path, name: str) -> None:
    with pytest.raises(AudioFileError, match=r"unknown extension .* use one of \.wav, \.flac, \.ogg") as info:
        write_audio(tmp_path / name, tone(440, SAMPLE_RATE, 0.1))
    assert name in str(info.value)
    assert not (tmp_path / name).exists()


def test_write_extension_is_case_insensitive(tmp_path: Path) -> None:
    write_audio(tmp_path / "LOUD.FLAC", tone(440, SAMPLE_RATE, 0.1))
    assert sf.info(str(tmp_path / "LOUD.FLAC")).format == "FLAC"


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_write_rejects_non_finite(tmp_path: Path, bad: float) -> None:
    pcm = tone(440, SAMPLE_RATE, 0.1)
    pcm[10] = bad
    with pytest.raises(AudioFileError, match=r"a\.wav.*NaN or inf"):
        write_audio(tmp_path / "a.wav", pcm)


def test_write_rejects_bad_subtype_empty_and_int(tmp_path: Path) -> None:
    with pytest.raises(AudioFileError, match="subtype 'PCM_16' is not valid for OGG"):
        write_audio(tmp_path / "a.ogg", tone(440, SAMPLE_RATE, 0.1), subtype="PCM_16")
    with pytest.raises(AudioFileError, match=r"a\.wav.*empty audio"):
        write_audio(tmp_path / "a.wav", np.zeros(0, np.float32))
    with pytest.raises(ValueError, match=r"a\.wav.*must be a float array"):
        write_audio(tmp_path / "a.wav", np.zeros(10, np.int16))
