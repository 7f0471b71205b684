"""The `csmd` command: info, bench frame, and the fast-BLAS preload it relies on."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import soundfile as sf

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
    assert main(["info", "--device", "cpu", "--memory-limit", "4", "--cache-limit", "0.5", "--dtype", "bf16"]) == 0
    out = capsys.readouterr().out
    assert "dtype              bfloat16" in out
    assert "device             cpu" in out
    assert "memory_limit_gb    4.0" in out
    assert "cache_limit_gb     0.5" in out


def test_info_rejects_bad_settings(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--memory-limit", "-1"]) == 2
    assert "memory_limit_gb must be >= 0" in capsys.readouterr().err
    assert main(["info", "--dtype", "int3"]) == 2
    assert "unknown dtype 'int3'" in capsys.readouterr().err


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


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the preload is Linux-only")
def test_blas_preload_warns_when_mlx_came_first() -> None:
    """Imported after mlx.core, csmd cannot give MLX a fast BLAS any more: it says so rather than run slow."""
    late = subprocess.run(
        [sys.executable, "-W", "error::RuntimeWarning", "-c", "import mlx.core; import csmd"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert late.returncode != 0 and "imported before csmd" in late.stderr
    quiet = subprocess.run(
        [sys.executable, "-W", "error::RuntimeWarning", "-c", "import mlx.core; import csmd"],
        capture_output=True,
        text=True,
        env={**os.environ, "CSMD_BLAS": "off"},
        check=False,
    )
    assert quiet.returncode == 0, quiet.stderr


def test_say_writes_one_frame_of_audio_per_generated_frame(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out.wav"
    args = ["say", "Hello there.", "-o", str(out), "--model", "random:tiny", "--max-seconds", "0.8", "--seed", "3"]
    assert main(args) == 0
    printed = capsys.readouterr()
    assert "random weights do not speak" in printed.err
    frames = int(re.search(r"\((\d+) frames, ended by (\w+), seed 3\)", printed.out).group(1))  # type: ignore[union-attr]
    pcm, rate = sf.read(out)
    assert rate == 24_000 and pcm.shape == (frames * 1920,)
    assert main(args) == 0  # the same seed gives the same audio
    np.testing.assert_array_equal(sf.read(out)[0], pcm)


def test_say_with_context_audio(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    t = np.arange(int(44_100 * 0.5)) / 44_100
    sf.write(tmp_path / "ctx.wav", np.stack([0.3 * np.sin(2 * np.pi * 300 * t)] * 2, axis=1), 44_100)
    args = ["say", "Reply.", "-o", str(tmp_path / "o.wav"), "--model", "random:tiny", "--max-seconds", "0.4"]
    ctx = ["--context", str(tmp_path / "ctx.wav"), "--context-text", "Some context.", "--context-speaker", "1"]
    assert main([*args, *ctx]) == 0
    assert main([*args, "--context", str(tmp_path / "ctx.wav")]) == 2
    assert "give one --context-text for each --context file" in capsys.readouterr().err
    assert main([*args, "--context", str(tmp_path / "missing.wav"), "--context-text", "x"]) == 2
    assert "missing.wav" in capsys.readouterr().err


def test_bench_codec_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "codec", "--codec", "random:tiny", "--frames", "3", "--warmup", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["frames"] == 3 and result["decode_ms"] > 0 and result["encode_ms"] > 0
    assert result["moshi_decode_ms"] is None
    assert result["bytes_per_frame"] > 0 and result["bandwidth_gbs"] > 0 and result["gemm_gflops"] > 0
    assert result["floor_ms"] > 0 and result["floor_ratio"] == pytest.approx(
        result["decode_ms"] / result["floor_ms"], rel=1e-2, abs=1e-2
    )


def test_say_with_an_hf_checkpoint_uses_its_bundled_codec(hf_dir: Path, tmp_path: Path) -> None:
    """An HF-format CSM checkpoint carries Mimi under codec_model.*: `say` needs nothing else."""
    from csmd.model.loading import load_model
    from csmd.speak import codec_for

    loaded = load_model(str(hf_dir))
    mimi = codec_for(loaded, None)
    assert mimi.num_codebooks == 4 and mimi.config.quantizer.bins == 64 and mimi.config.seanet.dimension == 32
    out = tmp_path / "hf.wav"
    assert main(["say", "Hello there.", "-o", str(out), "--model", str(hf_dir), "--local", "--max-seconds", "0.4"]) == 0
    assert sf.info(str(out)).frames % 1920 == 0 and sf.info(str(out)).frames > 0


def test_codec_bf16_keeps_the_weight_bound_matrices_in_bf16(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--codec-bf16 (say, serve, talk, bench daemon/talk) hands codec_for bf16=True: the codec's transformer
    projections and its first convolutions are stored in bfloat16, and `say` still writes whole frames."""
    import mlx.core as mx

    import csmd.speak
    from csmd.model.loading import load_model
    from csmd.speak import codec_for

    loaded = load_model("random:tiny")
    assert codec_for(loaded, None).decoder_transformer.layers[0].attn.in_proj.weight.dtype == mx.float32
    mimi = codec_for(loaded, None, bf16=True)
    assert mimi.decoder_transformer.layers[0].attn.in_proj.weight.dtype == mx.bfloat16
    assert mimi.decoder.layers[0]._w.dtype == mx.bfloat16
    asked: list[bool] = []

    def spy(loaded, spec, bf16=False):  # type: ignore[no-untyped-def]
        asked.append(bf16)
        return codec_for(loaded, spec, bf16=bf16)

    monkeypatch.setattr(csmd.speak, "codec_for", spy)
    out = tmp_path / "bf16.wav"
    args = ["say", "Hello.", "-o", str(out), "--model", "random:tiny", "--local", "--max-seconds", "0.4"]
    assert main([*args, "--codec-bf16"]) == 0
    assert main(args) == 0
    assert asked == [True, False]
    assert sf.info(str(out)).frames % 1920 == 0 and sf.info(str(out)).frames > 0
