"""Both clients end to end against a tiny fake daemon on a real Unix socket (server-role Connection)."""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
import pytest
import trio

from csmd.protocol import (
    FORMATS,
    AddContext,
    AudioChunk,
    AudioEnd,
    AudioStart,
    Cancel,
    Cancelled,
    ClearContext,
    CloseSession,
    Connection,
    ConnectionClosed,
    ConnectionLost,
    ContextAdded,
    ContextCleared,
    Error,
    Hello,
    Message,
    OpenSession,
    Ping,
    Pong,
    ProtocolError,
    RequestError,
    Role,
    SessionClosed,
    SessionOpened,
    Speak,
    Welcome,
    blocking_client,
    decode_pcm,
    encode_pcm,
    trio_client,
)

Send = Callable[..., Awaitable[None]]


def level(speaker: int, frame: int) -> float:
    """The constant sample value the fake server sends for a speaker's frame: tells speeches apart."""
    return 0.1 * (speaker + 1) + 0.01 * frame


class FakeServer:
    """Answers like the daemon would, without a model.

    speak sends audio.start, then max_frames (default 3) chunks of 1920 samples, then audio.end; sessions named
    "bad" get non-fatal errors, and opening a session named "die" gets a fatal error.
    """

    def __init__(self) -> None:
        self.received: list[Message] = []
        self.sent_chunks: list[str] = []  # request ids, in the order their chunks went out

    async def serve(self, path: Path, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.bind(str(path))
            sock.listen()
            task_status.started()
            await trio.serve_listeners(self.handle, [trio.SocketListener(sock)])
        finally:
            sock.close()

    async def handle(self, stream: trio.SocketStream) -> None:
        conn = Connection(Role.SERVER)
        lock = trio.Lock()

        async def send(*messages: Message) -> None:
            async with lock:
                await stream.send_all(b"".join(conn.send(m) for m in messages))

        cancels: dict[str, trio.Event] = {}
        try:
            async with trio.open_nursery() as nursery:
                while True:
                    try:
                        events = conn.receive_data(await stream.receive_some(65536))
                    except ProtocolError as exc:
                        await send(Error.from_protocol_error(exc))
                        nursery.cancel_scope.cancel()
                        return
                    for msg in events:
                        if isinstance(msg, ConnectionClosed):
                            nursery.cancel_scope.cancel()
                            return
                        self.received.append(msg)
                        if not await self.answer(msg, send, nursery, cancels):
                            nursery.cancel_scope.cancel()
                            return
        except trio.BrokenResourceError:
            pass  # the client went away
        finally:
            await trio.aclose_forcefully(stream)

    async def answer(self, msg: Message, send: Send, nursery: trio.Nursery, cancels: dict[str, trio.Event]) -> bool:
        """Answer one message; False to hang up."""
        session = getattr(msg, "session", None)
        if session == "bad":
            request = getattr(msg, "request", None)
            await send(
                Error(code="unknown_session", message="no session 'bad'", fatal=False, request=request, session=session)
            )
        elif isinstance(msg, Hello):
            await send(
                Welcome(
                    protocol=1,
                    server="fake",
                    sample_rate=24000,
                    frame_samples=1920,
                    formats=FORMATS,
                    model="none",
                    watermark=False,
                    max_message=Connection.DEFAULT_MAX_MESSAGE,
                )
            )
        elif isinstance(msg, Ping):
            await send(Pong(nonce=msg.nonce))
        elif isinstance(msg, OpenSession):
            if msg.session == "die":
                await send(Error(code="internal", message="the model fell over", fatal=True))
                return False
            await send(SessionOpened(session=msg.session))
        elif isinstance(msg, CloseSession):
            await send(SessionClosed(session=msg.session))
        elif isinstance(msg, AddContext):
            frames = 0
            if msg.audio is not None and msg.format is not None:
                frames = len(decode_pcm(msg.audio, msg.format)) // 1920
            await send(ContextAdded(session=msg.session, frames=frames, rows=frames + 10))
        elif isinstance(msg, ClearContext):
            await send(ContextCleared(session=msg.session))
        elif isinstance(msg, Speak):
            cancels[msg.request] = trio.Event()
            nursery.start_soon(self.stream_audio, msg, send, cancels)
        elif isinstance(msg, Cancel):
            if msg.request in cancels:
                cancels[msg.request].set()  # the stream task answers
            else:  # never existed, or already ended (as csmd's daemon does)
                await send(Error(code="no_such_request", message="not running", fatal=False, request=msg.request))
        return True

    async def stream_audio(self, msg: Speak, send: Send, cancels: dict[str, trio.Event]) -> None:
        cancel = cancels[msg.request]
        fmt = msg.format or "pcm_f32le"
        await send(
            AudioStart(
                request=msg.request, session=msg.session, sample_rate=24000, format=fmt, frame_samples=1920, seed=42
            )
        )
        sent = 0
        for i in range(msg.max_frames if msg.max_frames is not None else 3):
            await trio.sleep(0.002)  # lets other speeches interleave, and cancels arrive
            if cancel.is_set():
                break
            pcm = encode_pcm(np.full(1920, level(msg.speaker, i), dtype=np.float32), fmt)
            await send(AudioChunk(request=msg.request, seq=i, frame=i, pcm=pcm))
            self.sent_chunks.append(msg.request)
            sent += 1
        del cancels[msg.request]  # from now on a cancel gets no_such_request
        if cancel.is_set():
            end = AudioEnd(request=msg.request, reason="cancelled", frames=sent, total_ms=1.0, first_audio_ms=0.5)
            await send(end, Cancelled(request=msg.request, frames_sent=sent))
        else:
            await send(AudioEnd(request=msg.request, reason="eos", frames=sent, total_ms=12.5, first_audio_ms=2.5))


@pytest.fixture
async def fake(tmp_path: Path, nursery: trio.Nursery) -> tuple[FakeServer, Path]:
    server, path = FakeServer(), tmp_path / "csmd.sock"
    await nursery.start(server.serve, path)
    return server, path


def check_frames(chunks: list[trio_client.Chunk], speaker: int, atol: float = 0.0) -> None:
    assert [c.frame for c in chunks] == [0, 1, 2]
    for c in chunks:
        assert c.pcm.dtype == np.float32 and c.pcm.shape == (1920,)
        np.testing.assert_allclose(c.pcm, level(speaker, c.frame), atol=atol, rtol=1e-6)


# ---- trio client ----


async def test_trio_handshake_and_ping(fake: tuple[FakeServer, Path]) -> None:
    server, path = fake
    with trio.fail_after(10):
        async with trio_client.open_client(path, client="test-app") as client:
            assert client.welcome.sample_rate == 24000 and client.welcome.formats == FORMATS
            assert await client.ping() >= 0
    assert server.received[:2] == [Hello(protocol=(1,), client="test-app"), Ping(nonce=1)]


async def test_trio_speak(fake: tuple[FakeServer, Path]) -> None:
    _, path = fake
    with trio.fail_after(10):
        async with trio_client.open_client(path) as client:
            assert await client.open_session("s") == SessionOpened(session="s")
            speech = client.speak("s", "Hello.", speaker=1)
            chunks = [chunk async for chunk in speech]
            check_frames(chunks, speaker=1)
            assert speech.end is not None and speech.end.reason == "eos" and speech.end.frames == 3
            assert speech.audio_start is not None and speech.audio_start.format == "pcm_f32le"

            speech = await client.start_speaking("s", "In 16 bits.", 0, format="pcm_s16le", seed=7)
            assert speech.audio_start is not None and speech.audio_start.format == "pcm_s16le"
            check_frames([chunk async for chunk in speech], speaker=0, atol=1 / 32767)

            assert len(await client.speak("s", "All of it.", 0).read_all()) == 3 * 1920


async def test_trio_two_speeches_in_flight(fake: tuple[FakeServer, Path]) -> None:
    server, path = fake
    results: dict[int, list[trio_client.Chunk]] = {}
    with trio.fail_after(10):
        async with trio_client.open_client(path) as client:
            await client.open_session("s")

            async def listen(speaker: int) -> None:
                results[speaker] = [chunk async for chunk in client.speak("s", f"Speaker {speaker}.", speaker)]

            async with trio.open_nursery() as nursery:
                nursery.start_soon(listen, 0)
                nursery.start_soon(listen, 1)
    check_frames(results[0], speaker=0)
    check_frames(results[1], speaker=1)
    assert server.sent_chunks != sorted(server.sent_chunks)  # they really were interleaved on the wire


async def test_trio_context_commands(fake: tuple[FakeServer, Path]) -> None:
    server, path = fake
    with trio.fail_after(10):
        async with trio_client.open_client(path) as client:
            await client.open_session("s")
            added = await client.add_context("s", 0, "Hi.", np.zeros(2 * 1920, dtype=np.float32), pinned=True)
            assert added == ContextAdded(session="s", frames=2, rows=12)
            added = await client.add_context("s", 1, "Text only.")
            assert added.frames == 0
            assert await client.clear_context("s") == ContextCleared(session="s")
            assert await client.close_session("s") == SessionClosed(session="s")
    sent = [m for m in server.received if isinstance(m, AddContext)]
    assert sent[0].format == "pcm_f32le" and sent[0].rate == 24000 and sent[0].pinned
    assert sent[1].audio is None


async def test_trio_non_fatal_error_fails_only_its_request(fake: tuple[FakeServer, Path]) -> None:
    _, path = fake
    with trio.fail_after(10):
        async with trio_client.open_client(path) as client:
            with pytest.raises(RequestError) as info:
                await client.open_session("bad")
            assert info.value.code == "unknown_session" and info.value.session == "bad"
            await client.open_session("s")
            good = await client.start_speaking("s", "Fine.", 0)
            with pytest.raises(RequestError) as info:
                async for _ in client.speak("bad", "Doomed.", 0):
                    pass
            assert info.value.request is not None
            check_frames([chunk async for chunk in good], speaker=0)
            with pytest.raises(RequestError) as info:
                await client.cancel("never-was")
            assert info.value.code == "no_such_request"
            assert client.lost is None


async def test_trio_fatal_error_closes_the_client(fake: tuple[FakeServer, Path]) -> None:
    _, path = fake
    with trio.fail_after(10), pytest.raises(ConnectionLost) as info:
        async with trio_client.open_client(path) as client:
            speech = client.speak("s", "Interrupted.", 0, max_frames=1000)
            await speech.start()
            try:
                await client.open_session("die")
            finally:
                assert client.lost is not None and client.lost.code == "internal"
                with pytest.raises(ConnectionLost):
                    await client.ping()
                with pytest.raises(ConnectionLost):
                    async for _ in speech:
                        pass
    assert info.value.code == "internal" and "fell over" in info.value.message


async def test_trio_cancel_mid_stream(fake: tuple[FakeServer, Path]) -> None:
    _, path = fake
    with trio.fail_after(10):
        async with trio_client.open_client(path) as client:
            speech = client.speak("s", "A long story.", 0, max_frames=1000)
            chunks = []
            async for chunk in speech:
                chunks.append(chunk)
                if len(chunks) == 2:
                    cancelled = await speech.cancel()
                    assert cancelled.request == speech.request and cancelled.frames_sent >= 2
            assert speech.end is not None and speech.end.reason == "cancelled"
            assert len(chunks) == speech.end.frames < 1000
            with pytest.raises(RequestError) as info:
                await client.cancel(speech.request)  # it is over: the daemon no longer knows it
            assert info.value.code == "no_such_request" and info.value.request == speech.request
            # Speech.cancel knows the speech ended and answers from its end record instead.
            assert await speech.cancel() == Cancelled(request=speech.request, frames_sent=len(chunks))


async def test_trio_closing_an_unread_speech_does_not_block_others(fake: tuple[FakeServer, Path]) -> None:
    server, path = fake
    with trio.fail_after(10):
        async with trio_client.open_client(path, max_buffered=2) as client:
            async with client.speak("s", "Nobody listens.", 0, max_frames=1000) as speech:
                await speech.start()
                await trio.sleep(0.05)  # its backlog fills up and the reader pauses
            assert await client.ping() >= 0  # closing it dropped the backlog: the reader goes on
            with trio.fail_after(5):
                while Cancel(request=speech.request) not in server.received:
                    await trio.sleep(0.01)


async def test_trio_unsupported_version(fake: tuple[FakeServer, Path]) -> None:
    _, path = fake
    with trio.fail_after(10), pytest.raises(ConnectionLost) as info:
        async with trio_client.open_client(path, versions=(2,)):
            pass
    assert info.value.code == "unsupported_version"


async def test_trio_bad_arguments_fail_locally(fake: tuple[FakeServer, Path]) -> None:
    _, path = fake
    with trio.fail_after(10):
        async with trio_client.open_client(path) as client:
            with pytest.raises(ProtocolError) as info:
                client.speak("s", "x", speaker=-1)
            assert info.value.field == "speaker"
            assert await client.ping() >= 0  # the connection is untouched


async def test_trio_client_is_closed_after_its_block(fake: tuple[FakeServer, Path]) -> None:
    server, path = fake
    with trio.fail_after(10):
        async with trio_client.open_client(path) as client:
            await client.open_session("s")
            speech = client.speak("s", "Never sent.", 0)
        assert client.lost is not None and client.lost.code == "closed"
        with pytest.raises(ConnectionLost):
            await client.ping()
        with pytest.raises(ConnectionLost):
            await speech.start()
        speech.close()  # nothing to cancel, and no nursery to do it in
    assert not any(isinstance(msg, Speak | Ping) for msg in server.received)


# ---- blocking client, in a thread against the same fake server ----


def blocking_session(path: Path) -> None:
    with blocking_client.connect(path, client="blocking", timeout=10) as client:
        assert client.welcome.frame_samples == 1920
        assert client.ping() >= 0
        assert client.open_session("s") == SessionOpened(session="s")
        assert client.add_context("s", 0, "Hi.", np.zeros(1920, dtype=np.float32)).frames == 1

        speech = client.speak("s", "Hello.", speaker=1)
        check_frames(list(speech), speaker=1)
        assert speech.end is not None and speech.end.reason == "eos" and speech.end.frames == 3

        # Two in flight: the second is buffered while the first is read.
        first = client.start_speaking("s", "One.", 0)
        second = client.start_speaking("s", "Two.", 1, format="pcm_s16le")
        check_frames(list(first), speaker=0)
        check_frames(list(second), speaker=1, atol=1 / 32767)

        with pytest.raises(RequestError) as info:
            client.open_session("bad")
        assert info.value.code == "unknown_session"
        with pytest.raises(RequestError):
            list(client.speak("bad", "Doomed.", 0))

        long = client.speak("s", "A long story.", 0, max_frames=1000)
        chunks = [next(long), next(long)]
        assert long.cancel().frames_sent >= 2
        chunks += list(long)
        assert long.end is not None and long.end.reason == "cancelled" and long.end.frames == len(chunks)

        with pytest.raises(ConnectionLost) as lost:
            client.open_session("die")
        assert lost.value.code == "internal"
        with pytest.raises(ConnectionLost):
            client.ping()


async def test_blocking_client(fake: tuple[FakeServer, Path]) -> None:
    _, path = fake
    with trio.fail_after(20):
        await trio.to_thread.run_sync(blocking_session, path)


async def test_blocking_unsupported_version(fake: tuple[FakeServer, Path]) -> None:
    _, path = fake

    def run() -> None:
        with pytest.raises(ConnectionLost) as info:
            blocking_client.connect(path, versions=(2,), timeout=10)
        assert info.value.code == "unsupported_version"

    with trio.fail_after(20):
        await trio.to_thread.run_sync(run)


async def test_trio_client_block_exceptions_and_cancellation_pass_through(fake: tuple[FakeServer, Path]) -> None:
    _, path = fake
    with trio.fail_after(10):
        with pytest.raises(KeyError):  # not wrapped in an ExceptionGroup by the client's internal nursery
            async with trio_client.open_client(path):
                raise KeyError("mine")
        with trio.move_on_after(0.05) as scope:
            async with trio_client.open_client(path) as client:
                async for _ in client.speak("s", "Cut short from outside.", 0, max_frames=1000):
                    pass
        assert scope.cancelled_caught
