"""A codec argument -> a ready Mimi: a local file or directory, an HF repo id, or `random:<preset>`.

- Kyutai's safetensors (`tokenizer-e351c8d8-checkpoint125.safetensors`, the one Sesame's CSM uses)
- HF `kyutai/mimi` (config.json + model.safetensors, q/k permuted)
- an HF CSM checkpoint directory: its bundled `codec_model.*` tensors and `codec_config`
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx

from csmd.audio.mimi import config as configs
from csmd.audio.mimi.config import MimiConfig
from csmd.audio.mimi.model import Mimi
from csmd.audio.mimi.weights import load_mimi_tensors, random_tensors, to_csmd_naming
from csmd.model.errors import CheckpointError

DEFAULT_CODEC = "kyutai/moshiko-pytorch-bf16"
KYUTAI_FILE = "tokenizer-e351c8d8-checkpoint125.safetensors"
_REPO_FILES = {DEFAULT_CODEC: [KYUTAI_FILE], "kyutai/mimi": ["config.json", "model.safetensors"]}


def load_mimi(spec: str = DEFAULT_CODEC, num_codebooks: int = 32, config: MimiConfig | None = None) -> Mimi:
    """Load a codec using its first `num_codebooks` levels (CSM uses all 32).

    `config` overrides what the files say (Kyutai's file carries no config: it is the `mimi` preset).
    """
    if spec.startswith("random:"):
        cfg = config or configs.PRESETS.get(spec.removeprefix("random:"))
        if cfg is None:
            raise ValueError(f"unknown codec preset {spec!r}; choose random:{' or random:'.join(configs.PRESETS)}")
        cfg = cfg.with_codebooks(min(num_codebooks, cfg.quantizer.n_q))
        return from_tensors(random_tensors(cfg), cfg, spec)
    path = Path(spec).expanduser()
    if not path.exists():
        if spec not in _REPO_FILES and spec.count("/") != 1:
            raise CheckpointError(f"{spec}: no such file or directory (nor an HF repo id or random:<preset>)")
        path = _download(spec)
    weights, cfg = _locate(path, num_codebooks)
    if config is not None:
        cfg = config.with_codebooks(min(num_codebooks, config.quantizer.n_q))
    mimi = Mimi(cfg)
    mimi.load_tensors(load_mimi_tensors(weights, cfg), str(weights))
    return mimi


def from_tensors(tensors: dict[str, mx.array], cfg: MimiConfig, source: str) -> Mimi:
    """A Mimi from tensors in any naming (e.g. `LoadedModel.codec_tensors` of an HF CSM checkpoint)."""
    mimi = Mimi(cfg)
    mimi.load_tensors(to_csmd_naming(tensors, cfg, source), source)
    return mimi


def _download(repo_id: str) -> Path:
    from huggingface_hub import hf_hub_download  # only for hub ids; never used in tests

    files = _REPO_FILES.get(repo_id, ["config.json", "model.safetensors"])
    paths = [Path(hf_hub_download(repo_id, name)) for name in files]
    return paths[0].parent


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
    else:
        cfg = configs.MIMI
    cfg = cfg.with_codebooks(min(num_codebooks, cfg.quantizer.n_q))
    if path.is_file():
        return path, cfg
    for name in (KYUTAI_FILE, "model.safetensors", "model.safetensors.index.json"):
        if (path / name).is_file():
            return path / name, cfg
    raise CheckpointError(f"{path}: no Mimi weights found (looked for {KYUTAI_FILE}, model.safetensors)")
