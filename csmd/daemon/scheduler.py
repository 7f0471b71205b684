"""Fair, frame-by-frame service of every active reply, on the one model thread.

Each reply being generated (`Generation`) has a small bounded channel of decoded audio. The scheduler visits
the generations in turn and advances each by one frame (generate + Mimi decode) only if its channel has room:
a client that stops reading fills its own channel and pauses its own reply, and everyone else keeps going.

A `Generation` belongs to the scheduler from `add` on: only the scheduler writes it. The connection takes its
output with `receive` (which tells the scheduler that a slot came free) and asks it to end with `stop`, which
takes effect at the next frame boundary; `retired` is set once the scheduler has let go of it (its context is
free again).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import trio

from csmd.audio.mimi.model import StreamingDecoder
from csmd.daemon.worker import ModelWorker
from csmd.model.generator import Utterance
from csmd.protocol import messages as m
from csmd.speak import next_audio

log = logging.getLogger("csmd.daemon")
AUDIO_BUFFER_FRAMES = 4  # per reply: 320 ms decoded ahead of the socket at most


@dataclass(frozen=True)
class DecodedFrame:
    """One frame of a reply's audio: its index in the utterance and its 24 kHz samples."""

    index: int
    pcm: np.ndarray


@dataclass(frozen=True)
class GenerationEnded:
    """The last item of a generation that ended by itself (a stopped one has none): why, and the fault if any."""

    reason: m.EndReason  # "eos", "max_length" or "error"
    error: str | None = None


@dataclass(eq=False)
class Generation:
    """One reply being generated: its utterance, its own streaming decoder, its audio channel. Scheduler-owned."""

    request: str  # the speak request it answers (for logs and tests)
    utterance: Utterance
    decoder: StreamingDecoder
    stopping: bool = False  # `Scheduler.stop` was called: end the utterance at the next frame boundary
    retired: trio.Event = field(default_factory=trio.Event)  # the scheduler is done with it; the context is free

    def __post_init__(self) -> None:
        # One slot more than the audio may use, so the end record always fits.
        self._send, self._receive = trio.open_memory_channel[DecodedFrame | GenerationEnded](AUDIO_BUFFER_FRAMES + 1)

    def _has_room(self) -> bool:
        return self._send.statistics().current_buffer_used < AUDIO_BUFFER_FRAMES

    def _step(self) -> DecodedFrame | None:
        """Model thread: the next frame's audio, or None when the utterance has ended."""
        pcm = next_audio(self.utterance, self.decoder)
        return None if pcm is None else DecodedFrame(len(self.utterance.frames) - 1, pcm)


class Scheduler:
    def __init__(self, worker: ModelWorker):
        self.worker = worker
        self._active: list[Generation] = []
        self._wake = trio.Event()

    @property
    def active(self) -> list[Generation]:
        return list(self._active)

    def add(self, generation: Generation) -> None:
        """Take over a generation (its utterance prefilled): from now on only the scheduler touches it."""
        self._active.append(generation)
        self._wake.set()

    def stop(self, generation: Generation) -> None:
        """End a generation at its next frame boundary; its channel then closes without an end record. Does
        nothing once it has ended."""
        if not generation.retired.is_set():
            generation.stopping = True
            self._wake.set()

    async def receive(self, generation: Generation) -> DecodedFrame | GenerationEnded | None:
        """The generation's next item, in order; None once it is over (after its end record, or stopped)."""
        try:
            item = await generation._receive.receive()
        except trio.EndOfChannel:
            return None
        self._wake.set()  # a slot came free: it may be advanced again
        return item

    async def run(self) -> None:
        while True:
            self._wake = trio.Event()  # before looking, so a wake-up during the visit is not lost
            visited = False
            for generation in list(self._active):
                if generation.stopping or generation._has_room():
                    visited = True
                    await self._advance(generation)
            if not visited:
                await self._wake.wait()

    async def _advance(self, generation: Generation) -> None:
        if generation.stopping:
            await self.worker.run(generation.utterance.cancel)  # on the model thread: it touches the context
            self._retire(generation)
            return
        try:
            frame = await self.worker.run(generation._step)
        except Exception as exc:  # a failed reply ends with an error; the daemon and other replies go on
            log.exception("generating a frame of reply %r failed (a bug)", generation.request)
            await self.worker.run(generation.utterance.cancel)
            self._finish(generation, GenerationEnded("error", f"{type(exc).__name__}: {exc}"))
            return
        if generation.stopping:  # stopped while the frame was being made: drop it
            await self.worker.run(generation.utterance.cancel)
            self._retire(generation)
        elif frame is None:
            reason: m.EndReason = "eos" if generation.utterance.finish_reason == "eos" else "max_length"
            self._finish(generation, GenerationEnded(reason))
        else:
            generation._send.send_nowait(frame)  # room was checked, and only the scheduler sends
            if generation.utterance.done:  # the frame limit: this was the last frame
                self._finish(generation, GenerationEnded("max_length"))

    def _finish(self, generation: Generation, end: GenerationEnded) -> None:
        generation._send.send_nowait(end)  # the channel always keeps one slot for this
        self._retire(generation)

    def _retire(self, generation: Generation) -> None:
        """Forget the generation; closing its channel lets its reader drain what is left and stop."""
        generation._send.close()
        generation.retired.set()
        if generation in self._active:
            self._active.remove(generation)
