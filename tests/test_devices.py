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


def test_prebuffer_for() -> None:
    from csmd.audio.devices import prebuffer_for

    assert prebuffer_for(0.05, 250) == 1920  # faster than real time: start after the first frame
    assert prebuffer_for(0.16, 10) == 6 * 1920  # half real-time speed: 10 * 0.5 + 0.5 -> 6 frames
    assert prebuffer_for(10.0, 10) == 10 * 1920  # hopelessly slow: wait for everything
    # The schedule it gives never runs dry: frame n ready at n*g, due at k*g + (n-1)*a.
    g, a, n_max = 0.13, 0.08, 40
    k = prebuffer_for(g, n_max) // 1920
    assert all(n * g <= k * g + (n - 1) * a + 1e-9 for n in range(1, n_max + 1))
    assert not all(n * g <= (k - 1) * g + (n - 1) * a + 1e-9 for n in range(1, n_max + 1))  # and is the least


def test_microphone_hears_the_speaker_and_underruns_are_counted() -> None:
    from csmd.audio.devices import Microphone

    tone = (0.4 * np.sin(2 * np.pi * 440 * np.arange(24_000) / 24_000)).astype(np.float32)
    with Microphone("loopback") as mic, Speaker("loopback", prebuffer=4800) as speaker:
        assert mic.device_rate == 24_000  # jackd runs at 24 kHz here
        for start in range(0, tone.size, 1920):
            speaker(tone[start : start + 1920])
    sd.sleep(200)
    heard = mic.read()
    assert speaker.underruns == 0  # everything was queued before it could run dry
    assert abs(np.argmax(np.abs(np.fft.rfft(heard))) * 24_000 / heard.size - 440) < 5

    with Speaker("loopback") as slow:  # fed slower than real time, no prebuffer: it runs dry between chunks
        for start in range(0, 9600, 1920):
            slow(tone[start : start + 1920])
            sd.sleep(150)
    assert slow.underruns > 0


def test_devices_command_lists_the_loopback(capsys: pytest.CaptureFixture[str]) -> None:
    from csmd.cli import main

    assert main(["devices"]) == 0
    out = capsys.readouterr().out
    assert "loopback" in out and "JACK" in out
