"""A process's memory as the benchmarks report it: /proc/PID/status where there is one (Linux), else this
process's peak from getrusage."""

from __future__ import annotations

import resource
import sys
from pathlib import Path


def status_mb(field: str, pid: int | str = "self") -> float | None:
    """Field `field` of /proc/`pid`/status (VmRSS: resident now; VmHWM: its peak) in MiB, or None where /proc
    does not tell (not Linux, or no such process)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _own_peak_mb() -> float:
    kib_or_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS, KiB elsewhere
    return kib_or_bytes / (1024 * 1024 if sys.platform == "darwin" else 1024)


def rss_mb() -> float:
    """This process's resident set now, else (no /proc) its peak."""
    now = status_mb("VmRSS")
    return _own_peak_mb() if now is None else now


def peak_rss_mb() -> float:
    """This process's peak resident set."""
    peak = status_mb("VmHWM")
    return _own_peak_mb() if peak is None else peak
