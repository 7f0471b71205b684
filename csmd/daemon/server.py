"""The daemon: a trio server on a Unix socket speaking protocol v1, one handler per connection.

Per connection: a reader loop (parses with the sans-IO `Connection`, answers pings and cancels at once) and
a task per command, so a slow command (a prefill, encoding context audio) never delays a cancel. Commands of
one session run in order (a lock per session). Each reply's audio is forwarded by its own task from the
reply's bounded channel to the socket. A connection's sessions and replies die with it.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TypeVar

import numpy as np
import trio

import csmd
from csmd.audio import io
from csmd.audio.mimi.model import Mimi, StreamingDecoder
from csmd.daemon.scheduler import Chunk, Scheduler, Speech
from csmd.daemon.worker import ModelWorker
from csmd.model.generator import Context, ContextBusyError, ContextOverflowError, Generator, Segment, Utterance
from csmd.model.sampling import GenerationParams
from csmd.protocol import messages as m
from csmd.protocol.connection import DEFAULT_MAX_MESSAGE, Connection, ConnectionClosed
from csmd.protocol.errors import ProtocolError
from csmd.protocol.pcm import decode_pcm, encode_pcm

log = logging.getLogger("csmd.daemon")
T = TypeVar("T")
RECEIVE_BYTES = 64 * 1024
RECENT_REPLIES = 16  # per session, the replies a client may still trim (context.trim)


class CommandError(Exception):
    """A refused or failed command: reported to the client as a non-fatal error; the connection lives on."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class Session:
    name: str
    context: Context = field(init=False)  # made by the session.open command, which runs first under `lock`
    lock: trio.Lock = field(default_factory=trio.Lock)
    speech: Speech | None = None
    replies: dict[str, Utterance] = field(default_factory=dict)  # for context.trim, by request id


class Daemon:
    """Everything shared by all connections: the model thread, the scheduler, the model and codec."""

    def __init__(self, generator: Generator, mimi: Mimi, model_name: str, max_sessions: int = 8):
        self.generator = generator
        self.mimi = mimi
        self.model_name = model_name
        self.max_sessions = max_sessions
        self.sessions_open = 0
        self.worker = ModelWorker()
        self.scheduler = Scheduler(self.worker)

    def welcome(self) -> m.Welcome:
        return m.Welcome(
            protocol=m.PROTOCOL_VERSION,
            server=f"csmd {csmd.__version__}",
            sample_rate=m.SAMPLE_RATE,
            frame_samples=m.FRAME_SAMPLES,
            formats=m.FORMATS,
            model=self.model_name,
            watermark=False,
            max_message=DEFAULT_MAX_MESSAGE,
            version=csmd.__version__,
        )

    async def serve(self, path: Path, *, task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on `path` until cancelled; the socket file is removed on the way out."""
        listener = await bind_unix_socket(path)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.scheduler.run)
                task_status.started(path)
                await trio.serve_listeners(self._handle, [trio.SocketListener(listener)])
        finally:
            listener.close()
            path.unlink(missing_ok=True)

    async def _handle(self, stream: trio.SocketStream) -> None:
        # Whatever happens to one connection stays with it: the server and the other clients go on.
        try:
            await ClientHandler(self, stream).run()
        except* (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away while we were writing; its handler cleaned up on the way out
        except* Exception:
            log.exception("a connection handler failed")
        finally:
            await stream.aclose()

    def close(self) -> None:
        self.worker.close()


class ClientHandler:
    def __init__(self, daemon: Daemon, stream: trio.SocketStream):
        self.daemon = daemon
        self.stream = stream
        self.conn = Connection(m.Role.SERVER)
        self.sessions: dict[str, Session] = {}
        self.speeches: dict[str, Speech] = {}
        self._send_lock = trio.Lock()

    async def send(self, *messages: m.Message) -> None:
        async with self._send_lock:
            await self.stream.send_all(b"".join(self.conn.send(msg) for msg in messages))

    async def run(self) -> None:
        if not peer_is_allowed(self.stream.socket):
            log.warning("refused a connection from another user")
            await self.send(m.Error(code="forbidden", message="this daemon serves only its own user", fatal=True))
            return
        try:
            async with trio.open_nursery() as nursery:
                try:
                    await self._read(nursery)
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            self._abandon()

    async def _read(self, nursery: trio.Nursery) -> None:
        while True:
            data = await self.stream.receive_some(RECEIVE_BYTES)
            try:
                events = self.conn.receive_data(data)
            except ProtocolError as exc:
                log.info("closing a connection: %s", exc)
                await self.send(m.Error.from_protocol_error(exc))
                return
            for event in events:
                if isinstance(event, ConnectionClosed) or not await self._dispatch(event, nursery):
                    return

    async def _dispatch(self, msg: m.Message, nursery: trio.Nursery) -> bool:
        """Handle one message; False ends the connection."""
        if isinstance(msg, m.Hello):  # (the Connection already refused versions we do not speak)
            await self.send(self.daemon.welcome())
        elif isinstance(msg, m.Ping):
            await self.send(m.Pong(nonce=msg.nonce))
        elif isinstance(msg, m.Cancel):
            nursery.start_soon(self._cancel, msg)  # it waits for a frame boundary: keep reading meanwhile
        else:
            # Each command runs in its own task (a prefill must not hold up a cancel), but `start` returns only
            # once the task holds its session's lock: trio's locks are FIFO, so a session's commands take
            # effect, and are answered, in the order they were sent.
            await nursery.start(self._command, msg)
        return True

    async def _command(self, msg: m.Message, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        session_name = getattr(msg, "session", None)
        request = getattr(msg, "request", None)
        started = False
        try:
            found = self.sessions.get(str(session_name))
            if isinstance(msg, m.OpenSession):
                session = self._new_session(msg.session)
            elif found is None:
                raise CommandError("unknown_session", f"no session {session_name!r} on this connection")
            else:
                session = found
            speech = None
            async with session.lock:
                task_status.started()
                started = True
                if self.sessions.get(session.name) is not session:  # closed while this command waited
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
                    speech = await self._start_speaking(session, msg)
                elif isinstance(msg, m.TrimContext):
                    await self._trim(session, msg)
            if speech is not None:  # streaming happens outside the lock: a context.add meanwhile is "busy"
                try:
                    await self._forward(speech, msg.format or "pcm_s16le")  # type: ignore[attr-defined]
                finally:
                    if not speech.done:  # nobody will read its audio any more (the client left): stop it
                        speech.cancelled = True
                        self.daemon.scheduler.poke()
                    session.speech = None
                    self.speeches.pop(speech.request, None)
        except CommandError as exc:
            if not started:
                task_status.started()
            await self.send(
                m.Error(code=exc.code, message=exc.message, fatal=False, request=request, session=session_name)
            )

    async def _run(self, fn: Callable[[], T]) -> T:
        """Run on the model thread, turning the engine's refusals into command errors."""
        try:
            return await self.daemon.worker.run(fn)
        except ContextBusyError as exc:
            raise CommandError("busy", str(exc)) from exc
        except ContextOverflowError as exc:
            raise CommandError("context_overflow", str(exc)) from exc
        except ValueError as exc:
            raise CommandError("invalid_params", str(exc)) from exc
        except Exception as exc:
            log.exception("command failed")
            raise CommandError("internal", f"{type(exc).__name__}: {exc}") from exc

    def _new_session(self, name: str) -> Session:
        """Register the session at once, so the commands sent right after `session.open` find it."""
        if name in self.sessions:
            raise CommandError("session_exists", f"session {name!r} is already open")
        if self.daemon.sessions_open >= self.daemon.max_sessions:
            raise CommandError("too_many_sessions", f"the daemon holds {self.daemon.max_sessions} sessions at most")
        self.daemon.sessions_open += 1
        session = Session(name)
        self.sessions[name] = session
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
        await self._run(partial(session.context.trim_reply, utterance, msg.frames, msg.text))
        await self.send(m.ContextTrimmed(session=session.name, rows=session.context.length))

    async def _close(self, session: Session) -> None:
        if session.speech is not None:
            await self._stop(session.speech, acknowledge=False)
        self._drop(session)
        await self.send(m.SessionClosed(session=session.name))

    def _drop(self, session: Session) -> None:
        if self.sessions.pop(session.name, None) is not None:
            self.daemon.sessions_open -= 1

    async def _add_context(self, session: Session, msg: m.AddContext) -> None:
        mimi = self.daemon.mimi
        codes = None
        if msg.audio is not None:
            assert msg.rate is not None and msg.format is not None  # the protocol checked they come together
            pcm = decode_pcm(msg.audio, msg.format)
            if pcm.size == 0:
                raise CommandError("invalid_params", "context audio is empty")
            if not np.isfinite(pcm).all():
                raise CommandError("invalid_params", "context audio holds NaN or infinite samples")
            if msg.rate != mimi.config.sample_rate:
                pcm = io.resample(pcm, msg.rate, mimi.config.sample_rate)
            codes = (await self._run(lambda: mimi.encode(pcm))).T
        segment = Segment(msg.speaker, msg.text, codes, pinned=msg.pinned)
        await self._run(lambda: session.context.append(segment))
        frames = 0 if codes is None else len(codes)
        await self.send(m.ContextAdded(session=session.name, frames=frames, rows=session.context.length))

    async def _start_speaking(self, session: Session, msg: m.Speak) -> Speech:
        if session.speech is not None and session.speech.cancelled:
            await session.speech.retired.wait()  # a speak right after a cancel waits for it, not "busy"
        if msg.request in self.speeches:
            raise CommandError("duplicate_request", f"request {msg.request!r} is still running")
        params = _params(msg)
        fmt: m.Format = msg.format or "pcm_s16le"
        generator = self.daemon.generator
        utterance = await self._run(lambda: generator.start(session.context, msg.text, msg.speaker, params))
        speech = Speech(msg.request, session.name, utterance, StreamingDecoder(self.daemon.mimi))
        session.replies[msg.request] = utterance
        while len(session.replies) > RECENT_REPLIES:  # only recent replies can be trimmed: memory stays bounded
            del session.replies[next(iter(session.replies))]
        session.speech = speech
        self.speeches[msg.request] = speech
        await self.send(
            m.AudioStart(
                request=msg.request,
                session=session.name,
                sample_rate=m.SAMPLE_RATE,
                format=fmt,
                frame_samples=m.FRAME_SAMPLES,
                seed=utterance.seed,
            )
        )
        self.daemon.scheduler.add(speech)
        return speech

    async def _forward(self, speech: Speech, fmt: m.Format) -> None:
        """Reply audio from the scheduler to the socket, in order; stops when the reply ends or is cancelled."""
        async for item in speech.receive_audio:
            self.daemon.scheduler.poke()  # a slot came free: this reply may be advanced again
            if isinstance(item, Chunk):
                pcm = encode_pcm(item.pcm, fmt)
                chunk = m.AudioChunk(request=speech.request, seq=speech.frames_sent, frame=item.frame, pcm=pcm)
                outgoing: list[m.Message] = [chunk]
            else:
                outgoing = [
                    m.AudioEnd(
                        request=speech.request,
                        reason=item.reason,
                        frames=speech.frames_sent,
                        total_ms=item.total_ms,
                        first_audio_ms=item.first_audio_ms if speech.frames_sent else None,
                    )
                ]
                if item.error:
                    outgoing.insert(
                        0, m.Error(code="internal", message=item.error, fatal=False, request=speech.request)
                    )
            async with self._send_lock:
                # Checked under the lock: once cancelled, `_stop` speaks for this reply; nothing more goes out.
                if speech.cancelled:
                    continue
                await self.stream.send_all(b"".join(self.conn.send(msg) for msg in outgoing))
                if isinstance(item, Chunk):
                    speech.frames_sent += 1
                else:
                    speech.end_sent = True

    async def _cancel(self, msg: m.Cancel) -> None:
        speech = self.speeches.get(msg.request)
        if speech is None or speech.cancelled:
            message = f"no running request {msg.request!r}"
            error = m.Error(code="no_such_request", message=message, fatal=False, request=msg.request)
            await self.send(error)
            return
        await self._stop(speech, acknowledge=True)

    async def _stop(self, speech: Speech, acknowledge: bool) -> None:
        """End a reply now: audio already queued is dropped, generation stops at the next frame boundary."""
        speech.cancelled = True
        self.daemon.scheduler.poke()
        await speech.retired.wait()  # the frame being made, if any, is finished and dropped; the context is free
        async with self._send_lock:  # frames_sent cannot change while we hold the lock
            data = b""
            if not speech.end_sent:  # (it may have ended by itself just before the cancel)
                end = speech.end("cancelled")
                done = m.AudioEnd(
                    request=speech.request,
                    reason="cancelled",
                    frames=speech.frames_sent,
                    total_ms=end.total_ms,
                    first_audio_ms=end.first_audio_ms if speech.frames_sent else None,
                )
                data += self.conn.send(done)
                speech.end_sent = True
            if acknowledge:
                data += self.conn.send(m.Cancelled(request=speech.request, frames_sent=speech.frames_sent))
            await self.stream.send_all(data)

    def _abandon(self) -> None:
        """The client is gone: stop its replies and free its sessions."""
        for speech in self.speeches.values():
            speech.cancelled = True
        self.daemon.scheduler.poke()
        for session in list(self.sessions.values()):
            self._drop(session)


def _params(msg: m.Speak) -> GenerationParams:
    defaults = GenerationParams()
    given = {
        name: getattr(msg, name)
        for name in ("temperature", "top_k", "top_p", "min_p", "seed", "max_frames")
        if getattr(msg, name) is not None
    }
    try:
        return defaults.replace(**given)
    except ValueError as exc:
        raise CommandError("invalid_params", str(exc)) from exc


def peer_is_allowed(sock: trio.socket.SocketType) -> bool:
    """Only our own user (or root) may talk to the daemon: checked with the kernel's SO_PEERCRED."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _, uid, _ = struct.unpack("3i", creds)
    return uid in (os.getuid(), 0)


def default_socket_path() -> Path:
    """$XDG_RUNTIME_DIR/csmd/csmd.sock, else /tmp/csmd-UID/csmd.sock; the directory must be private to us."""
    runtime_dir = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime_dir) / "csmd" if runtime_dir else Path(f"/tmp/csmd-{os.getuid()}")
    if base.exists():
        st = base.lstat()
        # In a shared /tmp someone else could have made the directory first: never put our socket in it.
        if base.is_symlink() or st.st_uid != os.getuid() or st.st_mode & 0o077:
            raise DaemonRunningError(f"{base} is not a private directory of this user; remove it or use --socket")
    return base / "csmd.sock"


class DaemonRunningError(RuntimeError):
    pass


async def bind_unix_socket(path: Path) -> trio.socket.SocketType:
    """Bind `path` (mode 0600, in a 0700 directory if we create it), replacing a stale socket file."""
    if not path.parent.exists():
        path.parent.mkdir(mode=0o700, parents=True)
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


async def serve_until_signal(daemon: Daemon, path: Path, announce: Callable[[Path], None] | None = None) -> None:
    """`csmd serve`: serve until SIGINT or SIGTERM, then shut down cleanly (the socket file goes too)."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(daemon.serve, path)
            if announce is not None:
                announce(path)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break
    daemon.close()
