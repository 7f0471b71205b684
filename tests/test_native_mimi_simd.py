"""The Mimi kernels' SIMD variants against their scalar versions, outside Python (native/tests/mimi_check.cpp).

As tests/test_native_neon.py: compiled for aarch64 and run under qemu-aarch64-static (NEON vs scalar), skipped
when the cross tools are missing unless CSMD_REQUIRE_NEON=1; and compiled for the host (AVX2 vs scalar on
x86-64 with AVX2). The scalar versions are checked against a float64 reference in both.
"""

from __future__ import annotations

from pathlib import Path

from test_native_neon import ROOT, require, run

SRC = ROOT / "native" / "tests" / "mimi_check.cpp"
FLAGS = ["-O2", "-std=c++20", "-pthread", "-Wall", "-Werror", f"-I{ROOT / 'native' / 'src'}", str(SRC)]


def test_mimi_kernels_neon_match_scalar(tmp_path: Path) -> None:
    cxx = require("aarch64-linux-gnu-g++", "CSMD_REQUIRE_NEON")
    qemu = require("qemu-aarch64-static", "CSMD_REQUIRE_NEON")
    exe = tmp_path / "mimi_check"
    build = run([cxx, "-static", "-march=armv8-a", *FLAGS, "-o", str(exe)], timeout=300)
    assert build.returncode == 0, build.stderr
    result = run([qemu, str(exe)], timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "variant neon vs scalar" in result.stdout
    assert " 0 failures" in result.stdout


def test_mimi_kernels_host_simd_match_scalar(tmp_path: Path) -> None:
    cxx = require("g++", "CSMD_REQUIRE_NEON")
    exe = tmp_path / "mimi_check"
    build = run([cxx, *FLAGS, "-o", str(exe)], timeout=300)
    assert build.returncode == 0, build.stderr
    result = run([str(exe)], timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert " 0 failures" in result.stdout
