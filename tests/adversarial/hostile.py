"""A hostile local client's tools: a real daemon in a subprocess, and raw msgpack over its socket.

`RawClient` packs whatever it is given (no validation, unlike the protocol's `Connection`), so tests can send
what a well-behaved client never would, and reads the daemon's replies as plain dicts.
"""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import msgpack
import trio

HERE = Path(__file__).parent
REPLY_TIMEOUT = 20.0  # generous: the tests assert what arrives, not how fast (except where stated)
Msg = dict[str, Any]


def frame(obj: object) -> bytes:
    """Length prefix + msgpack body of any value, valid message or not."""
    body = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


class DaemonProcess:
    """`csmd serve --model random:tiny --socket <tmp>` running in a subprocess, its output in a log file."""

    def __init__(self, workdir: Path, *args: str, faults: tuple[str, ...] = (), env: dict[str, str] | None = None):
        self.workdir = workdir
        self.socket = workdir / "run" / "csmd.sock"
        self.log_path = workdir / "daemon.log"
        self.fault_dir = workdir / "faults"
        self.fault_dir.mkdir(parents=True, exist_ok=True)
        serve = ["serve", "--model", "random:tiny", "--socket", str(self.socket), *args]
        if faults:  # the real CLI, with test-only patches installed first (faults.py)
            prelude = (
                f"import sys; sys.path.insert(0, {str(HERE)!r}); import faults; faults.install(); "
                "from csmd.cli import main; sys.exit(main(sys.argv[1:]))"
            )
            command = [sys.executable, "-c", prelude, *serve]
        else:
            command = [sys.executable, "-m", "csmd.cli", *serve]
        environment = {**os.environ, **(env or {}), "CSMD_TEST_FAULTS": ",".join(faults),
                       "CSMD_TEST_FAULT_DIR": str(self.fault_dir)}  # fmt: skip
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env=environment)
        self._wait_until_listening()

    def _wait_until_listening(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.socket.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the daemon did not start:\n{self.log()}")
            time.sleep(0.02)

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def rss_bytes(self) -> int:
        """Resident memory of the daemon now (Linux /proc, else ps)."""
        status = Path(f"/proc/{self.pid}/status")
        if status.exists():
            line = next(x for x in status.read_text().splitlines() if x.startswith("VmRSS:"))
            return int(line.split()[1]) * 1024
        out = subprocess.run(["ps", "-o", "rss=", "-p", str(self.pid)], capture_output=True, text=True, check=True)
        return int(out.stdout.strip()) * 1024

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM, then wait for the exit; SIGKILL (and a failure) if it does not come within `timeout`."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"the daemon ignored SIGTERM for {timeout} s:\n{self.log()}") from None
        finally:
            self._log.close()
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._log.close()

    def check_clean_exit(self, allow_tracebacks: bool = False) -> None:
        """Shut down with SIGTERM: status 0, the socket removed, and no traceback (no bug) in the log."""
        code = self.terminate()
        log = self.log()
        assert code == 0, f"exit status {code}:\n{log}"
        assert not self.socket.exists(), "the socket file was left behind"
        if not allow_tracebacks:
            assert "Traceback" not in log and "a bug" not in log, log


class RawClient:
    """One connection to the daemon, speaking msgpack dicts with no checks of its own."""

    opened: ClassVar[list[RawClient]] = []  # closed after each test (conftest)

    def __init__(self, stream: trio.SocketStream):
        self.stream = stream
        self._buffer = bytearray()
        self._inbox: deque[Msg | None] = deque()  # None: the daemon closed the connection
        self.closed_by_daemon = False

    @classmethod
    async def connect(cls, path: Path, hello: bool = True, name: str = "hostile") -> RawClient:
        client = cls(await trio.open_unix_socket(str(path)))
        cls.opened.append(client)
        if hello:
            await client.send(type="hello", protocol=[1], client=name)
            welcome = await client.recv()
            assert welcome is not None and welcome["type"] == "welcome", welcome
        return client

    async def send(self, **fields: object) -> None:
        await self.send_raw(frame(fields))

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def recv(self, timeout: float = REPLY_TIMEOUT) -> Msg | None:
        """The next message, or None once the daemon has closed the connection."""
        with trio.fail_after(timeout):
            while not self._inbox:
                if self.closed_by_daemon:
                    return None
                try:
                    data = await self.stream.receive_some(1 << 16)
                except trio.BrokenResourceError:
                    data = b""
                if not data:
                    self.closed_by_daemon = True
                    self._inbox.append(None)
                self._buffer += data
                self._parse()
            return self._inbox.popleft()

    def _parse(self) -> None:
        while len(self._buffer) >= 4:
            (length,) = struct.unpack_from(">I", self._buffer)
            if len(self._buffer) < 4 + length:
                return
            body = bytes(self._buffer[4 : 4 + length])
            del self._buffer[: 4 + length]
            self._inbox.append(msgpack.unpackb(body, raw=False))

    async def until(self, done: Callable[[Msg], bool], timeout: float = REPLY_TIMEOUT) -> list[Msg]:
        """Messages up to and including the first for which `done` is true; fails at the end of the stream."""
        seen: list[Msg] = []
        with trio.fail_after(timeout):
            while True:
                msg = await self.recv()
                assert msg is not None, f"the daemon closed the connection; before that: {seen}"
                seen.append(msg)
                if done(msg):
                    return seen

    async def until_closed(self, timeout: float = REPLY_TIMEOUT) -> list[Msg]:
        """Every message until the daemon closes the connection."""
        seen: list[Msg] = []
        with trio.fail_after(timeout):
            while (msg := await self.recv()) is not None:
                seen.append(msg)
        return seen

    async def open(self, session: str) -> None:
        await self.send(type="session.open", session=session)
        reply = await self.recv()
        assert reply == {"type": "session.opened", "session": session}, reply

    async def ping(self, nonce: int = 1) -> None:
        """A round trip; messages that arrive before the pong are dropped."""
        await self.send(type="ping", nonce=nonce)
        await self.until(lambda x: x["type"] == "pong" and x["nonce"] == nonce)

    async def aclose(self) -> None:
        await self.stream.aclose()


def speak(session: str, request: str, max_frames: int = 8, **params: object) -> Msg:
    """A speak message (as a dict, for `RawClient.send(**...)` or `frame`)."""
    return {"type": "speak", "session": session, "request": request, "text": "Hello there.", "speaker": 0,
            "max_frames": max_frames, "seed": 1, **params}  # fmt: skip


def about(request: str) -> Callable[[Msg], bool]:
    return lambda msg: msg.get("request") == request


def ends(request: str) -> Callable[[Msg], bool]:
    """The message that closes a request: its audio.end, or an error about it."""
    return lambda msg: msg.get("request") == request and msg["type"] in ("audio.end", "error")


PROBE_SCRIPT = """
import json, socket, struct, sys, time
import msgpack

def frame(obj):
    body = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(body)) + body

def read(sock):
    head = b""
    while len(head) < 4:
        part = sock.recv(4 - len(head))
        if not part:
            raise EOFError
        head += part
    (length,) = struct.unpack(">I", head)
    body = b""
    while len(body) < length:
        part = sock.recv(length - len(body))
        if not part:
            raise EOFError
        body += part
    return msgpack.unpackb(body, raw=False)

path, seconds, every = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
deadline = time.monotonic() + seconds
while time.monotonic() < deadline:
    started = time.monotonic()
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(path)
        sock.sendall(frame({"type": "hello", "protocol": [1], "client": "probe"}))
        welcome = read(sock)
        sock.sendall(frame({"type": "ping", "nonce": 1}))
        pong = read(sock)
    took = time.monotonic() - started
    assert welcome["type"] == "welcome" and pong == {"type": "pong", "nonce": 1}, (welcome, pong)
    print(json.dumps({"at": started, "seconds": took}), flush=True)
    time.sleep(every)
"""


def start_prober(path: Path, seconds: float, every: float = 0.1) -> subprocess.Popen[str]:
    """A process of its own that connects afresh every `every` s for `seconds` and times hello -> welcome and
    ping -> pong: the daemon's answer to a new client, measured apart from the test's own busy event loop.
    Its stdout is one JSON line per probe."""
    command = [sys.executable, "-c", PROBE_SCRIPT, str(path), str(seconds), str(every)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
