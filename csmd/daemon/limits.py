"""What one client may hold of the daemon: connections, sessions, time, and memory for incoming messages.

Every limit is here, with its default; docs/protocol.md ("Limits") lists them with the error a client sees
when it hits one. The daemon enforces them in `handler.ClientHandler`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import trio

from csmd.protocol.connection import DEFAULT_MAX_MESSAGE

MiB = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    max_connections: int = 64  # connections served at once; one more is refused (too_many_connections)
    max_sessions: int = 8  # sessions open at once, over all connections (each holds a KV cache)
    max_sessions_per_connection: int = 4  # so that one connection cannot take every session
    handshake_timeout: float = 10.0  # seconds from connecting to `hello`
    idle_timeout: float = 120.0  # seconds without a message on a connection with no session and nothing running
    message_timeout: float = 30.0  # seconds from a message's first byte to its last
    max_message: int = DEFAULT_MAX_MESSAGE  # bytes of one message body (welcome.max_message)
    max_buffered: int = 64 * MiB  # bytes of incomplete message bodies held over all connections

    def __post_init__(self) -> None:
        for name in ("max_connections", "max_sessions", "max_sessions_per_connection", "max_message"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("handshake_timeout", "idle_timeout", "message_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0 or math.isnan(value):
                raise ValueError(f"{name} must be a number of seconds > 0 (math.inf: no limit), got {value!r}")
        # A message the budget could never hold would wait for room forever: refuse the combination.
        if self.max_buffered < self.max_message:
            raise ValueError(
                f"max_buffered ({self.max_buffered}) must hold at least one whole message (max_message, "
                f"{self.max_message})"
            )


class BufferBudget:
    """The bytes of incomplete message bodies that all connections hold between reads, against `max_buffered`.

    A connection reserves a message's whole body as soon as its length prefix is read, so a reservation
    once granted always lets that message complete: nobody waits on a connection that is itself waiting. A
    connection that gets no room stops reading (and so holds no more than the one read that showed it the
    prefix) until others' messages complete or its message deadline passes.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._room = trio.lowlevel.ParkingLot()

    async def acquire(self, size: int) -> None:
        if size > self.capacity:
            raise ValueError(f"a reservation of {size} bytes can never fit a budget of {self.capacity}")
        while self.used + size > self.capacity:
            await self._room.park()
        self.used += size

    def release(self, size: int) -> None:
        assert 0 <= size <= self.used, (size, self.used)
        self.used -= size
        if size:
            self._room.unpark_all()
