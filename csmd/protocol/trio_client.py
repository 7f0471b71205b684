"""An async client for the csmd daemon, on trio.

    async with await connect("/run/user/1000/csmd.sock", client="my-app") as client:
        await client.open_session("chat")
        async for chunk in client.speak("chat", "Hello there.", speaker=0):
            play(chunk.pcm)

One background task reads the socket and routes every message (see `client_core`); any number of calls and
speeches may be in flight at once. Backpressure: when some speech has `max_buffered` chunks that nobody has
read, the reader stops reading the socket, which in turn stops the daemon. So read every speech you start, or
close it (`speech.close()`, or leave its `async with` block) to drop the rest and cancel it on the server.
"""

from __future__ import annotations

import contextlib
import os
import types
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import trio

from csmd.protocol.client_core import (
    Chunk,
    ClientCore,
    Pending,
    SessionCommand,
    SessionReply,
    SpeechState,
    make_add_context,
    verify_server,
)
from csmd.protocol.connection import DEFAULT_MAX_MESSAGE
from csmd.protocol.errors import ConnectionLost, RequestError
from csmd.protocol.messages import (
    PROTOCOL_VERSION,
    SAMPLE_RATE,
    AudioEnd,
    AudioStart,
    Cancelled,
    ClearContext,
    CloseSession,
    ContextAdded,
    ContextCleared,
    ContextTrimmed,
    Format,
    OpenSession,
    SessionClosed,
    SessionOpened,
    Speak,
    TrimContext,
    Welcome,
)

__all__ = ["Chunk", "Client", "Speech", "connect"]

RECEIVE_BYTES = 256 * 1024
T = TypeVar("T")
R = TypeVar("R", bound=SessionReply)


async def connect(
    path: str | os.PathLike[str],
    *,
    client: str = "csmd-python",
    versions: tuple[int, ...] = (PROTOCOL_VERSION,),
    max_message: int = DEFAULT_MAX_MESSAGE,
    max_buffered: int = 1024,
) -> Client:
    """Connect to the daemon's Unix socket and do the handshake; use the result with `async with`.

    Raises ConnectionLost if the server refuses (e.g. code "unsupported_version") or goes away, and
    UntrustedServerError (a PermissionError), before sending anything, if another user serves the socket.
    `max_buffered` is the per-speech backlog (in chunks, ~80 ms each) at which reading pauses.
    """
    stream = await trio.open_unix_socket(os.fspath(path))
    core = ClientCore(client, versions=versions, max_message=max_message)
    try:
        verify_server(stream.socket, path)  # before the first byte goes out
        await stream.send_all(core.hello())
        while core.welcome is None and core.lost is None:
            core.receive(await stream.receive_some(RECEIVE_BYTES))
        if core.lost is not None:
            raise ConnectionLost(core.lost.code, core.lost.message)
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return Client(stream, core, max_buffered=max_buffered)


class Client:
    """A connected, welcomed client. Enter it (`async with`) to start its reader before making calls."""

    def __init__(self, stream: trio.SocketStream, core: ClientCore, *, max_buffered: int = 1024) -> None:
        assert core.welcome is not None, "use connect(): it does the handshake"
        self._stream = stream
        self._core = core
        self._max_buffered = max_buffered
        self._send_lock = trio.Lock()
        self._changed = trio.Event()  # set (and replaced) whenever routing state changes
        self._nursery: trio.Nursery | None = None
        self._nursery_manager: Any = None

    @property
    def welcome(self) -> Welcome:
        assert self._core.welcome is not None
        return self._core.welcome

    @property
    def lost(self) -> ConnectionLost | None:
        """Why the connection ended, once it has."""
        return self._core.lost

    # ---- lifetime ----

    async def __aenter__(self) -> Client:
        # The reader needs a nursery that lives as long as the `async with` block: enter one by hand here and
        # leave it in __aexit__ (same task, properly nested, as trio requires).
        self._nursery_manager = trio.open_nursery()
        self._nursery = await self._nursery_manager.__aenter__()
        self._nursery.start_soon(self._read)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: types.TracebackType | None
    ) -> None:
        assert self._nursery is not None
        try:
            await self.aclose()
        finally:
            # Leave the nursery whatever happened (even if aclose was cancelled), or trio's task tree breaks.
            self._nursery.cancel_scope.cancel()
            # Not passing the body's exception on: the nursery would wrap it in an ExceptionGroup, and the caller
            # should see its own exception (or our ConnectionLost) as is. The reader never raises, so nothing is
            # lost by this.
            await self._nursery_manager.__aexit__(None, None, None)

    async def aclose(self) -> None:
        """Close the connection (the daemon closes this connection's sessions). Pending calls raise ConnectionLost."""
        self._core.fail(ConnectionLost("closed", "the client was closed"))
        self._notify()
        await self._stream.aclose()

    # ---- session and context commands ----

    async def open_session(self, session: str) -> SessionOpened:
        return await self._command(OpenSession(session=session), SessionOpened)

    async def close_session(self, session: str) -> SessionClosed:
        return await self._command(CloseSession(session=session), SessionClosed)

    async def add_context(
        self,
        session: str,
        speaker: int,
        text: str,
        audio: npt.ArrayLike | bytes | None = None,
        *,
        rate: int = SAMPLE_RATE,
        format: Format = "pcm_f32le",
        pinned: bool = False,
    ) -> ContextAdded:
        """Add a segment: text, optionally with mono audio (float samples at `rate`, or bytes already in `format`).

        The daemon resamples audio at another rate than 24 kHz.
        """
        return await self._command(make_add_context(session, speaker, text, audio, rate, format, pinned), ContextAdded)

    async def clear_context(self, session: str) -> ContextCleared:
        return await self._command(ClearContext(session=session), ContextCleared)

    async def trim_context(self, session: str, request: str, frames: int, text: str) -> ContextTrimmed:
        """Keep only the heard part of reply `request` (first `frames` frames, `text`); drop what came after."""
        msg = TrimContext(session=session, request=request, frames=frames, text=text)
        return await self._command(msg, ContextTrimmed)

    # ---- speech ----

    def speak(
        self,
        session: str,
        text: str,
        speaker: int,
        *,
        request: str | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        min_p: float | None = None,
        seed: int | None = None,
        max_frames: int | None = None,
        format: Format | None = None,
    ) -> Speech:
        """A speech, sent when first iterated (or `start`ed): `async for chunk in client.speak(...)`.

        Parameters left as None take the daemon's defaults. Raises ProtocolError "bad_field" at once for
        arguments of the wrong type.
        """
        msg = Speak(
            session=session,
            request=request if request is not None else self._core.new_request_id(),
            text=text,
            speaker=speaker,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            seed=seed,
            max_frames=max_frames,
            format=format,
        )
        return Speech(self, msg)

    async def start_speaking(self, session: str, text: str, speaker: int, **params: Any) -> Speech:
        """`speak(...)`, sent and accepted: returns once audio.start arrived (RequestError if refused)."""
        speech = self.speak(session, text, speaker, **params)
        await speech.start()
        return speech

    async def cancel(self, request: str) -> Cancelled:
        """Stop a speech on the server; its iterator still yields what was sent before, then ends."""
        pending, _ = await self._send(lambda: self._core.cancel(request))
        return await self._result(pending)

    async def ping(self) -> float:
        """Round trip to the daemon, in seconds."""
        started = trio.current_time()
        pending, _ = await self._send(self._core.ping)
        await self._result(pending)
        return trio.current_time() - started

    # ---- internals ----

    async def _command(self, msg: SessionCommand, reply: type[R]) -> R:
        pending, _ = await self._send(lambda: self._core.command(msg))
        result = await self._result(pending)
        assert isinstance(result, reply)  # routing matched the reply type
        return result

    async def _send(self, make: Callable[[], tuple[T, bytes]]) -> tuple[T, bytes]:
        """Build a message with the core and write it, in one critical section so wire order = core order."""
        self._check_running()
        async with self._send_lock:
            # Honour a cancellation before the core records the call: a recorded call must reach the wire,
            # or the next reply would be matched to it. After this point the write is shielded, because a
            # half-written message would corrupt the stream for every other call.
            await trio.lowlevel.checkpoint_if_cancelled()
            result, data = make()
            try:
                with trio.CancelScope(shield=True):
                    await self._stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self._core.fail(ConnectionLost("closed", f"could not write to the daemon: {exc!r}"))
                self._notify()
                raise ConnectionLost("closed", f"could not write to the daemon: {exc!r}") from exc
            return result, data

    async def _send_quiet_cancel(self, request: str) -> None:
        with contextlib.suppress(ConnectionLost):  # the connection is gone: nothing left to cancel
            await self._send(lambda: self._core.cancel_quietly(request))

    async def _result(self, pending: Pending[T]) -> T:
        await self._wait(lambda: pending.done)
        return pending.result()

    async def _wait(self, ready: Callable[[], bool]) -> None:
        # No checkpoint between testing `ready` and waiting on the current event, so no change is missed.
        while not ready():
            await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _check_running(self) -> None:
        if self._nursery is None:
            raise RuntimeError("enter the client first: `async with await connect(...) as client:`")

    async def _read(self) -> None:
        try:
            while self._core.lost is None:
                # Backpressure: stop reading while a speech has a full backlog; consumers notify as they take.
                await self._wait(lambda: self._core.lost is not None or self._core.most_buffered() < self._max_buffered)
                if self._core.lost is not None:
                    break
                try:
                    data = await self._stream.receive_some(RECEIVE_BYTES)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    self._core.fail(ConnectionLost("closed", f"could not read from the daemon: {exc!r}"))
                else:
                    self._core.receive(data)
                self._notify()
        except Exception as exc:  # a bug here must not hang every caller: fail them instead
            self._core.fail(ConnectionLost("internal", f"client reader failed: {exc!r}"))
            self._notify()
        finally:
            if self._core.lost is not None:
                with trio.CancelScope(shield=True):
                    await trio.aclose_forcefully(self._stream)


class Speech:
    """One speak request: an async iterator of `Chunk`s; `audio_start` and `end` once they arrived.

    Use as `async with` (or call `close()`) to drop it early: the rest is discarded and the server told to
    cancel it.
    """

    def __init__(self, client: Client, msg: Speak) -> None:
        self._client = client
        self._msg = msg
        self._state: SpeechState | None = None
        self.request = msg.request
        self.session = msg.session

    @property
    def audio_start(self) -> AudioStart | None:
        return None if self._state is None else self._state.start

    @property
    def end(self) -> AudioEnd | None:
        return None if self._state is None else self._state.end

    async def start(self) -> AudioStart:
        """Send the request (once) and wait for audio.start. RequestError if the daemon refused it."""
        if self._state is None:
            self._state, _ = await self._client._send(lambda: self._client._core.speak(self._msg))
        state = self._state
        assert state is not None
        await self._client._wait(state.started_or_failed)
        if state.start is None:
            state.take()  # raises the error (a speech can only finish without start by failing)
            raise AssertionError("speech ended without audio.start")
        return state.start

    def __aiter__(self) -> Speech:
        return self

    async def __anext__(self) -> Chunk:
        if self._state is None:
            await self.start()
        assert self._state is not None
        state = self._state
        await self._client._wait(state.has_item)
        item = state.take()
        self._client._notify()  # room in the backlog: the reader may be waiting for it
        if item is None:
            raise StopAsyncIteration
        return state.decode(item)

    async def read_all(self) -> npt.NDArray[np.float32]:
        """Every remaining sample, concatenated."""
        parts = [chunk.pcm async for chunk in self]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)

    async def cancel(self) -> Cancelled:
        """Cancel on the server. If the speech already ended, answers from its end record (the daemon would
        say "no_such_request": a cancel racing the natural end is not an error for the caller)."""
        try:
            return await self._client.cancel(self.request)
        except RequestError as exc:
            if exc.code != "no_such_request" or self.end is None:
                raise
            return Cancelled(request=self.request, frames_sent=self.end.frames)

    def close(self) -> None:
        """Stop listening; cancel on the server if it is still running (fire and forget)."""
        if self._state is None:
            return
        if self._client._core.close_speech(self._state):
            nursery = self._client._nursery
            if nursery is not None:
                nursery.start_soon(self._client._send_quiet_cancel, self.request)
        self._client._notify()  # its backlog is gone: a reader paused for room may go on

    async def __aenter__(self) -> Speech:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()
