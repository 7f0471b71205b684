"""The one thread that touches the model and the codec; the trio loop hands it jobs and awaits the results.

MLX work is long (tens to hundreds of ms per frame) and must never run on the event loop. One dedicated
thread, fed in order, also means the model's state (KV caches, decoders) is never touched by two threads.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable
from typing import TypeVar

import mlx.core as mx
import outcome
import trio

T = TypeVar("T")


class ModelWorker:
    def __init__(self) -> None:
        self._device = mx.default_device()  # the one `csmd.runtime` chose, on the constructing thread
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="csmd-model", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        # MLX streams belong to threads: this thread needs its own. Arrays it uses must be evaluated already
        # or made here, which is why every model and codec call goes through `run`.
        mx.set_default_device(self._device)
        mx.set_default_stream(mx.new_stream(self._device))
        while (job := self._jobs.get()) is not None:
            job()
        # A stream left behind by a finished thread aborts the process at exit ("terminate called without an
        # active exception"): destroy it on its own thread.
        mx.synchronize()
        mx.clear_streams()

    async def run(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the model thread. If the caller is cancelled meanwhile, `fn` still finishes (a model
        step cannot be interrupted halfway) and its result is dropped."""
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        result: list[outcome.Outcome[T]] = []

        def job() -> None:
            result.append(outcome.capture(fn))
            # Schedule the wake-up without waiting for the loop to run it: the loop may itself be waiting
            # for this thread (`close` joins it), and if the loop is gone nobody needs the result.
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(done.set)

        self._jobs.put(job)
        await done.wait()
        return result[0].unwrap()

    def close(self, timeout: float | None = None, *, drop_queued: bool = False) -> bool:
        """Stop the thread once the job it is running (and, unless `drop_queued`, every queued one) is done.

        Returns False if the thread is still running after `timeout` seconds: a job that never ends (a bug)
        must not hang the caller forever. Safe from the trio thread: jobs never wait on it. Dropped jobs never
        complete, so drop only when nobody awaits them any more (at shutdown, once every caller is cancelled).
        """
        if drop_queued:
            with contextlib.suppress(queue.Empty):
                while True:
                    self._jobs.get_nowait()
        self._jobs.put(None)
        self._thread.join(timeout)
        return not self._thread.is_alive()
