"""A codec argument -> a ready Mimi: a local file or directory, an HF repo id, or `random:<preset>`.

- Kyutai's safetensors (`tokenizer-e351c8d8-checkpoint125.safetensors`, the one Sesame's CSM uses)
- HF `kyutai/mimi` (config.json + model.safetensors, q/k permuted)
- an HF CSM checkpoint directory: its bundled `codec_model.*` tensors and `codec_config`
- a directory `csmd convert` wrote: its `codec.safetensors` (csmd naming), configured by its config.json
A path is never looked up on the HF hub (see csmd.hub).
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx

from csmd import hub, progress
from csmd.audio.mimi import config as configs
from csmd.audio.mimi.config import MimiConfig
from csmd.audio.mimi.model import Mimi
from csmd.audio.mimi.weights import load_mimi_tensors, random_tensors, to_csmd_naming
from csmd.model.errors import CheckpointError

DEFAULT_CODEC = "kyutai/moshiko-pytorch-bf16"
KYUTAI_FILE = "tokenizer-e351c8d8-checkpoint125.safetensors"
BUNDLED_FILE = "codec.safetensors"  # the codec `csmd convert` writes beside the model
_REPO_FILES = {DEFAULT_CODEC: [KYUTAI_FILE], "kyutai/mimi": ["config.json", "model.safetensors"]}
_WEIGHT_FILES = (KYUTAI_FILE, BUNDLED_FILE, "model.safetensors", "model.safetensors.index.json")


def load_mimi(spec: str = DEFAULT_CODEC, num_codebooks: int = 32, config: MimiConfig | None = None) -> Mimi:
    """Load a codec using its first `num_codebooks` levels (CSM uses all 32).

    `config` overrides what the files say (Kyutai's file carries no config: it is the `mimi` preset).
    """
    if spec.startswith("random:"):
        check_argument(spec)
        cfg = config or configs.PRESETS[spec.removeprefix("random:")]
        cfg = cfg.with_codebooks(min(num_codebooks, cfg.quantizer.n_q))
        return from_tensors(random_tensors(cfg), cfg, spec)
    weights, cfg = _locate(codec_path(spec), num_codebooks)
    if config is not None:
        cfg = config.with_codebooks(min(num_codebooks, config.quantizer.n_q))
    return _ready(load_mimi_tensors(weights, cfg), cfg, str(weights))


def check_argument(spec: str) -> None:
    """Raise what `load_mimi(spec)` would for a bad argument (an unknown preset, a path that does not exist),
    without reading or downloading anything."""
    if spec.startswith("random:"):
        if spec.removeprefix("random:") not in configs.PRESETS:
            choices = " or random:".join(configs.PRESETS)
            raise CheckpointError(f"unknown codec preset {spec!r}; choose random:{choices}")
    elif not Path(spec).expanduser().exists() and (hub.looks_local(spec) or not hub.is_repo_id(spec)):
        hint = (
            f"; did you mean random:{spec}?" if spec in configs.PRESETS else " (nor an HF repo id or random:<preset>)"
        )
        raise CheckpointError(f"{spec}: no such file or directory{hint}")


def codec_path(spec: str) -> Path:
    """The local file or directory a (non-random) codec argument names; an HF repo id is downloaded."""
    check_argument(spec)
    path = Path(spec).expanduser()
    if path.exists():
        return path
    files = _REPO_FILES.get(spec, ["config.json", "model.safetensors"])
    return hub.download(spec, files=files, fallback="--codec random:mimi")


def from_tensors(tensors: dict[str, mx.array], cfg: MimiConfig, source: str) -> Mimi:
    """A Mimi from tensors in any naming (e.g. `LoadedModel.codec_tensors` of an HF CSM checkpoint)."""
    return _ready(to_csmd_naming(tensors, cfg, source), cfg, source)


def _ready(tensors: dict[str, mx.array], cfg: MimiConfig, source: str) -> Mimi:
    # Read (or generate) the tensors one by one, with a progress bar when that takes a while.
    progress.evaluate(tensors.values(), f"{'building' if source.startswith('random:') else 'loading'} {source}")
    mimi = Mimi(cfg)
    mimi.load_tensors(tensors, source)
    return mimi


def _locate(path: Path, num_codebooks: int) -> tuple[Path, MimiConfig]:
    directory = path if path.is_dir() else path.parent
    meta = {}
    if (directory / "config.json").is_file():
        try:
            meta = json.loads((directory / "config.json").read_text())
        except ValueError as exc:
            raise CheckpointError(f"{directory / 'config.json'}: unreadable JSON: {exc}") from exc
    if meta.get("model_type") == "mimi":
        cfg = configs.from_hf_config(meta)
    elif meta.get("model_type") == "csm" and meta.get("codec_config"):
        cfg = configs.from_hf_config(meta["codec_config"])
    elif meta.get("format") == "csmd" and isinstance(meta.get("codec"), dict) and "config" in meta["codec"]:
        cfg = MimiConfig.from_dict(meta["codec"]["config"])
    else:
        cfg = configs.MIMI
    cfg = cfg.with_codebooks(min(num_codebooks, cfg.quantizer.n_q))
    if path.is_file():
        return path, cfg
    for name in _WEIGHT_FILES:
        if (path / name).is_file():
            return path / name, cfg
    raise CheckpointError(f"{path}: no Mimi weights found (looked for {', '.join(_WEIGHT_FILES)})")
