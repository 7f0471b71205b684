"""Fair, frame-by-frame service of every active reply, on the one model thread.

Each active reply (`Speech`) has a small bounded channel of decoded audio. The scheduler visits the replies
in turn and advances each by one frame (generate + Mimi decode) only if its channel has room: a client that
stops reading fills its own channel and pauses its own reply, and everyone else keeps going. Cancellation
is a flag, honoured at the next frame boundary.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import trio

from csmd.audio.mimi.model import StreamingDecoder
from csmd.daemon.worker import ModelWorker
from csmd.model.generator import Utterance
from csmd.speak import next_audio

log = logging.getLogger("csmd.daemon")
AUDIO_BUFFER_FRAMES = 4  # per reply: 320 ms decoded ahead of the socket at most

EndReason = Literal["eos", "max_length", "cancelled", "error"]


@dataclass
class Chunk:
    frame: int
    pcm: np.ndarray


@dataclass
class End:
    reason: EndReason
    frames: int
    first_audio_ms: float
    total_ms: float
    error: str | None = None


@dataclass
class Speech:
    """One reply being generated for a session: its utterance, its own streaming decoder, its audio channel."""

    request: str
    session: str
    utterance: Utterance
    decoder: StreamingDecoder
    started: float = field(default_factory=time.perf_counter)
    first_audio: float | None = None
    cancelled: bool = False  # set by the connection; the scheduler ends the utterance at the next frame
    done: bool = False
    frames_sent: int = 0  # chunks written to the socket (counted by the connection)
    end_sent: bool = False  # audio.end went out (set by the connection)
    retired: trio.Event = field(default_factory=trio.Event)  # the scheduler is done with it; the context is free

    def __post_init__(self) -> None:
        # One slot more than the audio may use, so the end record always fits.
        self.send_audio, self.receive_audio = trio.open_memory_channel[Chunk | End](AUDIO_BUFFER_FRAMES + 1)

    def has_room(self) -> bool:
        return self.send_audio.statistics().current_buffer_used < AUDIO_BUFFER_FRAMES

    def step(self) -> Chunk | None:
        """Model thread: the next frame's audio, or None when the utterance has ended."""
        pcm = next_audio(self.utterance, self.decoder)
        return None if pcm is None else Chunk(len(self.utterance.frames) - 1, pcm)

    def end(self, reason: EndReason, error: str | None = None) -> End:
        now = time.perf_counter()
        first = (self.first_audio or now) - self.started
        return End(reason, len(self.utterance.frames), 1000 * first, 1000 * (now - self.started), error)


class Scheduler:
    def __init__(self, worker: ModelWorker):
        self.worker = worker
        self._active: list[Speech] = []
        self._wake = trio.Event()

    @property
    def active(self) -> list[Speech]:
        return list(self._active)

    def add(self, speech: Speech) -> None:
        self._active.append(speech)
        self.poke()

    def poke(self) -> None:
        """Something changed (a new reply, a cancel, a drained channel): look again."""
        self._wake.set()

    async def run(self) -> None:
        while True:
            self._wake = trio.Event()  # before looking, so a poke during the visit is not lost
            visited = False
            for speech in list(self._active):
                if speech.cancelled or speech.has_room():
                    visited = True
                    await self._advance(speech)
            if not visited:
                await self._wake.wait()

    async def _advance(self, speech: Speech) -> None:
        if speech.cancelled:
            await self.worker.run(speech.utterance.cancel)  # on the model thread: it touches the context
            self._retire(speech)
            return
        try:
            chunk = await self.worker.run(speech.step)
        except Exception as exc:  # a failed reply ends with an error; the daemon and other replies go on
            log.exception("generating a frame of reply %r failed (a bug)", speech.request)
            await self.worker.run(speech.utterance.cancel)
            self._finish(speech, speech.end("error", f"{type(exc).__name__}: {exc}"))
            return
        if speech.cancelled:  # cancelled while the frame was being made: drop it
            await self.worker.run(speech.utterance.cancel)
            self._retire(speech)
        elif chunk is None:
            reason: EndReason = "eos" if speech.utterance.finish_reason == "eos" else "max_length"
            self._finish(speech, speech.end(reason))
        else:
            if speech.first_audio is None:
                speech.first_audio = time.perf_counter()
            speech.send_audio.send_nowait(chunk)  # room was checked, and only the scheduler sends
            if speech.utterance.done:  # the frame limit: this was the last frame
                self._finish(speech, speech.end("max_length"))

    def _finish(self, speech: Speech, end: End) -> None:
        speech.send_audio.send_nowait(end)  # the channel always keeps one slot for this
        self._retire(speech)

    def _retire(self, speech: Speech) -> None:
        """Forget the reply; closing its channel lets its forwarder drain what is left and stop."""
        speech.done = True
        speech.send_audio.close()
        speech.retired.set()
        if speech in self._active:
            self._active.remove(speech)
