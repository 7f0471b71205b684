"""Shared fixtures: the tiny HF reference checkpoint is written once per test session; random:tiny loaded once."""

from __future__ import annotations

# First, before anything imports mlx.core (tiny_hf_csm does): csmd gives MLX a fast BLAS then or never.
import csmd  # noqa: F401

# isort: split

from pathlib import Path

import pytest
import tiny_hf_csm
from transformers import CsmForConditionalGeneration

from csmd.audio.mimi.model import Mimi
from csmd.model.generator import Generator
from csmd.model.loading import load_model
from csmd.speak import codec_for


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_hf_csm.save(tmp_path_factory.mktemp("hf-csm"))


@pytest.fixture(scope="session")
def reference(hf_dir: Path) -> CsmForConditionalGeneration:
    return CsmForConditionalGeneration.from_pretrained(hf_dir).eval()


@pytest.fixture(scope="session")
def tiny_voice() -> tuple[Generator, Mimi]:
    """random:tiny's generator and codec, for daemons served in this process (tests must not change the model)."""
    loaded = load_model("random:tiny")
    assert loaded.tokenizer is not None
    return Generator(loaded.model, loaded.tokenizer), codec_for(loaded, None)
