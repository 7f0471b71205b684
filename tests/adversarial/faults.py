"""Test-only patches for a daemon subprocess, so the suite can hold or break its insides on cue.

`DaemonProcess(..., faults=(...))` runs the real CLI after `install()`, which reads CSMD_TEST_FAULTS (names
below) and CSMD_TEST_FAULT_DIR (where the patches and the test meet through marker files):

- gate_resample: context audio resampling writes `resample.entered`, then waits for `resample.release`.
- freeze_encode: a piece of Mimi encoding writes `encode.entered`, then never returns (a model thread stuck in a job).
- memory_error: a received chunk of bytes holding b"__memory_error__" raises MemoryError while being decoded.
- engine_value_error: `Generator.begin` raises ValueError for the text "__engine_bug__" (an engine fault).
- fast_stop: the daemon waits 1 s (not 10) for its model thread at shutdown.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any


def install() -> None:
    names = {n for n in os.environ.get("CSMD_TEST_FAULTS", "").split(",") if n}
    where = Path(os.environ["CSMD_TEST_FAULT_DIR"])
    for name in names:
        globals()[f"_install_{name}"](where)


def _install_gate_resample(where: Path) -> None:
    from csmd.audio import io

    real = io.resample

    def gated(pcm: Any, from_rate: int, to_rate: int) -> Any:
        (where / "resample.entered").touch()
        while not (where / "resample.release").exists():
            time.sleep(0.01)
        return real(pcm, from_rate, to_rate)

    io.resample = gated


def _install_freeze_encode(where: Path) -> None:
    from csmd.audio.mimi.model import OfflineEncoder

    def frozen(self: OfflineEncoder) -> Any:
        (where / "encode.entered").touch()
        threading.Event().wait()  # forever

    OfflineEncoder.step = frozen  # type: ignore[method-assign]


def _install_memory_error(where: Path) -> None:
    from csmd.protocol.connection import Connection

    real = Connection.receive_data

    def receive_data(self: Connection, data: bytes) -> Any:
        if b"__memory_error__" in data:
            raise MemoryError
        return real(self, data)

    Connection.receive_data = receive_data  # type: ignore[method-assign]


def _install_engine_value_error(where: Path) -> None:
    from csmd.model.generator import Generator

    real = Generator.begin

    def begin(self: Generator, context: Any, text: str, speaker: int, params: Any = None) -> Any:
        if text == "__engine_bug__":
            raise ValueError("an engine fault, not the client's")
        return real(self, context, text, speaker, params)

    Generator.begin = begin  # type: ignore[method-assign]


def _install_fast_stop(where: Path) -> None:
    from csmd.daemon import server

    server.WORKER_STOP_SECONDS = 1.0
