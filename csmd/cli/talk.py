"""`csmd talk`: a live conversation, microphone in, speaker out, in this process or through a daemon.

The devices, the --voice recording, the recognizer and a daemon on --socket are checked before the model
loads. Ctrl-C ends the conversation: its summary is printed and the exit status is 0 (130 when it came
before the conversation had started).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from csmd.cli import checks
from csmd.cli.errors import flagged
from csmd.cli.interrupt import INTERRUPTED, until_ctrl_c
from csmd.cli.options import model_spec
from csmd.cli.runtime import apply_runtime
from csmd.cli.say import generation_params
from csmd.cli.voice import Voice, load_voice, note_random
from csmd.errors import UserError

if TYPE_CHECKING:
    from csmd.speak import ContextClip
    from csmd.talk.engine import Engine
    from csmd.talk.loop import TalkConfig
    from csmd.talk.recognizer import Recognizer
    from csmd.talk.responder import Responder

ASR_KINDS = ("none", "typed", "whisper")


def asr_spec(value: str) -> str:
    """--asr: none, typed, whisper or whisper:MODEL (a faster-whisper size name or a CTranslate2 directory)."""
    kind, colon, model = value.partition(":")
    if kind not in ASR_KINDS or (colon and (kind != "whisper" or not model)):
        raise argparse.ArgumentTypeError(f"expected none, typed, whisper or whisper:MODEL, not {value!r}")
    return value


def recognizer_for(spec: str, language: str | None) -> Recognizer:
    from csmd.talk.recognizer import NoRecognizer, TypedRecognizer, WhisperRecognizer

    kind, _, model = spec.partition(":")
    if kind == "typed":
        return TypedRecognizer()
    if kind != "whisper":
        return NoRecognizer()
    english = language in (None, "en")
    # English-only models are smaller for the same accuracy in English; other languages need a multilingual one.
    model = model or ("base.en" if english else "base")
    if model.endswith(".en") and not english:
        raise UserError(
            f"--asr: Whisper {model} only knows English; pick a multilingual model for --asr-language {language}"
        )
    print(f"csmd: loading Whisper {model} (the first use of a size name downloads it)", file=sys.stderr)
    with flagged("--asr"):
        return WhisperRecognizer(model, language=language)


def cmd_talk(args: argparse.Namespace) -> int:
    import trio

    from csmd.talk.loop import TalkConfig
    from csmd.talk.responder import OpenAIChatResponder, TypedResponder
    from csmd.talk.turns import TurnConfig

    if bool(args.voice) != bool(args.voice_text):
        raise UserError("--voice and --voice-text go together")
    checks.sound_device(args.input_device, "input", "--input-device")
    checks.sound_device(args.output_device, "output", "--output-device")
    turns = TurnConfig(min_speech=args.min_speech, end_silence=args.end_silence, echo_guard=args.echo_guard)
    config = TalkConfig(params=generation_params(args), turns=turns)
    voice_clip = (
        checks.read_clip(args.voice, args.voice_text, config.assistant_speaker, "--voice") if args.voice else None
    )
    responder: Responder = (
        OpenAIChatResponder(args.llm, args.llm_model, api_key=args.api_key or os.environ.get("OPENAI_API_KEY"))
        if args.llm
        else TypedResponder()
    )
    recognizer = recognizer_for(args.asr, args.asr_language)  # before the model: a missing extra fails at once
    daemon = checks.daemon_for(args)
    started: list[bool] = []  # set once the conversation listens: Ctrl-C after that is its normal end
    if daemon is not None:
        checks.model_flags_for(daemon, args)

        async def conversation() -> None:
            await _through_daemon(args, config, responder, recognizer, daemon.path, voice_clip, started)

    else:
        spec = model_spec(args)
        checks.model_argument(spec)
        checks.codec_argument(args.codec)
        tokenizer = checks.tokenizer_file(args.tokenizer)
        # A reply sentence of --max-seconds beside the pinned voice must fit the window, however long the talk.
        reply = checks.Reply("", config.assistant_speaker, config.params.max_frames, args.max_seconds,
                             (voice_clip,) if voice_clip else (), "--voice")  # fmt: skip
        checks.window_before_loading(args, tokenizer, reply)
        apply_runtime(args)
        voice = load_voice(args, tokenizer)
        checks.fits_window(voice.loaded.model.config, voice.loaded.tokenizer, reply, spec)

        async def conversation() -> None:
            await _in_process(args, config, responder, recognizer, voice, voice_clip, started)

    interrupted = trio.run(until_ctrl_c, conversation)
    if interrupted and not started:
        print("csmd: interrupted before the conversation started", file=sys.stderr)
        return INTERRUPTED
    return 0


async def _in_process(
    args: argparse.Namespace, config: TalkConfig, responder: Responder, recognizer: Recognizer, voice: Voice,
    clip: ContextClip | None, started: list[bool],
) -> None:  # fmt: skip
    from csmd.daemon.worker import ModelWorker
    from csmd.speak import add_context
    from csmd.talk.engine import LocalEngine

    worker = ModelWorker()
    try:
        context = await worker.run(voice.generator.new_context)
        if clip is not None:  # pinned: the voice stays the same however long the talk
            await worker.run(lambda: add_context(context, voice.mimi, clip))
        engine = LocalEngine(voice.generator, context, voice.mimi, worker)
        await _converse(args, config, responder, recognizer, engine, started)
    finally:
        worker.close()


async def _through_daemon(
    args: argparse.Namespace, config: TalkConfig, responder: Responder, recognizer: Recognizer, path: Path,
    clip: ContextClip | None, started: list[bool],
) -> None:  # fmt: skip
    from csmd.protocol import trio_client
    from csmd.protocol.errors import ConnectionLost, RequestError
    from csmd.talk.engine import DaemonEngine

    try:
        async with trio_client.open_client(path, client="csmd talk") as client:
            model = client.welcome.model
            print(f"csmd: talking through the daemon on {path} (model {model})", file=sys.stderr)
            if model.startswith("random:"):
                note_random(model)
            session = f"talk-{os.getpid()}"
            await client.open_session(session)
            if clip is not None:
                await client.add_context(session, clip.speaker, clip.text, clip.pcm, pinned=True)
            await _converse(args, config, responder, recognizer, DaemonEngine(client, session), started)
    except (RequestError, ConnectionLost) as exc:
        raise UserError(f"the daemon on {path}: {exc}") from exc


async def _converse(
    args: argparse.Namespace, config: TalkConfig, responder: Responder, recognizer: Recognizer, engine: Engine,
    started: list[bool],
) -> None:  # fmt: skip
    from csmd.audio.devices import Microphone, Speaker
    from csmd.audio.vad import VoiceActivityDetector
    from csmd.talk.loop import Conversation

    def show(who: str, text: str) -> None:
        print(f"{who:>9}: {text or '(speech)'}", flush=True)

    with flagged("--input-device"):
        mic = Microphone(args.input_device)
    with flagged("--output-device"):
        speaker = Speaker(args.output_device)
    with mic, speaker:
        vad = VoiceActivityDetector()
        talk = Conversation(engine, mic, speaker, vad, responder, recognizer, config=config, on_text=show)
        print("listening; speak, then pause. Ctrl-C ends the conversation.", file=sys.stderr)
        started.append(True)
        try:
            await talk.run()
        finally:
            s = talk.stats
            first = f"{1000 * statistics.mean(s.first_audio_after_turn):.0f} ms" if s.first_audio_after_turn else "-"
            print(f"{s.turns} turns, {s.barge_ins} barge-ins, first reply audio after {first} on average, "
                  f"{speaker.underruns} playback underruns", file=sys.stderr)  # fmt: skip
