"""An async client for the csmd daemon, on trio.

    async with open_client("/run/user/1000/csmd.sock", client="my-app") as client:
        await client.open_session("chat")
        async for chunk in client.speak("chat", "Hello there.", speaker=0):
            play(chunk.pcm)

This module is `client_core`'s transport: it writes what the core builds, feeds it what it reads, and waits.
One background task reads the socket (so any number of calls and speeches may be in flight at once); it lives
in a nursery that `open_client` holds for the length of the `async with` block. Backpressure: when some speech
has `max_buffered` chunks that nobody has read, the reader stops reading the socket, which in turn stops the
daemon. So read every speech you start, or close it (`speech.close()`, or leave its `async with` block) to drop
the rest and cancel it on the server.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Callable
from typing import TypeVar, Unpack

import numpy as np
import numpy.typing as npt
import trio

from csmd.protocol import client_core
from csmd.protocol import messages as m
from csmd.protocol.client_core import Chunk
from csmd.protocol.connection import DEFAULT_MAX_MESSAGE
from csmd.protocol.errors import ConnectionLost

__all__ = ["Chunk", "Client", "Speech", "open_client"]

RECEIVE_BYTES = 256 * 1024
T = TypeVar("T")


@contextlib.asynccontextmanager
async def open_client(
    path: str | os.PathLike[str],
    *,
    client: str = "csmd-python",
    versions: tuple[int, ...] = (m.PROTOCOL_VERSION,),
    max_message: int = DEFAULT_MAX_MESSAGE,
    max_buffered: int = 1024,
) -> AsyncIterator[Client]:
    """Connect to the daemon's Unix socket, do the handshake and serve the client for the `async with` block;
    leaving the block closes the connection (the daemon closes its sessions).

    Raises ConnectionLost if the server refuses (e.g. code "unsupported_version") or goes away, and
    UntrustedServerError (a PermissionError), before sending anything, if another user serves the socket.
    `max_buffered` is the per-speech backlog (in chunks, ~80 ms each) at which reading pauses. The block's own
    exception comes out as it is, not wrapped in an ExceptionGroup by the reader's nursery.
    """
    stream = await trio.open_unix_socket(os.fspath(path))
    core = client_core.ClientCore(client, versions=versions, max_message=max_message)
    try:
        client_core.verify_server(stream.socket, path)  # before the first byte goes out
        welcome, data = core.hello()
        await stream.send_all(data)
        while not welcome.done:
            core.receive(await stream.receive_some(RECEIVE_BYTES))
        welcome.result()
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    failure: BaseException | None = None
    async with trio.open_nursery() as nursery:
        result = Client(stream, core, nursery, max_buffered=max_buffered)
        nursery.start_soon(result._read)
        try:
            yield result
        except BaseException as exc:
            failure = exc  # raised below, outside the nursery, which would wrap it in an ExceptionGroup
        finally:
            with trio.CancelScope(shield=True):  # a half-closed client would leave the reader running
                await result.aclose()
            nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure


class Client:
    """A connected, welcomed client, made by `open_client` and usable inside its `async with` block."""

    def __init__(
        self, stream: trio.SocketStream, core: client_core.ClientCore, nursery: trio.Nursery, *, max_buffered: int
    ):
        self._stream = stream
        self._core = core
        self._nursery = nursery
        self._max_buffered = max_buffered
        self._send_lock = trio.Lock()
        self._changed = trio.Event()  # set (and replaced) whenever routing state changes

    @property
    def welcome(self) -> m.Welcome:
        assert self._core.welcome is not None
        return self._core.welcome

    @property
    def lost(self) -> ConnectionLost | None:
        """Why the connection ended, once it has."""
        return self._core.lost

    async def aclose(self) -> None:
        """Close the connection now (leaving the `async with` block does it too). Pending calls raise
        ConnectionLost."""
        self._core.fail(ConnectionLost("closed", "the client was closed"))
        self._notify()
        await self._stream.aclose()

    # ---- session and context commands ----

    async def open_session(self, session: str) -> m.SessionOpened:
        return await self._call(lambda: self._core.open_session(session))

    async def close_session(self, session: str) -> m.SessionClosed:
        return await self._call(lambda: self._core.close_session(session))

    async def add_context(
        self,
        session: str,
        speaker: int,
        text: str,
        audio: npt.ArrayLike | bytes | None = None,
        **options: Unpack[client_core.ContextOptions],
    ) -> m.ContextAdded:
        """Add a segment: text, optionally with mono audio (float samples at `rate`, or bytes already in `format`;
        see `client_core.ContextOptions`)."""
        return await self._call(lambda: self._core.add_context(session, speaker, text, audio, **options))

    async def clear_context(self, session: str) -> m.ContextCleared:
        return await self._call(lambda: self._core.clear_context(session))

    async def trim_context(self, session: str, request: str, frames: int, text: str) -> m.ContextTrimmed:
        """Keep only the heard part of reply `request` (first `frames` frames, `text`); drop what came after."""
        return await self._call(lambda: self._core.trim_context(session, request, frames, text))

    # ---- speech ----

    def speak(self, session: str, text: str, speaker: int, **options: Unpack[client_core.SpeakOptions]) -> Speech:
        """A speech, sent when first iterated (or `start`ed): `async for chunk in client.speak(...)`.

        Options left out take the daemon's defaults (see `client_core.SpeakOptions`). Raises ProtocolError
        "bad_field" at once for arguments of the wrong type.
        """
        return Speech(self, self._core.speech(session, text, speaker, **options))

    async def start_speaking(
        self, session: str, text: str, speaker: int, **options: Unpack[client_core.SpeakOptions]
    ) -> Speech:
        """`speak(...)`, sent and accepted: returns once audio.start arrived (RequestError if refused)."""
        speech = self.speak(session, text, speaker, **options)
        await speech.start()
        return speech

    async def cancel(self, request: str) -> m.Cancelled:
        """Stop a speech on the server; its iterator still yields what was sent before, then ends."""
        return await self._call(lambda: self._core.cancel(request))

    async def ping(self) -> float:
        """Round trip to the daemon, in seconds."""
        started = trio.current_time()
        await self._call(self._core.ping)
        return trio.current_time() - started

    # ---- the transport ----

    async def _call(self, make: Callable[[], tuple[client_core.Pending[T], bytes]]) -> T:
        pending, _ = await self._send(make)
        await self._wait(lambda: pending.done)
        return pending.result()

    async def _send(self, make: Callable[[], tuple[T, bytes]]) -> tuple[T, bytes]:
        """Build a message with the core and write it, in one critical section so wire order = core order."""
        async with self._send_lock:
            # Honour a cancellation before the core records the call: a recorded call must reach the wire,
            # or the next reply would be matched to it. After this point the write is shielded, because a
            # half-written message would corrupt the stream for every other call.
            await trio.lowlevel.checkpoint_if_cancelled()
            result, data = make()
            if not data:
                return result, data
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

    async def _wait(self, ready: Callable[[], bool]) -> None:
        # No checkpoint between testing `ready` and waiting on the current event, so no change is missed.
        while not ready():
            await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _read(self) -> None:
        try:
            while self._core.lost is None:
                # Backpressure: consumers notify as they take chunks.
                await self._wait(lambda: not self._core.reading_paused(self._max_buffered))
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


class Speech(client_core.SpeechView):
    """One speak request: an async iterator of `Chunk`s; `audio_start` and `end` once they arrived.

    Use as `async with` (or call `close()`) to drop it early: the rest is discarded and the server told to
    cancel it.
    """

    def __init__(self, client: Client, state: client_core.SpeechState) -> None:
        super().__init__(state)
        self._client = client

    async def start(self) -> m.AudioStart:
        """Send the request (once) and wait for audio.start. RequestError if the daemon refused it."""
        await self._client._send(lambda: self._client._core.send_speech(self._state))
        await self._client._wait(self._state.started_or_failed)
        return self._state.started()

    def __aiter__(self) -> Speech:
        return self

    async def __anext__(self) -> Chunk:
        if not self._state.sent:
            await self.start()
        await self._client._wait(self._state.has_item)
        chunk = self._state.next_chunk()
        self._client._notify()  # room in the backlog: the reader may be waiting for it
        if chunk is None:
            raise StopAsyncIteration
        return chunk

    async def read_all(self) -> npt.NDArray[np.float32]:
        """Every remaining sample, concatenated."""
        return client_core.join_chunks([chunk async for chunk in self])

    async def cancel(self) -> m.Cancelled:
        """Cancel on the server (answered from the end record if the speech already ended)."""
        return await self._client._call(lambda: self._client._core.cancel(self.request, speech=self._state))

    def close(self) -> None:
        """Stop listening; cancel on the server if it is still running (fire and forget)."""
        if self._client._core.close_speech(self._state):
            self._client._nursery.start_soon(self._client._send_quiet_cancel, self.request)
        self._client._notify()  # its backlog is gone: a reader paused for room may go on

    async def __aenter__(self) -> Speech:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()
