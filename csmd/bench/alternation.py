"""Frames of several models timed in turns in one process, a few frames each turn: a busy machine's swings
then fall on every model alike, so the ratios of their times hold where separate runs' do not.

Each model keeps its own stream: a backbone cache prefilled with the same context (`frame.prompt_rows`),
and the frame it sampled last, which its next backbone step reads, as in `csmd bench frame`.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from csmd.bench.frame import prompt_rows
from csmd.model.csm import CSM
from csmd.model.generator import audio_rows
from csmd.model.llama import KVCache
from csmd.model.sampling import FrameSampler, GenerationParams

FRAMES_PER_TURN = 4  # the first of each turn is not timed: it follows another model's weights through the caches
CONTEXT_ROWS = 300  # rows prefilled before the frames, as `csmd bench frame` does by default


@dataclass
class FrameTimes:
    backbone_ms: float  # medians over the timed frames
    decoder_ms: float
    frame_ms: float
    frames: int


@dataclass
class _Stream:
    model: CSM
    cache: KVCache
    frame: np.ndarray
    backbone: list[float]
    decoder: list[float]


def time_in_turns(models: Sequence[CSM], rounds: int, context_rows: int = CONTEXT_ROWS) -> list[FrameTimes]:
    """`rounds` turns of FRAMES_PER_TURN frames for each model in order; the medians of each model's frames."""
    if rounds < 1:
        raise ValueError(f"time at least one turn, not {rounds}")
    params = GenerationParams()
    streams = []
    for model in models:
        window = model.config.backbone.max_seq_len
        if context_rows + rounds * FRAMES_PER_TURN > window:
            raise ValueError(f"{context_rows} rows of context and {rounds} turns do not fit the window of {window}")
        cache = model.make_backbone_cache()
        tokens, mask = prompt_rows(model, context_rows, np.random.default_rng(0))
        mx.eval(model.backbone_step(tokens, mask, cache), *cache.state())
        frame = np.ones(model.config.num_codebooks, dtype=np.int32)
        streams.append(_Stream(model, cache, frame, [], []))
    for turn in range(rounds):
        for stream in streams:
            for i in range(FRAMES_PER_TURN):
                backbone, decoder = _frame(stream, params, turn * FRAMES_PER_TURN + i)
                if i:
                    stream.backbone.append(backbone)
                    stream.decoder.append(decoder)
    return [
        FrameTimes(
            backbone_ms=round(1000 * statistics.median(s.backbone), 2),
            decoder_ms=round(1000 * statistics.median(s.decoder), 2),
            frame_ms=round(1000 * statistics.median(b + d for b, d in zip(s.backbone, s.decoder, strict=True)), 2),
            frames=len(s.backbone),
        )
        for s in streams
    ]


def _frame(stream: _Stream, params: GenerationParams, index: int) -> tuple[float, float]:
    """One frame of `stream`: (backbone seconds, depth-decoder seconds)."""
    model = stream.model
    tokens, mask = audio_rows(stream.frame[None])
    start = time.perf_counter()
    hidden = model.backbone_step(mx.array(tokens[None]), mx.array(mask[None]), stream.cache)
    mx.eval(hidden, *stream.cache.state())
    middle = time.perf_counter()
    pick = FrameSampler(params, model.config.audio_codebook_size, seed=0, frame=index)
    codes = model.decode_frame(hidden, pick(model.codebook0_logits(hidden), 0), pick)
    mx.eval(codes)
    end = time.perf_counter()
    stream.frame = np.array(codes[0], dtype=np.int32)
    return middle - start, end - middle
