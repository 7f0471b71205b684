"""Who owns what in the model, on the tiny random model (fp32; nothing is downloaded).

- A stack's `KVCache` holds one position for every layer: a forward pass moves it once, `trim` moves it back.
- A `Context` owns the reply in progress: only that reply's utterance may add to it, and only while it runs.
- A `CSM` chooses its native paths for the weights it holds, again whenever they change, so new weights are
  never read through lists gathered for the old ones.
"""

from __future__ import annotations

import gc
import weakref

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_unflatten

from csmd.kernels import native
from csmd.model.config import TINY
from csmd.model.csm import CSM
from csmd.model.generator import ContextBusyError, Generator
from csmd.model.sampling import GenerationParams
from csmd.model.tokenizer import TextTokenizer
from csmd.model.weights import build_model, quantize, random_params

GREEDY = GenerationParams(temperature=0.0, max_frames=6, seed=0)
KERNELS = ["reference"] + (["native"] if native.module is not None else [])


def tiny(seed: int) -> CSM:
    return build_model(TINY, random_params(TINY, mx.float32, seed=seed), mx.float32, f"random:tiny:{seed}")


def rows(count: int, seed: int = 0) -> tuple[mx.array, mx.array]:
    tokens = mx.array(np.random.default_rng(seed).integers(0, 60, size=(1, count, TINY.num_columns)))
    return tokens, mx.ones(tokens.shape, dtype=mx.bool_)


@pytest.mark.parametrize("kernels", KERNELS)
def test_a_forward_pass_moves_the_stack_s_one_position(kernels: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Prefill (many rows) and a one-row step (the fused step on the native kernels) each move it once."""
    monkeypatch.setenv("CSMD_KERNELS", kernels)
    model = tiny(0)
    cache = model.make_backbone_cache()
    model.backbone_step(*rows(5), cache)
    assert cache.offset == 5
    model.backbone_step(*rows(1, seed=1), cache)
    assert cache.offset == 6
    assert [layer.offset for layer in cache.layers] == [6] * TINY.backbone.num_layers


def test_trim_forgets_positions_from_the_end() -> None:
    model = tiny(0)
    cache = model.make_backbone_cache()
    model.backbone_step(*rows(6), cache)
    assert cache.trim(2) == 2 and cache.offset == 4
    assert cache.trim(10) == 4 and cache.offset == 0
    with pytest.raises(ValueError, match="trim"):
        cache.trim(-1)


def test_a_trimmed_cache_continues_like_a_cold_one() -> None:
    """Rows run after a trim overwrite the forgotten positions: the result is that of a cold prefill."""
    model = tiny(0)
    tokens, mask = rows(8)
    cache = model.make_backbone_cache()
    model.backbone_step(tokens, mask, cache)
    cache.trim(3)
    other, other_mask = rows(3, seed=2)
    warm = model.backbone_step(other, other_mask, cache)
    cold_rows = mx.concatenate([tokens[:, :5], other], axis=1), mx.concatenate([mask[:, :5], other_mask], axis=1)
    cold = model.backbone_step(*cold_rows, model.make_backbone_cache())
    np.testing.assert_allclose(np.array(warm), np.array(cold), rtol=1e-5, atol=1e-5)


def test_overflow_is_refused_and_the_position_stays() -> None:
    model = tiny(0)
    cache = model.make_backbone_cache(max_len=4)
    model.backbone_step(*rows(3), cache)
    with pytest.raises(ValueError, match="KV cache overflow"):
        model.backbone_step(*rows(2), cache)
    assert cache.offset == 3


def test_only_the_reply_in_progress_may_add_to_its_context() -> None:
    gen = Generator(tiny(0), TextTokenizer.utf8_bytes())
    context, other = gen.new_context(), gen.new_context()
    reply = gen.start(context, "first", speaker=0, params=GREEDY)
    frame = np.ones(TINY.num_codebooks, dtype=np.int32)
    with pytest.raises(ContextBusyError):
        context.start_reply("second", 0, GREEDY.validate(), seed=0)
    with pytest.raises(ValueError, match="not this context's reply"):
        other.add_frame(reply, frame)
    assert reply.step() is not None
    reply.cancel()
    length = context.length
    for late in (lambda: context.add_frame(reply, frame), lambda: context.advance_reply(reply)):
        with pytest.raises(ValueError, match="not this context's reply"):
            late()
    assert context.length == length and not context.busy


@pytest.mark.parametrize("kernels", KERNELS)
def test_new_weights_are_the_ones_used(kernels: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`update` (what loading and `load_weights` use) chooses the paths anew: the frames are those of a model
    built with the new weights, not of lists gathered for the old ones."""
    monkeypatch.setenv("CSMD_KERNELS", kernels)

    def frames(model: CSM) -> np.ndarray:
        gen = Generator(model, TextTokenizer.utf8_bytes())
        return np.asarray(gen.generate(gen.new_context(), "which weights?", speaker=0, params=GREEDY).frames)

    model, donor = tiny(1), tiny(2)
    before = frames(model)
    model.update(tree_unflatten(list(random_params(TINY, mx.float32, seed=2).items())))
    after = frames(model)
    np.testing.assert_array_equal(after, frames(donor))
    assert not np.array_equal(after, before)


def test_quantizing_chooses_the_quantized_paths() -> None:
    model = tiny(0)
    assert model.native_weights.backbone is not None and model.native_weights.backbone.bits == 0
    quantize(model, 4)
    assert model.native_weights.backbone is not None and model.native_weights.backbone.bits == 4


def test_a_conversation_is_freed_by_reference_counting_alone() -> None:
    """Nothing of a context (its cache views, its replies) points back at it: a closed conversation's KV cache
    is freed the moment its last reference goes, not whenever the garbage collector next runs (a daemon that
    waits for the collector keeps every closed session's cache)."""
    gen = Generator(tiny(0), TextTokenizer.utf8_bytes())
    gc.collect()
    gc.disable()
    try:
        ctx = gen.new_context()
        spoken = gen.start(ctx, "hello", 0, GenerationParams(max_frames=3, seed=1))
        list(spoken)
        cut = gen.start(ctx, "again", 1, GenerationParams(max_frames=3, seed=2))
        next(iter(cut))
        cut.cancel()
        ctx.trim_reply(cut, 1, "ag")
        freed = [weakref.ref(ctx), weakref.ref(ctx._cache), weakref.ref(spoken), weakref.ref(cut)]
        del ctx, spoken, cut
        assert [ref() for ref in freed] == [None] * 4
    finally:
        gc.enable()
