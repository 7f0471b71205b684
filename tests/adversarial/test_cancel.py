"""Issue 16, item 2: a cancel is never lost, and every cancel gets exactly one answer.

The rule (docs/protocol.md, "cancel"): a cancel read while its request is in flight (from the moment its
`speak` was read, through its wait for the session and its prefill) is answered `cancelled` after the
request's `audio.end`; one read after the `audio.end` went out is answered `no_such_request`. The races are
made deterministic by sending the messages in one write: the daemon reads them together.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import trio

from adversarial.hostile import DaemonProcess, Msg, RawClient, about, frame, speak


def kinds(msgs: list[Msg]) -> list[str]:
    return [x["type"] for x in msgs]


async def test_a_cancel_right_behind_its_speak_cancels_it(daemon: DaemonProcess) -> None:
    client = await RawClient.connect(daemon.socket)
    await client.open("s")
    await client.send_raw(frame(speak("s", "r", max_frames=200)) + frame({"type": "cancel", "request": "r"}))
    msgs = await client.until(lambda x: x["type"] == "cancelled")
    assert kinds(msgs) == ["audio.start", "audio.end", "cancelled"], msgs  # no audio at all
    assert msgs[1]["reason"] == "cancelled" and msgs[1]["frames"] == 0 and msgs[2]["frames_sent"] == 0


async def test_a_speak_cancelled_while_it_waits_for_its_session_is_never_prefilled(daemon: DaemonProcess) -> None:
    client = await RawClient.connect(daemon.socket)
    await client.open("s")
    audio = np.zeros(24_000 * 4, "<f4").tobytes()  # 4 s to encode first: the speak waits behind it
    add = {"type": "context.add", "session": "s", "speaker": 1, "text": "", "audio": audio, "rate": 24_000,
           "format": "pcm_f32le"}  # fmt: skip
    await client.send_raw(frame(add) + frame(speak("s", "r")) + frame({"type": "cancel", "request": "r"}))
    msgs = await client.until(lambda x: x["type"] == "cancelled")
    assert kinds(msgs) == ["context.added", "audio.start", "audio.end", "cancelled"], msgs
    assert msgs[2]["reason"] == "cancelled" and msgs[2]["frames"] == 0
    rows = msgs[0]["rows"]
    await client.send(type="context.add", session="s", speaker=0, text="")
    after = await client.recv()
    assert after is not None and after["rows"] == rows + 5  # BOS "[0]" EOS: the cancelled reply left no rows


async def test_a_second_cancel_is_answered_the_same_way_after_the_end(daemon: DaemonProcess) -> None:
    client = await RawClient.connect(daemon.socket)
    await client.open("s")
    cancel = frame({"type": "cancel", "request": "r"})
    await client.send_raw(frame(speak("s", "r", max_frames=200)) + cancel + cancel)
    msgs = await client.until(lambda x: x["type"] == "cancelled")
    msgs.append(await client.recv())  # type: ignore[arg-type]
    assert kinds(msgs) == ["audio.start", "audio.end", "cancelled", "cancelled"], msgs
    assert msgs[2] == msgs[3]


async def test_a_cancel_mid_stream_then_another_after_it(daemon: DaemonProcess) -> None:
    client = await RawClient.connect(daemon.socket)
    await client.open("s")
    await client.send(**speak("s", "r", max_frames=200))
    before = await client.until(lambda x: x["type"] == "audio.chunk" and x["seq"] == 2)
    await client.send(type="cancel", request="r")
    rest = await client.until(lambda x: x["type"] == "cancelled")
    end = next(x for x in rest if x["type"] == "audio.end")
    chunks = [x for x in before + rest if x["type"] == "audio.chunk"]
    assert end["reason"] == "cancelled" and end["frames"] == len(chunks) == rest[-1]["frames_sent"] < 200
    assert kinds(rest)[-2:] == ["audio.end", "cancelled"]
    await client.send(type="cancel", request="r")  # its audio.end went out: nothing to cancel
    error = await client.recv()
    assert error is not None and error["code"] == "no_such_request" and error["request"] == "r" and not error["fatal"]


async def test_a_cancel_after_the_natural_end_is_no_such_request(daemon: DaemonProcess) -> None:
    client = await RawClient.connect(daemon.socket)
    await client.open("s")
    await client.send(**speak("s", "r", max_frames=3))
    msgs = await client.until(lambda x: x["type"] == "audio.end")
    assert msgs[-1]["reason"] == "max_length" and msgs[-1]["frames"] == 3
    await client.send(type="cancel", request="r")
    error = await client.recv()
    assert error is not None and error["type"] == "error" and error["code"] == "no_such_request"
    await client.send(type="cancel", request="never-sent")
    error = await client.recv()
    assert error is not None and error["code"] == "no_such_request" and error["request"] == "never-sent"


async def test_a_cancel_racing_the_natural_end_gets_one_answer_after_it(daemon: DaemonProcess) -> None:
    """Whichever way the race goes, the cancel is answered once, after the request's audio.end."""
    client = await RawClient.connect(daemon.socket)
    await client.open("s")
    for i in range(8):
        request = f"r{i}"
        await client.send(**speak("s", request, max_frames=1 + i % 3))
        await client.until(lambda x, request=request: x["type"] == "audio.chunk" and x["request"] == request)
        await client.send(type="cancel", request=request)
        msgs = await client.until(lambda x: x["type"] in ("cancelled", "error"))
        await client.ping(i)  # nothing else comes for that request
        mine = [x for x in msgs if about(request)(x)]
        assert kinds(mine)[-2] == "audio.end", mine
        assert kinds(mine)[-1] == "cancelled" or mine[-1]["code"] == "no_such_request", mine


async def test_the_reader_never_waits_for_a_turn(start_daemon: Callable[..., DaemonProcess]) -> None:
    """Commands queued behind a slow one (held by the test) wait for their turn in their own tasks: the
    connection's pings and cancels are answered meanwhile, and the answers still come in order."""
    daemon = start_daemon(faults=("gate_resample",))
    client = await RawClient.connect(daemon.socket)
    await client.open("s")
    add = {"type": "context.add", "session": "s", "speaker": 1, "text": "", "rate": 16_000, "format": "pcm_f32le",
           "audio": np.zeros(16_000, "<f4").tobytes()}  # fmt: skip
    clear = {"type": "context.clear", "session": "s"}
    await client.send_raw(
        frame(add) + frame(speak("s", "r")) + frame(clear) + frame({"type": "cancel", "request": "r"})
    )
    with trio.fail_after(20):
        while not (daemon.fault_dir / "resample.entered").exists():
            await trio.sleep(0.01)
    await client.send(type="ping", nonce=5)  # read only once the three commands behind the held one were
    assert await client.recv() == {"type": "pong", "nonce": 5}
    (daemon.fault_dir / "resample.release").touch()
    msgs = await client.until(lambda x: x["type"] == "context.cleared")
    msgs += [await client.recv()] if not any(x["type"] == "cancelled" for x in msgs) else []  # type: ignore[list-item]
    assert [x["type"] for x in msgs if x["type"] != "cancelled"] == ["context.added", "audio.start", "audio.end",
                                                                      "context.cleared"]  # fmt: skip
    assert [x["type"] for x in msgs].index("cancelled") > [x["type"] for x in msgs].index("audio.end")
    daemon.check_clean_exit()
