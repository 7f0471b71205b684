"""The depth decoder's whole frame as one native primitive against the same frame step by step.

`CSM.decode_frame` runs the native `depth_frame` when its sampler is a `FrameSampler` (what the generator
and the benchmark pass); any other callable takes the path of one fused native step per codebook with the
heads, the sampling and the embeddings as MLX ops. Both apply one rule (`sampling.sample`, with the same
Gumbel noise), so the codes must be the same.
"""

from __future__ import annotations

import dataclasses
import os

import mlx.core as mx
import numpy as np
import pytest

from csmd import kernels
from csmd.kernels import native
from csmd.model.config import TINY, CsmConfig
from csmd.model.csm import CSM
from csmd.model.sampling import FrameSampler, GenerationParams
from csmd.model.weights import build_model, quantize, random_params

if native.module is None:
    if os.environ.get("CSMD_REQUIRE_NATIVE") == "1":
        raise ImportError(f"CSMD_REQUIRE_NATIVE=1 but the native kernels did not load: {native.load_error}")
    pytest.skip(f"native kernels not built: {native.load_error}", allow_module_level=True)

# 64 wide: every decoder matrix, head and embedding quantizes in groups of 64.
WIDE = dataclasses.replace(TINY, decoder=dataclasses.replace(TINY.decoder, hidden_size=64, num_heads=4))

RULES = {
    "greedy": GenerationParams(temperature=0.0),
    "default": GenerationParams(),  # temperature 0.9, top-k 50
    "top_p_min_p": GenerationParams(temperature=1.2, top_k=0, top_p=0.8, min_p=0.05),
    "all_filters": GenerationParams(temperature=0.7, top_k=20, top_p=0.9, min_p=0.02),
    "hot_reserved": GenerationParams(temperature=2.0, top_k=0, allow_reserved_codes=True),
}


def make_model(cfg: CsmConfig, weights: str) -> CSM:
    dtype = mx.bfloat16 if weights == "bf16" else mx.float32
    model = build_model(cfg, random_params(cfg, dtype, seed=7), dtype, "random")
    if weights in ("q4", "q8"):
        quantize(model, int(weights[1]))
    return model


def both_paths(model: CSM, sampler: FrameSampler, hidden: mx.array, monkeypatch: pytest.MonkeyPatch):
    calls = []
    real = kernels.depth_frame_batch  # (a frame of one conversation is its batch of one)
    monkeypatch.setattr(kernels, "depth_frame_batch", lambda *a, **k: calls.append(1) or real(*a, **k))
    code0 = mx.array([11], dtype=mx.int32)
    whole = model.decode_frame(hidden, code0, sampler)
    stepwise = model.decode_frame(hidden, code0, lambda logits, k: sampler(logits, k))
    assert calls == [1], "the FrameSampler did not take the native frame"
    return np.array(whole), np.array(stepwise)


@pytest.mark.parametrize("rule", sorted(RULES))
@pytest.mark.parametrize(("cfg", "weights"), [(TINY, "fp32"), (WIDE, "q4"), (WIDE, "q8")])
def test_native_frame_picks_the_stepwise_codes(cfg: CsmConfig, weights: str, rule: str, monkeypatch) -> None:
    monkeypatch.setenv("CSMD_KERNELS", "native")
    model = make_model(cfg, weights)
    params = RULES[rule].validate()
    for frame in range(4):
        hidden = mx.random.normal((1, cfg.backbone.hidden_size), key=mx.random.key(frame))
        sampler = FrameSampler(params, cfg.audio_codebook_size, seed=3, frame=frame)
        whole, stepwise = both_paths(model, sampler, hidden, monkeypatch)
        assert whole.shape == (1, cfg.num_codebooks)
        np.testing.assert_array_equal(whole, stepwise)
        if not params.allow_reserved_codes:
            assert whole.max() < cfg.audio_codebook_size


def test_bf16_native_frame_is_the_stepwise_frame_up_to_rounding(monkeypatch) -> None:
    """A bf16 model: the step-by-step path rounds the final norm's output and the logits to bf16, the native
    frame keeps fp32, so greedy codes may part where two logits are within bf16 rounding; most agree."""
    monkeypatch.setenv("CSMD_KERNELS", "native")
    model = make_model(TINY, "bf16")
    sampler = FrameSampler(RULES["greedy"], TINY.audio_codebook_size, seed=0, frame=0)
    agree = []
    for frame in range(4):
        hidden = mx.random.normal((1, TINY.backbone.hidden_size), key=mx.random.key(frame)).astype(mx.bfloat16)
        whole, stepwise = both_paths(model, sampler, hidden, monkeypatch)
        agree.append(whole[0, 1] == stepwise[0, 1])  # the first decoder code: before any divergence feeds back
    assert sum(agree) >= 3


def frame_inputs(cfg: CsmConfig = WIDE):
    model = make_model(cfg, "q4")
    weights = model.native_weights.depth_frame
    assert weights is not None
    stack, heads, embeddings, projection = weights.stack, weights.heads, weights.embeddings, weights.projection
    group_size, bits = weights.group_size, weights.bits
    x0 = mx.zeros((2, cfg.decoder.hidden_size))
    c, v = cfg.num_codebooks - 1, cfg.audio_vocab_size
    args = dict(
        x0=x0, stack=stack, inv_freqs=model.decoder._inv_freqs, norm=model.decoder.norm.scale, heads=heads,
        embeddings=embeddings, projection=projection, noise=mx.zeros((c, v)), num_heads=cfg.decoder.num_heads,
        num_kv_heads=cfg.decoder.num_kv_heads, eps=cfg.decoder.rms_norm_eps, group_size=group_size, bits=bits,
        temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, codebook_size=cfg.audio_codebook_size,
    )  # fmt: skip
    return args


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"x0": mx.zeros((1, 64))}, "x0 must be"),
        ({"noise": mx.zeros((3, 5))}, "noise must be"),
        ({"codebook_size": 0}, "codebook_size"),
        ({"top_p": 0.0}, "sampling rule"),
        ({"temperature": -1.0}, "temperature"),
        ({"heads": []}, "heads"),
        ({"projection": []}, "projection"),
    ],
)
def test_bad_inputs_raise_value_error(change: dict, match: str) -> None:
    args = frame_inputs()
    args.update(change)
    with pytest.raises(ValueError, match=match):
        mx.eval(kernels.depth_frame(**args))


def test_greedy_needs_no_noise() -> None:
    args = frame_inputs()
    args.update(temperature=0.0, noise=mx.zeros((0,)))
    codes = kernels.depth_frame(**args)
    assert codes.shape == (WIDE.num_codebooks - 1,) and codes.dtype == mx.int32
