"""Speak one sentence through the csmd daemon with nothing but `socket`, `msgpack` and `wave`.

This client imports nothing of csmd: it follows docs/protocol.md alone (framing, handshake, messages,
errors), to show that the document is enough to write a client in any language.

    python examples/raw_client.py -o raw.wav "Hello from a raw socket."

It opens a session, asks for one reply, writes its audio chunks into a WAV file as they arrive and
prints how the reply ended. Before sending anything it checks that the daemon runs as the same user (the
kernel's record of the peer, docs/protocol.md "Who may connect"). Exit status: 0 on success, 2 if no daemon
listens at the socket path or another user's process serves it, 1 for any other failure (the daemon
refused or failed, the output file cannot be written).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import os
import socket
import struct
import sys
import wave
from pathlib import Path
from typing import Any

import msgpack

PROTOCOL_VERSION = 1
MAX_MESSAGE = 16 * 1024 * 1024  # our cap on a message body (docs/protocol.md, "Framing")
SESSION = "raw"
REQUEST = "r1"


def default_socket_path() -> Path:
    """Where `csmd serve` listens by default (docs/protocol.md, "Connecting")."""
    runtime_dir = os.environ.get("XDG_RUNTIME_DIR")
    if runtime_dir:
        return Path(runtime_dir) / "csmd" / "csmd.sock"
    temp_dir = os.environ.get("TMPDIR")
    if sys.platform == "darwin" and temp_dir:  # launchd's per-user temporary directory
        return Path(temp_dir) / "csmd" / "csmd.sock"
    return Path(f"/tmp/csmd-{os.getuid()}") / "csmd.sock"


class DaemonError(Exception):
    """The daemon answered with an `error` message, or broke the protocol."""


class UntrustedServer(Exception):
    """The socket is served by another user's process (docs/protocol.md, "Who may connect")."""


def server_uid(sock: socket.socket) -> int:
    """The user id the kernel records for the process serving the connected socket: SO_PEERCRED on Linux
    (a struct ucred of three C ints: pid, uid, gid), getpeereid() from the C library elsewhere."""
    if sys.platform.startswith("linux"):
        _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        return uid
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    uid, gid = ctypes.c_uint32(), ctypes.c_uint32()
    if libc.getpeereid(sock.fileno(), ctypes.byref(uid), ctypes.byref(gid)) != 0:
        raise OSError(ctypes.get_errno(), "getpeereid failed")
    return uid.value


class RawConnection:
    """One connection: length-prefixed msgpack maps over a Unix stream socket."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(os.fspath(path))

    def check_server(self, path: Path) -> None:
        """Before sending anything: the daemon must run as our user (or root), or it could be anyone's."""
        uid = server_uid(self.sock)
        if uid not in (os.geteuid(), 0):
            raise UntrustedServer(f"{path} is served by user {uid}, not by us: refusing to talk to it")

    def send(self, **fields: Any) -> None:
        # Every message is a map with a string "type"; bytes go out as msgpack bin (use_bin_type).
        body = msgpack.packb(fields, use_bin_type=True)
        self.sock.sendall(struct.pack(">I", len(body)) + body)

    def receive(self) -> dict[str, Any]:
        # A big-endian uint32 length, then that many bytes of msgpack.
        (length,) = struct.unpack(">I", self._read_exactly(4))
        if length > MAX_MESSAGE:
            raise DaemonError(f"the daemon sent a {length}-byte message, above our cap of {MAX_MESSAGE}")
        message = msgpack.unpackb(self._read_exactly(length), raw=False)
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            raise DaemonError(f"malformed message from the daemon: {message!r}")
        if message["type"] == "error":
            # Request-level errors are not fatal, but this client waits for one reply at a time, so any
            # error is about what it is waiting for.
            fatal = " (fatal)" if message.get("fatal") else ""
            raise DaemonError(f"daemon error {message['code']}{fatal}: {message['message']}")
        return message

    def expect(self, *types: str) -> dict[str, Any]:
        """The next message that is one of `types`. Others (such as a `pong`) are skipped."""
        while True:
            message = self.receive()
            if message["type"] in types:
                return message

    def _read_exactly(self, count: int) -> bytes:
        data = bytearray()
        while len(data) < count:
            part = self.sock.recv(count - len(data))
            if not part:
                raise DaemonError("the daemon closed the connection")
            data += part
        return bytes(data)


def speak_to_wav(conn: RawConnection, text: str, out: Path, max_frames: int | None, seed: int | None) -> int:
    # 1. Handshake: hello lists the versions we speak; welcome says which one the daemon picked.
    conn.send(type="hello", protocol=[PROTOCOL_VERSION], client="raw-client")
    welcome = conn.expect("welcome")
    if welcome["protocol"] != PROTOCOL_VERSION or "pcm_s16le" not in welcome["formats"]:
        raise DaemonError(f"the daemon does not speak our protocol: {welcome}")
    print(f"connected to {welcome['server']}, model {welcome['model']}")

    # 2. A session holds one conversation's context.
    conn.send(type="session.open", session=SESSION)
    conn.expect("session.opened")

    # 3. Ask for a reply in 16-bit PCM, which a WAV file holds as is. Absent optional fields take the
    #    daemon's defaults, so leave them out rather than sending nil.
    speak: dict[str, Any] = {"session": SESSION, "request": REQUEST, "text": text, "speaker": 0, "format": "pcm_s16le"}
    if max_frames is not None:
        speak["max_frames"] = max_frames
    if seed is not None:
        speak["seed"] = seed
    sample_width = 2  # bytes per pcm_s16le sample
    samples = 0
    with open(out, "wb") as file, wave.open(file, "wb") as wav:  # opened first: a bad path fails before any work
        conn.send(type="speak", **speak)
        start = conn.expect("audio.start")  # the request was accepted: its stream is open
        wav.setnchannels(1)
        wav.setsampwidth(sample_width)
        wav.setframerate(start["sample_rate"])
        # 4. Stream: each audio.chunk goes straight into the file; audio.end closes the stream. Chunks come in
        #    order (seq 0, 1, 2, ...); one may in principle hold several frames, so count samples, not chunks.
        while (message := conn.expect("audio.chunk", "audio.end"))["type"] == "audio.chunk":
            wav.writeframes(message["pcm"])
            samples += len(message["pcm"]) // sample_width
    end = message

    first = end.get("first_audio_ms")  # absent when no audio was made
    first_text = "no audio" if first is None else f"first audio after {first:.1f} ms"
    print(
        f"{end['frames']} frames, {samples} samples, reason {end['reason']}, seed {start['seed']}, "
        f"{first_text} -> {out}"
    )
    if end["reason"] not in ("eos", "max_length"):
        raise DaemonError(f"the reply ended with reason {end['reason']!r}")
    if samples != end["frames"] * start["frame_samples"]:
        raise DaemonError(f"received {samples} samples, but audio.end reports {end['frames']} frames")

    # 5. Close the session (closing the connection would close it too).
    conn.send(type="session.close", session=SESSION)
    conn.expect("session.closed")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description="Speak through the csmd daemon with only socket and msgpack.")
    parser.add_argument("text", nargs="?", default="Hello from a raw socket.", help="what to say")
    parser.add_argument("-o", "--output", type=Path, default=Path("raw.wav"), help="WAV file to write")
    parser.add_argument("--socket", type=Path, default=None, help="daemon socket (default: where csmd serve listens)")
    parser.add_argument("--max-frames", type=int, default=None, help="cap the reply (12.5 frames per second)")
    parser.add_argument("--seed", type=int, default=None, help="reproduce a reply")
    args = parser.parse_args()
    path = args.socket or default_socket_path()
    try:
        conn = RawConnection(path)
    except OSError as exc:
        print(f"raw_client: no csmd daemon at {path} (--socket): {exc.strerror or exc}", file=sys.stderr)
        return 2
    try:
        conn.check_server(path)
        return speak_to_wav(conn, args.text, args.output, args.max_frames, args.seed)
    except UntrustedServer as exc:
        print(f"raw_client: {exc}", file=sys.stderr)
        return 2
    except (DaemonError, OSError) as exc:
        print(f"raw_client: {exc}", file=sys.stderr)
        return 1
    finally:
        conn.sock.close()


if __name__ == "__main__":
    sys.exit(main())
