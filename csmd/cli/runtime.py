"""--device, --memory-limit and --cache-limit, applied (their values were checked when parsed)."""

from __future__ import annotations

import argparse

from csmd import runtime
from csmd.errors import UserError


def apply_runtime(args: argparse.Namespace) -> None:
    if args.device == "gpu" and runtime.gpu_backend() is None:
        raise UserError("--device gpu: this MLX build has no GPU backend here (use --device cpu or auto)")
    runtime.apply(runtime.RuntimeSettings(args.device, args.memory_limit, args.cache_limit))
