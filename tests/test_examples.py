"""The programs in examples/, each run as a user runs it, against a real `csmd serve --model random:tiny`.

One daemon serves the whole module. It listens where it would by default with XDG_RUNTIME_DIR set to a
private temporary directory, so the examples' default-path rule is tested too. Every test checks what the
example produced (WAV lengths against the frames the daemon reported, end reasons, statistics), not just
its exit status.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import wave
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
FRAME_SAMPLES = 1920
SAMPLE_RATE = 24_000
STARTUP_SECONDS = 120  # model build and first MLX compilation on a loaded 2-core machine


def example_env(runtime_dir: Path) -> dict[str, str]:
    """The environment an example runs in: this checkout's csmd first, the daemon's runtime directory."""
    env = dict(os.environ, XDG_RUNTIME_DIR=str(runtime_dir))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


@pytest.fixture(scope="module")
def runtime_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("runtime")
    path.chmod(0o700)
    return path


@pytest.fixture(scope="module")
def daemon(runtime_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A `csmd serve --model random:tiny` subprocess; yields its socket path, stops it with SIGINT after."""
    path = runtime_dir / "csmd" / "csmd.sock"  # the default path for this XDG_RUNTIME_DIR
    log_path = tmp_path_factory.mktemp("daemon") / "serve.log"
    command = [sys.executable, "-m", "csmd.cli", "serve", "--model", "random:tiny", "--socket", str(path)]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=example_env(runtime_dir))
    try:
        wait_until_listening(path, proc, log_path)
        yield path
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
    output = log_path.read_text(errors="replace")
    assert code == 0, output
    assert "Traceback" not in output, output  # no example made the daemon fail
    assert not path.exists()  # a clean shutdown removes the socket


def wait_until_listening(path: Path, proc: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"csmd serve exited with {proc.returncode}:\n{log_path.read_text(errors='replace')}")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(path))
            except OSError:
                time.sleep(0.1)
                continue
            return
    pytest.fail(f"csmd serve did not listen on {path} within {STARTUP_SECONDS} s")


def run_example(name: str, *args: str | int | Path, runtime_dir: Path, python_code: str | None = None) -> str:
    """Run examples/<name> and return its stdout; fails the test (showing stderr) unless it exits 0."""
    script = str(EXAMPLES / name)
    argv = [sys.executable, script] if python_code is None else [sys.executable, "-c", python_code, script]
    done = subprocess.run(
        [*argv, *map(str, args)], capture_output=True, text=True, env=example_env(runtime_dir), timeout=60, check=False
    )
    assert done.returncode == 0, f"{name} exited {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    return done.stdout


def wav_samples(path: Path) -> int:
    with wave.open(str(path), "rb") as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (1, 2, SAMPLE_RATE)
        return wav.getnframes()


# Runs raw_client.py with every csmd module (and numpy, trio) made unimportable: it must need none of them.
WITHOUT_CSMD = """
import runpy, sys
for name in ("csmd", "numpy", "trio", "soundfile"):
    sys.modules[name] = None  # `import csmd` (or csmd.anything) now raises ImportError
script = sys.argv.pop(1)
sys.argv[0] = script
runpy.run_path(script, run_name="__main__")
"""


def test_raw_client_needs_only_the_protocol_document(daemon: Path, runtime_dir: Path, tmp_path: Path) -> None:
    outputs = []
    for name in ("first.wav", "again.wav"):
        out = tmp_path / name
        # No --socket: the client finds the daemon by the documented default-path rule.
        stdout = run_example(
            "raw_client.py",
            "Hello.",
            "-o",
            out,
            "--max-frames",
            "9",
            "--seed",
            "5",
            runtime_dir=runtime_dir,
            python_code=WITHOUT_CSMD,
        )
        found = re.search(r"(\d+) frames, (\d+) samples, reason (\w+), seed (\d+), first audio after [\d.]+ ms", stdout)
        assert found, stdout
        frames, samples, reason, seed = int(found[1]), int(found[2]), found[3], int(found[4])
        assert (frames, reason, seed) == (9, "max_length", 5)
        assert samples == wav_samples(out) == FRAME_SAMPLES * frames
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]  # the seed went over the wire: the same reply, sample for sample
    with wave.open(str(tmp_path / "first.wav"), "rb") as wav:
        pcm = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")
    assert np.abs(pcm).max() > 0  # audio, not silence


def test_raw_client_imports_only_the_standard_library_and_msgpack() -> None:
    tree = ast.parse((EXAMPLES / "raw_client.py").read_text())
    imported = {
        alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
    }
    imported |= {
        node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
    }
    assert imported - set(sys.stdlib_module_names) == {"msgpack"}


def test_raw_client_default_path_is_the_daemons(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import runpy

    from csmd.daemon.unix_socket import default_socket_path

    raw = runpy.run_path(str(EXAMPLES / "raw_client.py"))  # defines its functions; main() runs only as __main__
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert raw["default_socket_path"]() == default_socket_path() == tmp_path / "csmd" / "csmd.sock"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert raw["default_socket_path"]() == default_socket_path()
    # macOS: launchd's per-user TMPDIR (the daemon's rule, simulated; the raw client reads sys.platform too)
    monkeypatch.setenv("TMPDIR", str(tmp_path / "t"))
    monkeypatch.setattr(sys, "platform", "darwin")
    assert raw["default_socket_path"]() == default_socket_path() == tmp_path / "t" / "csmd" / "csmd.sock"


def make_voice_prompt(path: Path) -> float:
    """A voice prompt WAV: espeak-ng's speech (22.05 kHz) if it is installed, else a synthetic vowel at 16 kHz.
    Either rate differs from 24 kHz, so the prompt is resampled. Returns its duration in seconds."""
    espeak = shutil.which("espeak-ng")
    if espeak:
        subprocess.run([espeak, "-w", str(path), "This is how I sound."], check=True, capture_output=True)
    else:
        t = np.arange(int(1.5 * 16_000)) / 16_000
        vowel = sum(np.sin(2 * np.pi * f * t) / k for k, f in enumerate((140, 280, 700, 1200), start=1))
        soundfile.write(path, (0.3 * vowel * np.hanning(len(t))).astype(np.float32), 16_000, subtype="PCM_16")
    return float(soundfile.info(str(path)).duration)


def test_blocking_app_pins_a_voice_prompt_and_streams_a_reply_into_a_wav(
    daemon: Path, runtime_dir: Path, tmp_path: Path
) -> None:
    prompt, out = tmp_path / "prompt.wav", tmp_path / "reply.wav"
    seconds = make_voice_prompt(prompt)
    stdout = run_example(
        "blocking_app.py",
        prompt,
        "--prompt-text",
        "This is how I sound.",
        "-o",
        out,
        "--max-frames",
        "15",
        "--socket",
        daemon,
        runtime_dir=runtime_dir,
    )
    pinned = re.search(r"pinned a ([\d.]+) s voice prompt: (\d+) frames", stdout)
    assert pinned, stdout
    assert float(pinned[1]) == pytest.approx(seconds, abs=0.01)
    assert abs(int(pinned[2]) - seconds * SAMPLE_RATE / FRAME_SAMPLES) < 1  # 12.5 Mimi frames per second
    reply = re.search(r"reply: (\d+) frames \((\d+) samples\), reason (\w+)", stdout)
    assert reply, stdout
    frames, samples, reason = int(reply[1]), int(reply[2]), reply[3]
    assert (frames, reason) == (15, "max_length")
    assert samples == wav_samples(out) == FRAME_SAMPLES * frames


def test_trio_app_two_sessions_at_once_one_cancelled(daemon: Path, runtime_dir: Path) -> None:
    max_frames, cancel_after = 200, 4  # 200 frames: far more than the cancel needs to land, within the window
    stdout = run_example(
        "trio_app.py",
        "--max-frames",
        max_frames,
        "--cancel-after",
        cancel_after,
        "--socket",
        daemon,
        runtime_dir=runtime_dir,
    )
    a = re.search(r"session a: (\d+) chunks, (\d+) frames \([\d.]+ s\), reason (\w+)\n", stdout)
    b = re.search(
        r"session b: (\d+) chunks, (\d+) frames \([\d.]+ s\), reason (\w+); "
        rf"cancel sent after chunk {cancel_after}, the daemon had sent (\d+) frames",
        stdout,
    )
    order = re.search(r"arrival order: ([ab]+)\n", stdout)
    assert a and b and order, stdout
    assert (int(a[1]), int(a[2]), a[3]) == (max_frames, max_frames, "max_length")  # untouched by b's cancel
    assert b[3] == "cancelled"
    assert int(b[1]) == int(b[2]) == int(b[4])  # every frame sent arrived, and the cancel reply agrees
    assert cancel_after <= int(b[1]) < max_frames
    arrivals = order[1]
    assert (arrivals.count("a"), arrivals.count("b")) == (max_frames, int(b[1]))
    # At once: each session's chunks began before the other's ended.
    assert arrivals.index("a") < arrivals.rindex("b") and arrivals.index("b") < arrivals.rindex("a")


def test_latency_probe_reports_first_audio_and_gaps(daemon: Path, runtime_dir: Path) -> None:
    replies, max_frames = 3, 10
    stdout = run_example(
        "latency_probe.py", "-n", replies, "--max-frames", max_frames, "--socket", daemon, runtime_dir=runtime_dir
    )
    number = r"([\d.]+)"
    rows = re.findall(
        rf"reply \d+: (\d+) frames, reason (\w+), first audio {number} ms \(daemon: {number} ms\), "
        rf"largest gap {number} ms",
        stdout,
    )
    assert len(rows) == replies, stdout
    for frames, reason, first, daemon_first, _ in rows:
        assert (int(frames), reason) == (max_frames, "max_length")
        assert float(first) >= float(daemon_first) > 0  # the client's clock starts before the daemon's
    stats = r"p50 ([\d.]+) ms, p95 ([\d.]+) ms, max ([\d.]+) ms"
    first_audio = re.search(rf"time to first audio \((\d+) replies\): {stats}", stdout)
    gaps = re.search(rf"gap between chunks \((\d+) gaps\): {stats}", stdout)
    assert first_audio and gaps, stdout
    assert int(first_audio[1]) == replies and int(gaps[1]) == replies * (max_frames - 1)
    for found, column in ((first_audio, 2), (gaps, 4)):
        p50, p95, largest = (float(found[i]) for i in (2, 3, 4))
        assert 0 <= p50 <= p95 <= largest
        assert largest == max(float(row[column]) for row in rows)


def refused_in_one_line(argv: list[str], env_dir: Path, cwd: Path) -> str:
    """Run an example's command line; it must exit 2 with one line on stderr and no traceback. Returns the line."""
    done = subprocess.run(
        [sys.executable, *argv], capture_output=True, text=True, env=example_env(env_dir), timeout=60, check=False,
        cwd=cwd,
    )  # fmt: skip
    assert done.returncode == 2, done
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    return done.stderr


@pytest.mark.parametrize("example", ["raw_client.py", "blocking_app.py", "trio_app.py", "latency_probe.py"])
def test_examples_without_a_daemon_say_so_in_one_line(example: str, tmp_path: Path) -> None:
    prompt = tmp_path / "prompt.wav"
    make_voice_prompt(prompt)
    missing = tmp_path / "nobody.sock"
    args = [str(prompt)] if example == "blocking_app.py" else []
    err = refused_in_one_line([str(EXAMPLES / example), *args, "--socket", str(missing)], tmp_path, tmp_path)
    assert "no csmd daemon" in err and str(missing) in err and "--socket" in err


# Runs an example as if another user served the socket: the client library's uid check then refuses it.
AS_IF_ANOTHER_USER = """
import runpy, sys
import csmd.protocol.peercred as peercred
peercred.peer_uid = lambda sock: 4242  # neither this user nor root
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("example", ["blocking_app.py", "trio_app.py", "latency_probe.py"])
def test_library_examples_refuse_another_users_socket_in_one_line(
    example: str, daemon: Path, runtime_dir: Path, tmp_path: Path
) -> None:
    prompt = tmp_path / "prompt.wav"
    make_voice_prompt(prompt)
    args = [str(prompt)] if example == "blocking_app.py" else []
    argv = ["-c", AS_IF_ANOTHER_USER, str(EXAMPLES / example), *args, "--socket", str(daemon)]
    err = refused_in_one_line(argv, runtime_dir, tmp_path)
    assert str(daemon) in err and "4242" in err, err


# raw_client.py imports no csmd code, so the kernel's answer itself is faked: SO_PEERCRED names user 4242.
RAW_AS_IF_ANOTHER_USER = """
import runpy, socket, struct, sys
real = socket.socket.getsockopt
def getsockopt(self, level, option, *size):
    if option == socket.SO_PEERCRED:
        return struct.pack("3i", 1, 4242, 4242)
    return real(self, level, option, *size)
socket.socket.getsockopt = getsockopt
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fakes Linux's SO_PEERCRED")
def test_raw_client_refuses_another_users_socket_before_sending(
    daemon: Path, runtime_dir: Path, tmp_path: Path
) -> None:
    argv = ["-c", RAW_AS_IF_ANOTHER_USER, str(EXAMPLES / "raw_client.py"), "--socket", str(daemon)]
    err = refused_in_one_line(argv, runtime_dir, tmp_path)
    assert str(daemon) in err and "user 4242" in err, err
    assert not (tmp_path / "raw.wav").exists()  # it stopped before asking for anything
