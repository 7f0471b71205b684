"""Text in, speech out, in-process: the engine makes frames and Mimi decodes each one as it is made.

This is `csmd say`: the first end-to-end voice path, and the core the daemon streams from.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from csmd.audio import io
from csmd.audio.mimi.config import MIMI, from_hf_config
from csmd.audio.mimi.loading import DEFAULT_CODEC, from_tensors, load_mimi
from csmd.audio.mimi.model import Mimi, StreamingDecoder
from csmd.model.errors import CheckpointError
from csmd.model.generator import Context, Generator, Segment, Utterance
from csmd.model.loading import LoadedModel
from csmd.model.sampling import GenerationParams

FRAME_SAMPLES = 1920  # 24 kHz samples per 80 ms Mimi frame


@dataclass(frozen=True)
class ContextClip:
    """A recorded turn to condition the voice on: its audio (24 kHz mono float32), transcript and speaker."""

    pcm: np.ndarray
    text: str
    speaker: int = 0

    @property
    def frames(self) -> int:
        """The Mimi frames it becomes (the codec pads the end to a whole 80 ms frame)."""
        return math.ceil(len(self.pcm) / FRAME_SAMPLES)

    @classmethod
    def read(cls, path: str, text: str, speaker: int = 0) -> ContextClip:
        """A recording in any format libsndfile reads, mixed down and resampled (AudioFileError if unreadable)."""
        return cls(io.read_audio(path, sample_rate=io.SAMPLE_RATE), text, speaker)


@dataclass
class SpeechResult:
    pcm: np.ndarray  # 24 kHz mono float32, 1920 samples per frame
    frames: int
    finish_reason: str
    seed: int
    seconds_to_first_audio: float
    seconds_total: float


def codec_for(loaded: LoadedModel, spec: str | None, bf16: bool = False) -> Mimi:
    """The codec a model speaks through: an explicit one, the one its checkpoint bundles or names (a random
    one matching a random model), or Kyutai's release. bf16: with its weight-bound matrices in bfloat16
    (`Mimi.use_bf16_weights`)."""
    mimi = _codec(loaded, spec)
    if bf16:
        mimi.use_bf16_weights()
    return mimi


def _codec(loaded: LoadedModel, spec: str | None) -> Mimi:
    n = loaded.model.config.num_codebooks
    if spec is None:
        if loaded.codec is not None:
            spec = loaded.codec
        elif loaded.codec_tensors:
            cfg = from_hf_config(loaded.codec_config, n) if loaded.codec_config else MIMI.with_codebooks(n)
            return _checked(loaded, from_tensors(loaded.codec_tensors, cfg, loaded.source))
        else:
            spec = DEFAULT_CODEC
    return _checked(loaded, load_mimi(spec, num_codebooks=n))


def _checked(loaded: LoadedModel, mimi: Mimi) -> Mimi:
    cfg = loaded.model.config
    # Both ways: the model's codes must decode (bins >= its codebook), and encoded audio must be codes the
    # model knows (bins <= it); a mismatch would fail only at the first context audio.
    if mimi.num_codebooks != cfg.num_codebooks or mimi.config.quantizer.bins != cfg.audio_codebook_size:
        raise CheckpointError(
            f"codec ({mimi.num_codebooks} codebooks of {mimi.config.quantizer.bins}) does not fit the model "
            f"({cfg.num_codebooks} codebooks of {cfg.audio_codebook_size})"
        )
    return mimi


def add_context(context: Context, mimi: Mimi, clip: ContextClip) -> None:
    """Mimi-encode a recorded turn and pin it in the context as a voice prompt."""
    codes = mimi.encode(clip.pcm)
    context.append(Segment(clip.speaker, clip.text, codes.T, pinned=True))


def next_audio(utterance: Utterance, decoder: StreamingDecoder) -> np.ndarray | None:
    """The utterance's next frame, decoded to 1920 samples; None once it has ended. Model and codec work:
    run it on the thread that owns them."""
    frame = utterance.step()
    return None if frame is None else decoder.step(frame)


def speak(
    generator: Generator,
    context: Context,
    mimi: Mimi,
    text: str,
    speaker: int,
    params: GenerationParams,
    on_audio: Callable[[np.ndarray], None] | None = None,
    stop: Callable[[], bool] | None = None,
) -> SpeechResult:
    """Generate `text` frame by frame, decoding each frame at once; `on_audio` gets every 1920 samples.
    `stop` is asked before each frame: True cancels the reply there (finish reason "cancelled")."""
    decoder = StreamingDecoder(mimi)
    chunks: list[np.ndarray] = []
    start = time.perf_counter()
    first_audio = None
    utterance = generator.start(context, text, speaker, params)
    try:
        while not (stop is not None and stop()) and (pcm := next_audio(utterance, decoder)) is not None:
            if first_audio is None:
                first_audio = time.perf_counter() - start
            chunks.append(pcm)
            if on_audio is not None:
                on_audio(pcm)
    finally:
        utterance.cancel()  # no-op once finished; frees the context if decoding or on_audio failed
    pcm = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
    return SpeechResult(
        pcm=pcm,
        frames=len(utterance.frames),
        finish_reason=str(utterance.finish_reason),
        seed=utterance.seed,
        seconds_to_first_audio=first_audio or 0.0,
        seconds_total=time.perf_counter() - start,
    )
