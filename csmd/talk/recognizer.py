"""Speech recognizers for `csmd talk`: the transcript that goes into the context with each user turn.

CSM hears the user's turn as Mimi audio either way; the transcript is what the language model reads (and
what CSM's context pairs with that audio). Without a recognizer the turn joins with an empty transcript.

- `NoRecognizer`: always "".
- `TypedRecognizer`: the user types what they said after each turn (no Whisper, but the LLM still knows).
- `WhisperRecognizer`: faster-whisper (CTranslate2), an optional extra: `pip install "csmd[whisper]"`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import numpy as np
import soxr
import trio

from csmd.talk.terminal import read_stdin_line

INPUT_RATE = 24_000  # the conversation's audio (Mimi's rate)
WHISPER_RATE = 16_000  # what Whisper's feature extractor expects; it does not resample arrays itself
INSTALL_HINT = 'pip install "csmd[whisper]"'


class Recognizer(Protocol):
    async def transcribe(self, pcm: np.ndarray) -> str: ...


class RecognizerError(RuntimeError):
    """The recognizer cannot be set up: the message says what to do."""


class NoRecognizer:
    """No speech recognizer: the user's turn joins the context as audio with an empty transcript."""

    async def transcribe(self, pcm: np.ndarray) -> str:
        return ""


class TypedRecognizer:
    """The user types the transcript of each turn, for the language model to read; an empty line leaves it empty.

    `read_line(prompt)` is any async line source (the terminal by default), so tests can inject one.
    """

    def __init__(self, read_line: Callable[[str], Awaitable[str]] = read_stdin_line, prompt: str = "you said> "):
        self.read_line = read_line
        self.prompt = prompt

    async def transcribe(self, pcm: np.ndarray) -> str:
        return (await self.read_line(self.prompt)).strip()


def to_whisper_rate(pcm: np.ndarray) -> np.ndarray:
    """24 kHz mono float32 -> 16 kHz mono float32."""
    audio = np.asarray(pcm, dtype=np.float32).reshape(-1)
    if audio.size == 0:
        return audio
    return np.asarray(soxr.resample(audio, INPUT_RATE, WHISPER_RATE), dtype=np.float32)


class WhisperRecognizer:
    """Whisper through faster-whisper: CTranslate2 underneath (no torch), int8 on the CPU by default.

    `model` is a faster-whisper size name ("base.en", "small", ...: faster-whisper downloads it from the
    Hugging Face Hub on first use and caches it) or a local CTranslate2 Whisper directory (with its
    tokenizer.json: without one faster-whisper would fetch a tokenizer from the Hub). Loading happens here,
    before the conversation starts, so a missing model or package fails at once rather than at the first turn.
    """

    def __init__(
        self,
        model: str = "base.en",
        *,
        language: str | None = None,
        device: str = "cpu",
        compute_type: str = "int8",
        beam_size: int = 1,
    ) -> None:
        try:
            # Imported here: faster-whisper is an optional extra, and importing it costs time csmd otherwise saves.
            from faster_whisper import WhisperModel
        except ImportError as exc:
            raise RecognizerError(f"Whisper transcripts need faster-whisper: {INSTALL_HINT}") from exc
        self.model: Any = WhisperModel(model, device=device, compute_type=compute_type)
        self.language = language  # None: detected per turn (multilingual models; ".en" models are English)
        self.beam_size = beam_size  # 1 (greedy): the user waits for this before the reply can start
        # One transcription at a time: turns are transcribed in order anyway, and runs in parallel would only
        # compete for the same cores.
        self._limiter = trio.CapacityLimiter(1)

    async def transcribe(self, pcm: np.ndarray) -> str:
        audio = to_whisper_rate(pcm)
        if audio.size == 0:
            return ""
        # Blocking (up to seconds on a CPU): in a thread, so the microphone, the VAD and barge-in keep running.
        # Not abandoned on cancel: the process should not exit with CTranslate2 still running in a thread.
        return await trio.to_thread.run_sync(self._transcribe, audio, limiter=self._limiter)

    def _transcribe(self, audio: np.ndarray) -> str:
        segments, _ = self.model.transcribe(
            audio,
            language=self.language,
            beam_size=self.beam_size,
            # A turn is one short utterance: no timestamps to split it; in a turn longer than Whisper's 30 s
            # window, no conditioning on the window before (a hallucination would carry over); and no second
            # VAD (csmd's own already cut the turn).
            without_timestamps=True,
            condition_on_previous_text=False,
            vad_filter=False,
        )
        # `segments` is a lazy generator: the decoding happens while it is consumed, so consume it here.
        return " ".join(text for segment in segments if (text := segment.text.strip()))
