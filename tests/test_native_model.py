"""The whole model on the native kernels against the reference path (plain MLX ops).

fp32: the same greedy frames, 20 of them, on the tiny config. Quantized (4 and 8 bit, on a config wide
enough for 64-wide groups): the native matrix products sum in another order, so logits agree to a stated
tolerance rather than bit for bit.
"""

from __future__ import annotations

import dataclasses
import os

import mlx.core as mx
import numpy as np
import pytest

from csmd.kernels import native
from csmd.model.config import TINY
from csmd.model.csm import CSM
from csmd.model.generator import Generator
from csmd.model.sampling import GenerationParams
from csmd.model.tokenizer import TextTokenizer
from csmd.model.weights import build_model, quantize, random_params

if native.module is None:
    if os.environ.get("CSMD_REQUIRE_NATIVE") == "1":
        raise ImportError(f"CSMD_REQUIRE_NATIVE=1 but the native kernels did not load: {native.load_error}")
    pytest.skip(f"native kernels not built: {native.load_error}", allow_module_level=True)

WIDE = dataclasses.replace(TINY, decoder=dataclasses.replace(TINY.decoder, hidden_size=64, num_heads=4))
GREEDY = GenerationParams(temperature=0.0, max_frames=20, seed=0)


def frames_with(
    kernels: str, model: CSM, monkeypatch: pytest.MonkeyPatch, kv_dtype: mx.Dtype | None = None
) -> np.ndarray:
    monkeypatch.setenv("CSMD_KERNELS", kernels)
    gen = Generator(model, TextTokenizer.utf8_bytes(), kv_dtype)
    context = gen.new_context()
    assert kv_dtype is None or context.kv_dtype == kv_dtype
    frames = gen.generate(context, "native or not, the same frames", speaker=0, params=GREEDY).frames
    return np.asarray(frames)


def test_fp32_native_frames_equal_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    model = build_model(TINY, random_params(TINY, mx.float32, seed=4), mx.float32, "random")
    native_frames = frames_with("native", model, monkeypatch)
    reference_frames = frames_with("reference", model, monkeypatch)
    assert native_frames.shape == (20, TINY.num_codebooks)  # the random model never says EOS in 20 frames
    np.testing.assert_array_equal(native_frames, reference_frames)


def test_bf16_cache_native_frames_equal_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bf16 backbone cache on both paths: the native step rounds its new keys and values before attending
    to them, as the MLX path does by writing them into the cache first, so the greedy frames are the same."""
    model = build_model(TINY, random_params(TINY, mx.float32, seed=4), mx.float32, "random")
    native_frames = frames_with("native", model, monkeypatch, mx.bfloat16)
    reference_frames = frames_with("reference", model, monkeypatch, mx.bfloat16)
    assert native_frames.shape == (20, TINY.num_codebooks)
    np.testing.assert_array_equal(native_frames, reference_frames)


@pytest.mark.parametrize(("bits", "mode"), [(4, "int16"), (4, "int8"), (8, "int16"), (8, "int8"), (16, "int16")])
def test_quantized_native_logits_match_the_reference(bits: int, mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """bits 16: a bfloat16 model (dense bf16 weights), whose reference path also computes in bf16.

    mode: the matvec mode of the native path (the default, auto, is int8 on CPUs with AVX-512 VNNI).
    """
    assert native.module is not None
    native.module.set_matvec_mode(mode)
    try:
        seen = _native_and_reference_logits(bits, monkeypatch)
    finally:
        native.apply_matvec_mode()
    # Quantized: both dequantize the same integers with the same scales and sum in fp32 (the native int16
    # activations add ~1e-4; int8 ones ~0.6% per product at 4 bits, held by relative RMS per logit vector).
    # bf16: MLX rounds every activation to bf16, the native step keeps fp32, so they differ by bf16 rounding
    # (2^-8) accumulated over the layers.
    for got, want in zip(seen["native"], seen["reference"], strict=True):
        if mode == "int8" and bits == 4:
            assert np.sqrt(np.mean((got - want) ** 2) / np.mean(want**2)) < 3e-2  # measured 1.5-1.9e-2
        else:
            tolerance = 3e-2 if bits == 16 else 1e-3
            np.testing.assert_allclose(got, want, rtol=tolerance, atol=tolerance * np.abs(want).max())


def _native_and_reference_logits(bits: int, monkeypatch: pytest.MonkeyPatch) -> dict[str, list[np.ndarray]]:
    """Every logit vector of one teacher-forced frame, on the native path and on the reference path."""
    dtype = mx.bfloat16 if bits == 16 else mx.float32
    model = build_model(WIDE, random_params(WIDE, dtype, seed=5), dtype, "random")
    if bits < 16:
        quantize(model, bits)
    tokens = mx.array(np.random.default_rng(0).integers(0, 60, size=(1, 9, WIDE.num_columns)))
    mask = mx.ones(tokens.shape, dtype=mx.bool_)
    seen: dict[str, list[np.ndarray]] = {}
    for kernels in ("native", "reference"):
        monkeypatch.setenv("CSMD_KERNELS", kernels)
        logits: list[np.ndarray] = []

        def teacher(step_logits: mx.array, codebook: int, logits: list[np.ndarray] = logits) -> mx.array:
            logits.append(np.array(step_logits))
            return mx.array([codebook + 1], dtype=mx.int32)  # teacher-forced: both paths see the same codes

        hidden = model.backbone_step(tokens, mask, model.make_backbone_cache())
        logits.append(np.array(model.codebook0_logits(hidden)))
        mx.eval(model.decode_frame(hidden, mx.array([3], dtype=mx.int32), teacher))
        seen[kernels] = logits
    return seen


def _wide_backbone_and_rows(seed: int) -> tuple[CSM, mx.array, mx.array]:
    """A tiny model with a backbone wide enough to spread its attention heads over threads, a 300-row prompt
    and one more row for it."""
    wide_backbone = dataclasses.replace(TINY.backbone, num_heads=8, num_kv_heads=4, head_dim=64, max_seq_len=512)
    cfg = dataclasses.replace(TINY, backbone=wide_backbone)
    model = build_model(cfg, random_params(cfg, mx.float32, seed=6), mx.float32, "random")
    rng = np.random.default_rng(seed)
    prompt = mx.array(rng.integers(0, 60, size=(1, 300, cfg.num_columns)))
    row = mx.array(rng.integers(0, 60, size=(1, 1, cfg.num_columns)))
    return model, prompt, row


def test_fused_backbone_step_after_a_long_context(monkeypatch: pytest.MonkeyPatch) -> None:
    """Deep in a conversation: the step's attention runs its heads across threads and reads a long cache."""
    model, prompt, row = _wide_backbone_and_rows(seed=1)
    hidden = {}
    for kernels in ("native", "reference"):
        monkeypatch.setenv("CSMD_KERNELS", kernels)
        cache = model.make_backbone_cache()
        model.backbone_step(prompt, mx.ones(prompt.shape, dtype=mx.bool_), cache)  # prefill: many rows
        hidden[kernels] = np.array(model.backbone_step(row, mx.ones(row.shape, dtype=mx.bool_), cache))
        assert cache.offset == 301
    np.testing.assert_allclose(hidden["native"], hidden["reference"], rtol=1e-4, atol=1e-4)


def test_fused_backbone_step_over_a_bf16_cache_after_a_long_context(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same over a bf16 cache: the prefill (MLX ops) stores its keys and values rounded, the fused step reads
    them widened; the reference path agrees, and both differ from the fp32 cache's state by the rounding."""
    model, prompt, row = _wide_backbone_and_rows(seed=2)
    hidden = {}
    for kernels, dtype in (("native", mx.bfloat16), ("reference", mx.bfloat16), ("native", None)):
        monkeypatch.setenv("CSMD_KERNELS", kernels)
        cache = model.make_backbone_cache(dtype=dtype)
        assert cache.dtype == (dtype or mx.float32) and cache.keys.nbytes == cache.values.nbytes
        model.backbone_step(prompt, mx.ones(prompt.shape, dtype=mx.bool_), cache)
        hidden[kernels, dtype] = np.array(model.backbone_step(row, mx.ones(row.shape, dtype=mx.bool_), cache))
        assert cache.dtype == (dtype or mx.float32)  # the slice updates keep the cache's dtype
    bf16 = hidden["native", mx.bfloat16]
    np.testing.assert_allclose(bf16, hidden["reference", mx.bfloat16], rtol=1e-4, atol=1e-4)
    assert np.abs(bf16 - hidden["native", None]).max() > 1e-3
