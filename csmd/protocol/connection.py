"""Sans-IO protocol connection: bytes in, messages out; messages in, bytes out.

One `Connection` is one end of one stream. It frames and parses, and it tracks the state that both ends can
see on the wire: the handshake, and the audio stream of every request. The table `TRANSITIONS` says which
message may follow in each state; it is shared by both roles (a client's connection and a server's connection
apply the same table to the same messages), so the two ends cannot disagree about the rules.

Errors: data from the peer that breaks the protocol raises ProtocolError and the connection fails for good
(state ERROR; only a server may still send one fatal `error` to say why). A message that the local caller may
not send raises ProtocolError too, but changes nothing: no bytes were produced, so the stream is intact.
"""

from __future__ import annotations

import dataclasses
import enum
import struct
from collections.abc import Iterable
from typing import ClassVar, Final

import msgpack

from csmd.protocol.errors import ProtocolError
from csmd.protocol.messages import (
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    AudioChunk,
    AudioEnd,
    AudioStart,
    Error,
    Hello,
    Message,
    Role,
    Welcome,
    from_wire,
    to_wire,
)

DEFAULT_MAX_MESSAGE: Final = 16 * 1024 * 1024
# What one message body may hold besides str and bin: a few arrays and maps in all (at any depth), each of a
# few items. v1 needs one map and at most one small array; the bounds keep a 16 MiB body of tiny containers
# (each a Python object of ~60 bytes) from costing a gigabyte to parse, and nesting from recursing deep.
MAX_CONTAINERS: Final = 256
MAX_CONTAINER_ITEMS: Final = 256
_HEADER: Final = struct.Struct(">I")


class State(enum.Enum):
    AWAIT_HELLO = "await_hello"  # nothing sent yet: the client's first message must be hello
    AWAIT_WELCOME = "await_welcome"  # hello sent: only ping/pong until welcome (or a fatal error)
    READY = "ready"  # handshake done: every message of the right direction
    ERROR = "error"  # the peer broke the protocol: nothing more is read; a server may send one fatal error
    CLOSED = "closed"  # a fatal error went by, or the stream ended


@dataclasses.dataclass(frozen=True)
class ConnectionClosed:
    """Event: the peer ended the stream cleanly (between messages)."""


Event = Message | ConnectionClosed

# Transition keys are (sender, wire type), except that a fatal error has its own key: it ends the connection
# wherever a non-fatal error would keep it going.
FATAL_ERROR: Final = "error(fatal)"


def _key(msg: Message) -> str:
    return FATAL_ERROR if isinstance(msg, Error) and msg.fatal else msg.type


_ANYTIME_IN_READY: Final = [
    (cls.sender, cls.type) for cls in MESSAGE_TYPES.values() if cls.type not in (Hello.type, Welcome.type)
]

TRANSITIONS: Final[dict[State, dict[tuple[Role, str], State]]] = {
    State.AWAIT_HELLO: {
        (Role.CLIENT, Hello.type): State.AWAIT_WELCOME,
        # A server may refuse a client before its hello (e.g. when it is shutting down).
        (Role.SERVER, FATAL_ERROR): State.CLOSED,
    },
    State.AWAIT_WELCOME: {
        (Role.CLIENT, "ping"): State.AWAIT_WELCOME,
        (Role.SERVER, "pong"): State.AWAIT_WELCOME,
        (Role.SERVER, Welcome.type): State.READY,
        (Role.SERVER, FATAL_ERROR): State.CLOSED,  # e.g. unsupported_version
    },
    State.READY: {
        **{key: State.READY for key in _ANYTIME_IN_READY},
        (Role.SERVER, FATAL_ERROR): State.CLOSED,
    },
    State.ERROR: {
        (Role.SERVER, FATAL_ERROR): State.CLOSED,
    },
    State.CLOSED: {},
}


class Connection:
    """One end of a protocol stream, without I/O.

    `max_message` caps the body of one received message (and of one sent message; a client also respects the
    server's advertised cap once welcomed). `versions` are the protocol versions this end speaks.
    """

    DEFAULT_MAX_MESSAGE: ClassVar[int] = DEFAULT_MAX_MESSAGE  # also here, for code that only imports Connection

    def __init__(
        self, role: Role, *, max_message: int = DEFAULT_MAX_MESSAGE, versions: Iterable[int] = (PROTOCOL_VERSION,)
    ) -> None:
        if max_message < 1:
            raise ValueError("max_message must be positive")
        self.role = role
        self.peer = Role.SERVER if role is Role.CLIENT else Role.CLIENT
        self.max_message = max_message
        self.versions = frozenset(versions)
        if not self.versions:
            raise ValueError("a connection needs at least one protocol version")
        self._state = State.AWAIT_HELLO
        self._offered: frozenset[int] = frozenset()  # the hello's versions
        self._version: int | None = None
        self._peer_max_message: int | None = None
        self._streams: dict[str, int] = {}  # request id -> next audio.chunk seq, while its audio stream is open
        self._buffer = bytearray()  # at most one partial message: header, then body
        self._body_len = 0  # valid once the buffer holds a whole header
        self._pending_error: ProtocolError | None = None  # found after events that were already returned
        self._failure: ProtocolError | None = None

    # ---- inspection ----

    @property
    def state(self) -> State:
        return self._state

    @property
    def version(self) -> int | None:
        """The negotiated protocol version: on a server, known once hello is received (the highest version both
        ends speak: put it in the welcome); on a client, once welcome is received."""
        return self._version

    @property
    def peer_max_message(self) -> int | None:
        """The server's cap on message size, from its welcome (client side only)."""
        return self._peer_max_message

    @property
    def buffered(self) -> int:
        """Bytes held of a message not yet complete (never more than 4 + max_message)."""
        return len(self._buffer)

    @property
    def incomplete_body(self) -> int:
        """The body length of the message being received, once its length prefix is in (else 0): what the
        buffer grows to, beyond the 4 prefix bytes, before the message completes."""
        return self._body_len if len(self._buffer) >= _HEADER.size else 0

    @property
    def open_streams(self) -> frozenset[str]:
        """Requests whose audio.start went by without their audio.end."""
        return frozenset(self._streams)

    # ---- receiving ----

    def receive_data(self, data: bytes) -> list[Event]:
        """Parse newly received bytes; b"" means end of stream.

        Returns the complete messages in `data` (none if it ends inside one). If `data` holds good messages and
        then a violation, the good ones are returned and the error is raised by the next call: they arrived
        first and the caller may act on them (a server may answer them and then report the error).
        """
        if self._pending_error is not None:
            exc, self._pending_error = self._pending_error, None
            raise self._fail(exc)
        if self._state is State.ERROR:
            assert self._failure is not None
            raise ProtocolError("out_of_order", f"the connection already failed ({self._failure})")
        if self._state is State.CLOSED:
            if not data:
                return [ConnectionClosed()]
            raise self._fail(ProtocolError("out_of_order", "data after the end of the connection"))
        if not data:
            if self._buffer:
                held = len(self._buffer)
                raise self._fail(ProtocolError("truncated", f"stream ended inside a message ({held} bytes held)"))
            self._state = State.CLOSED
            return [ConnectionClosed()]

        events: list[Event] = []
        try:
            for msg in self._parse(memoryview(data)):
                if self._state is State.CLOSED:
                    raise ProtocolError("out_of_order", f"{msg.type} after a fatal error")
                self._apply(self.peer, msg)
                events.append(msg)
        except ProtocolError as exc:
            self._buffer.clear()
            if not events:
                raise self._fail(exc) from None
            self._pending_error = exc
        return events

    def _parse(self, view: memoryview) -> Iterable[Message]:
        """Yield each message completed by `view`, keeping the incomplete rest in the buffer.

        Whole messages inside `view` are decoded from it directly; only a message split across calls is copied
        into the buffer, and never more of it than its own length, so the buffer stays under one capped message.
        """
        i, n = 0, len(view)
        while i < n:
            if not self._buffer and n - i >= _HEADER.size:
                (length,) = _HEADER.unpack_from(view, i)
                self._check_length(length)
                end = i + _HEADER.size + length
                if end <= n:
                    yield _decode(view[i + _HEADER.size : end])
                    i = end
                    continue
            if len(self._buffer) < _HEADER.size:
                take = min(_HEADER.size - len(self._buffer), n - i)
                self._buffer += view[i : i + take]
                i += take
                if len(self._buffer) < _HEADER.size:
                    return
                (self._body_len,) = _HEADER.unpack_from(self._buffer)
                # Checked as soon as the header is whole: a too-long message is refused before its body arrives.
                self._check_length(self._body_len)
            missing = _HEADER.size + self._body_len - len(self._buffer)
            take = min(missing, n - i)
            self._buffer += view[i : i + take]
            i += take
            if take < missing:
                return
            body = bytes(self._buffer[_HEADER.size :])
            self._buffer.clear()
            yield _decode(body)

    def _check_length(self, length: int) -> None:
        if length > self.max_message:
            raise ProtocolError("too_large", f"message of {length} bytes exceeds the cap of {self.max_message}")

    def _fail(self, exc: ProtocolError) -> ProtocolError:
        self._state = State.ERROR
        self._failure = exc
        self._buffer.clear()
        self._streams.clear()
        return exc

    # ---- sending ----

    def send(self, msg: Message) -> bytes:
        """The framed bytes for `msg`, after checking that this end may send it now.

        Raises ProtocolError without changing any state if it may not (wrong_direction, out_of_order,
        unsupported_version for a welcome outside the hello's versions, too_large).
        """
        if not isinstance(msg, Message):
            raise TypeError(f"not a protocol message: {msg!r}")
        self._apply(self.role, msg, dry_run=True)
        body = msgpack.packb(to_wire(msg), use_bin_type=True)
        cap = self.max_message if self._peer_max_message is None else min(self.max_message, self._peer_max_message)
        if len(body) > cap:
            raise ProtocolError("too_large", f"{msg.type} of {len(body)} bytes exceeds the cap of {cap}")
        self._apply(self.role, msg)
        return _HEADER.pack(len(body)) + body

    # ---- the state machine ----

    def _apply(self, sender: Role, msg: Message, *, dry_run: bool = False) -> None:
        """Check that `sender` may send `msg` now, then (unless dry_run) take the transition.

        Every check comes before any change, so a refused message leaves the connection as it was.
        """
        if msg.sender is not sender:
            raise ProtocolError(
                "wrong_direction", f"{msg.type} is sent by the {msg.sender.value}, not the {sender.value}"
            )
        new_state = TRANSITIONS[self._state].get((sender, _key(msg)))
        if new_state is None:
            raise ProtocolError("out_of_order", f"{msg.type} from the {sender.value} in state {self._state.value}")
        if isinstance(msg, Hello):
            common = self.versions.intersection(msg.protocol)
            received = sender is self.peer  # i.e. this is the server
            if received and not common:
                raise ProtocolError(
                    "unsupported_version",
                    f"client speaks versions {list(msg.protocol)}, server speaks {sorted(self.versions)}",
                )
            if not dry_run:
                self._offered = frozenset(msg.protocol)
                if received:
                    self._version = max(common)  # the server's choice; the client learns it from welcome
        elif isinstance(msg, Welcome):
            if msg.protocol not in self._offered or msg.protocol not in self.versions:
                offered = sorted(self._offered)
                raise ProtocolError(
                    "unsupported_version", f"welcome chose version {msg.protocol}, hello offered {offered}"
                )
            if not dry_run:
                self._version = msg.protocol
                if self.role is Role.CLIENT:
                    self._peer_max_message = msg.max_message
        elif isinstance(msg, AudioStart | AudioChunk | AudioEnd):
            self._apply_stream(msg, dry_run)
        if not dry_run:
            self._state = new_state
            if new_state is State.CLOSED:
                self._streams.clear()

    def _apply_stream(self, msg: AudioStart | AudioChunk | AudioEnd, dry_run: bool) -> None:
        """Per-request audio framing: start, chunks numbered 0, 1, 2..., end; nothing outside it."""
        expected = self._streams.get(msg.request)
        if isinstance(msg, AudioStart):
            if expected is not None:
                raise ProtocolError("out_of_order", f"audio.start for request {msg.request!r}, already streaming")
            if not dry_run:
                self._streams[msg.request] = 0
            return
        if expected is None:
            raise ProtocolError("out_of_order", f"{msg.type} for request {msg.request!r} without audio.start")
        if isinstance(msg, AudioChunk):
            if msg.seq != expected:
                raise ProtocolError(
                    "out_of_order", f"audio.chunk seq {msg.seq} for request {msg.request!r}, expected {expected}"
                )
            if not dry_run:
                self._streams[msg.request] = expected + 1
        elif not dry_run:
            del self._streams[msg.request]


class _TooManyContainers(Exception):
    pass


def _decode(body: bytes | memoryview) -> Message:
    containers = 0

    def count(container: object) -> object:  # msgpack calls this as each array or map is completed
        nonlocal containers
        containers += 1
        if containers > MAX_CONTAINERS:
            raise _TooManyContainers
        return container

    try:
        obj = msgpack.unpackb(
            body,
            raw=False,
            list_hook=count,
            object_hook=count,
            max_array_len=MAX_CONTAINER_ITEMS,
            max_map_len=MAX_CONTAINER_ITEMS,
        )
    except _TooManyContainers:
        raise ProtocolError("malformed", f"more than {MAX_CONTAINERS} arrays and maps in one message") from None
    except Exception as exc:  # msgpack signals bad input with many exception types (ValueError, TypeError, ...)
        raise ProtocolError("malformed", f"not a msgpack value: {exc!r}"[:200]) from None
    return from_wire(obj)
