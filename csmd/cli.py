"""The `csmd` command."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from csmd import __version__, environment, runtime

if TYPE_CHECKING:
    from csmd.model.sampling import GenerationParams
    from csmd.talk.engine import Engine
    from csmd.talk.loop import TalkConfig
    from csmd.talk.recognizer import Recognizer
    from csmd.talk.responder import Responder


def _runtime_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("runtime")
    group.add_argument("--device", default="auto", choices=runtime.DEVICES, help="where MLX runs (default: auto)")
    group.add_argument("--memory-limit", type=float, metavar="GB", help="MLX memory limit in GB")
    group.add_argument("--cache-limit", type=float, metavar="GB", help="MLX buffer cache limit in GB")
    return parent


def _model_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("model")
    group.add_argument(
        "--model",
        default="sesame/csm-1b",
        help="a local checkpoint (file or directory), an HF repo id, or random:<preset> (csm-1b, tiny). "
        "Random weights have the real shapes and speed but do not speak.",
    )
    group.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (default: float32)")
    group.add_argument("--tokenizer", help="tokenizer.json or SentencePiece .model (default: beside the weights)")
    return parent


def _add_codec_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--codec", help="Mimi weights (default: bundled with the model, else kyutai's release)")
    parser.add_argument(
        "--codec-bf16",
        action="store_true",
        help="keep the codec's weight-bound matrices in bfloat16: half the bytes each decoded frame reads "
        "(about 0.3%% off fp32 audio; see README)",
    )


def _apply_runtime(args: argparse.Namespace) -> None:
    runtime.apply(runtime.RuntimeSettings(args.device, args.memory_limit, args.cache_limit))


def cmd_info(args: argparse.Namespace) -> int:
    from csmd.model.loading import parse_dtype

    _apply_runtime(args)
    info = runtime.describe()
    info["dtype"] = str(parse_dtype(args.dtype)).removeprefix("mlx.core.")  # validated like a model load's
    for key, value in info.items():
        print(f"{key:18} {value}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from tqdm import tqdm

    from csmd.model.loading import load_model
    from csmd.model.weights import quantize, save_csmd

    _apply_runtime(args)
    loaded = load_model(args.src, dtype=args.dtype, tokenizer=args.tokenizer)
    quantization = None
    if args.quantize:
        quantization = {"bits": args.quantize, "group_size": 64}
        quantize(loaded.model, **quantization)
    tensors = tree_flatten(loaded.model.parameters())
    for _, array in tqdm(tensors, desc="converting", unit="tensor"):
        mx.eval(array)
    dst = Path(args.dst)
    save_csmd(loaded.model, dst, quantization)
    tokenizer_file = _tokenizer_file(args.tokenizer, Path(args.src))
    if tokenizer_file is not None:
        shutil.copy(tokenizer_file, dst / tokenizer_file.name)
    print(f"wrote {dst / 'model.safetensors'} and {dst / 'config.json'}", end="")
    print(f" (+ {tokenizer_file.name})" if tokenizer_file else " (no tokenizer found; pass --tokenizer to include one)")
    return 0


def _tokenizer_file(explicit: str | None, src: Path) -> Path | None:
    if explicit:
        path = Path(explicit)
        return path / "tokenizer.json" if path.is_dir() else path
    directory = src if src.is_dir() else src.parent
    for name in ("tokenizer.json", "tokenizer.model"):
        if (directory / name).is_file():
            return directory / name
    return None


def cmd_bench_frame(args: argparse.Namespace) -> int:
    from csmd.bench.frame import add_comparison, format_result, run
    from csmd.model.loading import load_model

    _apply_runtime(args)
    loaded = load_model(args.model, dtype=args.dtype, tokenizer=args.tokenizer)
    name = args.model
    if args.quantize:
        from csmd.model.weights import quantize

        quantize(loaded.model, args.quantize)
        name += f" (q{args.quantize})"
    result = run(
        loaded.model,
        name,
        frames=args.frames,
        warmup=args.warmup,
        prefill_rows=args.prefill,
        prefill_repeats=args.prefill_repeats,
    )
    if args.compare_transformers:
        from csmd.bench import transformers_frame

        # The same shapes and frame counts; a quantized model is compared with transformers at its float dtype.
        cfg = loaded.model.config
        del loaded  # the torch copy needs the memory more than csmd's, whose run is over
        theirs = transformers_frame.run(
            cfg,
            result.dtype,
            frames=args.frames,
            warmup=args.warmup,
            prefill_rows=args.prefill,
            prefill_repeats=args.prefill_repeats,
        )
        add_comparison(result, theirs)
    print(json.dumps(result.as_dict()) if args.json else format_result(result))
    return 0


def _sampling_options() -> argparse.ArgumentParser:
    from csmd.model.sampling import GenerationParams

    d = GenerationParams()
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("sampling")
    group.add_argument("--temperature", type=float, default=d.temperature, help="0 = greedy (default: %(default)s)")
    group.add_argument("--top-k", type=int, default=d.top_k, help="0 = off (default: %(default)s)")
    group.add_argument("--top-p", type=float, default=d.top_p, help="1 = off (default: %(default)s)")
    group.add_argument("--min-p", type=float, default=d.min_p, help="0 = off (default: %(default)s)")
    group.add_argument(
        "--max-seconds", type=float, default=d.max_frames * 0.08, help="longest reply (default: %(default)s)"
    )
    group.add_argument("--seed", type=int, help="makes the reply reproducible")
    return parent


def _params(args: argparse.Namespace) -> GenerationParams:
    from csmd.model.sampling import FRAME_MS, GenerationParams

    return GenerationParams(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        max_frames=max(1, round(args.max_seconds * 1000 / FRAME_MS)),
        seed=args.seed,
    ).validate()


def cmd_say(args: argparse.Namespace) -> int:
    from csmd.daemon.server import default_socket_path

    if len(args.context) != len(args.context_text):
        raise ValueError("give one --context-text for each --context file")
    if not args.output and not args.play:
        raise ValueError("say where the audio goes: -o FILE, --play, or both")
    socket_path = Path(args.socket) if args.socket else default_socket_path()
    if not args.local and socket_path.is_socket():
        try:
            return _say_via_daemon(args, socket_path)
        except ConnectionRefusedError:
            pass  # a stale socket file: nobody is listening, so speak in-process
    return _say_in_process(args)


def _say_via_daemon(args: argparse.Namespace, socket_path: Path) -> int:
    from csmd.audio import io
    from csmd.protocol.blocking_client import connect

    with connect(socket_path, client="csmd say") as client:
        print(f"csmd: speaking through the daemon on {socket_path} (model {client.welcome.model})", file=sys.stderr)
        session = f"say-{os.getpid()}"
        client.open_session(session)
        speakers = args.context_speaker or [args.speaker] * len(args.context)
        for audio, text, speaker in zip(args.context, args.context_text, speakers, strict=True):
            pcm = io.read_audio(audio)
            client.add_context(session, speaker, text, pcm, rate=io.SAMPLE_RATE, pinned=True)
        p = _params(args)
        speech = client.speak(session, args.text, args.speaker, temperature=p.temperature, top_k=p.top_k,
                              top_p=p.top_p, min_p=p.min_p, seed=p.seed, max_frames=p.max_frames)  # fmt: skip
        with _player(args) as play:
            chunks = []
            for chunk in speech:
                play(chunk.pcm)
                chunks.append(chunk.pcm)
        end = speech.end
        assert end is not None
        start = speech.audio_start
        pcm = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
        _report(args, pcm, end.frames, end.reason, start.seed if start else None, end.first_audio_ms / 1000
                if end.first_audio_ms is not None else 0.0, end.total_ms / 1000)  # fmt: skip
    return 0


def _say_in_process(args: argparse.Namespace) -> int:
    from csmd.model.generator import Generator
    from csmd.model.loading import load_model
    from csmd.speak import ContextClip, add_context, codec_for, speak

    _apply_runtime(args)
    runtime.announce()
    params = _params(args)
    loaded = load_model(args.model, dtype=args.dtype, tokenizer=args.tokenizer)
    if loaded.random:
        print("note: random weights do not speak; expect noise", file=sys.stderr)
    mimi = codec_for(loaded, args.codec, bf16=args.codec_bf16)
    generator = Generator(loaded.model, loaded.tokenizer)
    context = generator.new_context()
    speakers = args.context_speaker or [args.speaker] * len(args.context)
    for audio, text, speaker in zip(args.context, args.context_text, speakers, strict=True):
        add_context(context, mimi, ContextClip(Path(audio), text, speaker))
    with _player(args) as play:
        result = speak(generator, context, mimi, args.text, args.speaker, params, on_audio=play)
    _report(args, result.pcm, result.frames, result.finish_reason, result.seed, result.seconds_to_first_audio,
            result.seconds_total)  # fmt: skip
    return 0


def _player(args: argparse.Namespace) -> contextlib.AbstractContextManager[Callable[[np.ndarray], None]]:
    """Plays chunks on the speaker as they come with --play; otherwise a no-op."""
    if not args.play:
        return contextlib.nullcontext(lambda pcm: None)
    from csmd.audio.devices import Speaker

    return Speaker(device=args.output_device)


def _report(
    args: argparse.Namespace, pcm: np.ndarray, frames: int, reason: str, seed: int | None, first: float, total: float
) -> None:
    from csmd.audio import io

    if frames == 0:
        raise RuntimeError("the model ended the reply before its first frame; there is no audio")
    where = []
    if args.output:
        io.write_audio(args.output, pcm)
        where.append(f"wrote {args.output}")
    if args.play:
        where.append("played")
    print(
        f"{' and '.join(where)}: {len(pcm) / io.SAMPLE_RATE:.2f} s ({frames} frames, ended by {reason}, "
        f"seed {seed}); first audio after {first:.2f} s, total {total:.2f} s"
    )


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    import trio

    from csmd.daemon.server import Daemon, default_socket_path, serve_until_signal
    from csmd.model.generator import Generator
    from csmd.model.loading import load_model
    from csmd.speak import codec_for

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    _apply_runtime(args)
    runtime.announce()
    loaded = load_model(args.model, dtype=args.dtype, tokenizer=args.tokenizer)
    if loaded.random:
        print("note: random weights do not speak; replies will be noise", file=sys.stderr)
    mimi = codec_for(loaded, args.codec, bf16=args.codec_bf16)
    daemon = Daemon(Generator(loaded.model, loaded.tokenizer), mimi, args.model, args.max_sessions)
    path = Path(args.socket) if args.socket else default_socket_path()
    trio.run(serve_until_signal, daemon, path, lambda p: print(f"csmd: serving {args.model} on {p}", flush=True))
    return 0


def cmd_bench_daemon(args: argparse.Namespace) -> int:
    from csmd.bench.daemon import format_result, run
    from csmd.model.generator import Generator
    from csmd.model.loading import load_model
    from csmd.speak import codec_for

    _apply_runtime(args)
    loaded = load_model(args.model, dtype=args.dtype, tokenizer=args.tokenizer)
    generator = Generator(loaded.model, loaded.tokenizer)
    mimi = codec_for(loaded, args.codec, bf16=args.codec_bf16)
    result = run(generator, mimi, args.model, frames=args.frames, runs=args.runs)
    print(json.dumps(result.as_dict()) if args.json else format_result(result))
    return 0


def cmd_talk(args: argparse.Namespace) -> int:
    import trio

    from csmd.daemon.server import default_socket_path
    from csmd.talk.loop import TalkConfig
    from csmd.talk.responder import OpenAIChatResponder, TypedResponder
    from csmd.talk.turns import TurnConfig

    _apply_runtime(args)
    if bool(args.voice) != bool(args.voice_text):
        raise ValueError("--voice and --voice-text go together")
    turns = TurnConfig(min_speech=args.min_speech, end_silence=args.end_silence, echo_guard=args.echo_guard)
    config = TalkConfig(params=_params(args), turns=turns)
    responder: Responder = (
        OpenAIChatResponder(args.llm, args.llm_model, api_key=args.api_key or os.environ.get("OPENAI_API_KEY"))
        if args.llm
        else TypedResponder()
    )
    recognizer = _recognizer(args.asr, args.asr_language)  # before the model: a missing extra fails at once
    socket_path = Path(args.socket) if args.socket else default_socket_path()
    use_daemon = not args.local and socket_path.is_socket()
    talk = _talk_via_daemon if use_daemon else _talk_in_process
    try:
        trio.run(talk, args, config, responder, recognizer, socket_path)
    except KeyboardInterrupt:
        print("\nbye", file=sys.stderr)
    return 0


ASR_KINDS = ("none", "typed", "whisper")


def _asr_spec(value: str) -> str:
    """--asr: none, typed, whisper or whisper:MODEL (a faster-whisper size name or a CTranslate2 directory)."""
    kind, colon, model = value.partition(":")
    if kind not in ASR_KINDS or (colon and (kind != "whisper" or not model)):
        raise argparse.ArgumentTypeError(f"expected none, typed, whisper or whisper:MODEL, not {value!r}")
    return value


def _recognizer(spec: str, language: str | None) -> Recognizer:
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
        raise ValueError(f"Whisper {model} only knows English; pick a multilingual model for --asr-language {language}")
    print(f"csmd: loading Whisper {model} (the first use of a size name downloads it)", file=sys.stderr)
    return WhisperRecognizer(model, language=language)


async def _talk_in_process(
    args: argparse.Namespace, config: TalkConfig, responder: Responder, recognizer: Recognizer, _: Path
) -> None:
    from csmd.daemon.worker import ModelWorker
    from csmd.model.generator import Generator
    from csmd.model.loading import load_model
    from csmd.speak import ContextClip, add_context, codec_for
    from csmd.talk.engine import LocalEngine

    runtime.announce()
    loaded = load_model(args.model, dtype=args.dtype, tokenizer=args.tokenizer)
    if loaded.random:
        print("note: random weights do not speak; replies will be noise", file=sys.stderr)
    mimi = codec_for(loaded, args.codec, bf16=args.codec_bf16)
    generator = Generator(loaded.model, loaded.tokenizer)
    worker = ModelWorker()
    try:
        context = await worker.run(generator.new_context)
        if args.voice:  # pinned: the voice stays the same however long the talk
            clip = ContextClip(Path(args.voice), args.voice_text, config.assistant_speaker)
            await worker.run(lambda: add_context(context, mimi, clip))
        await _converse(args, config, responder, recognizer, LocalEngine(generator, context, mimi, worker))
    finally:
        worker.close()


async def _talk_via_daemon(
    args: argparse.Namespace, config: TalkConfig, responder: Responder, recognizer: Recognizer, path: Path
) -> None:
    from csmd.audio import io
    from csmd.protocol import trio_client
    from csmd.talk.engine import DaemonEngine

    async with await trio_client.connect(path, client="csmd talk") as client:
        print(f"csmd: talking through the daemon on {path} (model {client.welcome.model})", file=sys.stderr)
        session = f"talk-{os.getpid()}"
        await client.open_session(session)
        if args.voice:
            pcm = io.read_audio(args.voice)
            await client.add_context(session, config.assistant_speaker, args.voice_text, pcm, pinned=True)
        await _converse(args, config, responder, recognizer, DaemonEngine(client, session))


async def _converse(
    args: argparse.Namespace, config: TalkConfig, responder: Responder, recognizer: Recognizer, engine: Engine
) -> None:
    from csmd.audio.devices import Microphone, Speaker
    from csmd.audio.vad import VoiceActivityDetector
    from csmd.talk.loop import Conversation

    def show(who: str, text: str) -> None:
        print(f"{who:>9}: {text or '(speech)'}", flush=True)

    with Microphone(args.input_device) as mic, Speaker(args.output_device) as speaker:
        vad = VoiceActivityDetector()
        talk = Conversation(engine, mic, speaker, vad, responder, recognizer, config=config, on_text=show)
        print("listening; speak, then pause. Ctrl-C ends the conversation.", file=sys.stderr)
        try:
            await talk.run()
        finally:
            s = talk.stats
            first = f"{1000 * statistics.mean(s.first_audio_after_turn):.0f} ms" if s.first_audio_after_turn else "-"
            print(f"{s.turns} turns, {s.barge_ins} barge-ins, first reply audio after {first} on average, "
                  f"{speaker.underruns} playback underruns", file=sys.stderr)  # fmt: skip


def cmd_devices(args: argparse.Namespace) -> int:
    from csmd.audio.devices import list_devices

    devices = list_devices()
    if not devices:
        print("no sound devices (is a sound server running, or PortAudio's backend missing?)")
    for d in devices:
        marks = ("<in " if d.default_input else "") + ("out>" if d.default_output else "")
        print(
            f"{d.index:3} {d.name:40.40} {d.host_api:28.28} in {d.inputs:2} out {d.outputs:2} "
            f"{d.default_rate:7.0f} Hz {marks}"
        )
    return 0


def cmd_bench_talk(args: argparse.Namespace) -> int:
    from csmd.bench.talk import format_result, run
    from csmd.model.generator import Generator
    from csmd.model.loading import load_model
    from csmd.speak import codec_for

    _apply_runtime(args)
    loaded = load_model(args.model, dtype=args.dtype, tokenizer=args.tokenizer)
    generator = Generator(loaded.model, loaded.tokenizer)
    mimi = codec_for(loaded, args.codec, bf16=args.codec_bf16)
    result = run(generator, mimi, args.model, args.rounds, args.user_device, args.csmd_device)
    print(json.dumps(result.as_dict()) if args.json else format_result(result))
    return 0


def cmd_bench_codec(args: argparse.Namespace) -> int:
    from csmd.audio.mimi.loading import load_mimi
    from csmd.bench.codec import format_result, run

    _apply_runtime(args)
    mimi = load_mimi(args.codec)
    if args.bf16:
        mimi.use_bf16_weights()
    name = args.codec + (" (bf16 weights)" if args.bf16 else "")
    result = run(mimi, name, frames=args.frames, warmup=args.warmup, compare_moshi=args.compare_moshi)
    print(json.dumps(result.as_dict()) if args.json else format_result(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="csmd", description="Local real-time voice conversation with CSM-1B")
    parser.add_argument("--version", action="version", version=f"csmd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    run_opts, model_opts = _runtime_options(), _model_options()

    info = commands.add_parser("info", parents=[run_opts], help="device, backend, BLAS and memory settings")
    info.add_argument("--dtype", default="float32", help="model dtype to check and report (default: float32)")
    info.set_defaults(func=cmd_info)

    convert = commands.add_parser(
        "convert", parents=[run_opts], help="write a checkpoint as csmd safetensors (+ config.json)"
    )
    convert.add_argument("src", help="Sesame or HF checkpoint: file, directory or HF repo id")
    convert.add_argument("dst", help="output directory")
    convert.add_argument("--quantize", type=int, choices=(4, 8), help="quantize linear and embedding weights")
    convert.add_argument("--dtype", default="bfloat16", help="dtype of the float weights (default: bfloat16)")
    convert.add_argument("--tokenizer", help="tokenizer file to bundle (default: the one beside SRC)")
    convert.set_defaults(func=cmd_convert)

    talk = commands.add_parser(
        "talk",
        parents=[run_opts, model_opts, _sampling_options()],
        help="a live conversation: microphone in, speaker out",
    )
    talk.add_argument(
        "--llm", metavar="URL", help="OpenAI-compatible chat endpoint for replies (e.g. http://127.0.0.1:8080/v1)"
    )
    talk.add_argument("--llm-model", default="default", help="model name sent to the endpoint")
    talk.add_argument("--api-key", help="bearer token for the endpoint (default: $OPENAI_API_KEY)")
    talk.add_argument("--voice", metavar="AUDIO", help="a recording of the voice csmd should keep")
    talk.add_argument("--voice-text", help="what the --voice recording says")
    talk.add_argument("--input-device", help="microphone name or index (see csmd devices)")
    talk.add_argument("--output-device", help="speaker name or index (see csmd devices)")
    talk.add_argument("--min-speech", type=float, default=0.25, help="seconds of speech that make a turn")
    talk.add_argument("--end-silence", type=float, default=0.7, help="seconds of silence that end a turn")
    talk.add_argument("--echo-guard", action="store_true", help="ignore the microphone while csmd talks (no AEC)")
    _add_codec_options(talk)
    talk.add_argument("--socket", help="the daemon's socket (default: where `csmd serve` puts it)")
    talk.add_argument("--local", action="store_true", help="run the model in this process even if a daemon runs")
    talk.add_argument(
        "--asr",
        type=_asr_spec,
        default="none",
        metavar="ASR",
        help="transcripts of your turns: none (audio only; the default), typed (you type them after each turn), "
        "whisper or whisper:MODEL (faster-whisper, default model base.en; MODEL is a size name such as small.en "
        'or a CTranslate2 directory; needs pip install "csmd[whisper]")',
    )
    talk.add_argument(
        "--asr-language", metavar="CODE", help="language you speak, for Whisper, e.g. en, de (default: detected)"
    )
    talk.set_defaults(func=cmd_talk)

    devices = commands.add_parser("devices", help="list sound devices (names or indices for --output-device)")
    devices.set_defaults(func=cmd_devices)

    serve = commands.add_parser("serve", parents=[run_opts, model_opts], help="run the daemon on a Unix socket")
    serve.add_argument("--socket", help="socket path (default: $XDG_RUNTIME_DIR/csmd/csmd.sock, else /tmp/csmd-UID/)")
    _add_codec_options(serve)
    serve.add_argument("--max-sessions", type=int, default=8, help="sessions held at once (default: 8)")
    serve.set_defaults(func=cmd_serve)

    say = commands.add_parser(
        "say", parents=[run_opts, model_opts, _sampling_options()], help="speak text into a 24 kHz WAV file"
    )
    say.add_argument("text", help="what to say")
    say.add_argument("-o", "--output", help="output file (.wav, .flac or .ogg)")
    say.add_argument("--play", action="store_true", help="play on the speaker as it is generated")
    say.add_argument("--output-device", help="sound device name or index for --play (default: the system's)")
    say.add_argument("--socket", help="the daemon's socket (default: where `csmd serve` puts it)")
    say.add_argument("--local", action="store_true", help="run the model in this process even if a daemon runs")
    say.add_argument("--speaker", type=int, default=0, help="speaker id of the reply (default: 0)")
    say.add_argument("--context", action="append", default=[], metavar="AUDIO", help="a recorded turn (repeatable)")
    say.add_argument("--context-text", action="append", default=[], metavar="TEXT", help="its transcript")
    say.add_argument(
        "--context-speaker",
        action="append",
        type=int,
        default=[],
        metavar="N",
        help="its speaker (default: --speaker)",
    )
    _add_codec_options(say)
    say.set_defaults(func=cmd_say)

    bench = commands.add_parser("bench", help="latency benchmarks")
    benches = bench.add_subparsers(dest="bench", required=True)
    frame = benches.add_parser("frame", parents=[run_opts, model_opts], help="time per 80 ms frame and prefill")
    frame.add_argument("--frames", type=int, default=20, help="timed frames (default: 20)")
    frame.add_argument("--warmup", type=int, default=3, help="untimed frames first (default: 3)")
    frame.add_argument("--prefill", type=int, default=300, help="rows of context to prefill (default: 300)")
    frame.add_argument("--prefill-repeats", type=int, default=3, help="timed prefills, median (default: 3)")
    frame.add_argument("--quantize", type=int, choices=(4, 8), help="quantize the loaded weights first")
    frame.add_argument(
        "--compare-transformers",
        action="store_true",
        help="also time transformers' CsmForConditionalGeneration (torch CPU, random weights) in the same run",
    )
    frame.add_argument("--json", action="store_true", help="print one JSON object")
    frame.set_defaults(func=cmd_bench_frame)
    over_socket = benches.add_parser(
        "daemon", parents=[run_opts, model_opts], help="time to first audio and per-frame cost: socket vs in-process"
    )
    over_socket.add_argument("--frames", type=int, default=25, help="frames per reply (default: 25)")
    over_socket.add_argument("--runs", type=int, default=5, help="replies each way (default: 5)")
    _add_codec_options(over_socket)
    over_socket.add_argument("--json", action="store_true", help="print one JSON object")
    over_socket.set_defaults(func=cmd_bench_daemon)
    talk_bench = benches.add_parser(
        "talk", parents=[run_opts, model_opts], help="a scripted conversation on real devices: turn and barge-in"
    )
    talk_bench.add_argument("--user-device", default="loopback", help="plays the user's voice into csmd's mic")
    talk_bench.add_argument("--csmd-device", default="system", help="where csmd speaks (not heard back)")
    talk_bench.add_argument("--rounds", type=int, default=3, help="rounds (default: 3)")
    _add_codec_options(talk_bench)
    talk_bench.add_argument("--json", action="store_true", help="print one JSON object")
    talk_bench.set_defaults(func=cmd_bench_talk)
    codec = benches.add_parser("codec", parents=[run_opts], help="Mimi streaming decode/encode per frame")
    codec.add_argument("--codec", default="random:mimi", help="Mimi weights (default: random:mimi, full size)")
    codec.add_argument("--frames", type=int, default=50, help="timed frames (default: 50)")
    codec.add_argument(
        "--warmup", type=int, help="untimed frames first (default: enough to fill the attention window, 130)"
    )
    codec.add_argument("--compare-moshi", action="store_true", help="also time moshi's PyTorch decoder")
    codec.add_argument("--bf16", action="store_true", help="bfloat16 weight-bound matrices (Mimi.use_bf16_weights)")
    codec.add_argument("--json", action="store_true", help="print one JSON object")
    codec.set_defaults(func=cmd_bench_codec)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    expected = (ValueError, OSError, RuntimeError)  # bad input, files or devices: a message, not a traceback
    try:
        environment.check()  # a bad CSMD_* variable is the user's error, whatever the command
        return int(args.func(args))
    except expected as exc:
        print(f"csmd: error: {exc}", file=sys.stderr)
        return 2
    except BaseExceptionGroup as group:  # what trio raises out of a nursery
        leaves = _leaves(group)
        if not all(isinstance(e, expected) for e in leaves):
            raise
        for leaf in leaves:
            print(f"csmd: error: {leaf}", file=sys.stderr)
        return 2


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


if __name__ == "__main__":
    raise SystemExit(main())
