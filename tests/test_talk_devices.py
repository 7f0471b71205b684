"""The conversation loop on real audio devices: JACK's dummy backend (CI starts `jackd -d dummy -r 24000`).

csmd listens on the `loopback` device's input and speaks to `system` (a sink nobody hears back), while the
test plays the user's voice, made with espeak-ng, into `loopback`'s output: csmd hears the user, not itself.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import trio

sd = pytest.importorskip("sounddevice")
if not any(d["name"] == "loopback" for d in sd.query_devices()):
    pytest.skip("no JACK loopback device (start jackd -d dummy -r 24000)", allow_module_level=True)
if shutil.which("espeak-ng") is None:
    pytest.skip("espeak-ng is not installed", allow_module_level=True)

from csmd.audio import io  # noqa: E402
from csmd.audio.devices import Microphone, Speaker, find_device  # noqa: E402
from csmd.audio.vad import VoiceActivityDetector  # noqa: E402
from csmd.daemon.worker import ModelWorker  # noqa: E402
from csmd.model.generator import Generator  # noqa: E402
from csmd.model.loading import load_model  # noqa: E402
from csmd.model.sampling import GenerationParams  # noqa: E402
from csmd.speak import codec_for, speak  # noqa: E402
from csmd.talk.loop import Conversation, TalkConfig  # noqa: E402
from csmd.talk.responder import Turn  # noqa: E402
from csmd.talk.turns import TurnConfig  # noqa: E402


def espeak(text: str, tmp: Path) -> np.ndarray:
    path = tmp / f"{abs(hash(text))}.wav"
    subprocess.run(["espeak-ng", "-w", str(path), text], check=True)
    return io.read_audio(path)  # 24 kHz mono


class Responder:
    async def respond(self, history: list[Turn]) -> AsyncIterator[str]:
        for sentence in ["This is the first of two long sentences.", "And this one should never be heard."]:
            yield sentence


@pytest.fixture(scope="module")
def engine():  # type: ignore[no-untyped-def]
    loaded = load_model("random:tiny")
    return Generator(loaded.model, loaded.tokenizer), codec_for(loaded, None)


def test_generated_audio_is_played_and_recorded_back(engine, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    generator, mimi = engine
    recorded: list[np.ndarray] = []
    with sd.InputStream(samplerate=24_000, channels=1, dtype="float32", device=find_device("loopback", "input"),
                        callback=lambda data, *_: recorded.append(data[:, 0].copy())):  # fmt: skip
        with Speaker("loopback") as speaker:
            result = speak(generator, generator.new_context(), mimi, "Hello.", 0,
                           GenerationParams(max_frames=25, seed=3), on_audio=speaker)  # fmt: skip
        sd.sleep(300)
    heard = np.concatenate(recorded)
    sent = np.clip(result.pcm, -1, 1)
    # Find the generated audio inside the recording: the best alignment matches sample for sample.
    lag = int(np.argmax(np.correlate(heard, sent[:4800], mode="valid")))
    back = heard[lag : lag + sent.size]
    assert back.size == sent.size == 25 * 1920
    assert np.corrcoef(back, sent)[0, 1] > 0.99


async def test_a_spoken_turn_then_a_barge_in(engine, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    generator, mimi = engine
    question = espeak("Hello there, how are you doing today?", tmp_path)
    interruption = espeak("Wait, stop, I have a question.", tmp_path)
    worker = ModelWorker()
    user = Speaker("loopback")  # the user's mouth, into csmd's microphone
    try:
        context = await worker.run(generator.new_context)
        config = TalkConfig(
            params=GenerationParams(max_frames=60, seed=2),
            turns=TurnConfig(min_speech=0.25, end_silence=0.6, barge_in_speech=0.15, grace=0.3),
        )
        with Microphone("loopback") as mic, Speaker("system") as csmd_speaker, user:
            talk = Conversation(generator, context, mimi, worker, mic, csmd_speaker, VoiceActivityDetector(),
                                Responder(), config=config)  # fmt: skip
            async with trio.open_nursery() as nursery:
                nursery.start_soon(talk.run)
                await trio.sleep(0.3)
                user(question)
                with trio.fail_after(20):
                    while not talk._speaking:  # the reply's audio started playing
                        await trio.sleep(0.01)
                await trio.sleep(1.0)
                user(interruption)
                onset = trio.current_time()
                with trio.fail_after(10):
                    while not talk.stats.barge_ins:
                        await trio.sleep(0.005)
                latency = trio.current_time() - onset
                with trio.fail_after(20):
                    while talk.stats.turns < 2:
                        await trio.sleep(0.05)
                nursery.cancel_scope.cancel()
    finally:
        worker.close()
    assert talk.stats.turns == 2 and talk.stats.barge_ins == 1
    assert latency < 0.6  # speech onset to playback stop: VAD evidence (0.15 s) + a 32 ms frame + polling
    segments = context.segments
    assert [s.speaker for s in segments[:3]] == [0, 1, 0]  # question, the heard part of the reply, interruption
    reply = segments[1]
    assert reply.codes is not None and 0 < len(reply.codes) < 60
    assert talk.history[1].role == "assistant" and "never" not in talk.history[1].text
    question_codes = segments[0].codes
    assert question_codes is not None and abs(len(question_codes) * 0.08 - question.size / 24_000) < 1.0
    print(f"barge-in latency {latency * 1000:.0f} ms; first audio after turn {talk.stats.first_audio_after_turn}")


def test_user_speech_thread_safety() -> None:
    """Playing into the loopback from another thread while recording works (what the test above relies on)."""
    got: list[int] = []
    with Microphone("loopback") as mic:
        t = threading.Thread(target=lambda: sd.sleep(100))
        t.start()
        t.join()
        sd.sleep(200)
        got.append(mic.read().size)
    assert got[0] > 0
