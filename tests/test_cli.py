"""The `csmd` command: info, bench frame, and the fast-BLAS preload it relies on."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import mlx.core as mx
import pytest

from csmd.cli import main


@pytest.fixture
def restore_limits() -> Iterator[None]:
    memory, cache = mx.set_memory_limit(0), mx.set_cache_limit(0)
    mx.set_memory_limit(memory)
    mx.set_cache_limit(cache)
    yield
    mx.set_memory_limit(memory)
    mx.set_cache_limit(cache)


@pytest.mark.usefixtures("restore_limits")
def test_info_reports_device_backend_and_limits(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--device", "cpu", "--memory-limit", "4", "--cache-limit", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "device             cpu" in out
    assert "memory_limit_gb    4.0" in out
    assert "cache_limit_gb     0.5" in out


def test_info_rejects_bad_settings(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--memory-limit", "-1"]) == 2
    assert "memory_limit_gb must be >= 0" in capsys.readouterr().err


def test_bench_frame_json(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["bench", "frame", "--model", "random:tiny", "--frames", "3", "--warmup", "1", "--prefill", "20"]
    assert main([*args, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["frames"] == 3 and result["prefill_rows"] == 20
    assert result["frame_ms"] > 0 and result["backbone_ms"] > 0 and result["decoder_ms"] > 0
    assert result["real_time_factor"] == pytest.approx(result["frame_ms"] / 80, abs=1e-3)


def test_bench_frame_rejects_a_prefill_beyond_the_window(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "frame", "--model", "random:tiny", "--prefill", "1000"]) == 2
    assert "window of 256 rows" in capsys.readouterr().err


def test_blas_preload_gives_correct_matmuls() -> None:
    """In a fresh process (csmd imported before mlx), the preloaded BLAS, if any, matches numpy."""
    code = (
        "import csmd, numpy as np, mlx.core as mx; from csmd import _blas; _blas.check(); "
        "a = np.random.default_rng(1).standard_normal((300, 200), dtype=np.float32); "
        "assert np.allclose(np.array(mx.array(a) @ mx.array(a.T)), a @ a.T, rtol=1e-3, atol=1e-3); "
        "print(_blas.loaded)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    off = subprocess.run(
        [sys.executable, "-c", "import csmd; from csmd import _blas; print(_blas.loaded)"],
        capture_output=True,
        text=True,
        env={"CSMD_BLAS": "off", "PATH": ""},
        check=True,
    )
    assert off.stdout.strip() == "None"
