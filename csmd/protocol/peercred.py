"""Who is at the other end of a Unix socket: the kernel's record of the peer's user id.

The daemon serves only its own user (and root), and the clients talk only to a daemon of their own user (or
root), so that another user who gets a socket in place cannot impersonate either side. One function answers
for both, on every Unix:

- Linux: `getsockopt(SO_PEERCRED)`, a `struct ucred {pid, uid, gid}` (three C ints).
- macOS and the BSDs: `getpeereid(fd, &uid, &gid)` from the C library (macOS implements it with
  `LOCAL_PEERCRED`, FreeBSD with `LOCAL_PEERCRED` too, OpenBSD with its own `SO_PEERCRED`, whose struct is laid
  out differently from Linux's, which is why only Linux reads SO_PEERCRED here).

Where neither exists the answer is an error, never a guess: a daemon that cannot tell who connects must not
serve.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import socket
import struct
import sys
from collections.abc import Callable
from typing import Protocol

# C libraries searched for getpeereid, in order (None: the process's own symbols, which include libc's).
GETPEEREID_LIBRARIES: tuple[str | None, ...] = (None, "c")
_UCRED = struct.Struct("3i")  # Linux's struct ucred: pid_t, uid_t, gid_t


class HasFileno(Protocol):
    def fileno(self) -> int: ...


class PeerCredentialsUnavailable(OSError):
    """This platform offers no way to learn a Unix socket peer's user."""


def peer_uid(sock: HasFileno) -> int:
    """The effective user id of the process at the other end of the connected Unix socket `sock`."""
    if sys.platform.startswith("linux"):
        return _so_peercred_uid(sock)
    return _getpeereid_uid(sock)


def is_trusted(uid: int) -> bool:
    """A peer we may talk to: the same user as this process, or root."""
    return uid in (os.geteuid(), 0)


def check_supported() -> None:
    """Raise PeerCredentialsUnavailable unless `peer_uid` works on this platform (called before serving)."""
    if not sys.platform.startswith("linux"):
        _getpeereid()


def peer_pid(sock: HasFileno) -> int | None:
    """The process id at the other end of `sock`, where the platform tells it (Linux); else None."""
    if not sys.platform.startswith("linux"):
        return None
    pid, _, _ = _so_peercred(sock)
    return pid


def _so_peercred_uid(sock: HasFileno) -> int:
    _, uid, _ = _so_peercred(sock)
    return uid


def _so_peercred(sock: HasFileno) -> tuple[int, int, int]:
    """Linux's (pid, uid, gid) of the peer."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        raise PeerCredentialsUnavailable("this Linux Python has no socket.SO_PEERCRED")
    # A stdlib socket on a duplicate of the descriptor reads the option for any socket object (trio's too).
    with socket.socket(fileno=os.dup(sock.fileno())) as probe:
        creds = probe.getsockopt(socket.SOL_SOCKET, option, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(creds)
    return int(pid), int(uid), int(gid)


def _getpeereid_uid(sock: HasFileno) -> int:
    getpeereid = _getpeereid()
    uid, gid = ctypes.c_uint32(), ctypes.c_uint32()  # uid_t and gid_t are 32-bit unsigned on every such Unix
    if getpeereid(sock.fileno(), ctypes.byref(uid), ctypes.byref(gid)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"getpeereid: {os.strerror(err)}")
    return int(uid.value)


@functools.cache
def _getpeereid() -> Callable[..., int]:
    for name in GETPEEREID_LIBRARIES:
        path = name if name is None else (ctypes.util.find_library(name) or name)
        try:
            library = ctypes.CDLL(path, use_errno=True)
            function = library.getpeereid
        except (OSError, AttributeError):
            continue
        function.argtypes = (ctypes.c_int, ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_uint32))
        function.restype = ctypes.c_int
        return function
    raise PeerCredentialsUnavailable(
        f"cannot learn a Unix socket peer's user on {sys.platform}: no SO_PEERCRED and no getpeereid in the C library"
    )
