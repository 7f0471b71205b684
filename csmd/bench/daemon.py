"""`csmd bench daemon`: what the socket costs. The same replies (same model, text, seed, length) are made
in-process and through a daemon on a Unix socket, alternately, in one run; time to first audio and time per
frame are compared.

The daemon runs in a thread of this process with its own trio loop and model thread, exactly as `csmd serve`
runs it; the client is the blocking client any app would use.
"""

from __future__ import annotations

import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import trio

from csmd.audio.mimi.model import Mimi
from csmd.daemon.server import Daemon
from csmd.model.generator import Generator
from csmd.model.sampling import GenerationParams
from csmd.protocol.blocking_client import connect
from csmd.speak import speak

TEXT = "The quick brown fox jumps over the lazy dog."


@dataclass
class DaemonBenchResult:
    model: str
    frames: int
    runs: int
    in_process_first_audio_ms: float  # medians over runs
    socket_first_audio_ms: float
    in_process_frame_ms: float
    socket_frame_ms: float

    @property
    def first_audio_overhead_ms(self) -> float:
        return self.socket_first_audio_ms - self.in_process_first_audio_ms

    @property
    def frame_overhead_ms(self) -> float:
        return self.socket_frame_ms - self.in_process_frame_ms

    def as_dict(self) -> dict[str, object]:
        return {
            **asdict(self),
            "first_audio_overhead_ms": self.first_audio_overhead_ms,
            "frame_overhead_ms": self.frame_overhead_ms,
        }


def serve_in_thread(daemon: Daemon, path: Path) -> tuple[threading.Thread, trio.lowlevel.TrioToken, trio.CancelScope]:
    ready = threading.Event()
    handles: list[object] = []

    async def main() -> None:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                await nursery.start(daemon.serve, path)
                handles.extend([trio.lowlevel.current_trio_token(), scope])
                ready.set()

    thread = threading.Thread(target=trio.run, args=(main,), name="csmd-bench-daemon", daemon=True)
    thread.start()
    if not ready.wait(60):
        raise RuntimeError("the benchmark daemon did not start")
    token, scope = handles
    assert isinstance(token, trio.lowlevel.TrioToken) and isinstance(scope, trio.CancelScope)
    return thread, token, scope


@contextmanager
def daemon_in_thread(daemon: Daemon) -> Iterator[Path]:
    """Serve `daemon` on a socket in a private temporary directory from a thread of this process; yields the
    socket's path, and on the way out stops the daemon, waits for its thread and closes it."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "csmd.sock"
        thread, token, scope = serve_in_thread(daemon, path)
        try:
            yield path
        finally:
            trio.from_thread.run_sync(scope.cancel, trio_token=token)
            thread.join()
            daemon.close()


def run(generator: Generator, mimi: Mimi, name: str, frames: int = 25, runs: int = 5) -> DaemonBenchResult:
    params = GenerationParams(max_frames=frames, seed=1)
    local_first, local_frame, remote_first, remote_frame = [], [], [], []
    with daemon_in_thread(Daemon(generator, mimi, name)) as path, connect(path, client="csmd bench") as client:
        for i in range(runs + 1):  # the first round warms both paths up and is not counted
            result = speak(generator, generator.new_context(), mimi, TEXT, 0, params)
            session = f"bench-{i}"
            client.open_session(session)
            start = time.perf_counter()
            first = None
            count = 0
            for _ in client.speak(session, TEXT, 0, seed=1, max_frames=frames, format="pcm_f32le"):
                first = first or time.perf_counter() - start
                count += 1
            total = time.perf_counter() - start
            client.close_session(session)
            if i == 0:
                continue
            local_first.append(result.seconds_to_first_audio)
            local_frame.append(result.seconds_total / max(result.frames, 1))
            remote_first.append(first or total)
            remote_frame.append(total / max(count, 1))

    def ms(values: list[float]) -> float:
        return round(1000 * statistics.median(values), 3)

    return DaemonBenchResult(name, frames, runs, ms(local_first), ms(remote_first), ms(local_frame), ms(remote_frame))


def format_result(r: DaemonBenchResult) -> str:
    return "\n".join(
        [
            f"model {r.model}: {r.runs} replies of {r.frames} frames each way, alternating; medians",
            f"  time to first audio   in-process {r.in_process_first_audio_ms:9.2f} ms   "
            f"socket {r.socket_first_audio_ms:9.2f} ms   overhead {r.first_audio_overhead_ms:+8.2f} ms",
            f"  time per frame        in-process {r.in_process_frame_ms:9.2f} ms   "
            f"socket {r.socket_frame_ms:9.2f} ms   overhead {r.frame_overhead_ms:+8.2f} ms",
        ]
    )
