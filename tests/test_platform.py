"""csmd off Linux: peer credentials, the default socket directory, CPU flags, and the GPU path.

The non-Linux branches are run here by simulating the platform (`sys.platform`, the C library that holds
`getpeereid`), since the tests run on Linux; the GPU test runs wherever MLX has a GPU backend.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import trio

from csmd.daemon import unix_socket
from csmd.protocol import blocking_client, peercred


@pytest.fixture
def fresh_getpeereid() -> Iterator[None]:
    peercred._getpeereid.cache_clear()
    yield
    peercred._getpeereid.cache_clear()


def libbsd() -> str | None:
    """A real C getpeereid on Linux: libbsd implements the BSD call (with SO_PEERCRED underneath)."""
    path = ctypes.util.find_library("bsd")
    if path is None:
        return None
    try:
        ctypes.CDLL(path).getpeereid  # noqa: B018  (only whether it is there)
    except (OSError, AttributeError):
        return None
    return path


# ---- peer credentials ----


def test_linux_reads_so_peercred() -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("the SO_PEERCRED branch runs on Linux")
    a, b = socket.socketpair(socket.AF_UNIX)
    with a, b:
        assert peercred.peer_uid(a) == os.geteuid()


@pytest.mark.skipif(libbsd() is None, reason="no libbsd here: no C getpeereid to call on Linux")
def test_other_unixes_call_getpeereid(monkeypatch: pytest.MonkeyPatch, fresh_getpeereid: None) -> None:
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(peercred, "GETPEEREID_LIBRARIES", ("no-such-c-library", libbsd()))
    peercred.check_supported()
    a, b = socket.socketpair(socket.AF_UNIX)
    with a, b:
        assert peercred.peer_uid(a) == os.geteuid()
    a.close()
    with pytest.raises(OSError):  # a closed descriptor is an error (errno from getpeereid), not a uid
        peercred.peer_uid(a)


def test_getpeereid_arguments_and_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    """The ctypes call as macOS's libc would answer it: out-parameters filled, or -1 and errno."""
    prototype = ctypes.CFUNCTYPE(
        ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_uint32), use_errno=True
    )
    seen: list[int] = []

    def fake(fd: int, uid: ctypes._Pointer[ctypes.c_uint32], gid: ctypes._Pointer[ctypes.c_uint32]) -> int:
        seen.append(fd)
        if fd == 7:
            ctypes.set_errno(57)  # ENOTCONN on macOS
            return -1
        uid[0], gid[0] = 501, 20
        return 0

    function = prototype(fake)
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(peercred, "_getpeereid", lambda: function)

    class Fd:
        def __init__(self, fd: int) -> None:
            self.fd = fd

        def fileno(self) -> int:
            return self.fd

    assert peercred.peer_uid(Fd(3)) == 501
    with pytest.raises(OSError, match="getpeereid") as failed:
        peercred.peer_uid(Fd(7))
    assert failed.value.errno == 57
    assert seen == [3, 7]


def test_no_way_to_learn_the_peer_is_an_error(
    monkeypatch: pytest.MonkeyPatch, fresh_getpeereid: None, tmp_path: Path
) -> None:
    monkeypatch.setattr(sys, "platform", "sunos5")
    monkeypatch.setattr(peercred, "GETPEEREID_LIBRARIES", ("no-such-c-library",))
    with pytest.raises(peercred.PeerCredentialsUnavailable, match="sunos5"):
        peercred.check_supported()
    a, b = socket.socketpair(socket.AF_UNIX)
    with a, b, pytest.raises(peercred.PeerCredentialsUnavailable):
        peercred.peer_uid(a)  # never a default uid


@pytest.mark.skipif(libbsd() is None, reason="no libbsd here: no C getpeereid to call on Linux")
async def test_daemon_and_client_as_on_macos(
    monkeypatch: pytest.MonkeyPatch, fresh_getpeereid: None, tmp_path: Path
) -> None:
    """The daemon checks its peers and the client its server through getpeereid, as they would on macOS."""
    from csmd.daemon.server import Daemon
    from csmd.model.generator import Generator
    from csmd.model.loading import load_model
    from csmd.speak import codec_for

    loaded = load_model("random:tiny")
    assert loaded.tokenizer is not None
    daemon = Daemon(Generator(loaded.model, loaded.tokenizer), codec_for(loaded, None), "random:tiny")
    calls: list[int] = []
    real = peercred._getpeereid_uid

    def counted(sock: peercred.HasFileno) -> int:
        calls.append(sock.fileno())
        return real(sock)

    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(peercred, "GETPEEREID_LIBRARIES", (libbsd(),))
    monkeypatch.setattr(peercred, "_getpeereid_uid", counted)
    monkeypatch.setattr(peercred, "_so_peercred_uid", lambda sock: pytest.fail("SO_PEERCRED read off Linux"))
    path = tmp_path / "run" / "csmd.sock"
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.serve, path)

        def ping() -> object:  # in a thread: the daemon answers from this one
            with blocking_client.connect(path, timeout=10) as client:
                return client.ping()

        assert await trio.to_thread.run_sync(ping) is not None
        nursery.cancel_scope.cancel()
    daemon.close()
    assert len(calls) == 2  # the client's check of the server, the server's of the client


# ---- where the socket goes ----


@pytest.mark.parametrize(
    ("platform", "env", "expected"),
    [
        ("linux", {"XDG_RUNTIME_DIR": "/run/user/501"}, "/run/user/501/csmd"),
        ("linux", {"TMPDIR": "/var/tmp"}, "/tmp/csmd-{uid}"),  # a Linux TMPDIR may be shared: not used
        ("darwin", {"TMPDIR": "/var/folders/xy/abc123/T/"}, "/var/folders/xy/abc123/T/csmd"),
        ("darwin", {}, "/tmp/csmd-{uid}"),
        ("darwin", {"XDG_RUNTIME_DIR": "/Users/me/run", "TMPDIR": "/var/folders/xy/T/"}, "/Users/me/run/csmd"),
        ("freebsd14", {}, "/tmp/csmd-{uid}"),
    ],
)
def test_default_socket_dir(monkeypatch: pytest.MonkeyPatch, platform: str, env: dict[str, str], expected: str) -> None:
    monkeypatch.setattr(sys, "platform", platform)
    for name in ("XDG_RUNTIME_DIR", "TMPDIR"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert unix_socket.default_socket_dir() == Path(expected.format(uid=os.getuid()))


async def test_socket_path_length_per_platform(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert unix_socket.max_socket_path_bytes() == (107 if sys.platform.startswith("linux") else 103)
    monkeypatch.setattr(sys, "platform", "darwin")
    assert unix_socket.max_socket_path_bytes() == 103  # sun_path is 104 bytes on macOS and the BSDs
    deep = tmp_path / ("d" * max(1, 105 - len(str(tmp_path)) - len("/csmd.sock")))
    path = deep / "csmd.sock"
    assert 104 <= len(str(path)) <= 107  # fine on Linux, too long on macOS
    with pytest.raises(ValueError, match=r"longer than Unix sockets allow here \(103\).*--socket"):
        await unix_socket.bind_unix_socket(path)
    assert not deep.exists()  # refused before anything was made


# ---- CPU flags without the native extension ----


def test_cpu_flags_from_the_os(monkeypatch: pytest.MonkeyPatch) -> None:
    from csmd.kernels import native

    monkeypatch.setattr(sys, "platform", "darwin")

    def sysctl(args: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        assert args[:2] == ["sysctl", "-n"]
        return subprocess.CompletedProcess(args, 0, "FPU VME SSE2 AVX1.0 FMA\nBMI1 AVX2 AVX512F AVX512VNNI\n", "")

    monkeypatch.setattr(native.subprocess, "run", sysctl)
    assert {"avx", "fma", "avx2", "avx512vnni"} <= native._os_cpu_flags()
    monkeypatch.setattr(native, "module", None)
    monkeypatch.setattr(native.platform, "machine", lambda: "x86_64")
    features = native.cpu_features()
    assert features["avx2"] and features["fma"] and features["avx512vnni"] and not features["asimd"]

    monkeypatch.setattr(native.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, "", ""))
    monkeypatch.setattr(native.platform, "machine", lambda: "arm64")  # Apple silicon lists no such flags
    features = native.cpu_features()
    assert features["asimd"] and not features["avx2"]

    monkeypatch.setattr(sys, "platform", "openbsd7")
    assert native._os_cpu_flags() == set()


# ---- the GPU path ----


def _gpu_backend() -> str | None:
    from csmd import runtime

    return runtime.gpu_backend()


@pytest.mark.skipif(_gpu_backend() is None, reason="MLX has no GPU backend here (neither Metal nor CUDA)")
def test_tiny_model_frames_on_the_gpu() -> None:
    """`--device gpu`: MLX's own ops on the GPU (the native kernels serve only the CPU)."""
    import mlx.core as mx

    from csmd import runtime
    from csmd.kernels import native
    from csmd.model.generator import Generator
    from csmd.model.loading import load_model
    from csmd.model.sampling import GenerationParams
    from csmd.speak import codec_for, speak

    previous = mx.default_device()
    runtime.apply(runtime.RuntimeSettings(device="gpu"))
    try:
        assert mx.default_device() == mx.gpu and not native.active()
        loaded = load_model("random:tiny")
        assert loaded.tokenizer is not None
        mimi = codec_for(loaded, None)
        generator = Generator(loaded.model, loaded.tokenizer)
        result = speak(generator, generator.new_context(), mimi, "Hello.", 0, GenerationParams(max_frames=3, seed=4))
        assert result.frames == 3 and result.pcm.shape == (3 * 1920,)
        assert np.isfinite(result.pcm).all()
    finally:
        mx.set_default_device(previous)


async def test_a_peer_gone_before_its_credentials_are_read(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """getpeereid fails with ENOTCONN on macOS when the client already left: the daemon just drops it."""
    from csmd.daemon.server import Daemon
    from csmd.model.generator import Generator
    from csmd.model.loading import load_model
    from csmd.speak import codec_for

    loaded = load_model("random:tiny")
    assert loaded.tokenizer is not None
    daemon = Daemon(Generator(loaded.model, loaded.tokenizer), codec_for(loaded, None), "random:tiny")
    real = peercred.peer_uid
    failures = [OSError(57, "Socket is not connected")]

    def flaky(sock: peercred.HasFileno) -> int:
        if failures:
            raise failures.pop()
        return real(sock)

    path = tmp_path / "run" / "csmd.sock"
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.serve, path)
        monkeypatch.setattr(unix_socket.peercred, "peer_uid", flaky)
        gone = await trio.open_unix_socket(str(path))
        assert await gone.receive_some(100) == b""  # closed without a word
        await gone.aclose()
        monkeypatch.undo()

        def ping() -> object:
            with blocking_client.connect(path, timeout=10) as client:
                return client.ping()

        assert await trio.to_thread.run_sync(ping) is not None  # the daemon goes on
        nursery.cancel_scope.cancel()
    daemon.close()
    assert not [r for r in caplog.records if r.levelno >= 40]  # no "handler failed" traceback
