"""What csmd tells the user about its setup: bad CSMD_* variables as one-line errors, the version, which kernels
run (and what the reference path costs), and MLX's first compilation of CPU kernels."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

import csmd
from csmd import environment, runtime
from csmd.cli import main
from csmd.errors import UserError
from csmd.kernels import native

# Each bad value, and what its one-line error must say: the variable, and the values it allows.
BAD_VALUES = [
    ("CSMD_VARIANT", "sse9", "auto, scalar, avx2, avx512vnni, neon"),
    ("CSMD_MATVEC", "fast", "auto, int16, int8, exact"),
    ("CSMD_KERNELS", "fastest", "auto, native, reference"),
    ("CSMD_THREADS", "abc", "a whole number of threads from 1 to 256"),
    ("CSMD_THREADS", "0", "a whole number of threads from 1 to 256"),
    ("CSMD_THREADS", "4x", "a whole number of threads from 1 to 256"),
    ("CSMD_BLAS", "libnot-a-blas.so.9", "auto, off, or the soname or path of a BLAS library"),
]


@pytest.mark.parametrize(("name", "value", "allowed"), BAD_VALUES)
def test_a_bad_variable_is_one_line_and_exit_2(name: str, value: str, allowed: str) -> None:
    """Set at launch, as a user would: the error names the variable and its values, with no traceback."""
    done = subprocess.run(
        [sys.executable, "-m", "csmd.cli", "info"],
        capture_output=True,
        text=True,
        env={**os.environ, name: value},
        check=False,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"csmd: error: {name} ") and allowed in lines[0], done.stderr
    assert repr(value) in lines[0] and done.stdout == ""


@pytest.mark.skipif(native.module is None, reason="needs the native kernels to know which variants run")
def test_a_variant_this_cpu_cannot_run_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    runnable = {"scalar"} | {v for v in ("avx2", "avx512vnni", "neon") if native.cpu_features().get(v)}
    foreign = "avx2" if "neon" in runnable else "neon"  # the other architecture's
    monkeypatch.setenv("CSMD_VARIANT", foreign)
    try:
        with pytest.raises(
            UserError, match=rf"CSMD_VARIANT must be auto or a kernel variant this CPU runs .*{foreign}"
        ):
            native.apply_variant()
    finally:
        monkeypatch.delenv("CSMD_VARIANT")
        native.apply_variant()


def test_good_values_and_empty_ones_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in [("CSMD_KERNELS", "reference"), ("CSMD_MATVEC", "int16"), ("CSMD_THREADS", "3")]:
        monkeypatch.setenv(name, value)
    assert environment.choice("CSMD_KERNELS", environment.KERNELS) == "reference"
    assert environment.choice("CSMD_MATVEC", environment.MATVEC_MODES) == "int16"
    assert environment.threads() == 3
    for name in ("CSMD_KERNELS", "CSMD_MATVEC", "CSMD_THREADS"):  # empty means the default, as if unset
        monkeypatch.setenv(name, "")
    assert environment.choice("CSMD_KERNELS", environment.KERNELS) == "auto"
    assert environment.threads() is None
    environment.check()


def test_a_variable_set_later_is_checked_at_its_next_use(monkeypatch: pytest.MonkeyPatch) -> None:
    """In a program that changes the environment after import, the next kernel op raises the UserError."""
    monkeypatch.setenv("CSMD_KERNELS", "quick")
    with pytest.raises(UserError, match="CSMD_KERNELS must be one of auto, native, reference, got 'quick'"):
        native.active(mx.cpu)
    with pytest.raises(UserError):
        environment.check()
    assert main(["info"]) == 2


def test_version_comes_from_the_package_metadata(capsys: pytest.CaptureFixture[str]) -> None:
    assert csmd.__version__ == importlib.metadata.version("csmd")
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"csmd {csmd.__version__}"


async def test_welcome_carries_the_version(tmp_path: Path) -> None:
    """A daemon on random:tiny tells its clients the version in `welcome`; the client library reads it."""
    import trio

    from csmd.daemon.server import Daemon
    from csmd.model.generator import Generator
    from csmd.model.loading import load_model
    from csmd.protocol import trio_client
    from csmd.speak import codec_for

    loaded = load_model("random:tiny")
    daemon = Daemon(Generator(loaded.model, loaded.tokenizer), codec_for(loaded, None), "random:tiny")
    try:
        async with trio.open_nursery() as nursery:
            path = await nursery.start(daemon.serve, tmp_path / "run" / "csmd.sock")
            with trio.fail_after(30):
                async with trio_client.open_client(path, client="version-test") as client:
                    assert client.welcome.version == csmd.__version__
                    assert client.welcome.server == f"csmd {csmd.__version__}"
            nursery.cancel_scope.cancel()
    finally:
        daemon.close()


def test_status_line_says_which_kernels_run_and_what_the_reference_path_costs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if native.module is not None:
        line = native.status_line(mx.cpu)
        assert line.startswith("csmd: native CPU kernels (") and "threads" in line
        monkeypatch.setenv("CSMD_KERNELS", "reference")
        assert "CSMD_KERNELS=reference: the reference path runs" in native.status_line(mx.cpu)
        monkeypatch.delenv("CSMD_KERNELS")
    monkeypatch.setattr(native, "module", None)
    monkeypatch.setattr(
        native, "load_error", "not built (csmd was installed with CSMD_BUILD_NATIVE=0, or not installed)"
    )
    line = native.status_line(mx.cpu)
    assert line.startswith("csmd: native CPU kernels not built (csmd was installed with CSMD_BUILD_NATIVE=0")
    assert "the reference path runs, a 4-bit csm-1b frame about 60x slower" in line and "\n" not in line
    monkeypatch.setattr(native, "load_error", "csmd_native was built against mlx 0.1 but mlx 0.2 is installed")
    assert "not loaded (csmd_native was built against mlx 0.1" in native.status_line(mx.cpu)
    assert native.status_line(mx.gpu) == "csmd: running on the GPU with MLX's own kernels"


def test_say_prints_the_kernel_line_before_the_model_loads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "a.wav"
    assert main(["say", "Hi.", "-o", str(out), "--model", "random:tiny", "--max-seconds", "0.4", "--local"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0] == native.status_line() and any("random weights, which do not speak" in line for line in err[1:])


def test_jit_notice_only_when_mlx_will_compile_for_the_first_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("TMP", "TEMP", "TEMPDIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    cache = runtime.jit_cache_dir()
    assert cache == tmp_path / "mlx" / mx.__version__ / "cpu"
    monkeypatch.setattr(runtime.shutil, "which", lambda name: "/usr/bin/g++" if name == "g++" else None)
    monkeypatch.setattr(runtime.sys, "platform", "linux")
    notice = runtime.jit_notice(mx.cpu)
    assert notice is not None and str(cache) in notice and "later runs reuse them" in notice
    cache.mkdir(parents=True)
    (cache / "libkernel.so").touch()
    assert runtime.jit_notice(mx.cpu) is None  # compiled before: nothing to announce
    (cache / "libkernel.so").unlink()
    assert runtime.jit_notice(mx.gpu) is None  # the CPU's kernels only
    monkeypatch.setattr(runtime.shutil, "which", lambda name: None)
    assert runtime.jit_notice(mx.cpu) is None  # no g++: MLX does not compile


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MLX's CPU compilation with g++ is Linux's")
def test_the_jit_cache_dir_is_where_mlx_writes(tmp_path: Path) -> None:
    """A compiled elementwise chain in a fresh process with an empty temp dir: MLX writes its kernel there."""
    code = "import csmd, mlx.core as mx; f = mx.compile(lambda x: mx.exp(x * 2 + 1) - x); mx.eval(f(mx.ones((64,))))"
    done = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, "TMPDIR": str(tmp_path)}, capture_output=True, text=True,
        check=False, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    env_before = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(tmp_path)
    try:
        cache = runtime.jit_cache_dir()
    finally:
        if env_before is None:
            del os.environ["TMPDIR"]
        else:
            os.environ["TMPDIR"] = env_before
    if runtime.shutil.which("g++") is None:
        pytest.skip("no g++: MLX does not compile CPU kernels here")
    assert any(cache.glob("*.so")), sorted(p.name for p in tmp_path.rglob("*"))
