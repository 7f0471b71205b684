"""`csmd bench codec`: Mimi's streaming decode and encode, ms per 80 ms frame, optionally beside Kyutai's
PyTorch Mimi (moshi) streaming decode measured in the same run.

Random weights of the real shapes: the work per frame is what it is with the released weights.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import numpy as np

from csmd.audio.mimi.model import Mimi, StreamingDecoder, StreamingEncoder


@dataclass
class CodecBenchResult:
    codec: str
    frames: int
    decode_ms: float  # medians over the timed frames
    encode_ms: float
    moshi_decode_ms: float | None  # moshi's streaming decode, same machine, same run
    moshi_threads: int | None

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _median_ms(times: list[float]) -> float:
    return round(1000 * statistics.median(times), 2)


def run(mimi: Mimi, name: str, frames: int = 50, warmup: int = 5, compare_moshi: bool = False) -> CodecBenchResult:
    cfg = mimi.config
    rng = np.random.default_rng(0)
    codes = rng.integers(0, cfg.quantizer.bins, size=(cfg.num_codebooks, warmup + frames))
    decoder = StreamingDecoder(mimi)
    decode_times, pcm = [], []
    for t in range(warmup + frames):
        start = time.perf_counter()
        pcm.append(decoder.step(codes[:, t]))
        if t >= warmup:
            decode_times.append(time.perf_counter() - start)

    audio = np.concatenate(pcm)
    audio = (audio / max(float(np.abs(audio).max()), 1e-6)).astype(np.float32)
    encoder = StreamingEncoder(mimi)
    encode_times = []
    for t in range(warmup + frames):
        start = time.perf_counter()
        encoder.step(audio[t * cfg.frame_size : (t + 1) * cfg.frame_size])
        if t >= warmup:
            encode_times.append(time.perf_counter() - start)

    moshi_ms, threads = (None, None)
    if compare_moshi:
        moshi_ms, threads = _moshi_decode_ms(codes, warmup)
    return CodecBenchResult(name, frames, _median_ms(decode_times), _median_ms(encode_times), moshi_ms, threads)


def _moshi_decode_ms(codes: np.ndarray, warmup: int) -> tuple[float, int]:
    """moshi's full-size Mimi (random weights) decoding the same frames in streaming mode, fp32 CPU."""
    try:
        import torch
        from moshi.models import loaders
    except ImportError as exc:
        raise RuntimeError("--compare-moshi needs torch and moshi (the test extras; see README)") from exc
    if codes.shape[0] != 32:
        raise ValueError("--compare-moshi times the full-size codec (32 codebooks)")
    model = loaders.get_mimi(None, device="cpu", num_codebooks=32).eval()
    times = []
    with torch.no_grad(), model.streaming(1):
        for t in range(codes.shape[1]):
            frame = torch.tensor(codes[None, :, t : t + 1])
            start = time.perf_counter()
            model.decode(frame)
            if t >= warmup:
                times.append(time.perf_counter() - start)
    return _median_ms(times), torch.get_num_threads()


def format_result(r: CodecBenchResult) -> str:
    lines = [
        f"codec {r.codec}  ({r.frames} timed frames of 80 ms)",
        f"  streaming decode  {r.decode_ms:8.2f} ms / frame (median)",
        f"  streaming encode  {r.encode_ms:8.2f} ms / frame (median)",
    ]
    if r.moshi_decode_ms is not None:
        ratio = r.moshi_decode_ms / r.decode_ms
        lines.append(
            f"  moshi (PyTorch) streaming decode {r.moshi_decode_ms:8.2f} ms / frame "
            f"({r.moshi_threads} threads); csmd is {ratio:.2f}x its speed"
        )
    return "\n".join(lines)
