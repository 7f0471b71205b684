"""How a code is picked from logits: temperature, top-k, top-p, min-p, and seeded randomness.

The same rule serves codebook 0 and the 31 depth-decoder codebooks, as in Sesame's reference.

Reserved ids: each codebook's vocabulary has 2051 ids, but Mimi only decodes 0..2047. By default csmd masks
the 3 extra ids before sampling (the reference does not): a trained model gives them almost no mass, and
masking guarantees every emitted frame can be decoded. `allow_reserved_codes=True` restores the reference rule
(the parity tests use it, since random weights do put mass there).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import mlx.core as mx

FRAME_MS = 80  # one Mimi frame
# The sampling kernels compute in float32 and take top_k as a 32-bit int, so the ranges below are ones whose
# values keep their meaning there (1e-46 is a valid double but 0 as a float32). Nothing useful is lost: a
# temperature under MIN_TEMPERATURE is greedy to within float32 precision (use 0), and any top_p under 1/vocab
# (~5e-4 for 2051 codes) already keeps only the most likely code.
MIN_TEMPERATURE = 1e-3
MAX_TEMPERATURE = 10.0
MAX_TOP_K = 2**31 - 1  # values at or above the vocabulary size keep every code, like 0
MIN_TOP_P = 1e-6
MAX_MIN_P = 0.999


@dataclass(frozen=True)
class GenerationParams:
    temperature: float = 0.9  # 0 means greedy
    top_k: int = 50  # 0 disables
    top_p: float = 1.0  # 1 disables
    min_p: float = 0.0  # 0 disables
    max_frames: int = 250  # 20 s of audio; a reply longer than this is cut
    seed: int | None = None  # same seed, same context, same text -> the same frames
    allow_reserved_codes: bool = False

    def validate(self) -> GenerationParams:
        problems = []
        if not (self.temperature == 0.0 or MIN_TEMPERATURE <= self.temperature <= MAX_TEMPERATURE):
            allowed = f"0 (greedy) or in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}]"
            problems.append(f"temperature must be {allowed}, got {self.temperature}")
        if not _is_int(self.top_k) or not 0 <= self.top_k <= MAX_TOP_K:
            problems.append(f"top_k must be an integer in [0, 2**31 - 1] (0 = off), got {self.top_k!r}")
        if not MIN_TOP_P <= self.top_p <= 1.0:
            problems.append(f"top_p must be in [{MIN_TOP_P:g}, 1] (1 = off), got {self.top_p}")
        if not 0.0 <= self.min_p <= MAX_MIN_P:
            problems.append(f"min_p must be in [0, {MAX_MIN_P:g}] (0 = off), got {self.min_p}")
        if not _is_int(self.max_frames) or self.max_frames < 1:
            problems.append(f"max_frames must be an integer >= 1 ({FRAME_MS} ms each), got {self.max_frames!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**32):
            problems.append(f"seed must be an integer in [0, 2**32) or None, got {self.seed!r}")
        if problems:
            raise ValueError("invalid generation parameters: " + "; ".join(problems))
        return self

    def replace(self, **changes: object) -> GenerationParams:
        return dataclasses.replace(self, **changes).validate()  # type: ignore[arg-type]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # True is an int to Python, not to users


def sampling_key(seed: int, frame: int, codebook: int) -> mx.array:
    """A PRNG key of its own for every (seed, frame, codebook), so any frame can be reproduced alone."""
    # A threefry key is two uint32 words; mx.random.key(seed) is [0, seed]: a first word >= 1 never collides.
    return mx.array([1 + frame * 64 + codebook, seed], dtype=mx.uint32)


def sample(logits: mx.array, params: GenerationParams, codebook_size: int, key: mx.array) -> mx.array:
    """One id per row of `logits` ([B, vocab], float32) -> [B] int32."""
    vocab = logits.shape[-1]
    if not params.allow_reserved_codes and codebook_size < vocab:
        logits = mx.where(mx.arange(vocab) < codebook_size, logits, -mx.inf)
    if params.temperature == 0.0:
        return mx.argmax(logits, axis=-1).astype(mx.int32)
    logits = logits / params.temperature
    if 0 < params.top_k < vocab:
        # Keep everything tied with the k-th largest, as the reference does.
        kth = mx.min(mx.topk(logits, params.top_k, axis=-1), axis=-1, keepdims=True)
        logits = mx.where(logits < kth, -mx.inf, logits)
    if params.min_p > 0.0:
        # p_i >= min_p * p_max  <=>  logit_i >= logit_max + log(min_p)
        floor = mx.max(logits, axis=-1, keepdims=True) + mx.log(mx.array(params.min_p))
        logits = mx.where(logits < floor, -mx.inf, logits)
    if params.top_p < 1.0:
        ordered = mx.sort(logits, axis=-1)[..., ::-1]
        probs = mx.softmax(ordered, axis=-1)
        mass_before = mx.cumsum(probs, axis=-1) - probs
        # The smallest logit still needed to reach top_p; the first token always survives.
        kept = mx.where(mass_before < params.top_p, ordered, mx.inf)
        floor = mx.min(kept, axis=-1, keepdims=True)
        logits = mx.where(logits < floor, -mx.inf, logits)
    # The Gumbel-max trick, spelled out (not mx.random.categorical) so that the native depth decoder, which
    # takes the same noise as an input (`FrameSampler.noise`), applies exactly this rule.
    noise = mx.random.gumbel(logits.shape, key=key)
    return mx.argmax(logits + noise, axis=-1).astype(mx.int32)


@dataclass(frozen=True)
class FrameSampler:
    """How the codes of one frame are picked: `sample` with the frame's own keys, one per codebook.

    Callable as `(logits, codebook) -> ids`; the depth decoder's native path reads `params` and `noise`
    instead and applies the same rule in one call.
    """

    params: GenerationParams
    codebook_size: int
    seed: int
    frame: int

    def __call__(self, logits: mx.array, codebook: int) -> mx.array:
        return sample(logits, self.params, self.codebook_size, sampling_key(self.seed, self.frame, codebook))

    def noise(self, vocab: int, codebooks: range) -> mx.array:
        """[len(codebooks), vocab] float32: row i is the Gumbel noise `self(logits, codebooks[i])` adds."""
        keys = mx.stack([sampling_key(self.seed, self.frame, c) for c in codebooks])
        return mx.vmap(lambda key: mx.random.gumbel((vocab,), key=key))(keys)
