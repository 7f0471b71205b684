"""The `csmd` command: info, say, serve, talk, convert and the benches, as a user meets them: user errors are one
line naming the flag (exit 2) and are found before anything loads, bugs keep their traceback (exit 1), Ctrl-C
ends the work with its summary."""

from __future__ import annotations

import json
import os
import re
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import mlx.core as mx
import numpy as np
import pytest
import soundfile as sf
from serving import csmd_serve

import csmd.speak
from csmd import kernels
from csmd.cli import main

CLI = [sys.executable, "-m", "csmd.cli"]


@pytest.fixture(autouse=True)
def own_runtime_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """A private XDG_RUNTIME_DIR: no daemon that runs on this machine's default socket takes these commands."""
    runtime_dir = tmp_path_factory.mktemp("run")
    runtime_dir.chmod(0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime_dir))


@pytest.fixture
def restore_limits() -> Iterator[None]:
    memory, cache = mx.set_memory_limit(0), mx.set_cache_limit(0)
    mx.set_memory_limit(memory)
    mx.set_cache_limit(cache)
    yield
    mx.set_memory_limit(memory)
    mx.set_cache_limit(cache)


@pytest.fixture
def no_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any model or codec load fails the test: what it checks must be found before loading."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("loaded a model or codec before the arguments were checked")

    monkeypatch.setattr("csmd.model.loading.load_model", refuse)
    monkeypatch.setattr("csmd.audio.mimi.loading.load_mimi", refuse)


@pytest.fixture
def no_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing may be looked up on the HF hub."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"sent to the HF hub: {args}")

    monkeypatch.setattr("csmd.hub.download", refuse)
    monkeypatch.setattr("huggingface_hub.snapshot_download", refuse)
    monkeypatch.setattr("huggingface_hub.hf_hub_download", refuse)


def one_error_line(capsys: pytest.CaptureFixture[str], *fragments: str) -> str:
    """The command's stderr ends in one `csmd: error:` line holding every fragment; before it, only csmd's own
    one-line notes (what it was doing), no traceback."""
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert lines and lines[-1].startswith("csmd: error: "), err
    assert all(line.startswith("csmd: ") and "error" not in line for line in lines[:-1]), err
    for fragment in fragments:
        assert fragment in lines[-1], (fragment, lines[-1])
    return lines[-1]


# ---- info and the runtime flags ----


@pytest.mark.usefixtures("restore_limits")
def test_info_reports_device_backend_and_limits(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--device", "cpu", "--memory-limit", "4", "--cache-limit", "0.5", "--dtype", "bf16"]) == 0
    out = capsys.readouterr().out
    assert "dtype              bfloat16" in out
    assert "device             cpu" in out
    assert "memory_limit_gb    4.0" in out
    assert "cache_limit_gb     0.5" in out


def test_a_reader_that_stops_reading_is_not_a_failure() -> None:
    """`csmd info | head -1`: the pipe closes after the first line; csmd exits 0 with no traceback."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # nobody reads: the first write gets EPIPE
    done = subprocess.run(
        [sys.executable, "-m", "csmd.cli", "info"], stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120
    )
    os.close(write_end)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "internal error" not in done.stderr
    assert "Exception ignored" not in done.stderr  # nor at exit, flushing what was buffered


def test_bad_flag_values_are_one_line_naming_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--memory-limit", "-1"]) == 2
    one_error_line(capsys, "argument --memory-limit", "'-1'")
    assert main(["info", "--dtype", "int3"]) == 2
    one_error_line(capsys, "argument --dtype", "'int3'")


@pytest.mark.usefixtures("no_loading")
@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--max-seconds", "0"], "--max-seconds"),
        (["--max-seconds", "-1"], "--max-seconds"),
        (["--max-seconds", "nan"], "--max-seconds"),
        (["--speaker", "-1"], "--speaker"),
        (["--temperature", "11"], "--temperature"),
        (["--top-k", "-3"], "--top-k"),
        (["--top-p", "0"], "--top-p"),
        (["--min-p", "1"], "--min-p"),
        (["--seed", "-1"], "--seed"),
        # The engine's own ranges (GenerationParams, the daemon's field ranges), not merely the type's:
        (["--top-p", "1e-7"], "--top-p"),
        (["--temperature", "0.0001"], "--temperature"),
        (["--top-k", "3000000000"], "--top-k"),
        (["--speaker", "70000"], "--speaker"),
        (["--context", "a.wav", "--context-text", "x", "--context-speaker", "-2"], "--context-speaker"),
        (["--socket", "s", "--local"], "--local"),
    ],
)
def test_say_validates_every_value_up_front(
    flags: list[str], named: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["say", "Hello.", "-o", str(tmp_path / "o.wav"), "--model", "random:tiny", *flags]) == 2
    one_error_line(capsys, named)


# ---- say ----


def test_random_tiny_holds_every_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The README's offline command, every flag at its default (a 20 s reply fits tiny's 2048-row window)."""
    monkeypatch.chdir(tmp_path)
    assert main(["say", "Hello.", "-o", "noise.wav", "--model", "random:tiny"]) == 0
    printed = capsys.readouterr()
    assert printed.err.count("random weights, which do not speak") == 1
    frames = int(re.search(r"\((\d+) frames", printed.out).group(1))  # type: ignore[union-attr]
    assert sf.info("noise.wav").frames == frames * 1920


def test_say_writes_one_frame_of_audio_per_generated_frame(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out.wav"
    args = ["say", "Hello there.", "-o", str(out), "--model", "random:tiny", "--max-seconds", "0.8", "--seed", "3"]
    assert main(args) == 0
    printed = capsys.readouterr()
    assert "random weights, which do not speak" in printed.err
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
    capsys.readouterr()
    assert main([*args, "--context", str(tmp_path / "ctx.wav")]) == 2
    one_error_line(capsys, "--context-text: give one for each --context file")
    assert main([*args, "--context", str(tmp_path / "missing.wav"), "--context-text", "x"]) == 2
    one_error_line(capsys, "--context", "missing.wav", "no such file")


def _wav_header(frames_claimed: int, data: bytes) -> bytes:
    n = frames_claimed * 2
    fmt = struct.pack("<HHIIHH", 1, 1, 24_000, 48_000, 2, 16)
    return (
        b"RIFF"
        + struct.pack("<I", 36 + n)
        + b"WAVE"
        + b"fmt "
        + struct.pack("<I", 16)
        + fmt
        + b"data"
        + (struct.pack("<I", n) + data)
    )


@pytest.mark.usefixtures("no_loading")
def test_say_refuses_before_loading(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Empty text, an output in a directory that does not exist, a WAV cut on a frame boundary, a reply
    longer than the window: each is one line, found before the model loads."""
    out = str(tmp_path / "o.wav")
    assert main(["say", "", "-o", out, "--model", "random:tiny"]) == 2
    one_error_line(capsys, "text", "empty")
    assert main(["say", "  \n", "-o", out, "--model", "random:tiny"]) == 2
    one_error_line(capsys, "empty")
    assert main(["say", "Hi.", "-o", str(tmp_path / "nodir" / "x.wav"), "--model", "random:tiny"]) == 2
    one_error_line(capsys, "-o", "nodir", "does not exist")
    assert main(["say", "Hi.", "-o", str(tmp_path / "x.mp3"), "--model", "random:tiny"]) == 2
    one_error_line(capsys, "-o", "unknown extension '.mp3'")
    assert main(["say", "Hi.", "--model", "random:tiny"]) == 2
    one_error_line(capsys, "-o FILE, --play")
    cut = tmp_path / "cut.wav"
    cut.write_bytes(_wav_header(24_000, np.zeros(2400, "<i2").tobytes()))  # 0.1 s of a promised 1 s
    assert main(["say", "Hi.", "-o", out, "--model", "random:tiny", "--context", str(cut), "--context-text", "x"]) == 2
    one_error_line(capsys, "--context", "cut.wav", "truncated", "2400 of 24000 frames")
    assert main(["say", "Hi.", "-o", out, "--model", "random:tiny", "--max-seconds", "200"]) == 2
    line = one_error_line(capsys, "--max-seconds 200 (2500 frames)", "random:tiny (2048 rows)", "--max-seconds 163")
    assert "max_frames" not in line


def test_a_reply_that_fits_only_without_its_context_names_both(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sf.write(tmp_path / "long.wav", np.zeros(24_000 * 100, np.float32), 24_000)  # 1250 frames of context
    args = ["say", "Hi.", "-o", str(tmp_path / "o.wav"), "--model", "random:tiny", "--max-seconds", "80"]
    ctx = ["--context", str(tmp_path / "long.wav"), "--context-text", "x"]
    assert main([*args, *ctx]) == 2
    line = one_error_line(capsys, "--max-seconds 80", "--context (1257 rows)", "needs 2266 rows")
    most = re.search(r"use --max-seconds ([\d.]+) or less", line).group(1)  # type: ignore[union-attr]
    assert main([*args[:-1], most, *ctx]) == 0  # the bound is the generator's own: that much fits


@pytest.mark.usefixtures("no_loading", "no_hub")
@pytest.mark.parametrize(
    "spec", ["./csm", "../csm", "/no/such/csm", "~/no-such-csm", "owner/model.safetensors", "ckpt.pt", "a/b/c"]
)
def test_a_path_that_looks_local_is_never_sent_to_the_hub(
    spec: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["say", "Hi.", "-o", "o.wav", "--model", spec]) == 2
    one_error_line(capsys, f"--model: {spec}: no such file or directory")
    assert main(["say", "Hi.", "-o", "o.wav", "--model", "random:tiny", "--codec", spec]) == 2
    one_error_line(capsys, f"--codec: {spec}: no such file or directory")


@pytest.mark.usefixtures("no_loading", "no_hub")
def test_a_preset_name_without_random_is_pointed_at(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["say", "Hi.", "-o", "o.wav", "--model", "tiny"]) == 2
    one_error_line(capsys, "did you mean random:tiny?")
    assert main(["say", "Hi.", "-o", "o.wav", "--model", "random:huge"]) == 2
    one_error_line(capsys, "--model", "unknown model preset 'huge'")


def _http_error(kind: type[Exception], url: str, status: int) -> Exception:
    response = httpx.Response(status, request=httpx.Request("GET", url))
    return kind(f"{status} Client Error for url: {url}", response=response)  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("raised", "fragments"),
    [
        ("gated", ["--model: sesame/csm-1b is a gated repo", "https://huggingface.co/sesame/csm-1b", "hf auth login"]),
        ("missing", ["--model: sesame/csm-1b: no such repo on the HF hub"]),
        ("unreachable", ["--model: sesame/csm-1b is not in the local HF cache", "out of reach", "random:tiny"]),
        ("refused", ["--model: sesame/csm-1b: the HF hub refused the download", "500"]),
    ],
)
def test_hub_failures_name_the_repo_and_say_what_to_do(
    raised: str,
    fragments: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    url = "https://huggingface.co/api/models/sesame/csm-1b"
    errors: dict[str, Exception] = {
        "gated": _http_error(GatedRepoError, url, 403),
        "missing": _http_error(RepositoryNotFoundError, url, 404),
        "unreachable": LocalEntryNotFoundError("Got: ConnectError: [Errno -2] Name or service not known"),
        "refused": _http_error(HfHubHTTPError, url, 500),
    }

    def fail(*args: object, **kwargs: object) -> None:
        raise errors[raised]

    monkeypatch.setattr("huggingface_hub.snapshot_download", fail)
    assert main(["say", "Hi.", "-o", str(tmp_path / "o.wav")]) == 2
    one_error_line(capsys, *fragments)


def test_offline_without_the_weights_points_at_random_tiny(tmp_path: Path) -> None:
    """As a user without network runs it: HF_HUB_OFFLINE=1 and an empty cache (no network is used)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "XDG_RUNTIME_DIR": str(tmp_path)}
    done = subprocess.run([*CLI, "say", "Hello.", "-o", str(tmp_path / "x.wav")], capture_output=True, text=True,
                          env=env, check=False)  # fmt: skip
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    *notes, error = lines  # csmd's own notes first (the kernel line), then the one error line
    assert all(n.startswith("csmd: ") and "error" not in n for n in notes), lines
    assert error.startswith("csmd: error: ") and "HF_HUB_OFFLINE is set" in error and "--model random:tiny" in error


@pytest.mark.usefixtures("no_loading")
def test_no_sound_device_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import sounddevice as sd

    def no_device(device: object = None, kind: object = None) -> object:
        if device is None and kind is None:
            return sd.DeviceList([])
        raise sd.PortAudioError("Error querying device -1")

    monkeypatch.setattr(sd, "query_devices", no_device)
    assert main(["say", "Hi.", "--play", "--model", "random:tiny"]) == 2
    one_error_line(capsys, "--play: no default output device")
    assert main(["say", "Hi.", "--play", "--output-device", "speakers", "--model", "random:tiny"]) == 2
    one_error_line(capsys, "--output-device: output device 'speakers' matches 0 devices")
    assert main(["talk", "--model", "random:tiny"]) == 2
    one_error_line(capsys, "--input-device: no default input device")


def test_a_bug_keeps_its_traceback_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise ZeroDivisionError("a fault inside csmd")

    monkeypatch.setattr(csmd.speak, "speak", broken)
    assert main(["say", "Hi.", "-o", str(tmp_path / "o.wav"), "--model", "random:tiny"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "ZeroDivisionError: a fault inside csmd" in err
    assert "this is a bug in csmd" in err.splitlines()[-1]


def test_ctrl_c_stops_say_with_what_was_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A real SIGINT during generation: the reply stops at the next frame, the file holds the frames made."""
    made = []
    step = csmd.speak.next_audio

    def next_audio(*args: Any) -> Any:
        made.append(1)
        if len(made) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return step(*args)

    monkeypatch.setattr(csmd.speak, "next_audio", next_audio)
    out = tmp_path / "o.wav"
    assert main(["say", "Hello.", "-o", str(out), "--model", "random:tiny", "--seed", "1"]) == 0
    printed = capsys.readouterr()
    assert "(3 frames, ended by Ctrl-C, seed 1)" in printed.out and "Traceback" not in printed.err
    assert sf.info(str(out)).frames == 3 * 1920


def test_ctrl_c_before_anything_ran_exits_130(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    def interrupted(*args: object, **kwargs: object) -> None:
        os.kill(os.getpid(), signal.SIGINT)  # Python's own handler: KeyboardInterrupt, mid-load
        time.sleep(1)

    monkeypatch.setattr("csmd.model.loading.load_model", interrupted)
    assert main(["say", "Hi.", "-o", str(tmp_path / "o.wav"), "--model", "random:tiny"]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "Traceback" not in err


# ---- the daemon: serve, say --socket ----


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """`csmd serve --model random:tiny` on a socket of its own, for the tests that talk to a daemon."""
    sock = tmp_path_factory.mktemp("d") / "csmd.sock"
    with csmd_serve(sock):  # stopped by Ctrl-C: a clean stop, exit 0
        yield sock
    assert not sock.exists()


def test_say_through_the_daemon(daemon: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "a.wav"
    assert main(["say", "Hi.", "-o", str(out), "--socket", str(daemon), "--max-seconds", "0.4", "--seed", "9"]) == 0
    printed = capsys.readouterr()
    assert "speaking through the daemon" in printed.err and "(model random:tiny)" in printed.err
    frames = int(re.search(r"\((\d+) frames", printed.out).group(1))  # type: ignore[union-attr]
    assert sf.info(str(out)).frames == frames * 1920
    # --model naming the daemon's own model is fine.
    args = ["say", "Hi.", "-o", str(out), "--socket", str(daemon), "--max-seconds", "0.4"]
    assert main([*args, "--model", "random:tiny"]) == 0


def test_daemon_refusals_are_one_line(
    daemon: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import dataclasses

    from csmd.model.sampling import GenerationParams

    args = ["say", "Hi.", "-o", str(tmp_path / "o.wav"), "--socket", str(daemon)]
    assert main([*args, "--max-seconds", "200"]) == 2  # the window is the daemon's: it refuses max_frames
    line = one_error_line(capsys, "--max-seconds 200 (2500 frames)", "window", "lower --max-seconds")
    assert "max_frames" not in line
    # A value the daemon refuses (invalid_params) although csmd's own checks would have caught it first.
    bad = dataclasses.replace(GenerationParams(), temperature=11.0)
    monkeypatch.setattr("csmd.cli.say.generation_params", lambda args: bad)
    assert main(args) == 2
    one_error_line(capsys, "refused the request (invalid_params)", "temperature")


def test_serve_refuses_a_directory_as_its_socket(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "run").mkdir(mode=0o700)
    assert main(["serve", "--model", "random:tiny", "--socket", str(tmp_path / "run")]) == 2
    one_error_line(capsys, f"--socket {tmp_path / 'run'}: is a directory", "csmd.sock")


def test_a_codec_that_does_not_fit_the_model_is_refused_before_serving(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """random:mimi's 2048 codes per codebook are not random:tiny's 64: audio it encodes would be codes the
    model does not know, so the mismatch is refused at load, not at the first context audio (`internal`)."""
    args = ["say", "Hi.", "-o", str(tmp_path / "o.wav"), "--model", "random:tiny", "--codec", "random:mimi", "--local"]
    assert main(args) == 2
    last = capsys.readouterr().err.splitlines()[-1]  # (after the codec's progress bar)
    assert last.startswith("csmd: error: --codec") and "does not fit the model (4 codebooks of 64)" in last


def test_model_flags_while_a_daemon_answers(daemon: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--model naming another model than the daemon's is an error that says which model speaks."""
    args = ["say", "Hi.", "-o", str(tmp_path / "o.wav"), "--socket", str(daemon)]
    assert main([*args, "--model", "random:csm-1b"]) == 2
    one_error_line(capsys, "--model", "speaks with its own model (random:tiny)", "--local")
    assert main([*args, "--dtype", "bf16"]) == 2
    one_error_line(capsys, "--dtype", "--local")
    assert main([*args, "--kv-cache", "bf16"]) == 2  # the daemon's caches are made by its own setting
    one_error_line(capsys, "--kv-cache", "speaks with its own model", "--local")


def test_socket_without_a_daemon_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stale = tmp_path / "stale.sock"
    import socket

    with socket.socket(socket.AF_UNIX) as s:  # a socket file nobody listens on any more
        s.bind(str(stale))
    for path in (tmp_path / "none.sock", stale):
        assert main(["say", "Hi.", "-o", str(tmp_path / "o.wav"), "--socket", str(path)]) == 2
        one_error_line(capsys, f"--socket {path}: no csmd daemon is listening there")


@pytest.mark.usefixtures("no_loading")
def test_serve_refuses_a_running_daemon_before_loading(daemon: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--model", "random:tiny", "--socket", str(daemon)]) == 2
    one_error_line(capsys, f"already listening on {daemon}")


def test_ctrl_c_stops_say_through_the_daemon(
    daemon: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from csmd.cli import say

    taken: list[int] = []

    def play(self: object, pcm: np.ndarray) -> None:
        taken.append(len(pcm))
        if len(taken) == 2:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(say._Silent, "__call__", play)
    out = tmp_path / "o.wav"
    assert main(["say", "Hello.", "-o", str(out), "--socket", str(daemon), "--seed", "4"]) == 0
    printed = capsys.readouterr()
    assert "ended by Ctrl-C" in printed.out and "Traceback" not in printed.err
    assert sf.info(str(out)).frames == 2 * 1920


# ---- talk ----


class SilentMic:
    def __init__(self, device: object = None) -> None:
        self.start = time.monotonic()
        self.sent = 0
        self.overflows = 0

    def __enter__(self) -> SilentMic:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def read(self) -> np.ndarray:
        due = int((time.monotonic() - self.start) * 24_000)
        n, self.sent = due - self.sent, due
        return np.zeros(n, np.float32)


class QuietSpeaker:
    def __init__(self, device: object = None, prebuffer: int = 0) -> None:
        self.prebuffer, self.played, self.underruns = prebuffer, 0, 0
        self.sounding_since: list[float] = []

    def __enter__(self) -> QuietSpeaker:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def test_ctrl_c_ends_talk_with_its_summary(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A real SIGINT mid-conversation: the summary, exit 0, no exception group."""
    monkeypatch.setattr("csmd.audio.devices.device_info", lambda name, kind: {})
    monkeypatch.setattr("csmd.audio.devices.Microphone", SilentMic)
    monkeypatch.setattr("csmd.audio.devices.Speaker", QuietSpeaker)
    timer = threading.Timer(3.0, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        assert main(["talk", "--model", "random:tiny", "--local"]) == 0
    finally:
        timer.cancel()
    err = capsys.readouterr().err
    assert "listening" in err and "0 turns, 0 barge-ins" in err and "Traceback" not in err


# ---- convert ----


@pytest.mark.parametrize("text", ["4", "8", "backbone=4,decoder=8", "backbone=8,decoder=none"])
def test_convert_random_tiny_speaks_offline(
    text: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from csmd.model.quantization import QuantizationScheme

    scheme = QuantizationScheme.parse(text)
    out = tmp_path / "quantized"
    assert main(["convert", "random:tiny", str(out), "--quantize", text]) == 0
    meta = json.loads((out / "config.json").read_text())
    assert meta["quantization"] == scheme.to_dict()  # {"bits": B, "group_size": 64} for one bits for all
    assert meta["random"] is True and meta["tokenizer"] == "utf8_bytes" and meta["codec"] == {"spec": "random:tiny"}
    # The directory holds exactly the weights of random:tiny in bf16, quantized the same way.
    from mlx.utils import tree_flatten

    from csmd.model.loading import load_model
    from csmd.model.weights import quantize

    expected = load_model("random:tiny", dtype="bfloat16").model
    quantize(expected, scheme)
    loaded = load_model(str(out), dtype="bfloat16")
    assert loaded.random and loaded.codec == "random:tiny"
    ours, theirs = dict(tree_flatten(loaded.model.parameters())), dict(tree_flatten(expected.parameters()))
    assert ours.keys() == theirs.keys()
    for name, value in theirs.items():
        assert ours[name].dtype == value.dtype and mx.array_equal(ours[name], value).item(), name
    _say_offline(out, tmp_path, monkeypatch, capsys)
    # Converting the quantized directory again would write integer levels as weights: refused, nothing written.
    again = tmp_path / "again"
    assert main(["convert", str(out), str(again), "--quantize", "8"]) == 2
    one_error_line(capsys, f"SRC {out}: already quantized ({scheme.describe()})")
    assert not again.exists()


@pytest.mark.usefixtures("no_loading", "no_hub")
@pytest.mark.parametrize("command", [["convert", "random:tiny", "out"], ["bench", "frame", "--model", "random:tiny"]])
@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("16", "expected 4, 8 or backbone=B,decoder=D (B, D each 4, 8 or none), not '16'"),
        ("backbone=4", "'backbone=4' does not say decoder's bits"),
        ("backbone=2,decoder=8", "backbone: expected 4, 8 or none, not '2'"),
        ("backbone=none,decoder=none", "quantizes nothing"),
        ("decoder=4,vocoder=4", "expected 4, 8 or backbone=B,decoder=D"),
    ],
)
def test_a_bad_quantize_value_is_one_line_naming_the_flag(
    command: list[str], value: str, fragment: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    assert main([*command, "--quantize", value]) == 2
    one_error_line(capsys, "argument --quantize", fragment)
    assert not (tmp_path / "out").exists()


def test_convert_random_csm_1b_speaks_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The real shapes, at 4 bits (the README's). One case only: building csm-1b's random weights and quantizing
    them takes about a minute on 2 cores; 8 bits are covered by the tiny model above."""
    from csmd.model.config import CSM_1B

    out = tmp_path / "csm-1b-q4"
    assert main(["convert", "random:csm-1b", str(out), "--quantize", "4"]) == 0
    meta = json.loads((out / "config.json").read_text())
    assert meta["model"] == json.loads(json.dumps(CSM_1B.to_dict())) and meta["codec"] == {"spec": "random:mimi"}
    assert 0.8e9 < (out / "model.safetensors").stat().st_size < 1.0e9  # 4-bit weights, bf16 scales and biases
    _say_offline(out, tmp_path, monkeypatch, capsys)


def _say_offline(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> np.ndarray:
    """`csmd say --model DIR` with the hub out of bounds; returns the audio."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"sent to the HF hub: {args}")

    monkeypatch.setattr("csmd.hub.download", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    wav = tmp_path / "said.wav"
    assert main(["say", "Hello.", "-o", str(wav), "--model", str(model), "--local", "--max-seconds", "0.4",
                 "--seed", "5"]) == 0  # fmt: skip
    capsys.readouterr()
    pcm, _ = sf.read(wav)
    return np.asarray(pcm)


def test_convert_bundles_the_tokenizer_and_codec(
    hf_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An HF checkpoint's codec (codec_model.*) and a tokenizer kept under another name: the directory holds
    both, under the names the loader finds, and speaks as the source did."""
    import shutil

    src = tmp_path / "src"
    shutil.copytree(hf_dir, src)
    (src / "tokenizer.json").rename(src / "tok.json")
    out = tmp_path / "converted"
    assert main(["convert", str(src), str(out), "--dtype", "float32", "--tokenizer", str(src / "tok.json")]) == 0
    assert (out / "tokenizer.json").is_file() and (out / "codec.safetensors").is_file()
    assert json.loads((out / "config.json").read_text())["codec"]["file"] == "codec.safetensors"
    theirs = _say_offline(out, tmp_path, monkeypatch, capsys)
    (src / "tok.json").rename(src / "tokenizer.json")
    ours = _say_offline(src, tmp_path, monkeypatch, capsys)
    np.testing.assert_allclose(theirs, ours, atol=1e-4)  # same weights, same codec (bundled bit-exact)


@pytest.mark.usefixtures("no_loading")
def test_convert_checks_its_arguments_first(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "file").write_text("x")
    assert main(["convert", "random:tiny", str(tmp_path / "file")]) == 2
    one_error_line(capsys, "DIR", "not a directory")
    assert main(["convert", "./missing", str(tmp_path / "out")]) == 2
    one_error_line(capsys, "SRC: ./missing: no such file or directory")


# ---- benches ----


def test_bench_frame_json(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["bench", "frame", "--model", "random:tiny", "--frames", "3", "--warmup", "1", "--prefill", "20"]
    assert main([*args, "--json"]) == 0
    printed = capsys.readouterr()
    result = json.loads(printed.out)
    assert result["frames"] == 3 and result["prefill_rows"] == 20
    assert result["frame_ms"] > 0 and result["backbone_ms"] > 0 and result["decoder_ms"] > 0
    assert result["real_time_factor"] == pytest.approx(result["frame_ms"] / 80, abs=1e-3)
    assert "measuring this machine" in printed.err


@pytest.mark.usefixtures("no_loading")
def test_bench_frame_rejects_a_prefill_beyond_the_window(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "frame", "--model", "random:tiny", "--prefill", "3000"]) == 2
    one_error_line(capsys, "--prefill 3000 + --warmup 3 + --frames 20 = 3023 rows", "(2048 rows)")


def test_bench_codec_json_says_what_it_does(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "codec", "--codec", "random:tiny", "--frames", "3", "--warmup", "1", "--json"]) == 0
    printed = capsys.readouterr()
    result = json.loads(printed.out)
    assert result["frames"] == 3 and result["decode_ms"] > 0 and result["encode_ms"] > 0
    assert result["moshi_decode_ms"] is None
    assert result["bytes_per_frame"] > 0 and result["bandwidth_gbs"] > 0 and result["gemm_gflops"] > 0
    assert result["floor_ms"] > 0 and result["floor_ratio"] == pytest.approx(
        result["decode_ms"] / result["floor_ms"], rel=1e-2, abs=1e-2
    )
    assert "loading the codec random:tiny" in printed.err and "measuring this machine" in printed.err
    assert "1 warm-up + 3 timed frames" in printed.err


def test_bench_codec_batch_compares_batched_and_single_decodes(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["bench", "codec", "--codec", "random:tiny", "--batch", "1,3", "--frames", "2", "--warmup", "1", "--json"]
    assert main(args) == 0
    printed = capsys.readouterr()
    timings = json.loads(printed.out)["timings"]
    assert [t["streams"] for t in timings] == [1, 3]
    for t in timings:
        assert t["alone_ms"] > 0 and t["together_ms"] > 0 and t["speedup"] > 0
    if kernels.native_has("causal_conv_step"):  # batched: the same floats as alone
        assert all(t["max_abs_difference"] == 0 for t in timings)
    assert "1 warm-up + 2 timed frames of 1, 3 streams" in printed.err


def test_bench_codec_batch_refuses_moshi_and_bad_counts(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "codec", "--codec", "random:tiny", "--batch", "2", "--compare-moshi"]) == 2
    one_error_line(capsys, "--compare-moshi times single streams: leave out --batch")
    assert main(["bench", "codec", "--batch", "2,65"]) == 2
    one_error_line(capsys, "argument --batch: expected stream counts from 1 to 64")


# ---- progress ----


def test_slow_loads_show_a_progress_bar_in_bytes(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from csmd import progress
    from csmd.model.loading import load_model

    monkeypatch.setattr(progress, "SHOW_AFTER_SECONDS", 0.0)
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    load_model("random:tiny")
    err = capsys.readouterr().err
    assert "building random:tiny" in err and re.search(r"\d+(\.\d+)?[kM]?B", err), err
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    load_model("random:tiny")
    assert capsys.readouterr().err == ""


# ---- the fast-BLAS preload the commands rely on ----


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


# ---- codecs ----


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


def test_kv_cache_reaches_every_conversation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--kv-cache bf16 (say, serve, talk, bench frame/concurrency) makes each conversation's backbone cache
    bf16, half the bytes of the default fp32 one; `say` still speaks."""
    from csmd.model.generator import Context

    made: list[Context] = []
    init = Context.__init__

    def spy(self: Context, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(Context, "__init__", spy)
    out = tmp_path / "kv.wav"
    args = ["say", "Hello.", "-o", str(out), "--model", "random:tiny", "--local", "--max-seconds", "0.4"]
    assert main([*args, "--kv-cache", "bf16"]) == 0
    assert main(args) == 0
    assert [c.kv_dtype for c in made] == [mx.bfloat16, mx.float32]
    assert made[0]._cache.keys.nbytes * 2 == made[1]._cache.keys.nbytes
    assert sf.info(str(out)).frames % 1920 == 0 and sf.info(str(out)).frames > 0


@pytest.mark.parametrize(
    "command",
    [["serve"], ["say", "Hi.", "-o", "x.wav"], ["talk"], ["bench", "frame"], ["bench", "concurrency"]],
)
def test_a_bad_kv_cache_is_one_line(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*command, "--model", "random:tiny", "--kv-cache", "fp16"]) == 2
    line = one_error_line(capsys, "argument --kv-cache", "'fp16'", "fp32", "bf16")
    assert "Traceback" not in line


def test_codec_bf16_keeps_the_weight_bound_matrices_in_bf16(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--codec-bf16 (say, serve, talk, bench daemon/talk) hands codec_for bf16=True: the codec's transformer
    projections and its first convolutions are stored in bfloat16, and `say` still writes whole frames."""
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
