"""CSM: a backbone over 33-column frame rows, and a depth decoder that fills in a frame codebook by codebook.

A backbone row holds one text token or one frame of audio codes (never both); its embedding is the masked
sum of its columns' embeddings. Per frame, the backbone's last hidden state gives codebook 0; the depth
decoder, with a fresh 32-slot cache, then produces codebooks 1..31 from that state and the codes so far.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn

from csmd import kernels
from csmd.model.config import CsmConfig
from csmd.model.llama import KVCache, StackWeights, Transformer, fused_step_weights, make_cache
from csmd.model.sampling import FrameSampler

# Picks codes from logits: (logits [B, vocab] float32, codebook index) -> ids [B].
Sampler = Callable[[mx.array, int], mx.array]


class QuantizedCodebookHeads(nn.Module):
    """`audio_head` quantized: per codebook, a [vocab, decoder hidden] matrix grouped along the hidden axis.

    The float head is stored [codebook, hidden, vocab] (Sesame's layout, used as `h @ head`); quantizing groups
    the input axis, so the quantized copy is transposed to the layout `quantized_matmul` expects.
    """

    def __init__(self, heads: mx.array, group_size: int, bits: int):
        super().__init__()
        self.group_size = group_size
        self.bits = bits
        self.weight, self.scales, self.biases = mx.quantize(mx.swapaxes(heads, -1, -2), group_size, bits)

    def __call__(self, x: mx.array, index: int) -> mx.array:
        return kernels.quantized_matmul(
            x, self.weight[index], self.scales[index], self.biases[index], self.group_size, self.bits
        )


@dataclass(frozen=True)
class DepthFrameWeights:
    """What `kernels.depth_frame` reads: the decoder stack, the heads, the audio embeddings and the projection,
    all in one format (a list of one float array each, or (weight, scales, biases) when quantized)."""

    stack: list[mx.array]
    heads: list[mx.array]
    embeddings: list[mx.array]
    projection: list[mx.array]
    group_size: int
    bits: int


@dataclass(frozen=True)
class NativeWeights:
    """The weights each native primitive would read, gathered once for the weights a CSM holds; None where
    they are in a format that primitive does not take (the MLX ops then run that part)."""

    backbone: StackWeights | None  # the fused one-row backbone step
    decoder: StackWeights | None  # the fused one-row decoder step
    depth_frame: DepthFrameWeights | None  # the whole depth-decoder frame


def embedding_rows(table: nn.Module, ids: mx.array, dtype: mx.Dtype) -> mx.array:
    """Rows `ids` of a float or affine-quantized embedding table, in `dtype`.

    A quantized table is dequantized in `dtype` (MLX's own QuantizedEmbedding would use the bf16 of its
    scales), as the native depth decoder does.
    """
    if isinstance(table, nn.QuantizedEmbedding) and getattr(table, "mode", "affine") == "affine":
        scales, biases = table["scales"][ids].astype(dtype), table["biases"][ids].astype(dtype)
        return mx.dequantize(table["weight"][ids], scales, biases, table.group_size, table.bits).astype(dtype)
    return table(ids).astype(dtype)


class CSM(nn.Module):
    def __init__(self, cfg: CsmConfig):
        super().__init__()
        self.config = cfg
        dims = cfg.backbone.hidden_size
        self.text_embeddings = nn.Embedding(cfg.text_vocab_size, dims)
        # One table for every codebook; codebook k's code c lives at row c + k * audio_vocab_size.
        self.audio_embeddings = nn.Embedding(cfg.num_codebooks * cfg.audio_vocab_size, dims)
        self.backbone = Transformer(cfg.backbone)
        self.decoder = Transformer(cfg.decoder)
        self.projection = nn.Linear(dims, cfg.decoder.hidden_size, bias=False)
        self.codebook0_head = nn.Linear(dims, cfg.audio_vocab_size, bias=False)
        # Used as h @ audio_head[k - 1] for codebook k (not transposed, unlike a Linear).
        self.audio_head: mx.array | QuantizedCodebookHeads = mx.zeros(
            (cfg.num_codebooks - 1, cfg.decoder.hidden_size, cfg.audio_vocab_size)
        )
        self._offsets = mx.arange(cfg.num_codebooks) * cfg.audio_vocab_size
        self._native: NativeWeights
        self.weights_changed()

    # -- which path each step takes ------------------------------------------------------------------
    #
    # Whether a native primitive can read the weights depends on the weights alone, so it is settled once for
    # the weights held (`native_weights`) and again after every change of them. Whether the native kernels
    # serve the current device (CSMD_KERNELS, the default device) is asked at each call: a few lookups.

    @property
    def native_weights(self) -> NativeWeights:
        return self._native

    def weights_changed(self) -> None:
        """Choose the paths anew for the weights now held. `update` and `update_modules` (so loading,
        `load_weights`, `set_dtype` and `nn.quantize`) call it; so must code that assigns a weight directly."""
        decoder = fused_step_weights(self.decoder)
        self._native = NativeWeights(fused_step_weights(self.backbone), decoder, self._depth_frame_weights(decoder))

    # (nn.Module's own `update` already differs from dict.update's signature, hence the ignore.)
    def update(self, parameters: dict[str, Any], strict: bool = True) -> CSM:  # type: ignore[override]
        super().update(parameters, strict)
        self.weights_changed()
        return self

    def update_modules(self, modules: dict[str, Any], strict: bool = True) -> CSM:
        super().update_modules(modules, strict)
        self.weights_changed()
        return self

    def make_backbone_cache(self, batch: int = 1, max_len: int | None = None, dtype: mx.Dtype | None = None) -> KVCache:
        """A backbone cache of `max_len` positions (default: the whole window) in `dtype`.

        dtype None: the keys and values as computed. On the native kernels that is fp32 whatever the weights
        (the fused step computes in fp32, and a bf16 model then keeps its keys and values at full precision
        too); elsewhere, the activations' dtype. mx.bfloat16: half the memory (134 -> 67 MB for csm-1b's
        full window), at the cost of rounding every key and value (README, "Choosing a precision").
        """
        if dtype is None:
            dtype = mx.float32 if kernels.native.active() else self.activation_dtype()
        return make_cache(self.config.backbone, batch, dtype, max_len)

    def activation_dtype(self) -> mx.Dtype:
        # The norms are never quantized and carry the model's dtype; a quantized model's group scales are bf16
        # whatever its activations (weights.quantize).
        return self.decoder.norm.scale.dtype

    def embed_rows(self, tokens: mx.array, mask: mx.array) -> mx.array:
        """tokens, mask: [B, T, num_codebooks + 1] -> [B, T, hidden], the masked sum over columns."""
        dtype = self.activation_dtype()
        mask = mask.astype(dtype)
        text = embedding_rows(self.text_embeddings, tokens[..., -1], dtype) * mask[..., -1:]
        audio = embedding_rows(self.audio_embeddings, tokens[..., :-1] + self._offsets, dtype) * mask[..., :-1, None]
        return text + audio.sum(axis=-2)

    def backbone_step(self, tokens: mx.array, mask: mx.array, cache: KVCache) -> mx.array:
        """Run new rows through the backbone; returns the final-norm state of the last row, [B, hidden]."""
        x = self.embed_rows(tokens, mask)
        if x.shape[:2] == (1, 1) and self._fused_rows_run([cache]):
            return self._backbone_rows_fused(x[:, 0], [cache])
        return self.backbone(x, cache)[:, -1, :]

    def backbone_rows(self, tokens: mx.array, mask: mx.array, caches: list[KVCache]) -> mx.array:
        """One new row for each of B conversations, each with its own cache (and position): tokens, mask
        [B, 1, num_codebooks + 1] -> final-norm states [B, hidden].

        With the native kernels, one primitive runs all B rows and reads each weight once for all of them;
        row b is then exactly what `backbone_step` gives for it alone. Elsewhere the rows run one by one.
        """
        if not self._fused_rows_run(caches):
            rows = [self.backbone_step(tokens[b : b + 1], mask[b : b + 1], cache) for b, cache in enumerate(caches)]
            return mx.concatenate(rows)
        return self._backbone_rows_fused(self.embed_rows(tokens, mask)[:, 0], caches)

    def _fused_rows_run(self, caches: list[KVCache]) -> bool:
        """The fused step can run these rows: native kernels here, backbone weights in its format, and caches of
        one conversation each, all fp32 (what `make_backbone_cache` makes when the native kernels run) or all
        bf16."""
        dtypes = {cache.dtype for cache in caches}
        return (
            self._native.backbone is not None
            and kernels.fused_step_batch_available()
            and (dtypes == {mx.float32} or dtypes == {mx.bfloat16})
            and all(cache.keys.shape[1] == 1 for cache in caches)
        )

    def _backbone_rows_fused(self, x: mx.array, caches: list[KVCache]) -> mx.array:
        """x [B, hidden]: row b through the whole backbone at the next position of caches[b], as one native
        primitive (B = 1 included) that reads each weight once for all rows.

        The kernel only reads the caches; each new position's keys and values are written after it as a slice
        update, which MLX does in place, so a 16-layer cache is never copied. They come in the caches' dtype,
        bf16 ones rounded as the step's own attention used them.
        """
        weights = self._native.backbone
        assert weights is not None
        cfg = self.config.backbone
        for cache in caches:
            cache.room_for(1)
        shape = (cfg.num_layers, cfg.num_kv_heads)
        stacks = [
            (cache.keys.reshape(*shape, cache.max_len, cfg.dim_per_head),
             cache.values.reshape(*shape, cache.max_len, cfg.dim_per_head))
            for cache in caches
        ]  # fmt: skip
        h, new_k, new_v = kernels.transformer_step_batch(
            x.astype(mx.float32), weights.arrays, [k for k, _ in stacks], [v for _, v in stacks],
            [cache.offset for cache in caches], self.backbone._inv_freqs, cfg.num_heads, cfg.num_kv_heads,
            cfg.rms_norm_eps, weights.group_size, weights.bits,
        )  # fmt: skip
        # Evaluated first so that nothing pending still reads the old cache arrays: only then does MLX write
        # the new positions in place (a 16-layer cache of 2048 positions would otherwise be copied every frame).
        del stacks
        mx.eval(h, new_k, new_v)
        for b, cache in enumerate(caches):
            cache.append_position(new_k[b], new_v[b])
        return self.backbone.norm(h.astype(self.activation_dtype()))

    def codebook0_logits(self, hidden: mx.array) -> mx.array:
        return kernels.linear(hidden, self.codebook0_head).astype(mx.float32)

    def embed_code(self, codes: mx.array, codebook: int) -> mx.array:
        """Decoder input for `codes` ([B]) of one codebook: its audio embedding, projected."""
        rows = embedding_rows(
            self.audio_embeddings, codes + codebook * self.config.audio_vocab_size, self.activation_dtype()
        )
        return kernels.linear(rows, self.projection)

    def decoder_logits(self, decoder_out: mx.array, codebook: int) -> mx.array:
        """Logits of `codebook` (1..N-1) from the decoder's last output row ([B, decoder hidden])."""
        if isinstance(self.audio_head, QuantizedCodebookHeads):
            return self.audio_head(decoder_out, codebook - 1).astype(mx.float32)
        return (decoder_out @ self.audio_head[codebook - 1]).astype(mx.float32)

    def decode_frame(self, hidden: mx.array, code0: mx.array, sample: Sampler) -> mx.array:
        """Codebooks 1..N-1 for a frame whose codebook 0 is `code0`; returns the whole frame [B, N].

        The decoder sees the backbone state at position 0 and code0 at position 1, then one code per step.
        Its KV cache lives for one frame, so each path makes its own. Nothing here forces evaluation, so the
        whole frame is one lazy graph. On the CPU with the native kernels, the whole frame is one primitive
        when `sample` is a `FrameSampler` (`_decode_frames_native`), else each step is one fused primitive
        instead of ~140 small ops (`_decode_frame_fused`); elsewhere the MLX ops run (`_decode_frame_ops`).
        """
        native = self._native
        one_row = hidden.shape[0] == 1
        if (
            native.depth_frame
            and isinstance(sample, FrameSampler)
            and one_row
            and kernels.depth_frame_batch_available()
        ):
            return self._decode_frames_native(hidden, code0, [sample], native.depth_frame)
        if native.decoder and kernels.fused_step_available(hidden):
            return self._decode_frame_fused(hidden, code0, sample, native.decoder)
        return self._decode_frame_ops(hidden, code0, sample)

    def decode_frames(self, hidden: mx.array, code0: mx.array, samplers: list[Sampler]) -> mx.array:
        """`decode_frame` for B conversations at once, each with its own sampler: hidden [B, hidden], code0
        [B] -> frames [B, N].

        With the native kernels and `FrameSampler`s, one primitive runs the B frames, reading each weight once
        per step for all of them; row b is then exactly what `decode_frame` gives for it alone. Elsewhere the
        frames are made one by one.
        """
        native = self._native
        if (
            native.depth_frame
            and all(isinstance(s, FrameSampler) for s in samplers)
            and kernels.depth_frame_batch_available()
        ):
            return self._decode_frames_native(hidden, code0, cast(list[FrameSampler], samplers), native.depth_frame)
        frames = [self.decode_frame(hidden[b : b + 1], code0[b : b + 1], s) for b, s in enumerate(samplers)]
        return mx.concatenate(frames)

    def _decode_frames_native(
        self, hidden: mx.array, code0: mx.array, samplers: list[FrameSampler], weights: DepthFrameWeights
    ) -> mx.array:
        """`decode_frames` as one native primitive: steps, heads, sampling and embeddings for codebooks 1..N-1.

        The sampling rule is `sampling.sample`'s, with the same Gumbel noise per codebook, so each row's codes
        are those of the step-by-step path up to float rounding in the logits.
        """
        cfg = self.config
        codebooks = range(1, cfg.num_codebooks)
        x0 = mx.stack([kernels.linear(hidden, self.projection), self.embed_code(code0, 0)], axis=1)
        rules = [s.params for s in samplers]
        if all(p.temperature == 0.0 for p in rules):
            noise = mx.zeros((0,))
        else:
            zeros = mx.zeros((len(codebooks), cfg.audio_vocab_size))
            noise = mx.stack(
                [zeros if s.params.temperature == 0.0 else s.noise(cfg.audio_vocab_size, codebooks) for s in samplers]
            )
        sizes = [
            s.codebook_size
            if not s.params.allow_reserved_codes and s.codebook_size < cfg.audio_vocab_size
            else cfg.audio_vocab_size
            for s in samplers
        ]
        codes = kernels.depth_frame_batch(
            x0.astype(mx.float32), weights.stack, self.decoder._inv_freqs, self.decoder.norm.scale,
            weights.heads, weights.embeddings, weights.projection, noise, cfg.decoder.num_heads,
            cfg.decoder.num_kv_heads, cfg.decoder.rms_norm_eps, weights.group_size, weights.bits,
            temperature=[p.temperature for p in rules], top_k=[p.top_k for p in rules],
            top_p=[p.top_p for p in rules], min_p=[p.min_p for p in rules], codebook_size=sizes,
        )  # fmt: skip
        return mx.concatenate([code0[:, None], codes], axis=1)

    def _decode_frame_ops(self, hidden: mx.array, code0: mx.array, sample: Sampler) -> mx.array:
        """`decode_frame` as MLX ops (and the kernels' per-op choices), over a cache made for this frame."""
        cache = make_cache(self.config.decoder, hidden.shape[0], self.activation_dtype())
        x = mx.stack([kernels.linear(hidden, self.projection), self.embed_code(code0, 0)], axis=1)
        codes = [code0]
        for k in range(1, self.config.num_codebooks):
            out = self.decoder(x, cache)[:, -1, :]
            code = sample(self.decoder_logits(out, k), k)
            codes.append(code)
            x = self.embed_code(code, k)[:, None, :]
        return mx.stack(codes, axis=1)

    def backbone_states(self, tokens: mx.array, mask: mx.array, cache: KVCache) -> mx.array:
        """Every new row's final-norm backbone state, [B, T, hidden]: what `backbone_step` keeps the last of.
        Row t's state gives the logits of codebook 0 of the frame after row t."""
        return self.backbone(self.embed_rows(tokens, mask), cache)

    def teacher_forced_decoder_logits(self, hidden: mx.array, codes: mx.array) -> mx.array:
        """Logits of codebooks 1..N-1 of frames whose codes are given: hidden [B, backbone hidden] (each
        frame's backbone state), codes [B, N] -> [B, N - 1, audio vocab] float32.

        Once a frame's codes are known, so are all of its decoder inputs (the projected state, then codes
        0..N-2), so the frame's positions run as one causal pass over a batch of frames: `decode_frame`'s
        steps without its sampling, for scoring a model on codes it did not pick.
        """
        cfg, dtype = self.config, self.activation_dtype()
        # In the activations' dtype, as `backbone_step` hands it to `decode_frame`.
        rows = [kernels.linear(hidden.astype(dtype), self.projection)]
        rows += [self.embed_code(codes[:, k], k) for k in range(cfg.num_codebooks - 1)]
        cache = make_cache(cfg.decoder, hidden.shape[0], dtype, cfg.num_codebooks)
        out = self.decoder(mx.stack(rows, axis=1), cache)
        return mx.stack([self.decoder_logits(out[:, k], k) for k in range(1, cfg.num_codebooks)], axis=1)

    def _decode_frame_fused(
        self, hidden: mx.array, code0: mx.array, sample: Sampler, weights: StackWeights
    ) -> mx.array:
        """`decode_frame` with every decoder step as one native primitive over the whole stack.

        The two opening rows go in one at a time (causal attention makes that the same computation), and the
        cache is the step's own fp32 arrays, made for this frame.
        """
        cfg = self.config.decoder
        dtype = self.activation_dtype()
        shape = (cfg.num_layers, cfg.num_kv_heads, self.config.num_codebooks, cfg.dim_per_head)
        cache_k, cache_v = mx.zeros(shape), mx.zeros(shape)
        inv_freqs = self.decoder._inv_freqs

        def step(x: mx.array, position: int) -> mx.array:
            h, new_k, new_v = kernels.transformer_step(
                x.astype(mx.float32), weights.arrays, cache_k, cache_v, position, inv_freqs,
                cfg.num_heads, cfg.num_kv_heads, cfg.rms_norm_eps, weights.group_size, weights.bits,
            )  # fmt: skip
            cache_k[:, :, position, :] = new_k
            cache_v[:, :, position, :] = new_v
            return self.decoder.norm(h.astype(dtype))

        step(kernels.linear(hidden, self.projection), 0)
        out = step(self.embed_code(code0, 0), 1)
        codes = [code0]
        for k in range(1, self.config.num_codebooks):
            code = sample(self.decoder_logits(out, k), k)
            codes.append(code)
            if k + 1 < self.config.num_codebooks:
                out = step(self.embed_code(code, k), k + 1)
        return mx.stack(codes, axis=1)

    def _depth_frame_weights(self, decoder: StackWeights | None) -> DepthFrameWeights | None:
        """What `kernels.depth_frame` reads, or None when the decoder stack cannot run fused (`decoder` None)
        or the heads, the audio embeddings and the projection are not all in its format."""
        if decoder is None:
            return None
        stack, group_size, bits = decoder.arrays, decoder.group_size, decoder.bits
        if "bias" in self.projection:
            return None
        if bits in (4, 8):
            parts: list[nn.Module] = []
            for part in (self.audio_head, self.audio_embeddings, self.projection):
                if not isinstance(part, nn.Module) or getattr(part, "mode", "affine") != "affine":
                    return None
                if getattr(part, "group_size", None) != group_size or getattr(part, "bits", None) != bits:
                    return None
                parts.append(part)
            heads, embeddings, projection = ([p["weight"], p["scales"], p["biases"]] for p in parts)
            return DepthFrameWeights(stack, heads, embeddings, projection, group_size, bits)
        dtype = mx.float32 if bits == 0 else mx.bfloat16
        head, table, proj = self.audio_head, self.audio_embeddings["weight"], self.projection["weight"]
        if not isinstance(head, mx.array) or any(a.dtype != dtype for a in (head, table, proj)):
            return None
        return DepthFrameWeights(stack, [head], [table], [proj], group_size, bits)
