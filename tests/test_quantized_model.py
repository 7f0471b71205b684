"""Quantized CSM: every projection and the depth decoder's codebook heads, each part at its scheme's bits, saved
and loaded in csmd's format, on the native fused paths."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from csmd.model.config import TINY
from csmd.model.csm import CSM, QuantizedCodebookHeads
from csmd.model.errors import CheckpointError
from csmd.model.loading import load_model
from csmd.model.quantization import QuantizationScheme
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
    save_csmd(model, tmp_path, QuantizationScheme.uniform(4))
    loaded = load_model(str(tmp_path)).model
    assert isinstance(loaded.audio_head, QuantizedCodebookHeads)
    np.testing.assert_array_equal(decoder_logits(loaded, 2), decoder_logits(model, 2))


MIXED = ["backbone=4,decoder=8", "backbone=8,decoder=4", "backbone=4,decoder=none", "backbone=none,decoder=8"]
SCHEMES = ["4", "8", *MIXED]


def part_formats(model: CSM) -> dict[str, set[object]]:
    """Per part, the formats of its matrices and tables: bits, or the float dtype of one left alone."""
    members = {
        "backbone": [model.text_embeddings, model.codebook0_head, model.backbone],
        "decoder": [model.audio_embeddings, model.projection, model.audio_head, model.decoder],
    }
    formats: dict[str, set[object]] = {}
    for part, modules in members.items():
        found = formats.setdefault(part, set())
        for module in modules:
            if isinstance(module, mx.array):  # the float codebook heads
                found.add(module.dtype)
                continue
            for _, leaf in module.named_modules():
                if hasattr(leaf, "bits"):
                    found.add(leaf.bits)
                elif "weight" in leaf and leaf.weight.ndim == 2:
                    found.add(leaf.weight.dtype)
    return formats


@pytest.mark.parametrize("text", SCHEMES)
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_each_part_takes_its_bits_and_keeps_the_native_paths(text: str, dtype: mx.Dtype) -> None:
    """Every matrix of a part is in the part's format, so the fused backbone step, the fused decoder step and
    the native whole depth frame all still read the weights (none of NativeWeights is None)."""
    scheme = QuantizationScheme.parse(text)
    model = build_model(WIDE, random_params(WIDE, dtype), dtype, "random")
    quantize(model, scheme)
    formats = part_formats(model)
    native = model.native_weights
    assert native.backbone is not None and native.decoder is not None and native.depth_frame is not None
    dense = {mx.float32: 0, mx.bfloat16: 16}[dtype]
    for part, stack in (("backbone", native.backbone), ("decoder", native.decoder)):
        bits = scheme.bits(part)
        assert formats[part] == ({dtype} if bits is None else {bits}), part
        assert stack.bits == (dense if bits is None else bits), part
    assert native.depth_frame.bits == native.decoder.bits


@pytest.mark.parametrize("text", ["backbone=4,decoder=8", "backbone=8,decoder=4", "backbone=none,decoder=4"])
def test_a_mixed_scheme_survives_save_and_load(text: str, tmp_path: Path) -> None:
    """config.json records the scheme, loading gives the quantized layout before the weights (layout_only), and
    the model that comes back is the one saved: the same arrays, the same logits, the same native paths."""
    scheme = QuantizationScheme.parse(text)
    model = build_model(WIDE, random_params(WIDE, mx.float32), mx.float32, "random")
    quantize(model, scheme)
    save_csmd(model, tmp_path, scheme)
    assert json.loads((tmp_path / "config.json").read_text())["quantization"] == scheme.to_dict()
    loaded = load_model(str(tmp_path)).model
    ours, theirs = dict(tree_flatten(loaded.parameters())), dict(tree_flatten(model.parameters()))
    assert ours.keys() == theirs.keys()
    for name, value in theirs.items():
        assert ours[name].dtype == value.dtype and mx.array_equal(ours[name], value).item(), name
    assert part_formats(loaded) == part_formats(model)
    for stack in ("backbone", "decoder", "depth_frame"):
        assert getattr(loaded.native_weights, stack).bits == getattr(model.native_weights, stack).bits, stack
    np.testing.assert_array_equal(decoder_logits(loaded, 2), decoder_logits(model, 2))


def test_a_config_of_one_bits_for_all_still_loads(tmp_path: Path) -> None:
    """csmd directories written before per-part schemes say {"bits": 8, "group_size": 64}."""
    model = build_model(WIDE, random_params(WIDE, mx.float32), mx.float32, "random")
    quantize(model, 8)
    save_csmd(model, tmp_path, QuantizationScheme.uniform(8))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization"] == {"bits": 8, "group_size": 64}
    loaded = load_model(str(tmp_path)).model
    assert part_formats(loaded) == {"backbone": {8}, "decoder": {8}}
    np.testing.assert_array_equal(decoder_logits(loaded, 1), decoder_logits(model, 1))


def test_a_bad_quantization_record_names_the_file(tmp_path: Path) -> None:
    model = build_model(WIDE, random_params(WIDE, mx.float32), mx.float32, "random")
    quantize(model, 4)
    save_csmd(model, tmp_path, QuantizationScheme.uniform(4))
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization"] = {"bits": 5, "group_size": 64}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config\.json: 'quantization': bits must be 4 or 8, not 5"):
        load_model(str(tmp_path))
