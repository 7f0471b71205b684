"""Capture at a device rate other than Mimi's: the microphone mixes down and resamples to 24 kHz.

The JACK loopback the device tests use runs at 24 kHz, so it never resamples. Here PortAudio is replaced
by a device that reports 48 kHz stereo and a stream whose callback the test drives, block by block, the
way PortAudio's thread would.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, ClassVar

import numpy as np
import pytest

from csmd.audio import devices


class ScriptedInputStream:
    active = True
    opened: ClassVar[list[ScriptedInputStream]] = []

    def __init__(self, samplerate: int, channels: int, callback: Any, **_: Any) -> None:
        self.samplerate, self.channels, self.callback = samplerate, channels, callback
        ScriptedInputStream.opened.append(self)

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def close(self) -> None: ...


@pytest.fixture
def device_at_48k(monkeypatch: pytest.MonkeyPatch) -> None:
    description = {
        "name": "usb headset",
        "max_input_channels": 2,
        "max_output_channels": 2,
        "default_samplerate": 48000,
    }
    fake = SimpleNamespace(
        query_devices=lambda index=None, kind=None: description if index is not None else [description],
        InputStream=ScriptedInputStream,
        OutputStream=ScriptedInputStream,  # the same script serves playback: only the callback matters here
        PortAudioError=RuntimeError,
    )
    monkeypatch.setattr(devices, "_sounddevice", lambda: fake)
    ScriptedInputStream.opened.clear()


def test_capture_at_48k_reaches_24k_with_the_same_pitch(device_at_48k: None) -> None:
    seconds, pitch = 1.0, 1000.0
    t = np.arange(int(48_000 * seconds)) / 48_000
    left = 0.5 * np.sin(2 * np.pi * pitch * t)
    stereo = np.stack([left, left], axis=1).astype(np.float32)
    heard = []
    with devices.Microphone("usb headset") as mic:
        stream = ScriptedInputStream.opened[-1]
        assert (stream.samplerate, stream.channels) == (48_000, 2)  # opened at the device's own rate
        for start in range(0, len(stereo), 960):  # 20 ms blocks, read every 100 ms as the talk loop does
            block = stereo[start : start + 960]
            stream.callback(block, len(block), None, None)
            if (start // 960) % 5 == 4:
                heard.append(mic.read())
    pcm = np.concatenate(heard)
    # soxr's HQ filter holds ~32 ms inside the stream (capture latency, not loss): the rest comes out as it goes.
    assert 24_000 - 1200 <= pcm.size <= 24_000
    body = pcm[1000:-1000]
    spectrum = np.abs(np.fft.rfft(body * np.hanning(body.size)))
    assert abs(np.argmax(spectrum) * 24_000 / body.size - pitch) < 3
    assert np.abs(body).max() == pytest.approx(0.5, abs=0.02)  # the mixdown averages, it does not sum
    # No seams at block edges: the resampled tone is as smooth as a clean 1 kHz sine at 24 kHz.
    assert np.abs(np.diff(body, 2)).max() < 0.5 * (2 * np.pi * pitch / 24_000) ** 2 * 1.1


def test_a_device_rate_it_cannot_open_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, device_at_48k: None) -> None:
    def refuse(**kwargs: Any) -> None:
        raise RuntimeError("Invalid sample rate")

    fake = devices._sounddevice()
    monkeypatch.setattr(fake, "InputStream", refuse)
    with pytest.raises(devices.AudioDeviceError, match="cannot open the input device at 48000 Hz: Invalid sample rate"):
        devices.Microphone("usb headset")


def test_a_vanished_device_is_a_clear_error_not_a_hang(device_at_48k: None, monkeypatch: pytest.MonkeyPatch) -> None:
    with devices.Microphone("usb headset") as mic:
        stream = ScriptedInputStream.opened[-1]
        stream.callback(np.zeros((960, 2), np.float32), 960, None, None)
        mic.read()  # a live device reads fine
        monkeypatch.setattr(devices, "STALL_SECONDS", 0.0)  # no callback since: the device is gone
        with pytest.raises(devices.AudioDeviceError, match="input device stopped delivering audio"):
            mic.read()
        monkeypatch.setattr(devices, "STALL_SECONDS", 1.0)
        stream.active = False  # PortAudio itself stopped the stream
        with pytest.raises(devices.AudioDeviceError, match="input device stopped"):
            mic.read()


def test_a_speaker_whose_device_vanished_refuses_audio(device_at_48k: None, monkeypatch: pytest.MonkeyPatch) -> None:
    with devices.Speaker("usb headset") as speaker:
        speaker(np.zeros(1920, np.float32))
        ScriptedInputStream.opened[-1].active = False
        with pytest.raises(devices.AudioDeviceError, match="output device stopped"):
            speaker(np.zeros(1920, np.float32))


def test_a_paused_speaker_sounds_silence_and_keeps_its_queue(device_at_48k: None) -> None:
    with devices.Speaker("usb headset") as speaker:
        fill = ScriptedInputStream.opened[-1].callback
        speaker(np.full(1000, 0.5, np.float32))
        out = np.zeros((256, 1), np.float32)
        fill(out, 256, None, None)
        assert speaker.played == 256 and np.all(out == 0.5)
        speaker.pause()
        fill(out, 256, None, None)
        assert speaker.played == 256 and np.all(out == 0.0) and speaker.underruns == 0  # held, not dry
        speaker.resume()
        fill(out, 256, None, None)
        assert speaker.played == 512 and np.all(out == 0.5)  # goes on where it stopped
