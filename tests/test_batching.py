"""Frames of several conversations made in one batched step equal the frames each makes alone.

`step_together` advances B replies (each of its own context) by one frame: their backbone rows together, then
codebook 0 and the depth decoder together. Whatever the batch around it, a reply must make the same codes as
when it is stepped alone with the same seed: exactly on the native kernels' integer path (4- and 8-bit
weights), and on every other path too, since without the batched primitives the rows run one by one.

The scenario of each test: 1..8 contexts with different conversations before the reply (so different cache
lengths), greedy and sampled replies with their own seeds and rules, joining at different frames and leaving
by a cancel or by their frame limit.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
import pytest

from csmd import kernels
from csmd.model.config import TINY
from csmd.model.generator import Context, Generator, Segment, Utterance, step_together
from csmd.model.loading import load_model
from csmd.model.sampling import GenerationParams
from csmd.model.weights import build_model, quantize, random_params

TEXTS = ["Hello there.", "A longer sentence, with a clause or two in it.", "Yes.", "What did you say?"]


@dataclass(frozen=True)
class Plan:
    """One reply of the scenario: its context's history, its request, when it joins and when it is cancelled."""

    history: list[Segment]
    text: str
    params: GenerationParams
    joins: int  # the batch step at which it starts
    cancel_after: int | None  # frames after which it is cancelled (None: it runs to its frame limit)


def plans(count: int, seed: int, num_codebooks: int, codebook_size: int) -> list[Plan]:
    rng = random.Random(seed)
    out = []
    for i in range(count):
        history = []
        for _ in range(rng.randrange(0, 3)):
            codes = np.random.default_rng(rng.randrange(1 << 30)).integers(
                0, codebook_size, (rng.randrange(1, 12), num_codebooks)
            )
            history.append(Segment(rng.randrange(2), rng.choice(TEXTS), codes))
        sampled = i % 2 == 1
        params = GenerationParams(
            temperature=0.9 if sampled else 0.0,
            top_k=rng.choice([0, 20]) if sampled else 50,
            top_p=rng.choice([1.0, 0.9]) if sampled else 1.0,
            max_frames=rng.randrange(3, 9),
            seed=rng.randrange(1 << 30),
        )
        cancel = rng.choice([None, rng.randrange(1, 4)])
        out.append(Plan(history, rng.choice(TEXTS), params, rng.randrange(0, 4), cancel))
    return out


def new_context(generator: Generator, plan: Plan) -> Context:
    context = generator.new_context()
    for segment in plan.history:
        context.append(segment)
    return context


def alone(generator: Generator, plan: Plan) -> np.ndarray:
    """The reply's codes when it is the only one stepped."""
    utterance = generator.start(new_context(generator, plan), plan.text, 0, plan.params)
    while utterance.step() is not None:
        if plan.cancel_after is not None and len(utterance.frames) >= plan.cancel_after:
            utterance.cancel()
    return utterance.codes


def together(generator: Generator, scenario: list[Plan]) -> list[np.ndarray]:
    """Every reply's codes when all are stepped together, each joining at its own step."""
    contexts = [new_context(generator, plan) for plan in scenario]
    started: dict[int, Utterance] = {}
    step = 0
    while len(started) < len(scenario) or any(not u.done for u in started.values()):
        for i, plan in enumerate(scenario):
            if plan.joins == step and i not in started:
                # The daemon's way: begin, prefill, then the first batched step makes its first frame.
                started[i] = generator.begin(contexts[i], plan.text, 0, plan.params)
                started[i].prefill()
        batch = [u for u in started.values() if not u.done]
        if batch:
            step_together(batch)
        for i, u in started.items():
            cancel = scenario[i].cancel_after
            if cancel is not None and len(u.frames) >= cancel:
                u.cancel()
        step += 1
    return [started[i].codes for i in range(len(scenario))]


# random:tiny with a depth decoder wide enough (64) for groups of 64, so that quantized, every part of it takes
# the native path (fused steps and the whole-frame depth decoder).
WIDE = dataclasses.replace(TINY, decoder=dataclasses.replace(TINY.decoder, hidden_size=64, num_heads=4))


@pytest.fixture(scope="module", params=["fp32", "q4", "q8"])
def generator(request: pytest.FixtureRequest) -> Generator:
    tokenizer = load_model("random:tiny").tokenizer
    assert tokenizer is not None
    model = build_model(WIDE, random_params(WIDE, mx.float32), mx.float32, "random")
    if request.param != "fp32":
        quantize(model, int(request.param[1:]))
    return Generator(model, tokenizer)


@pytest.mark.parametrize("count", [1, 3, 8])
def test_batched_frames_equal_frames_made_alone(generator: Generator, count: int) -> None:
    cfg = generator.model.config
    scenario = plans(count, seed=count, num_codebooks=cfg.num_codebooks, codebook_size=cfg.audio_codebook_size)
    expected = [alone(generator, plan) for plan in scenario]
    got = together(generator, scenario)
    for i, (want, have) in enumerate(zip(expected, got, strict=True)):
        assert np.array_equal(want, have), f"reply {i} of {count}: {scenario[i]}"
    assert any(len(codes) for codes in got)


def test_the_batched_primitives_run_when_the_native_kernels_do(generator: Generator, monkeypatch) -> None:
    """On the native kernels, a batch of quantized replies takes the batched primitives (not a row-by-row
    loop that would make the equality above trivially true)."""
    if not (kernels.native_has("transformer_step_batch") and kernels.native_has("depth_frame_batch")):
        pytest.skip("the native extension with batched steps is not loaded")
    if generator.model.native_weights.depth_frame is None:
        pytest.skip("these weights take the MLX ops path")
    calls = {"transformer_step_batch": 0, "depth_frame_batch": 0}
    for name in calls:
        original = getattr(kernels, name)

        def spy(*args, _original=original, _name=name, **kwargs):  # type: ignore[no-untyped-def]
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(kernels, name, spy)
    params = GenerationParams(temperature=0.0, max_frames=3, seed=1)
    replies = [generator.start(generator.new_context(), text, 0, params) for text in TEXTS[:3]]
    while any(not u.done for u in replies):
        step_together([u for u in replies if not u.done])
    assert calls["depth_frame_batch"] >= 1
    assert calls["transformer_step_batch"] >= 1


def test_step_together_refuses_two_replies_of_one_context(generator: Generator) -> None:
    context = generator.new_context()
    reply = generator.start(context, "Hi.", 0, GenerationParams(temperature=0.0, max_frames=2, seed=0))
    with pytest.raises(ValueError, match="one utterance per context"):
        step_together([reply, reply])
    reply.cancel()


def test_prefill_in_chunks_equals_prefill_at_once(generator: Generator) -> None:
    """A reply prefilled a few rows at a time (as the daemon does between other sessions' frames) makes the
    frames of one prefilled at once."""
    params = GenerationParams(temperature=0.9, top_k=20, max_frames=4, seed=7)
    expected = np.stack(list(generator.start(generator.new_context(), TEXTS[1], 1, params)))
    utterance = generator.begin(generator.new_context(), TEXTS[1], 1, params)
    waiting = [utterance.context.pending]
    while waiting[-1]:
        waiting.append(utterance.prefill(3))
    assert len(waiting) > 3 and all(a - b == min(a, 3) for a, b in itertools.pairwise(waiting))
    assert np.array_equal(np.stack(list(utterance)), expected)
