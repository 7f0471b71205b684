"""Issue 16, items 3 and 6: what a client sends is refused up front, each time with an `error` saying why.

Ids are at most 256 bytes (a protocol rule: a reply echoes them, so none can outgrow the message cap); a body
holds at most 256 arrays and maps; every speak field is range-checked before anything starts, and `internal`
is kept for the daemon's own faults.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from adversarial.hostile import DaemonProcess, RawClient, ends, frame, speak


async def fatal(client: RawClient) -> dict[str, object]:
    """The connection's last message: a fatal error, then the end of the stream."""
    msgs = await client.until_closed()
    assert msgs and msgs[-1]["type"] == "error" and msgs[-1]["fatal"], msgs
    return msgs[-1]


async def test_one_request_id_in_two_sessions_is_refused_not_fatal(daemon: DaemonProcess) -> None:
    client = await RawClient.connect(daemon.socket)
    await client.open("a")
    await client.open("b")
    await client.send_raw(frame(speak("a", "r", max_frames=20)) + frame(speak("b", "r", max_frames=20)))
    error = await client.until(lambda x: x["type"] == "error")
    assert error[-1]["code"] == "duplicate_request" and error[-1]["session"] == "b" and not error[-1]["fatal"]
    assert "in flight on this connection" in error[-1]["message"]
    msgs = await client.until(ends("r"))
    assert msgs[-1]["type"] == "audio.end" and msgs[-1]["frames"] == 20  # session a's reply, whole
    await client.send(**speak("b", "r", max_frames=2))  # free again once it ended
    assert (await client.until(ends("r")))[-1]["type"] == "audio.end"


@pytest.mark.parametrize(
    ("message", "field"),
    [
        ({"type": "session.open", "session": "s" * 257}, "session"),
        ({"type": "session.open", "session": "é" * 129}, "session"),  # 258 bytes
        ({"type": "session.open", "session": "s" * 8_000_000}, "session"),  # used to be echoed past the cap
        (speak("s", "r" * 1_000_000), "request"),
        ({"type": "cancel", "request": "r" * 300}, "request"),
    ],
)
async def test_ids_longer_than_256_bytes_are_refused(daemon: DaemonProcess, message: dict[str, object],
                                                     field: str) -> None:  # fmt: skip
    client = await RawClient.connect(daemon.socket)
    await client.send(**message)
    error = await fatal(client)
    assert error["code"] == "bad_field" and f"'{field}'" in str(error["message"])
    assert "at most 256 bytes" in str(error["message"]) and len(str(error["message"])) < 200


async def test_a_long_client_name_is_refused_in_the_hello(daemon: DaemonProcess) -> None:
    client = await RawClient.connect(daemon.socket, hello=False)
    await client.send(type="hello", protocol=[1], client="c" * 300)
    error = await fatal(client)
    assert error["code"] == "bad_field" and "'client'" in str(error["message"])


@pytest.mark.parametrize("where", ["protocol", "future"])  # a known field, and an unknown one (ignored otherwise)
async def test_deep_nesting_is_malformed_not_a_crash(daemon: DaemonProcess, where: str) -> None:
    nested: object = 1
    for _ in range(1000):
        nested = [nested]
    client = await RawClient.connect(daemon.socket, hello=False)
    await client.send(**{"type": "hello", "protocol": [1], "client": "c", where: nested})
    error = await fatal(client)
    assert error["code"] == "malformed" and "more than 256 arrays and maps" in str(error["message"])
    again = await RawClient.connect(daemon.socket)  # and the daemon serves on
    await again.ping()


async def test_many_small_containers_are_malformed(daemon: DaemonProcess) -> None:
    client = await RawClient.connect(daemon.socket)
    await client.send(type="ping", nonce=1, future=[[]] * 200 + [[[]] * 200])
    assert (await fatal(client))["code"] == "malformed"


async def test_out_of_memory_ends_the_connection_saying_so(start_daemon: Callable[..., DaemonProcess]) -> None:
    daemon = start_daemon(faults=("memory_error",))
    other = await RawClient.connect(daemon.socket)
    await other.open("o")
    await other.send(**speak("o", "o", max_frames=30))
    await other.until(lambda x: x["type"] == "audio.chunk")
    client = await RawClient.connect(daemon.socket)
    await client.send(type="ping", nonce=1, note="__memory_error__")
    error = await fatal(client)
    assert error["code"] == "out_of_memory" and "ran out of memory" in str(error["message"])
    assert (await other.until(ends("o")))[-1]["frames"] == 30  # the other client never noticed
    daemon.check_clean_exit()


BAD_SPEAK = [
    ("top_k", 2**31, "top_k"),  # the kernels' int32: used to fail after audio.start as internal
    ("top_k", -1, "top_k"),
    ("top_p", 1e-46, "top_p"),  # 0 as a float32: used to fail after audio.start as internal
    ("top_p", 0.0, "top_p"),
    ("top_p", 1.5, "top_p"),
    ("temperature", 1e-46, "temperature"),
    ("temperature", 10.5, "temperature"),
    ("temperature", -1.0, "temperature"),
    ("min_p", 1 - 1e-12, "min_p"),  # 1 as a float32
    ("min_p", -0.5, "min_p"),
    ("seed", 2**32, "seed"),
    ("seed", -1, "seed"),
    ("max_frames", 0, "max_frames"),
    ("max_frames", 2**63, "max_frames"),
    ("max_frames", 2049, "max_frames"),  # longer than random:tiny's window of 2048
    ("speaker", 65_536, "speaker"),
    ("text", "x" * 8193, "text"),
    ("text", "é" * 4097, "text"),  # 8194 bytes
]


@pytest.mark.parametrize(("name", "value", "field"), BAD_SPEAK)
async def test_a_speak_out_of_range_is_refused_before_it_starts(daemon: DaemonProcess, name: str, value: object,
                                                                 field: str) -> None:  # fmt: skip
    client = await RawClient.connect(daemon.socket)
    await client.open("s")
    await client.send(**{**speak("s", "bad"), name: value})
    first = await client.recv()  # the first and only message about the request: nothing was started
    assert first is not None and first["type"] == "error" and first["request"] == "bad", first
    assert first["code"] == "invalid_params" and field in str(first["message"]) and not first["fatal"]
    await client.ping()
    await client.send(**speak("s", "good", max_frames=2))
    assert (await client.until(ends("good")))[-1]["type"] == "audio.end"


async def test_an_engine_fault_is_internal_and_logged_not_blamed_on_the_client(
    start_daemon: Callable[..., DaemonProcess],
) -> None:
    daemon = start_daemon(faults=("engine_value_error",))
    client = await RawClient.connect(daemon.socket)
    await client.open("s")
    await client.send(**{**speak("s", "r"), "text": "__engine_bug__"})
    error = await client.recv()
    assert error is not None and error["type"] == "error" and error["code"] == "internal", error
    assert "ValueError: an engine fault" in str(error["message"]) and error["request"] == "r"
    await client.send(**speak("s", "ok", max_frames=2))  # the session is fine
    assert (await client.until(ends("ok")))[-1]["type"] == "audio.end"
    daemon.check_clean_exit(allow_tracebacks=True)
    log = daemon.log()
    assert "command failed (a bug)" in log and "Traceback" in log and "ValueError: an engine fault" in log
