"""The client's bookkeeping without I/O: which reply answers which call. Shared by both clients.

The trio client and the blocking client differ only in how they move bytes and how they wait; everything
about routing lives here, once:

- audio.start / audio.chunk / audio.end go to the speech with that request id;
- `cancelled` answers every pending cancel of that request; `pong` the ping with that nonce;
- session.opened / session.closed / context.added / context.cleared answer the oldest pending command of that
  session expecting that reply type (the daemon answers a session's commands in the order it received them);
- a non-fatal `error` with a request id fails that request's speech and pending cancels; one with only a
  session id fails the oldest pending command of that session; anything else is logged;
- a fatal `error`, a protocol violation, or the end of the stream fails everything: `ConnectionLost`.

Before anything is sent, both clients check who serves the socket (`verify_server`).
"""

from __future__ import annotations

import itertools
import logging
import os
from collections import deque
from collections.abc import Iterable
from typing import Generic, NamedTuple, TypeVar

import numpy as np
import numpy.typing as npt

from csmd.protocol import peercred
from csmd.protocol.connection import Connection, ConnectionClosed
from csmd.protocol.errors import ConnectionLost, ProtocolError, RequestError, UntrustedServerError
from csmd.protocol.messages import (
    PROTOCOL_VERSION,
    AddContext,
    AudioChunk,
    AudioEnd,
    AudioStart,
    Cancel,
    Cancelled,
    ClearContext,
    CloseSession,
    ContextAdded,
    ContextCleared,
    ContextTrimmed,
    Error,
    Format,
    Hello,
    Message,
    OpenSession,
    Ping,
    Pong,
    Role,
    SessionClosed,
    SessionOpened,
    Speak,
    TrimContext,
    Welcome,
)
from csmd.protocol.pcm import decode_pcm, encode_pcm

log = logging.getLogger("csmd.protocol.client")

T = TypeVar("T")

SessionCommand = OpenSession | CloseSession | AddContext | ClearContext | TrimContext
SessionReply = SessionOpened | SessionClosed | ContextAdded | ContextCleared | ContextTrimmed

_REPLY_TYPE: dict[type[Message], type[Message]] = {
    OpenSession: SessionOpened,
    CloseSession: SessionClosed,
    AddContext: ContextAdded,
    ClearContext: ContextCleared,
    TrimContext: ContextTrimmed,
}


class Chunk(NamedTuple):
    """One piece of generated audio: its first Mimi frame index and its mono float32 samples."""

    frame: int
    pcm: npt.NDArray[np.float32]


class Pending(Generic[T]):
    """A reply still to come: `done` once it holds a value or an exception."""

    __slots__ = ("_error", "_value", "done")

    def __init__(self) -> None:
        self.done = False
        self._value: T | None = None
        self._error: Exception | None = None

    def set(self, value: T) -> None:
        if not self.done:
            self.done, self._value = True, value

    def fail(self, error: Exception) -> None:
        if not self.done:
            self.done, self._error = True, error

    def result(self) -> T:
        assert self.done, "result() before the reply arrived"
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]  # done without error: set() stored a T


class _SessionWaiter(Generic[T]):
    __slots__ = ("expects", "pending")

    def __init__(self, expects: type[Message]) -> None:
        self.expects = expects
        self.pending: Pending[T] = Pending()


class SpeechState:
    """What the client knows of one speak request: its start, buffered chunks, end or failure."""

    def __init__(self, request: str, session: str) -> None:
        self.request = request
        self.session = session
        self.start: AudioStart | None = None
        self.end: AudioEnd | None = None
        self.error: Exception | None = None  # raised once the buffered chunks are consumed
        self.chunks: deque[AudioChunk] = deque()
        self.closed = False  # the caller stopped listening: chunks are dropped

    @property
    def finished(self) -> bool:
        return self.end is not None or self.error is not None

    def started_or_failed(self) -> bool:
        return self.start is not None or self.finished

    def has_item(self) -> bool:
        """Whether `take` returns without waiting."""
        return bool(self.chunks) or self.finished or self.closed

    def take(self) -> AudioChunk | None:
        """The next chunk; None after the end (or once closed); raises the request's error once the chunks
        before it are taken."""
        if self.chunks:
            return self.chunks.popleft()
        if self.error is not None and not self.closed:
            raise self.error
        return None

    def decode(self, chunk: AudioChunk) -> Chunk:
        assert self.start is not None  # the connection refuses chunks before audio.start
        return Chunk(chunk.frame, decode_pcm(chunk.pcm, self.start.format))


def verify_server(sock: peercred.HasFileno, path: str | os.PathLike[str]) -> None:
    """Raise UntrustedServerError unless the process serving the connected socket is this user or root."""
    uid = peercred.peer_uid(sock)
    if not peercred.is_trusted(uid):
        raise UntrustedServerError(os.fspath(path), uid)


class ClientCore:
    """Protocol state of one client connection: build requests, route replies. Never does I/O."""

    def __init__(
        self,
        client: str,
        *,
        versions: Iterable[int] = (PROTOCOL_VERSION,),
        max_message: int = Connection.DEFAULT_MAX_MESSAGE,
    ) -> None:
        self.client_name = client
        self.versions = tuple(sorted(set(versions), reverse=True))
        self.conn = Connection(Role.CLIENT, max_message=max_message, versions=self.versions)
        self.welcome: Welcome | None = None
        self.lost: ConnectionLost | None = None
        self._sessions: dict[str, deque[_SessionWaiter[SessionReply]]] = {}
        self._speeches: dict[str, SpeechState] = {}
        self._cancels: dict[str, list[Pending[Cancelled]]] = {}
        self._pings: dict[int, Pending[Pong]] = {}
        self._nonces = itertools.count(1)
        self._requests = itertools.count(1)

    # ---- outgoing ----

    def hello(self) -> bytes:
        return self._send(Hello(protocol=self.versions, client=self.client_name))

    def command(self, msg: SessionCommand) -> tuple[Pending[SessionReply], bytes]:
        """A session or context command, and the reply it will get."""
        data = self._send(msg)
        waiter: _SessionWaiter[SessionReply] = _SessionWaiter(_REPLY_TYPE[type(msg)])
        self._sessions.setdefault(msg.session, deque()).append(waiter)
        return waiter.pending, data

    def new_request_id(self) -> str:
        while True:
            request = f"r{next(self._requests)}"
            if request not in self._speeches:
                return request

    def speak(self, msg: Speak) -> tuple[SpeechState, bytes]:
        if msg.request in self._speeches:
            raise ValueError(f"request id {msg.request!r} is already in flight on this connection")
        data = self._send(msg)
        state = SpeechState(msg.request, msg.session)
        self._speeches[msg.request] = state
        return state, data

    def cancel(self, request: str) -> tuple[Pending[Cancelled], bytes]:
        data = self._send(Cancel(request=request))
        pending: Pending[Cancelled] = Pending()
        self._cancels.setdefault(request, []).append(pending)
        return pending, data

    def ping(self) -> tuple[Pending[Pong], bytes]:
        nonce = next(self._nonces)
        data = self._send(Ping(nonce=nonce))
        pending: Pending[Pong] = Pending()
        self._pings[nonce] = pending
        return pending, data

    def close_speech(self, state: SpeechState) -> bool:
        """The caller stops listening to a speech. True if it is still streaming (the caller should cancel it)."""
        state.closed = True
        state.chunks.clear()
        # Still routed means started and neither ended nor failed (both unroute it).
        return self._speeches.pop(state.request, None) is state and self.lost is None

    def cancel_quietly(self, request: str) -> tuple[None, bytes]:
        """A cancel whose reply nobody waits for (used when a speech is dropped mid-stream)."""
        return None, self._send(Cancel(request=request))

    def _send(self, msg: Message) -> bytes:
        if self.lost is not None:
            raise ConnectionLost(self.lost.code, self.lost.message)
        return self.conn.send(msg)

    # ---- incoming ----

    def receive(self, data: bytes) -> None:
        """Feed bytes read from the socket (b"" at end of stream). Never raises: failures become `lost`."""
        if self.lost is not None:
            return
        try:
            events = self.conn.receive_data(data)
        except ProtocolError as exc:
            self.fail(ConnectionLost(exc.code, f"the server broke the protocol: {exc.message}"))
            return
        for event in events:
            if isinstance(event, ConnectionClosed):
                self.fail(ConnectionLost("closed", "the server closed the connection"))
                return
            self._route(event)

    def most_buffered(self) -> int:
        """The longest chunk backlog of any speech: the trio client stops reading above its limit."""
        return max((len(s.chunks) for s in self._speeches.values()), default=0)

    def fail(self, lost: ConnectionLost) -> None:
        """End the connection: every pending call and every open speech raises `lost` (a fresh copy each)."""
        if self.lost is not None:
            return
        self.lost = lost

        def copy() -> ConnectionLost:
            return ConnectionLost(lost.code, lost.message)

        for waiters in self._sessions.values():
            for waiter in waiters:
                waiter.pending.fail(copy())
        for cancels in self._cancels.values():
            for pending in cancels:
                pending.fail(copy())
        for ping in self._pings.values():
            ping.fail(copy())
        for state in self._speeches.values():
            if not state.finished:
                state.error = copy()
        self._sessions.clear()
        self._cancels.clear()
        self._pings.clear()
        self._speeches.clear()

    def _route(self, msg: Message) -> None:
        if isinstance(msg, AudioStart | AudioChunk | AudioEnd):
            self._route_audio(msg)
        elif isinstance(msg, SessionOpened | SessionClosed | ContextAdded | ContextCleared | ContextTrimmed):
            self._route_session_reply(msg)
        elif isinstance(msg, Cancelled):
            for pending in self._cancels.pop(msg.request, []):
                pending.set(msg)
        elif isinstance(msg, Pong):
            ping = self._pings.pop(msg.nonce, None)
            if ping is not None:
                ping.set(msg)
        elif isinstance(msg, Error):
            self._route_error(msg)
        elif isinstance(msg, Welcome):
            self.welcome = msg
        else:  # the Connection only lets server messages through
            raise AssertionError(f"unexpected {msg!r}")

    def _route_audio(self, msg: AudioStart | AudioChunk | AudioEnd) -> None:
        state = self._speeches.get(msg.request)
        if state is None:
            return  # a speech the caller dropped (or already failed): its tail is not wanted
        if isinstance(msg, AudioStart):
            state.start = msg
        elif isinstance(msg, AudioChunk):
            state.chunks.append(msg)
        else:
            state.end = msg
            del self._speeches[msg.request]
            if msg.reason == "error":
                # Normally an `error` with this request id came first and already failed the speech.
                state.error = RequestError(
                    "internal", "the server ended the speech with an error", request=msg.request, session=state.session
                )

    def _route_session_reply(self, msg: SessionReply) -> None:
        waiters = self._sessions.get(msg.session)
        waiter = next((w for w in waiters or () if w.expects is type(msg)), None)
        if waiters is None or waiter is None:
            log.warning("dropping an unexpected %s for session %r", msg.type, msg.session)
            return
        waiters.remove(waiter)
        if not waiters:
            del self._sessions[msg.session]
        waiter.pending.set(msg)

    def _route_error(self, msg: Error) -> None:
        if msg.fatal:
            self.fail(ConnectionLost(msg.code, msg.message))
            return
        delivered = False
        if msg.request is not None:
            state = self._speeches.pop(msg.request, None)
            if state is not None:
                state.error = RequestError(msg.code, msg.message, request=msg.request, session=msg.session)
                delivered = True
            for pending in self._cancels.pop(msg.request, []):
                pending.fail(RequestError(msg.code, msg.message, request=msg.request, session=msg.session))
                delivered = True
        elif msg.session is not None and (waiters := self._sessions.get(msg.session)):
            waiters.popleft().pending.fail(RequestError(msg.code, msg.message, session=msg.session))
            if not waiters:
                del self._sessions[msg.session]
            delivered = True
        if not delivered:
            log.warning("server error not tied to a pending call: %s: %s", msg.code, msg.message)


def make_add_context(
    session: str,
    speaker: int,
    text: str,
    audio: npt.ArrayLike | bytes | None,
    rate: int,
    format: Format,
    pinned: bool,
) -> AddContext:
    """The context.add message for either client: float audio is encoded here, bytes go as they are."""
    if audio is None:
        return AddContext(session=session, speaker=speaker, text=text, pinned=pinned)
    data = audio if isinstance(audio, bytes) else encode_pcm(audio, format)
    return AddContext(session=session, speaker=speaker, text=text, audio=data, rate=rate, format=format, pinned=pinned)
