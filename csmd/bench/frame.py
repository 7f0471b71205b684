"""`csmd bench frame`: how long one 80 ms frame takes (backbone step, depth decoder, total), and a prefill.

Random weights time exactly like real ones (same shapes, same work); they just do not speak. Each frame is
split at the backbone/decoder boundary with an explicit evaluation, so the parts add up to the total.

Beside the times, the floors: a batch-1 frame must read its weights (`budget.frame_budget`), so it can be no
faster than bytes / the DRAM bandwidth measured in the same run; a prefill is compute-bound, so its FLOP rate
is set against the machine's measured fp32 GEMM rate (`machine.measure`).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field

import mlx.core as mx
import numpy as np

from csmd.bench.budget import frame_budget, prefill_flops
from csmd.bench.machine import MachineRates, measure
from csmd.bench.transformers_frame import TransformersFrameResult
from csmd.model.csm import CSM
from csmd.model.generator import audio_rows, text_rows
from csmd.model.llama import KVCache
from csmd.model.sampling import FRAME_MS, FrameSampler, GenerationParams


@dataclass
class FrameBenchResult:
    model: str
    dtype: str
    device: str
    kv_cache: str  # the backbone KV cache's dtype
    frames: int
    backbone_ms: float  # medians over the timed frames
    decoder_ms: float
    frame_ms: float
    real_time_factor: float  # frame time / 80 ms; below 1 is faster than real time
    prefill_rows: int
    prefill_ms: float  # median over repeats, fresh cache each time
    context_rows: int  # rows already in the cache while frames were timed
    bytes_per_frame: int  # weights (and KV cache) one frame must read; see budget.py
    bandwidth_gbs: float  # DRAM read bandwidth measured in this run
    floor_ms: float  # bytes_per_frame / bandwidth: no frame can be faster
    floor_ratio: float  # frame_ms / floor_ms; 1 is the bandwidth limit
    prefill_gflop: float  # FLOPs of the prefill (budget.prefill_flops)
    prefill_gflops: float  # its rate
    gemm_gflops: float  # fp32 GEMM rate measured in this run
    prefill_gemm_ratio: float  # prefill_gflops / gemm_gflops; 1 is the machine's matmul rate
    machine: dict[str, object] = field(default_factory=dict)  # every measurement of machine.measure
    transformers: dict[str, object] | None = None  # the same frame on transformers (compare_transformers)
    transformers_frame_ratio: float | None = None  # csmd frame_ms / transformers frame_ms
    transformers_prefill_ratio: float | None = None  # csmd prefill_ms / transformers prefill_ms

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def prompt_rows(model: CSM, rows: int, rng: np.random.Generator) -> tuple[mx.array, mx.array]:
    """Half text, half audio frames: the mix a real conversation prefills."""
    cfg = model.config
    n_text = rows // 2
    text = text_rows(rng.integers(0, cfg.text_vocab_size, size=n_text), cfg.num_codebooks)
    audio = audio_rows(rng.integers(1, cfg.audio_codebook_size, size=(rows - n_text, cfg.num_codebooks)))
    tokens = np.concatenate([text[0], audio[0]])[None]
    mask = np.concatenate([text[1], audio[1]])[None]
    return mx.array(tokens), mx.array(mask)


def _evaluate_cache(cache: KVCache) -> None:
    mx.eval(*cache.state())


def run(
    model: CSM,
    name: str,
    frames: int = 20,
    warmup: int = 3,
    prefill_rows: int = 300,
    prefill_repeats: int = 3,
    machine: MachineRates | None = None,
    kv_dtype: mx.Dtype | None = None,
) -> FrameBenchResult:
    """Time frames after a `prefill_rows` prefill; `machine` defaults to measuring this machine now; the
    backbone cache in `kv_dtype` (`CSM.make_backbone_cache`)."""
    rng = np.random.default_rng(0)
    params = GenerationParams()
    cfg = model.config
    window = cfg.backbone.max_seq_len
    if prefill_rows < 1 or prefill_rows + warmup + frames > window:
        raise ValueError(f"prefill rows + warmup + frames must fit the model's window of {window} rows")
    machine = machine or measure()

    prefill_times = []
    for _ in range(prefill_repeats):
        cache = model.make_backbone_cache(dtype=kv_dtype)
        tokens, mask = prompt_rows(model, prefill_rows, rng)
        mx.eval(tokens, mask)
        start = time.perf_counter()
        hidden = model.backbone_step(tokens, mask, cache)
        mx.eval(hidden)
        _evaluate_cache(cache)
        prefill_times.append(time.perf_counter() - start)

    backbone_times, decoder_times = [], []
    frame = np.ones(cfg.num_codebooks, dtype=np.int32)
    for i in range(warmup + frames):
        step_tokens, step_mask = audio_rows(frame[None])
        start = time.perf_counter()
        hidden = model.backbone_step(mx.array(step_tokens[None]), mx.array(step_mask[None]), cache)
        mx.eval(hidden)
        _evaluate_cache(cache)
        middle = time.perf_counter()

        pick = FrameSampler(params, cfg.audio_codebook_size, seed=0, frame=i)
        codes = model.decode_frame(hidden, pick(model.codebook0_logits(hidden), 0), pick)
        mx.eval(codes)
        end = time.perf_counter()
        frame = np.array(codes[0], dtype=np.int32)
        if i >= warmup:
            backbone_times.append(middle - start)
            decoder_times.append(end - middle)

    backbone_ms = 1000 * statistics.median(backbone_times)
    decoder_ms = 1000 * statistics.median(decoder_times)
    frame_ms = 1000 * statistics.median(b + d for b, d in zip(backbone_times, decoder_times, strict=True))
    prefill_ms = 1000 * statistics.median(prefill_times)
    # Counted at the first timed frame's context; the KV cache is < 0.2 % of the bytes at csm-1b size.
    budget = frame_budget(model, prefill_rows + warmup, cache.dtype)
    floor_ms = budget.total_bytes / (machine.bandwidth_gbs * 1e9) * 1000
    flops = prefill_flops(cfg, prefill_rows)
    prefill_gflops = flops / 1e9 / (prefill_ms / 1000)
    return FrameBenchResult(
        model=name,
        dtype=str(model.activation_dtype()).removeprefix("mlx.core."),
        device=str(mx.default_device()),
        kv_cache=str(cache.dtype).removeprefix("mlx.core."),
        frames=frames,
        backbone_ms=round(backbone_ms, 2),
        decoder_ms=round(decoder_ms, 2),
        frame_ms=round(frame_ms, 2),
        real_time_factor=round(frame_ms / FRAME_MS, 3),
        prefill_rows=prefill_rows,
        prefill_ms=round(prefill_ms, 1),
        context_rows=prefill_rows,
        bytes_per_frame=budget.total_bytes,
        bandwidth_gbs=machine.bandwidth_gbs,
        floor_ms=round(floor_ms, 3),
        floor_ratio=round(frame_ms / floor_ms, 2),
        prefill_gflop=round(flops / 1e9, 3),
        prefill_gflops=round(prefill_gflops, 2),
        gemm_gflops=machine.gemm_gflops,
        prefill_gemm_ratio=round(prefill_gflops / machine.gemm_gflops, 3),
        machine=machine.as_dict(),
    )


def add_comparison(r: FrameBenchResult, theirs: TransformersFrameResult) -> FrameBenchResult:
    """Attach transformers' times for the same frame, measured in the same run, and csmd / transformers."""
    r.transformers = theirs.as_dict()
    r.transformers_frame_ratio = round(r.frame_ms / theirs.frame_ms, 3)
    r.transformers_prefill_ratio = round(r.prefill_ms / theirs.prefill_ms, 3)
    return r


def format_result(r: FrameBenchResult) -> str:
    verdict = "faster" if r.real_time_factor < 1 else "slower"
    m = r.machine
    lines = [
        f"model {r.model}  dtype {r.dtype}  device {r.device}  KV cache {r.kv_cache}",
        f"  {r.frames} timed frames after {r.context_rows} rows of context",
        f"  backbone step   {r.backbone_ms:9.2f} ms / frame (median)",
        f"  depth decoder   {r.decoder_ms:9.2f} ms / frame (median)",
        f"  total           {r.frame_ms:9.2f} ms / frame (median)",
        f"  real-time factor {r.real_time_factor:.3f} ({verdict} than real time; frame = {FRAME_MS} ms)",
        f"  prefill {r.prefill_rows} rows  {r.prefill_ms:9.1f} ms (median)",
        f"machine: DRAM read {r.bandwidth_gbs:.1f} GB/s (best of numpy dot {m.get('read_numpy_dot_gbs')}, "
        f"MLX matvec {m.get('read_mlx_matvec_gbs')}, mx.sum {m.get('read_mlx_sum_gbs')}); "
        f"fp32 GEMM {r.gemm_gflops:.1f} GFLOP/s (numpy {m.get('gemm_numpy_gflops')})",
        f"  bytes per frame {r.bytes_per_frame / 1e9:9.3f} GB  floor {r.floor_ms:9.2f} ms  "
        f"measured {r.frame_ms:9.2f} ms  ratio {r.floor_ratio:.2f}x the floor",
        f"  prefill {r.prefill_gflop:.1f} GFLOP at {r.prefill_gflops:.1f} GFLOP/s = "
        f"{r.prefill_gemm_ratio:.3f} of the GEMM rate",
    ]
    t = r.transformers
    if t is not None:
        lines += [
            f"transformers CsmForConditionalGeneration, torch {t['dtype']}, {t['threads']} threads, same run:",
            f"  backbone step   {t['backbone_ms']:9.2f} ms / frame (median)",
            f"  depth decoder   {t['decoder_ms']:9.2f} ms / frame (median)",
            f"  total           {t['frame_ms']:9.2f} ms / frame (median)",
            f"  prefill {t['prefill_rows']} rows  {t['prefill_ms']:9.1f} ms (median)",
            f"  csmd / transformers: frame {r.transformers_frame_ratio:.3f}  "
            f"prefill {r.transformers_prefill_ratio:.3f}",
        ]
    return "\n".join(lines)
