"""`csmd bench frame`: how long one 80 ms frame takes (backbone step, depth decoder, total), and a prefill.

Random weights time exactly like real ones (same shapes, same work); they just do not speak. Each frame is
split at the backbone/decoder boundary with an explicit evaluation, so the parts add up to the total.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import mlx.core as mx
import numpy as np

from csmd.model.csm import CSM
from csmd.model.generator import audio_rows, text_rows
from csmd.model.sampling import FRAME_MS, GenerationParams, sample, sampling_key


@dataclass
class FrameBenchResult:
    model: str
    dtype: str
    device: str
    frames: int
    backbone_ms: float  # medians over the timed frames
    decoder_ms: float
    frame_ms: float
    real_time_factor: float  # frame time / 80 ms; below 1 is faster than real time
    prefill_rows: int
    prefill_ms: float  # median over repeats, fresh cache each time
    context_rows: int  # rows already in the cache while frames were timed

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _prompt_rows(model: CSM, rows: int, rng: np.random.Generator) -> tuple[mx.array, mx.array]:
    """Half text, half audio frames: the mix a real conversation prefills."""
    cfg = model.config
    n_text = rows // 2
    text = text_rows(rng.integers(0, cfg.text_vocab_size, size=n_text), cfg.num_codebooks)
    audio = audio_rows(rng.integers(1, cfg.audio_codebook_size, size=(rows - n_text, cfg.num_codebooks)))
    tokens = np.concatenate([text[0], audio[0]])[None]
    mask = np.concatenate([text[1], audio[1]])[None]
    return mx.array(tokens), mx.array(mask)


def _evaluate_cache(cache: list) -> None:
    mx.eval(*[a for layer in cache for a in layer.state()])


def run(
    model: CSM,
    name: str,
    frames: int = 20,
    warmup: int = 3,
    prefill_rows: int = 300,
    prefill_repeats: int = 3,
) -> FrameBenchResult:
    rng = np.random.default_rng(0)
    params = GenerationParams()
    cfg = model.config
    window = cfg.backbone.max_seq_len
    if prefill_rows < 1 or prefill_rows + warmup + frames > window:
        raise ValueError(f"prefill rows + warmup + frames must fit the model's window of {window} rows")

    prefill_times = []
    for _ in range(prefill_repeats):
        cache = model.make_backbone_cache()
        tokens, mask = _prompt_rows(model, prefill_rows, rng)
        mx.eval(tokens, mask)
        start = time.perf_counter()
        hidden = model.backbone_step(tokens, mask, cache)
        mx.eval(hidden)
        _evaluate_cache(cache)
        prefill_times.append(time.perf_counter() - start)

    decoder_cache = model.make_decoder_cache()
    backbone_times, decoder_times = [], []
    frame = np.ones(cfg.num_codebooks, dtype=np.int32)
    for i in range(warmup + frames):
        step_tokens, step_mask = audio_rows(frame[None])
        start = time.perf_counter()
        hidden = model.backbone_step(mx.array(step_tokens[None]), mx.array(step_mask[None]), cache)
        mx.eval(hidden)
        _evaluate_cache(cache)
        middle = time.perf_counter()

        def pick(logits: mx.array, codebook: int, i: int = i) -> mx.array:
            return sample(logits, params, cfg.audio_codebook_size, sampling_key(0, i, codebook))

        codes = model.decode_frame(hidden, pick(model.codebook0_logits(hidden), 0), pick, decoder_cache)
        mx.eval(codes)
        end = time.perf_counter()
        frame = np.array(codes[0], dtype=np.int32)
        if i >= warmup:
            backbone_times.append(middle - start)
            decoder_times.append(end - middle)

    backbone_ms = 1000 * statistics.median(backbone_times)
    decoder_ms = 1000 * statistics.median(decoder_times)
    frame_ms = 1000 * statistics.median(b + d for b, d in zip(backbone_times, decoder_times, strict=True))
    return FrameBenchResult(
        model=name,
        dtype=str(model.activation_dtype()).removeprefix("mlx.core."),
        device=str(mx.default_device()),
        frames=frames,
        backbone_ms=round(backbone_ms, 2),
        decoder_ms=round(decoder_ms, 2),
        frame_ms=round(frame_ms, 2),
        real_time_factor=round(frame_ms / FRAME_MS, 3),
        prefill_rows=prefill_rows,
        prefill_ms=round(1000 * statistics.median(prefill_times), 1),
        context_rows=prefill_rows,
    )


def format_result(r: FrameBenchResult) -> str:
    verdict = "faster" if r.real_time_factor < 1 else "slower"
    return "\n".join(
        [
            f"model {r.model}  dtype {r.dtype}  device {r.device}",
            f"  {r.frames} timed frames after {r.context_rows} rows of context",
            f"  backbone step   {r.backbone_ms:9.2f} ms / frame (median)",
            f"  depth decoder   {r.decoder_ms:9.2f} ms / frame (median)",
            f"  total           {r.frame_ms:9.2f} ms / frame (median)",
            f"  real-time factor {r.real_time_factor:.3f} ({verdict} than real time; frame = {FRAME_MS} ms)",
            f"  prefill {r.prefill_rows} rows  {r.prefill_ms:9.1f} ms (median)",
        ]
    )
