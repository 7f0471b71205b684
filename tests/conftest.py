"""Shared fixtures: the tiny HF reference checkpoint is written once per test session."""

from __future__ import annotations

# First, before anything imports mlx.core (tiny_hf_csm does): csmd gives MLX a fast BLAS then or never.
import csmd  # noqa: F401

# isort: split

from pathlib import Path

import pytest
import tiny_hf_csm
from transformers import CsmForConditionalGeneration


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_hf_csm.save(tmp_path_factory.mktemp("hf-csm"))


@pytest.fixture(scope="session")
def reference(hf_dir: Path) -> CsmForConditionalGeneration:
    return CsmForConditionalGeneration.from_pretrained(hf_dir).eval()
