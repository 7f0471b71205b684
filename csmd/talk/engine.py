"""Where `csmd talk` gets its voice: the model in this process, or a running daemon over its socket.

Both sides offer the same four things: add the user's turn (audio and transcript), start speaking a sentence
(then pull its audio frame by frame, or cancel it), and trim the conversation back to what was heard.
"""

from __future__ import annotations

import itertools
import time
from functools import partial
from typing import Protocol

import numpy as np

from csmd.audio.mimi.model import Mimi, StreamingDecoder
from csmd.daemon.worker import ModelWorker
from csmd.model.generator import Context, Generator, Segment, Utterance
from csmd.model.sampling import GenerationParams
from csmd.protocol import trio_client
from csmd.speak import next_audio


class Sentence(Protocol):
    async def next_audio(self) -> np.ndarray | None: ...  # 1920 samples, or None when it has ended
    async def cancel(self) -> None: ...


class Engine(Protocol):
    # Returns how long its parts took, in seconds, where the engine can tell ({} where it cannot).
    async def add_user_turn(self, pcm: np.ndarray, transcript: str, speaker: int) -> dict[str, float]: ...
    async def start(self, text: str, speaker: int, params: GenerationParams) -> Sentence: ...
    async def trim(self, sentence: Sentence, frames: int, text: str) -> None: ...


class LocalSentence:
    def __init__(self, worker: ModelWorker, utterance: Utterance, decoder: StreamingDecoder):
        self.worker, self.utterance, self.decoder = worker, utterance, decoder

    async def next_audio(self) -> np.ndarray | None:
        return await self.worker.run(partial(next_audio, self.utterance, self.decoder))

    async def cancel(self) -> None:
        await self.worker.run(self.utterance.cancel)  # a no-op if it ended by itself


class LocalEngine:
    """The model in this process; every model call on the one model thread."""

    def __init__(self, generator: Generator, context: Context, mimi: Mimi, worker: ModelWorker):
        self.generator, self.context, self.mimi, self.worker = generator, context, mimi, worker

    async def add_user_turn(self, pcm: np.ndarray, transcript: str, speaker: int) -> dict[str, float]:
        started = time.monotonic()
        codes = await self.worker.run(partial(self.mimi.encode, pcm))
        encoded = time.monotonic()
        await self.worker.run(partial(self.context.append, Segment(speaker, transcript, codes.T)))
        return {"encode": encoded - started, "prefill": time.monotonic() - encoded}

    async def start(self, text: str, speaker: int, params: GenerationParams) -> Sentence:
        utterance = await self.worker.run(partial(self.generator.start, self.context, text, speaker, params))
        return LocalSentence(self.worker, utterance, StreamingDecoder(self.mimi))

    async def trim(self, sentence: Sentence, frames: int, text: str) -> None:
        assert isinstance(sentence, LocalSentence)
        await self.worker.run(partial(self.context.trim_reply, sentence.utterance, frames, text))


class DaemonSentence:
    def __init__(self, speech: trio_client.Speech, request: str):
        self.speech, self.request = speech, request
        self._chunks = speech.__aiter__()

    async def next_audio(self) -> np.ndarray | None:
        try:
            chunk = await self._chunks.__anext__()
        except StopAsyncIteration:
            return None
        return chunk.pcm

    async def cancel(self) -> None:
        if self.speech.end is None:
            await self.speech.cancel()


class DaemonEngine:
    """A running daemon: one session of it holds this conversation."""

    _ids = itertools.count()

    def __init__(self, client: trio_client.Client, session: str):
        self.client, self.session = client, session

    async def add_user_turn(self, pcm: np.ndarray, transcript: str, speaker: int) -> dict[str, float]:
        await self.client.add_context(self.session, speaker, transcript, pcm.astype(np.float32), rate=24_000)
        return {}  # (the daemon encodes and prefills it: one step from here)

    async def start(self, text: str, speaker: int, params: GenerationParams) -> Sentence:
        request = f"talk-{next(self._ids)}"
        speech = await self.client.start_speaking(
            self.session, text, speaker, request=request, temperature=params.temperature, top_k=params.top_k,
            top_p=params.top_p, min_p=params.min_p, seed=params.seed, max_frames=params.max_frames,
            format="pcm_f32le",
        )  # fmt: skip
        return DaemonSentence(speech, request)

    async def trim(self, sentence: Sentence, frames: int, text: str) -> None:
        assert isinstance(sentence, DaemonSentence)
        await self.client.trim_context(self.session, sentence.request, frames, text)
