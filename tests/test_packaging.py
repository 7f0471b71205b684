"""csmd is one package whose native kernels are built against one MLX, pinned in one place."""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

import mlx.core as mx
from packaging.requirements import Requirement

PYPROJECT = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())


def test_mlx_is_pinned_once_in_the_build_requirements() -> None:
    build = [Requirement(r) for r in PYPROJECT["build-system"]["requires"]]
    pins = {str(r.specifier) for r in build if r.name == "mlx"}
    assert len(pins) == 1 and re.fullmatch(r"==\d+\.\d+\.\d+", pins.pop())
    static = PYPROJECT["project"]["dependencies"]
    assert not any(Requirement(r).name == "mlx" for r in static)  # the run pin is derived, never written twice
    assert "dependencies" in PYPROJECT["project"]["dynamic"]


def test_the_installed_csmd_requires_exactly_the_mlx_it_runs_with() -> None:
    """native/mlx_pin.py wrote the build environment's MLX into the metadata; it is the MLX installed here."""
    requires = [Requirement(r) for r in importlib.metadata.requires("csmd") or []]
    mlx = [r for r in requires if r.name == "mlx"]
    assert mlx and all(str(r.specifier) == f"=={mx.__version__}" for r in mlx), mlx
