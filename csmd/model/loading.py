"""Turn a model argument into a ready CSM: a local path, an HF repo id, or `random:<preset>`.

Recognised layouts (a directory, or a weights file whose directory holds the config):
- csmd's own:  config.json with "format": "csmd", model.safetensors (csmd naming, maybe quantized)
- HF:          config.json with "model_type": "csm", model.safetensors or a sharded index (HF naming)
- Sesame:      config.json with "backbone_flavor" (or none), model.safetensors or ckpt.pt (Sesame naming)
A tokenizer.json or tokenizer.model beside the weights is picked up unless one is given.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx

from csmd.model import config as configs
from csmd.model.config import CsmConfig
from csmd.model.csm import CSM
from csmd.model.errors import CheckpointError
from csmd.model.tokenizer import TextTokenizer
from csmd.model.weights import (
    CSMD_FORMAT,
    build_model,
    from_hf_naming,
    is_hf_naming,
    random_params,
    read_tensors,
)

DTYPES = {
    "float32": mx.float32,
    "fp32": mx.float32,
    "bfloat16": mx.bfloat16,
    "bf16": mx.bfloat16,
    "float16": mx.float16,
    "fp16": mx.float16,
}
_WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "ckpt.safetensors", "ckpt.pt")
# Sesame's ModelArgs name its transformers by torchtune flavor.
_SESAME_FLAVORS = {"llama-1B": configs.CSM_1B.backbone, "llama-100M": configs.CSM_1B.decoder}


@dataclass
class LoadedModel:
    model: CSM
    tokenizer: TextTokenizer | None
    source: str
    random: bool = False
    codec_tensors: dict[str, mx.array] = field(default_factory=dict)  # Mimi, when the checkpoint bundles it
    codec_config: dict[str, Any] = field(default_factory=dict)  # its HF MimiConfig, if the config has one


def parse_dtype(name: str) -> mx.Dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}") from None


def load_model(
    spec: str,
    *,
    dtype: str = "float32",
    config: CsmConfig | None = None,
    tokenizer: str | os.PathLike[str] | None = None,
) -> LoadedModel:
    """Load `spec` (path, HF repo id or random:<preset>). `config` overrides what the files say."""
    mx_dtype = parse_dtype(dtype)
    text_tokenizer = TextTokenizer.from_file(tokenizer) if tokenizer else None
    if spec.startswith("random:"):
        cfg = config or configs.preset(spec.removeprefix("random:"))
        model = build_model(cfg, random_params(cfg, mx_dtype), mx_dtype, spec)
        # Random weights mean nothing, so any text encoding will do: UTF-8 bytes need no file.
        return LoadedModel(model, text_tokenizer or TextTokenizer.utf8_bytes(), spec, random=True)
    path = Path(spec).expanduser()
    if not path.exists():
        if _looks_like_repo_id(spec):
            path = _download(spec)
        else:
            raise CheckpointError(f"{spec}: no such file or directory (nor an HF repo id or random:<preset>)")
    weights_file, directory = _locate(path)
    meta = _read_json(directory / "config.json") if (directory / "config.json").is_file() else {}
    tensors = read_tensors(weights_file)
    quantization = None
    codec: dict[str, mx.array] = {}
    if meta.get("format") == CSMD_FORMAT:
        cfg = config or CsmConfig.from_dict(meta["model"])
        params, quantization = tensors, meta.get("quantization")
    elif is_hf_naming(tensors):
        cfg = config or (configs.from_hf_config(meta) if meta.get("model_type") == "csm" else configs.CSM_1B)
        checkpoint = from_hf_naming(tensors, cfg)
        params, codec = checkpoint.params, checkpoint.codec
    else:
        cfg = config or _sesame_config(meta)
        params = tensors
    model = build_model(cfg, params, mx_dtype, str(weights_file), quantization)
    if text_tokenizer is None:
        text_tokenizer = _find_tokenizer(directory)
    codec_config = (meta.get("codec_config") or {}) if codec else {}
    return LoadedModel(model, text_tokenizer, str(weights_file), codec_tensors=codec, codec_config=codec_config)


def _looks_like_repo_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "~"))


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download  # only needed for hub ids; never used in tests

    patterns = ["*.json", "*.safetensors", "tokenizer.model", "ckpt.pt"]
    return Path(snapshot_download(repo_id, allow_patterns=patterns))


def _locate(path: Path) -> tuple[Path, Path]:
    """(weights file, directory holding its config and tokenizer)."""
    if path.is_file():
        return path, path.parent
    for name in _WEIGHT_FILES:
        if (path / name).is_file():
            return path / name, path
    raise CheckpointError(f"{path}: no weights found (looked for {', '.join(_WEIGHT_FILES)})")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def _sesame_config(meta: dict[str, Any]) -> CsmConfig:
    """Sesame's ModelArgs (config.json of the safetensors release), or the csm-1b numbers if there is none."""
    if not meta:
        return configs.CSM_1B
    try:
        backbone = _SESAME_FLAVORS[meta["backbone_flavor"]]
        decoder = _SESAME_FLAVORS[meta["decoder_flavor"]]
    except KeyError as exc:
        raise CheckpointError(
            f"config.json: unknown Sesame model flavor {exc}; known: {list(_SESAME_FLAVORS)}"
        ) from None
    return CsmConfig(
        backbone=backbone,
        decoder=decoder,
        text_vocab_size=meta.get("text_vocab_size", 128_256),
        audio_vocab_size=meta.get("audio_vocab_size", 2051),
        num_codebooks=meta.get("audio_num_codebooks", 32),
    )


def _find_tokenizer(directory: Path) -> TextTokenizer | None:
    for name in ("tokenizer.json", "tokenizer.model"):
        if (directory / name).is_file():
            return TextTokenizer.from_file(directory / name)
    return None
