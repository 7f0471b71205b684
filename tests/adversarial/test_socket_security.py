"""Socket spoofing: another user must not be able to put a daemon of their own where csmd's clients look.

The daemon refuses a socket directory that others can write, removes at shutdown only the socket it bound,
and the clients check the serving process's user before they send a byte. The impostor runs as another user
(`nobody`) where the tests run as root, and is simulated (the credential function patched) everywhere.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import IO

import pytest
import trio
from serving import csmd_serve

from csmd.audio.mimi.model import Mimi
from csmd.daemon.server import Daemon
from csmd.daemon.unix_socket import SharedSocketDirError, bind_unix_socket, check_socket_dir
from csmd.model.generator import Generator
from csmd.protocol import blocking_client, peercred, trio_client
from csmd.protocol.errors import UntrustedServerError

NOBODY = 65534


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A directory under the system's temp dir that every user can enter (pytest's tmp_path is private)."""
    path = Path(tempfile.mkdtemp(prefix="csmd-shared-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


# ---- the socket's directory ----


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o1777, 0o722])
async def test_a_directory_others_can_write_is_refused(tmp_path: Path, mode: int) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(mode)
    with pytest.raises(SharedSocketDirError, match=r"writable by other users.*--allow-shared-socket-dir"):
        await bind_unix_socket(shared / "csmd.sock")
    assert not (shared / "csmd.sock").exists()
    sock = await bind_unix_socket(shared / "csmd.sock", allow_shared_dir=True)  # the user said so
    sock.close()
    assert stat.S_IMODE((shared / "csmd.sock").stat().st_mode) == 0o600


async def test_directories_above_it_count_too(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    (shared / "mine").mkdir(parents=True)
    (shared / "mine").chmod(0o700)
    shared.chmod(0o777)  # others could rename `mine` and put their own in its place
    with pytest.raises(SharedSocketDirError, match=r"above the socket directory"):
        await bind_unix_socket(shared / "mine" / "csmd.sock")
    shared.chmod(0o1777)  # sticky, as /tmp: what is ours in it stays ours
    (await bind_unix_socket(shared / "mine" / "csmd.sock")).close()
    # A new directory is made private, and its parents are checked as well.
    (await bind_unix_socket(tmp_path / "new" / "deeper" / "csmd.sock")).close()
    assert stat.S_IMODE((tmp_path / "new" / "deeper").stat().st_mode) == 0o700


def test_a_directory_of_another_user_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    check_socket_dir(theirs)  # ours so far (it and every directory above belong to us or root)
    owner = os.geteuid()
    if owner == 0:
        os.chown(theirs, NOBODY, NOBODY)
        owner = NOBODY
    else:  # we cannot give it away: be someone else instead
        monkeypatch.setattr(os, "geteuid", lambda: owner + 4242)
    with pytest.raises(SharedSocketDirError, match=f"belongs to uid {owner}"):
        check_socket_dir(theirs)


def test_symlinks_are_checked_where_they_lead(tmp_path: Path) -> None:
    private, shared = tmp_path / "private", tmp_path / "shared"
    private.mkdir(mode=0o700)
    shared.mkdir()
    shared.chmod(0o777)
    (tmp_path / "to-private").symlink_to(private)  # a symlink's own mode is always 0777: not what counts
    (tmp_path / "to-shared").symlink_to(shared)
    check_socket_dir(tmp_path / "to-private")
    with pytest.raises(SharedSocketDirError, match="writable by other users"):
        check_socket_dir(tmp_path / "to-shared")


def test_serve_refuses_a_shared_directory_unless_told(shared_tmp: Path) -> None:
    shared = shared_tmp / "open"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    path = shared / "csmd.sock"
    cli = [sys.executable, "-m", "csmd.cli", "serve", "--model", "random:tiny", "--socket", str(path)]
    refused = subprocess.run(cli, capture_output=True, text=True, timeout=120, check=False)
    assert refused.returncode == 2, refused.stderr
    (line,) = [x for x in refused.stderr.splitlines() if x.startswith("csmd: error:")]
    assert "writable by other users" in line and "--allow-shared-socket-dir" in line
    assert "Traceback" not in refused.stderr and not path.exists()
    with (
        csmd_serve(path, "--allow-shared-socket-dir", stop=signal.SIGTERM, check=False),
        blocking_client.connect(path, timeout=20) as client,
    ):
        assert client.ping() is not None


# ---- removing only our own socket ----


async def test_shutdown_removes_only_the_socket_it_bound(tiny_voice: tuple[Generator, Mimi], tmp_path: Path) -> None:
    daemon = Daemon(*tiny_voice, "random:tiny")
    path = tmp_path / "run" / "csmd.sock"
    aside = tmp_path / "run" / "moved.sock"
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.serve, path)
        path.rename(aside)
        other = socket.socket(socket.AF_UNIX)
        other.bind(str(path))  # someone else's socket now has the path
        nursery.cancel_scope.cancel()
    daemon.close()
    other.close()
    assert path.is_socket() and aside.is_socket()  # neither was ours at that path: both stay

    daemon = Daemon(*tiny_voice, "random:tiny")
    path.unlink()
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.serve, path)
        nursery.cancel_scope.cancel()
    daemon.close()
    assert not path.exists()  # our own is removed


# ---- clients check who serves the socket ----


@pytest.fixture
async def fake_listener(tmp_path: Path) -> AsyncIterator[tuple[Path, list[bytes]]]:
    """A listener that records every byte each connection sends it, and answers nothing."""
    path = tmp_path / "fake.sock"
    received: list[bytes] = []
    listener = trio.socket.socket(socket.AF_UNIX)
    await listener.bind(str(path))
    listener.listen()

    async def record(stream: trio.SocketStream) -> None:
        data = b""
        with contextlib.suppress(trio.BrokenResourceError):
            while chunk := await stream.receive_some(1 << 16):
                data += chunk
        received.append(data)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, record, [trio.SocketListener(listener)])
        yield path, received
        nursery.cancel_scope.cancel()


async def trio_handshake(path: Path) -> None:
    async with trio_client.open_client(path):
        pass


async def test_clients_refuse_a_server_of_another_user(
    fake_listener: tuple[Path, list[bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, received = fake_listener
    monkeypatch.setattr(peercred, "peer_uid", lambda sock: 4242)
    with pytest.raises(UntrustedServerError, match=f"refusing to talk to {path}: .* uid 4242") as refused:
        await trio_handshake(path)
    assert refused.value.uid == 4242 and refused.value.path == str(path)
    with pytest.raises(UntrustedServerError, match=str(path)):
        await trio.to_thread.run_sync(lambda: blocking_client.connect(path, timeout=10))
    await wait_for(lambda: len(received) == 2)
    assert received == [b"", b""]  # not even the hello went out


def test_clients_accept_their_own_user_and_root() -> None:
    assert peercred.is_trusted(os.geteuid()) and peercred.is_trusted(0)
    assert not peercred.is_trusted(os.geteuid() + 4242)
    a, b = socket.socketpair(socket.AF_UNIX)
    with a, b:
        assert peercred.peer_uid(a) == os.geteuid()  # the kernel's answer, not a default
        if sys.platform.startswith("linux"):
            assert peercred.peer_pid(a) == os.getpid()
        else:
            assert peercred.peer_pid(a) is None


async def wait_for(condition: Callable[[], bool], seconds: float = 10) -> None:
    with trio.fail_after(seconds):
        while not condition():
            await trio.sleep(0.01)


# ---- the whole attack, with a real second user ----


def start_impostor(path: Path, aside: Path, connections: int) -> tuple[int, IO[str]]:
    """Fork a child that becomes `nobody`, moves the daemon's socket aside, listens at its path, and reports
    on the returned pipe "ready", then the bytes each of `connections` clients sent before closing."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # only system calls from here on, then _exit: nothing of the parent's state is touched
        try:
            os.close(read)
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            os.rename(path, aside)  # the directory lets anyone: the daemon's socket is moved out of the way
            server = socket.socket(socket.AF_UNIX)
            server.bind(str(path))
            os.chmod(path, 0o777)
            server.listen()
            os.write(write, b"ready\n")
            server.settimeout(60)
            for _ in range(connections):
                conn, _ = server.accept()
                conn.settimeout(30)
                received = 0
                while data := conn.recv(65536):
                    received += len(data)
                os.write(write, f"{received}\n".encode())
                conn.close()
        finally:
            os._exit(0)
    os.close(write)
    return pid, os.fdopen(read)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to run a second user")
async def test_impostor_of_another_user_gets_nothing(shared_tmp: Path) -> None:
    await trio.to_thread.run_sync(_impostor_scenario, shared_tmp)


def _impostor_scenario(shared_tmp: Path) -> None:
    shared = shared_tmp / "open"
    shared.mkdir()
    shared.chmod(0o777)  # the user allowed a shared directory: now another user can swap the socket
    path, aside = shared / "csmd.sock", shared / "moved-aside.sock"
    with csmd_serve(path, "--allow-shared-socket-dir", stop=signal.SIGTERM, check=False) as server:
        pid, report = start_impostor(path, aside, 3)
        try:
            assert report.readline() == "ready\n"
            assert path.stat().st_uid == NOBODY
            with pytest.raises(UntrustedServerError, match=f"refusing to talk to {path}: .* uid {NOBODY}"):
                blocking_client.connect(path, timeout=10)
            with pytest.raises(UntrustedServerError):
                trio.run(trio_handshake, path)
            wav = str(shared_tmp / "x.wav")
            say = [sys.executable, "-m", "csmd.cli", "say", "Hi.", "-o", wav, "--socket", str(path)]
            said = subprocess.run(say, capture_output=True, text=True, timeout=120, check=False)
            assert said.returncode == 2 and "refusing to talk to" in said.stderr, said.stderr
            assert "Traceback" not in said.stderr
            out = report.read()
        finally:
            report.close()
            with contextlib.suppress(ChildProcessError, ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
        assert out.split() == ["0", "0", "0"]  # three connections, not a byte sent on any
        server.send_signal(signal.SIGTERM)
        _, err = server.communicate(timeout=30)
        assert server.returncode == 0, err
        assert "no longer the socket this daemon bound" in err
    assert path.is_socket() and path.lstat().st_uid == NOBODY  # the impostor's file is not ours to delete
