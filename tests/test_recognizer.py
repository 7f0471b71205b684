"""Transcripts for `csmd talk`: WhisperRecognizer (faster-whisper), TypedRecognizer, and the --asr option.

The Whisper model is built here, offline: a WhisperForConditionalGeneration with tiny dimensions and random
weights, a byte-level tokenizer.json with Whisper's special tokens, converted to CTranslate2. No network (socket
connections fail while it is built and used) and no downloaded weights. Random weights transcribe gibberish, so
these tests check behaviour (a str, the 16 kHz input, the worker thread, errors), not words.

Tests that need faster-whisper skip without it, unless CSMD_REQUIRE_WHISPER=1 (CI), where they must run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import soxr
import trio

from csmd.cli import build_parser, main
from csmd.cli.talk import recognizer_for
from csmd.errors import UserError
from csmd.talk.loop import NoRecognizer as LoopNoRecognizer
from csmd.talk.recognizer import (
    NoRecognizer,
    RecognizerError,
    TypedRecognizer,
    WhisperRecognizer,
    to_whisper_rate,
)
from csmd.talk.terminal import read_stdin_line

RATE = 24_000
needs_whisper = pytest.mark.skipif(
    importlib.util.find_spec("faster_whisper") is None and os.environ.get("CSMD_REQUIRE_WHISPER") != "1",
    reason='faster-whisper not installed (pip install "csmd[whisper]")',
)

# Whisper's special tokens as faster-whisper's Tokenizer and CTranslate2 look them up. The vocabulary is under
# 51865 tokens, so CTranslate2 treats the model as English-only: no language or task tokens are used.
SPECIALS = [
    "<|endoftext|>",
    "<|startoftranscript|>",
    "<|en|>",
    "<|translate|>",
    "<|transcribe|>",
    "<|startoflm|>",
    "<|startofprev|>",
    "<|nospeech|>",
    "<|notimestamps|>",
]
TIMESTAMPS = [f"<|{i * 0.02:.2f}|>" for i in range(1501)]  # right after <|notimestamps|>, 0.00 to 30.00 s


def _refuse(*args: object, **kwargs: object) -> None:
    raise OSError("no network in these tests")


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket.socket, "connect", _refuse)


def build_tiny_whisper(folder: Path) -> Path:
    """A random tiny Whisper in CTranslate2 format, with its tokenizer.json (so faster-whisper never fetches one)."""
    import ctranslate2
    import torch
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    hf, out = folder / "hf", folder / "ct2"
    hf.mkdir()
    # Byte-level BPE over the 256 byte symbols and no merges: any text encodes (faster-whisper encodes " -" and
    # " '" to find tokens to suppress), and any token sequence decodes.
    byte_symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={b: i for i, b in enumerate(byte_symbols)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in SPECIALS + TIMESTAMPS])
    tokenizer.save(str(hf / "tokenizer.json"))
    # The converter reads the vocabulary through AutoTokenizer: a plain fast tokenizer over tokenizer.json.
    (hf / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))

    eot, sot = SPECIALS.index("<|endoftext|>") + 256, SPECIALS.index("<|startoftranscript|>") + 256
    assert (tokenizer.token_to_id("<|endoftext|>"), tokenizer.token_to_id("<|startoftranscript|>")) == (eot, sot)
    config = WhisperConfig(
        vocab_size=tokenizer.get_vocab_size(),
        num_mel_bins=80,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_source_positions=1500,  # 30 s windows of 10 ms mel frames, halved by the conv stem: fixed by Whisper
        max_target_positions=448,  # faster-whisper's max_length
        pad_token_id=eot,
        bos_token_id=eot,
        eos_token_id=eot,
        decoder_start_token_id=sot,
        suppress_tokens=[],
        begin_suppress_tokens=[eot],  # the defaults name ids of the real 51865-token vocabulary
    )
    torch.manual_seed(0)
    WhisperForConditionalGeneration(config).save_pretrained(hf)
    ctranslate2.converters.TransformersConverter(str(hf), copy_files=["tokenizer.json"]).convert(str(out))
    return out


@pytest.fixture(scope="module")
def tiny_whisper(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", _refuse)
        yield build_tiny_whisper(tmp_path_factory.mktemp("whisper"))


@pytest.fixture(scope="module")
def recognizer(tiny_whisper: Path) -> WhisperRecognizer:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", _refuse)
        return WhisperRecognizer(str(tiny_whisper), language="en")


def speech(folder: Path) -> np.ndarray:
    """A spoken sentence at 24 kHz from espeak-ng, or two seconds of a 220 Hz tone when espeak-ng is missing."""
    if shutil.which("espeak-ng") is None:
        return (0.3 * np.sin(2 * np.pi * 220 * np.arange(2 * RATE) / RATE)).astype(np.float32)
    path = folder / "speech.wav"
    text = "Hello, could you tell me the weather for tomorrow?"
    subprocess.run(["espeak-ng", "-w", str(path), text], check=True, capture_output=True, timeout=60)
    pcm, rate = sf.read(path, dtype="float32")
    return np.asarray(soxr.resample(pcm, rate, RATE), dtype=np.float32)


class Spy:
    """Passes transcribe() through to the real model, noting the thread and the audio it ran with."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.calls: list[tuple[int, np.ndarray]] = []

    def transcribe(self, audio: np.ndarray, **options: Any) -> Any:
        self.calls.append((threading.get_ident(), audio))
        return self.model.transcribe(audio, **options)


# -- Whisper ------------------------------------------------------------------------------------------------


@needs_whisper
@pytest.mark.usefixtures("no_network")
async def test_whisper_transcribes_speech_in_a_worker_thread_at_16_khz(
    recognizer: WhisperRecognizer, tiny_whisper: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its own tokenizer.json was used, not one from the Hub (Whisper's has 51864+ tokens).
    assert (tiny_whisper / "tokenizer.json").is_file()
    assert recognizer.model.hf_tokenizer.get_vocab_size() == len(SPECIALS) + len(TIMESTAMPS) + 256
    spy = Spy(recognizer.model)
    monkeypatch.setattr(recognizer, "model", spy)
    pcm = speech(tmp_path)

    text = await recognizer.transcribe(pcm)

    assert isinstance(text, str) and text == text.strip()  # gibberish from random weights, but a clean str
    [(thread, audio)] = spy.calls
    assert thread != threading.get_ident()  # not on trio's thread: the loop kept running
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(audio.size - pcm.size * 2 / 3) <= 1


@needs_whisper
@pytest.mark.usefixtures("no_network")
async def test_whisper_transcribes_a_tone_and_skips_empty_audio(
    recognizer: WhisperRecognizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(RATE) / RATE)).astype(np.float32)
    assert isinstance(await recognizer.transcribe(tone), str)

    spy = Spy(recognizer.model)
    monkeypatch.setattr(recognizer, "model", spy)
    assert await recognizer.transcribe(np.zeros(0, np.float32)) == ""
    assert spy.calls == []  # no model run for nothing


@needs_whisper
async def test_whisper_runs_one_transcription_at_a_time(
    recognizer: WhisperRecognizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    running, most = 0, 0

    class Slow:
        def transcribe(self, audio: np.ndarray, **options: Any) -> tuple[list[Any], None]:
            nonlocal running, most
            running += 1
            most = max(most, running)
            time.sleep(0.05)
            running -= 1
            return [], None

    monkeypatch.setattr(recognizer, "model", Slow())
    results: list[str] = []

    async def one() -> None:
        results.append(await recognizer.transcribe(np.ones(RATE // 10, np.float32)))

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(one)
    assert results == ["", "", ""] and most == 1


def test_whisper_without_the_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "faster_whisper", None)  # makes `import faster_whisper` fail
    with pytest.raises(RecognizerError, match=r'pip install "csmd\[whisper\]"'):
        WhisperRecognizer("base.en")


def test_resampling_to_16_khz() -> None:
    pcm = np.sin(np.arange(RATE * 3) / 7).astype(np.float32)
    out = to_whisper_rate(pcm)
    assert out.dtype == np.float32 and out.size == 2 * RATE
    assert to_whisper_rate(np.zeros(0, np.float32)).size == 0


# -- typed and none -----------------------------------------------------------------------------------------


async def test_typed_recognizer_reads_a_line_after_each_turn() -> None:
    lines = iter(["  what is the time?  \n", "", "thanks"])
    prompts: list[str] = []

    async def read_line(prompt: str) -> str:
        prompts.append(prompt)
        await trio.lowlevel.checkpoint()
        return next(lines)

    typed = TypedRecognizer(read_line, prompt="you> ")
    pcm = np.zeros(RATE, np.float32)
    assert [await typed.transcribe(pcm) for _ in range(3)] == ["what is the time?", "", "thanks"]
    assert prompts == ["you> "] * 3


async def test_stdin_lines_are_read_in_a_thread_and_end_of_input_is_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    threads: list[int] = []

    def fake_input(prompt: str) -> str:
        threads.append(threading.get_ident())
        if len(threads) > 1:
            raise EOFError
        return f"typed after {prompt}"

    monkeypatch.setattr("builtins.input", fake_input)
    assert await read_stdin_line("> ") == "typed after > "
    assert await read_stdin_line("> ") == ""
    assert threading.get_ident() not in threads


async def test_no_recognizer_gives_an_empty_transcript() -> None:
    assert LoopNoRecognizer is NoRecognizer  # loop.py still offers it
    assert await NoRecognizer().transcribe(np.ones(RATE, np.float32)) == ""


# -- csmd talk --asr ----------------------------------------------------------------------------------------


def test_asr_option_parses_kinds_and_models() -> None:
    parse = build_parser().parse_args
    assert parse(["talk"]).asr == "none" and parse(["talk"]).asr_language is None
    assert parse(["talk", "--asr", "typed"]).asr == "typed"
    args = parse(["talk", "--asr", "whisper:small.en", "--asr-language", "en"])
    assert (args.asr, args.asr_language) == ("whisper:small.en", "en")
    assert parse(["talk", "--asr", "whisper:C:/models/whisper"]).asr == "whisper:C:/models/whisper"
    for bad in ("bogus", "whisper:", "typed:x", "none:base"):
        with pytest.raises(SystemExit):
            parse(["talk", "--asr", bad])


def test_asr_option_builds_therecognizer_for(monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(recognizer_for("none", None), NoRecognizer)
    assert isinstance(recognizer_for("typed", None), TypedRecognizer)
    with pytest.raises(UserError, match="only knows English"):
        recognizer_for("whisper:small.en", "de")
    made: list[tuple[str, str | None]] = []

    class Fake:
        def __init__(self, model: str, *, language: str | None) -> None:
            made.append((model, language))

    monkeypatch.setattr("csmd.talk.recognizer.WhisperRecognizer", Fake)
    recognizer_for("whisper", None)
    recognizer_for("whisper", "de")
    recognizer_for("whisper:large-v3", "fr")
    assert made == [("base.en", None), ("base", "de"), ("large-v3", "fr")]


@needs_whisper
@pytest.mark.usefixtures("no_network")
def test_asr_option_loads_a_local_whisper_directory(tiny_whisper: Path) -> None:
    assert isinstance(recognizer_for(f"whisper:{tiny_whisper}", "en"), WhisperRecognizer)


def test_talk_without_the_whisper_extra_fails_before_loading_anything(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "faster_whisper", None)
    monkeypatch.setattr("csmd.audio.devices.device_info", lambda name, kind: {})  # as if the devices were there
    assert main(["talk", "--asr", "whisper", "--model", "no-such-model"]) == 2
    assert 'pip install "csmd[whisper]"' in capsys.readouterr().err
