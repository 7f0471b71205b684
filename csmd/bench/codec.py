"""`csmd bench codec`: Mimi's streaming decode and encode, ms per 80 ms frame, optionally beside Kyutai's
PyTorch Mimi (moshi) streaming decode measured in the same run, frame for frame interleaved with csmd's.

Random weights of the real shapes: the work per frame is what it is with the released weights. Beside the
decode time, its floor: what a frame must read and compute (`codec_budget.decode_budget`) at the DRAM
bandwidth and GEMM rate measured in the same run (`machine.measure`).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from csmd.audio.mimi.model import Mimi, StreamingDecoder, StreamingEncoder
from csmd.bench.codec_budget import decode_budget
from csmd.bench.machine import MachineRates, measure


@dataclass
class CodecBenchResult:
    codec: str
    frames: int
    decode_ms: float  # medians over the timed frames
    encode_ms: float
    moshi_decode_ms: float | None  # moshi's streaming decode, same machine, same run
    moshi_threads: int | None
    decode_min_ms: float | None = None  # fastest frames: what the code can do when nothing else competes
    encode_min_ms: float | None = None
    moshi_decode_min_ms: float | None = None
    bytes_per_frame: int = 0  # what a decoded frame reads (codec_budget.decode_budget)
    gemm_mflop_per_frame: float = 0.0  # its many-row products
    bandwidth_gbs: float = 0.0  # DRAM read bandwidth measured in this run
    gemm_gflops: float = 0.0  # fp32 GEMM rate measured in this run
    floor_ms: float = 0.0  # the reading at that bandwidth plus the products at that rate
    floor_ratio: float = 0.0  # decode_ms / floor_ms; 1 is the machine's limit

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _median_ms(times: list[float]) -> float:
    return round(1000 * statistics.median(times), 2)


def _min_ms(times: list[float]) -> float:
    return round(1000 * min(times), 2)


def steady_state_frames(mimi: Mimi) -> int:
    """Frames that fill the transformers' attention window (plus a few): a stream's steady state, which a
    long conversation is in; earlier frames attend to fewer steps and run faster. 130 for the full codec."""
    steps_per_frame = mimi.upsample.stride
    return math.ceil((mimi.config.transformer.context - 1) / steps_per_frame) + 5


def run(
    mimi: Mimi,
    name: str,
    frames: int = 50,
    warmup: int | None = None,
    compare_moshi: bool = False,
    machine: MachineRates | None = None,
) -> CodecBenchResult:
    """Time the streams after `warmup` untimed frames (default: `steady_state_frames`); `machine` defaults to
    measuring this machine now."""
    machine = machine or measure()
    warmup = steady_state_frames(mimi) if warmup is None else warmup
    cfg = mimi.config
    rng = np.random.default_rng(0)
    codes = rng.integers(0, cfg.quantizer.bins, size=(cfg.num_codebooks, warmup + frames))
    # moshi decodes the same frames interleaved with csmd's, so both see the same machine load.
    moshi_step, threads = _moshi_decoder(codes) if compare_moshi else (None, None)
    decoder = StreamingDecoder(mimi)
    decode_times, moshi_times, pcm = [], [], []
    for t in range(warmup + frames):
        start = time.perf_counter()
        pcm.append(decoder.step(codes[:, t]))
        if t >= warmup:
            decode_times.append(time.perf_counter() - start)
        if moshi_step is not None:
            start = time.perf_counter()
            moshi_step(t)
            if t >= warmup:
                moshi_times.append(time.perf_counter() - start)

    audio = np.concatenate(pcm)
    audio = (audio / max(float(np.abs(audio).max()), 1e-6)).astype(np.float32)
    encoder = StreamingEncoder(mimi)
    encode_times = []
    for t in range(warmup + frames):
        start = time.perf_counter()
        encoder.step(audio[t * cfg.frame_size : (t + 1) * cfg.frame_size])
        if t >= warmup:
            encode_times.append(time.perf_counter() - start)

    budget = decode_budget(mimi)
    floor_ms = budget.floor_ms(machine.bandwidth_gbs, machine.gemm_gflops)
    decode_ms = _median_ms(decode_times)
    return CodecBenchResult(
        name,
        frames,
        decode_ms,
        _median_ms(encode_times),
        _median_ms(moshi_times) if moshi_times else None,
        threads,
        decode_min_ms=_min_ms(decode_times),
        encode_min_ms=_min_ms(encode_times),
        moshi_decode_min_ms=_min_ms(moshi_times) if moshi_times else None,
        bytes_per_frame=budget.total_bytes,
        gemm_mflop_per_frame=round(budget.gemm_flops / 1e6, 1),
        bandwidth_gbs=machine.bandwidth_gbs,
        gemm_gflops=machine.gemm_gflops,
        floor_ms=round(floor_ms, 5),  # the tiny codec's floor is ~0.05 ms: 3 decimals would be 1% off
        floor_ratio=round(decode_ms / floor_ms, 2),
    )


def _moshi_decoder(codes: np.ndarray) -> tuple[Callable[[int], None], int]:
    """moshi's full-size Mimi (random weights) in streaming mode, fp32 CPU: step(t) decodes frame t."""
    try:
        import torch
        from moshi.models import loaders
    except ImportError as exc:
        raise RuntimeError("--compare-moshi needs torch and moshi (the test extras; see README)") from exc
    if codes.shape[0] != 32:
        raise ValueError("--compare-moshi times the full-size codec (32 codebooks)")
    model = loaders.get_mimi(None, device="cpu", num_codebooks=32).eval()
    model.streaming_forever(1)

    def step(t: int) -> None:
        with torch.no_grad():
            model.decode(torch.tensor(codes[None, :, t : t + 1]))

    return step, torch.get_num_threads()


def format_result(r: CodecBenchResult) -> str:
    lines = [
        f"codec {r.codec}  ({r.frames} timed frames of 80 ms)",
        f"  streaming decode  {r.decode_ms:8.2f} ms / frame (median), fastest {r.decode_min_ms:.2f}",
        f"  streaming encode  {r.encode_ms:8.2f} ms / frame (median), fastest {r.encode_min_ms:.2f}",
        f"  decode reads {r.bytes_per_frame / 1e6:.1f} MB and computes {r.gemm_mflop_per_frame:.0f} MFLOP of GEMMs "
        f"per frame: floor {r.floor_ms:.2f} ms at {r.bandwidth_gbs} GB/s and {r.gemm_gflops} GFLOP/s, "
        f"measured {r.decode_ms:.2f} ms = {r.floor_ratio:.2f}x the floor",
    ]
    if r.moshi_decode_ms is not None:
        ratio = r.moshi_decode_ms / r.decode_ms
        lines.append(
            f"  moshi (PyTorch) streaming decode {r.moshi_decode_ms:8.2f} ms / frame (median), fastest "
            f"{r.moshi_decode_min_ms:.2f} ({r.moshi_threads} threads); csmd is {ratio:.2f}x its speed"
        )
    return "\n".join(lines)
