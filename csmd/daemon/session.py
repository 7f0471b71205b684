"""A connection's sessions and speak requests, as its `ClientHandler` keeps them (only it writes them).

A `Session` is a conversation's context plus the turns its commands take, in the order they were read. A
`Reply` is one speak request from the moment it is read until its last message went out:

    waiting (for its session's turn, then its prefill)  ->  streaming (audio.start sent; its `Generation` is
    the scheduler's, its audio is forwarded by the connection)  ->  ended (audio.end or an error went out)

`cancelled` may be set in either of the first two states. The connection writes what was sent (`frames_sent`,
`first_sent`) and the scheduler writes the generation, so each field has one writer.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import trio

from csmd.daemon.scheduler import Generation
from csmd.model.generator import Context, Utterance
from csmd.model.sampling import GenerationParams
from csmd.protocol import messages as m

RECENT_REPLIES = 16  # per session, the replies a client may still trim (context.trim)


@dataclass(eq=False)  # compared and hashed by identity: a closing session and its successor share a name
class Session:
    name: str
    context: Context = field(init=False)  # made by the session.open command, which has the first turn
    streaming: Reply | None = None  # the reply whose generation holds the context now
    utterances: dict[str, Utterance] = field(default_factory=dict)  # recent replies', for context.trim
    closing: bool = False  # a session.close was read: a later session.open of this name opens a new one
    closed: bool = False  # the close (or a failed open) took effect
    # Turns: each command read for the session takes the next ticket and waits until `serving` reaches it.
    tickets: int = 0
    serving: int = 0
    abandoned: set[int] = field(default_factory=set)  # tickets whose command was cancelled before its turn
    turn_passed: trio.Event = field(default_factory=trio.Event)

    def take_ticket(self) -> int:
        self.tickets += 1
        return self.tickets - 1

    @contextlib.asynccontextmanager
    async def turn(self, ticket: int) -> AsyncIterator[None]:
        """Wait for the command's turn, hold it for the block, then pass it on (whatever happened)."""
        had_turn = False
        try:
            while self.serving != ticket:
                await self.turn_passed.wait()
            had_turn = True
            yield
        finally:
            if had_turn:
                self.serving += 1
                while self.serving in self.abandoned:
                    self.abandoned.remove(self.serving)
                    self.serving += 1
                self.turn_passed.set()
                self.turn_passed = trio.Event()
            else:
                self.abandoned.add(ticket)

    def remember(self, request: str, utterance: Utterance) -> None:
        """Keep a reply's utterance for context.trim; only recent ones, so that memory stays bounded."""
        self.utterances[request] = utterance
        while len(self.utterances) > RECENT_REPLIES:
            del self.utterances[next(iter(self.utterances))]


@dataclass(eq=False)
class Reply:
    """A speak request from the moment it is read until its last message (audio.end, or an error) went out."""

    request: str
    session: str
    params: GenerationParams
    format: m.Format
    accepted: float = field(default_factory=time.perf_counter)  # the origin of audio.end's times
    cancelled: bool = False  # a cancel (or the end of the session or connection) came for it
    generation: Generation | None = None  # once its prefill is done and its audio.start sent
    frames_sent: int = 0  # audio chunks written to the socket
    first_sent: float | None = None  # when the first of them was handed to the socket
    ended: trio.Event = field(default_factory=trio.Event)

    def chunk_sent(self, handed_at: float) -> None:
        """A chunk went out; `handed_at` is when its write began (the client may hold it before the write returns)."""
        if self.first_sent is None:
            self.first_sent = handed_at
        self.frames_sent += 1

    def audio_end(self, reason: m.EndReason) -> m.AudioEnd:
        """Its audio.end: what was sent, and the times from accepting it to its first audio and to now."""
        total_ms = 1000 * (time.perf_counter() - self.accepted)
        first_ms = None if self.first_sent is None else 1000 * (self.first_sent - self.accepted)
        return m.AudioEnd(
            request=self.request, reason=reason, frames=self.frames_sent, total_ms=total_ms, first_audio_ms=first_ms
        )
