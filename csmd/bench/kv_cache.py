"""`csmd bench kv-cache`: what a bf16 backbone KV cache does to the frames, and what it saves per session.

The model with an fp32 cache (the reference) samples `frames` frames after a long context of `context_rows`
rows (half text, half audio, as `bench frame` prefills them), keeping each frame's backbone state. The same
rows then run again over a bf16 cache, teacher-forced on the reference's codes, as a conversation runs them:
the context prefilled in chunks (the MLX ops, which store the keys and values rounded), then one fused step
per frame row (which reads them widened). Each backbone state gives the logits of codebook 0, and the depth
decoder's logits of codebooks 1..N-1 on the reference's codes (`CSM.teacher_forced_decoder_logits`, the same
pass for both caches). The weights are the same: what differs is the cache alone. The figures are those of
`bench precision` (KL, top-1 and top-5 agreement, over the codes Mimi can decode); on random weights they are
a proxy for quality, not a measure of it.

Per session: the bytes of a full-window cache, and the RSS it adds to the process once allocated and written
(every position, as a conversation's cache is when it is made). Nothing here is timed: `native/bench_kernels.py
--attention` and `--batch --against` time the step over either cache.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import mlx.core as mx
import numpy as np

from csmd.bench.frame import prompt_rows
from csmd.bench.memory import rss_mb
from csmd.bench.precision import DECODER_BATCH, Divergence, divergence, entropy
from csmd.model.csm import CSM
from csmd.model.generator import PREFILL_CHUNK, audio_rows
from csmd.model.llama import KVCache
from csmd.model.sampling import FrameSampler, GenerationParams
from csmd.runtime import release_memory


@dataclass
class CacheRun:
    kv_cache: str  # the cache's dtype
    cache_mb: float  # its keys and values over the whole window (MB: 10^6 bytes)
    session_rss_mb: float  # the RSS that allocating and writing it added (MB)


@dataclass
class KVCacheBenchResult:
    model: str
    dtype: str
    device: str
    context_rows: int
    frames: int
    window: int  # the positions every cache holds
    codebooks: int
    reference: CacheRun  # fp32
    bf16: CacheRun
    codebook0: Divergence  # bf16 against fp32: the backbone's head, one row per frame
    depth: Divergence  # codebooks 1..N-1, N-1 rows per frame
    codebook0_entropy: float  # the reference's mean entropy per row, nats (see bench precision)
    depth_entropy: float
    flat_entropy: float

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def new_session_cache(model: CSM, dtype: mx.Dtype) -> tuple[KVCache, float]:
    """A full-window backbone cache in `dtype`, materialised (every position written, as MLX fills zeros), and
    the RSS it added to the process, in MB."""
    release_memory()  # earlier buffers back to the system, so that none is reused for this one
    before = rss_mb()
    cache = model.make_backbone_cache(dtype=dtype)
    mx.eval(*cache.state())
    return cache, (rss_mb() - before) * 2**20 / 1e6  # rss_mb counts MiB


def prefill(model: CSM, tokens: mx.array, mask: mx.array, cache: KVCache) -> mx.array:
    """The context's rows in chunks, as a conversation catches up; the last row's backbone state."""
    hidden = None
    for start in range(0, tokens.shape[1], PREFILL_CHUNK):
        rows = slice(start, start + PREFILL_CHUNK)
        hidden = model.backbone_step(tokens[:, rows], mask[:, rows], cache)
        mx.eval(hidden, *cache.state())
    assert hidden is not None
    return hidden


def step(model: CSM, frame: np.ndarray, cache: KVCache) -> mx.array:
    """The backbone state after one frame's row (the fused step where it runs, as in a conversation)."""
    tokens, mask = audio_rows(frame[None])
    hidden = model.backbone_step(mx.array(tokens[None]), mx.array(mask[None]), cache)
    mx.eval(hidden, *cache.state())
    return hidden


def logits(model: CSM, states: list[mx.array], codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Codebook-0 logits [F, C] of the frames' states, and the depth decoder's [F, N-1, C] on their codes."""
    size = model.config.audio_codebook_size
    hidden = mx.concatenate(states)
    codebook0 = np.array(model.codebook0_logits(hidden)[:, :size])
    depth = []
    for start in range(0, len(codes), DECODER_BATCH):
        chunk = slice(start, start + DECODER_BATCH)
        depth.append(np.array(model.teacher_forced_decoder_logits(hidden[chunk], mx.array(codes[chunk]))[..., :size]))
    return codebook0, np.concatenate(depth)


def _dtype_name(dtype: mx.Dtype) -> str:
    return str(dtype).removeprefix("mlx.core.")


def run(
    model: CSM,
    name: str,
    context_rows: int = 1500,
    frames: int = 300,
    seed: int = 0,
    say: Callable[[str], None] = lambda _: None,
    compared: mx.Dtype = mx.bfloat16,
) -> KVCacheBenchResult:
    """Generate with an fp32 cache, score a bf16 one on the same rows; `say` hears each stage. `compared`: the
    scored cache's dtype (fp32 replays the reference's own steps: the tests' check of the teacher forcing)."""
    cfg = model.config
    window = cfg.backbone.max_seq_len
    if context_rows < 1 or frames < 1 or context_rows + frames > window:
        raise ValueError(f"the context rows and the frames must fit the model's window of {window}")
    tokens, mask = prompt_rows(model, context_rows, np.random.default_rng(seed))
    params = GenerationParams()

    say(f"fp32 cache: prefilling {context_rows} rows, then sampling {frames} frames")
    cache, rss = new_session_cache(model, mx.float32)
    hidden = prefill(model, tokens, mask, cache)
    states: list[mx.array] = []
    codes: list[np.ndarray] = []
    for i in range(frames):
        states.append(hidden)
        pick = FrameSampler(params, cfg.audio_codebook_size, seed=seed, frame=i)
        frame = model.decode_frame(hidden, pick(model.codebook0_logits(hidden), 0), pick)
        codes.append(np.array(frame[0], dtype=np.int32))
        if i + 1 < frames:
            hidden = step(model, codes[-1], cache)
    reference = CacheRun("float32", round(2 * cache.keys.nbytes / 1e6, 1), round(rss, 1))
    del cache
    want0, want_depth = logits(model, states, np.stack(codes))

    say(f"{_dtype_name(compared)} cache: the same {context_rows} rows and {frames} frames, teacher-forced")
    cache, rss = new_session_cache(model, compared)
    hidden = prefill(model, tokens, mask, cache)
    states = []
    for i in range(frames):
        states.append(hidden)
        if i + 1 < frames:
            hidden = step(model, codes[i], cache)
    bf16 = CacheRun(_dtype_name(compared), round(2 * cache.keys.nbytes / 1e6, 1), round(rss, 1))
    del cache
    got0, got_depth = logits(model, states, np.stack(codes))
    return KVCacheBenchResult(
        model=name,
        dtype=_dtype_name(model.activation_dtype()),
        device=str(mx.default_device()),
        context_rows=context_rows,
        frames=frames,
        window=window,
        codebooks=cfg.num_codebooks,
        reference=reference,
        bf16=bf16,
        codebook0=divergence(want0, got0),
        depth=divergence(want_depth, got_depth),
        codebook0_entropy=entropy(want0),
        depth_entropy=entropy(want_depth),
        flat_entropy=round(float(np.log(cfg.audio_codebook_size)), 4),
    )


def format_result(r: KVCacheBenchResult) -> str:
    depth = f"codebooks 1-{r.codebooks - 1}"
    lines = [
        f"model {r.model}  dtype {r.dtype}  device {r.device}",
        f"  {r.frames} frames sampled with an fp32 cache after {r.context_rows} rows of context; the bf16 cache "
        "scored on those rows, teacher-forced",
        f"  {'cache':<9} {'MB/session':>10} {'RSS MB':>7} | {'codebook 0: KL':>14} {'p95':>7} "
        f"{'top1':>5} {'top5':>5} | {depth + ': KL':>18} {'p95':>7} {'top1':>5} {'top5':>5}",
    ]
    for run, div in ((r.reference, None), (r.bf16, (r.codebook0, r.depth))):
        row = f"  {run.kv_cache:<9} {run.cache_mb:10.1f} {run.session_rss_mb:7.1f} |"
        if div is not None:
            c, d = div
            row += (
                f" {c.kl:14.6f} {c.kl_p95:7.5f} {c.top1:5.3f} {c.top5:5.3f} |"
                f" {d.kl:18.6f} {d.kl_p95:7.5f} {d.top1:5.3f} {d.top5:5.3f}"
            )
        lines.append(row)
    lines += [
        f"  MB/session: keys and values over the window of {r.window} positions; RSS: what allocating and writing "
        "them added",
        "  KL(fp32 || bf16) in nats per row (mean, 95th percentile); top1: the same most likely code; top5: share "
        "of fp32's 5 most likely codes among bf16's 5",
        f"  the reference's entropy: codebook 0 {r.codebook0_entropy:.3f}, {depth} {r.depth_entropy:.3f} nats "
        f"(flat: {r.flat_entropy:.3f}); on random weights these figures are a proxy for quality, not a measure of it",
    ]
    return "\n".join(lines)
