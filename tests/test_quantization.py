"""Quantization schemes: the flag's text, config.json's record, and which part each parameter belongs to."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from csmd.model.config import CSM_1B
from csmd.model.csm import CSM
from csmd.model.quantization import PARTS, QuantizationScheme, part_of
from csmd.model.weights import quantize


@pytest.mark.parametrize(
    ("text", "backbone", "decoder", "canonical"),
    [
        ("4", 4, 4, "4"),
        ("8", 8, 8, "8"),
        ("backbone=4,decoder=8", 4, 8, "backbone=4,decoder=8"),
        ("decoder=4, backbone=8", 8, 4, "backbone=8,decoder=4"),
        ("backbone=8,decoder=8", 8, 8, "8"),
        ("backbone=4,decoder=none", 4, None, "backbone=4,decoder=none"),
        ("backbone=none,decoder=8", None, 8, "backbone=none,decoder=8"),
    ],
)
def test_the_flag_text_parses_and_prints_back(text: str, backbone: int, decoder: int, canonical: str) -> None:
    scheme = QuantizationScheme.parse(text)
    assert (scheme.backbone, scheme.decoder, scheme.group_size) == (backbone, decoder, 64)
    assert str(scheme) == canonical
    assert QuantizationScheme.parse(str(scheme)) == scheme
    assert QuantizationScheme.from_dict(scheme.to_dict()) == scheme


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("16", "expected 4, 8 or backbone=B,decoder=D"),
        ("", "expected 4, 8 or backbone=B,decoder=D"),
        ("four", "expected 4, 8 or backbone=B,decoder=D"),
        ("backbone=4", "does not say decoder's bits"),
        ("backbone=3,decoder=8", "backbone: expected 4, 8 or none, not '3'"),
        ("backbone=4,decoder=", "decoder: expected 4, 8 or none, not ''"),
        ("backbone=4,backbone=8", "backbone is given twice"),
        ("backbone=4,heads=8", "expected 4, 8 or backbone=B,decoder=D"),
        ("backbone=none,decoder=none", "quantizes nothing"),
    ],
)
def test_a_bad_flag_text_says_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        QuantizationScheme.parse(text)


def test_config_records_uniform_schemes_as_before_and_mixed_ones_per_part() -> None:
    assert QuantizationScheme.uniform(4).to_dict() == {"bits": 4, "group_size": 64}  # what older csmd wrote and reads
    mixed = QuantizationScheme(4, None)
    assert mixed.to_dict() == {"backbone": 4, "decoder": None, "group_size": 64}
    assert QuantizationScheme.from_dict({"bits": 8, "group_size": 32}) == QuantizationScheme(8, 8, 32)
    assert QuantizationScheme.from_dict({"bits": 4}) == QuantizationScheme.uniform(4)


@pytest.mark.parametrize(
    "data",
    [
        [4],
        {"bits": 3, "group_size": 64},
        {"bits": True},
        {"bits": 4, "decoder": 8},
        {"backbone": 4},
        {"backbone": 4, "decoder": 8, "heads": 4},
        {"backbone": None, "decoder": None},
        {"backbone": "4", "decoder": 8},
        {"bits": 4, "group_size": "64"},
    ],
)
def test_a_bad_config_record_is_refused(data: object) -> None:
    with pytest.raises(ValueError):
        QuantizationScheme.from_dict(data)


def test_every_parameter_of_a_csm_belongs_to_a_part() -> None:
    """Which part a parameter is in decides its bits: a module added to CSM without a part must fail here,
    not be quantized silently at some part's bits (or not at all)."""
    model = CSM(CSM_1B)  # lazily initialised: nothing is computed
    parts = {name: part_of(name) for name, _ in tree_flatten(model.parameters())}
    assert set(parts.values()) == set(PARTS)
    assert parts["audio_embeddings.weight"] == "decoder"  # read by the native depth frame with the heads
    assert parts["text_embeddings.weight"] == parts["codebook0_head.weight"] == "backbone"
    with pytest.raises(ValueError, match="in no part"):
        part_of("vocoder.weight")


def test_layout_only_quantization_of_csm_1b_shapes_costs_nothing() -> None:
    """The real shapes, each part at its own bits, without computing a weight (what loading does first)."""
    model = CSM(CSM_1B)
    model.set_dtype(mx.bfloat16)
    quantize(model, QuantizationScheme(4, 8), layout_only=True)
    assert model.backbone.layers[0].attn.q_proj.bits == 4 and model.text_embeddings.bits == 4
    assert model.decoder.layers[0].mlp.w2.bits == 8 and model.audio_embeddings.bits == 8
    assert model.projection.bits == 8 and model.audio_head.bits == 8 and model.codebook0_head.bits == 4
