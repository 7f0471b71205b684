"""One client connection: its reader, its deadlines, and the commands it sends, each dispatched by type.

The reader (`_read`) parses with the sans-IO `Connection` and hands each message to the handler its type has
in `_ON_READ`: pings and cancels are answered at once, a speak is checked and registered (a `Reply`) as it is
read, and every session command gets its ticket in reading order and runs in a task of its own, where it
waits for its session's turn and then does the work its type has in `_IN_TURN` (a speak: prefill, then the
forwarding of its audio). The reader never waits for a turn: it stops reading only when MAX_COMMANDS_AHEAD
commands have been read and not yet done. A connection's sessions and replies die with it.

Every speak the daemon accepts ends with exactly one `audio.end` (or an `error` with its request id), and
every cancel gets exactly one answer: `cancelled`, after that `audio.end`, if the request was still in
flight when the cancel was read; `no_such_request` otherwise. A refused command is a `RequestError`, sent
as a non-fatal `error` naming its session (and request); the connection lives on.
"""

from __future__ import annotations

import contextlib
import logging
import math
import secrets
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import numpy as np
import trio

from csmd.audio import io
from csmd.audio.mimi.model import OfflineEncoder, StreamingDecoder
from csmd.daemon import validation
from csmd.daemon.scheduler import DecodedFrame, Generation
from csmd.daemon.session import Reply, Session
from csmd.daemon.unix_socket import peer_is_allowed
from csmd.model.generator import ContextBusyError, ContextOverflowError, ContextRequestError, Segment
from csmd.protocol import messages as m
from csmd.protocol.connection import Connection, ConnectionClosed, State
from csmd.protocol.errors import ProtocolError, RequestError
from csmd.protocol.pcm import decode_pcm, encode_pcm

if TYPE_CHECKING:
    from csmd.daemon.server import Daemon

log = logging.getLogger("csmd.daemon")
T = TypeVar("T")
RECEIVE_BYTES = 64 * 1024
FAREWELL_SECONDS = 1.0  # after a fatal error, how long the daemon still reads (and drops) what the client sends
MAX_COMMANDS_AHEAD = 8  # per connection: commands read but not yet done; beyond that the reader waits
MAX_ERROR_MESSAGE = 1000  # characters of an error's text: engine messages can quote anything
SHUTDOWN_GRACE_SECONDS = 2.0  # to tell every client why its replies end (a client not reading is left behind)
ENCODE_PIECE_FRAMES = 8  # context audio encoded 0.64 s a job: ~50 ms with the full codec, under one 80 ms frame

# The commands that belong to a session: each waits for the session's turn.
SessionCommand = m.OpenSession | m.CloseSession | m.AddContext | m.ClearContext | m.TrimContext | m.Speak
# A handler of one message type: the message (of that type) and the connection's nursery.
OnRead = Callable[["ClientHandler", Any, trio.Nursery], Awaitable[None]]
InTurn = Callable[["ClientHandler", Session, Any], Awaitable[None]]


def refusal(exc: RequestError, *, request: str | None = None, session: str | None = None) -> m.Error:
    """The non-fatal `error` that tells the client a request or command was refused (or failed)."""
    message = exc.message[:MAX_ERROR_MESSAGE]
    return m.Error(code=exc.code, message=message, fatal=False, request=request, session=session)


def request_of(msg: SessionCommand) -> str | None:
    """The request id a session command names, for its error: a speak's own, or the reply a trim is about."""
    return msg.request if isinstance(msg, m.Speak | m.TrimContext) else None


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
                if isinstance(event, ConnectionClosed):
                    return
                await self._ON_READ[type(event)](self, event, nursery)
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

    # Messages as they are read (the Connection already refused what the protocol does not allow).

    async def _hello(self, msg: m.Hello, nursery: trio.Nursery) -> None:
        await self.send(self.daemon.welcome())

    async def _ping(self, msg: m.Ping, nursery: trio.Nursery) -> None:
        await self.send(m.Pong(nonce=msg.nonce))

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

    async def _accept(self, msg: m.Speak, nursery: trio.Nursery) -> None:
        """A speak is checked and registered as it is read: from now on a cancel finds it."""
        try:
            if msg.request in self.replies:
                raise RequestError(
                    "duplicate_request",
                    f"request {msg.request!r} is still in flight on this connection (in any session)",
                )
            params = validation.speak_params(msg, self.daemon.window)
        except RequestError as exc:
            await self.send(refusal(exc, request=msg.request, session=msg.session))
            return
        reply = Reply(msg.request, msg.session, params, msg.format or "pcm_s16le")
        self.replies[msg.request] = reply
        await self._queue(msg, nursery, reply)

    async def _queue(self, msg: SessionCommand, nursery: trio.Nursery, reply: Reply | None = None) -> None:
        """Give a session command its ticket now, in reading order, and run it in a task of its own: it waits
        for its turn there (so its answer, or its error, comes in order), while the reader reads on."""
        await self._ahead.acquire()  # backpressure: a client may not queue unbounded work
        session = self.sessions.get(msg.session)
        try:
            if isinstance(msg, m.OpenSession) and (session is None or session.closing):
                session = self._new_session(msg.session)  # registered now: the commands read next find it
            elif session is None:
                raise RequestError("unknown_session", f"no session {msg.session!r} on this connection")
            if isinstance(msg, m.CloseSession):
                session.closing = True
        except RequestError as exc:
            self._ahead.release()
            error = refusal(exc, request=request_of(msg), session=msg.session)
            if reply is None:
                await self.send(error)
            else:
                await self._end_reply(reply, error)
            return
        ticket = session.take_ticket()
        if reply is None:
            nursery.start_soon(self._command, msg, session, ticket)
        else:
            assert isinstance(msg, m.Speak)
            nursery.start_soon(self._speak, msg, session, ticket, reply)

    # Session commands, each in its own task and its session's turn.

    async def _command(self, msg: SessionCommand, session: Session, ticket: int) -> None:
        try:
            async with session.turn(ticket):  # answers and errors go out within the turn: in order
                try:
                    self._check_turn(msg, session, ticket)
                    await self._IN_TURN[type(msg)](self, session, msg)
                except RequestError as exc:
                    await self.send(refusal(exc, request=request_of(msg), session=session.name))
        finally:
            self._ahead.release()

    async def _speak(self, msg: m.Speak, session: Session, ticket: int, reply: Reply) -> None:
        try:
            try:
                async with session.turn(ticket):
                    try:
                        self._check_turn(msg, session, ticket)
                        streaming = await self._start_speaking(session, msg, reply)
                    except RequestError as exc:
                        await self._end_reply(reply, refusal(exc, request=msg.request, session=session.name))
                        streaming = False
            finally:
                self._ahead.release()
            if streaming:  # streaming happens after the turn: a context.add meanwhile is "busy"
                assert reply.generation is not None
                try:
                    await self._forward(reply)
                finally:
                    self.daemon.scheduler.stop(reply.generation)  # (if the client left: nobody reads it any more)
                    session.streaming = None
        finally:
            self._forget(reply)

    @staticmethod
    def _check_turn(msg: SessionCommand, session: Session, ticket: int) -> None:
        if isinstance(msg, m.OpenSession) and ticket > 0:  # (a new session's open has ticket 0)
            raise RequestError("session_exists", f"session {session.name!r} is already open")
        if session.closed:  # closed by a command before this one
            raise RequestError("unknown_session", f"session {session.name!r} was closed")

    async def _run(self, fn: Callable[[], T]) -> T:
        """Run on the model thread, turning the engine's refusals into request errors."""
        return await self._guarded(self.daemon.worker.run(fn))

    async def _prefill(self, prefill: Callable[[int], int], until: Callable[[], bool] = lambda: False) -> None:
        """Run a prefill to its end (or until `until()`), a chunk per frame boundary: other sessions keep
        speaking meanwhile, each delayed about one frame per chunk."""
        while not until():
            if await self._guarded(self.daemon.scheduler.prefill_chunk(prefill)) == 0:
                return

    async def _in_thread(self, fn: Callable[[], T]) -> T:
        """Run CPU work that is not the model's (decoding, resampling) in a thread: never on the event loop.
        `fn` touches nothing shared, so a cancelled caller (its client gone, or shutdown) need not wait for it."""
        work = trio.to_thread.run_sync(fn, limiter=self.daemon.audio_threads, abandon_on_cancel=True)
        return await self._guarded(work)

    async def _guarded(self, work: Awaitable[T]) -> T:
        # The user's mistakes were refused at the edge (validation.py); what the engine still refuses is about
        # the state of the context (busy, full, a reply no longer there). Anything else is a fault of the daemon:
        # logged with its traceback and reported as "internal", never blamed on the client.
        try:
            return await work
        except RequestError:
            raise
        except ContextBusyError as exc:
            raise RequestError("busy", str(exc)) from exc
        except ContextOverflowError as exc:
            raise RequestError("context_overflow", str(exc)) from exc
        except ContextRequestError as exc:
            raise RequestError("invalid_params", str(exc)) from exc
        except MemoryError as exc:
            log.exception("out of memory in a command")
            raise RequestError("out_of_memory", "the daemon ran out of memory for this command") from exc
        except Exception as exc:
            log.exception("command failed (a bug)")
            raise RequestError("internal", f"{type(exc).__name__}: {exc}") from exc

    def _new_session(self, name: str) -> Session:
        """Register the session at once, so the commands sent right after `session.open` find it."""
        if self.daemon.sessions_open >= self.daemon.max_sessions:
            raise RequestError("too_many_sessions", f"the daemon holds {self.daemon.max_sessions} sessions at most")
        per_connection = self.daemon.limits.max_sessions_per_connection
        if len(self._open_sessions) >= per_connection:
            raise RequestError("too_many_sessions", f"one connection holds {per_connection} sessions at most")
        self.daemon.sessions_open += 1
        session = Session(name)
        self.sessions[name] = session
        self._open_sessions.add(session)
        return session

    async def _open(self, session: Session, msg: m.OpenSession) -> None:
        try:
            session.context = await self._run(self.daemon.generator.new_context)  # KV cache made on the model thread
        except RequestError:
            self._drop(session)
            raise
        await self.send(m.SessionOpened(session=session.name))

    async def _close(self, session: Session, msg: m.CloseSession) -> None:
        reply = session.streaming
        if reply is not None and not reply.ended.is_set():
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
        validation.check_context(msg, self.daemon.window)
        mimi = self.daemon.mimi
        codes = None
        if msg.audio is not None:
            assert msg.rate is not None and msg.format is not None  # the protocol checked they come together
            pcm = await self._in_thread(partial(context_samples, msg.audio, msg.format, msg.rate))
            # In pieces, each its own model-thread job: other sessions' frames run between them, so one long
            # clip delays their streams by about one piece, not by the whole encode.
            encoder = OfflineEncoder(mimi, pcm, chunk_frames=ENCODE_PIECE_FRAMES)
            while not encoder.done:
                await self._guarded(self.daemon.scheduler.between_frames(encoder.step))
            codes = encoder.codes().T
        segment = Segment(msg.speaker, msg.text, codes, pinned=msg.pinned)
        context = session.context
        await self._run(lambda: context.append(segment, prefill=False))
        await self._prefill(context.prefill)  # between other sessions' frames, a chunk at a time
        frames = 0 if codes is None else len(codes)
        await self.send(m.ContextAdded(session=session.name, frames=frames, rows=session.context.length))

    async def _clear(self, session: Session, msg: m.ClearContext) -> None:
        await self._run(session.context.clear)
        await self.send(m.ContextCleared(session=session.name))

    async def _trim(self, session: Session, msg: m.TrimContext) -> None:
        utterance = session.utterances.get(msg.request)
        if utterance is None:
            raise RequestError("no_such_request", f"no reply {msg.request!r} in session {session.name!r}")
        validation.check_text(msg.text)
        if msg.frames > len(utterance.frames):
            made = len(utterance.frames)
            raise RequestError(
                "invalid_params", f"'frames' must be in 0..{made} (the reply made {made}), got {msg.frames}"
            )
        await self._run(partial(session.context.trim_reply, utterance, msg.frames, msg.text))
        await self.send(m.ContextTrimmed(session=session.name, rows=session.context.length))

    # A speak's reply: prefill, hand-off to the scheduler, forwarding, its end.

    async def _start_speaking(self, session: Session, msg: m.Speak, reply: Reply) -> bool:
        """Prefill and announce a reply, and hand its generation to the scheduler; False if it was cancelled
        before its first frame (then it has ended)."""
        previous = session.streaming
        if previous is not None and previous.cancelled:
            assert previous.generation is not None
            await previous.generation.retired.wait()  # a speak right after a cancel waits for it, not "busy"
        # The seed is drawn here, so that a reply cancelled before its prefill still reports the seed it had.
        seed = reply.params.seed if reply.params.seed is not None else secrets.randbits(31)
        params = reply.params.replace(seed=seed)
        start = m.AudioStart(
            request=msg.request,
            session=session.name,
            sample_rate=m.SAMPLE_RATE,
            format=reply.format,
            frame_samples=m.FRAME_SAMPLES,
            seed=seed,
        )
        if reply.cancelled:  # cancelled while it waited for its session: nothing is generated
            await self._end_reply(reply, start, reply.audio_end("cancelled"))
            return False
        generator = self.daemon.generator
        utterance = await self._run(lambda: generator.begin(session.context, msg.text, msg.speaker, params))
        session.remember(msg.request, utterance)
        await self._prefill(utterance.prefill, until=lambda: reply.cancelled)
        if reply.cancelled:  # cancelled during the prefill: it joins the context with no frames
            await self._run(utterance.cancel)
            await self._end_reply(reply, start, reply.audio_end("cancelled"))
            return False
        reply.generation = Generation(msg.request, utterance, StreamingDecoder(self.daemon.mimi))
        session.streaming = reply
        await self.send(start)
        self.daemon.scheduler.add(reply.generation)
        return True

    async def _forward(self, reply: Reply) -> None:
        """Reply audio from the scheduler to the socket, in order, then its audio.end (once, whatever ended it)."""
        assert reply.generation is not None
        scheduler = self.daemon.scheduler
        while (item := await scheduler.receive(reply.generation)) is not None:
            if isinstance(item, DecodedFrame):
                pcm = encode_pcm(item.pcm, reply.format)
                chunk = m.AudioChunk(request=reply.request, seq=reply.frames_sent, frame=item.index, pcm=pcm)
                async with self._send_lock:
                    # Checked under the lock: once cancelled, nothing but the audio.end below goes out.
                    if reply.cancelled:
                        continue
                    handed_at = time.perf_counter()
                    await self.stream.send_all(self.conn.send(chunk))
                    reply.chunk_sent(handed_at)
                continue
            if reply.cancelled:
                continue
            outgoing: list[m.Message] = [reply.audio_end(item.reason)]
            if item.error:
                outgoing.insert(0, refusal(RequestError("internal", item.error), request=reply.request))
            await self._end_reply(reply, *outgoing)
            return
        # The channel closed without an end record: the reply was cancelled (by a cancel, the session's close or
        # the connection's end). The scheduler has let go of it, so its context is free once this goes out.
        await self._end_reply(reply, reply.audio_end("cancelled"))

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

    def _stop(self, reply: Reply) -> None:
        """End a reply soon: audio already queued is dropped, generation stops at the next frame boundary, and
        its forwarder sends the audio.end (a reply still waiting for its session or prefill ends right then)."""
        reply.cancelled = True
        if reply.generation is not None:
            self.daemon.scheduler.stop(reply.generation)

    async def say_goodbye(self) -> None:
        """Shutdown: each reply in flight ends with an `error` (and its audio.end if its audio had started),
        then a fatal `error`; nothing more is sent or read on this connection."""
        message = "the daemon is shutting down"
        with trio.move_on_after(SHUTDOWN_GRACE_SECONDS):
            async with self._send_lock:
                data = b""
                with contextlib.suppress(ProtocolError):  # a connection that already ended has nothing to hear
                    for reply in list(self.replies.values()):
                        self._stop(reply)
                        self._forget(reply)
                        reply.ended.set()
                        data += self.conn.send(m.Error(code="shutting_down", message=message, fatal=False,
                                                       request=reply.request, session=reply.session))  # fmt: skip
                        if reply.generation is not None and reply.request in self.conn.open_streams:
                            data += self.conn.send(reply.audio_end("error"))
                    data += self.conn.send(m.Error(code="shutting_down", message=message, fatal=True))
                if data:
                    await self.stream.send_all(data)
                if self._nursery is not None:
                    # Still under the lock, so every task waiting to send is cancelled rather than let in.
                    self._nursery.cancel_scope.cancel()

    def _abandon(self) -> None:
        """The client is gone: stop its replies and free its sessions."""
        for reply in self.replies.values():
            self._stop(reply)
        for session in list(self._open_sessions):
            self._drop(session)

    # What each message type does: as it is read, and (a session command other than speak) in its turn.
    _ON_READ: ClassVar[dict[type[m.Message], OnRead]] = {
        m.Hello: _hello,
        m.Ping: _ping,
        m.Cancel: _cancel,
        m.Speak: _accept,
        m.OpenSession: _queue,
        m.CloseSession: _queue,
        m.AddContext: _queue,
        m.ClearContext: _queue,
        m.TrimContext: _queue,
    }
    _IN_TURN: ClassVar[dict[type[m.Message], InTurn]] = {
        m.OpenSession: _open,
        m.CloseSession: _close,
        m.AddContext: _add_context,
        m.ClearContext: _clear,
        m.TrimContext: _trim,
    }


def context_samples(audio: bytes, fmt: m.Format, rate: int) -> np.ndarray:
    """A context.add's audio as float samples at 24 kHz, checked (run in a thread: it may be megabytes)."""
    pcm = decode_pcm(audio, fmt)
    if not np.isfinite(pcm).all():
        raise RequestError("invalid_params", "'audio' holds NaN or infinite samples")
    return io.resample(pcm, rate, m.SAMPLE_RATE) if rate != m.SAMPLE_RATE else pcm
