"""The local speaker and microphone, through sounddevice (PortAudio)."""

from __future__ import annotations

import math
import threading
import time as time_module  # the PortAudio callbacks take an argument named `time`
from collections import deque
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import numpy as np
import soxr

from csmd.audio.io import SAMPLE_RATE
from csmd.errors import UserError

# A running stream whose callback has not run for this long has lost its device (unplugged, server gone).
# PortAudio calls back every few ms; a second of nothing is never scheduling jitter.
STALL_SECONDS = 1.0


class AudioDeviceError(UserError, RuntimeError):
    """No usable sound device (PortAudio missing, no such device, or the device refuses 24 kHz)."""


def _sounddevice():  # type: ignore[no-untyped-def]
    try:
        import sounddevice
    except OSError as exc:  # PortAudio itself is missing
        raise AudioDeviceError(f"cannot use the sound system: {exc} (install libportaudio2)") from exc
    return sounddevice


@dataclass(frozen=True)
class DeviceInfo:
    index: int
    name: str
    host_api: str
    inputs: int
    outputs: int
    default_rate: float
    default_input: bool
    default_output: bool


def list_devices() -> list[DeviceInfo]:
    """Every device PortAudio sees (`csmd devices`)."""
    sd = _sounddevice()
    default_in, default_out = sd.default.device
    apis = sd.query_hostapis()
    return [
        DeviceInfo(
            index=i,
            name=d["name"],
            host_api=apis[d["hostapi"]]["name"],
            inputs=d["max_input_channels"],
            outputs=d["max_output_channels"],
            default_rate=d["default_samplerate"],
            default_input=i == default_in,
            default_output=i == default_out,
        )
        for i, d in enumerate(sd.query_devices())
    ]


def find_device(name: str | int | None, kind: str = "output") -> int | None:
    """A device index from an index, an exact name, or a unique part of a name; None = the default."""
    if name is None or isinstance(name, int):
        return name
    if name.isdigit():
        return int(name)
    sd = _sounddevice()
    channels = f"max_{kind}_channels"
    devices = [(i, d["name"]) for i, d in enumerate(sd.query_devices()) if d[channels] > 0]
    exact = [i for i, n in devices if n == name]
    partial = [i for i, n in devices if name.lower() in n.lower()]
    found = exact or partial
    if len(found) != 1:
        names = ", ".join(repr(n) for _, n in devices) or "none"
        raise AudioDeviceError(f"{kind} device {name!r} matches {len(found)} devices; {kind} devices: {names}")
    return found[0]


def device_info(name: str | int | None, kind: str) -> dict[str, Any]:
    """PortAudio's description of the `kind` ("input" or "output") device `name` (None: the default), or an
    AudioDeviceError saying there is none: PortAudio's own errors here are a bare "Error querying device"."""
    sd = _sounddevice()
    index = find_device(name, kind)
    try:
        info: dict[str, Any] = sd.query_devices(index, kind)
    except (sd.PortAudioError, ValueError) as exc:
        which = f"{kind} device {name!r}" if name is not None else f"default {kind} device"
        raise AudioDeviceError(f"no {which} (see `csmd devices`): {exc}") from exc
    return info


def _start(stream: Any, kind: str) -> None:
    sd = _sounddevice()
    try:
        stream.start()
    except sd.PortAudioError as exc:
        raise AudioDeviceError(f"cannot start the {kind} device: {exc}") from exc


class Microphone:
    """Captures mono audio at the device's own rate and hands it out resampled to 24 kHz.

    PortAudio's callback only queues blocks; `read()` mixes down and resamples (soxr, streaming, so block
    edges leave no seams) on the caller's thread.
    """

    def __init__(self, device: str | int | None = None, sample_rate: int = SAMPLE_RATE, block_ms: float = 20.0):
        sd = _sounddevice()
        index = find_device(device, "input")
        info = device_info(index, "input")
        self.device_rate = int(info["default_samplerate"])
        self.sample_rate = sample_rate
        self._channels = min(2, int(info["max_input_channels"]))
        self._blocks: deque[np.ndarray] = deque()
        self._lock = threading.Lock()
        self.overflows = 0  # blocks PortAudio dropped because nobody read in time
        self._resampler = soxr.ResampleStream(self.device_rate, sample_rate, 1, dtype="float32", quality="HQ")
        self._last_callback: float | None = None  # monotonic time of the last block; None when not running
        try:
            self._stream = sd.InputStream(
                samplerate=self.device_rate,
                channels=self._channels,
                dtype="float32",
                device=index,
                blocksize=int(self.device_rate * block_ms / 1000),
                callback=self._capture,
            )
        except (sd.PortAudioError, ValueError) as exc:
            raise AudioDeviceError(f"cannot open the input device at {self.device_rate} Hz: {exc}") from exc

    def _capture(self, data: np.ndarray, frames: int, time: object, status: object) -> None:
        with self._lock:
            self._last_callback = time_module.monotonic()
            self._blocks.append(data.mean(axis=1))  # mono mixdown
            if getattr(status, "input_overflow", False):
                self.overflows += 1

    def read(self) -> np.ndarray:
        """Everything captured since the last read, at `sample_rate` (may be empty).

        Raises AudioDeviceError when the device has stopped delivering audio (see `STALL_SECONDS`).
        """
        with self._lock:
            blocks, self._blocks = list(self._blocks), deque()
            last = self._last_callback
        _check_alive(self._stream, last, "input")
        pcm = np.concatenate(blocks).astype(np.float32) if blocks else np.zeros(0, np.float32)
        if self.device_rate == self.sample_rate:
            return pcm
        return np.asarray(self._resampler.resample_chunk(pcm), dtype=np.float32)

    def __enter__(self) -> Microphone:
        _start(self._stream, "input")
        with self._lock:
            self._last_callback = time_module.monotonic()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        with self._lock:
            self._last_callback = None  # closed on purpose: what is left can still be read
        self._stream.stop()
        self._stream.close()


class Speaker:
    """Plays mono float32 chunks in order, as they come; a context manager that drains on exit.

    PortAudio pulls audio from a callback; chunks wait in a queue until then. If the queue runs dry (the
    model is slower than real time) the speaker plays silence rather than stalling or glitching.
    """

    def __init__(self, device: str | int | None = None, sample_rate: int = SAMPLE_RATE, prebuffer: int = 0):
        sd = _sounddevice()
        self.prebuffer = prebuffer  # samples to queue before sound starts (see `prebuffer_for`)
        self.underruns = 0  # callbacks that found the queue dry mid-utterance and played silence
        self.played = 0  # samples handed to the device so far
        self._started = False  # the prebuffer was reached (or `finish` was called)
        self._finished = False  # no more audio is coming: running dry now is the end, not an underrun
        self._paused = False  # holding: silence out, the queue kept (a suspected barge-in)
        self._queue: deque[np.ndarray] = deque()
        self._offset = 0  # samples of the queue's first chunk already played
        self._lock = threading.Lock()
        self._drained = threading.Event()
        self._last_callback: float | None = None  # monotonic time of the last fill; None when not running
        # Monotonic times at which queued audio began to sound (after the prebuffer), in order: when a reply
        # was first heard, minus the device's own latency (`output_latency`).
        self.sounding_since: list[float] = []
        index = find_device(device, "output")
        device_info(index, "output")  # a missing device named as such, not as a failure to open it
        try:
            self._stream = sd.OutputStream(
                samplerate=sample_rate, channels=1, dtype="float32", device=index, callback=self._fill
            )
        except (sd.PortAudioError, ValueError) as exc:
            raise AudioDeviceError(f"cannot open the output device at {sample_rate} Hz: {exc}") from exc

    def _fill(self, out: np.ndarray, frames: int, time: object, status: object) -> None:
        """PortAudio's thread: copy queued audio into `out`, silence where there is none."""
        written = 0
        with self._lock:
            self._last_callback = time_module.monotonic()
            if self._paused:
                out[:] = 0.0
                return
            queued = sum(c.size for c in self._queue) - self._offset
            if not self._started and (queued >= self.prebuffer or self._finished) and queued:
                self._started = True
                self.sounding_since.append(self._last_callback)
            while self._started and written < frames and self._queue:
                chunk = self._queue[0]
                n = min(frames - written, chunk.size - self._offset)
                out[written : written + n, 0] = chunk[self._offset : self._offset + n]
                written += n
                self._offset += n
                if self._offset == chunk.size:
                    self._queue.popleft()
                    self._offset = 0
            if not self._queue:
                self._drained.set()
                if self._started and written < frames and not self._finished:
                    self.underruns += 1
            self.played += written
        out[written:] = 0.0

    @property
    def output_latency(self) -> float:
        """Seconds from a sample handed to the device to its sound, as PortAudio reports it."""
        return float(self._stream.latency)

    def __enter__(self) -> Speaker:
        _start(self._stream, "output")
        with self._lock:
            self._last_callback = time_module.monotonic()
        return self

    def __call__(self, pcm: np.ndarray) -> None:
        """Queue a chunk; raises AudioDeviceError when the device has stopped taking audio."""
        # The model's output is not bounded: clip here, as before any integer conversion.
        chunk = np.clip(np.asarray(pcm, dtype=np.float32).reshape(-1), -1.0, 1.0)
        with self._lock:
            last = self._last_callback
        _check_alive(self._stream, last, "output")
        with self._lock:
            self._queue.append(chunk)
            self._drained.clear()

    def clear(self) -> int:
        """Drop everything not yet played (barge-in); returns how many samples were dropped.

        The device stops sounding within one callback period (a few ms at the usual block sizes).
        """
        with self._lock:
            dropped = sum(c.size for c in self._queue) - self._offset
            self._queue.clear()
            self._offset = 0
            self._drained.set()
            self._finished = True  # what follows is silence by choice, not an underrun
            self._paused = False
        return dropped

    def pause(self) -> None:
        """Stop sounding at the next device callback, keeping everything queued (see `resume`)."""
        with self._lock:
            self._paused = True

    def resume(self) -> None:
        """Go on from where `pause` stopped, as if nothing happened."""
        with self._lock:
            self._paused = False

    def restart(self) -> None:
        """Ready for another utterance: running dry counts again, and if nothing is playing any more the
        prebuffer applies again (audio still playing keeps playing: no gap between sentences)."""
        with self._lock:
            self._started = self._started and bool(self._queue)
            self._finished = False
            self._paused = False

    def finish(self) -> None:
        """No more audio is coming: play what is queued even if it is less than the prebuffer."""
        with self._lock:
            self._finished = True

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.finish()
        with self._lock:
            pending = sum(c.size for c in self._queue) - self._offset
        if exc_type is None and pending:
            self._drained.wait(timeout=pending / self._stream.samplerate + 2.0)
        self._stream.stop()  # plays what PortAudio already holds
        self._stream.close()


def _check_alive(stream: Any, last_callback: float | None, kind: str) -> None:
    """A started stream that PortAudio stopped, or whose callback went quiet, has lost its device."""
    if last_callback is None:
        return  # not running (not started yet, or closed)
    if not stream.active:
        raise AudioDeviceError(f"the {kind} device stopped (unplugged, or its sound server went away)")
    silent = time_module.monotonic() - last_callback
    if silent > STALL_SECONDS:
        raise AudioDeviceError(f"the {kind} device stopped delivering audio ({silent:.1f} s without a callback)")


def prebuffer_for(frame_seconds: float, max_frames: int, frame_samples: int = 1920, frame_audio: float = 0.08) -> int:
    """Samples to hold back so that playing up to `max_frames` frames never runs dry mid-utterance.

    Frame n (1-based) is ready after n * g seconds (g = `frame_seconds`, the measured time to make one) and
    plays for a = `frame_audio`. Starting playback once k frames are ready, frame n is due at k*g + (n-1)*a,
    so every frame is on time when k >= n*(1 - a/g) + a/g; the last frame is the worst. Faster than real time
    (g <= a), k = 1: playback starts after the first frame.
    """
    if frame_seconds <= frame_audio:
        return frame_samples
    ratio = frame_audio / frame_seconds
    k = math.ceil(max_frames * (1 - ratio) + ratio - 1e-9)
    return min(max(k, 1), max_frames) * frame_samples
