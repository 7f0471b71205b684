"""The local speaker, through sounddevice (PortAudio)."""

from __future__ import annotations

import threading
from collections import deque
from types import TracebackType

import numpy as np

from csmd.audio.io import SAMPLE_RATE


class AudioDeviceError(RuntimeError):
    """No usable sound device (PortAudio missing, no such device, or the device refuses 24 kHz)."""


def _sounddevice():  # type: ignore[no-untyped-def]
    try:
        import sounddevice
    except OSError as exc:  # PortAudio itself is missing
        raise AudioDeviceError(f"cannot use the sound system: {exc} (install libportaudio2)") from exc
    return sounddevice


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


class Speaker:
    """Plays mono float32 chunks in order, as they come; a context manager that drains on exit.

    PortAudio pulls audio from a callback; chunks wait in a queue until then. If the queue runs dry (the
    model is slower than real time) the speaker plays silence rather than stalling or glitching.
    """

    def __init__(self, device: str | int | None = None, sample_rate: int = SAMPLE_RATE):
        sd = _sounddevice()
        self._queue: deque[np.ndarray] = deque()
        self._offset = 0  # samples of the queue's first chunk already played
        self._lock = threading.Lock()
        self._drained = threading.Event()
        try:
            self._stream = sd.OutputStream(
                samplerate=sample_rate, channels=1, dtype="float32", device=find_device(device), callback=self._fill
            )
        except sd.PortAudioError as exc:
            raise AudioDeviceError(f"cannot open the output device at {sample_rate} Hz: {exc}") from exc

    def _fill(self, out: np.ndarray, frames: int, time: object, status: object) -> None:
        """PortAudio's thread: copy queued audio into `out`, silence where there is none."""
        written = 0
        with self._lock:
            while written < frames and self._queue:
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
        out[written:] = 0.0

    def __enter__(self) -> Speaker:
        self._stream.start()
        return self

    def __call__(self, pcm: np.ndarray) -> None:
        # The model's output is not bounded: clip here, as before any integer conversion.
        chunk = np.clip(np.asarray(pcm, dtype=np.float32).reshape(-1), -1.0, 1.0)
        with self._lock:
            self._queue.append(chunk)
            self._drained.clear()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        with self._lock:
            pending = sum(c.size for c in self._queue) - self._offset
        if exc_type is None and pending:
            self._drained.wait(timeout=pending / self._stream.samplerate + 2.0)
        self._stream.stop()  # plays what PortAudio already holds
        self._stream.close()
