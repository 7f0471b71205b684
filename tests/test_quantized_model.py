"""Quantized CSM: every projection and the depth decoder's codebook heads, saved and loaded in csmd's format."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from csmd.model.config import TINY
from csmd.model.csm import CSM, QuantizedCodebookHeads
from csmd.model.loading import load_model
from csmd.model.weights import build_model, quantize, random_params, save_csmd

# The tiny preset's decoder is 32 wide, too narrow for 64-wide groups; this one quantizes everywhere.
WIDE = dataclasses.replace(TINY, decoder=dataclasses.replace(TINY.decoder, hidden_size=64, num_heads=4))


def decoder_logits(model: CSM, codebook: int) -> np.ndarray:
    x = mx.random.normal((1, WIDE.decoder.hidden_size), key=mx.random.key(3))
    return np.array(model.decoder_logits(x, codebook))


@pytest.mark.parametrize(("bits", "tolerance"), [(8, 0.01), (4, 0.15)])
def test_codebook_heads_quantized_within_tolerance(bits: int, tolerance: float) -> None:
    params = random_params(WIDE, mx.float32)
    float_model = build_model(WIDE, params, mx.float32, "random")
    model = build_model(WIDE, params, mx.float32, "random")
    quantize(model, bits)
    assert isinstance(model.audio_head, QuantizedCodebookHeads)
    for codebook in (1, WIDE.num_codebooks - 1):
        want, got = decoder_logits(float_model, codebook), decoder_logits(model, codebook)
        assert got.shape == (1, WIDE.audio_vocab_size)
        # Relative to the logits' spread: 8-bit groups keep ~0.3 %, 4-bit ~6 % on Gaussian weights.
        assert np.abs(got - want).max() / np.abs(want).max() < tolerance


def test_quantized_heads_survive_save_and_load(tmp_path: Path) -> None:
    model = build_model(WIDE, random_params(WIDE, mx.float32), mx.float32, "random")
    quantize(model, 4)
    save_csmd(model, tmp_path, {"bits": 4, "group_size": 64})
    loaded = load_model(str(tmp_path)).model
    assert isinstance(loaded.audio_head, QuantizedCodebookHeads)
    np.testing.assert_array_equal(decoder_logits(loaded, 2), decoder_logits(model, 2))
