"""Playback on a real audio device: JACK's dummy backend with its loopback device (out_N wired to in_N).

CI starts `jackd -d dummy -r 24000`; without a running JACK server these tests are skipped.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

sd = pytest.importorskip("sounddevice")
if not any(d["name"] == "loopback" for d in sd.query_devices()):
    pytest.skip("no JACK loopback device (start jackd -d dummy -r 24000)", allow_module_level=True)

from csmd.audio.devices import AudioDeviceError, Speaker, find_device  # noqa: E402


def record_while(action, seconds: float) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Record the loopback input while `action` runs in a thread."""
    frames: list[np.ndarray] = []
    with sd.InputStream(samplerate=24_000, channels=1, dtype="float32", device=find_device("loopback", "input"),
                        callback=lambda data, *_: frames.append(data.copy())):  # fmt: skip
        worker = threading.Thread(target=action)
        worker.start()
        worker.join(timeout=60)
        sd.sleep(int(seconds * 1000))
    return np.concatenate(frames)[:, 0] if frames else np.zeros(0, np.float32)


def test_speaker_plays_chunks_in_order() -> None:
    tone = (0.5 * np.sin(2 * np.pi * 440 * np.arange(24_000) / 24_000)).astype(np.float32)

    def play() -> None:
        with Speaker("loopback") as speaker:
            for start in range(0, tone.size, 1920):
                speaker(tone[start : start + 1920])

    recorded = record_while(play, 0.3)
    spectrum = np.abs(np.fft.rfft(recorded))
    peak_hz = np.argmax(spectrum) * 24_000 / recorded.size
    assert abs(peak_hz - 440) < 5
    assert np.abs(recorded).max() == pytest.approx(0.5, abs=0.05)


def test_speaker_clips_and_names_bad_devices() -> None:
    loud = np.full(4800, 3.0, dtype=np.float32)

    def play() -> None:
        with Speaker("loopback") as speaker:
            speaker(loud)

    assert np.abs(record_while(play, 0.3)).max() <= 1.0
    with pytest.raises(AudioDeviceError, match="matches 0 devices"):
        find_device("no such device")


def test_say_plays_on_the_speaker(tmp_path: Path) -> None:
    done: list[subprocess.CompletedProcess[str]] = []
    cmd = [sys.executable, "-m", "csmd.cli", "say", "Hello.", "--play", "--output-device", "loopback",
           "--model", "random:tiny", "--max-seconds", "0.8", "--local", "-o", str(tmp_path / "o.wav")]  # fmt: skip
    recorded = record_while(lambda: done.append(subprocess.run(cmd, capture_output=True, text=True)), 0.3)
    assert done[0].returncode == 0, done[0].stderr
    assert "played" in done[0].stdout
    assert np.abs(recorded).max() > 0.01  # random weights: noise, but sound came out
