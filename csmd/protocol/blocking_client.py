"""A blocking client for the csmd daemon: plain sockets, no threads, no event loop.

    with connect("/run/user/1000/csmd.sock", client="my-app") as client:
        client.open_session("chat")
        for chunk in client.speak("chat", "Hello there.", speaker=0):
            play(chunk.pcm)

This module is `client_core`'s transport: it writes what the core builds and reads the socket only while a
call waits for its reply; messages for other requests that arrive meanwhile are buffered by the core, so
several speeches may be in flight. A speech nobody reads buffers in memory while you wait for something else:
close speeches you do not want (`speech.close()` or `with`). Not thread-safe: use one client per thread.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
import types
from collections.abc import Callable, Iterator
from typing import TypeVar, Unpack

import numpy as np
import numpy.typing as npt

from csmd.protocol import client_core
from csmd.protocol import messages as m
from csmd.protocol.client_core import Chunk
from csmd.protocol.connection import DEFAULT_MAX_MESSAGE
from csmd.protocol.errors import ConnectionLost

__all__ = ["Chunk", "Client", "Speech", "connect"]

RECEIVE_BYTES = 256 * 1024
T = TypeVar("T")


def connect(
    path: str | os.PathLike[str],
    *,
    client: str = "csmd-python",
    versions: tuple[int, ...] = (m.PROTOCOL_VERSION,),
    max_message: int = DEFAULT_MAX_MESSAGE,
    timeout: float | None = None,
) -> Client:
    """Connect to the daemon's Unix socket and do the handshake; use the result with `with` (it closes).

    `timeout` (seconds) bounds every socket operation: a wait that times out raises TimeoutError and the
    client stays usable; a write that times out breaks the connection (part of a message may have gone).
    Raises ConnectionLost if the server refuses (e.g. code "unsupported_version") or goes away, and
    UntrustedServerError (a PermissionError), before sending anything, if another user serves the socket.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(os.fspath(path))
        client_core.verify_server(sock, path)  # before the first byte goes out
        result = Client(sock, client_core.ClientCore(client, versions=versions, max_message=max_message))
        result._call(result._core.hello)
    except BaseException:
        sock.close()
        raise
    return result


class Client:
    """A connected client; use `connect()`. A context manager that closes the socket on exit."""

    def __init__(self, sock: socket.socket, core: client_core.ClientCore) -> None:
        self._sock = sock
        self._core = core

    @property
    def welcome(self) -> m.Welcome:
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

    def open_session(self, session: str) -> m.SessionOpened:
        return self._call(lambda: self._core.open_session(session))

    def close_session(self, session: str) -> m.SessionClosed:
        return self._call(lambda: self._core.close_session(session))

    def add_context(
        self,
        session: str,
        speaker: int,
        text: str,
        audio: npt.ArrayLike | bytes | None = None,
        **options: Unpack[client_core.ContextOptions],
    ) -> m.ContextAdded:
        """Add a segment: text, optionally with mono audio (float samples at `rate`, or bytes already in `format`;
        see `client_core.ContextOptions`)."""
        return self._call(lambda: self._core.add_context(session, speaker, text, audio, **options))

    def clear_context(self, session: str) -> m.ContextCleared:
        return self._call(lambda: self._core.clear_context(session))

    def trim_context(self, session: str, request: str, frames: int, text: str) -> m.ContextTrimmed:
        """Keep only the heard part of reply `request` (first `frames` frames, `text`); drop what came after."""
        return self._call(lambda: self._core.trim_context(session, request, frames, text))

    # ---- speech ----

    def speak(self, session: str, text: str, speaker: int, **options: Unpack[client_core.SpeakOptions]) -> Speech:
        """A speech, sent when first iterated (or `start`ed): `for chunk in client.speak(...)`.

        Options left out take the daemon's defaults (see `client_core.SpeakOptions`). Raises ProtocolError
        "bad_field" at once for arguments of the wrong type.
        """
        return Speech(self, self._core.speech(session, text, speaker, **options))

    def start_speaking(
        self, session: str, text: str, speaker: int, **options: Unpack[client_core.SpeakOptions]
    ) -> Speech:
        """`speak(...)`, sent and accepted: returns once audio.start arrived (RequestError if refused)."""
        speech = self.speak(session, text, speaker, **options)
        speech.start()
        return speech

    def cancel(self, request: str) -> m.Cancelled:
        """Stop a speech on the server; its iterator still yields what was sent before, then ends."""
        return self._call(lambda: self._core.cancel(request))

    def ping(self) -> float:
        """Round trip to the daemon, in seconds."""
        started = time.perf_counter()
        self._call(self._core.ping)
        return time.perf_counter() - started

    # ---- the transport ----

    def _call(self, make: Callable[[], tuple[client_core.Pending[T], bytes]]) -> T:
        pending, _ = self._send(make)
        self._wait(lambda: pending.done)
        return pending.result()

    def _send(self, make: Callable[[], tuple[T, bytes]]) -> tuple[T, bytes]:
        result, data = make()
        if not data:
            return result, data
        try:
            self._sock.sendall(data)
        except OSError as exc:  # including a timeout: part of the message may be on the wire
            self._core.fail(ConnectionLost("closed", f"could not write to the daemon: {exc!r}"))
            raise ConnectionLost("closed", f"could not write to the daemon: {exc!r}") from exc
        return result, data

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


class Speech(client_core.SpeechView):
    """One speak request: an iterator of `Chunk`s; `audio_start` and `end` once they arrived.

    Use as `with` (or call `close()`) to drop it early: the rest is discarded and the server told to cancel it.
    """

    def __init__(self, client: Client, state: client_core.SpeechState) -> None:
        super().__init__(state)
        self._client = client

    def start(self) -> m.AudioStart:
        """Send the request (once) and wait for audio.start. RequestError if the daemon refused it."""
        self._client._send(lambda: self._client._core.send_speech(self._state))
        self._client._wait(self._state.started_or_failed)
        return self._state.started()

    def __iter__(self) -> Iterator[Chunk]:
        return self

    def __next__(self) -> Chunk:
        if not self._state.sent:
            self.start()
        self._client._wait(self._state.has_item)
        chunk = self._state.next_chunk()
        if chunk is None:
            raise StopIteration
        return chunk

    def read_all(self) -> npt.NDArray[np.float32]:
        """Every remaining sample, concatenated."""
        return client_core.join_chunks(list(self))

    def cancel(self) -> m.Cancelled:
        """Cancel on the server (answered from the end record if the speech already ended)."""
        return self._client._call(lambda: self._client._core.cancel(self.request, speech=self._state))

    def close(self) -> None:
        """Stop listening; cancel on the server if it is still running (without waiting for the reply)."""
        if self._client._core.close_speech(self._state):
            with contextlib.suppress(ConnectionLost):  # the connection is gone: nothing left to cancel
                self._client._send(lambda: self._client._core.cancel_quietly(self.request))

    def __enter__(self) -> Speech:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
