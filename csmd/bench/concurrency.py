"""`csmd bench concurrency`: 1, 2, 4, 8 sessions speaking at once, in-process and through a daemon.

In-process, the sessions' replies advance as the daemon's scheduler advances them: one batched step
(`step_together`) per frame boundary, then one batched Mimi decode of their frames (`decode_together`). The
batched step is timed apart from the decode, and set against its bandwidth floor: the weights read once for
the whole batch, plus each session's KV cache (`budget.frame_budget`), over the DRAM bandwidth measured in the
same run.

Through the daemon (in a thread of this process, as `csmd serve` runs it), each session has its own
connection and blocking client in its own thread; a session's frame interval is the time between its audio
chunks as they arrive.

Every session first gets the same history (a text turn of about `context_rows` rows), so the KV caches read
per frame are those of a conversation, not of an empty one.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from csmd.audio.mimi.model import Mimi, StreamingDecoder, decode_together
from csmd.bench.budget import frame_budget
from csmd.bench.daemon import daemon_in_thread
from csmd.bench.machine import MachineRates
from csmd.bench.memory import rss_mb
from csmd.daemon.server import Daemon
from csmd.model.generator import Context, Generator, Segment, step_together
from csmd.model.sampling import FRAME_MS, GenerationParams
from csmd.protocol.blocking_client import connect
from csmd.runtime import release_memory

TEXT = "The quick brown fox jumps over the lazy dog."


@dataclass
class ConcurrencyRun:
    """One count of sessions, one way (in-process or through the daemon); times are medians unless named."""

    sessions: int
    where: str  # "in-process" or "daemon"
    frames: int  # timed frames per session
    aggregate_fps: float  # frames per second, all sessions together
    interval_p50_ms: float  # a session's time between frames, over every session's timed frames
    interval_p95_ms: float
    real_time_factors: list[float]  # per session: 80 ms / its median frame interval (above 1: faster than real time)
    step_ms: float | None = None  # in-process: the batched generation step alone
    decode_ms: float | None = None  # in-process: the batched Mimi decode of one step's frames
    floor_ms: float | None = None  # in-process: the batched step's bandwidth floor
    floor_ratio: float | None = None  # step_ms / floor_ms
    rss_mb: float | None = None  # in-process: the process's RSS with this many sessions open

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class ConcurrencyResult:
    model: str
    kv_cache: str  # the dtype of every session's backbone KV cache
    context_rows: int
    bandwidth_gbs: float
    runs: list[ConcurrencyRun] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "runs": [r.as_dict() for r in self.runs]}


def history_text(generator: Generator, rows: int) -> str:
    """A turn of text whose rows (with its BOS/EOS) come to about `rows` (at least a few words)."""
    words = []
    while True:
        words.append("word")
        text = " ".join(words)
        assert generator.tokenizer is not None
        if len(generator.tokenizer.encode_segment(0, text)) >= rows or len(words) >= 4 * rows:
            return text


def _intervals(times: list[float], warmup: int) -> list[float]:
    """Gaps between consecutive frames after the first `warmup` frames (the first frame's own time is the
    time to first audio, not an interval)."""
    return list(np.diff(times[warmup:]))


def _summary(
    sessions: int, where: str, per_session: list[list[float]], times: list[list[float]], warmup: int
) -> ConcurrencyRun:
    gaps = [gap for session in per_session for gap in session]
    start = max(t[warmup] for t in times)
    end = min(t[-1] for t in times)
    counted = sum(sum(1 for x in t if start < x <= end) for t in times)
    return ConcurrencyRun(
        sessions=sessions,
        where=where,
        frames=min(len(s) for s in per_session),
        aggregate_fps=round(counted / (end - start), 2) if end > start else 0.0,
        interval_p50_ms=round(1000 * float(np.percentile(gaps, 50)), 2),
        interval_p95_ms=round(1000 * float(np.percentile(gaps, 95)), 2),
        real_time_factors=[round(FRAME_MS / 1000 / statistics.median(s), 3) for s in per_session],
    )


def in_process(
    generator: Generator, mimi: Mimi, sessions: int, frames: int, warmup: int, history: str, machine: MachineRates
) -> ConcurrencyRun:
    contexts: list[Context] = []
    for _ in range(sessions):
        context = generator.new_context()
        context.append(Segment(1, history))
        contexts.append(context)
    params = [GenerationParams(max_frames=warmup + frames + 1, seed=i) for i in range(sessions)]
    replies = [generator.start(c, TEXT, 0, p) for c, p in zip(contexts, params, strict=True)]
    decoders = [StreamingDecoder(mimi) for _ in range(sessions)]
    memory = rss_mb()
    steps, decodes, stamps = [], [], []
    for _ in range(warmup + frames):
        started = time.perf_counter()
        made = step_together(replies)
        generated = time.perf_counter()
        if any(frame is None for frame in made):
            raise RuntimeError("a benchmark reply ended early (random weights emitted the end frame)")
        decode_together(decoders, np.stack([f for f in made if f is not None]))
        decoded = time.perf_counter()
        steps.append(generated - started)
        decodes.append(decoded - generated)
        stamps.append(decoded)
    for reply in replies:
        reply.cancel()
    # One session's frame: weights + its caches.
    budget = frame_budget(generator.model, contexts[0].cached, contexts[0].kv_dtype)
    batched_bytes = budget.total_bytes - budget.kv_bytes + sessions * budget.kv_bytes  # the weights once
    floor_ms = batched_bytes / (machine.bandwidth_gbs * 1e9) * 1000
    run = _summary(sessions, "in-process", [_intervals(stamps, warmup)] * sessions, [stamps] * sessions, warmup)
    run.step_ms = round(1000 * statistics.median(steps[warmup:]), 3)
    run.decode_ms = round(1000 * statistics.median(decodes[warmup:]), 2)
    run.floor_ms = round(floor_ms, 4)
    run.floor_ratio = round(run.step_ms / floor_ms, 3)
    run.rss_mb = round(memory, 1)
    return run


def through_daemon(
    generator: Generator, mimi: Mimi, name: str, sessions: int, frames: int, warmup: int, history: str
) -> ConcurrencyRun:
    with daemon_in_thread(Daemon(generator, mimi, name)) as path:
        stamps = _speak_at_once(path, sessions, warmup + frames, history)
    if any(len(s) < warmup + frames for s in stamps):
        raise RuntimeError("a benchmark reply ended early (random weights emitted the end frame)")
    return _summary(sessions, "daemon", [_intervals(s, warmup) for s in stamps], stamps, warmup)


def _speak_at_once(path: Path, sessions: int, frames: int, history: str) -> list[list[float]]:
    """Each session on its own connection and thread; all start speaking together. Arrival times per chunk."""
    ready = threading.Barrier(sessions)
    stamps: list[list[float]] = [[] for _ in range(sessions)]
    errors: list[BaseException] = []

    def session(i: int) -> None:
        try:
            with connect(path, client="csmd bench concurrency") as client:
                client.open_session("s")
                client.add_context("s", 1, history)
                ready.wait(timeout=600)
                for _ in client.speak("s", TEXT, 0, seed=i, max_frames=frames, format="pcm_f32le"):
                    stamps[i].append(time.perf_counter())
        except BaseException as exc:  # reported by the caller, with the others' results
            errors.append(exc)
            ready.abort()

    threads = [threading.Thread(target=session, args=(i,), daemon=True) for i in range(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return stamps


def run(
    generator: Generator,
    mimi: Mimi,
    name: str,
    machine: MachineRates,
    sessions: list[int],
    frames: int = 30,
    warmup: int = 5,
    context_rows: int = 300,
    daemon: bool = True,
    progress: Callable[[str], None] = lambda _: None,
) -> ConcurrencyResult:
    """Each count of sessions in-process, then (`daemon`) through a daemon, in the order given."""
    history = history_text(generator, context_rows)
    probe = generator.new_context()
    probe.append(Segment(1, history))
    kv_cache = str(probe.kv_dtype).removeprefix("mlx.core.")
    result = ConcurrencyResult(name, kv_cache, probe.length, machine.bandwidth_gbs)
    del probe
    for count in sessions:
        release_memory()  # the previous count's contexts: RSS then counts this one's
        progress(f"{count} session(s) in-process: {warmup} + {frames} frames each")
        result.runs.append(in_process(generator, mimi, count, frames, warmup, history, machine))
        if daemon:
            progress(f"{count} session(s) through a daemon")
            result.runs.append(through_daemon(generator, mimi, name, count, frames, warmup, history))
    return result


def format_result(r: ConcurrencyResult) -> str:
    lone = {run.where: run for run in r.runs if run.sessions == 1}
    lines = [
        f"model {r.model}: every session with {r.context_rows} rows of context, its KV cache {r.kv_cache} over the "
        f"full window; DRAM {r.bandwidth_gbs} GB/s",
        f"{'sessions':>8} {'where':>10} {'frames/s':>9} {'x lone':>7} {'p50 ms':>8} {'p95 ms':>8} {'x lone':>7} "
        f"{'RTF min':>8} {'step ms':>8} {'floor':>6} {'decode':>7} {'RSS MB':>7}",
    ]
    for run in r.runs:
        base = lone.get(run.where)
        fps_ratio = f"{run.aggregate_fps / base.aggregate_fps:7.2f}" if base and base.aggregate_fps else f"{'':7}"
        gap_ratio = f"{run.interval_p50_ms / base.interval_p50_ms:7.2f}" if base else f"{'':7}"

        def opt(value: float | None, width: int, digits: int = 1) -> str:
            return f"{value:{width}.{digits}f}" if value is not None else f"{'':{width}}"

        lines.append(
            f"{run.sessions:8d} {run.where:>10} {run.aggregate_fps:9.2f} {fps_ratio} {run.interval_p50_ms:8.1f} "
            f"{run.interval_p95_ms:8.1f} {gap_ratio} {min(run.real_time_factors):8.2f} {opt(run.step_ms, 8)} "
            f"{opt(run.floor_ratio, 6, 2)} {opt(run.decode_ms, 7)} {opt(run.rss_mb, 7, 0)}"
        )
    lines.append(
        "x lone: against one session the same way; step ms: the batched generation step alone; floor: step ms "
        "over its bandwidth floor (weights once, each session's KV cache); decode: the batched Mimi decode"
    )
    return "\n".join(lines)
