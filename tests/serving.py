"""`csmd serve --model random:tiny` as users run it, for the tests that need a real daemon process."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def csmd_serve(
    socket_path: Path | None,
    *flags: str,
    env: dict[str, str] | None = None,
    listening_on: Path | None = None,
    stop: signal.Signals = signal.SIGINT,
    check: bool = True,
) -> Iterator[subprocess.Popen[str]]:
    """A daemon on `socket_path` (None: the default path, which `listening_on` then names), until the block
    ends; then `stop` is sent. With `check`, a block that ended normally also requires a clean stop: exit 0,
    "stopped serving", no traceback."""
    socket_flag = [] if socket_path is None else ["--socket", str(socket_path)]
    command = [sys.executable, "-m", "csmd.cli", "serve", "--model", "random:tiny", *socket_flag, *flags]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    path = listening_on or socket_path
    assert path is not None, "say where the daemon listens"
    try:
        deadline = time.monotonic() + 120
        while not path.is_socket():
            assert server.poll() is None and time.monotonic() < deadline, server.communicate()
            time.sleep(0.05)
        yield server
    finally:
        if server.poll() is None:
            server.send_signal(stop)
        _, err = server.communicate(timeout=60)
    if check:
        assert server.returncode == 0 and "stopped serving" in err and "Traceback" not in err, err
