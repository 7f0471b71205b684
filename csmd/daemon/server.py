"""The daemon: a trio server on a Unix socket speaking protocol v1, one `ClientHandler` per connection.

`Daemon` holds what all connections share (the model thread, the scheduler, the model and codec, the limits,
the session count) and serves a socket (unix_socket.py) until cancelled; `serve_until_signal` is `csmd
serve`: serve until SIGINT or SIGTERM, tell every client, stop the model thread.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import trio

import csmd
from csmd import runtime
from csmd.audio.mimi.model import Mimi
from csmd.daemon.handler import ClientHandler
from csmd.daemon.limits import BufferBudget, Limits
from csmd.daemon.scheduler import Scheduler
from csmd.daemon.unix_socket import bind_unix_socket, remove_own_socket
from csmd.daemon.worker import ModelWorker
from csmd.model.generator import Generator
from csmd.protocol import messages as m
from csmd.protocol import peercred

log = logging.getLogger("csmd.daemon")
WORKER_STOP_SECONDS = 10.0  # for the model thread to finish the job it is running; then the process exits anyway


class Daemon:
    """Everything shared by all connections: the model thread, the scheduler, the model and codec, the limits."""

    def __init__(self, generator: Generator, mimi: Mimi, model_name: str, limits: Limits | None = None):
        self.generator = generator
        self.mimi = mimi
        self.model_name = model_name
        self.limits = limits or Limits()
        self.sessions_open = 0
        self.connections = 0  # served now (refused ones are not counted)
        self.buffers = BufferBudget(self.limits.max_buffered)  # incomplete messages, over all connections
        self.worker = ModelWorker()
        self.scheduler = Scheduler(self.worker)
        self.handlers: set[ClientHandler] = set()
        self._sessions_closed = trio.Event()
        self.shutting_down = False
        # Decoding and resampling context audio runs in threads (never on the event loop), two at a time: each
        # holds up to a capped message's worth of samples.
        self.audio_threads = trio.CapacityLimiter(2)

    @property
    def window(self) -> int:
        """Rows the model sees at most: bounds a reply's frames and a segment's audio."""
        return self.generator.model.config.backbone.max_seq_len

    @property
    def max_sessions(self) -> int:
        return self.limits.max_sessions

    def welcome(self) -> m.Welcome:
        return m.Welcome(
            protocol=m.PROTOCOL_VERSION,
            server=f"csmd {csmd.__version__}",
            sample_rate=m.SAMPLE_RATE,
            frame_samples=m.FRAME_SAMPLES,
            formats=m.FORMATS,
            model=self.model_name,
            watermark=False,
            max_message=self.limits.max_message,
            version=csmd.__version__,
        )

    def session_closed(self) -> None:
        self.sessions_open -= 1
        self._sessions_closed.set()

    async def _return_memory(self) -> None:
        """After sessions close, give the memory they held (their KV caches and decoder states now sit in MLX's
        buffer cache) back to the system, on the model thread: else the daemon keeps its busiest moment's memory."""
        while True:
            await self._sessions_closed.wait()
            self._sessions_closed = trio.Event()
            await self.worker.run(runtime.release_memory)

    async def serve(
        self,
        path: Path,
        *,
        allow_shared_dir: bool = False,
        task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on `path` until cancelled; on the way out the socket file is removed if it is still ours.

        `allow_shared_dir` serves in a directory that other users may write (see `check_socket_dir`)."""
        peercred.check_supported()  # a daemon that cannot tell who connects must not serve
        listener = await bind_unix_socket(path, allow_shared_dir=allow_shared_dir)
        bound = path.lstat()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.scheduler.run)
                nursery.start_soon(self._return_memory)
                task_status.started(path)
                await trio.serve_listeners(self._handle, [trio.SocketListener(listener)])
        finally:
            listener.close()
            remove_own_socket(path, bound)

    async def _handle(self, stream: trio.SocketStream) -> None:
        # Whatever happens to one connection stays with it: the server and the other clients go on.
        handler = ClientHandler(self, stream)
        self.handlers.add(handler)
        try:
            await handler.run()
        except* (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away while we were writing; its handler cleaned up on the way out
        except* MemoryError:
            log.exception("out of memory serving a connection")
            await handler.fail("out_of_memory", "the daemon ran out of memory serving this connection")
        except* Exception as group:
            log.exception("a connection handler failed (a bug)")
            first = group.exceptions[0]
            await handler.fail("internal", f"the daemon failed on this connection (a bug): {type(first).__name__}")
        finally:
            self.handlers.discard(handler)
            await stream.aclose()

    async def say_goodbye(self) -> None:
        """Shutting down: every connection is told, its replies in flight end with an error, nothing new starts."""
        self.shutting_down = True
        async with trio.open_nursery() as nursery:
            for handler in list(self.handlers):
                nursery.start_soon(handler.say_goodbye)

    def close(self, timeout: float | None = None) -> bool:
        """Stop the model thread; False if it was still busy after `timeout` seconds."""
        return self.worker.close(timeout, drop_queued=True)


async def serve_until_signal(
    daemon: Daemon, path: Path, announce: Callable[[Path], None] | None = None, *, allow_shared_dir: bool = False
) -> None:
    """`csmd serve`: serve until SIGINT or SIGTERM, then shut down cleanly (the socket file goes too).

    Clients are told first (their replies in flight end with an `error`, then a fatal `error` "shutting_down"),
    then the model thread stops once its current job is done. A model thread that does not stop within
    WORKER_STOP_SECONDS (a job that never ends: a bug) cannot hold the process: it exits at once, status 1.
    """
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(daemon.serve, allow_shared_dir=allow_shared_dir), path)
            if announce is not None:
                announce(path)
            async for signum in signals:
                log.info("%s: shutting down", signal.Signals(signum).name)
                break
            await daemon.say_goodbye()
            nursery.cancel_scope.cancel()
        # Still inside the signal receiver: a second Ctrl-C now is only queued (trio delivers it again once the
        # receiver closes), so it cannot interrupt the stop and leave the process exiting under a running
        # model thread (the native pool then aborts the process).
        if not daemon.close(timeout=WORKER_STOP_SECONDS):
            log.error("the model thread did not stop within %g s (a job that never ends: a bug); exiting anyway",
                      WORKER_STOP_SECONDS)  # fmt: skip
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)  # a normal exit would wait on the thread (and the native pool) forever
