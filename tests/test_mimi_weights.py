"""Mimi checkpoints in Kyutai, HF and csmd naming load to the same csmd tensors.

The reference weights come from moshi's own (tiny, random) Mimi. The HF file is made the way transformers'
converter made `kyutai/mimi` (its rename list and q/k permutation are copied below, since transformers no
longer ships the script), loaded by transformers' MimiModel, and written again by its save_pretrained.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from moshi_reference import HF_CONFIG, build_moshi, hf_convert, kyutai_file
from safetensors.torch import save_file
from transformers import MimiConfig as HFMimiConfig
from transformers import MimiModel as HFMimiModel

from csmd.audio.mimi.config import MIMI, TINY, QuantizerConfig
from csmd.audio.mimi.weights import (
    check_tensors,
    expected_shapes,
    from_hf_naming,
    from_kyutai_naming,
    load_mimi_tensors,
    random_tensors,
    to_csmd_naming,
)
from csmd.model.errors import CheckpointError

# torch.nn.utils.weight_norm (the old API, which old checkpoints were written with) is deprecated.
pytestmark = pytest.mark.filterwarnings("ignore:.*torch.nn.utils.weight_norm.*is deprecated:FutureWarning")


def np_(x: mx.array | torch.Tensor) -> np.ndarray:
    return x.detach().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def assert_same(ours: dict[str, mx.array], ref: dict[str, mx.array]) -> None:
    assert sorted(ours) == sorted(ref)
    for name in ref:
        np.testing.assert_array_equal(np_(ours[name]), np_(ref[name]), err_msg=name)


@pytest.fixture(scope="module")
def moshi() -> torch.nn.Module:
    return build_moshi()


@pytest.fixture(scope="module")
def kyutai_path(moshi: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("kyutai") / "tokenizer.safetensors"
    save_file(kyutai_file(moshi), str(path))
    return path


@pytest.fixture(scope="module")
def ours(kyutai_path: Path) -> dict[str, mx.array]:
    return load_mimi_tensors(kyutai_path, TINY)


def test_kyutai_naming_maps_every_tensor_to_its_source(moshi: torch.nn.Module, ours: dict[str, mx.array]) -> None:
    shapes = expected_shapes(TINY)
    assert {k: tuple(v.shape) for k, v in ours.items()} == shapes
    sd = moshi.state_dict()
    et, dt = "encoder_transformer.transformer.layers.0.", "decoder_transformer.transformer.layers.0."
    by_hand = {  # independent of the module's tables
        "encoder.layers.0.bias": "encoder.model.0.conv.conv.bias",
        "encoder.layers.3.weight": "encoder.model.3.conv.conv.weight",
        "encoder.layers.10.block.1.weight": "encoder.model.10.block.1.conv.conv.weight",
        "encoder.layers.14.weight": "encoder.model.14.conv.conv.weight",
        "decoder.layers.2.weight": "decoder.model.2.convtr.convtr.weight",
        "decoder.layers.11.bias": "decoder.model.11.convtr.convtr.bias",
        "decoder.layers.12.block.3.weight": "decoder.model.12.block.3.conv.conv.weight",
        "encoder_transformer.layers.0.attn.in_proj.weight": et + "self_attn.in_projs.0.weight",
        "decoder_transformer.layers.0.attn.out_proj.weight": dt + "self_attn.out_projs.0.weight",
        "decoder_transformer.layers.0.mlp.fc2.weight": dt + "linear2.weight",
        "encoder_transformer.layers.0.norm2.bias": et + "norm2.bias",
        "decoder_transformer.layers.0.layer_scale_1": dt + "layer_scale_1.scale",
        "downsample.weight": "downsample.conv.conv.conv.weight",
        "upsample.weight": "upsample.convtr.convtr.convtr.weight",
        "quantizer.semantic.output_proj.weight": "quantizer.rvq_first.output_proj.weight",
        "quantizer.acoustic.input_proj.weight": "quantizer.rvq_rest.input_proj.weight",
        "quantizer.semantic.codebooks.0.cluster_usage": "quantizer.rvq_first.vq.layers.0._codebook.cluster_usage",
        "quantizer.acoustic.codebooks.2.embedding_sum": "quantizer.rvq_rest.vq.layers.2._codebook.embedding_sum",
    }
    for name, source in by_hand.items():
        np.testing.assert_array_equal(np_(ours[name]), np_(sd[source]), err_msg=name)
    # And every tensor is exactly one moshi tensor (all are random, so a value match identifies the source).
    sources = [v for k, v in sd.items() if not k.endswith("_initialized")]
    assert len(sources) == len(ours)
    for name, value in ours.items():
        hits = [s for s in sources if tuple(s.shape) == value.shape and np.array_equal(np_(s), np_(value))]
        assert len(hits) == 1, name


def test_moshi_state_dict_names_load_too(moshi: torch.nn.Module, ours: dict[str, mx.array]) -> None:
    """moshi's own state_dict() names (in_projs.0 / out_projs.0) load as well as the released file's."""
    tensors = {k: mx.array(v.numpy()) for k, v in moshi.state_dict().items()}
    assert_same(to_csmd_naming(tensors, TINY, "moshi"), ours)


def test_hf_file_written_by_transformers_matches_kyutai(
    moshi: torch.nn.Module, ours: dict[str, mx.array], tmp_path: Path
) -> None:
    converted = tmp_path / "converted"
    converted.mkdir()
    HFMimiConfig(**HF_CONFIG).save_pretrained(converted)
    save_file(hf_convert(kyutai_file(moshi), num_heads=2), str(converted / "model.safetensors"))
    hf, info = HFMimiModel.from_pretrained(converted, output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info

    # transformers runs the converted q/k with rotate-half RoPE and matches moshi's interleaved RoPE: so
    # the converter's permutation (which from_hf_naming undoes) goes in the direction written above.
    x = torch.randn(1, 8, 32)
    with torch.no_grad():
        ref = moshi.encoder_transformer.transformer(x)
        got = hf.eval().encoder.encoder_transformer(x).last_hidden_state
    update, ref_update = got - x, ref - x  # the residual stream dominates; compare what the layer adds
    assert float((update - ref_update).abs().max() / ref_update.abs().max()) < 1e-4  # wrong order: 0.09

    resaved = tmp_path / "resaved"
    hf.save_pretrained(resaved)
    assert_same(load_mimi_tensors(resaved / "model.safetensors", TINY), ours)


def test_hf_on_disk_names(moshi: torch.nn.Module, tmp_path: Path) -> None:
    """What save_pretrained writes (and kyutai/mimi holds), though transformers renames modules at runtime."""
    HFMimiModel(HFMimiConfig(**HF_CONFIG)).save_pretrained(tmp_path)
    names = set(mx.load(str(tmp_path / "model.safetensors")))
    assert set(hf_convert(kyutai_file(moshi), num_heads=2)) == names
    for name in (
        "encoder.layers.12.conv.weight",
        "decoder.layers.2.conv.weight",
        "encoder_transformer.layers.0.self_attn.q_proj.weight",
        "decoder_transformer.layers.0.mlp_layer_scale.scale",
        "downsample.conv.weight",
        "upsample.conv.weight",
        "quantizer.acoustic_residual_vector_quantizer.layers.2.codebook.embed_sum",
        "quantizer.semantic_residual_vector_quantizer.input_proj.weight",
    ):
        assert name in names
    loaded = load_mimi_tensors(tmp_path / "model.safetensors", TINY)  # a fresh HF model loads as it is
    assert set(loaded) == set(expected_shapes(TINY))


def test_hf_csm_checkpoint_gives_its_codec(moshi: torch.nn.Module, ours: dict[str, mx.array], tmp_path: Path) -> None:
    tensors = {"codec_model." + k: v for k, v in hf_convert(kyutai_file(moshi), num_heads=2).items()}
    tensors["lm_head.weight"] = torch.randn(67, 64)
    tensors["backbone_model.norm.weight"] = torch.ones(64)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    assert_same(load_mimi_tensors(tmp_path / "model.safetensors", TINY), ours)
    # from_hf_naming alone strips the prefix too.
    codec = {k: mx.array(v.numpy()) for k, v in tensors.items() if k.startswith("codec_model.")}
    assert_same(from_hf_naming(codec, TINY), ours)


def test_csmd_naming_round_trips(tmp_path: Path) -> None:
    tensors = random_tensors(TINY, seed=3)
    mx.save_safetensors(str(tmp_path / "mimi.safetensors"), tensors)
    assert_same(load_mimi_tensors(tmp_path / "mimi.safetensors", TINY), tensors)


@pytest.mark.parametrize("api", ["weight_norm", "parametrizations"])
def test_weight_norm_is_folded(api: str, tmp_path: Path) -> None:
    model = build_moshi(seed=1)
    conv, convtr = model.encoder.model[3].conv.conv, model.decoder.model[2].convtr.convtr
    plain = {"encoder.layers.3.weight": conv.weight.detach().clone()}
    plain["decoder.layers.2.weight"] = convtr.weight.detach().clone()
    norm = torch.nn.utils.weight_norm if api == "weight_norm" else torch.nn.utils.parametrizations.weight_norm
    norm(conv)
    norm(convtr)
    state = kyutai_file(model)
    g = "weight_g" if api == "weight_norm" else "parametrizations.weight.original0"
    assert state[f"decoder.model.2.convtr.convtr.{g}"].shape == (128, 1, 1)  # dim 0 of a convtr is its input
    assert "encoder.model.3.conv.conv.weight" not in state
    save_file(state, str(tmp_path / "wn.safetensors"))
    loaded = load_mimi_tensors(tmp_path / "wn.safetensors", TINY)
    for name, ref in plain.items():
        err = np.abs(np_(loaded[name]) - ref.numpy()).max() / np.abs(ref.numpy()).max()
        assert err < 1e-6, name

    v = "weight_v" if api == "weight_norm" else "parametrizations.weight.original1"
    del state[f"encoder.model.3.conv.conv.{v}"]
    save_file(state, str(tmp_path / "half.safetensors"))
    with pytest.raises(CheckpointError, match=rf"half\.safetensors.*encoder\.model\.3\.conv\.conv\.{v}"):
        load_mimi_tensors(tmp_path / "half.safetensors", TINY)


def test_full_size_names_and_count() -> None:
    # 14 SEANet convs per side x (weight, bias), 10 tensors per transformer layer x 8 layers x 2,
    # down/upsample, 4 RVQ projections, 32 levels x (embedding_sum, cluster_usage).
    count = 2 * 14 * 2 + 2 * 8 * 10 + 2 + 4 + 32 * 2
    assert count == 286 == len(expected_shapes(MIMI))
    state = kyutai_file(build_moshi(full_size=True))
    assert len(state) == 318  # MIMI-SPEC section 8.1: the 286 plus 32 `_initialized` flags
    # Lazy zeros: only shapes are looked at, so nothing of the 385 MB is allocated.
    lazy = {k: mx.zeros(tuple(v.shape)) for k, v in state.items()}
    assert set(from_kyutai_naming(lazy, MIMI)) == set(expected_shapes(MIMI))
    check_tensors(to_csmd_naming(lazy, MIMI, "full"), MIMI, "full")
    hf = hf_convert(state, num_heads=8)
    assert len(hf) == 350  # MIMI-SPEC section 8.2
    check_tensors(to_csmd_naming({k: mx.zeros(tuple(v.shape)) for k, v in hf.items()}, MIMI, "hf"), MIMI, "hf")
    # Moshi's default config uses 8 codebooks; a config with 8 levels keeps only those from the 32-level file.
    eight = dataclasses.replace(MIMI, quantizer=QuantizerConfig(n_q=8), num_codebooks=8)
    kept = to_csmd_naming(lazy, eight, "full")
    assert "quantizer.acoustic.codebooks.6.embedding_sum" in kept
    assert "quantizer.acoustic.codebooks.7.embedding_sum" not in kept


def test_fewer_levels_than_the_config_is_an_error(kyutai_path: Path) -> None:
    six = dataclasses.replace(TINY, quantizer=QuantizerConfig(dimension=16, n_q=6, bins=64))
    with pytest.raises(CheckpointError, match=r"tokenizer\.safetensors: holds 4 quantizer levels, the config needs 6"):
        load_mimi_tensors(kyutai_path, six)


def kyutai_tensors(moshi: torch.nn.Module) -> dict[str, mx.array]:
    return {k: mx.array(v.numpy()) for k, v in kyutai_file(moshi).items()}


def test_missing_tensor_is_named(moshi: torch.nn.Module) -> None:
    tensors = kyutai_tensors(moshi)
    del tensors["decoder.model.5.convtr.convtr.bias"]
    with pytest.raises(CheckpointError, match=r"^ck\.safetensors: missing tensor 'decoder\.layers\.5\.bias'$"):
        to_csmd_naming(tensors, TINY, "ck.safetensors")


def test_unexpected_tensor_is_named(moshi: torch.nn.Module) -> None:
    tensors = kyutai_tensors(moshi)
    tensors["encoder.model.0.extra"] = mx.zeros((3,))
    with pytest.raises(CheckpointError, match=r"ck\.safetensors: unexpected tensor 'encoder\.model\.0\.extra'"):
        to_csmd_naming(tensors, TINY, "ck.safetensors")


def test_misshaped_tensor_is_named_with_both_shapes(moshi: torch.nn.Module) -> None:
    tensors = kyutai_tensors(moshi)
    tensors["encoder_transformer.transformer.layers.0.linear1.weight"] = mx.zeros((32, 64))
    with pytest.raises(
        CheckpointError,
        match=r"ck\.safetensors: tensor 'encoder_transformer\.layers\.0\.mlp\.fc1\.weight' "
        r"has shape \(32, 64\), the config needs \(64, 32\)",
    ):
        to_csmd_naming(tensors, TINY, "ck.safetensors")


def test_hf_missing_k_proj_is_named(moshi: torch.nn.Module) -> None:
    hf = hf_convert(kyutai_file(moshi), num_heads=2)
    del hf["decoder_transformer.layers.0.self_attn.k_proj.weight"]
    tensors = {k: mx.array(v.numpy()) for k, v in hf.items()}
    with pytest.raises(CheckpointError, match=r"ck\.safetensors: .*decoder_transformer.*lacks its self_attn\.k_proj"):
        to_csmd_naming(tensors, TINY, "ck.safetensors")


def test_random_tensors() -> None:
    tensors = random_tensors(TINY)
    check_tensors(tensors, TINY, "random")
    assert all(bool(mx.all(mx.isfinite(v))) for v in tensors.values())
    assert all(float(tensors[k].min()) > 0 for k in tensors if k.endswith("cluster_usage"))
    scales = [k for k in tensors if "layer_scale" in k]
    assert scales and all(0.01 <= float(tensors[k].min()) <= float(tensors[k].max()) <= 0.1 for k in scales)
    assert_same(random_tensors(TINY), tensors)  # deterministic
    other = random_tensors(TINY, seed=1)
    assert not np.array_equal(np_(other["decoder.layers.2.weight"]), np_(tensors["decoder.layers.2.weight"]))
    check_tensors(random_tensors(MIMI), MIMI, "random")  # lazy: shapes only
