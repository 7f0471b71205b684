"""Property tests: whatever bytes or maps arrive, the protocol layer answers with events or a ProtocolError."""

from __future__ import annotations

import contextlib
import struct
from typing import Any

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_protocol import CONVERSATION, HELLO, WELCOME, frame

from csmd.protocol import (
    FORMATS,
    MESSAGE_TYPES,
    Connection,
    ConnectionClosed,
    Message,
    ProtocolError,
    Role,
    Speak,
    State,
    from_wire,
    to_wire,
)

CLIENT_BYTES = [Connection(Role.CLIENT).send(HELLO)]  # the server-bound stream needs hello first
SERVER_MESSAGES = [m for m in CONVERSATION if m.sender is Role.SERVER]
CLIENT_MESSAGES = [m for m in CONVERSATION if m.sender is Role.CLIENT and m is not HELLO]


def _feed(conn: Connection, data: bytes, sizes: list[int]) -> list[Any]:
    """Feed `data` in chunks of the given sizes (cycled), then EOF; stop at the first ProtocolError."""
    events: list[Any] = []
    i, k = 0, 0
    try:
        while i < len(data):
            size = sizes[k % len(sizes)] if sizes else len(data)
            events += conn.receive_data(data[i : i + size])
            i, k = i + size, k + 1
        events += conn.receive_data(b"")
        # A stream that ends cleanly ends with exactly one ConnectionClosed (or a pending error raised above).
        assert isinstance(events[-1], ConnectionClosed)
    except ProtocolError as exc:
        assert conn.state in (State.ERROR, State.CLOSED), exc
    assert conn.buffered <= 4 + conn.max_message
    assert all(isinstance(e, Message | ConnectionClosed) for e in events)
    return events


chunk_sizes = st.lists(st.integers(1, 64), max_size=8)


@given(st.binary(max_size=2000), chunk_sizes, st.booleans())
def test_random_bytes_into_a_server(data: bytes, sizes: list[int], after_hello: bool) -> None:
    conn = Connection(Role.SERVER, max_message=1500)
    prefix = CLIENT_BYTES[0] if after_hello else b""
    _feed(conn, prefix + data, sizes)


@given(st.binary(max_size=2000), chunk_sizes)
def test_random_bytes_into_a_client(data: bytes, sizes: list[int]) -> None:
    conn = Connection(Role.CLIENT, max_message=1500)
    conn.send(HELLO)
    _feed(conn, data, sizes)


@st.composite
def spliced_streams(draw: st.DrawFn, messages: list[Message]) -> bytes:
    """A valid-looking stream: framed messages (maybe with a wrong length) with random bytes spliced in."""
    parts = [frame(to_wire(m)) for m in draw(st.lists(st.sampled_from(messages), max_size=6))]
    data = b"".join(parts)
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(data)))
        action = draw(st.sampled_from(["insert", "overwrite", "delete", "length"]))
        noise = draw(st.binary(min_size=1, max_size=8))
        if action == "insert":
            data = data[:at] + noise + data[at:]
        elif action == "overwrite":
            data = data[:at] + noise + data[at + len(noise) :]
        elif action == "delete":
            data = data[:at] + data[at + len(noise) :]
        else:
            data = data[:at] + struct.pack(">I", draw(st.integers(0, 2**32 - 1))) + data[at:]
    return data


@given(spliced_streams(CLIENT_MESSAGES), chunk_sizes, st.booleans())
@settings(suppress_health_check=[HealthCheck.too_slow])
def test_spliced_client_messages_into_a_server(data: bytes, sizes: list[int], after_hello: bool) -> None:
    conn = Connection(Role.SERVER, max_message=20_000)
    prefix = CLIENT_BYTES[0] if after_hello else b""
    _feed(conn, prefix + data, sizes)


@given(spliced_streams(SERVER_MESSAGES), chunk_sizes)
@settings(suppress_health_check=[HealthCheck.too_slow])
def test_spliced_server_messages_into_a_client(data: bytes, sizes: list[int]) -> None:
    conn = Connection(Role.CLIENT, max_message=20_000)
    conn.send(HELLO)
    _feed(conn, data, sizes)


# ---- from_wire on arbitrary maps ----

msgpack_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8)
)
msgpack_values = st.recursive(
    msgpack_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4),
    max_leaves=12,
)


def _field_names() -> list[str]:
    names = {"type"}
    for cls in MESSAGE_TYPES.values():
        names.update(cls.__dataclass_fields__)  # type: ignore[attr-defined]
    return sorted(names)


keys = st.sampled_from(_field_names()) | st.text(max_size=6)
wire_maps = st.dictionaries(keys, msgpack_values, max_size=10)


@given(wire_maps, st.sampled_from([None, *MESSAGE_TYPES]))
def test_from_wire_on_random_maps(wire: dict[str, Any], forced_type: str | None) -> None:
    if forced_type is not None:
        wire = {**wire, "type": forced_type}
    try:
        msg = from_wire(wire)
    except ProtocolError as exc:
        assert exc.code in ("malformed", "unknown_type", "bad_field")
        return
    assert from_wire(to_wire(msg)) == msg  # what was accepted is canonical and re-encodes
    assert msgpack.unpackb(msgpack.packb(to_wire(msg), use_bin_type=True)) == to_wire(msg)


@st.composite
def mutated_wires(draw: st.DrawFn) -> dict[str, Any]:
    """A valid message's map with a few fields replaced, removed or added: reaches every field check."""
    wire = to_wire(draw(st.sampled_from(CONVERSATION)))
    for _ in range(draw(st.integers(0, 3))):
        key = draw(st.sampled_from(sorted(wire)) | keys if wire else keys)
        if draw(st.booleans()):
            wire[key] = draw(msgpack_values)
        else:
            wire.pop(key, None)
    return wire


@given(mutated_wires())
def test_from_wire_on_mutated_messages(wire: dict[str, Any]) -> None:
    try:
        msg = from_wire(wire)
    except ProtocolError as exc:
        assert exc.code in ("malformed", "unknown_type", "bad_field")
        if exc.code == "bad_field":
            assert exc.field is not None
        return
    assert from_wire(to_wire(msg)) == msg


@given(msgpack_values)
def test_from_wire_on_random_values(value: Any) -> None:
    with contextlib.suppress(ProtocolError):
        from_wire(value)


ids = st.text(min_size=1, max_size=12)
optional = st.none
speak_messages = st.builds(
    Speak,
    session=ids,
    request=ids,
    text=st.text(max_size=40),
    speaker=st.integers(0, 2**64 - 1),
    temperature=optional() | st.floats(allow_nan=False, allow_infinity=False),
    top_k=optional() | st.integers(-(2**63), 2**64 - 1),
    top_p=optional() | st.floats(0, 1),
    min_p=optional() | st.floats(0, 1),
    seed=optional() | st.integers(-(2**63), 2**64 - 1),
    max_frames=optional() | st.integers(0, 10_000),
    format=optional() | st.sampled_from(FORMATS),
)


@given(speak_messages)
def test_random_valid_speak_round_trips_through_bytes(msg: Speak) -> None:
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    server.receive_data(client.send(HELLO))
    client.receive_data(server.send(WELCOME))
    assert server.receive_data(client.send(msg)) == [msg]
