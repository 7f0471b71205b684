"""Mimi: 24 kHz audio <-> 12.5 Hz frames of codes, offline and streaming, exact to Kyutai's model.

encode: pcm -> SEANet encoder (25 Hz latent) -> transformer -> stride-2 downsample -> split RVQ -> codes
decode: codes -> RVQ sum -> depthwise stride-2 upsample -> transformer -> SEANet decoder -> pcm

Every stage is causal and streams with explicit state (see seanet.py and transformer.py), so offline
processing is the streaming code run over longer chunks: `decode(codes)` equals the concatenation of
`StreamingDecoder.step(frame)` outputs, sample for sample.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, NamedTuple, TypeVar, cast

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_unflatten

from csmd.arrays import materialize
from csmd.audio.mimi import seanet, transformer
from csmd.audio.mimi.config import MimiConfig
from csmd.audio.mimi.quantizer import SplitQuantizer
from csmd.audio.mimi.seanet import CausalConv1d, CausalConvTranspose1d, SeanetDecoder, SeanetEncoder, State
from csmd.audio.mimi.transformer import MimiTransformer, TransformerState
from csmd.audio.mimi.weights import check_tensors

OFFLINE_CHUNK_FRAMES = 125  # offline work is done 10 s at a time: bounded memory, same result


class DecoderState(NamedTuple):
    """A decoding stream's state, stage by stage (a pytree of arrays, as `mx.compile` and `mx.eval` take it)."""

    upsample: State  # the transposed convolution's overlapping tail
    transformer: TransformerState
    seanet: State  # one state per SEANet decoder layer


class EncoderState(NamedTuple):
    """An encoding stream's state; None in a field until the stream's first step has run through it."""

    seanet: State  # one state per SEANet encoder layer
    transformer: TransformerState | None
    downsample: State  # the replicate-padded convolution's past inputs


FRESH_ENCODER = EncoderState(None, None, None)  # a fresh stream: each stage starts from its first input
_Step = TypeVar("_Step", bound=Callable[..., Any])
_State = TypeVar("_State", DecoderState, EncoderState)


class Mimi(nn.Module):
    def __init__(self, cfg: MimiConfig):
        super().__init__()
        self.config = cfg
        dims = cfg.seanet.dimension
        self.encoder = SeanetEncoder(cfg.seanet)
        self.encoder_transformer = MimiTransformer(cfg.transformer)
        self.downsample = CausalConv1d(dims, dims, 4, stride=2, bias=False, replicate=True)
        self.quantizer = SplitQuantizer(dims, cfg.quantizer)
        self.upsample = CausalConvTranspose1d(dims, dims, stride=2, bias=False, depthwise=True)
        self.decoder_transformer = MimiTransformer(cfg.transformer)
        self.decoder = SeanetDecoder(cfg.seanet)
        self._compiled: dict[str, Any] = {}

    def load_tensors(self, tensors: dict[str, mx.array], source: str) -> None:
        """Load csmd-named fp32 tensors (see weights.py) and recompute everything derived from them."""
        check_tensors(tensors, self.config, source)
        self.update(tree_unflatten([(k, v.astype(mx.float32)) for k, v in tensors.items()]))
        seanet.prepare(self)
        self.quantizer.prepare()
        self.decoder_transformer.pack_panels()  # (for batched decodes: see pack_panels; the encoder is never batched)
        materialize(self)
        self._compiled = {}  # compiled steps hold the old weights as constants
        self.warm_up()

    def warm_up(self) -> None:
        """Trace the compiled streaming steps now rather than on the first frame of the first stream.

        The first trace also has MLX build (with g++) the CPU kernels of fused elementwise chains; it caches
        them under the temp directory, but until then (a fresh machine, or after /tmp is cleared) this takes
        seconds. Starting a stream and continuing one are two traces, for decoding and for encoding (see
        _encode_step, and MimiTransformer's state: a stream's first step has no previous steps to add).
        """
        codes = mx.zeros((1, self.num_codebooks, 1), dtype=mx.int32)
        _, decoding = self.decode_step(codes, None)
        mx.eval(self.decode_step(codes, decoding))
        _, encoding = self.encode_step(mx.zeros((1, self.frame_size)), None)
        mx.eval(self.encode_step(mx.zeros((1, self.frame_size)), encoding))

    def warm_up_batches(self, sizes: Iterable[int]) -> None:
        """Trace the batched decode step (`decode_together`) for each batch size in `sizes` now.

        Each batch size is one more trace of the compiled step (60-155 ms each on a 2-core CPU), which would
        otherwise delay the first frame of the first batch of that size: a daemon warms the sizes it expects.
        """
        for size in sizes:
            decoders = [StreamingDecoder(self) for _ in range(size)]
            decode_together(decoders, np.zeros((size, self.num_codebooks), dtype=np.int32))

    def use_bf16_weights(self) -> None:
        """Store the weight-bound matrices in bfloat16 (computed in fp32): half the bytes read per frame.

        Those are the transformers' projections and the convolutions that a streaming step multiplies by only
        a few rows (the decoder's first conv and first upsampling, the encoder's last conv): the ones whose
        cost is reading the weights. Lossy (bf16 keeps 8 significant bits): see BENCHMARKS.md, "Mimi codec",
        for the measured error. Drops the compiled steps, which hold the old weights.
        """
        for stack in (self.encoder_transformer, self.decoder_transformer):
            for layer in stack.layers:
                for linear in (layer.attn.in_proj, layer.attn.out_proj, layer.mlp.fc1, layer.mlp.fc2):
                    linear.weight = linear.weight.astype(mx.bfloat16)
        for conv in (self.decoder.layers[0], self.decoder.layers[2], self.encoder.layers[-1]):
            conv._w = conv._w.astype(mx.bfloat16)
        self.decoder_transformer.pack_panels()  # (bf16 projections are not packed: this drops the fp32 copies)
        materialize(self)
        self._compiled = {}
        self.warm_up()

    @property
    def frame_size(self) -> int:
        return self.config.frame_size

    @property
    def num_codebooks(self) -> int:
        return self.config.num_codebooks

    # -- one streaming step; state None starts a fresh stream -------------------------------------------
    #
    # At one frame per call a step is some 1500 small ops, whose dispatch costs more than their arithmetic.
    # Each step therefore runs through mx.compile, which traces it once per input shape and then replays the
    # graph with elementwise chains fused into single loops. The state is an
    # explicit input and output, and has the same shapes at every step (see initial_decode_state), so one
    # trace serves the whole stream. Weights are captured as constants: load_tensors drops the traces.

    def encode_step(self, pcm: mx.array, state: EncoderState | None) -> tuple[mx.array, EncoderState]:
        """pcm [B, n * frame_size] -> codes [B, num_codebooks, n]."""
        return self._compile("encode", self._encode_step)(pcm, state)

    def decode_step(self, codes: mx.array, state: DecoderState | None) -> tuple[mx.array, DecoderState]:
        """codes [B, K, n] -> pcm [B, n * frame_size] (unclipped, as the model makes it)."""
        if state is None:
            state = self.initial_decode_state(codes.shape[0])
        return self._compile("decode", self._decode_step)(codes, state)

    def initial_decode_state(self, batch: int) -> DecoderState:
        """A fresh stream's decoder state: zeros of the shapes every later step has."""
        return DecoderState(
            self.upsample.initial_state(batch),
            self.decoder_transformer.initial_state(batch),
            self.decoder.initial_state(batch),
        )

    def _compile(self, name: str, step: _Step) -> _Step:
        if name not in self._compiled:
            self._compiled[name] = mx.compile(step)
        return cast(_Step, self._compiled[name])

    def _encode_step(self, pcm: mx.array, state: EncoderState | None) -> tuple[mx.array, EncoderState]:
        # A fresh stream (state None) traces once more: the downsample pads with the stream's first step.
        state = state or FRESH_ENCODER
        latent, seanet_state = self.encoder(pcm[:, :, None], state.seanet)
        latent, transformer_state = self.encoder_transformer(latent, state.transformer)
        latent, downsample_state = self.downsample(latent, state.downsample)
        codes = self.quantizer.encode(latent, self.num_codebooks)
        return codes.transpose(0, 2, 1), EncoderState(seanet_state, transformer_state, downsample_state)

    def _decode_step(self, codes: mx.array, state: DecoderState) -> tuple[mx.array, DecoderState]:
        latent = self.quantizer.decode(codes.transpose(0, 2, 1))
        latent, upsample_state = self.upsample(latent, state.upsample)
        latent, transformer_state = self.decoder_transformer(latent, state.transformer)
        pcm, seanet_state = self.decoder(latent, state.seanet)
        return pcm[:, :, 0], DecoderState(upsample_state, transformer_state, seanet_state)

    # -- whole clips -------------------------------------------------------------------------------------

    def encode(self, pcm: np.ndarray | mx.array) -> np.ndarray:
        """Mono 24 kHz pcm [T] (or [B, T]) -> codes [K, frames] (or [B, K, frames]).

        The end is padded with silence to a whole frame, as Kyutai's encoder does.
        """
        encoder = OfflineEncoder(self, pcm)
        while not encoder.done:
            encoder.step()
        return encoder.codes()

    def decode(self, codes: np.ndarray | mx.array) -> np.ndarray:
        """codes [K, frames] (or [B, K, frames]) -> pcm [frames * 1920] (or [B, ...]), float32, unclipped."""
        codes_np, batched = _as_batch(codes, np.integer, "codes", ndim=2)
        self.check_codes(codes_np)
        state, out = None, []
        for start in range(0, codes_np.shape[-1], OFFLINE_CHUNK_FRAMES):
            chunk = mx.array(codes_np[..., start : start + OFFLINE_CHUNK_FRAMES].astype(np.int32))
            pcm, state = self.decode_step(chunk, state)
            mx.eval(pcm, state)
            out.append(np.array(pcm))
        pcm_np = np.concatenate(out, axis=-1) if out else np.zeros((codes_np.shape[0], 0), np.float32)
        return pcm_np if batched else pcm_np[0]

    def check_codes(self, codes: np.ndarray) -> None:
        """codes [B, K, frames]: K must be this codec's codebook count, values in 0..bins-1."""
        k, bins = self.num_codebooks, self.config.quantizer.bins
        if codes.shape[1] != k:
            raise ValueError(f"expected {k} codebooks per frame, got {codes.shape[1]}")
        if codes.size and (codes.min() < 0 or codes.max() >= bins):
            raise ValueError(f"codes must be in 0..{bins - 1}, got {codes.min()}..{codes.max()}")


def _as_batch(x: np.ndarray | mx.array, kind: type, name: str, ndim: int = 1) -> tuple[np.ndarray, bool]:
    array = np.asarray(x)
    if not np.issubdtype(array.dtype, kind):
        raise ValueError(f"{name} must be {'integers' if kind is np.integer else 'floats'}, got {array.dtype}")
    if array.ndim == ndim:
        return array[None], False
    if array.ndim == ndim + 1:
        return array, True
    raise ValueError(f"{name} must have {ndim} or {ndim + 1} dimensions, got shape {list(array.shape)}")


class OfflineEncoder:
    """A whole clip's encoding, one chunk of `chunk_frames` frames per `step`: `Mimi.encode` in pieces.

    Each step is short work of its own, so that a caller sharing one thread with other streams (the daemon's
    model thread) can run their steps between this clip's. The codes are those of `Mimi.encode`, bit for bit:
    the encoder is causal and carries its state from chunk to chunk.
    """

    def __init__(self, mimi: Mimi, pcm: np.ndarray | mx.array, chunk_frames: int = OFFLINE_CHUNK_FRAMES):
        audio, self._batched = _as_batch(pcm, np.floating, "pcm")
        if audio.shape[1] == 0:
            raise ValueError("cannot encode empty audio")
        if chunk_frames < 1:
            raise ValueError(f"chunk_frames must be at least 1, got {chunk_frames}")
        self.mimi = mimi
        self.frames = -(-audio.shape[1] // mimi.frame_size)
        # The last chunk is padded further, to a power of two frames: every step is compiled once per input
        # shape and the trace is kept, so arbitrary lengths would each keep one (~1 MB apiece); this way a chunk
        # size keeps one per power of two below it plus its own (eight for 125 frames). The encoder is causal:
        # silence after the end does not change the codes before it.
        tail = self.frames % chunk_frames or chunk_frames
        padded = self.frames - tail + min(1 << (tail - 1).bit_length(), chunk_frames)
        self._audio = np.pad(audio, ((0, 0), (0, padded * mimi.frame_size - audio.shape[1])))
        self._chunk = chunk_frames * mimi.frame_size
        self._start = 0
        self._state: EncoderState | None = None
        self._out: list[np.ndarray] = []

    @property
    def done(self) -> bool:
        return self._start >= self._audio.shape[1]

    @property
    def steps_left(self) -> int:
        return -(-(self._audio.shape[1] - self._start) // self._chunk)

    def step(self) -> None:
        """Encode the next chunk (evaluated before returning)."""
        if self.done:
            raise RuntimeError("the clip is already encoded")
        pcm = mx.array(self._audio[:, self._start : self._start + self._chunk], dtype=mx.float32)
        codes, self._state = self.mimi.encode_step(pcm, self._state)
        mx.eval(codes, self._state)
        self._out.append(np.array(codes))
        self._start += self._chunk

    def codes(self) -> np.ndarray:
        """The clip's codes [K, frames] (or [B, K, frames]), once every step has run."""
        if not self.done:
            raise RuntimeError(f"the clip is not encoded yet: {self.steps_left} steps left")
        codes = np.concatenate(self._out, axis=-1)[..., : self.frames].astype(np.int32)
        return codes if self._batched else codes[0]


@dataclass(frozen=True)
class StreamSnapshot(Generic[_State]):
    """A parked stream: hand it back to `restore` to continue exactly where it was."""

    state: _State | None  # None: the stream had not started
    pending: np.ndarray | None = None


class _Stream(Generic[_State]):
    """What both streams hold: the codec, the batch size, and the state between steps (None: not started)."""

    def __init__(self, mimi: Mimi, batch: int = 1):
        self.mimi = mimi
        self.batch = batch
        self._state: _State | None = None

    def _advance(
        self, step: Callable[[mx.array, _State | None], tuple[mx.array, _State]], inputs: mx.array
    ) -> mx.array:
        """Run `step(inputs, state)` on the stream's state, keep the new state, and return the output, evaluated.

        The stream lets go of its old state before the evaluation, so that MLX may donate the old state's
        buffers to the step: the transformer's key/value rings are then written in place rather than copied
        (a snapshot still holding them gets a copy instead). If building the step fails, the state stays.
        """
        state, self._state = self._state, None
        try:
            out, self._state = step(inputs, state)
        except BaseException:
            self._state = state
            raise
        del state  # now only the step's graph holds the old state
        mx.eval(out, self._state)
        return out


class StreamingDecoder(_Stream[DecoderState]):
    """One frame of codes in, exactly `frame_size` (1920) samples out."""

    def __init__(self, mimi: Mimi, batch: int = 1):
        super().__init__(mimi, batch)
        self._shared: _SharedBatch | None = None  # the batch whose row the state is (see decode_together)

    def step(self, frame: np.ndarray | mx.array) -> np.ndarray:
        """frame [K] (or [B, K]) -> pcm [1920] (or [B, 1920]), float32, unclipped."""
        codes, batched = _as_batch(frame, np.integer, "frame")
        if codes.shape[0] != self.batch:
            raise ValueError(f"this decoder streams a batch of {self.batch}, got {codes.shape[0]}")
        self.mimi.check_codes(codes[:, :, None])
        self._shared = None
        out = np.array(self._advance(self.mimi.decode_step, mx.array(codes[:, :, None].astype(np.int32))))
        return out if batched else out[0]

    def reset(self) -> None:
        self._state = None
        self._shared = None

    def snapshot(self) -> StreamSnapshot[DecoderState]:
        return StreamSnapshot(self._state)  # MLX arrays are immutable: sharing them is a copy

    def restore(self, snapshot: StreamSnapshot[DecoderState]) -> None:
        self._state = snapshot.state
        self._shared = None


class StreamingEncoder(_Stream[EncoderState]):
    """PCM of any length in; codes out for every whole 80 ms frame so far (the rest waits for more)."""

    def __init__(self, mimi: Mimi, batch: int = 1):
        super().__init__(mimi, batch)
        self._pending = np.zeros((batch, 0), dtype=np.float32)

    def step(self, pcm: np.ndarray | mx.array) -> np.ndarray:
        """pcm [T] (or [B, T]) -> codes [K, n] (or [B, K, n]) with n = whole frames now available."""
        audio, batched = _as_batch(pcm, np.floating, "pcm")
        if audio.shape[0] != self.batch:
            raise ValueError(f"this encoder streams a batch of {self.batch}, got {audio.shape[0]}")
        audio = np.concatenate([self._pending, audio.astype(np.float32)], axis=1)
        whole = audio.shape[1] // self.mimi.frame_size * self.mimi.frame_size
        self._pending = audio[:, whole:]
        codes = np.zeros((self.batch, self.mimi.num_codebooks, 0), dtype=np.int32)
        if whole:
            codes = np.array(self._advance(self.mimi.encode_step, mx.array(audio[:, :whole]))).astype(np.int32)
        return codes if batched else codes[0]

    def reset(self) -> None:
        self._state = None
        self._pending = np.zeros((self.batch, 0), dtype=np.float32)

    def snapshot(self) -> StreamSnapshot[EncoderState]:
        return StreamSnapshot(self._state, self._pending.copy())

    def restore(self, snapshot: StreamSnapshot[EncoderState]) -> None:
        self._state = snapshot.state
        assert snapshot.pending is not None
        self._pending = snapshot.pending.copy()


# -- several streams' frames in one batched step --------------------------------------------------------------


def stack_decoder_states(states: Sequence[DecoderState], last_steps: int = 0) -> DecoderState:
    """One batched state whose rows are the given streams' rows, in order (streams of any ages: each row keeps
    its own position; see transformer.stack_states for `last_steps`). One state is returned as it is."""
    return DecoderState(
        seanet.stack_states([state.upsample for state in states]),
        transformer.stack_states([state.transformer for state in states], last_steps),
        seanet.stack_states([state.seanet for state in states]),
    )


def split_decoder_state(state: DecoderState) -> list[DecoderState]:
    """Each batch row's state as a stream of its own (views of the batch's arrays); a batch of one as it is."""
    batch = state.transformer.position.shape[0]
    if batch == 1:
        return [state]
    parts = zip(
        seanet.split_state(state.upsample, batch),
        transformer.split_state(state.transformer),
        seanet.split_state(state.seanet, batch),
        strict=True,
    )
    return [DecoderState(*row) for row in parts]


@dataclass(eq=False)
class _SharedBatch:
    """The state of the decoders last stepped together: `rows[b]` is the view of row b that decoder b holds."""

    state: DecoderState
    rows: list[DecoderState]

    def holds(self, decoders: Sequence[StreamingDecoder]) -> bool:
        """Whether these decoders, in this order, are this batch's rows, none of them stepped since."""
        return len(self.rows) == len(decoders) and all(
            decoder._shared is self and decoder._state is row for decoder, row in zip(decoders, self.rows, strict=True)
        )


def decode_together(decoders: Sequence[StreamingDecoder], frames: np.ndarray | mx.array) -> np.ndarray:
    """Each decoder's next frame in one batched step: frames [B, K] (row b for decoders[b]) -> pcm [B, 1920].

    The decoders (of one codec, one stream each, all different) may be of any ages, fresh ones included; each
    is left holding its own new state, and row b is exactly what decoders[b].step(frames[b]) would have
    returned (bit for bit with the native kernels, whose products give a row the same floats whatever the
    other rows). What it saves: the step reads the codec's weights once for all B streams (a single stream's
    step is bound by reading them).

    Each decoder is left holding a view of its row of the batch's state. When the next call has the same
    decoders in the same order, none of them stepped otherwise in between, that batch is stepped as it is,
    its key/value rings written in place; any other set of decoders is stacked into a new batch, a copy of
    every stream's rings (two per stream of layers x (context - 1) x d_model floats). Each batch size is one
    more trace of the compiled step (Mimi.decode_step).
    """
    if not decoders:
        raise ValueError("no decoders to step")
    mimi = decoders[0].mimi
    if any(decoder.mimi is not mimi for decoder in decoders):
        raise ValueError("decoders of different codecs cannot step together")
    if any(decoder.batch != 1 for decoder in decoders):
        raise ValueError("decode_together steps decoders of one stream each")
    if len({id(decoder) for decoder in decoders}) != len(decoders):
        raise ValueError("a decoder appears more than once")
    codes = np.asarray(frames)
    if not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"frames must be integers, got {codes.dtype}")
    if codes.ndim != 2 or codes.shape[0] != len(decoders):
        raise ValueError(f"frames must be [{len(decoders)}, K] (a frame per decoder), got shape {list(codes.shape)}")
    mimi.check_codes(codes[:, :, None])
    previous = [(decoder._state, decoder._shared) for decoder in decoders]
    shared = decoders[0]._shared
    same_batch = shared is not None and shared.holds(decoders)
    for decoder in decoders:  # let go, so that MLX may update the batch's rings in place (see _Stream._advance)
        decoder._state = decoder._shared = None
    try:
        if same_batch:
            assert shared is not None
            batch = shared.state
        else:
            # A fresh stream is given the previous-call steps of a running one (its ring's masked zeros): every
            # batch then has the shapes of a running stream's step, one compiled trace per batch size.
            states = [mimi.initial_decode_state(1) if state is None else state for state, _ in previous]
            batch = stack_decoder_states(states, last_steps=mimi.upsample.stride)
            del states
        pcm, new_state = mimi.decode_step(mx.array(codes[:, :, None].astype(np.int32)), batch)
    except BaseException:
        for decoder, (state, held) in zip(decoders, previous, strict=True):
            decoder._state, decoder._shared = state, held
        raise
    del previous, batch, shared  # now only the step's graph holds the old states
    mx.eval(pcm, new_state)
    rows = split_decoder_state(new_state)
    together = _SharedBatch(new_state, rows)
    for decoder, row in zip(decoders, rows, strict=True):
        decoder._state, decoder._shared = row, together
    return np.array(pcm)
