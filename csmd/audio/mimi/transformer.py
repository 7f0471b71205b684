"""Mimi's encoder/decoder transformer: 8 pre-norm layers, LayerScale, exact GELU, interleaved RoPE on 25 Hz
positions, and a causal window of `context` steps (each step sees itself and the 249 before it).

Streaming state: per layer the keys and values of the last `context - 1` steps (stacked over layers), plus the
absolute position of the next step, one per batch row (an array, so a compiled step is reused at every position).
Each batch row is a stream of its own: rows may be at different positions (streams of different ages decoded
in one batch, see model.decode_together), so the RoPE angles, the ring slots and the mask are per row. That is all a
new step can attend to, so memory stays flat however long the stream, and a step sees exactly what it would
see offline: streaming equals offline at any length. The key/value buffers have that fixed size from the first
step on (slots before the stream's start are zeros that the mask hides), so every step has the same shapes.
They are rings: the step at position p lives in slot p mod (context - 1), so a call writes only its own
steps' slots instead of shifting the whole window (16 MB of memory traffic per decoded frame). Attention does
not care about the order of its keys; the mask finds each slot's position. A call's own steps join the rings
at the start of the next call (the state carries them until then): the write is then the first thing to
touch the rings, so MLX can donate their buffers to it and it writes in place (when the caller has let go of
the old state; a parked snapshot still holding them gets a copy instead).
(Kyutai's PyTorch ring holds `context` slots and is written before it is read, so for streams past the window
the first of each pair of steps there sees one key fewer than offline; csmd follows the offline definition.)

A few steps at a time (streaming) the whole stack runs as one native primitive when csmd_native is loaded
(native/src/mimi.cpp, tested against these MLX layers); longer chunks run the MLX layers below.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn

from csmd import kernels
from csmd.audio.mimi.config import MimiTransformerConfig
from csmd.audio.mimi.fastmath import gelu, softmax
from csmd.kernels import dense

KeyValues = tuple[mx.array, mx.array]  # [B, context - 1, d_model] each: past keys, values (rings, see above)


class TransformerState(NamedTuple):
    """A MimiTransformer stream's state (a pytree of arrays: MLX's compile and eval take it as it is)."""

    position: mx.array  # int32 [B]: each row's absolute position of its next step
    past_keys: mx.array  # [layers, B, context - 1, d_model]: rings of the steps before the previous call's
    past_values: mx.array
    last_keys: mx.array  # [layers, B, T', d_model]: the previous call's T' steps, for the rings at the next call
    last_values: mx.array


def _per_row(position: mx.array) -> mx.array:
    """[B] (or [1]: one for every row, as the native kernels also take it) from a position per row or one."""
    return position.reshape(-1)


def ring_positions(position: mx.array, past: int) -> mx.array:
    """[B, past]: the position of the step in each ring slot of each row, before a call at `position` [B]
    (negative: none yet)."""
    position = _per_row(position)[:, None]
    return position - past + mx.remainder(mx.arange(past) - position, past)


def ring_slots(position: mx.array, steps: mx.array, past: int) -> mx.array:
    """[B, len(steps)]: each row's ring slot of its steps `position + steps` (position [B])."""
    return mx.remainder(_per_row(position)[:, None] + steps, past)


def ring_write(ring: mx.array, rows: mx.array, position: mx.array) -> mx.array:
    """ring [L, B, P, D] with rows [L, B, T, D] (row b's steps position[b] ... position[b] + T - 1) in their
    slots; the last P steps stay. The MLX reference of the native kernels.mimi_ring_write."""
    past, steps = ring.shape[-2], rows.shape[-2]
    kept = min(steps, past)
    if kept == 0:
        return ring
    slots = ring_slots(position, mx.arange(steps - kept, steps), past)  # [B, kept]
    index = mx.broadcast_to(slots[None, :, :, None], (*ring.shape[:-2], kept, ring.shape[-1]))
    return mx.put_along_axis(ring, index, rows[..., steps - kept :, :], axis=-2)


def attention_bias(position: mx.array, steps: int, past: int, context: int) -> mx.array:
    """[B, 1, steps, past + steps] additive mask (per row, for all heads): 0 where query may see key, a large
    negative number elsewhere.

    Row b's query i is at position[b] + i; keys are the past ring's slots (ring_positions), then the new steps.
    Allowed: 0 <= q - k < context, and the key must exist (position >= 0). Finite, not -inf: fastmath.softmax
    subtracts the row max first.
    """
    new = _per_row(position)[:, None] + mx.arange(steps)  # [B, steps]
    key_position = mx.concatenate([ring_positions(position, past), new], axis=1)  # [B, past + steps]
    delta = new[:, :, None] - key_position[:, None, :]
    allowed = (delta >= 0) & (delta < context) & (key_position >= 0)[:, None, :]
    return mx.where(allowed, 0.0, -1e9)[:, None]


def rope(x: mx.array, position: mx.array, max_period: float) -> mx.array:
    """Interleaved rotary embedding of x [..., B, H, T, D]: row b's steps position[b] ... position[b] + T - 1.

    Kyutai's weights pair dims (2i, 2i+1) (the "traditional" layout), with angle (position + t) * f_i and
    f_i = max_period^(-2i / D), all in fp32 as in moshi. Written as elementwise ops, which mx.compile fuses,
    rather than mx.fast.rope, which on the CPU is a kernel call of its own (BENCHMARKS.md, "Figures moved out
    of the code").
    """
    steps, dims = x.shape[-2], x.shape[-1]
    freqs = mx.exp(mx.arange(0, dims, 2, dtype=mx.float32) * (-math.log(max_period) / dims))
    steps_at = (_per_row(position)[:, None] + mx.arange(steps)).astype(mx.float32)  # [B, T]
    angles = steps_at[:, None, :, None] * freqs  # [B, 1, T, D / 2]: one set for all heads
    cos = mx.repeat(mx.cos(angles), 2, axis=-1)  # [B, 1, T, D]: each pair's angle twice
    sin = mx.repeat(mx.sin(angles), 2, axis=-1) * mx.array([-1.0, 1.0] * (dims // 2))
    swapped = x.reshape(*x.shape[:-1], dims // 2, 2)[..., ::-1].reshape(x.shape)  # (x1, x0) per pair
    return x * cos + swapped * sin  # (x0 cos - x1 sin, x1 cos + x0 sin)


class Attention(nn.Module):
    def __init__(self, cfg: MimiTransformerConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.max_period = cfg.max_period
        self.in_proj = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.out_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def __call__(self, x: mx.array, position: mx.array, bias: mx.array, past: KeyValues) -> tuple[mx.array, KeyValues]:
        batch, steps, dims = x.shape
        heads, head_dim = self.num_heads, dims // self.num_heads
        qkv = dense(x, self.in_proj.weight).reshape(batch, steps, 3, heads, head_dim).transpose(2, 0, 3, 1, 4)
        q, k = rope(qkv[:2], position, self.max_period)
        # Keys and values are kept time-major, [B, time, heads * head_dim], as in_proj makes them.
        keys = mx.concatenate([past[0], k.transpose(0, 2, 1, 3).reshape(batch, steps, dims)], axis=1)
        values = mx.concatenate([past[1], qkv[2].transpose(0, 2, 1, 3).reshape(batch, steps, dims)], axis=1)
        attend = _attend_few if steps <= _FEW_STEPS else _attend_many
        out = attend(q * head_dim**-0.5, keys, values, bias)  # [B, T, dims]
        # the output, and the new steps' keys and values (the stack writes them into the rings next call)
        return dense(out, self.out_proj.weight), (keys[:, -steps:], values[:, -steps:])


# Up to this many query steps (a streaming frame has 2), attention runs as two plain matmuls over all heads
# at once; beyond it, as per-head batched matmuls.
_FEW_STEPS = 8


def _attend_few(q: mx.array, keys: mx.array, values: mx.array, bias: mx.array) -> mx.array:
    """q [B, H, T, D], keys/values [B, S, H * D], bias [B, 1, T, S] -> [B, T, H * D], for small T.

    Per-head matmuls this small cost a BLAS call each, mostly its thread handoff (16 per layer), so all
    heads go through one matmul: q is spread block-diagonally over [B, H * T, H * D] (head h's row holds q in
    head h's columns, zeros elsewhere), which against the time-major keys gives every head's scores. The
    same product with the values gives each head's output in its own column block. 8x the (tiny) FLOPs.
    """
    batch, heads, steps, head_dim = q.shape
    block = mx.eye(heads, dtype=q.dtype)[:, None, :, None]  # [H, 1, H, 1]: head h's rows x column blocks
    q_blocks = (q[:, :, :, None, :] * block).reshape(batch, heads * steps, heads * head_dim)
    scores = (q_blocks @ keys.swapaxes(1, 2)).reshape(batch, heads, steps, -1) + bias
    mixed = softmax(scores).reshape(batch, heads * steps, -1) @ values  # [B, H * T, H * D]
    out = (mixed.reshape(batch, heads, steps, heads, head_dim) * block).sum(axis=3)  # keep own head's block
    return out.transpose(0, 2, 1, 3).reshape(batch, steps, heads * head_dim)


def _attend_many(q: mx.array, keys: mx.array, values: mx.array, bias: mx.array) -> mx.array:
    """As _attend_few, with one matmul per head: right when T is large (offline chunks)."""
    batch, heads, steps, head_dim = q.shape

    def by_head(a: mx.array) -> mx.array:
        return a.reshape(batch, -1, heads, head_dim).transpose(0, 2, 1, 3)

    out = softmax(q @ by_head(keys).swapaxes(-1, -2) + bias) @ by_head(values)
    return out.transpose(0, 2, 1, 3).reshape(batch, steps, heads * head_dim)


class MLP(nn.Module):
    def __init__(self, cfg: MimiTransformerConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.d_model, cfg.dim_feedforward, bias=False)
        self.fc2 = nn.Linear(cfg.dim_feedforward, cfg.d_model, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return dense(gelu(dense(x, self.fc1.weight)), self.fc2.weight)  # exact (erf) GELU, as trained


class Layer(nn.Module):
    def __init__(self, cfg: MimiTransformerConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.layer_scale_1 = mx.ones((cfg.d_model,))
        self.norm2 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.layer_scale_2 = mx.ones((cfg.d_model,))

    def __call__(self, x: mx.array, position: mx.array, bias: mx.array, past: KeyValues) -> tuple[mx.array, KeyValues]:
        h, past = self.attn(self.norm1(x), position, bias, past)
        x = x + self.layer_scale_1 * h
        return x + self.layer_scale_2 * self.mlp(self.norm2(x)), past


class MimiTransformer(nn.Module):
    """[B, T, d_model] -> [B, T, d_model], with a `TransformerState`.

    The pasts are rings stacked over layers, the layout of the native step; the last keys and values are the
    previous call's steps, which join the rings at the start of this call (see the module's docstring).
    """

    def __init__(self, cfg: MimiTransformerConfig):
        super().__init__()
        self.config = cfg
        self.layers = [Layer(cfg) for _ in range(cfg.num_layers)]
        self._panel_weights: list[mx.array] | None = None  # native_weights with packed projections (pack_panels)

    def pack_panels(self) -> None:
        """Have the native step multiply by panel-packed copies of the fp32 projections (kernels.pack_panels;
        bf16 ones stay as they are), from now until the weights change (call it again then).

        For a stack that decodes several streams in one batch (model.decode_together): at a few streams' rows
        the few-row product is bound by its arithmetic, which the panel GEMM does at about twice the rate,
        while at one stream's two rows both are bound by reading the weights. Both kernels give a row the
        same floats whatever the other rows, but not each other's: a stream batched or alone must meet the
        same one, so the choice is the stack's, not the batch size's. Costs a second copy of the projections.
        """
        self._panel_weights = None
        weights = self.native_weights()
        packed = [kernels.pack_panels(w) if w.ndim == 2 and w.dtype == mx.float32 else None for w in weights]
        if any(p is not None for p in packed):
            self._panel_weights = [w if p is None else p for w, p in zip(weights, packed, strict=True)]
            mx.eval(self._panel_weights)

    def initial_state(self, batch: int) -> TransformerState:
        cfg = self.config
        past = (cfg.num_layers, batch, cfg.context - 1, cfg.d_model)
        last = (cfg.num_layers, batch, 0, cfg.d_model)
        return TransformerState(
            mx.zeros((batch,), dtype=mx.int32), mx.zeros(past), mx.zeros(past), mx.zeros(last), mx.zeros(last)
        )

    def __call__(self, x: mx.array, state: TransformerState | None) -> tuple[mx.array, TransformerState]:
        state = state if state is not None else self.initial_state(x.shape[0])
        position = state.position
        start = position - state.last_keys.shape[2]
        # The whole stack as one native primitive when the extension is loaded: at a streaming frame's 2 rows
        # the ~40 MLX ops of a layer cost more to dispatch than their arithmetic, and at an offline chunk's
        # 250 rows it is still faster than the MLX layers (BENCHMARKS.md, "Mimi codec").
        if kernels.mimi_transformer_available():
            past_k = kernels.mimi_ring_write(state.past_keys, state.last_keys, start)
            past_v = kernels.mimi_ring_write(state.past_values, state.last_values, start)
            y, new_k, new_v = self._native(x, position, past_k, past_v)
        else:
            past_k = ring_write(state.past_keys, state.last_keys, start)
            past_v = ring_write(state.past_values, state.last_values, start)
            bias = attention_bias(position, x.shape[1], past_k.shape[2], self.config.context)
            keys, values = [], []
            y = x
            for i, layer in enumerate(self.layers):
                y, (k, v) = layer(y, position, bias, (past_k[i], past_v[i]))
                keys.append(k)
                values.append(v)
            new_k, new_v = mx.stack(keys), mx.stack(values)
        return y, TransformerState(position + x.shape[1], past_k, past_v, new_k, new_v)

    def _native(self, x: mx.array, position: mx.array, past_k: mx.array, past_v: mx.array) -> tuple[mx.array, ...]:
        cfg = self.config
        head_dim = cfg.d_model // cfg.num_heads
        inv_freqs = mx.exp(mx.arange(0, head_dim, 2, dtype=mx.float32) * (-math.log(cfg.max_period) / head_dim))
        return kernels.mimi_transformer(
            x, self.native_weights(), past_k, past_v, position, inv_freqs, cfg.num_heads, cfg.context, cfg.norm_eps
        )

    def native_weights(self) -> list[mx.array]:
        """The native step's weight list: 10 per layer, in the order of csmd_native.mimi_transformer."""
        if self._panel_weights is not None:
            return self._panel_weights
        weights = []
        for layer in self.layers:
            attn, mlp = layer.attn, layer.mlp
            weights += [layer.norm1.weight, layer.norm1.bias, attn.in_proj.weight, attn.out_proj.weight]
            weights += [layer.layer_scale_1, layer.norm2.weight, layer.norm2.bias, mlp.fc1.weight, mlp.fc2.weight]
            weights.append(layer.layer_scale_2)
        return weights


# -- streams batched together: states stacked along the batch axis, and split back ------------------------------


def stack_states(states: list[TransformerState], last_steps: int = 0) -> TransformerState:
    """One state whose batch rows are the given states' rows, in order (each state any batch size).

    The previous call's steps (last_keys, last_values) must have one length T' in a batch: a fresh stream has
    none, a running one the steps of its last frame. Shorter ones are lengthened to the longest (and to at least
    `last_steps`) at the front with the steps before them as the ring holds them: writing those back into the
    ring at the next call leaves it as it was (zeros, masked, for a stream too young to have them), so every
    row continues exactly as its stream would alone.
    """
    steps = max([last_steps, *(state.last_keys.shape[2] for state in states)])
    states = [_with_last_steps(state, steps) for state in states]
    if len(states) == 1:
        return states[0]
    rings = (mx.concatenate([state[i] for state in states], axis=1) for i in range(1, len(TransformerState._fields)))
    return TransformerState(mx.concatenate([state.position for state in states]), *rings)


def split_state(state: TransformerState) -> list[TransformerState]:
    """The state of each batch row, as a batch of one (views of the batch's arrays)."""
    return [
        TransformerState(state.position[b : b + 1], *(part[:, b : b + 1] for part in state[1:]))
        for b in range(state.position.shape[0])
    ]


def _with_last_steps(state: TransformerState, steps: int) -> TransformerState:
    """`state` with `steps` (>= its own) previous-call steps: the missing ones read from the ring."""
    missing = steps - state.last_keys.shape[2]
    if missing == 0:
        return state
    past = state.past_keys.shape[2]
    if past == 0:  # (a window of one step: nothing is ever written to the ring)
        pad = mx.zeros((*state.last_keys.shape[:2], missing, state.last_keys.shape[3]))
        return state._replace(
            last_keys=mx.concatenate([pad, state.last_keys], axis=2),
            last_values=mx.concatenate([pad, state.last_values], axis=2),
        )
    # (steps older than the ring's window are read from whatever slot they map to: the next write keeps only
    # the last `past` steps, so those are never written back)
    start = state.position - state.last_keys.shape[2] - missing  # [B]: the first missing step of each row
    slots = ring_slots(start, mx.arange(missing), past)[None, :, :, None]  # [1, B, missing, 1]

    def lengthened(last: mx.array, ring: mx.array) -> mx.array:
        index = mx.broadcast_to(slots, (ring.shape[0], ring.shape[1], missing, ring.shape[3]))
        return mx.concatenate([mx.take_along_axis(ring, index, axis=2), last], axis=2)

    return state._replace(
        last_keys=lengthened(state.last_keys, state.past_keys),
        last_values=lengthened(state.last_values, state.past_values),
    )
