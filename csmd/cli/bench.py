"""`csmd bench frame|precision|kv-cache|codec|daemon|concurrency|talk`: each says what it is doing while it measures
(stderr)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from csmd.cli import checks
from csmd.cli.errors import flagged
from csmd.cli.options import model_spec
from csmd.cli.runtime import apply_runtime
from csmd.cli.voice import kv_cache_dtype, load_model, load_voice, note_random
from csmd.errors import UserError

if TYPE_CHECKING:
    from csmd.audio.mimi.model import Mimi


def _say(message: str) -> None:
    print(f"csmd: {message}", file=sys.stderr, flush=True)


def cmd_bench_frame(args: argparse.Namespace) -> int:
    from csmd.bench.frame import add_comparison, format_result, run
    from csmd.bench.machine import measure
    from csmd.model.loading import peek_config

    spec = model_spec(args)
    checks.model_argument(spec)
    with flagged("--model"):
        cfg = peek_config(spec)
    if cfg is not None:
        _check_frame_rows(args, cfg.backbone.max_seq_len, spec)
    apply_runtime(args)
    loaded = load_model(args)
    _check_frame_rows(args, loaded.model.config.backbone.max_seq_len, spec)
    name = spec
    if args.quantize is not None:
        from csmd.model.weights import quantize

        quantize(loaded.model, args.quantize)
        name += f" ({args.quantize.describe()})"
    _say("measuring this machine's memory bandwidth and GEMM rate")
    machine = measure()
    _say(f"timing {args.prefill_repeats} prefills of {args.prefill} rows, then {args.warmup} + {args.frames} frames")
    result = run(
        loaded.model,
        name,
        frames=args.frames,
        warmup=args.warmup,
        prefill_rows=args.prefill,
        prefill_repeats=args.prefill_repeats,
        machine=machine,
        kv_dtype=kv_cache_dtype(args),
    )
    if args.compare_transformers:
        from csmd.bench import transformers_frame

        _say("timing transformers' CsmForConditionalGeneration on the same frames")
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


def _check_frame_rows(args: argparse.Namespace, window: int, spec: str) -> None:
    rows = args.prefill + args.warmup + args.frames
    if rows > window:
        raise UserError(
            f"--prefill {args.prefill} + --warmup {args.warmup} + --frames {args.frames} = {rows} rows, more than "
            f"the window of {spec} ({window} rows)"
        )


def cmd_bench_precision(args: argparse.Namespace) -> int:
    from csmd.bench.precision import PROMPT_ROWS, format_result, run
    from csmd.model.loading import load_model as load
    from csmd.model.loading import peek_config

    spec = model_spec(args)
    checks.model_argument(spec)
    with flagged("--model"):
        cfg = peek_config(spec)
    if cfg is not None:
        _check_precision_rows(args, cfg.backbone.max_seq_len, spec, PROMPT_ROWS)
    apply_runtime(args)
    with flagged("--model"):
        loaded = load(spec, dtype=args.dtype)
    if loaded.random:
        note_random(spec)
    _check_precision_rows(args, loaded.model.config.backbone.max_seq_len, spec, PROMPT_ROWS)
    result = run(loaded.model, spec, args.schemes, frames=args.frames, timed_rounds=args.timed_rounds, say=_say)
    print(json.dumps(result.as_dict()) if args.json else format_result(result))
    return 0


def _check_precision_rows(args: argparse.Namespace, window: int, spec: str, prompt_rows: int) -> None:
    from csmd.bench.alternation import CONTEXT_ROWS, FRAMES_PER_TURN

    if prompt_rows + args.frames > window:
        raise UserError(
            f"--frames {args.frames}: with the {prompt_rows} prompt rows, more than the window of {spec} "
            f"({window} rows)"
        )
    if CONTEXT_ROWS + args.timed_rounds * FRAMES_PER_TURN > window:
        raise UserError(
            f"--timed-rounds {args.timed_rounds}: {FRAMES_PER_TURN} frames a round after {CONTEXT_ROWS} rows of "
            f"context, more than the window of {spec} ({window} rows)"
        )


def cmd_bench_kv_cache(args: argparse.Namespace) -> int:
    from csmd.bench.kv_cache import format_result, run
    from csmd.model.loading import peek_config

    spec = model_spec(args)
    checks.model_argument(spec)
    with flagged("--model"):
        cfg = peek_config(spec)
    if cfg is not None:
        _check_kv_cache_rows(args, cfg.backbone.max_seq_len, spec)
    apply_runtime(args)
    loaded = load_model(args)
    _check_kv_cache_rows(args, loaded.model.config.backbone.max_seq_len, spec)
    name = spec
    if args.quantize is not None:
        from csmd.model.weights import quantize

        quantize(loaded.model, args.quantize)
        name += f" ({args.quantize.describe()})"
    result = run(loaded.model, name, context_rows=args.context, frames=args.frames, say=_say)
    print(json.dumps(result.as_dict()) if args.json else format_result(result))
    return 0


def _check_kv_cache_rows(args: argparse.Namespace, window: int, spec: str) -> None:
    if args.context + args.frames > window:
        raise UserError(
            f"--context {args.context} + --frames {args.frames} = {args.context + args.frames} rows, more than the "
            f"window of {spec} ({window} rows)"
        )


def cmd_bench_codec(args: argparse.Namespace) -> int:
    from csmd.audio.mimi.loading import load_mimi
    from csmd.bench.codec import format_result, run, steady_state_frames
    from csmd.bench.machine import measure

    checks.codec_argument(args.codec)
    if args.batch and args.compare_moshi:
        raise UserError("--compare-moshi times single streams: leave out --batch")
    apply_runtime(args)
    _say(f"loading the codec {args.codec}")
    with flagged("--codec"):
        mimi = load_mimi(args.codec)
    if args.bf16:
        mimi.use_bf16_weights()
    name = args.codec + (" (bf16 weights)" if args.bf16 else "")
    warmup = steady_state_frames(mimi) if args.warmup is None else args.warmup
    if args.batch:
        return _bench_codec_batch(args, mimi, name, warmup)
    _say("measuring this machine's memory bandwidth and GEMM rate")
    machine = measure()
    moshi = " against moshi's, frame by frame" if args.compare_moshi else ""
    _say(f"streaming {warmup} warm-up + {args.frames} timed frames through the decoder{moshi}, then the encoder")
    result = run(mimi, name, frames=args.frames, warmup=warmup, compare_moshi=args.compare_moshi, machine=machine)
    print(json.dumps(result.as_dict()) if args.json else format_result(result))
    return 0


def _bench_codec_batch(args: argparse.Namespace, mimi: Mimi, name: str, warmup: int) -> int:
    from csmd.bench import codec_batch

    sizes = ", ".join(map(str, sorted(set(args.batch))))
    _say(f"streaming {warmup} warm-up + {args.frames} timed frames of {sizes} streams, batched and one by one")
    result = codec_batch.run(mimi, name, args.batch, frames=args.frames, warmup=warmup)
    print(json.dumps(result.as_dict()) if args.json else codec_batch.format_result(result))
    return 0


def cmd_bench_daemon(args: argparse.Namespace) -> int:
    from csmd.bench.daemon import format_result, run

    checks.model_argument(model_spec(args))
    checks.codec_argument(args.codec)
    apply_runtime(args)
    voice = load_voice(args)
    _say(f"making {args.runs} replies of {args.frames} frames each way, in-process and through a socket")
    result = run(voice.generator, voice.mimi, model_spec(args), frames=args.frames, runs=args.runs)
    print(json.dumps(result.as_dict()) if args.json else format_result(result))
    return 0


def cmd_bench_concurrency(args: argparse.Namespace) -> int:
    from csmd.bench.concurrency import format_result, run
    from csmd.bench.machine import measure

    spec = model_spec(args)
    checks.model_argument(spec)
    checks.codec_argument(args.codec)
    apply_runtime(args)
    voice = load_voice(args)
    window = voice.generator.model.config.backbone.max_seq_len
    if args.context + args.warmup + args.frames + 64 > window:
        raise UserError(
            f"--context {args.context} + --warmup {args.warmup} + --frames {args.frames} and the reply's text do not "
            f"fit the window of {spec} ({window} rows)"
        )
    _say("measuring this machine's memory bandwidth")
    machine = measure()
    result = run(
        voice.generator, voice.mimi, spec, machine, args.sessions, frames=args.frames, warmup=args.warmup,
        context_rows=args.context, daemon=not args.no_daemon, progress=_say,
    )  # fmt: skip
    print(json.dumps(result.as_dict()) if args.json else format_result(result))
    return 0


def cmd_bench_talk(args: argparse.Namespace) -> int:
    from csmd.bench.talk import format_result, run

    checks.model_argument(model_spec(args))
    checks.codec_argument(args.codec)
    checks.sound_device(args.user_device, "output", "--user-device")
    apply_runtime(args)
    voice = load_voice(args)
    _say(f"playing {args.rounds} scripted rounds through {args.user_device}")
    result = run(voice.generator, voice.mimi, model_spec(args), args.rounds, args.user_device, args.csmd_device)
    print(json.dumps(result.as_dict()) if args.json else format_result(result))
    return 0
