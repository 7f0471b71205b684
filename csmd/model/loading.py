"""Turn a model argument into a ready CSM: a local path, an HF repo id, or `random:<preset>`.

Recognised layouts (a directory, or a weights file whose directory holds the config):
- csmd's own:  config.json with "format": "csmd", model.safetensors (csmd naming, maybe quantized, per part:
               quantization.py); what
               `csmd convert` writes, naming the tokenizer and codec it bundles (see convert.py)
- HF:          config.json with "model_type": "csm", model.safetensors or a sharded index (HF naming)
- Sesame:      config.json with "backbone_flavor" (or none), model.safetensors or ckpt.pt (Sesame naming)
A tokenizer.json or tokenizer.model beside the weights is picked up unless one is given. A path (anything
that exists, starts with ./ ../ / ~, or names a checkpoint file) is never looked up on the HF hub.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx

from csmd import hub
from csmd.model import config as configs
from csmd.model.config import CsmConfig
from csmd.model.csm import CSM
from csmd.model.errors import CheckpointError
from csmd.model.quantization import QuantizationScheme
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
_HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "ckpt.pt"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")  # the names looked for beside the weights
BYTE_TOKENIZER = "utf8_bytes"  # config.json's "tokenizer" for a model that reads TextTokenizer.utf8_bytes()
# The codec of matching shapes for each random model.
RANDOM_CODECS = {"csm-1b": "random:mimi", "tiny": "random:tiny"}
# Sesame's ModelArgs name its transformers by torchtune flavor.
_SESAME_FLAVORS = {"llama-1B": configs.CSM_1B.backbone, "llama-100M": configs.CSM_1B.decoder}


@dataclass
class LoadedModel:
    model: CSM
    tokenizer: TextTokenizer | None
    source: str
    random: bool = False  # random weights (random:<preset>, or a conversion of one): they do not speak
    codec_tensors: dict[str, mx.array] = field(default_factory=dict)  # Mimi, when the checkpoint bundles it
    codec_config: dict[str, Any] = field(default_factory=dict)  # its HF MimiConfig, if the config has one
    codec: str | None = None  # the codec argument the model names: a random preset, or a bundled weights file


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
    tokenizer: str | os.PathLike[str] | TextTokenizer | None = None,
) -> LoadedModel:
    """Load `spec` (path, HF repo id or random:<preset>). `config` overrides what the files say."""
    mx_dtype = parse_dtype(dtype)
    text_tokenizer = TextTokenizer.from_file(tokenizer) if isinstance(tokenizer, str | os.PathLike) else tokenizer
    if spec.startswith("random:"):
        name = spec.removeprefix("random:")
        cfg = config or preset(name)
        model = build_model(cfg, random_params(cfg, mx_dtype), mx_dtype, spec)
        # Random weights mean nothing, so any text encoding will do: UTF-8 bytes need no file.
        words = text_tokenizer or TextTokenizer.utf8_bytes()
        return LoadedModel(model, words, spec, random=True, codec=RANDOM_CODECS.get(name, "random:mimi"))
    weights_file, directory = _locate(checkpoint_path(spec))
    meta = _read_json(directory / "config.json") if (directory / "config.json").is_file() else {}
    tensors = read_tensors(weights_file)
    quantization: QuantizationScheme | None = None
    codec: dict[str, mx.array] = {}
    named_codec = None
    if meta.get("format") == CSMD_FORMAT:
        cfg = config or CsmConfig.from_dict(meta["model"])
        params, quantization = tensors, _quantization(meta, directory)
        named_codec = _named_codec(meta, directory)
    elif is_hf_naming(tensors):
        cfg = config or (configs.from_hf_config(meta) if meta.get("model_type") == "csm" else configs.CSM_1B)
        checkpoint = from_hf_naming(tensors, cfg)
        params, codec = checkpoint.params, checkpoint.codec
    else:
        cfg = config or _sesame_config(meta)
        params = tensors
    model = build_model(cfg, params, mx_dtype, str(weights_file), quantization)
    if text_tokenizer is None:
        text_tokenizer = find_tokenizer(directory, meta)
    return LoadedModel(
        model,
        text_tokenizer,
        str(weights_file),
        random=bool(meta.get("random")),
        codec_tensors=codec,
        codec_config=(meta.get("codec_config") or {}) if codec else {},
        codec=named_codec,
    )


def preset(name: str) -> CsmConfig:
    """A `random:<name>` model's config."""
    if name not in configs.PRESETS:
        raise CheckpointError(f"unknown model preset {name!r}; choose one of {', '.join(configs.PRESETS)}")
    return configs.PRESETS[name]


def check_argument(spec: str) -> None:
    """Raise what `load_model(spec)` would for a bad argument (an unknown preset, a path that does not exist),
    without reading or downloading anything."""
    if spec.startswith("random:"):
        preset(spec.removeprefix("random:"))
    elif not Path(spec).expanduser().exists() and (hub.looks_local(spec) or not hub.is_repo_id(spec)):
        if spec in configs.PRESETS:
            raise CheckpointError(f"{spec}: no such file or directory; did you mean random:{spec}?")
        other = "" if hub.looks_local(spec) else " (nor an HF repo id owner/name or random:<preset>)"
        raise CheckpointError(f"{spec}: no such file or directory{other}")


def checkpoint_path(spec: str) -> Path:
    """The local file or directory a (non-random) model argument names; an HF repo id is downloaded.

    CheckpointError for a path that does not exist, HubError when the hub cannot give the repo."""
    check_argument(spec)
    path = Path(spec).expanduser()
    if path.exists():
        return path
    return hub.download(spec, patterns=_HUB_PATTERNS, fallback="--model random:tiny")


def peek_config(spec: str) -> CsmConfig | None:
    """The config `spec` would load, where that is known without reading weights or the network: a random
    preset, or a local checkpoint's config.json (Sesame's numbers when there is none). None otherwise."""
    if spec.startswith("random:"):
        return preset(spec.removeprefix("random:"))
    path = Path(spec).expanduser()
    if not path.exists():
        return None
    directory = path if path.is_dir() else path.parent
    meta = _read_json(directory / "config.json") if (directory / "config.json").is_file() else {}
    if meta.get("format") == CSMD_FORMAT:
        return CsmConfig.from_dict(meta["model"])
    if meta.get("model_type") == "csm":
        return configs.from_hf_config(meta)
    return _sesame_config(meta) if not meta or "backbone_flavor" in meta else None


def peek_tokenizer(spec: str) -> TextTokenizer | None:
    """The tokenizer `spec` would load, where that needs no weights or network (None otherwise)."""
    if spec.startswith("random:"):
        return TextTokenizer.utf8_bytes()
    path = Path(spec).expanduser()
    if not path.exists():
        return None
    directory = path if path.is_dir() else path.parent
    meta = _read_json(directory / "config.json") if (directory / "config.json").is_file() else {}
    return find_tokenizer(directory, meta)


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


def _quantization(meta: dict[str, Any], directory: Path) -> QuantizationScheme | None:
    """How a csmd checkpoint's weights are quantized (None: float), as config.json records it."""
    if meta.get("quantization") is None:
        return None
    try:
        return QuantizationScheme.from_dict(meta["quantization"])
    except ValueError as exc:
        raise CheckpointError(f"{directory / 'config.json'}: 'quantization': {exc}") from None


def _named_codec(meta: dict[str, Any], directory: Path) -> str | None:
    """The codec a csmd checkpoint names (convert.py): {"spec": "random:tiny"} or {"file": "codec.safetensors"}."""
    codec = meta.get("codec")
    if codec is None:
        return None
    if isinstance(codec, dict) and isinstance(codec.get("spec"), str):
        return str(codec["spec"])
    if isinstance(codec, dict) and isinstance(codec.get("file"), str):
        return str(directory / codec["file"])
    raise CheckpointError(f'{directory / "config.json"}: \'codec\' must be {{"spec": ...}} or {{"file": ...}}')


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


def find_tokenizer(directory: Path, meta: dict[str, Any]) -> TextTokenizer | None:
    """The tokenizer a checkpoint directory holds (or names, for converted random models), if any."""
    if meta.get("tokenizer") == BYTE_TOKENIZER:
        return TextTokenizer.utf8_bytes()
    for name in TOKENIZER_FILES:
        if (directory / name).is_file():
            return TextTokenizer.from_file(directory / name)
    return None
