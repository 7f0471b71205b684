"""The named scenarios of `csmd bench run`, each measured through a daemon exactly as an app uses one.

A `Target` is that daemon: one started in a thread of this process (as `csmd serve` runs it, with the
model this process loaded), or one already running (`--socket`). The scenarios talk to it with the blocking
client; what only the daemon's insides can tell (the Mimi share of a frame, MLX's peak memory) is reported
for a daemon in this process and noted as missing for another one.

- `reply`: a reply from request to last chunk: time to audio.start (first byte), to the first audio chunk
  and to the first non-silent one; the interval between chunks (p50/p95/p99, jitter); the real-time factor;
  the Mimi share of a frame; cancel to the end of the stream; peak memory.
- `context`: time to first audio against the length of the conversation before the reply, with the rows
  already in the session's KV cache (added beforehand) and with all of them prefilled for this reply (added
  with it, as a daemon that keeps no context would have to): what the cache buys.
- `frame` and `codec` (in this process only): a frame of the model and of Mimi, against the bandwidth floor
  measured in the same run, and against their peers (transformers' CSM, moshi's Mimi) where installed.
"""

from __future__ import annotations

import itertools
import os
import platform
import socket
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from csmd.audio.mimi.model import Mimi
from csmd.bench.memory import peak_rss_mb, status_mb
from csmd.bench.report import Better, Figure, ScenarioResult, figure
from csmd.daemon.server import Daemon
from csmd.model.csm import CSM
from csmd.model.generator import Generator
from csmd.model.sampling import FRAME_MS
from csmd.protocol.blocking_client import Client, connect
from csmd.protocol.errors import RequestError
from csmd.protocol.peercred import peer_pid

TEXT = "The quick brown fox jumps over the lazy dog."
SILENT_RMS = 1e-3  # a chunk quieter than this (-60 dBFS) is silence
CANCEL_AFTER_CHUNKS = 3
CONTEXT_ROWS = (0, 200, 600, 1200, 1800)  # the context curve's points, cut to what the model's window holds


@dataclass
class Target:
    path: Path
    where: str  # "daemon" (in this process) or "socket" (a running one)
    daemon: Daemon | None = None  # the daemon object, when it runs in this process

    @contextmanager
    def client(self) -> Iterator[Client]:
        with connect(self.path, client="csmd bench run") as client:
            yield client


Progress = Callable[[], None]  # called once per repetition done (a progress bar's step)
_sessions = itertools.count()


def _session(client: Client) -> str:
    name = f"bench-{os.getpid()}-{next(_sessions)}"
    client.open_session(name)
    return name


@dataclass
class _Reply:
    first_byte: float  # seconds from sending speak to audio.start
    first_audio: float  # to the first chunk
    first_sound: float | None  # to the first non-silent chunk (None: all silent)
    arrivals: list[float]  # every chunk's time since the request


def _timed_reply(client: Client, session: str, text: str, frames: int, seed: int) -> _Reply:
    started = time.perf_counter()
    speech = client.speak(session, text, 0, seed=seed, max_frames=frames, format="pcm_f32le")
    speech.start()
    first_byte = time.perf_counter() - started
    arrivals: list[float] = []
    first_sound = None
    for chunk in speech:
        now = time.perf_counter() - started
        arrivals.append(now)
        if first_sound is None and float(np.sqrt(np.mean(np.square(chunk.pcm)))) > SILENT_RMS:
            first_sound = now
    first_audio = arrivals[0] if arrivals else first_byte
    return _Reply(first_byte, first_audio, first_sound, arrivals)


def _cancel_latency(client: Client, session: str, frames: int) -> float:
    """Seconds from sending cancel (after a few chunks) to the daemon's answer, which comes after the last
    chunk it sent."""
    speech = client.speak(session, TEXT, 0, seed=7, max_frames=frames, format="pcm_f32le")
    chunks = iter(speech)
    for _ in range(CANCEL_AFTER_CHUNKS):
        next(chunks)
    started = time.perf_counter()
    speech.cancel()
    latency = time.perf_counter() - started
    for _ in chunks:  # what was already on its way
        pass
    return latency


def reply(target: Target, frames: int, repeats: int, warmup: int, progress: Progress) -> ScenarioResult:
    result = ScenarioResult("reply", target.where, {"frames": frames, "repeats": repeats, "text": TEXT})
    replies: list[_Reply] = []
    cancels: list[float] = []
    daemon = target.daemon
    with target.client() as client:
        for i in range(warmup + repeats):
            session = _session(client)
            times_before = _step_times(daemon)
            made = _timed_reply(client, session, TEXT, frames, seed=i)
            times_after = _step_times(daemon)
            cancel = _cancel_latency(client, session, frames=max(frames, 4 * CANCEL_AFTER_CHUNKS))
            client.close_session(session)
            if i >= warmup:
                replies.append(made)
                cancels.append(cancel)
                if times_before is not None and times_after is not None:
                    generate, decode = (after - before for after, before in zip(times_after, times_before, strict=True))
                    result.series.setdefault("mimi_share", []).append(decode / (generate + decode))
            progress()
    intervals = [1000 * gap for r in replies for gap in np.diff(r.arrivals)]
    per_reply = [float(np.median(np.diff(r.arrivals))) for r in replies if len(r.arrivals) > 1]
    result.figures += [
        figure("time to first byte", "ms", [1000 * r.first_byte for r in replies]),
        figure("time to first audio", "ms", [1000 * r.first_audio for r in replies]),
    ]
    sounds = [1000 * r.first_sound for r in replies if r.first_sound is not None]
    if sounds:
        result.figures.append(figure("time to first non-silent audio", "ms", sounds))
    else:
        result.notes.append("every chunk was silent: no time to first non-silent audio")
    if intervals:
        p50, p95, p99 = np.percentile(intervals, [50, 95, 99])
        result.figures += [
            figure("frame interval p50", "ms", [p50]),
            figure("frame interval p95", "ms", [p95]),
            figure("frame interval p99", "ms", [p99]),
            figure("frame interval jitter (std)", "ms", [float(np.std(intervals))]),
            figure("real-time factor", "x", [FRAME_MS / 1000 / gap for gap in per_reply], better="higher"),
        ]
        result.series["frame_intervals_ms"] = intervals
    if "mimi_share" in result.series:
        result.figures.append(figure("Mimi share of a frame", "%", [100 * s for s in result.series["mimi_share"]]))
    else:
        result.notes.append("Mimi share of a frame: only measured for a daemon in this process")
    result.figures.append(figure("cancel to end of stream", "ms", [1000 * c for c in cancels]))
    result.figures += _memory_figures(target)
    if target.daemon is None:
        result.notes.append("MLX peak memory: only measured for a daemon in this process")
    return result


def _step_times(daemon: Daemon | None) -> tuple[float, float] | None:
    if daemon is None:
        return None
    times = daemon.scheduler.times
    return times.generate, times.decode


HISTORY_SEGMENT_WORDS = 100  # a history's user turns: well under the protocol's 8 KiB of text each


def history(client: Client, rows: int) -> tuple[list[str], int]:
    """User turns that come to about `rows` rows of context, and their rows as the daemon counts them (they
    are added to a throwaway session to count them: rows per word depend on the tokenizer)."""
    turns: list[str] = []
    counted = 0
    rows_per_word = 8.0  # a first guess, high: the first turn falls short, and then the rate is known
    session = _session(client)
    try:
        while counted < rows:
            words = max(1, min(HISTORY_SEGMENT_WORDS, int((rows - counted) / rows_per_word)))
            turns.append(" ".join(["word"] * words))
            before, counted = counted, client.add_context(session, 1, turns[-1]).rows
            rows_per_word = (counted - before) / words
    finally:
        client.close_session(session)
    return turns, counted


def context(
    target: Target, frames: int, repeats: int, warmup: int, window: int | None, progress: Progress
) -> ScenarioResult:
    """`window`: the model's rows, when known (a daemon elsewhere does not say: a context it refuses as too
    long is left out)."""
    points = [rows for rows in CONTEXT_ROWS if window is None or rows + frames + 64 <= window]
    result = ScenarioResult("context", target.where, {"frames": frames, "repeats": repeats})
    cached: dict[int, list[float]] = {}
    full: dict[int, list[float]] = {}
    with target.client() as client:
        histories: dict[int, tuple[list[str], int]] = {}  # target rows: (user turns, their rows counted)
        for rows in points:
            try:
                histories[rows] = history(client, rows)
            except RequestError as refused:
                result.notes.append(f"a context of {rows} rows was refused: {refused}")
        for i in range(warmup + repeats):
            for rows, (turns, _) in histories.items():
                # Cached: the history is in the session's cache before the reply is asked for.
                session = _session(client)
                for turn in turns:
                    client.add_context(session, 1, turn)
                ttfa_cached = _timed_reply(client, session, TEXT, frames, seed=i).first_audio
                client.close_session(session)
                # Prefilled: the history comes with the reply, so all of it is prefilled for this reply.
                session = _session(client)
                started = time.perf_counter()
                for turn in turns:
                    client.add_context(session, 1, turn)
                ttfa_full = time.perf_counter() - started + _timed_reply(client, session, TEXT, frames, i).first_audio
                client.close_session(session)
                if i >= warmup:
                    cached.setdefault(rows, []).append(1000 * ttfa_cached)
                    full.setdefault(rows, []).append(1000 * ttfa_full)
            progress()
    # Named by the rows asked for, so that two reports match; the rows the daemon counted go in the series.
    for rows in cached:
        result.figures.append(figure(f"first audio, {rows} rows cached", "ms", cached[rows]))
        result.figures.append(figure(f"first audio, {rows} rows prefilled", "ms", full[rows]))
    result.series["context_rows"] = [histories[rows][1] for rows in cached]
    result.series["cached_ms"] = [statistics.median(cached[r]) for r in cached]
    result.series["prefilled_ms"] = [statistics.median(full[r]) for r in full]
    dropped = [rows for rows in CONTEXT_ROWS if rows not in points]
    if dropped:
        result.notes.append(f"contexts of {dropped} rows do not fit the model's window of {window} rows")
    return result


# -- memory ------------------------------------------------------------------------------------------------


def _memory_figures(target: Target) -> list[Figure]:
    """Peak resident memory of the daemon's process (and MLX's peak, for a daemon in this process)."""
    if target.daemon is not None:
        import mlx.core as mx

        return [
            figure("peak RSS (this process)", "MB", [peak_rss_mb()]),
            figure("MLX peak memory", "MB", [mx.get_peak_memory() / 2**20]),
        ]
    pid = _daemon_pid(target.path)
    peak = status_mb("VmHWM", pid) if pid is not None else None
    return [] if peak is None else [figure("peak RSS (daemon)", "MB", [peak])]


def _daemon_pid(path: Path) -> int | None:
    """The pid of the process serving `path`, where the OS tells it (peercred.peer_pid)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(path))
        return peer_pid(sock)


def describe_machine() -> dict[str, object]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "os": platform.system(), "python": platform.python_version()}


# -- in-process scenarios: the model's own parts, with their floors and peers ------------------------------


def frame(
    model: CSM, name: str, frames: int, warmup: int, prefill_rows: int, repeats: int, peers: bool
) -> ScenarioResult:
    """One frame (backbone step + depth decoder) and a prefill, against the bandwidth and GEMM floors measured
    in the same run; with `peers`, transformers' CSM on the same shapes, as ratios."""
    from csmd.bench import frame as frame_bench
    from csmd.bench.machine import measure

    machine = measure()
    r = frame_bench.run(
        model, name, frames=frames, warmup=warmup, prefill_rows=prefill_rows, prefill_repeats=repeats,
        machine=machine,
    )  # fmt: skip
    result = ScenarioResult("frame", "in-process", {"frames": frames, "prefill rows": prefill_rows})
    result.figures += [
        figure("frame", "ms", [r.frame_ms]),
        figure("backbone step", "ms", [r.backbone_ms]),
        figure("depth decoder", "ms", [r.decoder_ms]),
        figure("bandwidth floor of a frame", "ms", [r.floor_ms], better="none"),
        figure("frame / floor", "x", [r.floor_ratio]),
        figure(f"prefill of {prefill_rows} rows", "ms", [r.prefill_ms]),
        figure("prefill rate", "GFLOP/s", [r.prefill_gflops], better="higher"),
        figure("prefill / GEMM rate", "x", [r.prefill_gemm_ratio], better="higher"),
    ]
    if peers:
        if not _installed("transformers", "torch"):
            result.notes.append("transformers' CSM: not installed (pip install csmd[test])")
        else:
            from csmd.bench import transformers_frame

            theirs = transformers_frame.run(
                model.config, r.dtype, frames=frames, warmup=warmup, prefill_rows=prefill_rows,
                prefill_repeats=repeats,
            )  # fmt: skip
            frame_bench.add_comparison(r, theirs)
            assert r.transformers_frame_ratio is not None and r.transformers_prefill_ratio is not None
            result.figures += [
                figure("frame / transformers' frame", "x", [r.transformers_frame_ratio]),
                figure("prefill / transformers' prefill", "x", [r.transformers_prefill_ratio]),
            ]
    return result


def codec(mimi: Mimi, name: str, frames: int, peers: bool) -> ScenarioResult:
    """Mimi's streaming decode and encode of a frame, against its floor; with `peers`, moshi's decoder."""
    from csmd.bench import codec as codec_bench

    compare = peers and _installed("moshi", "torch")
    r = codec_bench.run(mimi, name, frames=frames, compare_moshi=compare)
    result = ScenarioResult("codec", "in-process", {"frames": frames})
    result.figures += [
        figure("decode a frame", "ms", [r.decode_ms]),
        figure("encode a frame", "ms", [r.encode_ms]),
        figure("decode / floor", "x", [r.floor_ratio]),
    ]
    if compare and r.moshi_decode_ms:
        result.figures.append(figure("decode / moshi's decode", "x", [r.decode_ms / r.moshi_decode_ms]))
    elif peers:
        result.notes.append("moshi's Mimi: not installed (pip install --no-deps moshi)")
    return result


def _installed(*modules: str) -> bool:
    import importlib.util

    return all(importlib.util.find_spec(name) is not None for name in modules)


def concurrency(
    generator: Generator, mimi: Mimi, name: str, sessions: list[int], frames: int, warmup: int, context_rows: int
) -> ScenarioResult:
    """Sessions speaking at once in this process, batched as the daemon batches them (`bench.concurrency`):
    aggregate frames per second and each session's frame interval, per count of sessions."""
    from csmd.bench import concurrency as concurrency_bench
    from csmd.bench.machine import measure

    r = concurrency_bench.run(
        generator, mimi, name, measure(), sessions, frames=frames, warmup=warmup, context_rows=context_rows,
        daemon=False,
    )  # fmt: skip
    result = ScenarioResult("concurrency", "in-process", {"frames": frames, "context rows": context_rows})
    for run in r.runs:
        result.figures += [
            figure(f"{run.sessions} sessions: aggregate", "frames/s", [run.aggregate_fps], better="higher"),
            figure(f"{run.sessions} sessions: frame interval p50", "ms", [run.interval_p50_ms]),
            figure(f"{run.sessions} sessions: frame interval p95", "ms", [run.interval_p95_ms]),
        ]
        if run.rss_mb is not None:
            result.figures.append(figure(f"{run.sessions} sessions: RSS", "MB", [run.rss_mb]))
    result.series["sessions"] = [run.sessions for run in r.runs]
    result.series["aggregate_fps"] = [run.aggregate_fps for run in r.runs]
    result.series["interval_p50_ms"] = [run.interval_p50_ms for run in r.runs]
    return result


def conversation(
    generator: Generator, mimi: Mimi, name: str, rounds: int, user_device: str, csmd_device: str
) -> ScenarioResult:
    """The `talk` loop on real devices (`bench.talk`): a synthesized user asks, csmd answers, the user cuts in.
    The time from the end of the user's turn to the first reply audio heard, and each of its parts."""
    from csmd.bench import talk

    r = talk.run(generator, mimi, name, rounds, user_device, csmd_device)
    result = ScenarioResult(
        "conversation", "in-process", {"rounds": rounds, "devices": f"{user_device}, {csmd_device}"}
    )
    result.figures.append(figure("end of turn to reply heard", "ms", [round_["whole"] for round_ in r.rounds_ms]))
    for part in talk.PARTS:
        better: Better = "none" if part == "end-of-turn detection" else "lower"
        result.figures.append(figure(part, "ms", [round_[part] for round_ in r.rounds_ms], better=better))
    result.figures += [
        figure("speech onset to playback stopped", "ms", [r.barge_in_ms]),
        figure("playback underruns", "per minute", [r.underruns_per_minute]),
    ]
    result.notes.append("end of turn to reply heard: from the detected end of the turn (its detection not counted)")
    return result
