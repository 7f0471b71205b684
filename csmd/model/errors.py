"""Errors raised while reading model files, so callers can tell a bad file from a bug."""

from __future__ import annotations

import re
from collections.abc import Mapping


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, truncated, unsafe, or does not match the model it should hold."""


def check_shapes(tensors: Mapping[str, object], expected: Mapping[str, tuple[int, ...]], source: str) -> None:
    """A missing, unexpected or mis-shaped tensor is a CheckpointError that names it (and the file)."""

    def first(names: set[str], what: str) -> None:
        if names:
            ordered = sorted(names, key=_natural)
            more = f" (and {len(ordered) - 1} more)" if len(ordered) > 1 else ""
            raise CheckpointError(f"{source}: {what} tensor {ordered[0]!r}{more}")

    first(set(expected) - set(tensors), "missing")
    first(set(tensors) - set(expected), "unexpected")
    for name, shape in expected.items():
        actual = tuple(getattr(tensors[name], "shape", ()))
        if actual != shape:
            raise CheckpointError(f"{source}: tensor {name!r} has shape {actual}, the config needs {shape}")


def _natural(name: str) -> list[tuple[int, str]]:
    """Sort key so that `layers.2` comes before `layers.10` in error messages."""
    return [(int(t), "") if t.isdigit() else (-1, t) for t in re.split(r"(\d+)", name)]
