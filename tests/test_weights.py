"""Loading checkpoints: Sesame naming (safetensors, .pt), HF naming (single file, sharded), csmd's own format
(convert, quantized), and the errors a broken or mismatched file must give."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_hf_csm import NQ, rel_err
from transformers import CsmForConditionalGeneration

from csmd.cli import main
from csmd.model.csm import CSM
from csmd.model.errors import CheckpointError
from csmd.model.generator import audio_rows, text_rows
from csmd.model.loading import load_model

HF_LAYER_PARTS = {  # HF -> Sesame, written out here independently of csmd's own table
    "input_layernorm.weight": "sa_norm.scale",
    "post_attention_layernorm.weight": "mlp_norm.scale",
    "self_attn.q_proj.weight": "attn.q_proj.weight",
    "self_attn.k_proj.weight": "attn.k_proj.weight",
    "self_attn.v_proj.weight": "attn.v_proj.weight",
    "self_attn.o_proj.weight": "attn.output_proj.weight",
    "mlp.gate_proj.weight": "mlp.w1.weight",
    "mlp.up_proj.weight": "mlp.w3.weight",
    "mlp.down_proj.weight": "mlp.w2.weight",
}


def sesame_state_dict(ref: CsmForConditionalGeneration) -> dict[str, torch.Tensor]:
    """The reference's weights as Sesame's ckpt.pt names them, with q/k rows back in interleaved order."""

    def unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:  # inverse of convert_csm.permute_for_rope
        out, inp = w.shape
        return w.view(heads, 2, out // heads // 2, inp).transpose(1, 2).reshape(out, inp)

    sd = {
        "text_embeddings.weight": ref.embed_text_tokens.weight,
        "audio_embeddings.weight": ref.backbone_model.embed_tokens.embed_audio_tokens.weight,
        "projection.weight": ref.depth_decoder.model.inputs_embeds_projector.weight,
        "codebook0_head.weight": ref.lm_head.weight,
        "audio_head": ref.depth_decoder.codebooks_head.weight,
        "backbone.norm.scale": ref.backbone_model.norm.weight,
        "decoder.norm.scale": ref.depth_decoder.model.norm.weight,
    }
    for ours, stack in (("backbone", ref.backbone_model), ("decoder", ref.depth_decoder.model)):
        cfg = stack.config
        for i, layer in enumerate(stack.layers):
            for hf_name, tensor in layer.state_dict().items():
                if hf_name.endswith("q_proj.weight"):
                    tensor = unpermute(tensor, cfg.num_attention_heads)
                elif hf_name.endswith("k_proj.weight"):
                    tensor = unpermute(tensor, cfg.num_key_value_heads)
                sd[f"{ours}.layers.{i}.{HF_LAYER_PARTS[hf_name]}"] = tensor
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


def probe(model: CSM) -> tuple[np.ndarray, np.ndarray]:
    """Codebook-0 logits after a small prompt, and depth-decoder logits for a fixed frame."""
    tokens, mask = text_rows(np.arange(5, 12), NQ)
    frame_tokens, frame_mask = audio_rows(np.array([[3, 1, 4, 1]]))
    rows = np.concatenate([tokens, frame_tokens])[None], np.concatenate([mask, frame_mask])[None]
    hidden = model.backbone_step(mx.array(rows[0]), mx.array(rows[1]), model.make_backbone_cache())
    seen: list[mx.array] = []

    def teacher(logits: mx.array, codebook: int) -> mx.array:
        seen.append(logits)
        return mx.array([codebook], dtype=mx.int32)

    model.decode_frame(hidden, mx.array([2], dtype=mx.int32), teacher)
    return np.array(model.codebook0_logits(hidden)), np.array(mx.concatenate(seen))


@pytest.fixture(scope="module")
def hf_probe(hf_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    return probe(load_model(str(hf_dir)).model)


def test_sesame_safetensors_and_pt_give_the_same_results(
    tmp_path: Path,
    hf_dir: Path,
    reference: CsmForConditionalGeneration,
    hf_probe: tuple[np.ndarray, np.ndarray],
) -> None:
    cfg = load_model(str(hf_dir)).model.config
    sd = sesame_state_dict(reference)
    save_file(sd, tmp_path / "model.safetensors")
    torch.save(sd, tmp_path / "ckpt.pt")
    for name in ("model.safetensors", "ckpt.pt"):
        logits0, decoder_logits = probe(load_model(str(tmp_path / name), config=cfg).model)
        assert rel_err(logits0, hf_probe[0]) < 1e-5, name
        assert rel_err(decoder_logits, hf_probe[1]) < 1e-5, name


def test_bf16_sesame_pt_loads(tmp_path: Path, hf_dir: Path, reference: CsmForConditionalGeneration) -> None:
    """Sesame's ckpt.pt holds bf16 tensors."""
    cfg = load_model(str(hf_dir)).model.config
    torch.save({k: v.bfloat16() for k, v in sesame_state_dict(reference).items()}, tmp_path / "ckpt.pt")
    model = load_model(str(tmp_path), config=cfg, dtype="bfloat16").model
    assert model.codebook0_head.weight.dtype == mx.bfloat16
    expected = reference.lm_head.weight.detach().bfloat16().float().numpy()
    np.testing.assert_array_equal(np.array(model.codebook0_head.weight.astype(mx.float32)), expected)


def test_bf16_stays_close_to_fp32(hf_dir: Path, hf_probe: tuple[np.ndarray, np.ndarray]) -> None:
    logits0, decoder_logits = probe(load_model(str(hf_dir), dtype="bfloat16").model)
    # Documented in the README: bf16 logits within 3% (relative to the largest logit) of fp32.
    assert rel_err(logits0, hf_probe[0]) < 3e-2
    assert rel_err(decoder_logits, hf_probe[1]) < 3e-2


def test_hf_checkpoint_exposes_bundled_mimi_tensors(hf_dir: Path) -> None:
    codec = load_model(str(hf_dir)).codec_tensors
    in_file = load_file(hf_dir / "model.safetensors")
    expected = {k.removeprefix("codec_model."): v for k, v in in_file.items() if k.startswith("codec_model.")}
    assert len(expected) > 50 and set(codec) == set(expected)
    for name, tensor in expected.items():
        np.testing.assert_array_equal(np.array(codec[name]), tensor.numpy())


def test_sharded_hf_checkpoint(tmp_path: Path, hf_dir: Path, hf_probe: tuple[np.ndarray, np.ndarray]) -> None:
    tensors = load_file(hf_dir / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, tmp_path / shard)
    index = {"weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    shutil.copy(hf_dir / "config.json", tmp_path / "config.json")
    logits0, _ = probe(load_model(str(tmp_path)).model)
    assert rel_err(logits0, hf_probe[0]) < 1e-6


def rewrite(hf_dir: Path, dst: Path, edit: str) -> Path:
    dst.mkdir()
    shutil.copy(hf_dir / "config.json", dst / "config.json")
    tensors = load_file(hf_dir / "model.safetensors")
    if edit == "missing":
        del tensors["backbone_model.layers.1.mlp.up_proj.weight"]
    elif edit == "unexpected":
        tensors["backbone_model.layers.1.mlp.extra.weight"] = torch.zeros(2)
    elif edit == "misshaped":
        tensors["lm_head.weight"] = torch.zeros(3, 64)
    save_file(tensors, dst / "model.safetensors")
    return dst


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ("missing", "missing tensor 'backbone.layers.1.mlp.w3.weight'"),
        ("unexpected", "unexpected tensor 'backbone_model.layers.1.mlp.extra.weight'"),
        ("misshaped", "tensor 'codebook0_head.weight' has shape (3, 64), the config needs (67, 64)"),
    ],
)
def test_bad_tensors_are_named(tmp_path: Path, hf_dir: Path, edit: str, message: str) -> None:
    with pytest.raises(CheckpointError, match=re.escape(message)):
        load_model(str(rewrite(hf_dir, tmp_path / edit, edit)))


def test_truncated_and_garbage_files_are_clear_errors(tmp_path: Path, hf_dir: Path) -> None:
    data = (hf_dir / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_model(str(tmp_path / "model.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match=r"junk\.safetensors"):
        load_model(str(tmp_path / "junk.safetensors"))
    with pytest.raises(CheckpointError, match="no weights found"):
        load_model(str(tmp_path / ".."))
    with pytest.raises(CheckpointError, match="no such file"):
        load_model(str(tmp_path / "nope" / "x.safetensors"))


def test_unknown_sesame_flavor_is_an_error(tmp_path: Path, reference: CsmForConditionalGeneration) -> None:
    save_file(sesame_state_dict(reference), tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"backbone_flavor": "llama-7B", "decoder_flavor": "x"}))
    with pytest.raises(CheckpointError, match="unknown Sesame model flavor"):
        load_model(str(tmp_path))


def test_random_presets() -> None:
    loaded = load_model("random:tiny")
    assert loaded.random and loaded.tokenizer is not None
    assert loaded.tokenizer.encode_segment(0, "hé") == [256, *b"[0]h\xc3\xa9", 257]
    assert np.isfinite(probe(loaded.model)[0]).all()
    with pytest.raises(ValueError, match="unknown model preset 'huge'; choose one of csm-1b, tiny"):
        load_model("random:huge")
    with pytest.raises(ValueError, match="unknown dtype"):
        load_model("random:tiny", dtype="int8")


def test_convert_round_trip(tmp_path: Path, hf_dir: Path, hf_probe: tuple[np.ndarray, np.ndarray]) -> None:
    assert main(["convert", str(hf_dir), str(tmp_path / "fp32"), "--dtype", "float32"]) == 0
    loaded = load_model(str(tmp_path / "fp32"))
    assert loaded.tokenizer is not None  # bundled from the source directory
    logits0, decoder_logits = probe(loaded.model)
    np.testing.assert_array_equal(logits0, hf_probe[0])
    np.testing.assert_array_equal(decoder_logits, hf_probe[1])


@pytest.mark.parametrize(("bits", "tolerance"), [(8, 2e-2), (4, 0.3)])
def test_convert_quantized(
    tmp_path: Path, hf_dir: Path, hf_probe: tuple[np.ndarray, np.ndarray], bits: int, tolerance: float
) -> None:
    out = tmp_path / f"q{bits}"
    assert main(["convert", str(hf_dir), str(out), "--quantize", str(bits), "--dtype", "float32"]) == 0
    meta = json.loads((out / "config.json").read_text())
    assert meta["quantization"] == {"bits": bits, "group_size": 64}
    model = load_model(str(out)).model
    assert model.backbone.layers[0].mlp.w1.weight.dtype == mx.uint32  # really quantized
    logits0, _ = probe(model)
    assert rel_err(logits0, hf_probe[0]) < tolerance


def test_cli_reports_bad_model_without_traceback(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["bench", "frame", "--model", str(tmp_path / "missing")]) == 2
    assert "csmd: error:" in capsys.readouterr().err
