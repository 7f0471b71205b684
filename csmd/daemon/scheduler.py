"""Frame-by-frame service of every active reply, batched, on the one model thread.

Each reply being generated (`Generation`) has a small bounded channel of decoded audio. At each frame boundary
the scheduler takes every generation whose channel has room and advances all of them by one frame in one
batched step (`step_together`: each weight read once for the whole batch), then decodes their frames in one
batched Mimi step (`decode_together`). A
client that stops reading fills its own channel and sits out; everyone else keeps going. A reply joins the
batch at the first boundary after `add`, and leaves it at the first one after `stop`.

Other model work that could take long (a new turn's prefill, context audio's encode) runs between batched
steps, one job per boundary (`prefill_chunk`, `between_frames`), so a speaking session waits at most about one
extra frame for it. A prefill chunk's rows are sized from the measured times of a batched step and of a
prefill row, to take about one frame; with nobody speaking a prefill runs whole.

A `Generation` belongs to the scheduler from `add` on: only the scheduler writes it. The connection takes its
output with `receive` (which tells the scheduler that a slot came free) and asks it to end with `stop`, which
takes effect at the next frame boundary; `retired` is set once the scheduler has let go of it (its context is
free again).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TypeVar

import numpy as np
import outcome
import trio

from csmd.audio.mimi.model import StreamingDecoder, decode_together
from csmd.daemon.worker import ModelWorker
from csmd.model.generator import StepFailedError, Utterance, step_together
from csmd.protocol import messages as m

log = logging.getLogger("csmd.daemon")
AUDIO_BUFFER_FRAMES = 4  # per reply: 320 ms decoded ahead of the socket at most
PREFILL_ROWS_IDLE = 512  # a prefill chunk with nobody speaking: the whole of a turn, at the GEMM's rate
PREFILL_ROWS_BUSY = (1, 64)  # the bounds of a chunk between frames (64: where the row kernels meet the GEMM)
BATCH_MAX = 64  # replies in one batched step: the native batched primitives take 1 to 64 rows
T = TypeVar("T")


@dataclass
class StepTimes:
    """Model-thread seconds spent generating frames and decoding them, summed over every step so far (what
    `csmd bench run` reads as the Mimi share of a frame)."""

    generate: float = 0.0
    decode: float = 0.0


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


@dataclass(eq=False)
class _Job:
    """Model-thread work waiting for the next frame boundary."""

    fn: Callable[[], object]
    done: trio.Event = field(default_factory=trio.Event)
    result: outcome.Outcome[object] | None = None


class Scheduler:
    def __init__(self, worker: ModelWorker):
        self.worker = worker
        self._active: list[Generation] = []
        self._jobs: deque[_Job] = deque()
        self._wake = trio.Event()
        self.frame_seconds: float | None = None  # a batched step's wall time, smoothed
        self.times = StepTimes()  # written on the model thread, read by benchmarks
        self.row_seconds: float | None = None  # a prefill row's, smoothed (from chunks that ran in full)

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

    async def between_frames(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the model thread at the next frame boundary (jobs in order, one per boundary). A caller
        cancelled while its job waits withdraws it; once it runs it finishes, and its result is dropped."""
        job = _Job(fn)
        self._jobs.append(job)
        self._wake.set()
        try:
            await job.done.wait()
        finally:
            if not job.done.is_set() and job in self._jobs:
                self._jobs.remove(job)
        assert job.result is not None
        return job.result.unwrap()  # type: ignore[return-value]

    async def prefill_chunk(self, prefill: Callable[[int], int]) -> int:
        """One chunk of a prefill between frames: `prefill(rows)` runs at most `rows` rows and returns how many
        still wait (`Utterance.prefill`, `Context.prefill`); returns that. Call it until it returns 0."""
        rows = self.prefill_rows()

        def timed() -> tuple[int, float]:  # on the model thread: the chunk's own time, not its wait for a turn
            started = time.perf_counter()
            remaining = prefill(rows)
            return remaining, time.perf_counter() - started

        remaining, seconds = await self.between_frames(timed)
        if remaining > 0:  # all `rows` ran: a measure of the row rate
            self.row_seconds = _smoothed(self.row_seconds, seconds / rows)
        return remaining

    def prefill_rows(self) -> int:
        """The rows a prefill chunk may take now: all of a turn when nobody speaks, else about a frame's time."""
        if not self._active:
            return PREFILL_ROWS_IDLE
        low, high = PREFILL_ROWS_BUSY
        if self.frame_seconds is None or self.row_seconds is None:
            return low
        return max(low, min(high, int(self.frame_seconds / self.row_seconds)))

    async def run(self) -> None:
        while True:
            self._wake = trio.Event()  # before looking, so a wake-up during the visit is not lost
            worked = False
            for generation in [g for g in self._active if g.stopping]:
                worked = True
                await self.worker.run(generation.utterance.cancel)  # on the model thread: it touches the context
                self._retire(generation)
            ready = [g for g in self._active if not g.stopping and g._has_room()]
            if ready:
                worked = True
                await self._advance(ready)
            if self._jobs:
                worked = True
                job = self._jobs.popleft()
                job.result = await self.worker.run(partial(outcome.capture, job.fn))
                job.done.set()
            if not worked:
                await self._wake.wait()

    async def _advance(self, batch: list[Generation]) -> None:
        started = time.perf_counter()
        # (More replies than one step takes, possible with --max-sessions above BATCH_MAX, go in several.)
        chunks = [batch[i : i + BATCH_MAX] for i in range(0, len(batch), BATCH_MAX)]
        results = await self.worker.run(lambda: [r for chunk in chunks for r in _step(chunk, self.times)])
        self.frame_seconds = _smoothed(self.frame_seconds, time.perf_counter() - started)
        for generation, result in zip(batch, results, strict=True):
            await self._take(generation, result)

    async def _take(self, generation: Generation, result: outcome.Outcome[DecodedFrame | None]) -> None:
        if isinstance(result, outcome.Error):  # a failed reply ends with an error; the daemon and others go on
            exc = result.error
            log.error("generating a frame of reply %r failed (a bug)", generation.request, exc_info=exc)
            await self.worker.run(generation.utterance.cancel)
            self._finish(generation, GenerationEnded("error", f"{type(exc).__name__}: {exc}"))
            return
        frame = result.unwrap()
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


def _step(batch: list[Generation], times: StepTimes) -> list[outcome.Outcome[DecodedFrame | None]]:
    """Model thread: one frame of every generation in `batch`, generated together and decoded together.

    If a batched step fails, each generation is stepped (or decoded) alone, so that a fault is reported for
    the replies it concerns only (the batched steps write nothing until all their rows are computed).
    """
    started = time.perf_counter()
    try:
        frames: list[np.ndarray | BaseException | None] = list(step_together([g.utterance for g in batch]))
    except StepFailedError as failed:  # the batch was made; some replies failed to take their frames
        frames = list(failed.results)
    except Exception as exc:
        if len(batch) == 1:  # (a batch of one was the reply's own step: its fault)
            frames = [exc]
        else:
            log.exception("a batched step of %d replies failed (a bug); stepping them one by one", len(batch))
            frames = [_value_or_error(g.utterance.step) for g in batch]
    made = [(g, f) for g, f in zip(batch, frames, strict=True) if isinstance(f, np.ndarray)]
    generated = time.perf_counter()
    pcm: dict[int, np.ndarray | BaseException] = {}
    if len(made) > 1:
        try:
            decoded = decode_together([g.decoder for g, _ in made], np.stack([codes for _, codes in made]))
            pcm = {id(g): decoded[i] for i, (g, _) in enumerate(made)}
        except Exception:
            log.exception("a batched decode of %d frames failed (a bug); decoding them one by one", len(made))
    for g, codes in made:
        if id(g) not in pcm:
            pcm[id(g)] = _value_or_error(partial(g.decoder.step, codes))
    times.generate += generated - started
    times.decode += time.perf_counter() - generated
    results: list[outcome.Outcome[DecodedFrame | None]] = []
    for g, f in zip(batch, frames, strict=True):
        audio = pcm.get(id(g)) if f is not None and not isinstance(f, BaseException) else None
        if isinstance(f, BaseException) or isinstance(audio, BaseException):
            results.append(outcome.Error(f if isinstance(f, BaseException) else audio))  # type: ignore[arg-type]
        elif audio is None:
            results.append(outcome.Value(None))  # the reply ended
        else:
            results.append(outcome.Value(DecodedFrame(len(g.utterance.frames) - 1, audio)))
    return results


def _value_or_error(fn: Callable[[], T]) -> T | BaseException:
    try:
        return fn()
    except Exception as exc:
        return exc


def _smoothed(previous: float | None, sample: float) -> float:
    return sample if previous is None else 0.7 * previous + 0.3 * sample
