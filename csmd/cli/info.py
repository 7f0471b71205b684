"""`csmd info` (device, backend, BLAS, memory) and `csmd devices` (sound devices)."""

from __future__ import annotations

import argparse

from csmd import runtime
from csmd.cli.runtime import apply_runtime


def cmd_info(args: argparse.Namespace) -> int:
    from csmd.model.loading import parse_dtype

    apply_runtime(args)
    info = runtime.describe()
    info["dtype"] = str(parse_dtype(args.dtype)).removeprefix("mlx.core.")
    for key, value in info.items():
        print(f"{key:18} {value}")
    return 0


def cmd_devices(args: argparse.Namespace) -> int:
    from csmd.audio.devices import list_devices

    devices = list_devices()
    if not devices:
        print("no sound devices (is a sound server running, or PortAudio's backend missing?)")
    for d in devices:
        marks = ("<in " if d.default_input else "") + ("out>" if d.default_output else "")
        print(
            f"{d.index:3} {d.name:40.40} {d.host_api:28.28} in {d.inputs:2} out {d.outputs:2} "
            f"{d.default_rate:7.0f} Hz {marks}"
        )
    return 0
