"""The messages of protocol v1: one frozen dataclass per wire `type`, and their dict form.

A message object is valid by construction: `__post_init__` checks every field against its annotation (and
normalizes ints in float fields to float, lists to tuples), so `to_wire` cannot fail and `from_wire` is
"pick the known fields, then construct". Field rules come from the annotations, read once per class:

- `str`, `int`, `float`, `bool`, `bytes`: exact types. A bool is not an int; an int is accepted (and widened)
  where a float is expected, because many encoders write 1.0 as 1. Ints must fit msgpack (-2**63 .. 2**64-1);
  floats must be finite (NaN or inf is never a meaningful value here).
- `tuple[X, ...]`: a msgpack array (list or tuple when constructing), stored as a tuple so messages hash.
- `Literal[...]`: an enum of strings.
- `Annotated[..., NON_EMPTY]` / `Annotated[..., AtLeast(n)]` / `Annotated[..., AtMostBytes(n)]`: protocol-level
  ranges (ids non-empty and at most 256 bytes of UTF-8, counts non-negative, rates positive). Ranges that
  depend on the model (temperature, top_k, text length...) are the daemon's.
- `X | None = None`: optional; absent on the wire when None, and an explicit nil on the wire means absent.
  A field with another default (`pinned: bool = False`) is optional on the wire too, and always written.

Unknown fields are ignored (a newer peer may add optional fields); unknown types are errors.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import reprlib
import types
from collections.abc import Callable
from typing import Annotated, Any, ClassVar, Final, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from csmd.protocol.errors import ProtocolError

PROTOCOL_VERSION: Final = 1
SAMPLE_RATE: Final = 24000
FRAME_SAMPLES: Final = 1920  # one Mimi frame: 80 ms at 24 kHz

Format = Literal["pcm_s16le", "pcm_f32le"]
FORMATS: Final[tuple[Format, ...]] = ("pcm_s16le", "pcm_f32le")
SAMPLE_WIDTH: Final[dict[str, int]] = {"pcm_s16le": 2, "pcm_f32le": 4}

EndReason = Literal["eos", "max_length", "cancelled", "error"]
END_REASONS: Final[tuple[EndReason, ...]] = ("eos", "max_length", "cancelled", "error")

MAX_ID_BYTES: Final = 256  # ids are echoed in replies: bounded, so no reply can outgrow the message cap
_INT_MIN: Final = -(2**63)
_INT_MAX: Final = 2**64 - 1  # msgpack's uint64


class Role(enum.Enum):
    """Which end of the connection: each message type is sent by exactly one of them."""

    CLIENT = "client"
    SERVER = "server"


# ---- field constraints, used inside Annotated ----


class _NonEmpty:
    def __repr__(self) -> str:
        return "NON_EMPTY"


NON_EMPTY: Final = _NonEmpty()


@dataclasses.dataclass(frozen=True)
class AtLeast:
    bound: float


@dataclasses.dataclass(frozen=True)
class AtMostBytes:
    """A str of at most `bound` bytes once encoded as UTF-8."""

    bound: int


Id = Annotated[str, NON_EMPTY, AtMostBytes(MAX_ID_BYTES)]  # session and request ids, peer names, error codes
Count = Annotated[int, AtLeast(0)]  # sequence numbers, frame indices and counts, speaker ids
PositiveInt = Annotated[int, AtLeast(1)]  # sample rates, sizes, protocol versions
Millis = Annotated[float, AtLeast(0.0)]


# ---- checkers compiled from annotations ----

_Checker = Callable[[str, Any], Any]  # (field name, value) -> normalized value, or raise bad_field


# Shows a value in an error message: short, and never recursing deeper than a few levels (a peer may send
# arrays nested hundreds deep, whose plain repr() would raise RecursionError).
def _short_repr() -> reprlib.Repr:
    short = reprlib.Repr()  # (keyword arguments only from Python 3.12)
    short.maxlevel, short.maxlist, short.maxtuple, short.maxdict = 3, 4, 4, 4
    short.maxstring = short.maxlong = short.maxother = 40
    return short


_SHORT_REPR: Final = _short_repr()


def _describe(value: object) -> str:
    if value is None:
        return "nil"
    if isinstance(value, bytes | bytearray):
        return f"bin of {len(value)} bytes"
    if isinstance(value, list | tuple | dict):
        return f"{type(value).__name__} of {len(value)} items {_SHORT_REPR.repr(value)}"
    text = _SHORT_REPR.repr(value)
    return f"{type(value).__name__} {text}"


def _bad(name: str, expected: str, value: object) -> ProtocolError:
    return ProtocolError("bad_field", f"field {name!r} must be {expected}, got {_describe(value)}", field=name)


def _check_str(name: str, value: Any) -> Any:
    if not isinstance(value, str):
        raise _bad(name, "a str", value)
    try:
        value.encode("utf-8")  # a lone surrogate would make msgpack fail later, far from the cause
    except UnicodeEncodeError:
        raise _bad(name, "valid unicode", value) from None
    return value


def _check_int(name: str, value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(name, "an int", value)
    if not _INT_MIN <= value <= _INT_MAX:
        raise _bad(name, "an int that fits msgpack (64 bits)", value)
    return value


def _check_float(name: str, value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _bad(name, "a float", value)
    try:
        result = float(value)
    except OverflowError:
        raise _bad(name, "a finite float", value) from None
    if not math.isfinite(result):
        raise _bad(name, "a finite float", value)
    return result


def _check_bool(name: str, value: Any) -> Any:
    if not isinstance(value, bool):
        raise _bad(name, "a bool", value)
    return value


def _check_bytes(name: str, value: Any) -> Any:
    if not isinstance(value, bytes):
        raise _bad(name, "bin (bytes)", value)
    return value


_SCALARS: Final[dict[object, _Checker]] = {
    str: _check_str,
    int: _check_int,
    float: _check_float,
    bool: _check_bool,
    bytes: _check_bytes,
}


def _compile(tp: object) -> _Checker:
    """Turn one field annotation (without its `| None`) into a checker."""
    if tp in _SCALARS:
        return _SCALARS[tp]
    origin = get_origin(tp)
    args = get_args(tp)
    if origin is Literal:
        allowed = args

        def check_enum(name: str, value: Any) -> Any:
            if not isinstance(value, str) or value not in allowed:
                raise _bad(name, "one of " + ", ".join(repr(a) for a in allowed), value)
            return value

        return check_enum
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        item = _compile(args[0])

        def check_array(name: str, value: Any) -> Any:
            if not isinstance(value, list | tuple):
                raise _bad(name, "an array", value)
            return tuple(item(f"{name}[{i}]", v) for i, v in enumerate(value))

        return check_array
    if origin is Annotated:
        base = _compile(args[0])
        constraints = args[1:]

        def check_constrained(name: str, value: Any) -> Any:
            value = base(name, value)
            for c in constraints:
                if c is NON_EMPTY and len(value) == 0:
                    raise _bad(name, "non-empty", value)
                if isinstance(c, AtLeast) and value < c.bound:
                    raise _bad(name, f">= {c.bound:g}", value)
                if isinstance(c, AtMostBytes) and len(value.encode("utf-8")) > c.bound:
                    raise _bad(name, f"at most {c.bound} bytes of UTF-8", value)
            return value

        return check_constrained
    raise TypeError(f"no wire rule for annotation {tp!r}")  # a programming error in this module


@dataclasses.dataclass(frozen=True)
class _FieldSpec:
    name: str
    check: _Checker
    required: bool  # no default: must be on the wire
    nullable: bool  # default None: absent on the wire when None


def _field_specs(cls: type) -> tuple[_FieldSpec, ...]:
    hints = get_type_hints(cls, include_extras=True)
    specs = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        nullable = False
        if get_origin(tp) in (Union, types.UnionType):
            members = [a for a in get_args(tp) if a is not type(None)]
            if len(members) != len(get_args(tp)) - 1 or len(members) != 1:
                raise TypeError(f"{cls.__name__}.{f.name}: only `X | None` unions are supported")
            tp, nullable = members[0], True
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if nullable and f.default is not None:
            raise TypeError(f"{cls.__name__}.{f.name}: an optional field must default to None")
        specs.append(_FieldSpec(f.name, _compile(tp), required, nullable))
    return tuple(specs)


# ---- the message base class and registry ----


class Message:
    """Base of every wire message. Subclasses are frozen, slotted dataclasses registered with `_message`."""

    __slots__ = ()
    type: ClassVar[str]  # the wire "type"
    sender: ClassVar[Role]  # who may send it
    _spec: ClassVar[tuple[_FieldSpec, ...]]

    def __post_init__(self) -> None:
        for spec in self._spec:
            value = getattr(self, spec.name)
            if value is None and spec.nullable:
                continue
            checked = spec.check(spec.name, value)
            if checked is not value:
                object.__setattr__(self, spec.name, checked)  # frozen: normalization happens only here
        self._check_together()

    def _check_together(self) -> None:
        """Rules across fields; overridden where a message has some."""

    def __repr__(self) -> str:
        # Binary fields can be megabytes: show their size, not their content.
        parts = []
        for spec in self._spec:
            value = getattr(self, spec.name)
            shown = f"<bin {len(value)} bytes>" if isinstance(value, bytes) else repr(value)
            parts.append(f"{spec.name}={shown}")
        return f"{type(self).__name__}({', '.join(parts)})"


MESSAGE_TYPES: Final[dict[str, type[Message]]] = {}

_M = TypeVar("_M", bound=Message)


def _message(cls: type[_M]) -> type[_M]:
    """Register a message dataclass under its wire type and compile its field checks."""
    if cls.type in MESSAGE_TYPES:
        raise TypeError(f"duplicate message type {cls.type!r}")
    cls._spec = _field_specs(cls)
    MESSAGE_TYPES[cls.type] = cls
    return cls


# ---- client -> server ----


@_message
@dataclasses.dataclass(frozen=True, slots=True, repr=False)  # repr: Message.__repr__
class Hello(Message):
    """First message of every connection: the protocol versions the client speaks, and its name."""

    type: ClassVar[str] = "hello"
    sender: ClassVar[Role] = Role.CLIENT
    protocol: Annotated[tuple[PositiveInt, ...], NON_EMPTY]
    client: Id


@_message
@dataclasses.dataclass(frozen=True, slots=True, repr=False)
class OpenSession(Message):
    type: ClassVar[str] = "session.open"
    sender: ClassVar[Role] = Role.CLIENT
    session: Id


@_message
@dataclasses.dataclass(frozen=True, slots=True, repr=False)
class CloseSession(Message):
    type: ClassVar[str] = "session.close"
    sender: ClassVar[Role] = Role.CLIENT
    session: Id


@_message
@dataclasses.dataclass(frozen=True, slots=True, repr=False)
class AddContext(Message):
    """A conversation segment: text, optionally with the audio of it (audio, rate and format together)."""

    type: ClassVar[str] = "context.add"
    sender: ClassVar[Role] = Role.CLIENT
    session: Id
    speaker: Count
    text: str
    audio: bytes | None = None
    rate: PositiveInt | None = None
    format: Format | None = None
    pinned: bool = False

    def _check_together(self) -> None:
        given = [self.audio is not None, self.rate is not None, self.format is not None]
        if any(given) and not all(given):
            raise ProtocolError("bad_field", "'audio', 'rate' and 'format' come together or not at all", field="audio")
        if self.audio is not None and self.format is not None and len(self.audio) % SAMPLE_WIDTH[self.format]:
            raise ProtocolError(
                "bad_field",
                f"'audio' has {len(self.audio)} bytes, not a multiple of the {self.format} sample width",
                field="audio",
            )


@_message
@dataclasses.dataclass(frozen=True, slots=True, repr=False)
class ClearContext(Message):
    type: ClassVar[str] = "context.clear"
    sender: ClassVar[Role] = Role.CLIENT
    session: Id


@_message
@dataclasses.dataclass(frozen=True, slots=True, repr=False)
class TrimContext(Message):
    """Keep only what the listener heard of an interrupted reply: its first `frames` frames and `text`.

    `request` names a reply of this session; any context added after it (later replies) is dropped too.
    """

    type: ClassVar[str] = "context.trim"
    sender: ClassVar[Role] = Role.CLIENT
    session: Id
    request: Id
    frames: Count
    text: str


@_message
@dataclasses.dataclass(frozen=True, slots=True, repr=False)
class Speak(Message):
    """Generate `text` as `speaker`; sampling parameters left out take the daemon's defaults."""

    type: ClassVar[str] = "speak"
    sender: ClassVar[Role] = Role.CLIENT
    session: Id
    request: Id
    text: str
    speaker: Count
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    seed: int | None = None
    max_frames: int | None = None
    format: Format | None = None


@_message
@dataclasses.dataclass(frozen=True, slots=True, repr=False)
class Cancel(Message):
    type: ClassVar[str] = "cancel"
    sender: ClassVar[Role] = Role.CLIENT
    request: Id


@_message
@dataclasses.dataclass(frozen=True, slots=True, repr=False)
class Ping(Message):
    type: ClassVar[str] = "ping"
    sender: ClassVar[Role] = Role.CLIENT
    nonce: int


# ---- server -> client ----


@_message
@dataclasses.dataclass(frozen=True, slots=True, repr=False)
class Welcome(Message):
    """The server's answer to hello: the chosen version and what every later message can rely on."""

    type: ClassVar[str] = "welcome"
    sender: ClassVar[Role] = Role.SERVER
    protocol: PositiveInt
    server: Id
    sample_rate: PositiveInt
    frame_samples: PositiveInt
    formats: Annotated[tuple[Format, ...], NON_EMPTY]
    model: str
    watermark: bool
    max_message: PositiveInt
    version: Id | None = None  # the server software's version (csmd's package version); absent from older ones


@_message
@dataclasses.dataclass(frozen=True, slots=True, repr=False)
class SessionOpened(Message):
    type: ClassVar[str] = "session.opened"
    sender: ClassVar[Role] = Role.SERVER
    session: Id


@_message
@dataclasses.dataclass(frozen=True, slots=True, repr=False)
class SessionClosed(Message):
    type: ClassVar[str] = "session.closed"
    sender: ClassVar[Role] = Role.SERVER
    session: Id


@_message
@dataclasses.dataclass(frozen=True, slots=True, repr=False)
class ContextAdded(Message):
    type: ClassVar[str] = "context.added"
    sender: ClassVar[Role] = Role.SERVER
    session: Id
    frames: Count  # Mimi frames of audio encoded for this segment (0 for text only)
    rows: Count  # the session's context length after adding it


@_message
@dataclasses.dataclass(frozen=True, slots=True, repr=False)
class ContextCleared(Message):
    type: ClassVar[str] = "context.cleared"
    sender: ClassVar[Role] = Role.SERVER
    session: Id


@_message
@dataclasses.dataclass(frozen=True, slots=True, repr=False)
class ContextTrimmed(Message):
    type: ClassVar[str] = "context.trimmed"
    sender: ClassVar[Role] = Role.SERVER
    session: Id
    rows: Count  # the session's context length after trimming


@_message
@dataclasses.dataclass(frozen=True, slots=True, repr=False)
class AudioStart(Message):
    """Opens a request's audio stream; says how to read its chunks."""

    type: ClassVar[str] = "audio.start"
    sender: ClassVar[Role] = Role.SERVER
    request: Id
    session: Id
    sample_rate: PositiveInt
    format: Format
    frame_samples: PositiveInt
    seed: int  # the seed actually used, so a caller can reproduce the utterance


@_message
@dataclasses.dataclass(frozen=True, slots=True, repr=False)
class AudioChunk(Message):
    type: ClassVar[str] = "audio.chunk"
    sender: ClassVar[Role] = Role.SERVER
    request: Id
    seq: Count  # 0, 1, 2... per request: the connection checks there is no gap
    frame: Count  # index of the first Mimi frame in this chunk
    pcm: bytes


@_message
@dataclasses.dataclass(frozen=True, slots=True, repr=False)
class AudioEnd(Message):
    """Closes a request's audio stream: the last message about it except a `cancelled` reply."""

    type: ClassVar[str] = "audio.end"
    sender: ClassVar[Role] = Role.SERVER
    request: Id
    reason: EndReason
    frames: Count
    total_ms: Millis
    first_audio_ms: Millis | None = None  # absent when no audio was produced


@_message
@dataclasses.dataclass(frozen=True, slots=True, repr=False)
class Cancelled(Message):
    type: ClassVar[str] = "cancelled"
    sender: ClassVar[Role] = Role.SERVER
    request: Id
    frames_sent: Count


@_message
@dataclasses.dataclass(frozen=True, slots=True, repr=False)
class Pong(Message):
    type: ClassVar[str] = "pong"
    sender: ClassVar[Role] = Role.SERVER
    nonce: int


@_message
@dataclasses.dataclass(frozen=True, slots=True, repr=False)
class Error(Message):
    """A refusal or failure. Fatal ones end the connection; others concern one request or session."""

    type: ClassVar[str] = "error"
    sender: ClassVar[Role] = Role.SERVER
    code: Id
    message: str
    fatal: bool
    request: Id | None = None
    session: Id | None = None

    @classmethod
    def from_protocol_error(cls, exc: ProtocolError) -> Error:
        """The fatal error a server sends after its Connection raised `exc` on received data."""
        return cls(code=exc.code, message=exc.message, fatal=True)


# ---- dict form ----


def to_wire(msg: Message) -> dict[str, Any]:
    """The msgpack map for `msg`: "type" first, then its fields, optional ones left out when None."""
    wire: dict[str, Any] = {"type": msg.type}
    for spec in msg._spec:
        value = getattr(msg, spec.name)
        if value is None:
            continue
        wire[spec.name] = list(value) if isinstance(value, tuple) else value
    return wire


def from_wire(obj: object) -> Message:
    """The message for a decoded msgpack value, or ProtocolError (malformed, unknown_type or bad_field)."""
    if not isinstance(obj, dict):
        raise ProtocolError("malformed", f"a message must be a map, got {_describe(obj)}")
    if not all(isinstance(key, str) for key in obj):
        raise ProtocolError("malformed", "message keys must be strings")
    name = obj.get("type")
    if not isinstance(name, str):
        raise ProtocolError("malformed", f"a message needs a str 'type', got {_describe(name)}")
    cls = MESSAGE_TYPES.get(name)
    if cls is None:
        raise ProtocolError("unknown_type", f"unknown message type {name[:60]!r}")
    kwargs: dict[str, Any] = {}
    for spec in cls._spec:
        value = obj.get(spec.name)
        if value is not None:
            kwargs[spec.name] = value
        elif spec.required:
            raise ProtocolError("bad_field", f"{name} needs field {spec.name!r}", field=spec.name)
    return cls(**kwargs)
