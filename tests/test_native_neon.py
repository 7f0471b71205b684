"""The SIMD kernels of csmd_native against their scalar versions, outside Python.

native/tests/neon_check.cpp is compiled twice:

* for aarch64 with aarch64-linux-gnu-g++ and run under qemu-aarch64-static: NEON vs scalar (and the
  scalar kernels vs a float64 reference).  Skipped when the cross tools are missing, unless
  CSMD_REQUIRE_NEON=1 (CI), which turns a missing tool into a failure.
  (apt-get install g++-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user-static)
* for the host with g++: AVX2 vs scalar on x86-64 machines with AVX2 (scalar vs the reference otherwise).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "native" / "tests" / "neon_check.cpp"
INCLUDE = ROOT / "native" / "src"
FLAGS = ["-O2", "-std=c++20", "-pthread", "-Wall", "-Werror", f"-I{INCLUDE}", str(SRC)]


def require(tool: str, env: str) -> str:
    path = shutil.which(tool)
    if path is None:
        if os.environ.get(env) == "1":
            pytest.fail(f"{tool} not found but {env}=1")
        pytest.skip(f"{tool} not installed")
    return path


def run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def test_neon_matches_scalar(tmp_path: Path) -> None:
    cxx = require("aarch64-linux-gnu-g++", "CSMD_REQUIRE_NEON")
    qemu = require("qemu-aarch64-static", "CSMD_REQUIRE_NEON")
    exe = tmp_path / "neon_check"
    build = run([cxx, "-static", "-march=armv8-a", *FLAGS, "-o", str(exe)], timeout=300)
    assert build.returncode == 0, build.stderr
    result = run([qemu, str(exe)], timeout=600)  # binfmt may not be registered: call qemu explicitly
    assert result.returncode == 0, result.stdout + result.stderr
    assert "variant neon vs scalar" in result.stdout
    assert " 0 failures" in result.stdout


def test_host_simd_matches_scalar(tmp_path: Path) -> None:
    cxx = require("g++", "CSMD_REQUIRE_NEON")
    exe = tmp_path / "host_check"
    build = run([cxx, *FLAGS, "-o", str(exe)], timeout=300)
    assert build.returncode == 0, build.stderr
    result = run([str(exe)], timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert " 0 failures" in result.stdout
