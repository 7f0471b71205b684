"""The native kernels of Mimi's streaming codec against their references.

* csmd_native.matmul with 2..8 rows (kernels/fewrows.h) against a float64 numpy product: fp32 accumulation
  in another order, so within 1e-5 of the sum of the magnitudes of each output's terms.
* csmd_native.panel_matmul (kernels/panel_gemm.h, weights packed by csmd.kernels.pack_panels) against the
  same float64 product, with and without a bias.
* csmd_native.elu against float64 expm1 and fastmath.elu (the MLX reference, same formula).
* csmd_native.mimi_transformer and mimi_ring_write against the MLX layers of csmd/audio/mimi/transformer.py
  (the path that the parity tests hold to moshi and transformers), over more steps than the attention window,
  batched; the ring write in place when its owner let go of the ring, and a copy when the ring is held.
* csmd_native.causal_conv_step and conv_transpose_step (SEANet's steps with their ELU, state, bias and residual
  fused in) against seanet.py's MLX ops over a streamed decoder and encoder: the same floats.
* Views (transposed, strided, broadcast) as inputs of the primitives, gathered when the primitive runs.
"""

from __future__ import annotations

import os

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from csmd import kernels
from csmd.audio.mimi import fastmath
from csmd.audio.mimi.config import MimiTransformerConfig
from csmd.audio.mimi.loading import load_mimi
from csmd.audio.mimi.model import StreamingDecoder
from csmd.audio.mimi.transformer import MimiTransformer, TransformerState, ring_write

if os.environ.get("CSMD_REQUIRE_NATIVE") == "1":
    import csmd_native
else:
    csmd_native = pytest.importorskip("csmd_native")

VARIANTS = ["scalar", "auto"]


@pytest.fixture(autouse=True)
def _auto_variant():
    yield
    csmd_native.set_variant("auto")


# rows, in, out; the last two past fewrows.h's kFewRowsXBytes of x (weight rows in pairs, an odd one left)
SHAPES = [(2, 512, 96), (3, 37, 5), (5, 100, 33), (7, 40, 9), (8, 64, 130), (4, 8, 1), (2, 3584, 3), (3, 2001, 6)]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize(("rows", "k", "n"), SHAPES)
def test_few_row_matmul(variant: str, dtype: mx.Dtype, rows: int, k: int, n: int) -> None:
    csmd_native.set_variant(variant)
    rng = np.random.default_rng(rows * 1000 + k)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    w = mx.array(rng.standard_normal((n, k)).astype(np.float32)).astype(dtype)
    w64 = np.array(w.astype(mx.float32)).astype(np.float64)  # the weights as stored (bf16-rounded)
    out = np.array(csmd_native.matmul(mx.array(x), w))
    expected = x.astype(np.float64) @ w64.T
    magnitude = np.abs(x).astype(np.float64) @ np.abs(w64).T
    assert out.shape == (rows, n)
    assert np.all(np.abs(out - expected) <= 1e-5 * magnitude + 1e-30)


def _stack(cfg: MimiTransformerConfig, seed: int, weights: mx.Dtype) -> MimiTransformer:
    """A transformer with random weights of realistic scale (LayerScale and norms not at their init)."""
    stack = MimiTransformer(cfg)
    params = {}
    for i, (name, value) in enumerate(tree_flatten(stack.parameters())):
        noise = mx.random.normal(value.shape, key=mx.random.key(seed * 1000 + i))
        if name.endswith("weight") and value.ndim == 2:  # projections
            params[name] = (noise * value.shape[1] ** -0.5).astype(weights)
        elif "norm" in name and name.endswith("weight"):
            params[name] = 1.0 + 0.1 * noise
        else:  # norm biases, layer scales
            params[name] = 0.1 * noise
    stack.update(tree_unflatten(list(params.items())))
    mx.eval(stack.parameters())
    return stack


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("panels", [False, True])  # the projections as they are (fewrows.h) or packed (panel GEMM)
# streaming steps, and offline chunks longer than the window
@pytest.mark.parametrize(("batch", "steps"), [(1, 2), (2, 1), (2, 3), (1, 13), (2, 25)])
def test_mimi_transformer_matches_mlx_layers(variant: str, panels: bool, batch: int, steps: int) -> None:
    """The native step (mimi_ring_write, then mimi_transformer) against the MLX layers, state and all."""
    csmd_native.set_variant(variant)
    # F 136: the packed fc1 ends in a part panel
    cfg = MimiTransformerConfig(d_model=64, num_heads=4, num_layers=2, dim_feedforward=136, context=10)
    stack = _stack(cfg, seed=batch * 10 + steps, weights=mx.float32)
    if panels:
        stack.pack_panels()
        assert stack.native_weights()[2].ndim == 3
    rng = np.random.default_rng(batch * 10 + steps)
    assert kernels.mimi_transformer_available()
    native_state = reference_state = stack.initial_state(batch)
    for _ in range(9):  # 9 calls of up to 3 steps: well past the 10-step window
        x = mx.array(rng.standard_normal((batch, steps, cfg.d_model)).astype(np.float32))
        y, native_state = stack(x, native_state)
        reference, reference_state = _mlx_layers(stack, x, reference_state)
        np.testing.assert_allclose(np.array(y), np.array(reference), rtol=1e-4, atol=1e-5)
        for native_part, reference_part in zip(native_state, reference_state, strict=True):
            np.testing.assert_allclose(np.array(native_part), np.array(reference_part), rtol=1e-4, atol=1e-5)


def _address(a: mx.array) -> int:
    return np.asarray(a).__array_interface__["data"][0]


def test_ring_write_in_place_unless_the_ring_is_held() -> None:
    """mimi_ring_write writes the ring's buffer in place once its owner has let go of it; while anything else
    holds the ring (a parked stream), it writes a copy and the held ring keeps its values. Both as the MLX
    ring_write, including more rows than the ring has slots (only the last P stay)."""
    rng = np.random.default_rng(5)
    for steps in (2, 7):
        start = np.array(rng.standard_normal((2, 1, 5, 8)), dtype=np.float32)  # [L, B, P, D]
        rows = mx.array(rng.standard_normal((2, 1, steps, 8)).astype(np.float32))
        position = mx.array(13, dtype=mx.int32)
        want = np.array(ring_write(mx.array(start), rows, position))
        assert not np.array_equal(want, start)

        held = mx.array(start)
        mx.eval(held)
        out = csmd_native.mimi_ring_write(held, rows, position)
        mx.eval(out)
        np.testing.assert_array_equal(np.array(out), want)
        np.testing.assert_array_equal(np.array(held), start)
        assert _address(out) != _address(held)

        ring = mx.array(start)
        mx.eval(ring)
        address = _address(ring)
        out = csmd_native.mimi_ring_write(ring, rows, position)
        del ring
        mx.eval(out)
        assert _address(out) == address
        np.testing.assert_array_equal(np.array(out), want)


def test_streaming_decoder_updates_its_rings_in_place() -> None:
    """A decoder step writes the transformer's key/value rings in place (no copy of the window per frame),
    and a snapshot taken in between keeps its own values."""
    mimi = load_mimi("random:tiny")
    decoder = StreamingDecoder(mimi)
    codes = np.random.default_rng(2).integers(0, mimi.config.quantizer.bins, size=(mimi.num_codebooks, 6))

    def rings() -> tuple[int, int]:
        state = decoder.snapshot().state
        assert state is not None
        return _address(state.transformer.past_keys), _address(state.transformer.past_values)

    decoder.step(codes[:, 0])  # a stream's first step allocates them
    for t in range(1, 4):
        before = rings()
        decoder.step(codes[:, t])
        assert rings() == before
    parked = decoder.snapshot().state
    assert parked is not None
    kept = np.array(parked.transformer.past_keys)
    decoder.step(codes[:, 4])
    decoder.step(codes[:, 5])
    np.testing.assert_array_equal(np.array(parked.transformer.past_keys), kept)


def _mlx_layers(stack: MimiTransformer, x: mx.array, state: TransformerState) -> tuple[mx.array, TransformerState]:
    """The stack's MLX path, whatever the extension: CSMD_KERNELS=reference for the call."""
    previous = os.environ.get("CSMD_KERNELS")
    os.environ["CSMD_KERNELS"] = "reference"
    try:
        y, new_state = stack(x, state)
        mx.eval(y, new_state)
    finally:
        if previous is None:
            del os.environ["CSMD_KERNELS"]
        else:
            os.environ["CSMD_KERNELS"] = previous
    return y, new_state


def test_mimi_transformer_bf16_weights_close_to_fp32() -> None:
    """bfloat16 projections (computed in fp32) stay within bf16's rounding of the fp32 result."""
    cfg = MimiTransformerConfig(d_model=64, num_heads=4, num_layers=2, dim_feedforward=128, context=10)
    stack = _stack(cfg, seed=3, weights=mx.float32)
    weights = stack.native_weights()
    halves = [w.astype(mx.bfloat16) if w.ndim == 2 else w for w in weights]
    state = stack.initial_state(1)
    x = mx.array(np.random.default_rng(3).standard_normal((1, 2, cfg.d_model)).astype(np.float32))
    inv_freqs = mx.exp(mx.arange(0, 16, 2, dtype=mx.float32) * (-np.log(cfg.max_period) / 16))
    args = (state.past_keys, state.past_values, state.position, inv_freqs, cfg.num_heads, cfg.context)
    full = np.array(csmd_native.mimi_transformer(x, weights, *args)[0])
    half = np.array(csmd_native.mimi_transformer(x, halves, *args)[0])
    assert np.linalg.norm(half - full) / np.linalg.norm(full) < 2e-2


def test_mimi_transformer_rejects_bad_shapes() -> None:
    cfg = MimiTransformerConfig(d_model=64, num_heads=4, num_layers=2, dim_feedforward=128, context=10)
    stack = _stack(cfg, seed=0, weights=mx.float32)
    state = stack.initial_state(1)
    position, past_k, past_v, last_k = state.position, state.past_keys, state.past_values, state.last_keys
    x = mx.zeros((1, 2, 64))
    inv_freqs = mx.zeros((8,))
    with pytest.raises(ValueError, match="10 arrays per layer"):
        csmd_native.mimi_transformer(x, stack.native_weights()[:-1], past_k, past_v, position, inv_freqs, 4, 10)
    mispacked = list(stack.native_weights())
    mispacked[2] = kernels.pack_panels(mispacked[2])[:, :-1]  # in_proj packed, one input column short
    with pytest.raises(ValueError, match="or a float32 one packed in panels"):
        csmd_native.mimi_transformer(x, mispacked, past_k, past_v, position, inv_freqs, 4, 10)
    with pytest.raises(ValueError, match="past keys/values"):
        csmd_native.mimi_transformer(x, stack.native_weights(), past_k[:, :, 1:], past_v, position, inv_freqs, 4, 10)
    with pytest.raises(ValueError, match="rows must be float32"):
        csmd_native.mimi_ring_write(past_k, last_k[:, :, :, 1:], position)
    with pytest.raises(ValueError, match=r"position must be int32 \[B\]"):
        csmd_native.mimi_ring_write(past_k, last_k, position.astype(mx.float32))
    three = mx.zeros((3,), dtype=mx.int32)  # a position for each of 3 rows, for a batch of 1
    with pytest.raises(ValueError, match=r"position must be int32 \[B\]"):
        csmd_native.mimi_ring_write(past_k, last_k, three)
    with pytest.raises(ValueError, match=r"position must be int32 \[B\]"):
        csmd_native.mimi_transformer(x, stack.native_weights(), past_k, past_v, three, inv_freqs, 4, 10)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_few_row_matmul_threaded_jobs(threads: int) -> None:
    """Many back-to-back products split into chunks that the threads claim: each chunk done exactly once."""
    before = csmd_native.num_threads()
    csmd_native.set_num_threads(threads)
    try:
        rng = np.random.default_rng(threads)
        w = rng.standard_normal((4096, 64)).astype(np.float32)  # 16 chunks of 64 KB: 4 per thread and more
        x = rng.standard_normal((3, 64)).astype(np.float32)
        expected = x.astype(np.float64) @ w.astype(np.float64).T
        outs = [csmd_native.matmul(mx.array(x), mx.array(w)) for _ in range(50)]
        mx.eval(outs)
        for out in outs:
            np.testing.assert_allclose(np.array(out), expected, rtol=1e-4, atol=1e-4)
    finally:
        csmd_native.set_num_threads(before)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize(
    ("rows", "k", "n"),
    [
        *[(1, 5, 3), (7, 33, 17), (96, 256, 160), (1922, 64, 32), (13, 8, 48), (1920, 13, 1), (5, 192, 1)],
        *[(100, 40, 37), (200, 1100, 130)],  # row tiles through every panel, a part panel last; weights past L2
    ],
)
def test_panel_matmul(variant: str, with_bias: bool, rows: int, k: int, n: int) -> None:
    csmd_native.set_variant(variant)
    rng = np.random.default_rng(rows + k + n)
    x = rng.standard_normal((1, rows, k)).astype(np.float32)  # leading dims pass through
    w = rng.standard_normal((n, k)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32) if with_bias else None
    packed = kernels.pack_panels(mx.array(w))
    assert packed is not None and packed.shape == (-(-n // 16), k, 16)
    out = np.array(csmd_native.panel_matmul(mx.array(x), packed, n, None if bias is None else mx.array(bias)))
    expected = x.astype(np.float64) @ w.astype(np.float64).T + (0.0 if bias is None else bias)
    magnitude = np.abs(x).astype(np.float64) @ np.abs(w).astype(np.float64).T + (0.0 if bias is None else np.abs(bias))
    assert out.shape == (1, rows, n)
    assert np.all(np.abs(out - expected) <= 1e-5 * magnitude + 1e-30)


def test_panel_matmul_rejects_a_mispacked_weight() -> None:
    w = mx.zeros((20, 8))
    with pytest.raises(ValueError, match="ceil"):
        csmd_native.panel_matmul(mx.zeros((3, 8)), w, 20)
    with pytest.raises(ValueError, match="bias"):
        csmd_native.panel_matmul(mx.zeros((3, 8)), kernels.pack_panels(w), 20, mx.zeros((19,)))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(
    ("batch", "length", "channels", "kernel", "stride", "n"),
    [(1, 1922, 64, 3, 1, 32), (2, 40, 12, 8, 4, 20), (1, 9, 5, 1, 1, 7), (2, 1922, 64, 3, 1, 1)],  # n 1: row dots
)
def test_panel_conv_equals_unfolded_product(
    variant: str, batch: int, length: int, channels: int, kernel: int, stride: int, n: int
) -> None:
    """panel_conv reads each output's window in place: the same as the product of the unfolded windows."""
    csmd_native.set_variant(variant)
    rng = np.random.default_rng(length + kernel)
    x = rng.standard_normal((batch, length, channels)).astype(np.float32)
    w = rng.standard_normal((n, kernel * channels)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    out = np.array(
        csmd_native.panel_conv(mx.array(x), kernels.pack_panels(mx.array(w)), n, mx.array(bias), kernel, stride)
    )
    steps = (length - kernel) // stride + 1
    windows = np.stack([x[:, t * stride : t * stride + kernel].reshape(batch, -1) for t in range(steps)], axis=1)
    expected = windows.astype(np.float64) @ w.astype(np.float64).T + bias
    magnitude = np.abs(windows).astype(np.float64) @ np.abs(w).astype(np.float64).T + np.abs(bias)
    assert out.shape == (batch, steps, n)
    assert np.all(np.abs(out - expected) <= 1e-5 * magnitude + 1e-30)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("size", [1, 7, 8, 1000, 300_001])  # SIMD tails, and enough to split over threads
def test_elu_matches_float64_and_fastmath(variant: str, size: int) -> None:
    csmd_native.set_variant(variant)
    rng = np.random.default_rng(size)
    x = (rng.standard_normal(size) * 10).astype(np.float32)
    x[: min(size, 4)] = [-200.0, -0.0, 0.0, 3.0][: min(size, 4)]  # below the clamp, both zeros, positive
    y = np.array(csmd_native.elu(mx.array(x)))
    x64 = x.astype(np.float64)
    bound = 2e-7 * np.maximum(1.0, np.abs(x64))
    assert np.all(np.abs(y - np.where(x64 > 0, x64, np.expm1(x64))) <= bound)
    assert np.all(np.abs(y - np.array(fastmath.elu(mx.array(x)))) <= bound)
    assert np.array_equal(y[x > 0], x[x > 0])  # exact where x > 0


def _seanet_streams(mimi, fused: bool, monkeypatch: pytest.MonkeyPatch, steps: int) -> list[tuple]:
    """Stream the decoder and the encoder SEANets (and the encoder's downsample) through `steps` steps, fused
    native convolution steps or MLX ops (seanet.py's reference), and return every output and state."""
    from csmd.audio.mimi import seanet

    monkeypatch.setattr(seanet, "_native_step", seanet._native_step if fused else lambda x, name: False)
    rng = np.random.default_rng(5)
    out = []
    states = [None, None, None]
    for _ in range(steps):
        latent = mx.array(rng.standard_normal((2, 2, mimi.config.seanet.dimension)).astype(np.float32))
        pcm = mx.array(rng.standard_normal((2, mimi.frame_size, 1)).astype(np.float32))
        wave, states[0] = mimi.decoder(latent, states[0])
        enc, states[1] = mimi.encoder(pcm, states[1])
        down, states[2] = mimi.downsample(enc, states[2])
        mx.eval(wave, enc, down, states)
        out.append((wave, enc, down, tree_flatten(states)))
    monkeypatch.undo()
    return out


def test_fused_seanet_steps_equal_the_mlx_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    """causal_conv_step and conv_transpose_step (ELU, state, bias and residual fused in) against seanet.py's
    MLX ops, batched, from a fresh stream on: the same products and ELU kernels, the sums in the same order,
    so the same floats, states included."""
    if not kernels.native_has("causal_conv_step"):
        pytest.skip("csmd_native without the fused SEANet steps")
    mimi = load_mimi("random:mimi")
    fused = _seanet_streams(mimi, True, monkeypatch, steps=3)
    ops = _seanet_streams(mimi, False, monkeypatch, steps=3)
    for (wave, enc, down, states), (wave_r, enc_r, down_r, states_r) in zip(fused, ops, strict=True):
        for a, b in ((wave, wave_r), (enc, enc_r), (down, down_r)):
            np.testing.assert_array_equal(np.array(a), np.array(b))
        assert [k for k, _ in states] == [k for k, _ in states_r]
        for (_, a), (_, b) in zip(states, states_r, strict=True):
            np.testing.assert_array_equal(np.array(a), np.array(b))


def test_fused_seanet_steps_reject_bad_shapes() -> None:
    x = mx.zeros((1, 4, 8))
    w = mx.zeros((5, 3 * 8))
    with pytest.raises(ValueError, match="state must be"):
        csmd_native.causal_conv_step(x, None, w, 5, kernel=3)
    with pytest.raises(ValueError, match="w must be"):
        csmd_native.causal_conv_step(x, mx.zeros((1, 2, 8)), mx.zeros((5, 8)), 5, kernel=3)
    with pytest.raises(ValueError, match="multiple of the stride"):
        csmd_native.causal_conv_step(mx.zeros((1, 3, 8)), mx.zeros((1, 2, 8)), mx.zeros((5, 32)), 5, kernel=4, stride=2)
    with pytest.raises(ValueError, match="residual"):
        csmd_native.causal_conv_step(x, mx.zeros((1, 2, 8)), w, 5, residual=mx.zeros((1, 4, 4)), kernel=3)
    with pytest.raises(ValueError, match="state must be"):
        csmd_native.conv_transpose_step(x, mx.zeros((1, 1, 3, 5)), mx.zeros((20, 8)), 5, stride=2)
    with pytest.raises(ValueError, match="bias"):
        csmd_native.conv_transpose_step(x, mx.zeros((1, 1, 2, 5)), mx.zeros((20, 8)), 5, mx.zeros((4,)), stride=2)


def test_views_as_inputs() -> None:
    """Inputs that are not row-contiguous (transposed, sliced, broadcast) are gathered when the primitive
    runs, not by a Contiguous node: the result is the product of what the views hold."""
    rng = np.random.default_rng(9)
    x = rng.standard_normal((6, 3)).astype(np.float32)
    w = rng.standard_normal((40, 6)).astype(np.float32)
    expected = x.T @ w.T
    np.testing.assert_allclose(np.array(csmd_native.matmul(mx.array(x).T, mx.array(w))), expected, rtol=1e-5)
    wide = mx.array(np.concatenate([w, w], axis=1))
    strided = np.concatenate([w, w], axis=1)[:, ::2]  # every other column: a view with a step
    np.testing.assert_allclose(np.array(csmd_native.matmul(mx.array(x).T, wide[:, ::2])), x.T @ strided.T, rtol=1e-5)
    row = mx.broadcast_to(mx.array(x[:, 0]), (4, 6))
    np.testing.assert_allclose(
        np.array(csmd_native.elu(row)), np.array(csmd_native.elu(mx.array(np.tile(x[:, 0], (4, 1)))))
    )
    packed = kernels.pack_panels(mx.array(w))
    np.testing.assert_allclose(
        np.array(csmd_native.panel_matmul(mx.array(x).T, packed, 40)), expected, rtol=1e-5, atol=1e-6
    )
