"""The conversation loop on real audio devices: JACK's dummy backend (CI starts `jackd -d dummy -r 24000`).

csmd listens on the `loopback` device's input and speaks to `system` (a sink nobody hears back), while the
test plays the user's voice, made with espeak-ng, into `loopback`'s output: csmd hears the user, not itself.
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

sd = pytest.importorskip("sounddevice")
if not any(d["name"] == "loopback" for d in sd.query_devices()):
    pytest.skip("no JACK loopback device (start jackd -d dummy -r 24000)", allow_module_level=True)
if shutil.which("espeak-ng") is None:
    pytest.skip("espeak-ng is not installed", allow_module_level=True)

from csmd.audio.devices import Microphone, Speaker, find_device  # noqa: E402
from csmd.bench.talk import PARTS, one_round  # noqa: E402
from csmd.model.generator import Generator  # noqa: E402
from csmd.model.loading import load_model  # noqa: E402
from csmd.model.sampling import GenerationParams  # noqa: E402
from csmd.speak import codec_for, speak  # noqa: E402


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


async def test_a_spoken_turn_then_a_barge_in(engine) -> None:  # type: ignore[no-untyped-def]
    """The `csmd bench talk` scenario: espeak-ng asks, csmd answers, the user cuts in one second later."""
    generator, mimi = engine
    result, talk = await one_round(generator, mimi, "loopback", "system", GenerationParams(max_frames=60, seed=2))
    assert talk.stats.turns == 2 and talk.stats.barge_ins == 1
    # Speech onset to playback stop: one 32 ms VAD frame + polling + a device callback, plus espeak-ng's own
    # leading silence; generous for a loaded machine. The decision waits for 0.15 s of speech on top.
    assert result.barge_in_ms < 400
    assert result.barge_in_ms < result.barge_in_confirmed_ms < 800
    segments = talk.engine.context.segments
    assert [s.speaker for s in segments[:3]] == [0, 1, 0]  # question, the heard part of the reply, interruption
    assert 0 < result.reply_frames < 60
    assert talk.history[1].role == "assistant" and "never" not in talk.history[1].text
    question = segments[0].codes
    assert question is not None and 1.5 < len(question) * 0.08 < 5.0  # the spoken question, with pre-roll
    assert result.underruns == 0  # the tiny model is faster than real time
    # The turn's breakdown: every part measured, the parts after the detection adding up to the whole.
    parts = result.parts_ms
    assert set(parts) == set(PARTS) and all(ms >= 0 for ms in parts.values()), parts
    after_detection = sum(ms for part, ms in parts.items() if part != "end-of-turn detection")
    assert result.turn_to_heard_ms == pytest.approx(after_detection, abs=0.5)
    assert parts["encode the turn"] > 0 and parts["prefill the turn"] > 0 and parts["first frame"] > 0
    assert parts["device"] > 0 and parts["end-of-turn detection"] > 0.3  # the turn taker's 0.6 s end-silence, less


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
