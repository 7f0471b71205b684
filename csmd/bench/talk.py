"""`csmd bench talk`: a scripted conversation on real audio devices, measured.

The user's voice is synthesized with espeak-ng and played into one device (e.g. JACK's `loopback`, whose
output is wired to its input); csmd listens on that device's input and speaks to another (e.g. `system`), so
it hears the user and not itself. Each round: the user asks, csmd answers, and one second into the answer
the user cuts in. Measured: end of the user's turn to the first reply audio, user speech onset to playback
stop (barge-in), and playback underruns per minute of reply audio.
"""

from __future__ import annotations

import statistics
import subprocess
import tempfile
from collections.abc import AsyncGenerator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import trio

from csmd.audio import io
from csmd.audio.devices import Microphone, Speaker
from csmd.audio.mimi.model import Mimi
from csmd.audio.vad import VoiceActivityDetector
from csmd.daemon.worker import ModelWorker
from csmd.model.generator import Generator
from csmd.model.sampling import GenerationParams
from csmd.talk.engine import LocalEngine
from csmd.talk.loop import Conversation, TalkConfig, TurnTimes
from csmd.talk.responder import Turn
from csmd.talk.turns import TurnConfig

QUESTION = "Hello there, how are you doing today?"
INTERRUPTION = "Wait, stop, I have a question."
REPLY = ["This is the first of two long sentences.", "And this one should never be heard."]


# The parts of the time from the end of the user's speech to the first reply audio heard, in order.
PARTS = (
    "end-of-turn detection",  # the user's last sound to the turn taker's decision (its end-silence)
    "transcript",
    "encode the turn",
    "prefill the turn",
    "reply text",  # the responder's first sentence (instant here: a scripted reply)
    "prefill the reply's text",
    "first frame",  # generated and decoded
    "prebuffer",  # held back before sounding (when slower than real time)
    "device",  # the output's latency, as PortAudio reports it
)


@dataclass
class TalkRound:
    first_audio_ms: float  # end of the user's turn (as detected) to the first reply audio queued
    barge_in_ms: float  # onset of the interrupting speech to playback stopped (paused at the first speech frame)
    barge_in_confirmed_ms: float  # onset to the barge-in decided (reply cleared, generation cancelled)
    reply_frames: int  # frames of the reply kept in the context (what was heard)
    underruns: int
    reply_seconds: float
    parts_ms: dict[str, float]  # PARTS, each in ms
    turn_to_heard_ms: float  # end of the detected turn to the first reply audio out of the device


@dataclass
class TalkBenchResult:
    model: str
    rounds: int
    first_audio_ms: float  # medians
    barge_in_ms: float
    barge_in_confirmed_ms: float
    underruns_per_minute: float
    turn_to_heard_ms: float = 0.0  # the whole of it, end-of-turn detection not counted
    parts_ms: dict[str, float] = field(default_factory=dict)  # PARTS: medians over the rounds
    rounds_ms: list[dict[str, float]] = field(default_factory=list)  # every round's parts and whole

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


class _Reply:
    async def respond(self, history: list[Turn]) -> AsyncGenerator[str, None]:
        for sentence in REPLY:
            yield sentence


def espeak(text: str, directory: Path) -> np.ndarray:
    path = directory / "speech.wav"
    try:
        subprocess.run(["espeak-ng", "-w", str(path), text], check=True, capture_output=True)
    except FileNotFoundError as exc:
        raise RuntimeError("this benchmark needs espeak-ng for the user's voice (apt-get install espeak-ng)") from exc
    return io.read_audio(path)


async def one_round(
    generator: Generator, mimi: Mimi, user_device: str, csmd_device: str, params: GenerationParams
) -> tuple[TalkRound, Conversation]:
    with tempfile.TemporaryDirectory() as tmp:
        question = espeak(QUESTION, Path(tmp))
        interruption = espeak(INTERRUPTION, Path(tmp))
    worker = ModelWorker()
    try:
        context = await worker.run(generator.new_context)
        config = TalkConfig(params=params, turns=TurnConfig(min_speech=0.25, end_silence=0.6, grace=0.3))
        with (
            Microphone(user_device) as mic,
            Speaker(csmd_device) as speaker,
            Speaker(user_device) as user,  # the user's mouth
        ):
            engine = LocalEngine(generator, context, mimi, worker)
            talk = Conversation(engine, mic, speaker, VoiceActivityDetector(), _Reply(), config=config)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(talk.run)
                await trio.sleep(0.3)
                user(question)
                with trio.fail_after(60):
                    while not speaker.sounding_since:  # the reply is heard (a slow model prebuffers first)
                        await trio.sleep(0.005)
                await trio.sleep(1.0)
                holds_before = talk.stats.holds
                user(interruption)
                onset = trio.current_time()
                with trio.fail_after(10):
                    while not talk.stats.barge_ins:
                        await trio.sleep(0.002)
                confirmed = trio.current_time() - onset
                stopped = next(t for t in talk.stats.held_at[holds_before:] if t >= onset) - onset
                with trio.fail_after(60):
                    while talk.stats.turns < 2:
                        await trio.sleep(0.05)
                nursery.cancel_scope.cancel()
    finally:
        worker.close()
    reply = next((s for s in context.segments if s.speaker == config.assistant_speaker), None)
    frames = 0 if reply is None or reply.codes is None else len(reply.codes)
    asked_end = user.sounding_since[0] + question.size / 24_000 + user.output_latency
    parts, whole = turn_parts(talk.stats.turn_times[0], asked_end, speaker.output_latency)
    result = TalkRound(
        first_audio_ms=1000 * talk.stats.first_audio_after_turn[0],
        barge_in_ms=1000 * stopped,
        barge_in_confirmed_ms=1000 * confirmed,
        reply_frames=frames,
        underruns=speaker.underruns,
        reply_seconds=speaker.played / 24_000,
        parts_ms=parts,
        turn_to_heard_ms=whole,
    )
    return result, talk


def turn_parts(times: TurnTimes, speech_end: float, device_latency: float) -> tuple[dict[str, float], float]:
    """PARTS in ms from one turn's timestamps (monotonic seconds), and the whole from the detected end of the
    turn to the first reply audio out of the device."""
    steps = [times.transcribed, times.added, times.reply_text, times.started, times.first_frame, times.sounding]
    reached = [step for step in steps if step is not None]
    if len(reached) < len(steps):
        raise RuntimeError(f"the reply to the first turn was never heard: {times}")
    transcribed, added, reply_text, started, first_frame, sounding = reached
    encode = times.engine_parts.get("encode", added - transcribed)
    parts = {
        "end-of-turn detection": times.detected - speech_end,
        "transcript": transcribed - times.detected,
        "encode the turn": encode,
        "prefill the turn": added - transcribed - encode,
        "reply text": reply_text - added,
        "prefill the reply's text": started - reply_text,
        "first frame": first_frame - started,
        "prebuffer": sounding - first_frame,
        "device": device_latency,
    }
    whole = sounding + device_latency - times.detected
    return {k: round(1000 * v, 1) for k, v in parts.items()}, round(1000 * whole, 1)


def run(
    generator: Generator, mimi: Mimi, name: str, rounds: int, user_device: str, csmd_device: str
) -> TalkBenchResult:
    params = GenerationParams(max_frames=60, seed=2)
    results = []
    for _ in range(rounds):
        result, _ = trio.run(one_round, generator, mimi, user_device, csmd_device, params)
        results.append(result)
    minutes = sum(r.reply_seconds for r in results) / 60
    return TalkBenchResult(
        model=name,
        rounds=rounds,
        first_audio_ms=round(statistics.median(r.first_audio_ms for r in results), 1),
        barge_in_ms=round(statistics.median(r.barge_in_ms for r in results), 1),
        barge_in_confirmed_ms=round(statistics.median(r.barge_in_confirmed_ms for r in results), 1),
        underruns_per_minute=round(sum(r.underruns for r in results) / minutes, 2) if minutes else 0.0,
        turn_to_heard_ms=round(statistics.median(r.turn_to_heard_ms for r in results), 1),
        parts_ms={part: round(statistics.median(r.parts_ms[part] for r in results), 1) for part in PARTS},
        rounds_ms=[{**r.parts_ms, "whole": r.turn_to_heard_ms} for r in results],
    )


def format_result(r: TalkBenchResult) -> str:
    return "\n".join(
        [
            f"model {r.model}: {r.rounds} scripted rounds on real devices; medians",
            f"  end of user turn -> first reply audio  {r.first_audio_ms:8.1f} ms",
            f"  user speech onset -> playback stopped  {r.barge_in_ms:8.1f} ms (barge-in: paused at once)",
            f"  user speech onset -> barge-in decided  {r.barge_in_confirmed_ms:8.1f} ms (reply cut, context trimmed)",
            f"  playback underruns                     {r.underruns_per_minute:8.2f} per minute of reply audio",
            f"  end of user turn -> reply audio heard  {r.turn_to_heard_ms:8.1f} ms, of which:",
            *(f"    {part:35}{ms:9.1f} ms" for part, ms in r.parts_ms.items() if part != "end-of-turn detection"),
            f"  (before it: end-of-turn detection {r.parts_ms.get('end-of-turn detection', 0.0):.1f} ms)",
        ]
    )
