"""Issue 16, item 7: SIGTERM ends every reply in flight with an error saying why, then the connection with a
fatal `error`; the model thread stops, and a model thread that never finishes its job cannot hang the exit."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

import numpy as np
import pytest
import trio

from adversarial.hostile import DaemonProcess, RawClient, speak


async def test_sigterm_tells_every_client_and_exits_cleanly(start_daemon: Callable[..., DaemonProcess]) -> None:
    daemon = start_daemon()
    streaming = await RawClient.connect(daemon.socket)
    await streaming.open("a")
    await streaming.send(**speak("a", "long", max_frames=200))
    await streaming.until(lambda x: x["type"] == "audio.chunk" and x["seq"] == 3)
    second = await RawClient.connect(daemon.socket)  # another connection's reply, streaming too
    await second.open("q")
    await second.send(**speak("q", "other", max_frames=200))
    await second.until(lambda x: x["type"] == "audio.chunk")
    idle = await RawClient.connect(daemon.socket)
    await idle.open("i")
    shy = await RawClient.connect(daemon.socket, hello=False)  # connected, never said hello

    started = time.monotonic()
    await trio.to_thread.run_sync(daemon.terminate)
    assert time.monotonic() - started < 10

    rest = await streaming.until_closed()
    tail = rest[-3:]
    assert [x["type"] for x in tail] == ["error", "audio.end", "error"], tail
    assert tail[0]["code"] == "shutting_down" and tail[0]["request"] == "long" and not tail[0]["fatal"]
    chunks = [x for x in rest if x["type"] == "audio.chunk"]
    assert tail[1]["reason"] == "error" and tail[1]["frames"] == 4 + len(chunks)  # every chunk sent is counted
    assert tail[2]["code"] == "shutting_down" and tail[2]["fatal"]
    for client in (idle, shy):
        msgs = await client.until_closed()
        assert [(x["type"], x["code"], x["fatal"]) for x in msgs] == [("error", "shutting_down", True)]
    msgs = await second.until_closed()
    assert [(x["code"], x.get("request")) for x in msgs if x["type"] == "error"] == [
        ("shutting_down", "other"),
        ("shutting_down", None),
    ]
    # Status 0: the model thread stopped, and so did the native thread pool (joined as the process exits;
    # a thread left running there aborts the exit with "terminate called ...").
    assert daemon.process.returncode == 0 and not daemon.socket.exists()
    log = daemon.log()
    assert "SIGTERM: shutting down" in log and "Traceback" not in log and "terminate" not in log


async def test_a_frozen_model_thread_cannot_hang_shutdown(start_daemon: Callable[..., DaemonProcess]) -> None:
    daemon = start_daemon(faults=("freeze_encode", "fast_stop"))
    client = await RawClient.connect(daemon.socket)
    await client.open("s")
    audio = np.zeros(24_000, "<f4").tobytes()
    await client.send(type="context.add", session="s", speaker=0, text="", audio=audio, rate=24_000,
                      format="pcm_f32le")  # fmt: skip
    with trio.fail_after(20):
        while not (daemon.fault_dir / "encode.entered").exists():
            await trio.sleep(0.01)
    other = await RawClient.connect(daemon.socket)  # the loop still serves while the model thread is stuck
    await other.ping()
    started = time.monotonic()
    code = await trio.to_thread.run_sync(daemon.terminate)
    assert time.monotonic() - started < 10  # 1 s for the thread (fast_stop), then out
    assert code == 1, daemon.log()
    assert "the model thread did not stop within 1 s" in daemon.log()
    msgs = await client.until_closed()
    assert [(x["type"], x["code"], x["fatal"]) for x in msgs] == [("error", "shutting_down", True)]
    assert not daemon.socket.exists()


@pytest.mark.parametrize("gap", [0.0, 0.02, 0.2])
async def test_a_second_ctrl_c_during_shutdown_changes_nothing(
    start_daemon: Callable[..., DaemonProcess], gap: float
) -> None:
    """Ctrl-C twice (or `timeout`, which signals the child and then its group): the shutdown in progress goes
    on, the exit is still 0; neither an interrupted stop (130) nor the native pool's abort ("terminate called")."""
    daemon = start_daemon()
    client = await RawClient.connect(daemon.socket)
    await client.open("a")
    await client.send(**speak("a", "long", max_frames=200))
    await client.until(lambda x: x["type"] == "audio.chunk")  # a frame in flight on the model thread
    daemon.process.send_signal(signal.SIGINT)
    await trio.sleep(gap)
    daemon.process.send_signal(signal.SIGINT)
    code = await trio.to_thread.run_sync(lambda: daemon.process.wait(30))
    log = daemon.log()
    assert code == 0, log
    assert "stopped serving" in log and "Traceback" not in log and "terminate called" not in log, log
    assert not daemon.socket.exists()
