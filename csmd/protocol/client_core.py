"""The client side of the protocol without I/O: every message a client builds and every decision it takes.

Both clients (`trio_client`, `blocking_client`) are this core plus a transport, as h11's Connection is for
HTTP: the core turns each call into the bytes to write and a `Pending` reply, takes the bytes read from the
socket, and completes replies from them. A client only writes, reads and waits; it decides nothing.

Routing of what the server sends:
- audio.start / audio.chunk / audio.end go to the speech with that request id;
- `welcome` answers the hello; `cancelled` every pending cancel of that request; `pong` the ping with that nonce;
- session.opened / session.closed / context.* answer the oldest pending command of that session expecting that
  reply type (the daemon answers a session's commands in the order it received them);
- a non-fatal `error` with a request id fails that request's speech and pending cancels, except that a
  speech's own cancel answered "no_such_request" after the speech ended is answered from its audio.end (a
  cancel racing the natural end is not the caller's error); one with only a session id fails the oldest
  pending command of that session; anything else is logged;
- a fatal `error`, a protocol violation, or the end of the stream fails everything: `ConnectionLost`.

Before anything is sent, both clients check who serves the socket (`verify_server`).
"""

from __future__ import annotations

import itertools
import logging
import os
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Generic, NamedTuple, TypedDict, TypeVar, Unpack

import numpy as np
import numpy.typing as npt

from csmd.protocol import messages as m
from csmd.protocol import peercred
from csmd.protocol.connection import Connection, ConnectionClosed
from csmd.protocol.errors import ConnectionLost, ProtocolError, RequestError, UntrustedServerError
from csmd.protocol.pcm import decode_pcm, encode_pcm

log = logging.getLogger("csmd.protocol.client")

T = TypeVar("T")
R = TypeVar("R", bound="SessionReply")

SessionCommand = m.OpenSession | m.CloseSession | m.AddContext | m.ClearContext | m.TrimContext
SessionReply = m.SessionOpened | m.SessionClosed | m.ContextAdded | m.ContextCleared | m.ContextTrimmed


class SpeakOptions(TypedDict, total=False):
    """speak's optional keywords. A parameter left out (or None) takes the daemon's default; `request` is the
    request id (one is made up when left out)."""

    request: str | None
    temperature: float | None
    top_k: int | None
    top_p: float | None
    min_p: float | None
    seed: int | None
    max_frames: int | None
    format: m.Format | None


class ContextOptions(TypedDict, total=False):
    """add_context's optional keywords: the audio's `rate` (default 24000; the daemon resamples others), its
    `format` when given as float samples (default "pcm_f32le"), and `pinned` (default False: the window may drop
    the segment when it overflows)."""

    rate: int
    format: m.Format
    pinned: bool


class Chunk(NamedTuple):
    """One piece of generated audio: its first Mimi frame index and its mono float32 samples."""

    frame: int
    pcm: npt.NDArray[np.float32]


def join_chunks(chunks: Sequence[Chunk]) -> npt.NDArray[np.float32]:
    """The chunks' samples end to end (an empty array for none)."""
    return np.concatenate([c.pcm for c in chunks]) if chunks else np.zeros(0, dtype=np.float32)


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


class _SessionWaiter(Generic[R]):
    __slots__ = ("expects", "pending")

    def __init__(self, expects: type[R]) -> None:
        self.expects = expects
        self.pending: Pending[R] = Pending()


class _CancelWaiter:
    __slots__ = ("pending", "speech")

    def __init__(self, speech: SpeechState | None) -> None:
        self.speech = speech  # set for a speech's own cancel: its audio.end may answer it
        self.pending: Pending[m.Cancelled] = Pending()


class SpeechState:
    """What the client knows of one speak request: its message, whether it went out, its start, buffered
    chunks, end or failure."""

    def __init__(self, msg: m.Speak) -> None:
        self.msg = msg
        self.request = msg.request
        self.session = msg.session
        self.sent = False
        self.start: m.AudioStart | None = None
        self.end: m.AudioEnd | None = None
        self.error: Exception | None = None  # raised once the buffered chunks are consumed
        self.chunks: deque[m.AudioChunk] = deque()
        self.closed = False  # the caller stopped listening: chunks are dropped

    @property
    def finished(self) -> bool:
        return self.end is not None or self.error is not None

    def started_or_failed(self) -> bool:
        """Whether `started` returns without waiting."""
        return self.start is not None or self.finished

    def started(self) -> m.AudioStart:
        """The request's audio.start, or its error (a speech can only finish without a start by failing)."""
        if self.start is not None:
            return self.start
        assert self.error is not None, "started() before audio.start or an error arrived"
        raise self.error

    def has_item(self) -> bool:
        """Whether `next_chunk` returns without waiting."""
        return bool(self.chunks) or self.finished or self.closed

    def next_chunk(self) -> Chunk | None:
        """The next chunk, decoded; None after the end (or once closed); raises the request's error once the
        chunks before it are taken."""
        if self.chunks:
            chunk = self.chunks.popleft()
            assert self.start is not None  # the connection refuses chunks before audio.start
            return Chunk(chunk.frame, decode_pcm(chunk.pcm, self.start.format))
        if self.error is not None and not self.closed:
            raise self.error
        return None


class SpeechView:
    """What both clients' Speech objects show of their request."""

    def __init__(self, state: SpeechState) -> None:
        self._state = state
        self.request = state.request
        self.session = state.session

    @property
    def audio_start(self) -> m.AudioStart | None:
        return self._state.start

    @property
    def end(self) -> m.AudioEnd | None:
        return self._state.end


def verify_server(sock: peercred.HasFileno, path: str | os.PathLike[str]) -> None:
    """Raise UntrustedServerError unless the process serving the connected socket is this user or root."""
    uid = peercred.peer_uid(sock)
    if not peercred.is_trusted(uid):
        raise UntrustedServerError(os.fspath(path), uid)


class ClientCore:
    """Protocol state of one client connection: build requests, route replies. Never does I/O.

    Each call returns the bytes to write with what will hold the reply; the transport writes the bytes in the
    order the core made them (session replies are matched by that order) and feeds every byte it reads to
    `receive`.
    """

    def __init__(
        self,
        client: str,
        *,
        versions: Iterable[int] = (m.PROTOCOL_VERSION,),
        max_message: int = Connection.DEFAULT_MAX_MESSAGE,
    ) -> None:
        self.client_name = client
        self.versions = tuple(sorted(set(versions), reverse=True))
        self.conn = Connection(m.Role.CLIENT, max_message=max_message, versions=self.versions)
        self.welcome: m.Welcome | None = None
        self.lost: ConnectionLost | None = None
        self._welcome: Pending[m.Welcome] = Pending()
        self._sessions: dict[str, deque[_SessionWaiter[SessionReply]]] = {}
        self._speeches: dict[str, SpeechState] = {}
        self._cancels: dict[str, list[_CancelWaiter]] = {}
        self._pings: dict[int, Pending[m.Pong]] = {}
        self._nonces = itertools.count(1)
        self._requests = itertools.count(1)

    # ---- outgoing ----

    def hello(self) -> tuple[Pending[m.Welcome], bytes]:
        return self._welcome, self._send(m.Hello(protocol=self.versions, client=self.client_name))

    def open_session(self, session: str) -> tuple[Pending[m.SessionOpened], bytes]:
        return self._command(m.OpenSession(session=session), m.SessionOpened)

    def close_session(self, session: str) -> tuple[Pending[m.SessionClosed], bytes]:
        return self._command(m.CloseSession(session=session), m.SessionClosed)

    def add_context(
        self,
        session: str,
        speaker: int,
        text: str,
        audio: npt.ArrayLike | bytes | None = None,
        **options: Unpack[ContextOptions],
    ) -> tuple[Pending[m.ContextAdded], bytes]:
        """A segment: text, optionally with mono audio (float samples, encoded here, or bytes already in
        `format`, sent as they are)."""
        pinned = options.get("pinned", False)
        if audio is None:
            msg = m.AddContext(session=session, speaker=speaker, text=text, pinned=pinned)
        else:
            rate, fmt = options.get("rate", m.SAMPLE_RATE), options.get("format", "pcm_f32le")
            data = audio if isinstance(audio, bytes) else encode_pcm(audio, fmt)
            msg = m.AddContext(
                session=session, speaker=speaker, text=text, audio=data, rate=rate, format=fmt, pinned=pinned
            )
        return self._command(msg, m.ContextAdded)

    def clear_context(self, session: str) -> tuple[Pending[m.ContextCleared], bytes]:
        return self._command(m.ClearContext(session=session), m.ContextCleared)

    def trim_context(
        self, session: str, request: str, frames: int, text: str
    ) -> tuple[Pending[m.ContextTrimmed], bytes]:
        msg = m.TrimContext(session=session, request=request, frames=frames, text=text)
        return self._command(msg, m.ContextTrimmed)

    def speech(self, session: str, text: str, speaker: int, **options: Unpack[SpeakOptions]) -> SpeechState:
        """A speak request, checked (ProtocolError "bad_field" for arguments of the wrong type) but not sent."""
        request = options.get("request")
        msg = m.Speak(
            session=session,
            request=request if request is not None else self._new_request_id(),
            text=text,
            speaker=speaker,
            temperature=options.get("temperature"),
            top_k=options.get("top_k"),
            top_p=options.get("top_p"),
            min_p=options.get("min_p"),
            seed=options.get("seed"),
            max_frames=options.get("max_frames"),
            format=options.get("format"),
        )
        return SpeechState(msg)

    def send_speech(self, state: SpeechState) -> tuple[SpeechState, bytes]:
        """The speech's request, the first time (b"" after that: it goes out once)."""
        if state.sent:
            return state, b""
        if state.request in self._speeches:
            raise ValueError(f"request id {state.request!r} is already in flight on this connection")
        data = self._send(state.msg)
        state.sent = True
        self._speeches[state.request] = state
        return state, data

    def cancel(self, request: str, *, speech: SpeechState | None = None) -> tuple[Pending[m.Cancelled], bytes]:
        """Cancel `request`; a speech's own cancel (`speech` given) is answered by its end if it already ended."""
        data = self._send(m.Cancel(request=request))
        waiter = _CancelWaiter(speech)
        self._cancels.setdefault(request, []).append(waiter)
        return waiter.pending, data

    def ping(self) -> tuple[Pending[m.Pong], bytes]:
        nonce = next(self._nonces)
        data = self._send(m.Ping(nonce=nonce))
        pending: Pending[m.Pong] = Pending()
        self._pings[nonce] = pending
        return pending, data

    def close_speech(self, state: SpeechState) -> bool:
        """The caller stops listening to a speech. True if it is still streaming: the caller should send
        `cancel_quietly` (nobody waits for that reply)."""
        if not state.sent:
            return False  # nothing to stop: it may still be started later
        state.closed = True
        state.chunks.clear()
        # Still routed means sent and neither ended nor failed (both unroute it).
        return self._speeches.pop(state.request, None) is state and self.lost is None

    def cancel_quietly(self, request: str) -> tuple[None, bytes]:
        """A cancel whose reply nobody waits for (a speech dropped mid-stream)."""
        return None, self._send(m.Cancel(request=request))

    def _command(self, msg: SessionCommand, reply: type[R]) -> tuple[Pending[R], bytes]:
        data = self._send(msg)
        waiter = _SessionWaiter(reply)
        self._sessions.setdefault(msg.session, deque()).append(waiter)  # type: ignore[arg-type]  # R is a SessionReply
        return waiter.pending, data

    def _new_request_id(self) -> str:
        while True:
            request = f"r{next(self._requests)}"
            if request not in self._speeches:
                return request

    def _send(self, msg: m.Message) -> bytes:
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

    def reading_paused(self, max_buffered: int) -> bool:
        """Whether a reader that stops at `max_buffered` unread chunks in some speech should wait (the trio
        client's backpressure: not reading the socket stops the daemon)."""
        backlog = max((len(s.chunks) for s in self._speeches.values()), default=0)
        return self.lost is None and backlog >= max_buffered

    def fail(self, lost: ConnectionLost) -> None:
        """End the connection: every pending call and every open speech raises `lost` (a fresh copy each)."""
        if self.lost is not None:
            return
        self.lost = lost

        def copy() -> ConnectionLost:
            return ConnectionLost(lost.code, lost.message)

        self._welcome.fail(copy())
        for waiters in self._sessions.values():
            for waiter in waiters:
                waiter.pending.fail(copy())
        for cancels in self._cancels.values():
            for cancel in cancels:
                cancel.pending.fail(copy())
        for ping in self._pings.values():
            ping.fail(copy())
        for state in self._speeches.values():
            if not state.finished:
                state.error = copy()
        self._sessions.clear()
        self._cancels.clear()
        self._pings.clear()
        self._speeches.clear()

    def _route(self, msg: m.Message) -> None:
        if isinstance(msg, m.AudioStart | m.AudioChunk | m.AudioEnd):
            self._route_audio(msg)
        elif isinstance(msg, SessionReply):
            self._route_session_reply(msg)
        elif isinstance(msg, m.Cancelled):
            for cancel in self._cancels.pop(msg.request, []):
                cancel.pending.set(msg)
        elif isinstance(msg, m.Pong):
            ping = self._pings.pop(msg.nonce, None)
            if ping is not None:
                ping.set(msg)
        elif isinstance(msg, m.Error):
            self._route_error(msg)
        elif isinstance(msg, m.Welcome):
            self.welcome = msg
            self._welcome.set(msg)
        else:  # the Connection only lets server messages through
            raise AssertionError(f"unexpected {msg!r}")

    def _route_audio(self, msg: m.AudioStart | m.AudioChunk | m.AudioEnd) -> None:
        state = self._speeches.get(msg.request)
        if state is None:
            return  # a speech the caller dropped (or already failed): its tail is not wanted
        if isinstance(msg, m.AudioStart):
            state.start = msg
        elif isinstance(msg, m.AudioChunk):
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

    def _route_error(self, msg: m.Error) -> None:
        if msg.fatal:
            self.fail(ConnectionLost(msg.code, msg.message))
            return
        delivered = False
        if msg.request is not None:
            state = self._speeches.pop(msg.request, None)
            if state is not None:
                state.error = RequestError(msg.code, msg.message, request=msg.request, session=msg.session)
                delivered = True
            for cancel in self._cancels.pop(msg.request, []):
                ended = cancel.speech.end if cancel.speech is not None else None
                if msg.code == "no_such_request" and ended is not None:
                    cancel.pending.set(m.Cancelled(request=msg.request, frames_sent=ended.frames))
                else:
                    cancel.pending.fail(RequestError(msg.code, msg.message, request=msg.request, session=msg.session))
                delivered = True
        elif msg.session is not None and (waiters := self._sessions.get(msg.session)):
            waiters.popleft().pending.fail(RequestError(msg.code, msg.message, session=msg.session))
            if not waiters:
                del self._sessions[msg.session]
            delivered = True
        if not delivered:
            log.warning("server error not tied to a pending call: %s: %s", msg.code, msg.message)
