"""Ctrl-C as the documented way to stop: the work in progress ends cleanly, its summary is printed, and the
command exits 0 (130 only when nothing had run yet)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from types import FrameType

INTERRUPTED = 130  # the shell's status for a command ended by SIGINT before it did anything


@contextmanager
def first_ctrl_c_stops() -> Iterator[Callable[[], bool]]:
    """Inside, the first Ctrl-C (SIGINT) only sets a flag, which the work polls (the yielded function) to end
    at its next step; a second one interrupts at once, as usual. Outside the main thread (where signals
    cannot be caught) the flag never rises."""
    hit = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield hit.is_set
        return

    def handle(signum: int, frame: FrameType | None) -> None:
        if hit.is_set():
            raise KeyboardInterrupt
        hit.set()

    previous = signal.signal(signal.SIGINT, handle)
    try:
        yield hit.is_set
    finally:
        signal.signal(signal.SIGINT, previous)


async def until_ctrl_c(work: Callable[[], Awaitable[None]]) -> bool:
    """Run `work` (a trio task) until it returns, or until Ctrl-C cancels it; True if Ctrl-C ended it. The
    work's `finally` blocks run as for any cancellation (no KeyboardInterrupt flies through its nurseries)."""
    import trio

    interrupted = False
    with trio.open_signal_receiver(signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                nonlocal interrupted
                async for _ in signals:
                    interrupted = True
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(watch)
            await work()
            nursery.cancel_scope.cancel()
    return interrupted
