"""Exceptions of the protocol layer and of the clients built on it.

`ProtocolError` is about the wire: a peer (or a local caller) broke the framing, the message schema or the
message order. `RequestError` is a refused or failed request (the daemon raises it to refuse one, the clients
for the daemon's answer); `ConnectionLost`, what the clients raise once the connection is over;
`UntrustedServerError`, for a socket served by another user.
"""

from __future__ import annotations

import os
from typing import Final, Literal

# Every code that the protocol layer itself raises. All of them end the connection when the peer caused them
# (the daemon's own request-level codes, such as "unknown_session", are not here: see docs/protocol.md).
ProtocolErrorCode = Literal[
    "malformed",  # not msgpack, not a map with str keys, or no str "type"
    "too_large",  # a length prefix above the receiver's cap
    "truncated",  # end of stream inside a message
    "unknown_type",  # a "type" this protocol version does not define
    "bad_field",  # a missing field, a field of the wrong type, or out of its protocol-level range
    "out_of_order",  # a message not allowed in the connection's state (or a closed/failed connection used)
    "unsupported_version",  # hello and welcome share no protocol version
    "wrong_direction",  # a client-to-server message sent by the server, or the reverse
]

PROTOCOL_ERROR_CODES: Final[tuple[ProtocolErrorCode, ...]] = (
    "malformed",
    "too_large",
    "truncated",
    "unknown_type",
    "bad_field",
    "out_of_order",
    "unsupported_version",
    "wrong_direction",
)


class ProtocolError(Exception):
    """A violation of the wire protocol.

    `field` names the offending field for "bad_field" (so a caller or a test can tell which one), else None.
    """

    def __init__(self, code: ProtocolErrorCode, message: str, *, field: str | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code: ProtocolErrorCode = code
        self.message = message
        self.field = field


class RequestError(Exception):
    """The daemon refused or failed one request or command (a non-fatal `error` message).

    The connection stays usable: only the awaited call or the speech iterator that the error was for raises.
    """

    def __init__(self, code: str, message: str, *, request: str | None = None, session: str | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.request = request
        self.session = session


class ConnectionLost(Exception):
    """The client's connection is over; every pending and later call raises this.

    `code` is the server's fatal error code, a `ProtocolErrorCode` when the server broke the protocol, or
    "closed" when the stream ended (or the client was closed) without a fatal error.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class UntrustedServerError(PermissionError):
    """The socket is served by another user (not this process's user, nor root): nothing was sent to it.

    Another user could have moved the daemon's socket aside and put their own listener at its path, to read
    what this client would send (session names, text, voice prompts) or to answer with audio of their own.
    """

    def __init__(self, path: str, uid: int) -> None:
        super().__init__(
            f"refusing to talk to {path}: the process serving it runs as uid {uid}, not as this user "
            f"(uid {os.geteuid()}) or root; another user may have replaced the daemon's socket"
        )
        self.path = path
        self.uid = uid
