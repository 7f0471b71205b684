"""Several Mimi streams decoded in one batched step (model.decode_together) against each stream alone.

Streams of different ages share a step: each batch row has its own position (RoPE, ring slots, which keys
exist yet). With the native kernels every row's pcm and state are the floats of that stream stepping alone,
bit for bit: the products give a row the same floats whatever the other rows (fewrows.h's paths sum alike,
the SEANet steps and the quantizer's projections choose their kernel by one stream's rows). On the MLX
reference path (CSMD_KERNELS=reference) BLAS sums a row differently with the batch's row count: within the
parity tests' tolerance.
"""

from __future__ import annotations

import dataclasses

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from csmd import kernels
from csmd.audio.mimi.config import TINY, MimiConfig
from csmd.audio.mimi.loading import load_mimi
from csmd.audio.mimi.model import (
    Mimi,
    StreamingDecoder,
    decode_together,
    split_decoder_state,
    stack_decoder_states,
)
from csmd.audio.mimi.transformer import split_state, stack_states

# Who does what at each frame: T steps in the batch (decode_together), A steps alone (StreamingDecoder.step),
# . is parked. Batches of 1 to 8 streams; the tiny codec's window is 16 steps (8 frames): s0 and s1 are past it
# before most others start, s3 joins, leaves after one frame, steps alone and comes back; s4 and s6 join fresh
# among old streams; streams leave in another order than they joined.
PLAN = {
    "s0": "TTTTTTTTTTTTTTTTTTTTTTTTTTTTTTTTTTTTTTTT",
    "s1": "AAAAAAAAAAAATTTTTTTTTTTTTTTTTTTTTTTTTTTT",
    "s2": "..TTTTTTT......TTTTTTTTTTTTTTTAAAATTTTTT",
    "s3": ".....TAA................TTTT............",
    "s4": "....................TTTTTTTTTTTTTTTTTTTT",
    "s5": "........TTTTTTTTTTTTTTTTTTTT............",
    "s6": "........................TTTTTTTTTTTTTTTT",
    "s7": "..........AAAAAAAAAAAAATT........TTTTTTT",
}


def _codes(mimi: Mimi, streams: int, frames: int, seed: int) -> np.ndarray:
    """[streams, frames, K]: each stream's frames of codes."""
    bins = mimi.config.quantizer.bins
    return np.random.default_rng(seed).integers(0, bins, size=(streams, frames, mimi.num_codebooks))


def _state_arrays(decoder: StreamingDecoder) -> list[tuple[str, np.ndarray]]:
    state = decoder.snapshot().state
    assert state is not None
    return [(name, np.array(value)) for name, value in tree_flatten(state) if value is not None]


def _run_plan(mimi: Mimi, plan: dict[str, str], seed: int, compare) -> set[int]:
    """Play `plan` with two decoders per stream (one always alone, one as planned), comparing each frame's pcm
    with `compare(got, want)`, and the states at the end. Returns the batch sizes that occurred."""
    names = list(plan)
    frames = len(plan[names[0]])
    codes = _codes(mimi, len(names), frames, seed)
    alone = {name: StreamingDecoder(mimi) for name in names}
    planned = {name: StreamingDecoder(mimi) for name in names}
    played = dict.fromkeys(names, 0)  # frames each stream has decoded so far
    sizes = set()
    for t in range(frames):
        together = [name for name in names if plan[name][t] == "T"]
        stepping = [name for name in names if plan[name][t] != "."]
        want = {name: alone[name].step(codes[names.index(name), played[name]]) for name in stepping}
        if together:
            frame = np.stack([codes[names.index(name), played[name]] for name in together])
            pcm = decode_together([planned[name] for name in together], frame)
            assert pcm.shape == (len(together), mimi.frame_size) and pcm.dtype == np.float32
            for row, name in enumerate(together):
                compare(pcm[row], want[name])
            sizes.add(len(together))
        for name in stepping:
            if plan[name][t] == "A":
                compare(planned[name].step(codes[names.index(name), played[name]]), want[name])
            played[name] += 1
    for name in names:
        got, expected = _state_arrays(planned[name]), _state_arrays(alone[name])
        assert [key for key, _ in got] == [key for key, _ in expected]
        for (key, a), (_, b) in zip(got, expected, strict=True):
            assert a.shape == b.shape, key
            compare(a, b)
    return sizes


def _equal(got: np.ndarray, want: np.ndarray) -> None:
    np.testing.assert_array_equal(got, want)


def _close(got: np.ndarray, want: np.ndarray) -> None:
    """The parity tests' bound: the largest difference within 1e-4 of the reference's largest magnitude."""
    assert np.abs(got - want).max() <= 1e-4 * max(np.abs(want).max(), 1e-6)


def _native() -> None:
    if not (kernels.mimi_transformer_available() and kernels.native_has("causal_conv_step")):
        pytest.skip("csmd_native with the Mimi kernels is not loaded")


def test_streams_of_any_age_decode_together_as_alone() -> None:
    """1 to 8 streams joining and leaving at different frames, some past the attention window, some fresh:
    every frame's pcm and every state afterwards are those of each stream stepping alone, bit for bit."""
    _native()
    sizes = _run_plan(load_mimi("random:tiny"), PLAN, seed=1, compare=_equal)
    assert sizes == set(range(1, 9))


def test_reference_path_decodes_together_within_tolerance(monkeypatch: pytest.MonkeyPatch) -> None:
    """The MLX layers (CSMD_KERNELS=reference; the codec loaded and traced under it): per-row positions give
    each stream its own RoPE, ring and mask; BLAS rounds differently with the batch's rows."""
    monkeypatch.setenv("CSMD_KERNELS", "reference")
    mimi = load_mimi("random:tiny")
    plan = {name: steps[:28] for name, steps in PLAN.items()}
    assert _run_plan(mimi, plan, seed=2, compare=_close) == set(range(1, 9))


@pytest.mark.parametrize("panels", [True, False])
def test_a_wider_codec_decodes_together_as_alone(panels: bool) -> None:
    """A feed-forward width at which the kernels' paths differ with the rows: the decoder transformer's panel
    GEMM (as loaded) puts 2 rows or up to 6 in a tile; its few-row products (the projections as they are)
    outgrow L1 from 3 streams on, and then take weight rows in pairs. Still the same floats."""
    _native()
    wide = dataclasses.replace(TINY.transformer, dim_feedforward=1024)
    cfg: MimiConfig = dataclasses.replace(TINY, transformer=wide)
    mimi = load_mimi("random:tiny", config=cfg)
    assert (mimi.decoder_transformer.native_weights()[2].ndim == 3) == kernels.native_has("panel_matmul")
    if not panels:
        mimi.decoder_transformer._panel_weights = None
        mimi._compiled = {}
    plan = {"a": "TTTTTTTTTT", "b": "AAAATTTTTT", "c": "..TTTTTTTT", "d": ".....TTTTT"}
    assert _run_plan(mimi, plan, seed=3, compare=_equal) == {1, 2, 3, 4}


@pytest.mark.parametrize("variant", ["scalar", "auto"])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("k", [512, 1024, 2048, 2049, 3584])  # from 2 rows past kFewRowsXBytes, or from 5, or 9
def test_few_row_product_of_a_row_does_not_depend_on_the_others(variant: str, dtype: mx.Dtype, k: int) -> None:
    """csmd_native.matmul with 2..8 rows (fewrows.h): the first two rows' products are the same floats at
    every row count, though the kernel takes weight rows in pairs once x outgrows L1."""
    _native()
    import csmd_native

    csmd_native.set_variant(variant)
    try:
        rng = np.random.default_rng(k)
        x = mx.array(rng.standard_normal((8, k)).astype(np.float32))
        w = mx.array(rng.standard_normal((67, k)).astype(np.float32)).astype(dtype)
        two = np.array(csmd_native.matmul(x[:2], w))
        for rows in range(3, 9):
            np.testing.assert_array_equal(np.array(csmd_native.matmul(x[:rows], w))[:2], two, err_msg=f"{rows}")
    finally:
        csmd_native.set_variant("auto")


def test_lengthened_last_steps_are_read_from_the_ring() -> None:
    """A stream that decoded two frames in its last call (4 previous-call steps) batched with one that decoded
    one (2): the shorter is lengthened with the steps its ring holds (it is past the window, so they are real
    keys), which the next write puts back unchanged: the batched frame equals each stream's own next frame."""
    _native()
    mimi = load_mimi("random:tiny")
    codes = _codes(mimi, 2, 14, seed=4)
    frame = lambda s, t: mx.array(codes[s, t][None, :, None].astype(np.int32))  # noqa: E731
    _, two_frames = mimi.decode_step(mx.array(codes[0, :2].T[None].astype(np.int32)), None)
    one_frame = None
    for t in range(12):  # 24 steps: past the 16-step window
        _, one_frame = mimi.decode_step(frame(1, t), one_frame)
    assert two_frames.transformer.last_keys.shape[2] == 4 and one_frame.transformer.last_keys.shape[2] == 2
    batch = stack_decoder_states([two_frames, one_frame])
    assert batch.transformer.last_keys.shape[2] == 4
    np.testing.assert_array_equal(np.array(batch.transformer.position), [4, 24])
    pcm, new = mimi.decode_step(mx.array(np.stack([codes[0, 2], codes[1, 12]])[:, :, None].astype(np.int32)), batch)
    for row, (state, t) in enumerate([(two_frames, 2), (one_frame, 12)]):
        want, want_state = mimi.decode_step(frame(row, t), state)
        np.testing.assert_array_equal(np.array(pcm[row]), np.array(want[0]))
        got = tree_flatten(split_decoder_state(new)[row])
        for (key, a), (_, b) in zip(got, tree_flatten(want_state), strict=True):
            if a is not None:
                np.testing.assert_array_equal(np.array(a), np.array(b), err_msg=key)


def test_native_stack_at_per_row_positions_matches_the_mlx_layers() -> None:
    """mimi_transformer and mimi_ring_write with a position per row, against the MLX layers' rope, mask and
    ring write per row: rows at 0, 3, 9 and 31 steps (the window is 10), for six calls."""
    _native()
    from test_native_mimi import _mlx_layers, _stack

    from csmd.audio.mimi.config import MimiTransformerConfig

    cfg = MimiTransformerConfig(d_model=64, num_heads=4, num_layers=2, dim_feedforward=128, context=10)
    stack = _stack(cfg, seed=7, weights=mx.float32)
    rng = np.random.default_rng(7)
    rows = []
    for age in (0, 3, 9, 31):
        state = stack.initial_state(1)
        for _ in range(age):
            _, state = stack(mx.array(rng.standard_normal((1, 1, cfg.d_model)).astype(np.float32)), state)
        rows.append(state)
    native = reference = stack_states(rows, last_steps=2)
    np.testing.assert_array_equal(np.array(native.position), [0, 3, 9, 31])
    for _ in range(6):
        x = mx.array(rng.standard_normal((4, 2, cfg.d_model)).astype(np.float32))
        y, native = stack(x, native)
        want, reference = _mlx_layers(stack, x, reference)
        np.testing.assert_allclose(np.array(y), np.array(want), rtol=1e-4, atol=1e-5)
        for a, b in zip(native, reference, strict=True):
            np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(np.array(native.position), [12, 15, 21, 43])
    assert [int(part.position[0]) for part in split_state(native)] == [12, 15, 21, 43]


def test_stack_and_split_are_inverse() -> None:
    """Splitting a stacked batch gives back each stream's arrays (their previous-call steps lengthened only
    where asked), fresh and running streams together."""
    mimi = load_mimi("random:tiny")
    codes = _codes(mimi, 1, 3, seed=5)
    running = None
    for t in range(3):
        _, running = mimi.decode_step(mx.array(codes[0, t][None, :, None].astype(np.int32)), running)
    fresh = mimi.initial_decode_state(1)
    batch = stack_decoder_states([running, fresh, running], last_steps=2)
    assert batch.transformer.past_keys.shape[1] == 3 and batch.transformer.position.shape == (3,)
    parts = split_decoder_state(batch)
    assert len(parts) == 3
    for part, original in zip(parts, [running, fresh, running], strict=True):
        if original is fresh:  # lengthened from none to 2 with its ring's (masked) zeros
            for last in (part.transformer.last_keys, part.transformer.last_values):
                assert last.shape == (1, 1, 2, mimi.config.transformer.d_model) and not np.any(np.array(last))
            part = part._replace(transformer=part.transformer._replace(last_keys=None, last_values=None))
            original = original._replace(transformer=original.transformer._replace(last_keys=None, last_values=None))
        for (key, a), (_, b) in zip(tree_flatten(part), tree_flatten(original), strict=True):
            if a is not None:
                np.testing.assert_array_equal(np.array(a), np.array(b), err_msg=key)
    assert split_decoder_state(running)[0] is running
    assert stack_decoder_states([running]).transformer is running.transformer  # one state: no copy


def test_decode_together_refuses_what_it_cannot_batch() -> None:
    mimi, other = load_mimi("random:tiny"), load_mimi("random:tiny")
    one, two = StreamingDecoder(mimi), StreamingDecoder(mimi)
    frames = np.zeros((2, mimi.num_codebooks), dtype=np.int64)
    with pytest.raises(ValueError, match="no decoders"):
        decode_together([], frames[:0])
    with pytest.raises(ValueError, match="different codecs"):
        decode_together([one, StreamingDecoder(other)], frames)
    with pytest.raises(ValueError, match="more than once"):
        decode_together([one, one], frames)
    with pytest.raises(ValueError, match="one stream each"):
        decode_together([one, StreamingDecoder(mimi, batch=2)], frames)
    with pytest.raises(ValueError, match=r"frames must be \[2, K\]"):
        decode_together([one, two], frames[:1])
    with pytest.raises(ValueError, match="integers"):
        decode_together([one, two], frames.astype(np.float32))
    with pytest.raises(ValueError, match="expected 4 codebooks"):
        decode_together([one, two], np.zeros((2, 3), dtype=np.int64))
    with pytest.raises(ValueError, match=r"codes must be in 0\.\.63"):
        decode_together([one, two], frames + 64)
    assert one.snapshot().state is None and two.snapshot().state is None  # nothing ran


def test_a_batched_step_that_fails_to_build_keeps_every_state(monkeypatch: pytest.MonkeyPatch) -> None:
    """As a single stream's step: if building the batched step raises, every decoder has its state back and
    continues as if the failed step never happened."""
    mimi = load_mimi("random:tiny")
    codes = _codes(mimi, 2, 3, seed=6)
    reference = [StreamingDecoder(mimi), StreamingDecoder(mimi)]
    want = [[decoder.step(codes[s, t]) for t in range(3)] for s, decoder in enumerate(reference)]
    decoders = [StreamingDecoder(mimi), StreamingDecoder(mimi)]
    decoders[0].step(codes[0, 0])  # one running, one fresh

    def broken(codes: mx.array, state: object) -> tuple[mx.array, object]:
        raise RuntimeError("broken step")

    with monkeypatch.context() as patch:
        patch.setattr(mimi, "decode_step", broken)
        with pytest.raises(RuntimeError, match="broken step"):
            decode_together(decoders, np.stack([codes[0, 1], codes[1, 0]]))
    assert decoders[1].snapshot().state is None
    pcm = decode_together(decoders, np.stack([codes[0, 1], codes[1, 0]]))
    _close(pcm[0], want[0][1])
    _close(pcm[1], want[1][0])


def _address(a: mx.array) -> int:
    return np.asarray(a).__array_interface__["data"][0]


def test_the_same_decoders_step_their_batch_in_place() -> None:
    """Stepped again by the same decoders in the same order, a batch's key/value rings are written in place
    (no copy of every stream's window a frame); another order, or a decoder stepped alone in between, stacks
    a new batch; a snapshot taken in between keeps its values."""
    _native()
    mimi = load_mimi("random:tiny")
    codes = _codes(mimi, 3, 9, seed=8)
    decoders = [StreamingDecoder(mimi) for _ in range(3)]

    def rings() -> int:
        shared = decoders[0]._shared
        assert shared is not None
        return _address(shared.state.transformer.past_keys)

    decode_together(decoders, codes[:, 0])
    before = rings()
    for t in range(1, 4):
        decode_together(decoders, codes[:, t])
        assert rings() == before
    parked = decoders[1].snapshot().state
    assert parked is not None
    kept = np.array(parked.transformer.past_keys)
    decode_together(decoders, codes[:, 4])
    np.testing.assert_array_equal(np.array(parked.transformer.past_keys), kept)
    decoders.reverse()
    decode_together(decoders, codes[::-1, 5])
    assert decoders[0]._shared is not None and all(d._shared is decoders[0]._shared for d in decoders)
    decoders[2].step(codes[0, 6])
    assert decoders[2]._shared is None and not decoders[0]._shared.holds(decoders)


def test_warming_up_batches_steps_each_size_and_leaves_the_codec_as_it_was() -> None:
    """warm_up_batches runs the batched step once per size (so each size's trace exists before a daemon's
    first batched frame); a stream decoded afterwards is what it was before."""
    mimi = load_mimi("random:tiny")
    frames = _codes(mimi, 1, 4, seed=3)[0]
    before = [StreamingDecoder(mimi).step(frame) for frame in frames[:1]]
    sizes: list[int] = []
    real = mimi.decode_step

    def spy(codes: mx.array, state: object) -> object:
        sizes.append(codes.shape[0])
        return real(codes, state)  # type: ignore[arg-type]

    mimi.decode_step = spy  # type: ignore[method-assign]
    mimi.warm_up_batches(range(2, 5))
    mimi.decode_step = real  # type: ignore[method-assign]
    assert sizes == [2, 3, 4]
    after = [StreamingDecoder(mimi).step(frame) for frame in frames[:1]]
    _equal(after[0], before[0])
