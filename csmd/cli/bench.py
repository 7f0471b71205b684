"""`csmd bench frame|precision|kv-cache|codec|daemon|concurrency|talk`: each says what it is doing while it measures
(stderr)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from csmd.cli import checks
from csmd.cli.errors import flagged
from csmd.cli.options import model_spec
from csmd.cli.runtime import apply_runtime
from csmd.cli.voice import Voice, kv_cache_dtype, load_model, load_voice, note_random
from csmd.errors import UserError

if TYPE_CHECKING:
    from csmd.audio.mimi.model import Mimi
    from csmd.bench import scenarios
    from csmd.bench.report import Report
    from csmd.model.loading import LoadedModel


def _say(message: str) -> None:
    print(f"csmd: {message}", file=sys.stderr, flush=True)


def cmd_bench_frame(args: argparse.Namespace) -> int:
    from csmd.bench.frame import add_comparison, format_result, run
    from csmd.bench.machine import measure

    loaded, name = _model_that_fits(args, _check_frame_rows)
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


def _model_that_fits(
    args: argparse.Namespace, check_rows: Callable[[argparse.Namespace, int, str], None]
) -> tuple[LoadedModel, str]:
    """--model loaded (and --quantize applied), its name for the report. `check_rows` (args, window, spec)
    refuses flags that ask for more rows than the window: before loading when the config tells the window
    cheaply, and again after (a checkpoint whose config could not be peeked)."""
    from csmd.model.loading import peek_config

    spec = model_spec(args)
    checks.model_argument(spec)
    with flagged("--model"):
        cfg = peek_config(spec)
    if cfg is not None:
        check_rows(args, cfg.backbone.max_seq_len, spec)
    apply_runtime(args)
    loaded = load_model(args)
    check_rows(args, loaded.model.config.backbone.max_seq_len, spec)
    name = spec
    if args.quantize is not None:
        from csmd.model.weights import quantize

        quantize(loaded.model, args.quantize)
        name += f" ({args.quantize.describe()})"
    return loaded, name


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

    loaded, name = _model_that_fits(args, _check_kv_cache_rows)
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


SCENARIOS = ("reply", "context", "frame", "codec", "concurrency", "conversation")
IN_PROCESS_ONLY = ("frame", "codec", "concurrency", "conversation")
REGRESSED = 3  # `csmd bench compare`: a figure got worse past the threshold


def scenario_names(text: str) -> list[str]:
    """--scenarios: a comma-separated list of SCENARIOS, each once."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in SCENARIOS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown scenario {', '.join(map(repr, unknown)) or '(none)'}: choose from {', '.join(SCENARIOS)}"
        )
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"a scenario is named twice in {text!r}")
    return names


def cmd_bench_run(args: argparse.Namespace) -> int:
    import shlex

    from csmd.bench import scenarios
    from csmd.bench.report import Report, markdown, table
    from csmd.model.loading import peek_config

    chosen: list[str] = args.scenarios
    if args.socket:
        local = [name for name in chosen if name in IN_PROCESS_ONLY]
        if local:
            raise UserError(
                f"--scenarios {','.join(local)}: measured in this process only, not through --socket "
                f"(run them without --socket, or choose from {', '.join(s for s in SCENARIOS if s not in local)})"
            )
        found = checks.probe(Path(args.socket))
        if found is None:
            raise UserError(f"--socket {args.socket}: no csmd daemon is listening there (start one with `csmd serve`)")
        model = found.model
    else:
        checks.model_argument(model_spec(args))
        checks.codec_argument(args.codec)
        model = model_spec(args)
        with flagged("--model"):
            cfg = peek_config(model)
        if cfg is not None:
            _check_reply_rows(args, cfg.backbone.max_seq_len, model)
        if "conversation" in chosen:
            checks.sound_device(args.user_device, "output", "--user-device")
            checks.sound_device(args.user_device, "input", "--user-device")
            checks.sound_device(args.csmd_device, "output", "--csmd-device")
    for flag, path in (("--json", args.json), ("--markdown", args.markdown)):
        if path is not None:
            _writable_file(Path(path), flag)
    if args.plot is not None:
        _chart_directory(Path(args.plot))
    command = shlex.join(["csmd", *sys.argv[1:]]) if sys.argv[1:2] == ["bench"] else "csmd bench run"
    report = Report(command, model, scenarios.describe_machine())
    if args.socket:
        target = scenarios.Target(Path(args.socket), "socket")
        _run_scenarios(args, chosen, target, report, window=None)
    else:
        from csmd.bench.daemon import daemon_in_thread
        from csmd.daemon.server import Daemon

        apply_runtime(args)
        voice = load_voice(args)
        _check_reply_rows(args, voice.generator.model.config.backbone.max_seq_len, model)
        daemon = Daemon(voice.generator, voice.mimi, model)
        with daemon_in_thread(daemon) as path:
            target = scenarios.Target(path, "daemon", daemon)
            window = voice.generator.model.config.backbone.max_seq_len
            _run_scenarios(args, [s for s in chosen if s not in IN_PROCESS_ONLY], target, report, window)
        _run_in_process(args, [s for s in chosen if s in IN_PROCESS_ONLY], voice, model, report)
    report.results.sort(key=lambda r: chosen.index(r.scenario))
    print(table(report))
    if args.json:
        report.write_json(Path(args.json))
        _say(f"wrote {args.json}")
    if args.markdown:
        Path(args.markdown).write_text(markdown(report))
        _say(f"wrote {args.markdown}")
    if args.plot:
        from csmd.bench.plots import plot

        for written in plot(report, Path(args.plot)):
            _say(f"wrote {written}")
    return 0


REPLY_TEXT_ROWS = 64  # room kept for a benchmark reply's text rows beside its frames


def _check_reply_rows(args: argparse.Namespace, window: int, spec: str) -> None:
    if args.frames + REPLY_TEXT_ROWS > window:
        raise UserError(
            f"--frames {args.frames}: a reply of that many frames and its text do not fit the window of {spec} "
            f"({window} rows)"
        )


def _run_scenarios(
    args: argparse.Namespace, chosen: list[str], target: scenarios.Target, report: Report, window: int | None
) -> None:
    from tqdm import tqdm

    from csmd.bench import scenarios
    from csmd.progress import bars_disabled
    from csmd.protocol.errors import RequestError

    for name in chosen:
        _say(f"scenario {name}: {args.warmup} warm-up + {args.repeats} timed rounds through the {target.where}")
        with tqdm(total=args.warmup + args.repeats, desc=name, unit="round", disable=bars_disabled()) as bar:
            try:
                if name == "reply":
                    result = scenarios.reply(target, args.frames, args.repeats, args.warmup, bar.update)
                else:
                    result = scenarios.context(target, args.frames, args.repeats, args.warmup, window, bar.update)
            except RequestError as refused:
                if target.where != "socket":  # our own daemon, whose window was checked: a bug
                    raise
                # A daemon elsewhere: its window was not known beforehand.
                raise UserError(
                    f"--socket {target.path}: the daemon refused a request of scenario {name} ({refused}); "
                    f"--frames {args.frames} sets each reply's max_frames"
                ) from None
        report.results.append(result)


def _run_in_process(args: argparse.Namespace, chosen: list[str], voice: Voice, model: str, report: Report) -> None:
    from csmd.bench import scenarios

    for name in chosen:
        _say(f"scenario {name}: in this process")
        if name == "frame":
            window = voice.generator.model.config.backbone.max_seq_len
            rows = min(args.prefill, window - args.frames - 8)
            result = scenarios.frame(voice.generator.model, model, args.frames, 2, rows, args.repeats, args.peers)
        elif name == "conversation":
            rounds = args.repeats
            result = scenarios.conversation(
                voice.generator, voice.mimi, model, rounds, args.user_device, args.csmd_device
            )
        elif name == "codec":
            result = scenarios.codec(voice.mimi, args.codec or "the model's codec", args.frames, args.peers)
        else:
            sessions = [1, 2, 4, 8]
            rows = min(args.prefill, 300)
            result = scenarios.concurrency(voice.generator, voice.mimi, model, sessions, args.frames, args.warmup, rows)
        report.results.append(result)


def _writable_file(path: Path, flag: str) -> None:
    """Checked before anything runs: a report that cannot be written is found before minutes of measuring."""
    import os

    directory = path.parent
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a directory")
    if not directory.is_dir():
        raise UserError(f"{flag} {path}: the directory {directory} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UserError(f"{flag} {path}: cannot write there: permission denied")


def _chart_directory(path: Path) -> None:
    """--plot DIR: a directory to write into, or one that can be made (its parent exists and is writable)."""
    import importlib.util
    import os

    if importlib.util.find_spec("matplotlib") is None:
        raise UserError('--plot needs matplotlib: pip install "csmd[bench]"')
    if path.exists() and not path.is_dir():
        raise UserError(f"--plot {path}: exists and is not a directory")
    existing = path if path.exists() else path.parent
    if not existing.is_dir():
        raise UserError(f"--plot {path}: the directory {existing} does not exist")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--plot {path}: cannot write there: permission denied")


def cmd_bench_compare(args: argparse.Namespace) -> int:
    from csmd.bench.report import ReportError, changes, format_changes, load_report

    try:
        before, after = load_report(Path(args.before)), load_report(Path(args.after))
    except ReportError as exc:
        raise UserError(str(exc)) from exc
    found, unmatched = changes(before, after)
    threshold = args.threshold / 100
    print(format_changes(found, threshold))
    for name in unmatched:
        print(f"only in one report: {name}")
    worse = [c for c in found if c.regressed(threshold)]
    if worse:
        print(f"{len(worse)} figure(s) worse by more than {args.threshold:g}%", file=sys.stderr)
        return REGRESSED
    return 0
