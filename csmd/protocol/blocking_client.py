"""A blocking client for the csmd daemon: plain sockets, no threads, no event loop.

    with connect("/run/user/1000/csmd.sock", client="my-app") as client:
        client.open_session("chat")
        for chunk in client.speak("chat", "Hello there.", speaker=0):
            play(chunk.pcm)

The socket is read only while a call waits for its reply; messages for other requests that arrive meanwhile
are buffered (see `client_core`), so several speeches may be in flight. A speech nobody reads buffers in
memory while you wait for something else: close speeches you do not want (`speech.close()` or `with`).
Not thread-safe: use one client per thread.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
import types
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

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


def connect(
    path: str | os.PathLike[str],
    *,
    client: str = "csmd-python",
    versions: tuple[int, ...] = (PROTOCOL_VERSION,),
    max_message: int = DEFAULT_MAX_MESSAGE,
    timeout: float | None = None,
) -> Client:
    """Connect to the daemon's Unix socket and do the handshake.

    `timeout` (seconds) bounds every socket operation: a wait that times out raises TimeoutError and the
    client stays usable; a write that times out breaks the connection (part of a message may have gone).
    Raises ConnectionLost if the server refuses (e.g. code "unsupported_version") or goes away, and
    UntrustedServerError (a PermissionError), before sending anything, if another user serves the socket.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(os.fspath(path))
        verify_server(sock, path)  # before the first byte goes out
        result = Client(sock, ClientCore(client, versions=versions, max_message=max_message))
        result._handshake()
    except BaseException:
        sock.close()
        raise
    return result


class Client:
    """A connected client; use `connect()`. A context manager that closes the socket on exit."""

    def __init__(self, sock: socket.socket, core: ClientCore) -> None:
        self._sock = sock
        self._core = core

    @property
    def welcome(self) -> Welcome:
        assert self._core.welcome is not None, "use connect(): it does the handshake"
        return self._core.welcome

    @property
    def lost(self) -> ConnectionLost | None:
        """Why the connection ended, once it has."""
        return self._core.lost

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: types.TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection (the daemon closes this connection's sessions)."""
        self._core.fail(ConnectionLost("closed", "the client was closed"))
        self._sock.close()

    # ---- session and context commands ----

    def open_session(self, session: str) -> SessionOpened:
        return self._command(OpenSession(session=session), SessionOpened)

    def close_session(self, session: str) -> SessionClosed:
        return self._command(CloseSession(session=session), SessionClosed)

    def add_context(
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
        """Add a segment: text, optionally with mono audio (float samples at `rate`, or bytes already in `format`)."""
        return self._command(make_add_context(session, speaker, text, audio, rate, format, pinned), ContextAdded)

    def clear_context(self, session: str) -> ContextCleared:
        return self._command(ClearContext(session=session), ContextCleared)

    def trim_context(self, session: str, request: str, frames: int, text: str) -> ContextTrimmed:
        """Keep only the heard part of reply `request` (first `frames` frames, `text`); drop what came after."""
        msg = TrimContext(session=session, request=request, frames=frames, text=text)
        return self._command(msg, ContextTrimmed)

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
        """A speech, sent when first iterated (or `start`ed): `for chunk in client.speak(...)`."""
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

    def start_speaking(self, session: str, text: str, speaker: int, **params: Any) -> Speech:
        """`speak(...)`, sent and accepted: returns once audio.start arrived (RequestError if refused)."""
        speech = self.speak(session, text, speaker, **params)
        speech.start()
        return speech

    def cancel(self, request: str) -> Cancelled:
        """Stop a speech on the server; its iterator still yields what was sent before, then ends."""
        pending, _ = self._send(lambda: self._core.cancel(request))
        return self._result(pending)

    def ping(self) -> float:
        """Round trip to the daemon, in seconds."""
        started = time.perf_counter()
        pending, _ = self._send(self._core.ping)
        self._result(pending)
        return time.perf_counter() - started

    # ---- internals ----

    def _handshake(self) -> None:
        self._send(lambda: (None, self._core.hello()))
        self._wait(lambda: self._core.welcome is not None)
        if self._core.lost is not None:
            raise ConnectionLost(self._core.lost.code, self._core.lost.message)

    def _command(self, msg: SessionCommand, reply: type[R]) -> R:
        pending, _ = self._send(lambda: self._core.command(msg))
        result = self._result(pending)
        assert isinstance(result, reply)  # routing matched the reply type
        return result

    def _send(self, make: Callable[[], tuple[T, bytes]]) -> tuple[T, bytes]:
        result, data = make()
        try:
            self._sock.sendall(data)
        except OSError as exc:  # including a timeout: part of the message may be on the wire
            self._core.fail(ConnectionLost("closed", f"could not write to the daemon: {exc!r}"))
            raise ConnectionLost("closed", f"could not write to the daemon: {exc!r}") from exc
        return result, data

    def _result(self, pending: Pending[T]) -> T:
        self._wait(lambda: pending.done)
        return pending.result()

    def _wait(self, ready: Callable[[], bool]) -> None:
        """Read and route messages until `ready()` or the connection ends (which completes every wait)."""
        while not ready() and self._core.lost is None:
            try:
                data = self._sock.recv(RECEIVE_BYTES)
            except TimeoutError:
                raise  # nothing was lost: the caller may wait again
            except OSError as exc:
                self._core.fail(ConnectionLost("closed", f"could not read from the daemon: {exc!r}"))
                break
            self._core.receive(data)


class Speech:
    """One speak request: an iterator of `Chunk`s; `audio_start` and `end` once they arrived.

    Use as `with` (or call `close()`) to drop it early: the rest is discarded and the server told to cancel it.
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

    def start(self) -> AudioStart:
        """Send the request (once) and wait for audio.start. RequestError if the daemon refused it."""
        if self._state is None:
            self._state, _ = self._client._send(lambda: self._client._core.speak(self._msg))
        state = self._state
        assert state is not None
        self._client._wait(state.started_or_failed)
        if state.start is None:
            state.take()  # raises the error (a speech can only finish without start by failing)
            raise AssertionError("speech ended without audio.start")
        return state.start

    def __iter__(self) -> Iterator[Chunk]:
        return self

    def __next__(self) -> Chunk:
        if self._state is None:
            self.start()
        assert self._state is not None
        state = self._state
        self._client._wait(state.has_item)
        item = state.take()
        if item is None:
            raise StopIteration
        return state.decode(item)

    def read_all(self) -> npt.NDArray[np.float32]:
        """Every remaining sample, concatenated."""
        parts = [chunk.pcm for chunk in self]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)

    def cancel(self) -> Cancelled:
        """Cancel on the server. If the speech already ended, answers from its end record (the daemon would
        say "no_such_request": a cancel racing the natural end is not an error for the caller)."""
        try:
            return self._client.cancel(self.request)
        except RequestError as exc:
            if exc.code != "no_such_request" or self.end is None:
                raise
            return Cancelled(request=self.request, frames_sent=self.end.frames)

    def close(self) -> None:
        """Stop listening; cancel on the server if it is still running (without waiting for the reply)."""
        if self._state is not None and self._client._core.close_speech(self._state):
            with contextlib.suppress(ConnectionLost):  # the connection is gone: nothing left to cancel
                self._client._send(lambda: self._client._core.cancel_quietly(self.request))

    def __enter__(self) -> Speech:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
