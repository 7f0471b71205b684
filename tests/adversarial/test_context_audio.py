"""Issue 16, item 1: context audio cannot freeze or starve the daemon.

Rates are checked against a documented range and the audio's length against the model's window before any
work, and decoding and resampling run in a thread, never on the event loop.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import trio

from adversarial.hostile import DaemonProcess, RawClient, ends, speak

MAX_SECONDS = 163.76  # random:tiny's window: 2048 rows, 2047 frames of 80 ms once the closing frame is counted


def add(session: str, samples: np.ndarray, rate: int, text: str = "x") -> dict[str, object]:
    pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()
    return {"type": "context.add", "session": session, "speaker": 0, "text": text, "audio": pcm, "rate": rate,
            "format": "pcm_s16le"}  # fmt: skip


def tone(seconds: float, rate: int) -> np.ndarray:
    return 0.3 * np.sin(np.arange(int(seconds * rate)) * 2 * np.pi * 300 / rate)


@pytest.mark.parametrize("rate", [2**63, 2**64 - 1, 1, 7_999, 192_001])
async def test_a_rate_outside_the_range_is_refused_before_any_work(daemon: DaemonProcess, rate: int) -> None:
    # 2**63 used to spin inside soxr on the event loop forever; 1 Hz asked for 24 000 output samples per input.
    client = await RawClient.connect(daemon.socket)
    await client.open("s")
    await client.send(**add("s", tone(0.5, 8_000), rate))
    error = await client.recv()
    assert error is not None and error["type"] == "error" and error["code"] == "invalid_params", error
    assert "'rate'" in error["message"] and "[8000, 192000]" in error["message"] and not error["fatal"]
    assert error["session"] == "s"
    await client.send(**speak("s", "r", max_frames=2))  # the daemon, the connection and the session go on
    assert (await client.until(ends("r")))[-1]["type"] == "audio.end"


@pytest.mark.parametrize(
    ("audio", "code", "words"),
    [
        (b"", "invalid_params", "'audio' is empty"),
        (np.array([0.1, np.nan, 0.2], "<f4").tobytes(), "invalid_params", "NaN"),
        (np.zeros(int(MAX_SECONDS * 8_000) + 800, "<f4").tobytes(), "context_overflow", "at most 163.76 s"),
    ],
)
async def test_bad_audio_is_refused_naming_it(daemon: DaemonProcess, audio: bytes, code: str, words: str) -> None:
    client = await RawClient.connect(daemon.socket)
    await client.open("s")
    await client.send(type="context.add", session="s", speaker=0, text="x", audio=audio, rate=8_000,
                      format="pcm_f32le")  # fmt: skip
    error = await client.recv()
    assert error is not None and error["type"] == "error" and error["code"] == code and words in error["message"]


async def test_the_longest_audio_at_the_lowest_rate_is_encoded(daemon: DaemonProcess) -> None:
    client = await RawClient.connect(daemon.socket)
    await client.open("s")
    await client.send(**add("s", tone(19.0, 8_000), 8_000, text=""))  # 19 s + the text rows fill the window
    added = await client.recv()
    assert added is not None and added["type"] == "context.added" and added["frames"] == 238, added


async def test_resampling_never_stalls_the_loop_or_other_streams(
    start_daemon: Callable[..., DaemonProcess],
) -> None:
    """While one client's audio is being resampled (held there by the test), a new client is welcomed and
    answered, and another client's reply keeps streaming: the work is in a thread, not on the loop and not on
    the model thread."""
    daemon = start_daemon(faults=("gate_resample",))
    streaming = await RawClient.connect(daemon.socket)
    await streaming.open("a")
    await streaming.send(**speak("a", "long", max_frames=200))
    await streaming.until(lambda x: x["type"] == "audio.chunk")
    adder = await RawClient.connect(daemon.socket)
    await adder.open("b")
    await adder.send(**add("b", tone(19.0, 8_000), 8_000, text=""))
    with trio.fail_after(20):
        while not (daemon.fault_dir / "resample.entered").exists():
            await trio.sleep(0.01)
    newcomer = await RawClient.connect(daemon.socket)  # hello -> welcome while the resampler is held
    await newcomer.ping()
    await adder.ping()  # the adding connection's own reader is free too
    chunks = await streaming.until(lambda x: x["type"] == "audio.chunk" and x["seq"] == 10)
    assert all(x["request"] == "long" for x in chunks)
    (daemon.fault_dir / "resample.release").touch()
    added = await adder.recv()
    assert added is not None and added["type"] == "context.added" and added["frames"] == 238
    await streaming.send(type="cancel", request="long")
    await streaming.until(lambda x: x["type"] == "cancelled")
    daemon.check_clean_exit()
