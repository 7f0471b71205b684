"""What one hostile or broken client may hold of the daemon: time, connections, sessions, buffered bytes.

Time-based limits run under trio's MockClock (`autojump_clock`: the clock jumps to the next deadline whenever
every task waits), against an in-process daemon on the tiny random model; a few run against a real
`csmd serve --model random:tiny` process.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import socket
import struct
import sys
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import msgpack
import pytest
import trio
import trio.testing
from serving import csmd_serve

from csmd.audio.mimi.model import Mimi
from csmd.daemon.limits import Limits, MiB
from csmd.daemon.server import Daemon
from csmd.model.generator import Generator
from csmd.protocol import blocking_client, trio_client
from csmd.protocol import messages as m
from csmd.protocol.connection import Connection, ConnectionClosed
from csmd.protocol.errors import ConnectionLost, RequestError

Event = m.Message | ConnectionClosed


@contextlib.contextmanager
def clock_held(clock: trio.testing.MockClock) -> Iterator[None]:
    """Stops the mock clock's jumps while a test waits on a real thread (the model worker).

    Under autojump, a task that waits for a thread looks idle, so the clock would jump past every deadline while
    the thread works; on a loaded machine that fired the client's own timeouts.
    """
    threshold = clock.autojump_threshold
    clock.autojump_threshold = float("inf")
    try:
        yield
    finally:
        clock.autojump_threshold = threshold


class Raw:
    """A client that sends whatever bytes the test wants and parses what comes back."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.conn = Connection(m.Role.CLIENT)
        self.inbox: list[Event] = []

    async def send(self, msg: m.Message) -> None:
        await self.stream.send_all(self.conn.send(msg))

    async def hello(self) -> None:
        await self.send(m.Hello(protocol=(1,), client="limits-test"))
        assert isinstance(await self.next(), m.Welcome)

    async def next(self) -> Event:
        with trio.fail_after(60):  # (a deadline that never fires fails the test, under the mock clock too)
            while not self.inbox:
                self.inbox.extend(self.conn.receive_data(await self.stream.receive_some(1 << 16)))
        return self.inbox.pop(0)

    async def fatal(self) -> m.Error:
        """The fatal error that ends the connection, and then the end of the stream."""
        error = await self.next()
        assert isinstance(error, m.Error) and error.fatal, error
        assert isinstance(await self.next(), ConnectionClosed)
        return error


def padded_ping(nonce: int, body_size: int) -> bytes:
    """A framed ping whose body is exactly `body_size` bytes (an unknown field, which receivers ignore, pads it)."""
    head = msgpack.packb({"type": "ping", "nonce": nonce, "pad": b""}, use_bin_type=True)
    pad = body_size - len(head)
    # bin8 (1 length byte), bin16 (2) or bin32 (4) header instead of the empty bin's one byte
    extra = 0 if pad < 256 else 1 if pad < 65536 + 1 else 3
    body = msgpack.packb({"type": "ping", "nonce": nonce, "pad": b"x" * (pad - extra)}, use_bin_type=True)
    assert len(body) == body_size, (len(body), body_size)
    return struct.pack(">I", len(body)) + body


Start = Callable[..., Awaitable[tuple[Daemon, Path]]]


@pytest.fixture
async def start_daemon(tiny_voice: tuple[Generator, Mimi], tmp_path: Path) -> AsyncIterator[Start]:
    """start_daemon(limits) -> (daemon, socket path), served until the test ends."""
    daemons: list[Daemon] = []
    async with trio.open_nursery() as nursery:

        async def start(limits: Limits | None = None) -> tuple[Daemon, Path]:
            daemon = Daemon(*tiny_voice, "random:tiny", limits)
            daemons.append(daemon)
            path = await nursery.start(daemon.serve, tmp_path / f"d{len(daemons)}" / "csmd.sock")
            return daemon, path

        yield start
        nursery.cancel_scope.cancel()
    for daemon in daemons:
        daemon.close()


@pytest.fixture
async def connect() -> AsyncIterator[Callable[[Path], Awaitable[Raw]]]:
    """connect(path) -> a Raw client, closed when the test ends."""
    streams: list[trio.SocketStream] = []

    async def open_raw(path: Path) -> Raw:
        stream = await trio.open_unix_socket(str(path))
        streams.append(stream)
        return Raw(stream)

    yield open_raw
    for stream in streams:
        await stream.aclose()


async def eventually(condition: Callable[[], bool], seconds: float = 10) -> None:
    with trio.fail_after(seconds):
        while not condition():
            await trio.sleep(0.01)


# ---- deadlines, under the mock clock ----


async def test_no_hello_within_the_handshake_deadline(start_daemon: Start, connect, autojump_clock) -> None:
    _, path = await start_daemon(Limits(handshake_timeout=5))
    silent = await connect(path)
    began = trio.current_time()
    error = await silent.fatal()
    assert error.code == "timeout" and "no hello within 5 s" in error.message
    assert trio.current_time() - began == pytest.approx(5, abs=0.05)

    # Dripping the hello byte by byte does not stretch the handshake.
    dripping = await connect(path)
    hello = dripping.conn.send(m.Hello(protocol=(1,), client="slow"))
    began = trio.current_time()
    async with trio.open_nursery() as nursery:

        async def drip() -> None:
            with contextlib.suppress(trio.BrokenResourceError):
                for byte in hello[:-1]:
                    await dripping.stream.send_all(bytes([byte]))
                    await trio.sleep(1)

        nursery.start_soon(drip)
        error = await dripping.fatal()
        nursery.cancel_scope.cancel()
    assert error.code == "timeout" and "hello" in error.message
    assert trio.current_time() - began == pytest.approx(5, abs=0.05)


async def test_idle_connection_is_closed_but_pings_and_sessions_keep_one(
    start_daemon: Start, connect, autojump_clock
) -> None:
    d, path = await start_daemon(Limits(idle_timeout=30))
    idle = await connect(path)
    await idle.hello()
    began = trio.current_time()
    error = await idle.fatal()
    assert error.code == "timeout" and "no session open" in error.message and "--idle-timeout" in error.message
    assert trio.current_time() - began == pytest.approx(30, abs=0.05)

    pinging = await connect(path)
    await pinging.hello()
    for nonce in range(10):  # 200 s in all, never 30 s quiet
        await trio.sleep(20)
        await pinging.send(m.Ping(nonce=nonce))
        assert await pinging.next() == m.Pong(nonce=nonce)

    holding = await connect(path)
    await holding.hello()
    with clock_held(autojump_clock):  # the session's context is made on the model thread, in real time
        await holding.send(m.OpenSession(session="s"))
        assert await holding.next() == m.SessionOpened(session="s")
    await trio.sleep(1000)  # a connection with a session may be quiet (a conversation pauses)
    await holding.send(m.Ping(nonce=1))
    assert await holding.next() == m.Pong(nonce=1)
    with clock_held(autojump_clock):
        await holding.send(m.CloseSession(session="s"))
        assert await holding.next() == m.SessionClosed(session="s")
    closed_at = trio.current_time()
    error = await holding.fatal()  # idle from the moment its last session closed
    assert error.code == "timeout"
    assert trio.current_time() - closed_at == pytest.approx(30, abs=0.05)
    await eventually(lambda: d.connections == 1)  # only `pinging` is left


async def test_a_message_must_complete_within_the_message_deadline(
    start_daemon: Start, connect, autojump_clock
) -> None:
    _, path = await start_daemon(Limits(message_timeout=20))
    client = await connect(path)
    await client.hello()

    async def drip(data: bytes, interval: float) -> None:
        with contextlib.suppress(trio.BrokenResourceError):
            for byte in data:
                await client.stream.send_all(bytes([byte]))
                await trio.sleep(interval)

    # 30 bytes at 2 per second: complete after 15 s, in time.
    await drip(padded_ping(1, 26), 0.5)
    assert await client.next() == m.Pong(nonce=1)
    # 60 bytes at 2 per second would take 30 s: closed 20 s after its first byte.
    began = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(drip, padded_ping(2, 56), 0.5)
        error = await client.fatal()
        nursery.cancel_scope.cancel()
    assert error.code == "timeout" and "still incomplete 20 s after its first byte" in error.message
    assert trio.current_time() - began == pytest.approx(20, abs=0.05)


async def test_waiting_for_buffer_room_is_bounded_by_the_message_deadline(
    start_daemon: Start, connect, autojump_clock
) -> None:
    body = 256 * 1024
    d, path = await start_daemon(Limits(max_message=body, max_buffered=body, message_timeout=10))
    first, second = await connect(path), await connect(path)
    for client in (first, second):
        await client.hello()
    data = padded_ping(1, body)
    await first.stream.send_all(data[:1000])
    await eventually(lambda: d.buffers.used == body)
    await second.stream.send_all(data[:1000])  # no room: the daemon stops reading it
    errors = [await first.fatal(), await second.fatal()]
    assert "still incomplete" in errors[0].message
    assert "stayed full" in errors[1].message and "0.25 MiB" in errors[1].message
    await eventually(lambda: d.connections == 0)
    assert d.buffers.used == 0


# ---- caps ----


async def test_connection_cap(start_daemon: Start, connect) -> None:
    d, path = await start_daemon(Limits(max_connections=2))
    first, second = await connect(path), await connect(path)
    for client in (first, second):
        await client.hello()
    for _ in range(3):  # refused connections are not counted
        third = await connect(path)
        await third.send(m.Hello(protocol=(1,), client="third"))
        error = await third.fatal()
        assert error.code == "too_many_connections" and "--max-connections" in error.message
    assert d.connections == 2
    # Both Python clients report it as the reason the connection was lost, not as a reset.
    with pytest.raises(ConnectionLost) as lost:
        async with trio_client.open_client(path):
            pass
    assert lost.value.code == "too_many_connections"
    with pytest.raises(ConnectionLost) as lost:
        await trio.to_thread.run_sync(lambda: blocking_client.connect(path, timeout=10))
    assert lost.value.code == "too_many_connections"
    await first.stream.aclose()
    await eventually(lambda: d.connections == 1)
    fourth = await connect(path)
    await fourth.hello()


async def test_sessions_per_connection_and_per_daemon(start_daemon: Start, connect) -> None:
    d, path = await start_daemon(Limits(max_sessions=3, max_sessions_per_connection=2))
    a, b = await connect(path), await connect(path)
    for client in (a, b):
        await client.hello()

    async def open_session(client: Raw, name: str) -> m.Message | ConnectionClosed:
        await client.send(m.OpenSession(session=name))
        return await client.next()

    assert await open_session(a, "a1") == m.SessionOpened(session="a1")
    assert await open_session(a, "a2") == m.SessionOpened(session="a2")
    refused = await open_session(a, "a3")
    assert isinstance(refused, m.Error) and not refused.fatal and refused.code == "too_many_sessions"
    assert "one connection holds 2" in refused.message
    assert await open_session(b, "b1") == m.SessionOpened(session="b1")  # the other client still gets one
    refused = await open_session(b, "b2")
    assert isinstance(refused, m.Error) and refused.code == "too_many_sessions" and "daemon holds 3" in refused.message
    await a.send(m.CloseSession(session="a1"))
    assert await a.next() == m.SessionClosed(session="a1")
    assert await open_session(b, "b2") == m.SessionOpened(session="b2")
    assert d.sessions_open == 3


async def test_buffered_bytes_are_capped_across_connections(start_daemon: Start, connect) -> None:
    """Three clients start a 1 MiB message each; the budget holds two: the third waits, unread, for room."""
    body = 1 * MiB
    d, path = await start_daemon(Limits(max_message=body, max_buffered=2 * body))
    clients = [await connect(path) for _ in range(3)]
    for client in clients:
        await client.hello()
    data = [padded_ping(i, body) for i in range(3)]
    half = len(data[0]) // 2
    async with trio.open_nursery() as nursery:
        await clients[0].stream.send_all(data[0][:half])
        await clients[1].stream.send_all(data[1][:half])
        await eventually(lambda: d.buffers.used == 2 * body)
        nursery.start_soon(clients[2].stream.send_all, data[2])  # whole: it waits for the daemon to read it
        await trio.sleep(0.5)
        assert d.buffers.used == 2 * body  # the third got no room, and was not read beyond one receive
        await clients[0].stream.send_all(data[0][half:])
        assert await clients[0].next() == m.Pong(nonce=0)
        assert await clients[2].next() == m.Pong(nonce=2)  # room came free: read and answered
    await clients[1].stream.send_all(data[1][half:])
    assert await clients[1].next() == m.Pong(nonce=1)
    assert d.buffers.used == 0


async def test_a_closed_connection_releases_its_buffer(start_daemon: Start, connect) -> None:
    """The bytes of a partial message are freed (not only released from the budget) when its client leaves."""
    d, path = await start_daemon()
    body = 8 * MiB
    tracemalloc.start()
    try:
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        client = await connect(path)
        await client.hello()
        data = padded_ping(1, body)
        await client.stream.send_all(data[:-1])  # everything but the last byte
        del data  # (the test's own copy is traced too)
        await eventually(lambda: tracemalloc.get_traced_memory()[0] - before > body)
        assert d.buffers.used == body
        await client.stream.aclose()
        await eventually(lambda: d.connections == 0)
        gc.collect()
        assert d.buffers.used == 0
        assert tracemalloc.get_traced_memory()[0] - before < MiB
    finally:
        tracemalloc.stop()


# ---- against `csmd serve` ----


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        line = next(line for line in f if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


def raw_hello(path: Path) -> tuple[socket.socket, Connection]:
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(20)
    sock.connect(str(path))
    conn = Connection(m.Role.CLIENT)
    sock.sendall(conn.send(m.Hello(protocol=(1,), client="raw")))
    events = conn.receive_data(sock.recv(1 << 16))
    assert isinstance(events[0], m.Welcome), events
    return sock, conn


def test_serve_flags_cap_connections_sessions_and_idle_time(tmp_path: Path) -> None:
    path = tmp_path / "run" / "csmd.sock"
    flags = ("--max-connections", "2", "--max-sessions-per-connection", "1", "--idle-timeout", "2")
    with (
        csmd_serve(path, *flags, stop=signal.SIGTERM),
        blocking_client.connect(path, timeout=20) as holder,
        contextlib.ExitStack() as stack,
    ):
        holder.open_session("a")
        with pytest.raises(RequestError) as refused:
            holder.open_session("b")
        assert refused.value.code == "too_many_sessions"
        idle, conn = raw_hello(path)
        stack.callback(idle.close)
        connected = time.monotonic()
        with pytest.raises(ConnectionLost) as lost:
            blocking_client.connect(path, timeout=20)
        assert lost.value.code == "too_many_connections"
        events = conn.receive_data(idle.recv(1 << 16))  # the idle one is closed after 2 s
        waited = time.monotonic() - connected
        assert isinstance(events[0], m.Error) and events[0].code == "timeout", events
        assert 1.9 < waited < 15, waited
        idle.close()
        time.sleep(2.5)  # longer than the idle timeout: the session holder is kept
        assert holder.ping() is not None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the daemon's RSS from /proc")
def test_twelve_partial_16_mib_messages_hold_at_most_the_budget(tmp_path: Path) -> None:
    """The issue's attack: 12 clients each start a message of the largest size and never finish it."""
    path = tmp_path / "run" / "csmd.sock"
    body = Limits().max_message
    budget = Limits().max_buffered
    with csmd_serve(path, stop=signal.SIGTERM) as server, contextlib.ExitStack() as stack:
        clients = [stack.enter_context(raw_hello(path)[0]) for _ in range(12)]
        start = rss_bytes(server.pid)
        header = struct.pack(">I", body)
        for sock in clients:
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                sock.send(header)
        # Push body bytes until no socket takes more: the daemon reads the ones it has room for.
        chunk = b"\0" * (1 << 20)
        sent = [0] * len(clients)
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < 1.0:
            moved = False
            for i, sock in enumerate(clients):
                if sent[i] < body - len(chunk):
                    with contextlib.suppress(BlockingIOError):
                        sent[i] += sock.send(chunk)
                        moved = True
            if moved:
                quiet_since = time.monotonic()
            else:
                time.sleep(0.05)
        held = rss_bytes(server.pid) - start
        accepted = sum(1 for s in sent if s > 2 * MiB)  # read far beyond the socket buffers
        assert accepted == budget // body == 4, sent
        assert held < budget + 32 * MiB, held / MiB
        for sock in clients:
            sock.close()
        time.sleep(1.0)
        after = rss_bytes(server.pid) - start
        print(f"RSS over the start: {held / MiB:.0f} MiB while held, {after / MiB:.0f} MiB after closing")
        assert after < 16 * MiB, after / MiB  # the buffers went back to the system
        # The daemon still answers.
        with blocking_client.connect(path, timeout=20) as client:
            assert client.ping() is not None
        assert os.path.exists(path)


def test_serve_flags_match_the_limits_and_refuse_nonsense(capsys: pytest.CaptureFixture[str]) -> None:
    from csmd.cli import build_parser

    args = build_parser().parse_args(["serve"])
    defaults = Limits()
    assert (args.max_connections, args.max_sessions, args.max_sessions_per_connection, args.idle_timeout) == (
        defaults.max_connections,
        defaults.max_sessions,
        defaults.max_sessions_per_connection,
        defaults.idle_timeout,
    )
    assert not args.allow_shared_socket_dir
    for flag, value in (("--max-connections", "0"), ("--max-sessions-per-connection", "x"), ("--idle-timeout", "-1")):
        with pytest.raises(SystemExit) as exited:
            build_parser().parse_args(["serve", flag, value])
        assert exited.value.code == 2
        assert f"argument {flag}: expected" in capsys.readouterr().err
    with pytest.raises(ValueError, match="max_buffered"):
        Limits(max_message=2 * MiB, max_buffered=MiB)
    with pytest.raises(ValueError, match="idle_timeout"):
        Limits(idle_timeout=0)
