"""Build-time metadata for csmd (a scikit-build-core dynamic-metadata provider, see pyproject.toml).

The native kernels link libmlx's C++ API, whose ABI changes between MLX releases, so csmd must run with
exactly the MLX it was compiled against. The one pin is in `[build-system] requires`; this adds to csmd's
dependencies the MLX found in the build environment, whatever it is (the pinned one with build isolation,
the installed one with `--no-build-isolation`).
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from typing import Any


def dynamic_metadata(settings: Mapping[str, Any], project: Mapping[str, Any]) -> dict[str, Any]:
    if settings:
        raise RuntimeError(f"mlx_pin takes no settings, got {sorted(settings)}")
    try:
        mlx = version("mlx")
    except PackageNotFoundError:
        raise RuntimeError("mlx is not installed in the build environment (see [build-system] requires)") from None
    # On Linux MLX's CPU backend is the separate mlx-cpu wheel (the "cpu" extra).
    return {"dependencies": [f"mlx[cpu]=={mlx}; sys_platform == 'linux'", f"mlx=={mlx}; sys_platform != 'linux'"]}
