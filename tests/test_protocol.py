"""Protocol v1 without I/O: two Connections (client and server) talking through bytes in memory."""

from __future__ import annotations

import contextlib
import dataclasses
import struct
from collections.abc import Iterator
from typing import Any

import msgpack
import numpy as np
import pytest

from csmd.protocol import (
    DEFAULT_MAX_MESSAGE,
    FORMATS,
    MESSAGE_TYPES,
    AddContext,
    AudioChunk,
    AudioEnd,
    AudioStart,
    Cancel,
    Cancelled,
    ClearContext,
    CloseSession,
    Connection,
    ConnectionClosed,
    ContextAdded,
    ContextCleared,
    ContextTrimmed,
    Error,
    Hello,
    Message,
    OpenSession,
    Ping,
    Pong,
    ProtocolError,
    Role,
    SessionClosed,
    SessionOpened,
    Speak,
    State,
    TrimContext,
    Welcome,
    decode_pcm,
    encode_pcm,
    from_wire,
    to_wire,
)

PCM = encode_pcm(np.linspace(-1.0, 1.0, 1920, dtype=np.float32), "pcm_s16le")

HELLO = Hello(protocol=(1,), client="test-client")
WELCOME = Welcome(
    protocol=1,
    server="fake-csmd",
    sample_rate=24000,
    frame_samples=1920,
    formats=FORMATS,
    model="tiny",
    watermark=True,
    max_message=DEFAULT_MAX_MESSAGE,
)

# Every message type, in an order that is a valid conversation.
CONVERSATION: list[Message] = [
    HELLO,
    Ping(nonce=7),  # allowed while the handshake is in flight
    Pong(nonce=7),
    WELCOME,
    OpenSession(session="s1"),
    SessionOpened(session="s1"),
    AddContext(session="s1", speaker=0, text="hi", audio=PCM, rate=24000, format="pcm_s16le", pinned=True),
    AddContext(session="s1", speaker=1, text="text only"),
    ContextAdded(session="s1", frames=1, rows=12),
    ClearContext(session="s1"),
    ContextCleared(session="s1"),
    TrimContext(session="s1", request="r1", frames=3, text="Hello"),
    ContextTrimmed(session="s1", rows=12),
    Speak(
        session="s1",
        request="r1",
        text="Hello.",
        speaker=0,
        temperature=0.9,
        top_k=50,
        top_p=0.95,
        min_p=0.05,
        seed=1234,
        max_frames=100,
        format="pcm_s16le",
    ),
    Speak(session="s1", request="r2", text="Minimal.", speaker=1),
    AudioStart(request="r1", session="s1", sample_rate=24000, format="pcm_s16le", frame_samples=1920, seed=1234),
    AudioChunk(request="r1", seq=0, frame=0, pcm=PCM),
    AudioChunk(request="r1", seq=1, frame=1, pcm=PCM),
    Cancel(request="r1"),
    AudioEnd(request="r1", reason="cancelled", frames=2, total_ms=170.5, first_audio_ms=80.25),
    Cancelled(request="r1", frames_sent=2),
    AudioStart(request="r2", session="s1", sample_rate=24000, format="pcm_f32le", frame_samples=1920, seed=-5),
    Error(code="internal", message="decoder failed", fatal=False, request="r2", session="s1"),
    AudioEnd(request="r2", reason="error", frames=0, total_ms=3.0),
    Error(code="unknown_session", message="no session 'x'", fatal=False, session="x"),
    CloseSession(session="s1"),
    SessionClosed(session="s1"),
    Error(code="internal", message="shutting down", fatal=True),
]


def frame(obj: Any) -> bytes:
    """Frame any msgpack value, valid message or not."""
    body = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


def raw(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def pair(**server_kwargs: Any) -> tuple[Connection, Connection]:
    """A client and a server Connection after a completed handshake."""
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER, **server_kwargs)
    assert server.receive_data(client.send(HELLO)) == [HELLO]
    assert client.receive_data(server.send(WELCOME)) == [WELCOME]
    return client, server


def transfer(msg: Message, client: Connection, server: Connection) -> list[Any]:
    sender, receiver = (client, server) if msg.sender is Role.CLIENT else (server, client)
    return receiver.receive_data(sender.send(msg))


@contextlib.contextmanager
def raises(code: str, field: str | None = None) -> Iterator[pytest.ExceptionInfo[ProtocolError]]:
    """pytest.raises for a ProtocolError with this code (and field)."""
    with pytest.raises(ProtocolError) as info:
        yield info
    assert info.value.code == code, info.value
    if field is not None:
        assert info.value.field == field, info.value


# ---- round trips ----


def test_the_conversation_covers_every_message_type() -> None:
    assert {type(m).type for m in CONVERSATION} == set(MESSAGE_TYPES)


@pytest.mark.parametrize("msg", CONVERSATION, ids=lambda m: type(m).__name__)
def test_to_wire_from_wire_round_trip(msg: Message) -> None:
    wire = to_wire(msg)
    assert wire["type"] == msg.type
    assert from_wire(wire) == msg
    assert from_wire(msgpack.unpackb(msgpack.packb(wire, use_bin_type=True))) == msg


def test_conversation_through_two_connections() -> None:
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    for msg in CONVERSATION:
        assert transfer(msg, client, server) == [msg]
    assert client.state is State.CLOSED and server.state is State.CLOSED  # the last message is a fatal error
    assert client.version == server.version == 1
    assert client.peer_max_message == DEFAULT_MAX_MESSAGE


def _server_bytes() -> tuple[list[Message], bytes]:
    """Everything the server says in CONVERSATION, as one byte string, with the client primed to receive it."""
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    sent, data = [], b""
    for msg in CONVERSATION:
        sender, receiver = (client, server) if msg.sender is Role.CLIENT else (server, client)
        wire = sender.send(msg)
        receiver.receive_data(wire)
        if msg.sender is Role.SERVER:
            data += wire
            sent.append(msg)
    return sent, data


def _fresh_client_after_hello() -> Connection:
    client = Connection(Role.CLIENT)
    client.send(HELLO)
    return client


def test_byte_by_byte() -> None:
    sent, data = _server_bytes()
    client = _fresh_client_after_hello()
    received = []
    for i in range(len(data)):
        received += client.receive_data(data[i : i + 1])
        assert client.buffered <= 4 + DEFAULT_MAX_MESSAGE
    assert received == sent


def test_many_messages_in_one_chunk() -> None:
    sent, data = _server_bytes()
    client = _fresh_client_after_hello()
    assert client.receive_data(data) == sent
    assert client.buffered == 0


@pytest.mark.parametrize("size", [2, 3, 5, 7, 100, 4000])
def test_odd_chunk_sizes(size: int) -> None:
    sent, data = _server_bytes()
    client = _fresh_client_after_hello()
    received = []
    for i in range(0, len(data), size):
        received += client.receive_data(data[i : i + size])
    assert received == sent


def test_buffer_keeps_only_the_partial_message() -> None:
    client, server = pair()
    one = client.send(Ping(nonce=1))
    two = client.send(Ping(nonce=2))
    assert server.receive_data(one + two[:3]) == [Ping(nonce=1)]
    assert server.buffered == 3
    assert server.receive_data(two[3:]) == [Ping(nonce=2)]
    assert server.buffered == 0


def test_repr_shows_binary_sizes() -> None:
    assert repr(AudioChunk(request="r", seq=0, frame=0, pcm=b"\0" * 10)) == (
        "AudioChunk(request='r', seq=0, frame=0, pcm=<bin 10 bytes>)"
    )


# ---- handshake ----


def test_speak_before_hello_is_out_of_order() -> None:
    server = Connection(Role.SERVER)
    with raises("out_of_order"):
        server.receive_data(frame(to_wire(Speak(session="s", request="r", text="x", speaker=0))))
    assert server.state is State.ERROR


def test_client_cannot_send_anything_before_hello() -> None:
    client = Connection(Role.CLIENT)
    for msg in (Speak(session="s", request="r", text="x", speaker=0), Ping(nonce=1)):
        with raises("out_of_order"):
            client.send(msg)
    assert client.state is State.AWAIT_HELLO  # a refused send changes nothing
    client.send(HELLO)


def test_commands_wait_for_welcome() -> None:
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    server.receive_data(client.send(HELLO))
    with raises("out_of_order"):
        client.send(OpenSession(session="s"))
    with raises("out_of_order"):
        server.send(SessionOpened(session="s"))
    with raises("out_of_order"):
        server.send(Error(code="busy", message="not yet", fatal=False))  # before welcome, errors are fatal
    with raises("out_of_order"):
        server.receive_data(frame(to_wire(OpenSession(session="s"))))


def test_second_hello_is_out_of_order() -> None:
    client, server = pair()
    with raises("out_of_order"):
        client.send(HELLO)
    with raises("out_of_order"):
        server.receive_data(frame(to_wire(HELLO)))


def test_second_welcome_is_out_of_order() -> None:
    client, server = pair()
    with raises("out_of_order"):
        server.send(WELCOME)
    with raises("out_of_order"):
        client.receive_data(frame(to_wire(WELCOME)))


def test_unsupported_version_gets_a_fatal_error() -> None:
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    with raises("unsupported_version"):
        server.receive_data(client.send(Hello(protocol=(2, 3), client="future")))
    assert server.state is State.ERROR
    with raises("out_of_order"):  # the connection stays failed
        server.receive_data(b"")
    error = Error.from_protocol_error(ProtocolError("unsupported_version", "client speaks [2, 3]"))
    assert client.receive_data(server.send(error)) == [error]
    assert client.state is State.CLOSED and server.state is State.CLOSED
    with raises("out_of_order"):
        server.send(error)  # only one


def test_server_picks_the_highest_common_version() -> None:
    server = Connection(Role.SERVER, versions=(1, 2))
    server.receive_data(frame(to_wire(Hello(protocol=(1, 2, 3), client="c"))))
    assert server.version == 2
    with raises("unsupported_version"):
        server.send(dataclasses.replace(WELCOME, protocol=3))


def test_client_refuses_a_welcome_for_a_version_it_did_not_offer() -> None:
    client = Connection(Role.CLIENT)
    client.send(HELLO)
    with raises("unsupported_version"):
        client.receive_data(frame({**to_wire(WELCOME), "protocol": 2}))


def test_server_may_refuse_before_hello() -> None:
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    error = Error(code="forbidden", message="not your daemon", fatal=True)
    assert client.receive_data(server.send(error)) == [error]
    assert client.state is State.CLOSED
    with raises("out_of_order"):
        server.send(Error(code="busy", message="x", fatal=False))


def test_ping_pong_in_every_open_state() -> None:
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    with raises("out_of_order"):
        client.send(Ping(nonce=1))  # hello first
    server.receive_data(client.send(HELLO))
    assert transfer(Ping(nonce=1), client, server) == [Ping(nonce=1)]
    assert transfer(Pong(nonce=1), client, server) == [Pong(nonce=1)]
    client.receive_data(server.send(WELCOME))
    assert transfer(Ping(nonce=-(2**63)), client, server) == [Ping(nonce=-(2**63))]
    assert transfer(Pong(nonce=2**64 - 1), client, server) == [Pong(nonce=2**64 - 1)]


# ---- direction ----


def test_wrong_direction_on_send() -> None:
    client, server = pair()
    with raises("wrong_direction"):
        server.send(Speak(session="s", request="r", text="x", speaker=0))
    with raises("wrong_direction"):
        client.send(SessionOpened(session="s"))
    with raises("wrong_direction"):
        Connection(Role.SERVER).send(HELLO)
    assert client.state is State.READY and server.state is State.READY


def test_wrong_direction_on_receive() -> None:
    client, server = pair()
    with raises("wrong_direction"):
        client.receive_data(frame(to_wire(Speak(session="s", request="r", text="x", speaker=0))))
    with raises("wrong_direction"):
        server.receive_data(frame(to_wire(Pong(nonce=1))))
    with raises("wrong_direction"):
        Connection(Role.SERVER).receive_data(frame(to_wire(WELCOME)))


# ---- malformed input ----


@pytest.mark.parametrize(
    "data",
    [
        raw(b"\xc1"),  # 0xc1 is never used in msgpack
        raw(b""),  # an empty body
        raw(b"\x92\x01"),  # an array that ends early
        raw(msgpack.packb({"type": "ping", "nonce": 1}) + b"\x00"),  # trailing bytes inside the body
        raw(b"\xa2\xff\xfe"),  # a str that is not UTF-8
        frame([1, 2, 3]),  # a list instead of a map
        frame("ping"),
        frame({"nonce": 1}),  # no type
        frame({"type": 1, "nonce": 1}),  # type not a str
        frame({"type": b"ping", "nonce": 1}),  # type as bin
        frame({"type": None}),
        raw(msgpack.packb({1: 2, "type": "ping"}, strict_types=False)),  # a non-str key
        frame({b"type": "ping", "nonce": 1}),  # a bin key
    ],
)
def test_malformed(data: bytes) -> None:
    _, server = pair()
    with raises("malformed"):
        server.receive_data(data)
    assert server.state is State.ERROR


def test_unknown_type() -> None:
    _, server = pair()
    with raises("unknown_type"):
        server.receive_data(frame({"type": "teleport", "where": "mars"}))


def test_unknown_fields_are_ignored() -> None:
    _, server = pair()
    assert server.receive_data(frame({"type": "ping", "nonce": 3, "future": {"x": [1]}})) == [Ping(nonce=3)]


# ---- field validation ----

SPEAK = {"type": "speak", "session": "s", "request": "r", "text": "x", "speaker": 0}
CHUNK = {"type": "audio.chunk", "request": "r", "seq": 0, "frame": 0, "pcm": b"\0\0"}
CONTEXT = {"type": "context.add", "session": "s", "speaker": 0, "text": "t"}


@pytest.mark.parametrize(
    ("wire", "field"),
    [
        ({**SPEAK, "speaker": "0"}, "speaker"),  # str for int
        ({**SPEAK, "speaker": True}, "speaker"),  # bool is not an int
        ({**SPEAK, "speaker": 1.0}, "speaker"),  # float is not an int
        ({**SPEAK, "speaker": -1}, "speaker"),  # protocol-level range
        ({**SPEAK, "session": 5}, "session"),  # int for str
        ({**SPEAK, "session": ""}, "session"),  # ids are non-empty
        ({**SPEAK, "request": b"r"}, "request"),  # bin for str
        ({k: v for k, v in SPEAK.items() if k != "text"}, "text"),  # missing
        ({**SPEAK, "text": None}, "text"),  # nil for a required field
        ({**SPEAK, "format": "mp3"}, "format"),  # bad enum
        ({**SPEAK, "temperature": "hot"}, "temperature"),
        ({**SPEAK, "temperature": True}, "temperature"),
        ({**SPEAK, "temperature": float("nan")}, "temperature"),
        ({**SPEAK, "top_k": 5.5}, "top_k"),
        ({**CHUNK, "seq": -1}, "seq"),
        ({**CHUNK, "pcm": "abc"}, "pcm"),
        ({**CHUNK, "pcm": [0, 0]}, "pcm"),
        ({**CONTEXT, "audio": b"\0\0", "format": "pcm_s16le"}, "audio"),  # audio without rate
        ({**CONTEXT, "rate": 24000}, "audio"),  # rate without audio
        ({**CONTEXT, "audio": b"\0\0\0", "rate": 24000, "format": "pcm_s16le"}, "audio"),  # half a sample
        ({**CONTEXT, "audio": b"\0\0", "rate": 0, "format": "pcm_s16le"}, "rate"),  # rate > 0
        ({**CONTEXT, "pinned": 1}, "pinned"),
        ({"type": "hello", "protocol": [], "client": "c"}, "protocol"),
        ({"type": "hello", "protocol": 1, "client": "c"}, "protocol"),
        ({"type": "hello", "protocol": [1, "2"], "client": "c"}, "protocol[1]"),
        ({**to_wire(WELCOME), "formats": ["pcm_s16le", "opus"]}, "formats[1]"),
        ({**to_wire(WELCOME), "watermark": 0}, "watermark"),
        ({**to_wire(WELCOME), "sample_rate": 0}, "sample_rate"),
        ({"type": "audio.end", "request": "r", "reason": "bored", "frames": 0, "total_ms": 1.0}, "reason"),
        ({"type": "audio.end", "request": "r", "reason": "eos", "frames": 0, "total_ms": -1.0}, "total_ms"),
        ({"type": "error", "code": "", "message": "m", "fatal": False}, "code"),
        ({"type": "error", "code": "x", "message": "m", "fatal": "yes"}, "fatal"),
        ({**SPEAK, "request": "r" * 257}, "request"),  # ids are at most 256 bytes of UTF-8
        ({**SPEAK, "session": "é" * 129}, "session"),  # 258 bytes in 129 characters
        ({"type": "hello", "protocol": [1], "client": "c" * 257}, "client"),
        ({"type": "hello", "protocol": [[[[[[1]]]]]], "client": "c"}, "protocol[0]"),  # nested: named, shown short
    ],
)
def test_bad_field(wire: dict[str, Any], field: str) -> None:
    with raises("bad_field", field):
        from_wire(wire)
    receiver = pair()[1] if MESSAGE_TYPES[wire["type"]].sender is Role.CLIENT else pair()[0]
    with raises("bad_field", field):
        receiver.receive_data(frame(wire))


def test_ids_of_256_bytes_are_fine() -> None:
    client, server = pair()
    speak = Speak(session="s" * 256, request="é" * 128, text="x", speaker=0)
    assert transfer(speak, client, server) == [speak]


def test_deep_nesting_and_many_containers_are_refused_before_they_cost_memory() -> None:
    _, server = pair()
    deep: Any = 1
    for _ in range(1000):  # as deep as msgpack itself decodes; a plain repr() of it would recurse too deep
        deep = [deep]
    with raises("malformed") as info:
        server.receive_data(frame({"type": "ping", "nonce": 1, "future": deep}))
    assert "more than 256 arrays and maps" in info.value.message
    _, server = pair()
    with raises("malformed") as info:  # 40 000 empty arrays in 40 kB: ~2.5 MB of Python lists if decoded
        server.receive_data(frame({"type": "ping", "nonce": 1, "future": [[[]] * 200] * 200}))
    assert "more than 256 arrays and maps" in info.value.message
    _, server = pair()
    with raises("malformed") as info:
        server.receive_data(frame({"type": "ping", "nonce": 1, "future": list(range(257))}))
    assert "exceeds max_array_len" in info.value.message
    _, server = pair()
    nested = {"type": "ping", "nonce": 1, "future": [[i] for i in range(200)]}  # 202 containers: fine
    assert server.receive_data(frame(nested)) == [Ping(nonce=1)]


def test_normalizations() -> None:
    speak = from_wire({**SPEAK, "temperature": 1, "top_p": None, "seed": 2**64 - 1})
    assert isinstance(speak, Speak)
    assert speak.temperature == 1.0 and isinstance(speak.temperature, float)  # ints widen to float
    assert speak.top_p is None  # nil means absent
    assert speak.seed == 2**64 - 1
    assert "top_p" not in to_wire(speak)
    hello = Hello(protocol=[1, 2], client="c")  # type: ignore[arg-type]  # lists are accepted, stored as tuples
    assert hello.protocol == (1, 2) and hash(hello) == hash(Hello(protocol=(1, 2), client="c"))
    assert to_wire(hello)["protocol"] == [1, 2]
    context = from_wire(CONTEXT)
    assert isinstance(context, AddContext) and context.pinned is False


def test_construction_validates_too() -> None:
    with raises("bad_field", "seed"):
        Speak(session="s", request="r", text="x", speaker=0, seed=2**64)  # does not fit msgpack
    with raises("bad_field", "text"):
        Speak(session="s", request="r", text="\ud800", speaker=0)  # not encodable as UTF-8
    with raises("bad_field", "temperature"):
        Speak(session="s", request="r", text="x", speaker=0, temperature=10**400)


# ---- size cap ----


def test_oversized_length_prefix_is_refused_from_the_header_alone() -> None:
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER, max_message=100)
    server.receive_data(client.send(HELLO))
    assert server.receive_data(struct.pack(">I", 100)) == []  # at the cap: fine, waiting for the body
    server2 = Connection(Role.SERVER, max_message=100)
    with raises("too_large"):
        server2.receive_data(struct.pack(">I", 101))
    with raises("too_large"):
        Connection(Role.SERVER).receive_data(b"\xff\xff\xff\xff")


def test_oversized_header_split_across_calls() -> None:
    server = Connection(Role.SERVER, max_message=100)
    assert server.receive_data(b"\x00\x00") == []
    with raises("too_large"):
        server.receive_data(b"\x01\x00")


def test_send_refuses_oversized_messages_and_respects_the_servers_cap() -> None:
    client, server = Connection(Role.CLIENT, max_message=10_000), Connection(Role.SERVER, max_message=5_000)
    server.receive_data(client.send(HELLO))
    client.receive_data(server.send(dataclasses.replace(WELCOME, max_message=5_000)))
    big = AddContext(session="s", speaker=0, text="t", audio=b"\0" * 6_000, rate=24000, format="pcm_s16le")
    with raises("too_large"):
        client.send(big)
    assert client.state is State.READY
    transfer(_start(), client, server)
    with raises("too_large"):
        server.send(AudioChunk(request="r", seq=0, frame=0, pcm=b"\0" * 6_000))
    assert server.open_streams == {"r"} and transfer(_chunk(0), client, server) == [_chunk(0)]  # nothing changed


# ---- end of stream and failure ----


def test_clean_eof() -> None:
    client, server = pair()
    assert server.receive_data(b"") == [ConnectionClosed()]
    assert server.state is State.CLOSED
    assert server.receive_data(b"") == [ConnectionClosed()]
    with raises("out_of_order"):
        server.send(Pong(nonce=1))
    with raises("out_of_order"):
        server.receive_data(client.send(Ping(nonce=1)))


def test_eof_inside_a_message_is_truncated() -> None:
    client, server = pair()
    data = client.send(Ping(nonce=1))
    for cut in (1, 4, len(data) - 1):
        _, server = pair()
        assert server.receive_data(data[:cut]) == []
        with raises("truncated"):
            server.receive_data(b"")


def test_a_failed_connection_refuses_further_use() -> None:
    client, server = pair()
    with raises("malformed"):
        server.receive_data(raw(b"\xc1"))
    with raises("out_of_order"):
        server.receive_data(client.send(Ping(nonce=1)))
    with raises("out_of_order"):
        server.send(Pong(nonce=1))
    with raises("out_of_order"):
        server.send(Error(code="busy", message="x", fatal=False))
    server.send(Error(code="malformed", message="bad bytes", fatal=True))  # the one thing left to say
    assert server.state is State.CLOSED
    with raises("out_of_order"):
        server.send(Error(code="malformed", message="again", fatal=True))


def test_a_client_that_received_garbage_can_send_nothing() -> None:
    client, _ = pair()
    with raises("malformed"):
        client.receive_data(raw(b"\xc1"))
    with raises("out_of_order"):
        client.send(Ping(nonce=1))


def test_good_messages_before_an_error_are_returned_first() -> None:
    client, server = pair()
    data = client.send(Ping(nonce=1)) + client.send(Ping(nonce=2)) + raw(b"\xc1") + client.send(Ping(nonce=3))
    assert server.receive_data(data) == [Ping(nonce=1), Ping(nonce=2)]
    assert server.state is State.READY  # still answerable...
    server.send(Pong(nonce=1))
    with raises("malformed"):  # ...until the next call reports the error
        server.receive_data(b"")
    assert server.state is State.ERROR


def test_nothing_after_a_fatal_error() -> None:
    client, server = pair()
    fatal = Error(code="internal", message="bye", fatal=True)
    data = server.send(fatal)
    assert client.receive_data(data + frame(to_wire(Pong(nonce=1)))) == [fatal]
    with raises("out_of_order"):
        client.receive_data(b"")


def test_non_fatal_errors_keep_the_connection() -> None:
    client, server = pair()
    error = Error(code="busy", message="one at a time", fatal=False, request="r1")
    assert transfer(error, client, server) == [error]
    assert client.state is State.READY
    assert transfer(Ping(nonce=1), client, server) == [Ping(nonce=1)]


# ---- audio stream framing ----


def _start(request: str = "r") -> AudioStart:
    return AudioStart(request=request, session="s", sample_rate=24000, format="pcm_s16le", frame_samples=1920, seed=0)


def _chunk(seq: int, request: str = "r") -> AudioChunk:
    return AudioChunk(request=request, seq=seq, frame=seq, pcm=b"\0\0")


def _end(request: str = "r") -> AudioEnd:
    return AudioEnd(request=request, reason="eos", frames=1, total_ms=1.0, first_audio_ms=0.5)


def test_audio_streams_interleave() -> None:
    client, server = pair()
    for msg in (_start("a"), _start("b"), _chunk(0, "b"), _chunk(0, "a"), _chunk(1, "a"), _end("b"), _end("a")):
        assert transfer(msg, client, server) == [msg]
    assert client.open_streams == server.open_streams == frozenset()
    assert transfer(_start("a"), client, server) == [_start("a")]  # an id may be reused once its stream ended


@pytest.mark.parametrize(
    "messages",
    [
        [_chunk(0)],  # chunk before start
        [_end()],  # end before start
        [_start(), _start()],  # start twice
        [_start(), _chunk(1)],  # gap
        [_start(), _chunk(0), _chunk(0)],  # repeat
        [_start(), _end(), _chunk(0)],  # after the end
    ],
)
def test_audio_stream_violations(messages: list[Message]) -> None:
    *good, bad = messages
    client, server = pair()
    for msg in good:
        transfer(msg, client, server)
    with raises("out_of_order"):
        server.send(bad)  # caught locally, without harm...
    assert server.state is State.READY
    with raises("out_of_order"):
        client.receive_data(frame(to_wire(bad)))  # ...and on the receiving side


# ---- PCM ----


def test_pcm_s16_round_trip() -> None:
    x = np.random.default_rng(0).uniform(-1, 1, 5000).astype(np.float32)
    data = encode_pcm(x, "pcm_s16le")
    assert len(data) == 2 * len(x)
    y = decode_pcm(data, "pcm_s16le")
    assert y.dtype == np.float32 and y.flags.writeable
    assert np.max(np.abs(x - y)) <= 1 / 32767


def test_pcm_f32_round_trip_is_exact() -> None:
    x = np.random.default_rng(1).normal(size=5000).astype(np.float32)  # beyond [-1, 1] too: no clipping
    data = encode_pcm(x, "pcm_f32le")
    assert data == x.astype("<f4").tobytes()
    assert np.array_equal(decode_pcm(data, "pcm_f32le"), x)


def test_pcm_s16_clips_and_silences_nan() -> None:
    data = encode_pcm(np.array([2.0, -3.0, 1.0, -1.0, np.nan, np.inf, 0.5]), "pcm_s16le")
    assert np.frombuffer(data, "<i2").tolist() == [32767, -32767, 32767, -32767, 0, 32767, 16384]
    assert decode_pcm(data, "pcm_s16le")[:4].tolist() == [1.0, -1.0, 1.0, -1.0]


def test_pcm_is_little_endian() -> None:
    assert encode_pcm(np.array([1.0]), "pcm_s16le") == b"\xff\x7f"
    assert encode_pcm(np.array([1.0]), "pcm_f32le") == b"\x00\x00\x80\x3f"


@pytest.mark.parametrize(("size", "format"), [(3, "pcm_s16le"), (1, "pcm_s16le"), (6, "pcm_f32le"), (2, "pcm_f32le")])
def test_pcm_partial_samples_are_rejected(size: int, format: str) -> None:
    with raises("bad_field", "pcm"):
        decode_pcm(b"\0" * size, format)


def test_pcm_bad_format_and_shape() -> None:
    with raises("bad_field", "format"):
        encode_pcm(np.zeros(3), "opus")
    with raises("bad_field", "format"):
        decode_pcm(b"", "pcm_u8")
    with pytest.raises(ValueError):
        encode_pcm(np.zeros((2, 3)), "pcm_f32le")
    assert decode_pcm(b"", "pcm_s16le").shape == (0,)
