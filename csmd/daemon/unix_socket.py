"""Where the daemon listens and who may connect: the socket's directory and path, binding, the peer's user.

The socket is the daemon's only door, so it lives in a directory no other user can change (else they could
move it aside and listen in its place), is created 0600, and every connection's peer is checked against
this user (`peer_is_allowed`). Imports nothing heavy: clients use `default_socket_path` too.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
import sys
from pathlib import Path

import trio

from csmd.protocol import peercred

log = logging.getLogger("csmd.daemon")


class DaemonRunningError(RuntimeError):
    """Something already holds the socket path: a daemon listening there, or a file that is not a socket."""


class SharedSocketDirError(PermissionError):
    """The socket's directory (or one above it) lets another user replace the socket."""


def peer_is_allowed(sock: trio.socket.SocketType) -> bool:
    """Only our own user (or root) may talk to the daemon: checked with the kernel's record of the peer."""
    return peercred.is_trusted(peercred.peer_uid(sock))


def default_socket_dir() -> Path:
    """Where the daemon's socket lives unless --socket says otherwise: a directory private to this user.

    $XDG_RUNTIME_DIR/csmd where the session has one (Linux desktops; per-user, 0700, cleared at logout); on
    macOS $TMPDIR/csmd (launchd gives each user a private TMPDIR under /var/folders); else /tmp/csmd-UID.
    """
    runtime_dir = os.environ.get("XDG_RUNTIME_DIR")
    if runtime_dir:
        return Path(runtime_dir) / "csmd"
    temp_dir = os.environ.get("TMPDIR")
    if sys.platform == "darwin" and temp_dir:
        return Path(temp_dir) / "csmd"
    return Path(f"/tmp/csmd-{os.getuid()}")


def default_socket_path() -> Path:
    """`default_socket_dir()/csmd.sock`; the directory, if it exists, must be private to us."""
    base = default_socket_dir()
    if base.exists():
        st = base.lstat()
        # In a shared /tmp someone else could have made the directory first: never put our socket in it.
        if base.is_symlink() or st.st_uid != os.getuid() or st.st_mode & 0o077:
            raise SharedSocketDirError(f"{base} is not a private directory of this user; remove it or use --socket")
    return base / "csmd.sock"


def check_socket_dir(directory: Path) -> None:
    """Refuse a socket directory where another user could move our socket aside and put their own in its place.

    The directory itself must belong to us or root and be writable by nobody else (no group or other write bit,
    sticky or not: csmd's default is its own subdirectory, never /tmp itself). Each directory above it must
    belong to us or root and be writable by nobody else unless sticky (as /tmp is: others cannot rename what
    is ours in it).
    """
    me = os.geteuid()
    resolved = directory.resolve()
    hint = "use a directory only you can write (mode 0700), or pass --allow-shared-socket-dir to serve there anyway"
    st = resolved.stat()
    if st.st_uid not in (me, 0):
        raise SharedSocketDirError(f"socket directory {directory} belongs to uid {st.st_uid}: {hint}")
    if st.st_mode & 0o022:
        mode = stat.S_IMODE(st.st_mode)
        raise SharedSocketDirError(f"socket directory {directory} is writable by other users (mode {mode:04o}): {hint}")
    for parent in resolved.parents:
        st = parent.stat()
        shared = st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX
        if st.st_uid not in (me, 0) or shared:
            mode = stat.S_IMODE(st.st_mode)
            raise SharedSocketDirError(
                f"{parent}, above the socket directory {directory}, can be changed by another user "
                f"(uid {st.st_uid}, mode {mode:04o}): {hint}"
            )


def max_socket_path_bytes() -> int:
    """The longest Unix socket path, leaving room for the terminating NUL C clients expect: sun_path is 108
    bytes on Linux, 104 on macOS and the BSDs."""
    return (108 if sys.platform.startswith("linux") else 104) - 1


async def bind_unix_socket(path: Path, *, allow_shared_dir: bool = False) -> trio.socket.SocketType:
    """Bind `path` (mode 0600, in a 0700 directory if we create it), replacing a stale socket file.

    The directory must be private (`check_socket_dir`) unless `allow_shared_dir`."""
    size = len(os.fsencode(path))
    if size > max_socket_path_bytes():
        raise ValueError(
            f"socket path {path} is {size} bytes, longer than Unix sockets allow here ({max_socket_path_bytes()}): "
            "choose a shorter --socket"
        )
    if not path.parent.exists():
        path.parent.mkdir(mode=0o700, parents=True)
    if not allow_shared_dir:
        check_socket_dir(path.parent)
    if path.exists() or path.is_symlink():
        if not path.is_socket():
            raise DaemonRunningError(f"{path} exists and is not a socket; refusing to replace it")
        probe = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            path.unlink()  # a stale file from a daemon that died
        else:
            raise DaemonRunningError(f"a csmd daemon is already listening on {path}")
        finally:
            probe.close()
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # the socket file is created 0600: no window where others could connect
    try:
        await sock.bind(str(path))
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    sock.listen(64)
    return sock


def remove_own_socket(path: Path, bound: os.stat_result) -> None:
    """Unlink `path` if it is still the socket file this daemon bound (same device and inode), else leave it:
    whoever put another file there owns it."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if (st.st_dev, st.st_ino) != (bound.st_dev, bound.st_ino):
        log.warning("%s is no longer the socket this daemon bound (now owned by uid %d): leaving it", path, st.st_uid)
        return
    path.unlink()
