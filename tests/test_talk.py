"""The conversation loop with scripted devices: a microphone whose "speech" follows a timeline, a speaker that
plays in real time, the tiny random model and codec. (Real devices: tests/test_talk_devices.py.)

The VAD here is a plain energy gate over the scripted signal (loud noise = speech, zeros = silence): these
tests are about the loop's logic (turns, replies, barge-in, trimming), not about detecting speech.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import numpy as np
import pytest
import trio
from captured import capture_contexts

from csmd.audio.mimi.model import Mimi
from csmd.daemon.server import Daemon
from csmd.daemon.worker import ModelWorker
from csmd.model.generator import Generator
from csmd.model.loading import load_model
from csmd.model.sampling import GenerationParams
from csmd.protocol import trio_client
from csmd.speak import codec_for
from csmd.talk.engine import DaemonEngine, LocalEngine
from csmd.talk.loop import Conversation, TalkConfig, words_in_proportion
from csmd.talk.responder import Turn
from csmd.talk.turns import TurnConfig

RATE = 24_000


class ScriptedMic:
    """Real-time microphone whose signal is `speech(t)` (True: loud noise, False: silence)."""

    def __init__(self, speech: Callable[[float], bool]):
        self.speech = speech
        self.start = time.monotonic()
        self.sent = 0
        self.rng = np.random.default_rng(0)

    def read(self) -> np.ndarray:
        due = int((time.monotonic() - self.start) * RATE)
        n, self.sent = due - self.sent, due
        t = (self.sent - n + np.arange(n)) / RATE
        loud = np.array([self.speech(x) for x in t[::480]]).repeat(480)[:n] if n else np.zeros(0, bool)
        return np.where(loud, 0.3 * self.rng.standard_normal(n), 0.0).astype(np.float32)


class RealTimeSpeaker:
    """Plays queued samples at 24 kHz of wall-clock time, like a device."""

    def __init__(self) -> None:
        self.prebuffer = 0
        self.queued = 0
        self.sounding_since: list[float] = []
        self.cleared_at: list[float] = []
        self.paused_at: list[float] = []
        self.paused = False
        self._played_before = 0
        self._since = time.monotonic()
        self.audio: list[np.ndarray] = []

    @property
    def played(self) -> int:
        if self.paused:
            return self._played_before
        return min(self.queued, self._played_before + int((time.monotonic() - self._since) * RATE))

    def pause(self) -> None:
        self._played_before, self.paused = self.played, True
        self.paused_at.append(time.monotonic())

    def resume(self) -> None:
        self._since, self.paused = time.monotonic(), False

    def __call__(self, pcm: np.ndarray) -> None:
        if self.played >= self.queued:  # idle: playback (re)starts now
            self._played_before, self._since = self.queued, time.monotonic()
            self.sounding_since.append(self._since)
        self.queued += pcm.size
        self.audio.append(pcm)

    def restart(self) -> None:
        if self.paused:
            self.resume()

    def finish(self) -> None:
        pass

    def clear(self) -> int:
        played = self.played
        dropped, self.queued = self.queued - played, played
        self._played_before, self._since, self.paused = played, time.monotonic(), False
        self.cleared_at.append(time.monotonic())
        return dropped


class EnergyGate:
    frame_samples = 480

    def __init__(self) -> None:
        self._rest = np.zeros(0, np.float32)

    def process(self, pcm: np.ndarray) -> list[bool]:
        pcm = np.concatenate([self._rest, pcm])
        n = pcm.size // self.frame_samples
        self._rest = pcm[n * self.frame_samples :]
        frames = pcm[: n * self.frame_samples].reshape(n, self.frame_samples)
        return [bool(np.sqrt((f**2).mean()) > 0.05) for f in frames]


class ScriptedResponder:
    def __init__(self, sentences: list[str]):
        self.sentences = sentences
        self.seen: list[list[Turn]] = []

    async def respond(self, history: list[Turn]) -> AsyncIterator[str]:
        self.seen.append(list(history))
        for sentence in self.sentences:
            yield sentence


@pytest.fixture(scope="module")
def engine() -> tuple[Generator, Mimi]:
    loaded = load_model("random:tiny")
    assert loaded.tokenizer is not None
    return Generator(loaded.model, loaded.tokenizer), codec_for(loaded, None)


def talk_config(frames: int) -> TalkConfig:
    return TalkConfig(
        params=GenerationParams(max_frames=frames, seed=1),
        turns=TurnConfig(min_speech=0.2, end_silence=0.4, barge_in_speech=0.1, grace=0.2),
    )


async def converse(
    engine: tuple[Generator, Mimi], speech: Callable[[float], bool], sentences: list[str], seconds: float, frames: int
) -> tuple[Conversation, RealTimeSpeaker, ScriptedResponder]:
    generator, mimi = engine
    worker = ModelWorker()
    try:
        context = await worker.run(lambda: generator.new_context())
        speaker = RealTimeSpeaker()
        responder = ScriptedResponder(sentences)
        local = LocalEngine(generator, context, mimi, worker)
        talk = Conversation(local, ScriptedMic(speech), speaker, EnergyGate(), responder, config=talk_config(frames))
        with trio.move_on_after(seconds):
            await talk.run()
    finally:
        worker.close()
    return talk, speaker, responder


async def test_a_turn_gets_a_spoken_reply(engine: tuple[Generator, Mimi]) -> None:
    talk, speaker, responder = await converse(
        engine, lambda t: 0.2 < t < 1.0, ["Hello there.", "How are you?"], seconds=3.0, frames=6
    )
    assert talk.stats.turns == 1 and talk.stats.barge_ins == 0
    assert [t.role for t in talk.history] == ["user", "assistant"]
    assert talk.history[1].text == "Hello there. How are you?"
    segments = talk.engine.context.segments
    assert [s.speaker for s in segments] == [0, 1, 1]
    assert segments[0].codes is not None and 8 <= len(segments[0].codes) <= 16  # ~0.8 s + pre-roll, 80 ms frames
    assert sum(p.size for p in speaker.audio) == sum(len(s.codes) for s in segments[1:]) * 1920  # type: ignore[arg-type]
    assert responder.seen[0] == [Turn("user", "")]
    assert talk.stats.first_audio_after_turn[0] < 1.0
    assert speaker.prebuffer == 1920  # faster than real time: playback starts after the first frame


async def test_barge_in_stops_playback_and_keeps_what_was_heard(engine: tuple[Generator, Mimi]) -> None:
    # The user talks (0.2-0.8 s), csmd answers with two 3.2 s sentences, the user cuts in at 2.8 s.
    sentences = ["One two three four five six seven eight.", "Nine ten eleven twelve."]
    talk, speaker, _ = await converse(
        engine, lambda t: 0.2 < t < 0.8 or 2.8 < t < 3.4, sentences, seconds=5.0, frames=40
    )
    assert talk.stats.barge_ins == 1 and len(speaker.cleared_at) == 1
    # Playback paused at the first frame of the interruption and was cleared once it lasted barge_in_speech.
    assert talk.stats.holds == 1 and 0.05 < speaker.cleared_at[0] - speaker.paused_at[0] < 0.3
    speakers = [s.speaker for s in talk.engine.context.segments]
    assert speakers[:3] == [0, 1, 0]  # the second sentence was made ahead but never heard: dropped
    replies = [talk.engine.context.segments[1]]
    heard = replies[0]
    assert heard.codes is not None and 10 < len(heard.codes) < 40  # about 1.5 s of 3.2 s was played
    assert heard.text == words_in_proportion(sentences[0], len(heard.codes) / 40)
    assert talk.history[1] == Turn("assistant", heard.text)
    assert talk.stats.turns == 2  # the barge-in speech became the next user turn


def test_words_in_proportion() -> None:
    assert words_in_proportion("a b c d", 0.5) == "a b"
    assert words_in_proportion("a b c d", 0.0) == ""
    assert words_in_proportion("a b c d", 1.0) == "a b c d"


async def test_a_cough_while_csmd_talks_only_pauses_playback(engine: tuple[Generator, Mimi]) -> None:
    # 60 ms of "speech" at 2.0 s: shorter than barge_in_speech (0.1 s here), so no barge-in; the reply goes on.
    talk, speaker, _ = await converse(
        engine, lambda t: 0.2 < t < 0.8 or 2.0 < t < 2.06, ["One two three four five six."], seconds=5.0, frames=25
    )
    assert talk.stats.barge_ins == 0 and talk.stats.holds == 1 and not speaker.cleared_at
    assert not speaker.paused  # resumed
    assert speaker.played == speaker.queued == 25 * 1920  # every sample was played: the pause lost nothing
    assert talk.stats.turns == 1


async def test_barge_in_through_the_daemon(
    engine: tuple[Generator, Mimi], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`csmd talk` against a running daemon: the same scenario, the trimming done with context.trim."""
    generator, mimi = engine
    contexts = capture_contexts(generator, monkeypatch)
    daemon = Daemon(generator, mimi, "random:tiny")
    sentences = ["One two three four five six seven eight.", "Nine ten eleven twelve."]
    try:
        async with trio.open_nursery() as nursery:
            path = await nursery.start(daemon.serve, tmp_path / "csmd.sock")
            async with trio_client.open_client(path) as client:
                await client.open_session("talk")
                speaker = RealTimeSpeaker()
                mic = ScriptedMic(lambda t: 0.2 < t < 0.8 or 2.8 < t < 3.4)
                talk = Conversation(DaemonEngine(client, "talk"), mic, speaker, EnergyGate(),
                                    ScriptedResponder(sentences), config=talk_config(40))  # fmt: skip
                with trio.move_on_after(5.0):
                    await talk.run()
            nursery.cancel_scope.cancel()
    finally:
        daemon.close()
    assert talk.stats.barge_ins == 1 and talk.stats.turns == 2
    (context,) = contexts
    speakers = [s.speaker for s in context.segments]
    assert speakers[:3] == [0, 1, 0]  # the unheard second sentence was dropped on the daemon's side too
    heard = context.segments[1]
    assert heard.codes is not None and 10 < len(heard.codes) < 40
    assert heard.text == words_in_proportion(sentences[0], len(heard.codes) / 40) == talk.history[1].text


def test_expected_frames_bounds_the_prebuffer_by_the_sentence() -> None:
    from csmd.talk.loop import expected_frames

    # ~14 characters a second of speech, 12.5 frames a second, 1.5x margin, plus a little for the ending.
    assert expected_frames("Hi.", 250) == 9
    assert expected_frames("This is the first of two long sentences.", 250) == 58  # 40 characters
    assert expected_frames("word " * 200, 250) == 250  # never beyond max_frames


class StuckEngine:
    """An engine whose first add_user_turn does not return until `release` is set: the conversing task falls
    behind while the user keeps talking."""

    def __init__(self) -> None:
        self.release = trio.Event()
        self.added: list[float] = []  # the trio time each turn was added

    async def add_user_turn(self, pcm: np.ndarray, transcript: str, speaker: int) -> dict[str, float]:
        await self.release.wait()
        self.added.append(trio.current_time())
        return {}

    async def start(self, text: str, speaker: int, params: GenerationParams) -> object:
        raise AssertionError("the responder says nothing, so nothing is spoken")

    async def trim(self, sentence: object, frames: int, text: str) -> None:
        raise AssertionError("nothing was spoken, so nothing is trimmed")


class SilentResponder:
    async def respond(self, history: list[Turn]) -> AsyncIterator[str]:
        for sentence in ():
            yield sentence


class FrameMic:
    """One 10 ms VAD frame of silence per read (the speech itself is the VAD's script)."""

    def read(self) -> np.ndarray:
        return np.zeros(240, np.float32)


class ScriptedVad:
    """Speech in bursts: `bursts` times 0.5 s of speech then 0.5 s of silence, then silence for good."""

    frame_samples = 240

    def __init__(self, bursts: int) -> None:
        self.frames = 0
        self.bursts = bursts

    def process(self, pcm: np.ndarray) -> list[bool]:
        self.frames += 1
        second, within = divmod(self.frames, 100)
        return [second < self.bursts and within < 50]


async def test_turns_beyond_the_waiting_limit_are_dropped_and_counted(autojump_clock: trio.abc.Clock) -> None:
    """The user keeps talking while the conversing task is stuck: the listener never blocks or fails; the
    first 16 waiting turns are kept, in order, and answered once the task moves again; the rest are counted."""
    from csmd.talk.loop import MAX_WAITING_TURNS

    engine = StuckEngine()
    config = TalkConfig(turns=TurnConfig(min_speech=0.2, end_silence=0.3, barge_in_speech=0.1, grace=0.2))
    talk = Conversation(engine, FrameMic(), RealTimeSpeaker(), ScriptedVad(bursts=20), SilentResponder(),
                        config=config)  # type: ignore[arg-type]  # fmt: skip
    async with trio.open_nursery() as nursery:
        nursery.start_soon(talk.run)
        await trio.sleep(25)  # 20 turns have ended: one taken (stuck), 16 waiting, 3 with no room
        assert talk.stats.turns == 0 and talk.stats.turns_dropped == 20 - 1 - MAX_WAITING_TURNS
        engine.release.set()
        await trio.sleep(5)
        nursery.cancel_scope.cancel()
    assert talk.stats.turns == len(engine.added) == 1 + MAX_WAITING_TURNS
    assert [t.role for t in talk.history] == ["user", "assistant"] * (1 + MAX_WAITING_TURNS)
