"""The daemon: a trio server on a Unix socket speaking protocol v1, one handler per connection.

Per connection: a reader loop (parses with the sans-IO `Connection`, answers pings and cancels at once) and
a task per command, so a slow command (a prefill, encoding context audio) never delays a cancel or a ping.
Commands of one session take their turns in the order they were read (a ticket each), and the reader never
waits for a turn: it stops reading only when MAX_COMMANDS_AHEAD commands have been read and not yet done.
Each reply's audio is forwarded by its own task from the reply's bounded channel to the socket. A
connection's sessions and replies die with it.

A speak request is known (`Reply`) from the moment it is read, so a cancel sent right behind it finds it even
while it waits for its session or its prefill. Every speak the daemon accepts ends with exactly one
`audio.end` (or an `error` with its request id), and every cancel gets exactly one answer: `cancelled`, after
that `audio.end`, if the request was still in flight when the cancel was read; `no_such_request` otherwise.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import secrets
import signal
import socket
import stat
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TypeVar

import numpy as np
import trio

import csmd
from csmd import runtime
from csmd.audio import io
from csmd.audio.mimi.model import Mimi, StreamingDecoder
from csmd.daemon import validation
from csmd.daemon.limits import BufferBudget, Limits
from csmd.daemon.scheduler import Chunk, Scheduler, Speech
from csmd.daemon.worker import ModelWorker
from csmd.model.generator import (
    Context,
    ContextBusyError,
    ContextOverflowError,
    ContextRequestError,
    Generator,
    Segment,
    Utterance,
)
from csmd.model.sampling import GenerationParams
from csmd.protocol import messages as m
from csmd.protocol import peercred
from csmd.protocol.connection import Connection, ConnectionClosed, State
from csmd.protocol.errors import ProtocolError
from csmd.protocol.pcm import decode_pcm, encode_pcm

log = logging.getLogger("csmd.daemon")
T = TypeVar("T")
RECEIVE_BYTES = 64 * 1024
RECENT_REPLIES = 16  # per session, the replies a client may still trim (context.trim)
FAREWELL_SECONDS = 1.0  # after a fatal error, how long the daemon still reads (and drops) what the client sends
MAX_COMMANDS_AHEAD = 8  # per connection: commands read but not yet done; beyond that the reader waits
MAX_ERROR_MESSAGE = 1000  # characters of an error's text: engine messages can quote anything
SHUTDOWN_GRACE_SECONDS = 2.0  # to tell every client why its replies end (a client not reading is left behind)
WORKER_STOP_SECONDS = 10.0  # for the model thread to finish the job it is running; then the process exits anyway


class CommandError(Exception):
    """A refused or failed command: reported to the client as a non-fatal error; the connection lives on."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message[:MAX_ERROR_MESSAGE]


@dataclass(eq=False)  # compared and hashed by identity: a closing session and its successor share a name
class Session:
    name: str
    context: Context = field(init=False)  # made by the session.open command, which has the first turn
    speech: Speech | None = None
    replies: dict[str, Utterance] = field(default_factory=dict)  # for context.trim, by request id
    closing: bool = False  # a session.close was read: a later session.open of this name opens a new one
    closed: bool = False  # the close (or a failed open) took effect
    # Turns: each command read for the session takes the next ticket and waits until `serving` reaches it.
    tickets: int = 0
    serving: int = 0
    abandoned: set[int] = field(default_factory=set)  # tickets whose command was cancelled before its turn
    turn_passed: trio.Event = field(default_factory=trio.Event)

    def take_ticket(self) -> int:
        self.tickets += 1
        return self.tickets - 1

    @contextlib.asynccontextmanager
    async def turn(self, ticket: int) -> AsyncIterator[None]:
        """Wait for the command's turn, hold it for the block, then pass it on (whatever happened)."""
        had_turn = False
        try:
            while self.serving != ticket:
                await self.turn_passed.wait()
            had_turn = True
            yield
        finally:
            if had_turn:
                self.serving += 1
                while self.serving in self.abandoned:
                    self.abandoned.remove(self.serving)
                    self.serving += 1
                self.turn_passed.set()
                self.turn_passed = trio.Event()
            else:
                self.abandoned.add(ticket)


@dataclass
class Reply:
    """A speak request from the moment it is read until its last message (audio.end, or an error) went out."""

    request: str
    session: str
    params: GenerationParams
    accepted: float = field(default_factory=time.perf_counter)
    cancelled: bool = False  # a cancel (or the end of the session or connection) came for it
    speech: Speech | None = None  # once its prefill is done and its audio.start sent
    ended: trio.Event = field(default_factory=trio.Event)

    @property
    def frames_sent(self) -> int:
        return 0 if self.speech is None else self.speech.frames_sent


class Daemon:
    """Everything shared by all connections: the model thread, the scheduler, the model and codec, the limits."""

    def __init__(self, generator: Generator, mimi: Mimi, model_name: str, limits: Limits | None = None):
        self.generator = generator
        self.mimi = mimi
        self.model_name = model_name
        self.limits = limits or Limits()
        self.sessions_open = 0
        self.connections = 0  # served now (refused ones are not counted)
        self.buffers = BufferBudget(self.limits.max_buffered)  # incomplete messages, over all connections
        self.worker = ModelWorker()
        self.scheduler = Scheduler(self.worker)
        self.handlers: set[ClientHandler] = set()
        self._sessions_closed = trio.Event()
        self.shutting_down = False
        # Decoding and resampling context audio runs in threads (never on the event loop), two at a time: each
        # holds up to a capped message's worth of samples.
        self.audio_threads = trio.CapacityLimiter(2)

    @property
    def window(self) -> int:
        """Rows the model sees at most: bounds a reply's frames and a segment's audio."""
        return self.generator.model.config.backbone.max_seq_len

    @property
    def max_sessions(self) -> int:
        return self.limits.max_sessions

    def welcome(self) -> m.Welcome:
        return m.Welcome(
            protocol=m.PROTOCOL_VERSION,
            server=f"csmd {csmd.__version__}",
            sample_rate=m.SAMPLE_RATE,
            frame_samples=m.FRAME_SAMPLES,
            formats=m.FORMATS,
            model=self.model_name,
            watermark=False,
            max_message=self.limits.max_message,
            version=csmd.__version__,
        )

    def session_closed(self) -> None:
        self.sessions_open -= 1
        self._sessions_closed.set()

    async def _return_memory(self) -> None:
        """After sessions close, give the memory they held (their KV caches and decoder states now sit in MLX's
        buffer cache) back to the system, on the model thread: else the daemon keeps its busiest moment's memory."""
        while True:
            await self._sessions_closed.wait()
            self._sessions_closed = trio.Event()
            await self.worker.run(runtime.release_memory)

    async def serve(
        self,
        path: Path,
        *,
        allow_shared_dir: bool = False,
        task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on `path` until cancelled; on the way out the socket file is removed if it is still ours.

        `allow_shared_dir` serves in a directory that other users may write (see `check_socket_dir`)."""
        peercred.check_supported()  # a daemon that cannot tell who connects must not serve
        listener = await bind_unix_socket(path, allow_shared_dir=allow_shared_dir)
        bound = path.lstat()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.scheduler.run)
                nursery.start_soon(self._return_memory)
                task_status.started(path)
                await trio.serve_listeners(self._handle, [trio.SocketListener(listener)])
        finally:
            listener.close()
            remove_own_socket(path, bound)

    async def _handle(self, stream: trio.SocketStream) -> None:
        # Whatever happens to one connection stays with it: the server and the other clients go on.
        handler = ClientHandler(self, stream)
        self.handlers.add(handler)
        try:
            await handler.run()
        except* (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away while we were writing; its handler cleaned up on the way out
        except* MemoryError:
            log.exception("out of memory serving a connection")
            await handler.fail("out_of_memory", "the daemon ran out of memory serving this connection")
        except* Exception as group:
            log.exception("a connection handler failed (a bug)")
            first = group.exceptions[0]
            await handler.fail("internal", f"the daemon failed on this connection (a bug): {type(first).__name__}")
        finally:
            self.handlers.discard(handler)
            await stream.aclose()

    async def say_goodbye(self) -> None:
        """Shutting down: every connection is told, its replies in flight end with an error, nothing new starts."""
        self.shutting_down = True
        async with trio.open_nursery() as nursery:
            for handler in list(self.handlers):
                nursery.start_soon(handler.say_goodbye)

    def close(self, timeout: float | None = None) -> bool:
        """Stop the model thread; False if it was still busy after `timeout` seconds."""
        return self.worker.close(timeout, drop_queued=True)


class ClientHandler:
    def __init__(self, daemon: Daemon, stream: trio.SocketStream):
        self.daemon = daemon
        self.stream = stream
        self.conn = Connection(m.Role.SERVER, max_message=daemon.limits.max_message)
        self.sessions: dict[str, Session] = {}  # by name: the one later commands of that name go to
        self._open_sessions: set[Session] = set()  # every session not yet closed (one may be closing)
        self.replies: dict[str, Reply] = {}  # speak requests in flight, by request id (ids are per connection)
        self._send_lock = trio.Lock()
        self._ahead = trio.Semaphore(MAX_COMMANDS_AHEAD)
        self._nursery: trio.Nursery | None = None
        # Deadlines (see `_deadline`): when the connection began, when its last message (or last session)
        # ended, when the message being received began; and the budget this connection holds for it.
        self._connected_at = self._last_activity = trio.current_time()
        self._message_since: float | None = None
        self._reserved = 0
        self._read_scope: trio.CancelScope | None = None  # around the read in progress, to move its deadline

    async def send(self, *messages: m.Message) -> None:
        async with self._send_lock:
            await self.stream.send_all(b"".join(self.conn.send(msg) for msg in messages))

    async def run(self) -> None:
        daemon = self.daemon
        try:
            allowed = peer_is_allowed(self.stream.socket)
        except OSError as exc:  # it left before we could ask (getpeereid's ENOTCONN on macOS)
            log.info("a connection ended before its peer's user could be read: %s", exc)
            return
        if not allowed:
            log.warning("refused a connection from another user")
            await self._farewell("forbidden", "this daemon serves only its own user")
            return
        if daemon.shutting_down:
            await self.send(m.Error(code="shutting_down", message="the daemon is shutting down", fatal=True))
            return
        if daemon.connections >= daemon.limits.max_connections:
            log.warning("refused a connection: %d connections are open", daemon.connections)
            await self._farewell(
                "too_many_connections",
                f"the daemon serves {daemon.limits.max_connections} connections at most (csmd serve --max-connections)",
            )
            return
        daemon.connections += 1
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                try:
                    await self._read(nursery)
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            daemon.connections -= 1
            daemon.buffers.release(self._reserved)
            self._reserved = 0
            self._abandon()

    async def _read(self, nursery: trio.Nursery) -> None:
        while True:
            data = await self._receive()
            if data is None:
                return  # a deadline passed; the client was told
            try:
                events = self.conn.receive_data(data)
            except ProtocolError as exc:
                log.info("closing a connection: %s", exc)
                await self.send(m.Error.from_protocol_error(exc))
                return
            except MemoryError:
                log.warning("out of memory decoding a message; closing that connection")
                await self.fail("out_of_memory", "the daemon ran out of memory decoding a message")
                return
            self._note_progress(bool(events))
            if self.conn.incomplete_body != self._reserved:  # the message it was held for is complete
                self.daemon.buffers.release(self._reserved)
                self._reserved = 0
            for event in events:
                if isinstance(event, ConnectionClosed) or not await self._dispatch(event, nursery):
                    return
            if not await self._reserve_incomplete():
                return

    async def _receive(self) -> bytes | None:
        """The client's next bytes, or None once one of the connection's deadlines passed (the client is told)."""
        while True:
            with trio.CancelScope(deadline=self._deadline()[0]) as self._read_scope:
                try:
                    return await self.stream.receive_some(RECEIVE_BYTES)
                finally:
                    self._read_scope = None
            deadline, why = self._deadline()
            if deadline <= trio.current_time():  # (else it moved while the read waited: read on)
                await self._farewell("timeout", why)
                return None

    def _deadline(self) -> tuple[float, str]:
        """When the client must have sent something more, and what to tell it if it has not (inf: no deadline).

        Until `hello`, the handshake deadline; inside a message, the message deadline; with no session open
        (so nothing running), the idle deadline; else none: a connection holding a session may be quiet.
        """
        limits = self.daemon.limits
        if self.conn.state is State.AWAIT_HELLO:
            seconds = limits.handshake_timeout
            return self._connected_at + seconds, f"no hello within {seconds:g} s of connecting"
        if self._message_since is not None:
            seconds = limits.message_timeout
            return self._message_since + seconds, f"a message was still incomplete {seconds:g} s after its first byte"
        if not self._open_sessions:
            seconds = limits.idle_timeout
            return self._last_activity + seconds, (
                f"no message for {seconds:g} s with no session open (csmd serve --idle-timeout; a ping keeps an "
                "idle connection open)"
            )
        return math.inf, ""

    def _refresh_deadline(self) -> None:
        """The deadline may have changed (the last session closed): move the waiting read's."""
        if self._read_scope is not None:
            self._read_scope.deadline = self._deadline()[0]

    def _note_progress(self, completed: bool) -> None:
        """After a read: `completed` says it finished at least one message."""
        now = trio.current_time()
        if completed:
            self._last_activity = now
        if not self.conn.buffered:
            self._message_since = None
        elif completed or self._message_since is None:  # the partial message began in this read
            self._message_since = now

    async def _reserve_incomplete(self) -> bool:
        """Hold room in the daemon's budget for the whole message being received; False if the connection's
        deadline passed while it waited for room (the client is told)."""
        size = self.conn.incomplete_body
        if size == self._reserved:  # (nothing to hold, or held already)
            return True
        budget = self.daemon.buffers
        with trio.move_on_at(self._deadline()[0]):
            await budget.acquire(size)
            self._reserved = size
            return True
        mib = budget.capacity / 2**20
        await self._farewell(
            "timeout", f"the daemon's {mib:g} MiB for incoming messages stayed full until this message's deadline"
        )
        return False

    async def _farewell(self, code: str, message: str) -> None:
        """End the connection with a fatal error, then read and drop what the client still sends for a moment,
        so that it reads the error instead of a reset connection (closing with unread data resets it)."""
        log.info("closing a connection: %s: %s", code, message)
        with trio.move_on_after(FAREWELL_SECONDS):
            await self.send(m.Error(code=code, message=message, fatal=True))
            await self.stream.send_eof()
            while await self.stream.receive_some(RECEIVE_BYTES):
                pass

    async def fail(self, code: str, message: str) -> None:
        """End the connection with a fatal error saying why, if the client still listens (briefly)."""
        with trio.move_on_after(1.0):
            # Already closed, or the client is gone: then there is nobody to tell.
            with contextlib.suppress(ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
                await self.send(m.Error(code=code, message=message, fatal=True))

    async def _dispatch(self, msg: m.Message, nursery: trio.Nursery) -> bool:
        """Handle one message; False ends the connection."""
        if isinstance(msg, m.Hello):  # (the Connection already refused versions we do not speak)
            await self.send(self.daemon.welcome())
        elif isinstance(msg, m.Ping):
            await self.send(m.Pong(nonce=msg.nonce))
        elif isinstance(msg, m.Cancel):
            await self._cancel(msg, nursery)
        elif isinstance(msg, m.Speak):
            await self._accept(msg, nursery)
        else:
            await self._queue(msg, nursery)
        return True

    async def _accept(self, msg: m.Speak, nursery: trio.Nursery) -> None:
        """A speak is checked and registered as it is read: from now on a cancel finds it."""
        error = None
        if msg.request in self.replies:
            error = CommandError(
                "duplicate_request", f"request {msg.request!r} is still in flight on this connection (in any session)"
            )
        else:
            try:
                params = validation.speak_params(msg, self.daemon.window)
            except validation.LimitError as exc:
                error = CommandError(exc.code, exc.message)
        if error is not None:
            await self.send(self._error(error, request=msg.request, session=msg.session))
            return
        reply = Reply(msg.request, msg.session, params)
        self.replies[msg.request] = reply
        await self._queue(msg, nursery, reply)

    async def _queue(self, msg: m.Message, nursery: trio.Nursery, reply: Reply | None = None) -> None:
        """Give a session command its ticket now, in reading order, and run it in a task of its own: it waits
        for its turn there (so its answer, or its error, comes in order), while the reader reads on."""
        await self._ahead.acquire()  # backpressure: a client may not queue unbounded work
        name: str = msg.session  # type: ignore[attr-defined]  # every session command names its session
        session = self.sessions.get(name)
        try:
            if isinstance(msg, m.OpenSession) and (session is None or session.closing):
                session = self._new_session(name)  # registered now: the commands read next find it
            elif session is None:
                raise CommandError("unknown_session", f"no session {name!r} on this connection")
            if isinstance(msg, m.CloseSession):
                session.closing = True
        except CommandError as exc:
            self._ahead.release()
            error = self._error(exc, request=getattr(msg, "request", None), session=name)
            if reply is None:
                await self.send(error)
            else:
                await self._end_reply(reply, error)
            return
        nursery.start_soon(self._command, msg, session, session.take_ticket(), reply)

    async def _command(self, msg: m.Message, session: Session, ticket: int, reply: Reply | None) -> None:
        speech = None
        try:
            try:
                async with session.turn(ticket):  # answers and errors go out within the turn: in order
                    speech = await self._take_turn(msg, session, ticket, reply)
            finally:
                self._ahead.release()
            if speech is not None:  # streaming happens after the turn: a context.add meanwhile is "busy"
                assert reply is not None
                try:
                    await self._forward(speech, reply, msg.format or "pcm_s16le")  # type: ignore[attr-defined]
                finally:
                    if not speech.done:  # nobody will read its audio any more (the client left): stop it
                        speech.cancelled = True
                        self.daemon.scheduler.poke()
                    session.speech = None
        finally:
            if reply is not None:
                self._forget(reply)

    async def _take_turn(self, msg: m.Message, session: Session, ticket: int, reply: Reply | None) -> Speech | None:
        """A command's work in its turn; for a speak, the reply to stream (None if it already ended)."""
        try:
            if isinstance(msg, m.OpenSession) and ticket > 0:  # (a new session's open has ticket 0)
                raise CommandError("session_exists", f"session {session.name!r} is already open")
            if session.closed:  # closed by a command before this one
                raise CommandError("unknown_session", f"session {session.name!r} was closed")
            if isinstance(msg, m.OpenSession):
                await self._open(session)
            elif isinstance(msg, m.CloseSession):
                await self._close(session)
            elif isinstance(msg, m.AddContext):
                await self._add_context(session, msg)
            elif isinstance(msg, m.ClearContext):
                await self._run(session.context.clear)
                await self.send(m.ContextCleared(session=session.name))
            elif isinstance(msg, m.Speak):
                assert reply is not None
                return await self._start_speaking(session, msg, reply)
            elif isinstance(msg, m.TrimContext):
                await self._trim(session, msg)
        except CommandError as exc:
            error = self._error(exc, request=getattr(msg, "request", None), session=session.name)
            if reply is None:
                await self.send(error)
            else:
                await self._end_reply(reply, error)
        return None

    @staticmethod
    def _error(exc: CommandError, request: str | None, session: str | None) -> m.Error:
        return m.Error(code=exc.code, message=exc.message, fatal=False, request=request, session=session)

    async def _run(self, fn: Callable[[], T]) -> T:
        """Run on the model thread, turning the engine's refusals into command errors."""
        return await self._guarded(self.daemon.worker.run(fn))

    async def _in_thread(self, fn: Callable[[], T]) -> T:
        """Run CPU work that is not the model's (decoding, resampling) in a thread: never on the event loop.
        `fn` touches nothing shared, so a cancelled caller (its client gone, or shutdown) need not wait for it."""
        work = trio.to_thread.run_sync(fn, limiter=self.daemon.audio_threads, abandon_on_cancel=True)
        return await self._guarded(work)

    async def _guarded(self, work: Awaitable[T]) -> T:
        # The user's mistakes were refused at the edge (limits.py); what the engine still refuses is about the
        # state of the context (busy, full, a reply no longer there). Anything else is a fault of the daemon:
        # logged with its traceback and reported as "internal", never blamed on the client.
        try:
            return await work
        except validation.LimitError as exc:
            raise CommandError(exc.code, exc.message) from exc
        except ContextBusyError as exc:
            raise CommandError("busy", str(exc)) from exc
        except ContextOverflowError as exc:
            raise CommandError("context_overflow", str(exc)) from exc
        except ContextRequestError as exc:
            raise CommandError("invalid_params", str(exc)) from exc
        except MemoryError as exc:
            log.exception("out of memory in a command")
            raise CommandError("out_of_memory", "the daemon ran out of memory for this command") from exc
        except Exception as exc:
            log.exception("command failed (a bug)")
            raise CommandError("internal", f"{type(exc).__name__}: {exc}") from exc

    def _new_session(self, name: str) -> Session:
        """Register the session at once, so the commands sent right after `session.open` find it."""
        if self.daemon.sessions_open >= self.daemon.max_sessions:
            raise CommandError("too_many_sessions", f"the daemon holds {self.daemon.max_sessions} sessions at most")
        per_connection = self.daemon.limits.max_sessions_per_connection
        if len(self._open_sessions) >= per_connection:
            raise CommandError("too_many_sessions", f"one connection holds {per_connection} sessions at most")
        self.daemon.sessions_open += 1
        session = Session(name)
        self.sessions[name] = session
        self._open_sessions.add(session)
        return session

    async def _open(self, session: Session) -> None:
        try:
            session.context = await self._run(self.daemon.generator.new_context)  # KV cache made on the model thread
        except CommandError:
            self._drop(session)
            raise
        await self.send(m.SessionOpened(session=session.name))

    async def _trim(self, session: Session, msg: m.TrimContext) -> None:
        utterance = session.replies.get(msg.request)
        if utterance is None:
            raise CommandError("no_such_request", f"no reply {msg.request!r} in session {session.name!r}")
        try:
            validation.check_text(msg.text)
        except validation.LimitError as exc:
            raise CommandError(exc.code, exc.message) from exc
        if msg.frames > len(utterance.frames):
            made = len(utterance.frames)
            raise CommandError(
                "invalid_params", f"'frames' must be in 0..{made} (the reply made {made}), got {msg.frames}"
            )
        await self._run(partial(session.context.trim_reply, utterance, msg.frames, msg.text))
        await self.send(m.ContextTrimmed(session=session.name, rows=session.context.length))

    async def _close(self, session: Session) -> None:
        if session.speech is not None:
            reply = self.replies.get(session.speech.request)
            if reply is not None:
                self._stop(reply)
                await reply.ended.wait()  # its audio.end went out first
        self._drop(session)
        await self.send(m.SessionClosed(session=session.name))

    def _drop(self, session: Session) -> None:
        if not session.closed:
            session.closed = True
            self.daemon.session_closed()
            self._open_sessions.discard(session)
            if not self._open_sessions:  # idle from now on
                self._last_activity = trio.current_time()
                self._refresh_deadline()
        if self.sessions.get(session.name) is session:  # (a session.open read since may have replaced it)
            del self.sessions[session.name]

    async def _add_context(self, session: Session, msg: m.AddContext) -> None:
        try:
            validation.check_context(msg, self.daemon.window)
        except validation.LimitError as exc:
            raise CommandError(exc.code, exc.message) from exc
        mimi = self.daemon.mimi
        codes = None
        if msg.audio is not None:
            assert msg.rate is not None and msg.format is not None  # the protocol checked they come together
            pcm = await self._in_thread(partial(context_samples, msg.audio, msg.format, msg.rate))
            codes = (await self._run(lambda: mimi.encode(pcm))).T
        segment = Segment(msg.speaker, msg.text, codes, pinned=msg.pinned)
        await self._run(lambda: session.context.append(segment))
        frames = 0 if codes is None else len(codes)
        await self.send(m.ContextAdded(session=session.name, frames=frames, rows=session.context.length))

    async def _start_speaking(self, session: Session, msg: m.Speak, reply: Reply) -> Speech | None:
        """Prefill and announce a reply; None if it was cancelled before its first frame (then it has ended)."""
        if session.speech is not None and session.speech.cancelled:
            await session.speech.retired.wait()  # a speak right after a cancel waits for it, not "busy"
        # The seed is drawn here, so that a reply cancelled before its prefill still reports the seed it had.
        params = reply.params if reply.params.seed is not None else reply.params.replace(seed=secrets.randbits(31))
        fmt: m.Format = msg.format or "pcm_s16le"
        start = m.AudioStart(
            request=msg.request,
            session=session.name,
            sample_rate=m.SAMPLE_RATE,
            format=fmt,
            frame_samples=m.FRAME_SAMPLES,
            seed=params.seed,  # type: ignore[arg-type]  # set just above
        )
        if reply.cancelled:  # cancelled while it waited for its session: nothing is generated
            await self._end_cancelled(reply, start)
            return None
        generator = self.daemon.generator
        utterance = await self._run(lambda: generator.start(session.context, msg.text, msg.speaker, params))
        session.replies[msg.request] = utterance
        while len(session.replies) > RECENT_REPLIES:  # only recent replies can be trimmed: memory stays bounded
            del session.replies[next(iter(session.replies))]
        if reply.cancelled:  # cancelled during the prefill: it joins the context with no frames
            await self._run(utterance.cancel)
            await self._end_cancelled(reply, start)
            return None
        speech = Speech(msg.request, session.name, utterance, StreamingDecoder(self.daemon.mimi))
        session.speech = speech
        reply.speech = speech
        await self.send(start)
        self.daemon.scheduler.add(speech)
        return speech

    async def _end_cancelled(self, reply: Reply, start: m.AudioStart) -> None:
        total_ms = 1000 * (time.perf_counter() - reply.accepted)
        end = m.AudioEnd(request=reply.request, reason="cancelled", frames=0, total_ms=total_ms)
        await self._end_reply(reply, start, end)

    async def _forward(self, speech: Speech, reply: Reply, fmt: m.Format) -> None:
        """Reply audio from the scheduler to the socket, in order, then its audio.end (once, whatever ended it)."""
        async for item in speech.receive_audio:
            self.daemon.scheduler.poke()  # a slot came free: this reply may be advanced again
            if isinstance(item, Chunk):
                pcm = encode_pcm(item.pcm, fmt)
                chunk = m.AudioChunk(request=speech.request, seq=speech.frames_sent, frame=item.frame, pcm=pcm)
                async with self._send_lock:
                    # Checked under the lock: once cancelled, nothing but the audio.end below goes out.
                    if speech.cancelled:
                        continue
                    await self.stream.send_all(self.conn.send(chunk))
                    speech.frames_sent += 1
                continue
            if speech.cancelled:
                continue
            outgoing: list[m.Message] = [self._audio_end(speech, item.reason, item.total_ms, item.first_audio_ms)]
            if item.error:
                error = m.Error(
                    code="internal", message=item.error[:MAX_ERROR_MESSAGE], fatal=False, request=speech.request
                )
                outgoing.insert(0, error)
            await self._end_reply(reply, *outgoing)
            return
        # The channel closed without an end record: the reply was cancelled (by a cancel, the session's close or
        # the connection's end). The scheduler has let go of it, so its context is free once this goes out.
        end = speech.end("cancelled")
        await self._end_reply(reply, self._audio_end(speech, "cancelled", end.total_ms, end.first_audio_ms))

    @staticmethod
    def _audio_end(speech: Speech, reason: m.EndReason, total_ms: float, first_audio_ms: float) -> m.AudioEnd:
        first = first_audio_ms if speech.frames_sent else None
        return m.AudioEnd(request=speech.request, reason=reason, frames=speech.frames_sent, total_ms=total_ms,
                          first_audio_ms=first)  # fmt: skip

    async def _end_reply(self, reply: Reply, *messages: m.Message) -> None:
        """Send a reply's last messages. It is forgotten in the same critical section, so a cancel read before
        them is answered `cancelled` after them, and one read later `no_such_request` (also after them)."""
        async with self._send_lock:
            if reply.ended.is_set():
                return
            self._forget(reply)
            try:
                await self.stream.send_all(b"".join(self.conn.send(msg) for msg in messages))
            finally:
                reply.ended.set()

    def _forget(self, reply: Reply) -> None:
        if self.replies.get(reply.request) is reply:
            del self.replies[reply.request]

    async def _cancel(self, msg: m.Cancel, nursery: trio.Nursery) -> None:
        reply = self.replies.get(msg.request)
        if reply is None:
            message = f"no request {msg.request!r} in flight (never sent, or its audio.end already went out)"
            await self.send(m.Error(code="no_such_request", message=message, fatal=False, request=msg.request))
            return
        self._stop(reply)
        nursery.start_soon(self._acknowledge, reply)  # it waits for the frame boundary: keep reading meanwhile

    async def _acknowledge(self, reply: Reply) -> None:
        await reply.ended.wait()
        await self.send(m.Cancelled(request=reply.request, frames_sent=reply.frames_sent))

    def _stop(self, reply: Reply) -> None:
        """End a reply soon: audio already queued is dropped, generation stops at the next frame boundary, and
        its forwarder sends the audio.end (a reply still waiting for its session or prefill ends right then)."""
        reply.cancelled = True
        if reply.speech is not None:
            reply.speech.cancelled = True
            self.daemon.scheduler.poke()

    async def say_goodbye(self) -> None:
        """Shutdown: each reply in flight ends with an `error` (and its audio.end if its audio had started),
        then a fatal `error`; nothing more is sent or read on this connection."""
        with trio.move_on_after(SHUTDOWN_GRACE_SECONDS):
            async with self._send_lock:
                data = b""
                with contextlib.suppress(ProtocolError):  # a connection that already ended has nothing to hear
                    for reply in list(self.replies.values()):
                        self._stop(reply)
                        self._forget(reply)
                        reply.ended.set()
                        message = "the daemon is shutting down"
                        data += self.conn.send(m.Error(code="shutting_down", message=message, fatal=False,
                                                       request=reply.request, session=reply.session))  # fmt: skip
                        if reply.speech is not None and reply.request in self.conn.open_streams:
                            end = reply.speech.end("error")
                            data += self.conn.send(self._audio_end(reply.speech, "error", end.total_ms,
                                                                   end.first_audio_ms))  # fmt: skip
                    data += self.conn.send(m.Error(code="shutting_down", message="the daemon is shutting down",
                                                   fatal=True))  # fmt: skip
                if data:
                    await self.stream.send_all(data)
                if self._nursery is not None:
                    # Still under the lock, so every task waiting to send is cancelled rather than let in.
                    self._nursery.cancel_scope.cancel()

    def _abandon(self) -> None:
        """The client is gone: stop its replies and free its sessions."""
        for reply in self.replies.values():
            self._stop(reply)
        self.daemon.scheduler.poke()
        for session in list(self._open_sessions):
            self._drop(session)


def context_samples(audio: bytes, fmt: m.Format, rate: int) -> np.ndarray:
    """A context.add's audio as float samples at 24 kHz, checked (run in a thread: it may be megabytes)."""
    pcm = decode_pcm(audio, fmt)
    if not np.isfinite(pcm).all():
        raise validation.LimitError("invalid_params", "'audio' holds NaN or infinite samples")
    return io.resample(pcm, rate, m.SAMPLE_RATE) if rate != m.SAMPLE_RATE else pcm


def peer_is_allowed(sock: trio.socket.SocketType) -> bool:
    """Only our own user (or root) may talk to the daemon: checked with the kernel's record of the peer."""
    return peercred.is_trusted(peercred.peer_uid(sock))


def default_socket_dir() -> Path:
    """Where the daemon's socket lives unless --socket says otherwise: a directory private to this user.

    $XDG_RUNTIME_DIR/csmd where the session has one (Linux desktops; per-user, 0700, cleared at logout); on
    macOS $TMPDIR/csmd (launchd gives each user a private TMPDIR under /var/folders); else /tmp/csmd-UID.
    """
    runtime_dir = os.environ.get("XDG_RUNTIME_DIR")
    if runtime_dir:
        return Path(runtime_dir) / "csmd"
    temp_dir = os.environ.get("TMPDIR")
    if sys.platform == "darwin" and temp_dir:
        return Path(temp_dir) / "csmd"
    return Path(f"/tmp/csmd-{os.getuid()}")


def default_socket_path() -> Path:
    """`default_socket_dir()/csmd.sock`; the directory, if it exists, must be private to us."""
    base = default_socket_dir()
    if base.exists():
        st = base.lstat()
        # In a shared /tmp someone else could have made the directory first: never put our socket in it.
        if base.is_symlink() or st.st_uid != os.getuid() or st.st_mode & 0o077:
            raise DaemonRunningError(f"{base} is not a private directory of this user; remove it or use --socket")
    return base / "csmd.sock"


class DaemonRunningError(RuntimeError):
    pass


class SharedSocketDirError(PermissionError):
    """The socket's directory (or one above it) lets another user replace the socket."""


def check_socket_dir(directory: Path) -> None:
    """Refuse a socket directory where another user could move our socket aside and put their own in its place.

    The directory itself must belong to us or root and be writable by nobody else (no group or other write bit,
    sticky or not: csmd's default is its own subdirectory, never /tmp itself). Each directory above it must
    belong to us or root and be writable by nobody else unless sticky (as /tmp is: others cannot rename what
    is ours in it).
    """
    me = os.geteuid()
    resolved = directory.resolve()
    hint = "use a directory only you can write (mode 0700), or pass --allow-shared-socket-dir to serve there anyway"
    st = resolved.stat()
    if st.st_uid not in (me, 0):
        raise SharedSocketDirError(f"socket directory {directory} belongs to uid {st.st_uid}: {hint}")
    if st.st_mode & 0o022:
        mode = stat.S_IMODE(st.st_mode)
        raise SharedSocketDirError(f"socket directory {directory} is writable by other users (mode {mode:04o}): {hint}")
    for parent in resolved.parents:
        st = parent.stat()
        shared = st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX
        if st.st_uid not in (me, 0) or shared:
            mode = stat.S_IMODE(st.st_mode)
            raise SharedSocketDirError(
                f"{parent}, above the socket directory {directory}, can be changed by another user "
                f"(uid {st.st_uid}, mode {mode:04o}): {hint}"
            )


def max_socket_path_bytes() -> int:
    """The longest Unix socket path, leaving room for the terminating NUL C clients expect: sun_path is 108
    bytes on Linux, 104 on macOS and the BSDs."""
    return (108 if sys.platform.startswith("linux") else 104) - 1


async def bind_unix_socket(path: Path, *, allow_shared_dir: bool = False) -> trio.socket.SocketType:
    """Bind `path` (mode 0600, in a 0700 directory if we create it), replacing a stale socket file.

    The directory must be private (`check_socket_dir`) unless `allow_shared_dir`."""
    size = len(os.fsencode(path))
    if size > max_socket_path_bytes():
        raise ValueError(
            f"socket path {path} is {size} bytes, longer than Unix sockets allow here ({max_socket_path_bytes()}): "
            "choose a shorter --socket"
        )
    if not path.parent.exists():
        path.parent.mkdir(mode=0o700, parents=True)
    if not allow_shared_dir:
        check_socket_dir(path.parent)
    if path.exists() or path.is_symlink():
        if not path.is_socket():
            raise DaemonRunningError(f"{path} exists and is not a socket; refusing to replace it")
        probe = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            path.unlink()  # a stale file from a daemon that died
        else:
            raise DaemonRunningError(f"a csmd daemon is already listening on {path}")
        finally:
            probe.close()
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # the socket file is created 0600: no window where others could connect
    try:
        await sock.bind(str(path))
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    sock.listen(64)
    return sock


def remove_own_socket(path: Path, bound: os.stat_result) -> None:
    """Unlink `path` if it is still the socket file this daemon bound (same device and inode), else leave it:
    whoever put another file there owns it."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if (st.st_dev, st.st_ino) != (bound.st_dev, bound.st_ino):
        log.warning("%s is no longer the socket this daemon bound (now owned by uid %d): leaving it", path, st.st_uid)
        return
    path.unlink()


async def serve_until_signal(
    daemon: Daemon, path: Path, announce: Callable[[Path], None] | None = None, *, allow_shared_dir: bool = False
) -> None:
    """`csmd serve`: serve until SIGINT or SIGTERM, then shut down cleanly (the socket file goes too).

    Clients are told first (their replies in flight end with an `error`, then a fatal `error` "shutting_down"),
    then the model thread stops once its current job is done. A model thread that does not stop within
    WORKER_STOP_SECONDS (a job that never ends: a bug) cannot hold the process: it exits at once, status 1.
    """
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(daemon.serve, allow_shared_dir=allow_shared_dir), path)
            if announce is not None:
                announce(path)
            async for signum in signals:
                log.info("%s: shutting down", signal.Signals(signum).name)
                break
            await daemon.say_goodbye()
            nursery.cancel_scope.cancel()
    if not daemon.close(timeout=WORKER_STOP_SECONDS):
        log.error("the model thread did not stop within %g s (a job that never ends: a bug); exiting anyway",
                  WORKER_STOP_SECONDS)  # fmt: skip
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)  # a normal exit would wait on the thread (and the native pool) forever
