"""`csmd bench codec --batch 1,2,4,8`: B Mimi streams decoded in one batched step (decode_together) against the
same B streams decoded one after the other, frame for frame alternated in the same run.

Each batch size has its own two sets of B streams (so that a set is always stepped by one method, as the
daemon's sessions are), warmed to the steady state (the attention window full) first. Both sets get the same
codes: the batched pcm is compared with the single streams' (with the native kernels it is the same floats).
The batched time is the whole call, its stacking and splitting included; `restack_ms` is what a call costs
more when the set of streams changed since the last (their states copied into a new batch).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field

import mlx.core as mx
import numpy as np

from csmd.audio.mimi.model import Mimi, StreamingDecoder, decode_together, stack_decoder_states


@dataclass
class BatchTiming:
    streams: int
    alone_ms: float  # the B streams' steps one after the other (median over the timed frames)
    together_ms: float  # one decode_together of the B streams
    speedup: float  # alone_ms / together_ms
    per_stream_ms: float  # together_ms / B
    restack_ms: float  # stacking the B streams' states into a new batch (evaluated)
    first_call_ms: float  # the first batched call of this size (the compiled step traced for it)
    max_abs_difference: float  # batched pcm against the single streams', over every timed frame


@dataclass
class CodecBatchResult:
    codec: str
    frames: int
    warmup: int
    timings: list[BatchTiming] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _median_ms(times: list[float]) -> float:
    return round(1000 * statistics.median(times), 2)


def run(mimi: Mimi, name: str, batches: list[int], frames: int, warmup: int) -> CodecBatchResult:
    """Time `frames` frames per batch size after `warmup` untimed ones (and 3 more in the timed pattern)."""
    cfg = mimi.config
    rng = np.random.default_rng(0)
    sizes = sorted(set(batches))
    alone = {b: [StreamingDecoder(mimi) for _ in range(b)] for b in sizes}
    together = {b: [StreamingDecoder(mimi) for _ in range(b)] for b in sizes}
    first_call = {}
    for b in sizes:  # the warm-up, batched (the same floats as alone, and faster)
        for t in range(warmup):
            frame = rng.integers(0, cfg.quantizer.bins, size=(b, cfg.num_codebooks))
            start = time.perf_counter()
            decode_together(together[b], frame)
            if t == 0:
                first_call[b] = time.perf_counter() - start
            decode_together(alone[b], frame)
    times: dict[int, dict[str, list[float]]] = {b: {"alone": [], "together": [], "restack": []} for b in sizes}
    difference = dict.fromkeys(sizes, 0.0)
    settle = 3  # the first frames after the warm-up copy each single stream out of its warm-up batch
    for t in range(settle + frames):
        for b in sizes:
            frame = rng.integers(0, cfg.quantizer.bins, size=(b, cfg.num_codebooks))
            # alternate which goes first, so that both see the same drift of the machine's load
            for method in ("alone", "together") if t % 2 else ("together", "alone"):
                start = time.perf_counter()
                if method == "alone":
                    single = np.stack([decoder.step(codes) for decoder, codes in zip(alone[b], frame, strict=True)])
                else:
                    batched = decode_together(together[b], frame)
                if t >= settle:
                    times[b][method].append(time.perf_counter() - start)
            if t >= settle:
                difference[b] = max(difference[b], float(np.abs(batched - single).max()))
    for b in sizes:  # apart from the timed frames, whose caches its copies would disturb
        for _ in range(10):
            start = time.perf_counter()
            states = [d.snapshot().state for d in together[b]]
            assert all(state is not None for state in states)  # every one has decoded frames by now
            restacked = stack_decoder_states([s for s in states if s is not None], mimi.upsample.stride)
            mx.eval(restacked)
            times[b]["restack"].append(time.perf_counter() - start)
            del restacked
    result = CodecBatchResult(name, frames, warmup)
    for b in sizes:
        alone_ms, together_ms = _median_ms(times[b]["alone"]), _median_ms(times[b]["together"])
        result.timings.append(
            BatchTiming(
                b,
                alone_ms,
                together_ms,
                round(alone_ms / together_ms, 2),
                round(together_ms / b, 2),
                _median_ms(times[b]["restack"]) if b > 1 else 0.0,
                round(1000 * first_call[b], 1) if warmup else 0.0,
                difference[b],
            )
        )
    return result


def format_result(r: CodecBatchResult) -> str:
    lines = [
        f"codec {r.codec}: B streams in one batched decode against B single decodes "
        f"({r.frames} timed frames each, after {r.warmup}; medians, ms per frame of all B streams)",
        "  streams   alone  together  speedup  per stream  restack  first call  max |difference|",
    ]
    for t in r.timings:
        lines.append(
            f"  {t.streams:7d} {t.alone_ms:7.2f} {t.together_ms:9.2f} {t.speedup:7.2f}x {t.per_stream_ms:11.2f} "
            f"{t.restack_ms:8.2f} {t.first_call_ms:11.1f} {t.max_abs_difference:17.3g}"
        )
    return "\n".join(lines)
