"""Fixtures of the hostile-client suite: real daemons in subprocesses, raw connections closed after each test."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from adversarial.hostile import DaemonProcess, RawClient


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    """One daemon for a whole test module (its tests must leave it serving); it must exit cleanly at the end,
    with no traceback in its log: nothing a hostile client sends may be a bug. Sessions of a test's closed
    connections are freed as the daemon reads their end, maybe after the next test began: hence room for 64."""
    process = DaemonProcess(tmp_path_factory.mktemp("daemon"), "--max-sessions", "64")
    yield process
    process.check_clean_exit()


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[Callable[..., DaemonProcess]]:
    """A factory of daemons of the test's own: extra `csmd serve` arguments, `faults=` (test-only patches, see
    faults.py), `env=`. Any left running at the end are killed; the test checks how each one ends."""
    started: list[DaemonProcess] = []

    def start(*args: str, faults: tuple[str, ...] = (), env: dict[str, str] | None = None) -> DaemonProcess:
        process = DaemonProcess(tmp_path / f"daemon{len(started)}", *args, faults=faults, env=env)
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()


@pytest.fixture(autouse=True)
def close_clients() -> Iterator[None]:
    """Raw connections a test opened are closed after it. A sync fixture, so that sync tests may share this suite;
    trio's run is over by then, so each socket's descriptor is closed directly rather than through trio."""
    yield
    for client in RawClient.opened:
        fd = client.stream.socket.detach()  # -1 if the test closed it already
        if fd >= 0:
            os.close(fd)
    RawClient.opened.clear()
