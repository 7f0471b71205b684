"""`csmd bench precision`: how far each quantization scheme's logits move from the float model's, and what
each scheme costs a frame in bytes.

The codes are generated once, by the float (reference) model, sampling as `csmd say` does. Every model,
the reference included, is then scored on those same rows, teacher-forced: one causal backbone pass over
the prompt and the frames gives each frame's codebook-0 logits, and one batched depth-decoder pass per
group of frames gives codebooks 1..31 (`CSM.backbone_states`, `CSM.teacher_forced_decoder_logits`). So the
schemes see identical inputs, and what differs is their weights alone. These passes run many rows at once,
so their products take the GEMM in float arithmetic: the figures leave out the int8 rounding of the
activations that the one-row kernels add in generation (CSMD_MATVEC).

Per codebook row, over the codes Mimi can decode (the ids sampling may pick): KL(reference || scheme) of
the softmax distributions, in nats; top-1 agreement (the same most likely code); top-5 agreement (the share
of the reference's 5 most likely codes that are among the scheme's 5). On random weights these are a proxy
for quality, not a measure of it: nothing here listens to the audio.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from csmd.bench.alternation import CONTEXT_ROWS, FRAMES_PER_TURN, FrameTimes, time_in_turns
from csmd.bench.budget import frame_budget
from csmd.model.csm import CSM
from csmd.model.generator import audio_rows, text_rows
from csmd.model.llama import make_cache
from csmd.model.quantization import QuantizationScheme
from csmd.model.sampling import FrameSampler, GenerationParams
from csmd.model.weights import quantize

PROMPT_ROWS = 16  # text rows before the frames: a short sentence's worth
TOP = 5  # the wider agreement figure: top-5 sets
DECODER_BATCH = 32  # frames per teacher-forced depth-decoder pass (32 rows each): bounds the activations


@dataclass
class Divergence:
    kl: float  # mean KL(reference || scheme) per row, nats
    kl_p95: float  # its 95th percentile over rows: the bad rows a mean hides
    top1: float  # share of rows whose most likely code is the reference's
    top5: float  # mean share of the reference's 5 most likely codes among the scheme's 5


@dataclass
class SchemeResult:
    scheme: str  # as --quantize takes it
    description: str
    bytes_per_frame: int  # budget.frame_budget at the scored context
    bytes_ratio: float  # bytes_per_frame / the reference's
    codebook0: Divergence  # the backbone's head, one row per frame
    depth: Divergence  # the depth decoder's codebooks 1..N-1, N-1 rows per frame
    seconds: float  # quantizing and scoring this scheme
    times: FrameTimes | None = None  # its frames timed in turns with the others' (timed_rounds)


@dataclass
class PrecisionBenchResult:
    model: str
    dtype: str  # the reference's, which the schemes are quantized from
    device: str
    frames: int
    prompt_rows: int
    codebooks: int
    # The reference's mean entropy (nats) per row, beside log(codes) for a flat distribution: how peaked the
    # logits the agreement figures rank are (the top codes of a nearly flat distribution swap easily).
    codebook0_entropy: float
    depth_entropy: float
    flat_entropy: float
    reference_bytes_per_frame: int
    generate_seconds: float  # the reference generating the codes
    schemes: list[SchemeResult]
    reference_times: FrameTimes | None = None  # timed in the same turns as the schemes (timed_rounds)
    timed_context_rows: int = 0  # the context those frames followed

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _prompt(model: CSM, rows: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    cfg = model.config
    return text_rows(rng.integers(0, cfg.text_vocab_size, size=rows), cfg.num_codebooks)


def generate_codes(model: CSM, prompt: tuple[np.ndarray, np.ndarray], frames: int, seed: int = 0) -> np.ndarray:
    """`frames` frames [frames, N] sampled by `model` after the prompt rows, with the default sampling."""
    cfg = model.config
    params = GenerationParams()
    cache = model.make_backbone_cache(max_len=len(prompt[0]) + frames)
    hidden = model.backbone_step(mx.array(prompt[0][None]), mx.array(prompt[1][None]), cache)
    codes = []
    for i in range(frames):
        pick = FrameSampler(params, cfg.audio_codebook_size, seed=seed, frame=i)
        frame = model.decode_frame(hidden, pick(model.codebook0_logits(hidden), 0), pick)
        codes.append(np.array(frame[0], dtype=np.int32))
        if i + 1 < frames:
            tokens, mask = audio_rows(codes[-1][None])
            hidden = model.backbone_step(mx.array(tokens[None]), mx.array(mask[None]), cache)
    return np.stack(codes)


def score(model: CSM, prompt: tuple[np.ndarray, np.ndarray], codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Teacher-forced logits of `codes` after `prompt`, over the decodable codes: codebook 0 [F, C] and
    codebooks 1..N-1 [F, N-1, C] (float32; C = audio_codebook_size)."""
    cfg = model.config
    size = cfg.audio_codebook_size
    frames = len(codes)
    # Frame i's codebook 0 comes from the state after the row before it: the prompt's last, or frame i-1's.
    rows = audio_rows(codes[:-1])
    tokens = np.concatenate([prompt[0], rows[0]])[None]
    mask = np.concatenate([prompt[1], rows[1]])[None]
    # A cache in the activations' dtype: the MLX ops run this pass, and mixing dtypes would send small products
    # through fp32 BLAS calls, slow on a busy machine.
    cache = make_cache(cfg.backbone, 1, model.activation_dtype(), tokens.shape[1])
    states = model.backbone_states(mx.array(tokens), mx.array(mask), cache)[0, len(prompt[0]) - 1 :]
    mx.eval(states)
    codebook0 = np.array(model.codebook0_logits(states)[:, :size])
    depth = []
    for start in range(0, frames, DECODER_BATCH):
        chunk = slice(start, start + DECODER_BATCH)
        logits = model.teacher_forced_decoder_logits(states[chunk], mx.array(codes[chunk]))
        depth.append(np.array(logits[..., :size]))
    return codebook0, np.concatenate(depth)


def divergence(reference: np.ndarray, other: np.ndarray) -> Divergence:
    """KL and top-1/top-5 agreement of `other`'s logits against `reference`'s, row by row (last axis)."""
    p_log = _log_softmax(reference.reshape(-1, reference.shape[-1]).astype(np.float64))
    q_log = _log_softmax(other.reshape(-1, other.shape[-1]).astype(np.float64))
    kl = (np.exp(p_log) * (p_log - q_log)).sum(axis=-1)
    top1 = np.argmax(p_log, axis=-1) == np.argmax(q_log, axis=-1)
    top = min(TOP, p_log.shape[-1])
    ref_top = np.argpartition(-p_log, top - 1, axis=-1)[:, :top]
    our_top = np.argpartition(-q_log, top - 1, axis=-1)[:, :top]
    shared = (ref_top[:, :, None] == our_top[:, None, :]).any(axis=-1).mean(axis=-1)
    return Divergence(
        kl=float(kl.mean()),
        kl_p95=float(np.percentile(kl, 95)),
        top1=float(top1.mean()),
        top5=float(shared.mean()),
    )


def entropy(logits: np.ndarray) -> float:
    """Mean entropy, in nats, of the softmax of each row of `logits`."""
    log_p = _log_softmax(logits.reshape(-1, logits.shape[-1]).astype(np.float64))
    return round(float(-(np.exp(log_p) * log_p).sum(axis=-1).mean()), 4)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=-1, keepdims=True)
    result: np.ndarray = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return result


def _copy(model: CSM) -> CSM:
    """A CSM holding the same arrays (MLX arrays are immutable: quantizing the copy leaves `model` alone)."""
    copy = CSM(model.config)
    copy.update(tree_unflatten(list(dict(tree_flatten(model.parameters())).items())))
    return copy


def run(
    reference: CSM,
    name: str,
    schemes: list[QuantizationScheme],
    frames: int = 200,
    seed: int = 0,
    timed_rounds: int = 0,
    say: Callable[[str], None] = lambda _: None,
) -> PrecisionBenchResult:
    """Score each scheme, quantized from `reference`, on `frames` frames the reference generates; `say` hears
    each stage (the CLI prints them). With `timed_rounds`, every model's frames are then timed in that many
    turns (alternation.py), which holds every scheme's weights in memory at once."""
    cfg = reference.config
    if frames < 1 or PROMPT_ROWS + frames > cfg.backbone.max_seq_len:
        window = cfg.backbone.max_seq_len
        raise ValueError(f"the prompt ({PROMPT_ROWS} rows) and the frames must fit the model's window of {window}")
    prompt = _prompt(reference, PROMPT_ROWS, np.random.default_rng(seed))
    start = time.perf_counter()
    say(f"generating {frames} frames with the {_dtype(reference)} reference")
    codes = generate_codes(reference, prompt, frames, seed)
    generate_seconds = time.perf_counter() - start
    say("scoring the reference on its own frames")
    want0, want_depth = score(reference, prompt, codes)
    context = PROMPT_ROWS + frames
    reference_bytes = frame_budget(reference, context).total_bytes
    results = []
    kept = []
    for scheme in schemes:
        start = time.perf_counter()
        say(f"quantizing to {scheme.describe()} and scoring")
        model = _copy(reference)
        quantize(model, scheme)
        got0, got_depth = score(model, prompt, codes)
        bytes_per_frame = frame_budget(model, context).total_bytes
        if timed_rounds:
            kept.append(model)
        del model
        results.append(
            SchemeResult(
                scheme=str(scheme),
                description=scheme.describe(),
                bytes_per_frame=bytes_per_frame,
                bytes_ratio=round(bytes_per_frame / reference_bytes, 4),
                codebook0=divergence(want0, got0),
                depth=divergence(want_depth, got_depth),
                seconds=round(time.perf_counter() - start, 1),
            )
        )
    reference_times = None
    if timed_rounds:
        say(f"timing {timed_rounds} turns of {FRAMES_PER_TURN} frames of each model, in turns")
        reference_times, *times = time_in_turns([reference, *kept], timed_rounds)
        for result, scheme_times in zip(results, times, strict=True):
            result.times = scheme_times
    return PrecisionBenchResult(
        model=name,
        dtype=_dtype(reference),
        device=str(mx.default_device()),
        frames=frames,
        prompt_rows=PROMPT_ROWS,
        codebooks=cfg.num_codebooks,
        codebook0_entropy=entropy(want0),
        depth_entropy=entropy(want_depth),
        flat_entropy=round(float(np.log(cfg.audio_codebook_size)), 4),
        reference_bytes_per_frame=reference_bytes,
        generate_seconds=round(generate_seconds, 1),
        schemes=results,
        reference_times=reference_times,
        timed_context_rows=CONTEXT_ROWS if timed_rounds else 0,
    )


def _dtype(model: CSM) -> str:
    return str(model.activation_dtype()).removeprefix("mlx.core.")


def format_result(r: PrecisionBenchResult) -> str:
    depth = f"codebooks 1-{r.codebooks - 1}"
    lines = [
        f"model {r.model}  reference {r.dtype}  device {r.device}",
        f"  {r.frames} frames sampled by the reference after {r.prompt_rows} text rows; every model scored on "
        "those rows, teacher-forced",
        f"  {'scheme':<24} {'MB/frame':>9} {'x ref':>6} | {'codebook 0: KL':>14} {'p95':>7} {'top1':>5} {'top5':>5} "
        f"| {depth + ': KL':>18} {'p95':>7} {'top1':>5} {'top5':>5}",
        f"  {r.dtype + ' (reference)':<24} {r.reference_bytes_per_frame / 1e6:9.1f} {1:6.3f} |",
    ]
    for s in r.schemes:
        c, d = s.codebook0, s.depth
        lines.append(
            f"  {s.scheme:<24} {s.bytes_per_frame / 1e6:9.1f} {s.bytes_ratio:6.3f} | {c.kl:14.5f} {c.kl_p95:7.4f} "
            f"{c.top1:5.3f} {c.top5:5.3f} | {d.kl:18.5f} {d.kl_p95:7.4f} {d.top1:5.3f} {d.top5:5.3f}"
        )
    if r.reference_times is not None:
        timed = [(f"{r.dtype} (reference)", r.reference_times)] + [(s.scheme, s.times) for s in r.schemes]
        lines.append(
            f"  frames timed in turns, {FRAMES_PER_TURN} a turn (the first untimed), after "
            f"{r.timed_context_rows} rows of context (medians; ratios to the reference's frame):"
        )
        for label, t in timed:
            assert t is not None
            lines.append(
                f"  {label:<24} backbone {t.backbone_ms:8.2f} ms  depth decoder {t.decoder_ms:8.2f} ms  frame "
                f"{t.frame_ms:8.2f} ms  {t.frame_ms / r.reference_times.frame_ms:6.3f}x  ({t.frames} frames)"
            )
    lines += [
        "  KL(reference || scheme) in nats per row (mean, 95th percentile); top1: the same most likely code; top5: "
        "share of the reference's 5 most likely codes among the scheme's 5",
        f"  the reference's entropy: codebook 0 {r.codebook0_entropy:.3f}, {depth} {r.depth_entropy:.3f} nats "
        f"(flat: {r.flat_entropy:.3f}); on random weights these figures are a proxy for quality, not a measure of it",
    ]
    return "\n".join(lines)
