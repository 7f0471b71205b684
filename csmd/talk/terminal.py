"""Lines typed on the terminal, for the typed modes of `csmd talk` (the reply, or the user's transcript)."""

from __future__ import annotations

import trio


async def read_stdin_line(prompt: str) -> str:
    """One line typed on the terminal; "" at end of input."""

    def read() -> str:
        try:
            return input(prompt)
        except EOFError:
            return ""

    # abandon_on_cancel: a blocked input() cannot be interrupted, and Ctrl-C must still end the conversation.
    return await trio.to_thread.run_sync(read, abandon_on_cancel=True)
