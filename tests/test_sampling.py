"""Sampling rules and generation parameters: validation, greedy, reserved ids, top-k/top-p/min-p, keys.

`sample` draws one id per row of a [B, vocab] logits array with a single key, so putting the same logits in
B rows gives B independent draws in one call: the tests read the set (and frequencies) of ids drawn.
"""

from __future__ import annotations

import math
import re

import mlx.core as mx
import numpy as np
import pytest

from csmd.model.sampling import GenerationParams, sample, sampling_key

DRAWS = 2000


def draws(probs: list[float], params: GenerationParams, rows: int = DRAWS, seed: int = 0) -> np.ndarray:
    """`rows` samples from a distribution given as probabilities (ids are their positions; none reserved)."""
    logits = mx.broadcast_to(mx.log(mx.array(probs, dtype=mx.float32)), (rows, len(probs)))
    out = sample(logits, params, len(probs), sampling_key(seed, 0, 0))
    assert out.shape == (rows,) and out.dtype == mx.int32
    return np.array(out)


def drawn(probs: list[float], params: GenerationParams) -> set[int]:
    return {int(i) for i in np.unique(draws(probs, params))}


# -- GenerationParams.validate -------------------------------------------------------------------------


def test_defaults() -> None:
    params = GenerationParams()
    assert params.validate() is params
    assert (params.temperature, params.top_k, params.top_p, params.min_p) == (0.9, 50, 1.0, 0.0)
    assert (params.max_frames, params.seed, params.allow_reserved_codes) == (250, None, False)


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("temperature", -0.1, "[0.001, 10]"),
        ("temperature", 10.5, "[0.001, 10]"),
        ("temperature", math.nan, "[0.001, 10]"),
        ("temperature", math.inf, "[0.001, 10]"),
        ("temperature", 1e-46, "[0.001, 10]"),  # 0 as a float32: the kernels would disagree about greedy
        ("top_k", -1, "[0, 2**31 - 1]"),
        ("top_k", 2.5, "[0, 2**31 - 1]"),
        ("top_k", 2**31, "[0, 2**31 - 1]"),  # the kernels' int32
        ("top_p", 0.0, "[1e-06, 1]"),
        ("top_p", 1e-46, "[1e-06, 1]"),  # 0 as a float32
        ("top_p", 1.01, "[1e-06, 1]"),
        ("top_p", math.nan, "[1e-06, 1]"),
        ("min_p", -0.1, "[0, 0.999]"),
        ("min_p", 1.0, "[0, 0.999]"),
        ("min_p", 1 - 1e-9, "[0, 0.999]"),  # 1 as a float32
        ("max_frames", 0, ">= 1"),
        ("max_frames", 2.0, ">= 1"),
        ("seed", -1, "[0, 2**32)"),
        ("seed", 2**32, "[0, 2**32)"),
        ("seed", 1.5, "[0, 2**32)"),
    ],
)
def test_invalid_field_names_itself_and_its_range(field: str, value: object, allowed: str) -> None:
    params = GenerationParams(**{field: value})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=rf"{field} must be .*{re.escape(allowed)}.*got"):
        params.validate()
    with pytest.raises(ValueError, match=field):
        GenerationParams().replace(**{field: value})


@pytest.mark.parametrize("field", ["top_k", "max_frames", "seed"])
def test_bools_are_not_integers(field: str) -> None:
    with pytest.raises(ValueError, match=field):
        GenerationParams(**{field: True}).validate()


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ValueError) as info:
        GenerationParams(temperature=-1.0, top_p=2.0, max_frames=0).validate()
    message = str(info.value)
    assert all(name in message for name in ("temperature", "top_p", "max_frames"))
    assert "top_k" not in message and "min_p" not in message


@pytest.mark.parametrize(
    "changes",
    [
        {"temperature": 0.0},
        {"temperature": 10.0},
        {"top_k": 0},
        {"top_p": 1.0},
        {"top_p": 1e-6},
        {"min_p": 0.0},
        {"min_p": 0.999},
        {"max_frames": 1},
        {"seed": 0},
        {"seed": 2**32 - 1},
    ],
)
def test_boundary_values_are_valid(changes: dict[str, object]) -> None:
    params = GenerationParams().replace(**changes)
    assert all(getattr(params, k) == v for k, v in changes.items())


# -- greedy and reserved ids ------------------------------------------------------------------------------


def test_temperature_zero_is_argmax_per_row() -> None:
    logits = np.random.default_rng(0).normal(size=(50, 67)).astype(np.float32)
    out = sample(mx.array(logits), GenerationParams(temperature=0.0), 67, sampling_key(0, 0, 0))
    np.testing.assert_array_equal(np.array(out), logits.argmax(axis=1))


def reserved_heavy(rows: int = DRAWS) -> mx.array:
    """67 ids, 64 real ones increasing in logit, and 3 reserved ids holding nearly all the mass."""
    row = np.concatenate([np.linspace(0.0, 1.0, 64), [20.0, 20.0, 20.0]]).astype(np.float32)
    return mx.array(np.broadcast_to(row, (rows, 67)))


@pytest.mark.parametrize("temperature", [0.0, 0.9, 5.0])
def test_reserved_ids_are_never_sampled_by_default(temperature: float) -> None:
    params = GenerationParams(temperature=temperature, top_k=0)
    out = np.array(sample(reserved_heavy(), params, 64, sampling_key(1, 2, 3)))
    assert out.max() < 64
    if temperature == 0.0:
        assert set(out.tolist()) == {63}  # the best real code


def test_reserved_ids_can_be_allowed() -> None:
    params = GenerationParams(temperature=1.0, top_k=0, allow_reserved_codes=True)
    out = np.array(sample(reserved_heavy(), params, 64, sampling_key(1, 2, 3)))
    assert set(np.unique(out[out >= 64]).tolist()) == {64, 65, 66}
    assert (out >= 64).mean() > 0.99
    greedy = np.array(sample(reserved_heavy(1), params.replace(temperature=0.0), 64, sampling_key(0, 0, 0)))
    assert greedy.tolist() == [64]


def test_top_k_counts_only_real_ids() -> None:
    # If the reserved ids were masked after top-k, they would take all three places.
    params = GenerationParams(temperature=1.0, top_k=3)
    out = np.array(sample(reserved_heavy(), params, 64, sampling_key(0, 0, 0)))
    assert set(out.tolist()) == {61, 62, 63}


# -- top-k, top-p, min-p -------------------------------------------------------------------------------

PROBS = [0.05, 0.3, 0.15, 0.5]  # ranked by probability: id 3, 1, 2, 0


def test_top_k_one_is_argmax() -> None:
    assert drawn(PROBS, GenerationParams(temperature=5.0, top_k=1)) == {3}


def test_top_k_keeps_the_k_largest() -> None:
    probs = [0.02, 0.2, 0.05, 0.3, 0.15, 0.18, 0.1]
    assert drawn(probs, GenerationParams(temperature=1.0, top_k=3)) == {1, 3, 5}
    assert drawn(probs, GenerationParams(temperature=1.0, top_k=0)) == set(range(7))


def test_top_k_keeps_ties_with_the_kth() -> None:
    assert drawn([0.3, 0.3, 0.3, 0.1], GenerationParams(temperature=1.0, top_k=2)) == {0, 1, 2}


@pytest.mark.parametrize(
    ("top_p", "expected"),
    [(0.7, {3, 1}), (0.81, {3, 1, 2}), (0.96, {3, 1, 2, 0}), (0.01, {3}), (1.0, {3, 1, 2, 0})],
)
def test_top_p_keeps_the_smallest_set_reaching_p(top_p: float, expected: set[int]) -> None:
    # Cumulative mass in rank order: 0.5, 0.8, 0.95, 1.0; a token stays if the mass before it is < top_p.
    assert drawn(PROBS, GenerationParams(temperature=1.0, top_k=0, top_p=top_p)) == expected


@pytest.mark.parametrize(
    ("min_p", "expected"),
    [(0.5, {0, 1}), (0.7, {0}), (0.39, {0, 1, 2}), (0.0, {0, 1, 2})],
)
def test_min_p_drops_ids_below_a_fraction_of_the_best(min_p: float, expected: set[int]) -> None:
    # p_max = 0.5: min_p 0.5 -> floor 0.25 keeps 0.3; 0.7 -> 0.35 drops it; 0.39 -> 0.195 keeps 0.2.
    assert drawn([0.5, 0.3, 0.2], GenerationParams(temperature=1.0, top_k=0, min_p=min_p)) == expected


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_frequencies_match_the_tempered_softmax(temperature: float) -> None:
    probs = np.array([0.05, 0.3, 0.15, 0.4, 0.1])
    n = 20000
    out = draws(probs.tolist(), GenerationParams(temperature=temperature, top_k=0), rows=n, seed=7)
    tempered = probs ** (1 / temperature)
    expected = tempered / tempered.sum()
    counts = np.bincount(out, minlength=len(probs))
    sigma = np.sqrt(n * expected * (1 - expected))
    assert np.all(np.abs(counts - n * expected) <= 3 * sigma), (counts, n * expected)


# -- keys ----------------------------------------------------------------------------------------------


def test_sampling_key_is_deterministic() -> None:
    a, b = sampling_key(42, 7, 3), sampling_key(42, 7, 3)
    assert a.dtype == mx.uint32 and a.shape == (2,)
    assert np.array_equal(np.array(a), np.array(b))
    logits = mx.zeros((100, 64))
    params = GenerationParams(temperature=1.0, top_k=0)
    assert np.array_equal(np.array(sample(logits, params, 64, a)), np.array(sample(logits, params, 64, b)))


def test_sampling_keys_differ_across_seeds_frames_and_codebooks() -> None:
    seeds, frames, codebooks = (0, 1, 2**31, 2**32 - 1), range(100), range(32)
    keys = {tuple(np.array(sampling_key(s, f, c)).tolist()) for s in seeds for f in frames for c in codebooks}
    assert len(keys) == len(seeds) * len(frames) * len(codebooks)
    # Never the key mx.random.key(seed) would give, so ad-hoc draws elsewhere cannot replay a frame.
    assert not keys & {tuple(np.array(mx.random.key(s)).tolist()) for s in seeds}


@pytest.mark.parametrize(
    "other", [(2, 0, 0), (1, 1, 0), (1, 0, 1)], ids=["other-seed", "other-frame", "other-codebook"]
)
def test_different_keys_give_different_draws(other: tuple[int, int, int]) -> None:
    logits = mx.zeros((100, 64))
    params = GenerationParams(temperature=1.0, top_k=0)
    base = np.array(sample(logits, params, 64, sampling_key(1, 0, 0)))
    moved = np.array(sample(logits, params, 64, sampling_key(*other)))
    assert not np.array_equal(base, moved)
