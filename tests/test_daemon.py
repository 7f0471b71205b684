"""The daemon over real Unix sockets, with the tiny random model and codec.

The client side here is a bare protocol `Connection` over a trio socket, so tests can also send what a
well-behaved client library never would (garbage, truncated frames, out-of-order messages).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import soundfile as sf
import trio
from captured import capture_contexts

from csmd.daemon.server import Daemon
from csmd.daemon.unix_socket import DaemonRunningError, SharedSocketDirError
from csmd.model.generator import Generator
from csmd.protocol import messages as m
from csmd.protocol.connection import Connection, ConnectionClosed
from csmd.protocol.pcm import decode_pcm


class RawClient:
    """A protocol client with no conveniences: send messages, wait for the ones you want."""

    def __init__(self, stream: trio.SocketStream):
        self.stream = stream
        self.conn = Connection(m.Role.CLIENT)
        self.inbox: list[m.Message | ConnectionClosed] = []

    opened: ClassVar[list[trio.SocketStream]] = []  # closed after each test

    @classmethod
    async def connect(cls, path: Path, hello: bool = True) -> RawClient:
        client = cls(await trio.open_unix_socket(str(path)))
        cls.opened.append(client.stream)
        if hello:
            await client.send(m.Hello(protocol=(1,), client="test"))
            assert isinstance(await client.next(), m.Welcome)
        return client

    async def send(self, msg: m.Message) -> None:
        await self.stream.send_all(self.conn.send(msg))

    async def next(self) -> m.Message | ConnectionClosed:
        while not self.inbox:
            data = await self.stream.receive_some(1 << 16)
            self.inbox.extend(self.conn.receive_data(data))
        return self.inbox.pop(0)

    async def until(self, done: Callable[[m.Message | ConnectionClosed], bool]) -> list[m.Message | ConnectionClosed]:
        seen = []
        while True:
            msg = await self.next()
            seen.append(msg)
            if done(msg) or isinstance(msg, ConnectionClosed):
                return seen

    async def open(self, session: str) -> None:
        await self.send(m.OpenSession(session=session))
        assert await self.next() == m.SessionOpened(session=session)

    async def speak(self, session: str, request: str, max_frames: int = 8, **params: object) -> list[m.Message]:
        await self.send(m.Speak(session=session, request=request, text="Hello there.", speaker=0,
                                max_frames=max_frames, seed=1, **params))  # type: ignore[arg-type]  # fmt: skip
        msgs = await self.until(lambda x: isinstance(x, m.AudioEnd | m.Error) and x.request == request)
        return [x for x in msgs if isinstance(x, m.Message)]


@pytest.fixture(autouse=True)
async def close_clients() -> AsyncIterator[None]:
    yield
    for stream in RawClient.opened:
        await stream.aclose()
    RawClient.opened.clear()


@pytest.fixture
async def daemon(tiny_voice: tuple[Generator, object], tmp_path: Path) -> AsyncIterator[tuple[Daemon, Path]]:
    generator, mimi = tiny_voice
    d = Daemon(generator, mimi, "random:tiny")  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        path = await nursery.start(d.serve, tmp_path / "run" / "csmd.sock")
        yield d, path
        nursery.cancel_scope.cancel()
    d.close()


def audio_of(msgs: list[m.Message]) -> np.ndarray:
    chunks = [x for x in msgs if isinstance(x, m.AudioChunk)]
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    return np.concatenate([decode_pcm(c.pcm, "pcm_s16le") for c in chunks]) if chunks else np.zeros(0)


async def test_speak_round_trip(daemon: tuple[Daemon, Path]) -> None:
    _, path = daemon
    client = await RawClient.connect(path)
    await client.open("s")
    msgs = await client.speak("s", "r1", max_frames=6)
    start = msgs[0]
    assert isinstance(start, m.AudioStart) and start.sample_rate == 24_000 and start.frame_samples == 1920
    end = msgs[-1]
    assert isinstance(end, m.AudioEnd) and end.reason in ("eos", "max_length")
    assert audio_of(msgs).size == end.frames * 1920
    assert [c.frame for c in msgs if isinstance(c, m.AudioChunk)] == list(range(end.frames))
    # The same seed in a fresh session gives the same audio.
    await client.open("t")
    assert np.array_equal(audio_of(await client.speak("t", "r2", max_frames=6)), audio_of(msgs))


async def test_audio_end_times_count_from_accepting_the_request(
    daemon: tuple[Daemon, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """total_ms and first_audio_ms include the prefill (docs/protocol.md: "from accepting the request")."""
    d, path = daemon
    real = d.generator.begin

    def slow_begin(*args: object, **kwargs: object) -> object:
        time.sleep(0.3)  # on the model thread: a long prefill
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(d.generator, "begin", slow_begin)
    client = await RawClient.connect(path)
    await client.open("s")
    end = (await client.speak("s", "r1", max_frames=3))[-1]
    assert isinstance(end, m.AudioEnd) and end.frames == 3 and end.first_audio_ms is not None
    assert 300 <= end.first_audio_ms <= end.total_ms


async def test_three_sessions_speak_at_once(daemon: tuple[Daemon, Path]) -> None:
    _, path = daemon
    order: list[str] = []

    async def talk(name: str) -> None:
        client = await RawClient.connect(path)
        await client.open(name)
        await client.send(m.Speak(session=name, request=name, text="Hi.", speaker=0, max_frames=12, seed=2))
        while not isinstance(msg := await client.next(), m.AudioEnd):
            if isinstance(msg, m.AudioChunk):
                order.append(name)
        assert msg.frames == 12

    async with trio.open_nursery() as nursery:
        for name in ("a", "b", "c"):
            nursery.start_soon(talk, name)
    assert sorted(order) == ["a"] * 12 + ["b"] * 12 + ["c"] * 12
    # Served fairly, frame by frame: nobody finishes before everyone has started.
    first_last = min(len(order) - order[::-1].index(n) for n in "abc")
    assert all(order.index(n) < first_last for n in "abc")


async def test_second_reply_prefills_only_new_rows(
    daemon: tuple[Daemon, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    d, path = daemon
    contexts = capture_contexts(d.generator, monkeypatch)
    client = await RawClient.connect(path)
    await client.open("s")
    await client.send(m.AddContext(session="s", speaker=1, text="Some context."))
    added = await client.next()
    assert isinstance(added, m.ContextAdded) and added.frames == 0
    first = await client.speak("s", "r1", max_frames=5)
    (context,) = contexts
    before = context.rows_computed
    second = await client.speak("s", "r2", max_frames=5)
    text_rows = len(d.generator.tokenizer.encode_segment(0, "Hello there.")) if d.generator.tokenizer else 0
    frames_second = second[-1].frames  # type: ignore[attr-defined]
    # The second reply ran: the first reply's closing rows (its last frame + the EOS row), its own text, and
    # its frames but the last; nothing of the conversation before it.
    assert context.rows_computed - before == 2 + text_rows + frames_second - 1
    assert first[-1].frames == 5  # type: ignore[attr-defined]


async def test_context_audio_is_encoded(daemon: tuple[Daemon, Path]) -> None:
    _, path = daemon
    client = await RawClient.connect(path)
    await client.open("s")
    tone = (0.3 * np.sin(np.arange(16_000) * 2 * np.pi * 300 / 16_000)).astype("<f4")
    msg = m.AddContext(session="s", speaker=0, text="a tone", audio=tone.tobytes(), rate=16_000,
                       format="pcm_f32le", pinned=True)  # fmt: skip
    await client.send(msg)
    added = await client.next()
    assert isinstance(added, m.ContextAdded) and added.frames == 13  # 1 s at 24 kHz = 12.5 frames, padded


async def test_cancel_mid_stream(daemon: tuple[Daemon, Path]) -> None:
    _, path = daemon
    client = await RawClient.connect(path)
    await client.open("s")
    await client.send(m.Speak(session="s", request="r", text="A long reply.", speaker=0, max_frames=200, seed=3))
    msgs = await client.until(lambda x: isinstance(x, m.AudioChunk) and x.seq == 2)
    await client.send(m.Cancel(request="r"))
    rest = await client.until(lambda x: isinstance(x, m.Cancelled))
    ack = rest[-1]
    assert isinstance(ack, m.Cancelled)
    chunks = [x for x in msgs + rest if isinstance(x, m.AudioChunk)]
    assert ack.frames_sent == len(chunks) < 200
    end = [x for x in rest if isinstance(x, m.AudioEnd)]
    assert len(end) == 1 and end[0].reason == "cancelled" and end[0].frames == ack.frames_sent
    # Nothing more for that request; the session can speak again at once.
    again = await client.speak("s", "r2", max_frames=3)
    assert not any(isinstance(x, m.AudioChunk) and x.request == "r" for x in again)
    assert isinstance(again[-1], m.AudioEnd) and again[-1].frames == 3


async def test_command_errors_fail_only_that_request(daemon: tuple[Daemon, Path]) -> None:
    _, path = daemon
    client = await RawClient.connect(path)
    await client.send(m.Speak(session="nope", request="r", text="x", speaker=0))
    error = await client.next()
    assert isinstance(error, m.Error) and error.code == "unknown_session" and not error.fatal
    await client.open("s")
    msgs = await client.speak("s", "bad", temperature=-1.0)
    assert isinstance(msgs[-1], m.Error) and msgs[-1].code == "invalid_params" and "temperature" in msgs[-1].message
    await client.send(m.Cancel(request="ghost"))
    error = await client.next()
    assert isinstance(error, m.Error) and error.code == "no_such_request"
    await client.send(m.OpenSession(session="s"))
    error = await client.next()
    assert isinstance(error, m.Error) and error.code == "session_exists"
    assert isinstance((await client.speak("s", "ok", max_frames=2))[-1], m.AudioEnd)  # still serving


async def _fatal(path: Path, payload: bytes, hello: bool = True) -> m.Error:
    client = await RawClient.connect(path, hello=hello)
    await client.stream.send_all(payload)
    error = await client.next()
    assert isinstance(error, m.Error) and error.fatal
    assert isinstance(await client.next(), ConnectionClosed)
    return error


def frame(obj: bytes) -> bytes:
    return struct.pack(">I", len(obj)) + obj


@pytest.mark.parametrize(
    ("payload", "hello", "code"),
    [
        (frame(b"\xc1\xc1garbage"), True, "malformed"),
        (frame(b"\x93\x01\x02\x03"), True, "malformed"),  # a msgpack list, not a map
        (struct.pack(">I", 1 << 30), True, "too_large"),
        (frame(b"\x81\xa4type\xa5bogus"), True, "unknown_type"),
        (frame(b"\x82\xa4type\xacsession.open\xa7session\x05"), True, "bad_field"),  # session: int
        (frame(b"\x82\xa4type\xacsession.open\xa7session\xa1s"), False, "out_of_order"),  # before hello
    ],
)
async def test_bad_input_ends_only_that_connection(
    daemon: tuple[Daemon, Path], payload: bytes, hello: bool, code: str
) -> None:
    _, path = daemon
    other = await RawClient.connect(path)
    await other.open("o")
    await other.send(m.Speak(session="o", request="o", text="Still here.", speaker=0, max_frames=10, seed=4))
    assert isinstance(await other.next(), m.AudioStart)
    assert (await _fatal(path, payload, hello)).code == code
    rest = await other.until(lambda x: isinstance(x, m.AudioEnd))
    assert isinstance(rest[-1], m.AudioEnd) and rest[-1].frames == 10  # the other stream went on unharmed


async def test_truncated_message_and_vanishing_client(daemon: tuple[Daemon, Path]) -> None:
    d, path = daemon
    client = await RawClient.connect(path)
    await client.stream.send_all(struct.pack(">I", 100) + b"\x81")  # then hang up inside the message
    await client.stream.aclose()
    leaver = await RawClient.connect(path)
    await leaver.open("gone")
    await leaver.send(m.Speak(session="gone", request="r", text="Bye.", speaker=0, max_frames=200, seed=5))
    await leaver.until(lambda x: isinstance(x, m.AudioChunk))
    await leaver.stream.aclose()  # vanish mid-stream
    with trio.fail_after(10):
        while d.sessions_open or d.scheduler.active:
            await trio.sleep(0.01)
    stayer = await RawClient.connect(path)
    await stayer.open("s")
    assert isinstance((await stayer.speak("s", "r", max_frames=3))[-1], m.AudioEnd)


async def test_a_client_that_never_reads_pauses_only_itself(daemon: tuple[Daemon, Path]) -> None:
    d, path = daemon
    sleeper = await RawClient.connect(path)
    await sleeper.open("z")
    await sleeper.send(m.Speak(session="z", request="z", text="Lots.", speaker=0, max_frames=200, seed=6,
                               format="pcm_f32le"))  # fmt: skip
    busy = await RawClient.connect(path)
    await busy.open("b")
    msgs = await busy.speak("b", "b", max_frames=40)
    assert isinstance(msgs[-1], m.AudioEnd) and msgs[-1].frames == 40
    (stalled,) = [s for s in d.scheduler.active if s.request == "z"]
    made = len(stalled.utterance.frames)
    await trio.sleep(0.3)
    assert len(stalled.utterance.frames) == made < 200  # paused by backpressure, not still generating


async def test_second_daemon_and_stale_socket(daemon: tuple[Daemon, Path], tmp_path: Path) -> None:
    d, path = daemon
    with pytest.raises(DaemonRunningError, match="already listening"):
        await d.serve(path)
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()  # the file stays, nobody listens: a daemon that died
    async with trio.open_nursery() as nursery:
        await nursery.start(d.serve, stale)
        client = await RawClient.connect(stale)
        await client.send(m.Ping(nonce=7))
        assert await client.next() == m.Pong(nonce=7)
        nursery.cancel_scope.cancel()
    assert not stale.exists()  # removed on shutdown


async def test_socket_modes(daemon: tuple[Daemon, Path]) -> None:
    _, path = daemon
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to fork a child that becomes another user")
async def test_another_user_is_refused(daemon: tuple[Daemon, Path]) -> None:
    d, _ = daemon
    # A socket the other user can reach (the test's tmp_path is private to root), so that what refuses
    # them is the daemon's SO_PEERCRED check and not file permissions.
    public = Path(tempfile.mkdtemp(prefix="csmd-peercred-"))
    public.chmod(0o755)
    path = public / "csmd.sock"
    async with trio.open_nursery() as nursery:
        await nursery.start(d.serve, path)
        path.chmod(0o666)
        data = await trio.to_thread.run_sync(_connect_as_nobody, path)
        nursery.cancel_scope.cancel()
    public.rmdir()
    conn = Connection(m.Role.CLIENT)
    conn.send(m.Hello(protocol=(1,), client="nobody"))
    events = conn.receive_data(data)
    assert isinstance(events[0], m.Error) and events[0].code == "forbidden" and events[0].fatal


def _connect_as_nobody(path: Path) -> bytes:
    """Fork a child that becomes `nobody`, connects, and pipes back whatever the daemon sent it."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.setgid(65534)
            os.setuid(65534)
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(path))
                s.settimeout(10)
                data = b""
                while chunk := s.recv(4096):
                    data += chunk
            os.write(write, data)
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    return data


async def test_serve_and_say_through_it(tmp_path: Path) -> None:
    """`csmd serve` as users run it: `csmd say` goes through it, a second daemon is refused, SIGTERM ends it."""
    await trio.to_thread.run_sync(_serve_and_say, tmp_path)


def _serve_and_say(tmp_path: Path) -> None:
    sock = tmp_path / "d" / "csmd.sock"
    cli = [sys.executable, "-m", "csmd.cli"]
    server = subprocess.Popen([*cli, "serve", "--model", "random:tiny", "--socket", str(sock)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not sock.exists():
            assert server.poll() is None and time.monotonic() < deadline, server.communicate()
            time.sleep(0.05)
        said = subprocess.run([*cli, "say", "Hi.", "-o", str(tmp_path / "a.wav"), "--socket", str(sock),
                               "--max-seconds", "0.4", "--seed", "9"],
                              capture_output=True, text=True, check=False)  # fmt: skip
        assert said.returncode == 0, said.stderr
        assert "speaking through the daemon" in said.stderr
        frames = int(re.search(r"\((\d+) frames", said.stdout).group(1))  # type: ignore[union-attr]
        assert sf.info(str(tmp_path / "a.wav")).frames == frames * 1920
        local = subprocess.run([*cli, "say", "Hi.", "-o", str(tmp_path / "b.wav"), "--local",
                                "--model", "random:tiny", "--max-seconds", "0.4", "--seed", "9"],
                               capture_output=True, text=True, check=False)  # fmt: skip
        assert local.returncode == 0 and "daemon" not in local.stderr
        # Same model, same seed: the daemon's audio is the in-process audio (to within 16-bit transport).
        np.testing.assert_allclose(sf.read(tmp_path / "a.wav")[0], sf.read(tmp_path / "b.wav")[0], atol=1e-4)
        second = subprocess.run([*cli, "serve", "--model", "random:tiny", "--socket", str(sock)],
                                capture_output=True, text=True, check=False)  # fmt: skip
        assert second.returncode == 2 and "already listening" in second.stderr
    finally:
        server.send_signal(signal.SIGTERM)
        _, err = server.communicate(timeout=30)
    assert server.returncode == 0, err
    assert not sock.exists()


async def test_pipelined_commands_take_effect_in_order(daemon: tuple[Daemon, Path]) -> None:
    """A client may send session.open and the commands on it without waiting for replies."""
    _, path = daemon
    client = await RawClient.connect(path)
    for msg in (
        m.OpenSession(session="p"),
        m.AddContext(session="p", speaker=0, text="One."),
        m.AddContext(session="p", speaker=1, text="Two."),
        m.ClearContext(session="p"),
        m.CloseSession(session="p"),
    ):
        await client.send(msg)
    replies = [await client.next() for _ in range(5)]
    assert [type(r) for r in replies] == [m.SessionOpened, m.ContextAdded, m.ContextAdded, m.ContextCleared,
                                          m.SessionClosed]  # fmt: skip
    first, second = replies[1], replies[2]
    assert isinstance(first, m.ContextAdded) and isinstance(second, m.ContextAdded) and first.rows < second.rows


async def test_session_limits_close_while_speaking_and_bad_audio(daemon: tuple[Daemon, Path]) -> None:
    d, path = daemon
    client = await RawClient.connect(path)
    await client.open("s")
    await client.send(m.Speak(session="s", request="r", text="Long.", speaker=0, max_frames=200, seed=8))
    await client.until(lambda x: isinstance(x, m.AudioChunk))
    await client.send(m.CloseSession(session="s"))
    rest = await client.until(lambda x: isinstance(x, m.SessionClosed))
    ends = [x for x in rest if isinstance(x, m.AudioEnd)]
    assert len(ends) == 1 and ends[0].reason == "cancelled"
    assert d.sessions_open == 0
    nan = np.array([0.1, np.nan, 0.2] * 100, dtype="<f4").tobytes()
    await client.open("t")
    await client.send(m.AddContext(session="t", speaker=0, text="x", audio=nan, rate=24_000, format="pcm_f32le"))
    error = await client.next()
    assert isinstance(error, m.Error) and error.code == "invalid_params" and "NaN" in error.message
    for i in range(d.limits.max_sessions_per_connection - 1):  # (the daemon-wide cap: tests/adversarial)
        await client.open(f"more{i}")
    await client.send(m.OpenSession(session="one-too-many"))
    error = await client.next()
    assert isinstance(error, m.Error) and error.code == "too_many_sessions"


async def test_commands_queued_behind_a_close_find_no_session(daemon: tuple[Daemon, Path]) -> None:
    _, path = daemon
    client = await RawClient.connect(path)
    for msg in (
        m.OpenSession(session="c"),
        m.CloseSession(session="c"),
        m.AddContext(session="c", speaker=0, text="x"),
    ):
        await client.send(msg)
    replies = [await client.next() for _ in range(3)]
    assert isinstance(replies[0], m.SessionOpened) and isinstance(replies[1], m.SessionClosed)
    assert isinstance(replies[2], m.Error) and replies[2].code == "unknown_session"


async def test_default_socket_directory_must_be_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from csmd.daemon.unix_socket import default_socket_path

    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert default_socket_path() == tmp_path / "csmd" / "csmd.sock"
    (tmp_path / "csmd").mkdir(mode=0o755)
    (tmp_path / "csmd").chmod(0o755)
    with pytest.raises(SharedSocketDirError, match="not a private directory"):
        default_socket_path()
    (tmp_path / "csmd").chmod(0o700)
    assert default_socket_path() == tmp_path / "csmd" / "csmd.sock"


async def test_trim_keeps_only_the_heard_part_of_a_reply(
    daemon: tuple[Daemon, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """context.trim: what `csmd talk` sends after a barge-in, through the daemon."""
    d, path = daemon
    contexts = capture_contexts(d.generator, monkeypatch)
    client = await RawClient.connect(path)
    await client.open("s")
    await client.speak("s", "r1", max_frames=10)
    await client.speak("s", "r2", max_frames=5)
    (context,) = contexts
    first = context.segments[0]
    await client.send(m.TrimContext(session="s", request="r1", frames=4, text="Hello"))
    trimmed = await client.next()
    assert isinstance(trimmed, m.ContextTrimmed) and trimmed.rows == context.length
    (kept,) = context.segments  # r2, made after r1, is gone
    assert kept.text == "Hello" and first.codes is not None and np.array_equal(kept.codes, first.codes[:4])
    await client.send(m.TrimContext(session="s", request="nope", frames=1, text=""))
    error = await client.next()
    assert isinstance(error, m.Error) and error.code == "no_such_request"
    await client.send(m.TrimContext(session="s", request="r1", frames=9, text=""))
    error = await client.next()
    assert isinstance(error, m.Error) and error.code == "invalid_params" and "frames must be in 0..4" in error.message


async def test_trio_client_against_the_daemon(daemon: tuple[Daemon, Path]) -> None:
    """The trio client library end to end: context, speech, trim."""
    from csmd.protocol import trio_client

    _, path = daemon
    async with trio_client.open_client(path, client="test") as client:
        await client.open_session("c")
        added = await client.add_context("c", 1, "Hi.", np.zeros(4800, np.float32), rate=24_000, pinned=True)
        assert added.frames == 3
        speech = await client.start_speaking("c", "Hello there.", 0, max_frames=6, seed=1, request="r")
        chunks = [chunk async for chunk in speech]
        assert speech.end is not None and len(chunks) == speech.end.frames == 6
        assert all(c.pcm.shape == (1920,) for c in chunks)
        trimmed = await client.trim_context("c", "r", 2, "Hello")
        text_rows = len(b"[0]Hello") + 2  # random:tiny's byte tokenizer, plus BOS and EOS
        assert trimmed.rows == added.rows + text_rows + 2 + 1  # the reply's text, 2 frames, the closing frame


async def test_a_long_prefill_runs_between_the_frames_of_other_streams(
    daemon: tuple[Daemon, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new turn's rows (a long context, then a reply's text) are prefilled a chunk per frame boundary: a
    session already speaking keeps getting frames, its gaps about one chunk, not the whole prefill."""
    from csmd.model.generator import Context

    _, path = daemon
    real = Context._run_pending
    row_seconds = 0.01

    def slow_rows(self: Context, max_rows: int | None = None) -> object:
        rows = min(self.pending, max_rows if max_rows is not None else self.pending)
        time.sleep(row_seconds * rows)  # on the model thread: a slow machine's prefill
        return real(self, max_rows)

    monkeypatch.setattr(Context, "_run_pending", slow_rows)
    speaker = await RawClient.connect(path)
    await speaker.open("a")
    await speaker.send(m.Speak(session="a", request="a", text="Go.", speaker=0, max_frames=400, seed=1))
    await speaker.until(lambda x: isinstance(x, m.AudioChunk))
    arrivals: list[float] = []

    async def listen() -> None:
        while True:
            msg = await speaker.next()
            arrivals.append(time.perf_counter())
            if isinstance(msg, m.AudioEnd | ConnectionClosed):
                return

    other = await RawClient.connect(path)
    await other.open("b")
    history = "word " * 150  # about 750 rows of text at a byte-level tokenizer's rate, or at least 150
    async with trio.open_nursery() as nursery:
        nursery.start_soon(listen)
        started = time.perf_counter()
        await other.send(m.AddContext(session="b", text=history, speaker=1))
        added = await other.until(lambda x: isinstance(x, m.ContextAdded | m.Error))
        assert isinstance(added[-1], m.ContextAdded) and added[-1].rows >= 150
        prefill_seconds = time.perf_counter() - started
        assert prefill_seconds >= 150 * row_seconds  # it really was slow
        window = [t for t in arrivals if started <= t <= started + prefill_seconds]
        gaps = np.diff([started, *window])
        # Frames kept coming through the prefill: gaps of a chunk (a few rows' time), not 1.5 s or more.
        assert len(window) >= 5 and gaps.max() < prefill_seconds / 3, (len(window), gaps.max(), prefill_seconds)
        await speaker.send(m.Cancel(request="a"))
        nursery.cancel_scope.deadline = trio.current_time() + 10


@pytest.mark.parametrize("batch_max", [64, 2])
async def test_sessions_speaking_together_share_batched_steps(
    daemon: tuple[Daemon, Path], monkeypatch: pytest.MonkeyPatch, batch_max: int
) -> None:
    """Replies of several sessions advance together: a step carries every reply ready for a frame, up to the
    most one batched step takes (BATCH_MAX; more go in several steps of the same boundary)."""
    from csmd.daemon import scheduler as scheduler_module

    monkeypatch.setattr(scheduler_module, "BATCH_MAX", batch_max)
    sizes: list[int] = []
    real = scheduler_module.step_together

    def counting(utterances: list[object]) -> object:
        sizes.append(len(utterances))
        return real(utterances)  # type: ignore[arg-type]

    monkeypatch.setattr(scheduler_module, "step_together", counting)
    _, path = daemon
    clients = [await RawClient.connect(path) for _ in range(3)]
    for i, client in enumerate(clients):
        await client.open(f"s{i}")
    for i, client in enumerate(clients):
        await client.send(m.Speak(session=f"s{i}", request="r", text="Hello.", speaker=0, max_frames=30, seed=i))
    for client in clients:
        end = (await client.until(lambda x: isinstance(x, m.AudioEnd)))[-1]
        assert isinstance(end, m.AudioEnd) and end.frames == 30
    assert sum(sizes) == 3 * 30 and max(sizes) == min(3, batch_max)
    steps = 30 * -(-3 // batch_max)  # boundaries x steps per boundary
    assert len(sizes) <= steps + 10  # mostly together: about this many steps, not 90 of one reply each


async def test_a_fault_in_one_reply_of_a_batch_ends_only_that_reply(
    daemon: tuple[Daemon, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batched step that fails is retried reply by reply: the faulty reply ends with `internal`, the others in
    its batch go on to their end."""
    from csmd.model.generator import Utterance

    real = Utterance._accept

    def faulty(self: Utterance, frame: np.ndarray) -> object:
        if self.seed == 666 and len(self.frames) >= 3:
            raise RuntimeError("an engine fault in one reply")
        return real(self, frame)

    monkeypatch.setattr(Utterance, "_accept", faulty)
    _, path = daemon
    good, bad = await RawClient.connect(path), await RawClient.connect(path)
    await good.open("g")
    await bad.open("b")
    await good.send(m.Speak(session="g", request="g", text="Fine.", speaker=0, max_frames=20, seed=1))
    await bad.send(m.Speak(session="b", request="b", text="Broken.", speaker=0, max_frames=20, seed=666))
    ended = await bad.until(lambda x: isinstance(x, m.AudioEnd))
    errors = [x for x in ended if isinstance(x, m.Error)]
    assert len(errors) == 1 and errors[0].code == "internal" and "one reply" in errors[0].message
    assert isinstance(ended[-1], m.AudioEnd) and ended[-1].reason == "error" and ended[-1].frames == 3
    rest = await good.until(lambda x: isinstance(x, m.AudioEnd))
    assert isinstance(rest[-1], m.AudioEnd) and rest[-1].frames == 20 and not any(isinstance(x, m.Error) for x in rest)
    # Every frame the good reply made reached its client, in order: none was made and lost in the failed step.
    assert [x.frame for x in rest if isinstance(x, m.AudioChunk)] == list(range(20))
