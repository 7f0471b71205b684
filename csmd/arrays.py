"""Helpers for MLX arrays held by modules."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


def materialize(module: nn.Module) -> None:
    """Evaluate every array `module` holds, derived ones (names starting with `_`) included.

    MLX streams belong to threads: a lazy array built on the loading thread cannot be evaluated on the
    daemon's model thread, so everything a model keeps is made concrete once, right after loading.
    """
    arrays = [v for _, child in module.named_modules() for v in child.values() if isinstance(v, mx.array)]
    mx.eval(arrays)
