"""`csmd talk`: a live conversation through the microphone and the speaker.

Two tasks share one trio loop:
- listening: every few ms the microphone's new audio goes through the VAD and the turn taker; the audio
  itself is kept (the last minute) so a finished user turn can be cut out of it, with a little pre-roll.
- conversing: each finished user turn joins the conversation (Mimi-encoded, with the recognizer's
  transcript), the responder's reply comes sentence by sentence, and each sentence is spoken in the same
  conversation, its audio queued on the speaker frame by frame as it comes. Where the model runs is the
  `Engine`'s business (engine.py): in this process, or in a daemon over its socket.

Barge-in: user speech while csmd talks (after the grace window) clears the speaker at once, stops the reply
at the next frame, and trims the conversation to what was heard: sentences never played are dropped, and the
one being played keeps its played frames and the same fraction of its words. The assistant's history turn
(what the responder sees next time) is trimmed the same way.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import trio

from csmd.audio.devices import prebuffer_for
from csmd.model.sampling import GenerationParams
from csmd.talk.engine import Engine, Sentence
from csmd.talk.recognizer import NoRecognizer, Recognizer
from csmd.talk.responder import Responder, Turn
from csmd.talk.turns import BargeIn, TurnConfig, TurnEnded, TurnTaker

log = logging.getLogger("csmd.talk")
FRAME = 1920
RATE = 24_000
POLL_SECONDS = 0.01
KEEP_SECONDS = 60.0
# User turns waiting for the conversing task. The listener can never wait for room (it must keep draining the
# microphone and watching for barge-in every few ms), so a turn that finds the queue full is dropped and
# counted (`Stats.turns_dropped`, and a warning). The newest is the one dropped: the waiting turns are then
# answered in order, a gap-free prefix of what was said, rather than the conversation losing a turn from its
# middle. 16 turns behind means the conversing task is stuck (a recognizer or responder that does not answer).
MAX_WAITING_TURNS = 16
# How many frames a sentence may take, to size the playback prebuffer: English speech runs ~14 characters a
# second (12.5 frames); the margin covers slow speakers and pauses. A sentence that runs longer may underrun
# at its very end; one that ends sooner just started a little late.
FRAMES_PER_CHARACTER = 1.5 * 12.5 / 14


def expected_frames(sentence: str, max_frames: int) -> int:
    return min(max_frames, math.ceil(len(sentence) * FRAMES_PER_CHARACTER) + 4)


class AudioIn(Protocol):
    def read(self) -> np.ndarray: ...


class AudioOut(Protocol):
    played: int
    prebuffer: int  # samples held back before an utterance starts sounding
    sounding_since: list[float]  # monotonic times at which queued audio began to sound, in order

    def __call__(self, pcm: np.ndarray) -> None: ...
    def clear(self) -> int: ...
    def pause(self) -> None: ...  # silence now, keep the queue (a suspected barge-in)
    def resume(self) -> None: ...  # it was not one: go on where it stopped
    def restart(self) -> None: ...  # a new reply begins: running dry counts as an underrun again
    def finish(self) -> None: ...  # the reply's audio is all queued: running dry now is its end


class Vad(Protocol):
    frame_samples: int

    def process(self, pcm: np.ndarray) -> list[bool]: ...


@dataclass
class TalkConfig:
    user_speaker: int = 0
    assistant_speaker: int = 1
    params: GenerationParams = field(default_factory=GenerationParams)
    turns: TurnConfig = field(default_factory=TurnConfig)
    preroll: float = 0.3  # seconds kept before the detected start of a turn (detection lags speech onset)


@dataclass
class _Spoken:
    """One reply sentence in flight: where its audio sits in the speaker's timeline."""

    text: str
    queued_from: int  # speaker sample index of its first sample
    sentence: Sentence | None = None
    frames: int = 0


@dataclass
class TurnTimes:
    """Where the time goes from the end of a user's turn to the first reply audio: monotonic seconds at each
    step (None: not reached, e.g. a reply cut short). `csmd bench talk` reports the differences."""

    detected: float  # the turn taker decided the turn was over (after its end-silence)
    transcribed: float | None = None
    added: float | None = None  # the turn is in the conversation: encoded and prefilled
    engine_parts: dict[str, float] = field(default_factory=dict)  # how the engine split adding it, in seconds
    reply_text: float | None = None  # the responder's first sentence
    started: float | None = None  # the reply's first sentence accepted: its text rows prefilled
    first_frame: float | None = None  # its first decoded frame in hand
    sounding: float | None = None  # the speaker began to sound it (after the prebuffer)


@dataclass
class Stats:
    turns: int = 0
    barge_ins: int = 0
    holds: int = 0  # playback paused at the first frame of user speech (confirmed or not)
    held_at: list[float] = field(default_factory=list)  # trio times of those pauses
    first_audio_after_turn: list[float] = field(default_factory=list)  # seconds, end of user turn -> first audio
    turns_dropped: int = 0  # user turns that found MAX_WAITING_TURNS already waiting
    turn_times: list[TurnTimes] = field(default_factory=list)  # one per user turn answered


class Conversation:
    def __init__(
        self,
        engine: Engine,
        mic: AudioIn,
        speaker: AudioOut,
        vad: Vad,
        responder: Responder,
        recognizer: Recognizer | None = None,
        config: TalkConfig | None = None,
        on_text: Callable[[str, str], None] | None = None,
    ):
        self.engine = engine
        self.mic, self.speaker, self.vad, self.responder = mic, speaker, vad, responder
        self.recognizer = recognizer or NoRecognizer()
        self.config = config or TalkConfig()
        self.on_text = on_text or (lambda who, text: None)
        self.taker = TurnTaker(self.config.turns)
        self.history: list[Turn] = []
        self.stats = Stats()
        self._audio = np.zeros(0, np.float32)  # recent microphone audio
        self._audio_start = 0  # stream sample index of self._audio[0]
        self._heard = 0  # stream samples through the VAD
        self._queued = 0  # speaker samples queued so far (its timeline)
        self._spoken: list[_Spoken] = []  # sentences of the current reply, in order
        self._interrupted = False  # the current reply was cut off by the user
        self._replying = False  # a reply is being generated
        self._speaking = False  # reply audio is queued or playing
        self._holding = False  # playback is paused on suspicion of a barge-in
        # User turns (start, end), and TRIM: "trim the last reply to what was heard", in the order they happen.
        # Unbounded as a channel, bounded by `_waiting_turns`: turns beyond MAX_WAITING_TURNS are dropped, and a
        # TRIM, which must never be lost, comes at most once per barge-in (so once per reply).
        self._turns_send, self._turns_receive = trio.open_memory_channel[tuple[float, float, float] | None](math.inf)
        self._waiting_turns = 0
        self._frame_seconds: float | None = None  # measured time to make and decode one frame (moving average)

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._listen)
            nursery.start_soon(self._converse)

    # -- listening ---------------------------------------------------------------------------------------

    async def _listen(self) -> None:
        frame_seconds = self.vad.frame_samples / RATE
        while True:
            await trio.sleep(POLL_SECONDS)
            pcm = self.mic.read()
            if pcm.size:
                self._keep(pcm)
            for speech in self.vad.process(pcm):
                self._heard += self.vad.frame_samples
                for event in self.taker.feed(self._heard / RATE, speech, frame_seconds):
                    if isinstance(event, BargeIn):
                        self._barge_in()
                    elif isinstance(event, TurnEnded):
                        self._turn_ended(event.start, event.end)
                self._hold_for_possible_barge_in()
            # The reply is over when it is all made and all played; running dry while slow generation catches
            # up is still the same reply (the user may still barge in).
            if self._speaking and not self._replying and self.speaker.played >= self._queued:
                self._speaking = False
                self.taker.assistant_stopped(self._heard / RATE)

    def _turn_ended(self, start: float, end: float) -> None:
        if self._waiting_turns >= MAX_WAITING_TURNS:
            self.stats.turns_dropped += 1
            log.warning("dropped a user turn: %d are still waiting for a reply", self._waiting_turns)
            return
        self._waiting_turns += 1
        self._turns_send.send_nowait((start, end, time.monotonic()))

    def _keep(self, pcm: np.ndarray) -> None:
        self._audio = np.concatenate([self._audio, pcm])
        excess = self._audio.size - int(KEEP_SECONDS * RATE)
        if excess > 0:
            self._audio = self._audio[excess:]
            self._audio_start += excess

    def _cut(self, start: float, end: float) -> np.ndarray:
        first = max(int((start - self.config.preroll) * RATE) - self._audio_start, 0)
        last = int(end * RATE) - self._audio_start
        return self._audio[first:last]

    def _hold_for_possible_barge_in(self) -> None:
        """Pause playback at the first frame of user speech while csmd talks; resume if it stays short.

        Deciding that speech is a barge-in takes `barge_in_speech` (0.15 s: a word, not a click), but the user
        should hear csmd stop at once. So playback pauses on the first counted speech frame (one VAD frame
        after onset), the barge-in then clears it, and speech too short to interrupt (a cough, "mm-hm") only
        costs a pause: playback resumes where it stopped, nothing is lost.
        """
        suspect = self.taker.assistant_speaking and self.taker.speech_run_open and not self._interrupted
        if suspect and not self._holding:
            self.speaker.pause()
            self.stats.holds += 1
            self.stats.held_at.append(trio.current_time())
        elif self._holding and not suspect and not self._interrupted:
            self.speaker.resume()
        self._holding = suspect

    def _barge_in(self) -> None:
        self.speaker.clear()
        self._interrupted = True
        self.stats.barge_ins += 1
        if not self._replying:  # the reply was already made; only its playback was cut: trim it now
            self._turns_send.send_nowait(None)

    # -- conversing --------------------------------------------------------------------------------------

    async def _converse(self) -> None:
        async for item in self._turns_receive:
            if item is None:
                await self._trim()
                continue
            self._waiting_turns -= 1
            start, end, detected = item
            user_audio = self._cut(start, end)
            turn_done = trio.current_time()
            times = TurnTimes(detected)
            transcript = await self.recognizer.transcribe(user_audio)
            times.transcribed = time.monotonic()
            self.on_text("user", transcript)
            times.engine_parts = await self.engine.add_user_turn(user_audio, transcript, self.config.user_speaker)
            times.added = time.monotonic()
            self.stats.turns += 1
            self.history.append(Turn("user", transcript))
            sounded_before = len(self.speaker.sounding_since)
            await self._reply(turn_done, times)
            if len(self.speaker.sounding_since) > sounded_before:
                times.sounding = self.speaker.sounding_since[sounded_before]
            self.stats.turn_times.append(times)

    async def _reply(self, turn_done: float, times: TurnTimes) -> None:
        self._spoken, self._interrupted, self._replying = [], False, True
        self.speaker.restart()
        first_audio = True
        # aclosing: a barge-in leaves the loop early, and the responder (an HTTP stream) must close now.
        async with contextlib.aclosing(self.responder.respond(self.history)) as sentences:
            async for sentence in sentences:
                if self._interrupted:
                    break
                spoken = _Spoken(sentence, self._queued)
                self._spoken.append(spoken)
                # Slower than real time: hold back enough of this sentence that it never runs dry once it
                # starts (from the measured frame rate, updated every frame until playback starts); faster:
                # start after the first frame.
                frames = expected_frames(sentence, self.config.params.max_frames)
                self.speaker.prebuffer = prebuffer_for(self._frame_seconds or 0.0, frames)
                self.speaker.restart()
                self.on_text("assistant", sentence)
                if times.reply_text is None:
                    times.reply_text = time.monotonic()
                voice = await self.engine.start(sentence, self.config.assistant_speaker, self.config.params)
                if times.started is None:
                    times.started = time.monotonic()
                spoken.sentence = voice

                while not self._interrupted and (pcm := await self._timed(voice)) is not None:
                    if first_audio:
                        self.stats.first_audio_after_turn.append(trio.current_time() - turn_done)
                        times.first_frame = time.monotonic()
                        first_audio = False
                    if not self._speaking:
                        self._speaking = True
                        self.taker.assistant_started(self._heard / RATE)
                    # Before anything of this sentence sounds, the latest frame rate decides how much to hold
                    # back (the first reply has no earlier measurement); once it sounds this has no effect.
                    self.speaker.prebuffer = prebuffer_for(self._frame_seconds or 0.0, frames)
                    self.speaker(pcm)
                    self._queued += pcm.size
                    spoken.frames += 1
                await voice.cancel()  # a no-op if it ended by itself
                self.speaker.finish()  # the gap before the next sentence is not an underrun
        self._replying = False
        self.history.append(Turn("assistant", " ".join(s.text for s in self._spoken)))
        if self._interrupted:
            await self._trim()

    async def _timed(self, voice: Sentence) -> np.ndarray | None:
        started = trio.current_time()
        pcm = await voice.next_audio()
        took = trio.current_time() - started
        self._frame_seconds = took if self._frame_seconds is None else 0.8 * self._frame_seconds + 0.2 * took
        return pcm

    async def _trim(self) -> None:
        """Make the conversation and the history say only what the user heard of the last reply.

        Playback is in order: the sentences before the first one not fully played were heard whole; that one
        keeps its played frames and the same fraction of its words; everything after it goes.
        """
        if not self._spoken:
            return
        played = self.speaker.played
        heard: list[str] = []
        for spoken in self._spoken:
            frames_heard = min(max((played - spoken.queued_from) // FRAME, 0), spoken.frames)
            if frames_heard == spoken.frames:
                heard.append(spoken.text)
                continue
            text = words_in_proportion(spoken.text, frames_heard / spoken.frames) if frames_heard else ""
            if spoken.sentence is not None:
                await self.engine.trim(spoken.sentence, frames_heard, text)
            heard.append(text)
            break
        self._spoken = []  # trimmed once
        assert self.history and self.history[-1].role == "assistant"
        self.history.pop()
        if text_heard := " ".join(t for t in heard if t):
            self.history.append(Turn("assistant", text_heard))


def words_in_proportion(text: str, fraction: float) -> str:
    """The first `fraction` of `text`, cut at a word boundary: the part of a sentence that was heard.

    Speech time is roughly proportional to text length, so this is an estimate, documented as such.
    """
    words = text.split()
    return " ".join(words[: round(len(words) * max(0.0, min(fraction, 1.0)))])
