"""`csmd convert`: a checkpoint -> a self-contained csmd directory that loads offline.

The directory holds everything `csmd say --model DIR` needs, and nothing it would have to download:
- model.safetensors  the weights in csmd naming, maybe quantized (MLX's affine layout, bits per part)
- config.json        the model config, its quantization scheme (csmd/model/quantization.py), and what the
                     model speaks with: "tokenizer" ("utf8_bytes" for random models, which need no file) and
                     "codec" ({"spec": "random:..."} for a random codec, else {"file": "codec.safetensors",
                     "config": {...}})
- tokenizer.json or tokenizer.model, under the name the loader looks for
- codec.safetensors  the Mimi weights in csmd naming: bf16 where that is exact (Kyutai's release is bf16),
                     else fp32
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from csmd.audio.mimi.loading import BUNDLED_FILE
from csmd.audio.mimi.model import Mimi
from csmd.model.loading import BYTE_TOKENIZER, TOKENIZER_FILES, LoadedModel
from csmd.model.quantization import QuantizationScheme
from csmd.model.weights import save_csmd


def tokenizer_name(path: Path) -> str:
    """The name a tokenizer file must have beside the weights for the loader to find it."""
    return TOKENIZER_FILES[0] if path.suffix.lower() == ".json" else TOKENIZER_FILES[1]


def write_converted(
    loaded: LoadedModel,
    directory: Path,
    *,
    quantization: QuantizationScheme | None,
    tokenizer_file: Path | None,
    codec: Mimi | str,
) -> list[str]:
    """Write `loaded` (already quantized as `quantization` says) with its tokenizer and codec (a Mimi to
    bundle, or a `random:` codec spec to record) into `directory`; returns the names of the files written."""
    directory.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {}
    written = ["model.safetensors", "config.json"]
    if loaded.random:
        meta["random"] = True
    if tokenizer_file is not None:
        name = tokenizer_name(tokenizer_file)
        shutil.copyfile(tokenizer_file, directory / name)
        written.append(name)
    elif loaded.tokenizer is not None and loaded.random:
        meta["tokenizer"] = BYTE_TOKENIZER  # what random:<preset> speaks through; it needs no file
    if isinstance(codec, str):
        meta["codec"] = {"spec": codec}
    else:
        mx.save_safetensors(str(directory / BUNDLED_FILE), codec_tensors(codec), metadata={"format": "csmd"})
        meta["codec"] = {"file": BUNDLED_FILE, "config": codec.config.to_dict()}
        written.append(BUNDLED_FILE)
    save_csmd(loaded.model, directory, quantization, extra=meta)
    return written


def codec_tensors(mimi: Mimi) -> dict[str, mx.array]:
    """Mimi's weights in csmd naming, each in bf16 when that holds it exactly, else fp32."""
    out: dict[str, mx.array] = {}
    tensors: dict[str, mx.array] = dict(tree_flatten(mimi.parameters()))
    for name, value in tensors.items():
        half = value.astype(mx.bfloat16)
        exact = bool(mx.array_equal(half.astype(value.dtype), value).item())
        out[name] = half if exact and mx.issubdtype(value.dtype, mx.floating) else value
    return out
