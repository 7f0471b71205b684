"""csmd's exp-based activations (csmd/audio/mimi/fastmath.py) against float64 references."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

from csmd.audio.mimi import fastmath


def test_exp_nonpositive_is_accurate_down_to_the_clamp() -> None:
    z = np.concatenate([-np.logspace(-8, math.log10(87), 50_000), [0.0]]).astype(np.float32)
    ours = np.array(fastmath.exp_nonpositive(mx.array(z)))
    ref = np.exp(z.astype(np.float64))
    assert np.max(np.abs(ours - ref) / ref) < 2e-7
    assert np.array(fastmath.exp_nonpositive(mx.array([0.0])))[0] == 1.0
    below = np.array(fastmath.exp_nonpositive(mx.array([-88.0, -1e4])))
    assert np.all((below >= 0) & (below < 2e-38))


def test_elu_and_gelu() -> None:
    x = np.random.default_rng(0).standard_normal(100_000).astype(np.float32) * 4
    x = np.concatenate([x, [0.0, 1e-30, -1e-30, 60.0, -60.0]]).astype(np.float32)
    elu = np.array(fastmath.elu(mx.array(x)))
    assert np.array_equal(elu[x > 0], x[x > 0])  # exactly x on the positive side
    assert np.max(np.abs(elu - np.where(x > 0, x, np.expm1(np.minimum(x, 0).astype(np.float64))))) < 2e-7
    erf = np.vectorize(math.erf)(x.astype(np.float64) / math.sqrt(2))
    assert np.max(np.abs(np.array(fastmath.gelu(mx.array(x))) - 0.5 * x * (1 + erf))) < 1e-5 * max(1, np.abs(x).max())


def test_softmax_matches_mlx_and_ignores_masked_scores() -> None:
    scores = mx.random.normal((4, 300), key=mx.random.key(0)) * 5
    expected = np.array(mx.softmax(scores, axis=-1))
    np.testing.assert_allclose(np.array(fastmath.softmax(scores)), expected, atol=1e-7)
    masked = mx.concatenate([scores, mx.full((4, 7), -1e9)], axis=-1)
    np.testing.assert_allclose(np.array(fastmath.softmax(masked))[:, :300], expected, atol=1e-7)
