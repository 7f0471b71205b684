"""SEANet: Mimi's causal convolutional encoder and decoder, streaming by construction.

Every module maps `(x, state) -> (y, new_state)` on channels-last arrays `[B, T, C]`. The state is what the
module must remember of the past: a convolution keeps its last `kernel - stride` inputs, a transposed
convolution the tail of outputs that overlap the next step. `None` is the state of a fresh stream, so offline
processing is just one call on the whole signal: streaming and offline run the same code.

Weights keep PyTorch's layout in the parameter tree (so checkpoints load by name); `prepare()` derives the
MLX layouts once after loading. Derived arrays start with `_`, which MLX leaves out of the parameter tree.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import mlx.core as mx
import mlx.nn as nn

from csmd import kernels
from csmd.audio.mimi import fastmath
from csmd.audio.mimi.config import SeanetConfig
from csmd.kernels import FEW_ROWS, dense

State = Any  # a module's streaming state: None (fresh), an array, a ResBlockState, or one state per layer (a list)


def elu(x: mx.array) -> mx.array:
    """ELU, ~550 k values per decoded frame: the native SIMD loop on the CPU, else fastmath's MLX ops (nn.elu's
    exp is slow on x86, see fastmath.py). Both compute exp the same way, within 1e-7."""
    if x.dtype == mx.float32 and kernels.native_has("elu"):
        return kernels.native_elu(x)
    return fastmath.elu(x)


class CausalConv1d(nn.Module):
    """Conv1d padded on the left only: output t sees inputs up to the end of its own stride.

    Computed as one matmul over an unfolded window (im2col): at one frame per call the time axis is short, so
    a single large matmul beats MLX's conv kernels, and it lets MLX fuse the bias into the product.
    """

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, bias: bool = True, replicate: bool = False):
        super().__init__()
        if kernel % stride:
            raise ValueError(f"kernel {kernel} is not a multiple of the stride {stride}")
        self.weight = mx.zeros((cout, cin, kernel))
        if bias:
            self.bias = mx.zeros((cout,))
        self.kernel = kernel
        self.stride = stride
        self.context = kernel - stride  # past inputs each call needs
        self.replicate = replicate  # pad a fresh stream with its first step instead of zeros (the downsample)
        self._w = self.weight
        self._packed: mx.array | None = None

    def prepare(self) -> None:
        # [out, (tap, in)], used transposed: each output reads one contiguous weight row, the layout that
        # streaming's few-step products read fastest (BENCHMARKS.md, "Figures moved out of the code").
        cout, cin, k = self.weight.shape
        self._w = self.weight.transpose(0, 2, 1).reshape(cout, k * cin)
        self._packed = kernels.pack_panels(self._w)

    def initial_state(self, batch: int) -> State:
        """Zeros, the left padding of a fresh stream; None for a replicate-padded conv (it needs the input)."""
        if self.replicate or not self.context:
            return None
        return mx.zeros((batch, self.context, self.weight.shape[1]))

    def __call__(
        self, x: mx.array, state: State, elu_input: bool = False, residual: mx.array | None = None
    ) -> tuple[mx.array, State]:
        """One step: conv([state | elu(x) if elu_input else x]) (+ residual), and the new state."""
        if x.shape[1] % self.stride:
            raise ValueError(f"input length {x.shape[1]} is not a multiple of the stride {self.stride}")
        if self.context and state is None:
            first = x[:, :1] if self.replicate else mx.zeros_like(x[:, :1])
            state = mx.repeat(elu(first) if elu_input and self.replicate else first, self.context, axis=1)
        if _native_step(x, "causal_conv_step"):
            weight = _step_weight(self, rows=x.shape[1] // self.stride)
            return kernels.causal_conv_step(
                x, state, weight, self._w.shape[0], self.get("bias"), residual, self.kernel, self.stride, elu_input
            )
        if elu_input:
            x = elu(x)
        if self.context:
            x = mx.concatenate([state, x], axis=1)
            state = x[:, -self.context :]
        y = self._convolve(x)
        return (y if residual is None else residual + y), state

    def _convolve(self, x: mx.array) -> mx.array:
        """The convolution of x, its left context included."""
        steps = (x.shape[1] - self.kernel) // self.stride + 1
        if self._packed is not None and steps > FEW_ROWS and kernels.native_available():
            # Many rows: the native panel GEMM reads each window in place (no unfolded copy).
            return kernels.panel_conv(x, self._packed, self._w.shape[0], self.get("bias"), self.kernel, self.stride)
        windows = _unfold(x, self.kernel, self.stride)
        return _product(windows, self._w, self._packed, self.get("bias"))


def _native_step(x: mx.array, name: str) -> bool:
    """Whether a convolution step of x runs as one fused native primitive (else as MLX ops, the reference)."""
    return x.dtype == mx.float32 and kernels.native_has(name)


def _step_weight(conv: CausalConv1d | CausalConvTranspose1d, rows: int) -> mx.array:
    """What a native step multiplies `rows` rows of each stream by: the panel-packed weights for many rows (the
    GEMM), the weights as they are for a few (the few-row product, which also reads bf16 ones).

    Chosen by one stream's rows, not the batch's: each kernel gives a row the same floats whatever the other
    rows, so a stream decoded in a batch (model.decode_together) gets exactly what it gets alone.
    """
    return conv._packed if rows > FEW_ROWS and conv._packed is not None else conv._w


def _product(x: mx.array, w: mx.array, packed: mx.array | None, bias: mx.array | None) -> mx.array:
    """x [B, T, K] @ w.T (+ bias), by the fastest route for a stream's row count T.

    A few rows (streaming's first layers) are bound by reading the weights: the native few-row product
    (kernels.dense), which also takes bf16 weights. Many rows: the native panel GEMM when the weights were
    packed for it (kernels.pack_panels), else BLAS.
    """
    if x.shape[-2] <= FEW_ROWS:  # one stream's rows (see _step_weight)
        y = dense(x, w)
        return y if bias is None else y + bias
    if packed is not None and kernels.native_available():
        return kernels.panel_matmul(x, packed, w.shape[0], bias)
    w = w.astype(x.dtype)  # (bf16 weights, see Mimi.use_bf16_weights, are computed in fp32)
    return x @ w.T if bias is None else mx.addmm(bias, x, w.T)


def _unfold(x: mx.array, kernel: int, stride: int) -> mx.array:
    """[B, L, C] -> [B, T, kernel * C]: row t holds inputs t * stride ... t * stride + kernel - 1, time-major.

    With kernel a multiple of stride, the window of output t is kernel / stride consecutive blocks of
    `stride` steps, so it is a concatenation of kernel / stride shifted views of the blocked input.
    """
    batch, length, channels = x.shape
    blocks = x.reshape(batch, length // stride, stride * channels)
    span = kernel // stride
    steps = blocks.shape[1] - span + 1
    if span == 1:
        return blocks
    return mx.concatenate([blocks[:, j : j + steps] for j in range(span)], axis=-1)


class CausalConvTranspose1d(nn.Module):
    """ConvTranspose1d with kernel = 2 * stride, trimmed on the right (causal).

    Closed form: y[s*t + j] = W[:, :, j]^T x[t] + W[:, :, j + s]^T x[t - 1] + b, so each step is one matmul
    plus the second half of the previous step's product, which is the state.
    """

    def __init__(self, cin: int, cout: int, stride: int, bias: bool = True, depthwise: bool = False):
        super().__init__()
        self.weight = mx.zeros((cin, 1 if depthwise else cout, 2 * stride))
        if bias:
            self.bias = mx.zeros((cout,))
        self.stride = stride
        self.depthwise = depthwise
        self._w = self.weight
        self._packed: mx.array | None = None

    def prepare(self) -> None:
        if self.depthwise:
            self._w = self.weight[:, 0, :].T  # [k, channels]: a per-channel filter
        else:  # [(tap, out), in], used transposed, as CausalConv1d's
            cin, cout, k = self.weight.shape
            self._w = self.weight.transpose(2, 1, 0).reshape(k * cout, cin)
            self._packed = kernels.pack_panels(self._w)

    def initial_state(self, batch: int) -> State:
        """A fresh stream has no earlier step overlapping its first outputs."""
        cout = self.weight.shape[0] if self.depthwise else self.weight.shape[1]
        return mx.zeros((batch, 1, self.stride, cout))

    def __call__(self, x: mx.array, state: State, elu_input: bool = False) -> tuple[mx.array, State]:
        """One step: the transposed convolution of elu(x) if elu_input else x, and the new state."""
        previous = self.initial_state(x.shape[0]) if state is None else state
        if not self.depthwise and _native_step(x, "conv_transpose_step"):
            weight = _step_weight(self, rows=x.shape[1])
            return kernels.conv_transpose_step(
                x, previous, weight, self.weight.shape[1], self.get("bias"), self.stride, elu_input
            )
        if elu_input:
            x = elu(x)
        batch, steps, _ = x.shape
        s = self.stride
        # [B, T, 2s, C]: what each input step contributes to its own and the next output block
        products = (
            x[:, :, None, :] * self._w
            if self.depthwise
            else _product(x, self._w, self._packed, None).reshape(batch, steps, 2 * s, -1)
        )
        head, tail = products[:, :, :s], products[:, :, s:]
        overlap = mx.concatenate([previous, tail[:, :-1]], axis=1) if steps > 1 else previous
        y = (head + overlap).reshape(batch, steps * s, -1)
        return (y + self.bias if "bias" in self else y), tail[:, -1:]


class ResBlockState(NamedTuple):
    conv: State  # the kernel-k convolution's past inputs
    pointwise: State  # the 1x1 convolution's (None: it needs no past)


class ResBlock(nn.Module):
    """x + conv1x1(elu(conv_k(elu(x)))), Kyutai's pre-activation residual unit with an identity skip."""

    def __init__(self, dim: int, hidden: int, kernel: int):
        super().__init__()
        self.block = [nn.ELU(), CausalConv1d(dim, hidden, kernel), nn.ELU(), CausalConv1d(hidden, dim, 1)]

    def __call__(self, x: mx.array, state: ResBlockState | None) -> tuple[mx.array, ResBlockState]:
        state = state or ResBlockState(None, None)
        h, conv = self.block[1](x, state.conv, elu_input=True)
        y, pointwise = self.block[3](h, state.pointwise, elu_input=True, residual=x)
        return y, ResBlockState(conv, pointwise)

    def initial_state(self, batch: int) -> ResBlockState:
        return ResBlockState(self.block[1].initial_state(batch), self.block[3].initial_state(batch))


def _run(layers: list[nn.Module], x: mx.array, state: State) -> tuple[mx.array, State]:
    """Apply a Kyutai-numbered layer list; ELUs are stateless, everything else threads its state. An ELU
    before a convolution is applied by that convolution's step (fused there on the native path)."""
    state = state or [None] * len(layers)
    new_state: list[State] = []
    elu_pending = False
    for layer, layer_state in zip(layers, state, strict=True):
        if isinstance(layer, nn.ELU):
            if elu_pending:
                x = elu(x)
            elu_pending = True
            new_state.append(None)
            continue
        if isinstance(layer, CausalConv1d | CausalConvTranspose1d):
            x, layer_state = layer(x, layer_state, elu_input=elu_pending)
        else:
            if elu_pending:
                x = elu(x)
            x, layer_state = layer(x, layer_state)
        elu_pending = False
        new_state.append(layer_state)
    return (elu(x) if elu_pending else x), new_state


def _initial_state(layers: list[nn.Module], batch: int) -> State:
    return [None if isinstance(layer, nn.ELU) else layer.initial_state(batch) for layer in layers]


class SeanetEncoder(nn.Module):
    """Waveform [B, T, 1] -> latent [B, T / hop, dimension]."""

    def __init__(self, cfg: SeanetConfig):
        super().__init__()
        channels = cfg.n_filters
        layers: list[nn.Module] = [CausalConv1d(1, channels, cfg.kernel_size)]
        for ratio in reversed(cfg.ratios):
            layers += [
                ResBlock(channels, channels // cfg.compress, cfg.residual_kernel_size),
                nn.ELU(),
                CausalConv1d(channels, 2 * channels, 2 * ratio, stride=ratio),
            ]
            channels *= 2
        layers += [nn.ELU(), CausalConv1d(channels, cfg.dimension, cfg.last_kernel_size)]
        self.layers = layers

    def __call__(self, x: mx.array, state: State) -> tuple[mx.array, State]:
        return _run(self.layers, x, state)

    def initial_state(self, batch: int) -> State:
        return _initial_state(self.layers, batch)


class SeanetDecoder(nn.Module):
    """Latent [B, T, dimension] -> waveform [B, T * hop, 1]."""

    def __init__(self, cfg: SeanetConfig):
        super().__init__()
        channels = cfg.n_filters * 2 ** len(cfg.ratios)
        layers: list[nn.Module] = [CausalConv1d(cfg.dimension, channels, cfg.kernel_size)]
        for ratio in cfg.ratios:
            layers += [
                nn.ELU(),
                CausalConvTranspose1d(channels, channels // 2, stride=ratio),
                ResBlock(channels // 2, channels // 2 // cfg.compress, cfg.residual_kernel_size),
            ]
            channels //= 2
        layers += [nn.ELU(), CausalConv1d(channels, 1, cfg.last_kernel_size)]
        self.layers = layers

    def __call__(self, x: mx.array, state: State) -> tuple[mx.array, State]:
        return _run(self.layers, x, state)

    def initial_state(self, batch: int) -> State:
        return _initial_state(self.layers, batch)


def prepare(module: nn.Module) -> None:
    """Derive every conv's MLX-layout weights from its (just loaded) PyTorch-layout parameters."""
    for _, child in module.named_modules():
        if isinstance(child, CausalConv1d | CausalConvTranspose1d):
            child.prepare()


# -- streams batched together (model.decode_together) ---------------------------------------------------------


def stack_states(states: list[State]) -> State:
    """The states of several streams as one batch: every array concatenated along its batch axis (the first),
    the structure (lists, ResBlockStates, None) kept."""
    first = states[0]
    if first is None:
        if any(state is not None for state in states):
            raise ValueError("cannot batch a fresh convolution state with a running one")
        return None
    if isinstance(first, mx.array):
        return mx.concatenate(states) if len(states) > 1 else first
    if isinstance(first, ResBlockState):
        return ResBlockState(*(stack_states(list(parts)) for parts in zip(*states, strict=True)))
    return [stack_states(list(parts)) for parts in zip(*states, strict=True)]


def split_state(state: State, batch: int) -> list[State]:
    """The inverse of stack_states for a batch of `batch` streams of one row each (views of the arrays)."""
    if state is None:
        return [None] * batch
    if isinstance(state, mx.array):
        return [state[b : b + 1] for b in range(batch)]
    if isinstance(state, ResBlockState):
        return [ResBlockState(*parts) for parts in zip(*(split_state(part, batch) for part in state), strict=True)]
    if not state:
        return [[] for _ in range(batch)]
    return [list(parts) for parts in zip(*(split_state(part, batch) for part in state), strict=True)]
