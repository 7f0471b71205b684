"""`csmd say`: text to speech, through a running daemon or in this process.

Everything that can be checked without the model is checked first (the text, -o, the sound device, the
--context files, a daemon on --socket, the model's window where it is known), so a mistake never costs a
model load. Ctrl-C stops the reply at the next frame: what was made is written and reported (exit 0).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from csmd.cli import checks
from csmd.cli.errors import DaemonFault, flagged
from csmd.cli.interrupt import INTERRUPTED, first_ctrl_c_stops
from csmd.cli.options import model_spec
from csmd.cli.runtime import apply_runtime
from csmd.cli.voice import load_voice, note_random
from csmd.errors import UserError

if TYPE_CHECKING:
    from csmd.audio.devices import Speaker
    from csmd.model.sampling import GenerationParams
    from csmd.protocol.errors import RequestError

SAMPLE_RATE = 24_000
FRAME_SAMPLES = 1920  # one 80 ms frame


@dataclass
class Said:
    """What `say` reports: the audio, and how the reply went."""

    pcm: np.ndarray
    reason: str
    seed: int | None
    first_audio: float
    total: float
    interrupted: bool = False


def generation_params(args: argparse.Namespace) -> GenerationParams:
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
    words = checks.text(args.text)
    if not args.output and not args.play:
        raise UserError("say where the audio goes: -o FILE, --play, or both")
    if len(args.context) != len(args.context_text):
        raise UserError("--context-text: give one for each --context file")
    if args.context_speaker and len(args.context_speaker) != len(args.context):
        raise UserError("--context-speaker: give one for each --context file, or none")
    if args.output:
        checks.output_path(args.output)
    if args.play:
        checks.sound_device(args.output_device, "output", "--output-device" if args.output_device else "--play")
    params = generation_params(args)
    speakers = args.context_speaker or [args.speaker] * len(args.context)
    clips = tuple(
        checks.read_clip(path, text, speaker, "--context")
        for path, text, speaker in zip(args.context, args.context_text, speakers, strict=True)
    )
    reply = checks.Reply(words, args.speaker, params.max_frames, args.max_seconds, clips)
    daemon = checks.daemon_for(args)
    if daemon is not None:
        checks.model_flags_for(daemon, args)
        said = _through_daemon(args, daemon, reply, params)
    else:
        said = _in_process(args, reply, params)
    return _report(args, said)


def _in_process(args: argparse.Namespace, reply: checks.Reply, params: GenerationParams) -> Said:
    from csmd.speak import add_context, speak

    spec = model_spec(args)
    checks.model_argument(spec)
    checks.codec_argument(args.codec)
    tokenizer = checks.tokenizer_file(args.tokenizer)
    checks.window_before_loading(args, tokenizer, reply)
    apply_runtime(args)
    voice = load_voice(args, tokenizer)
    checks.fits_window(voice.loaded.model.config, voice.loaded.tokenizer, reply, spec)
    context = voice.generator.new_context()
    for clip in reply.clips:
        add_context(context, voice.mimi, clip)
    with first_ctrl_c_stops() as stopped, _player(args) as speaker:
        result = speak(
            voice.generator, context, voice.mimi, reply.text, reply.speaker, params,
            on_audio=speaker, stop=stopped,
        )  # fmt: skip
        _drain(speaker, len(result.pcm), stopped)
    cut = stopped() and result.finish_reason == "cancelled"  # (Ctrl-C while the tail played cuts no frame)
    return Said(result.pcm, result.finish_reason, result.seed, result.seconds_to_first_audio,
                result.seconds_total, interrupted=cut)  # fmt: skip


def _through_daemon(args: argparse.Namespace, daemon: checks.Daemon, reply: checks.Reply, p: GenerationParams) -> Said:
    from csmd.protocol.blocking_client import connect
    from csmd.protocol.errors import ConnectionLost, RequestError

    started = time.perf_counter()
    try:
        with connect(daemon.path, client="csmd say") as client:
            model = client.welcome.model
            print(f"csmd: speaking through the daemon on {daemon.path} (model {model})", file=sys.stderr)
            if model.startswith("random:"):
                note_random(model)
            session = f"say-{os.getpid()}"
            client.open_session(session)
            for clip in reply.clips:
                client.add_context(session, clip.speaker, clip.text, clip.pcm, rate=SAMPLE_RATE, pinned=True)
            speech = client.speak(session, reply.text, reply.speaker, temperature=p.temperature, top_k=p.top_k,
                                  top_p=p.top_p, min_p=p.min_p, seed=p.seed, max_frames=p.max_frames)  # fmt: skip
            chunks: list[np.ndarray] = []
            first_audio = 0.0
            cut = False
            with first_ctrl_c_stops() as stopped, _player(args) as speaker:
                for chunk in speech:
                    if not chunks:
                        first_audio = time.perf_counter() - started
                    speaker(chunk.pcm)
                    chunks.append(chunk.pcm)
                    if stopped():
                        speech.cancel()
                        cut = True
                        break
                _drain(speaker, sum(len(c) for c in chunks), stopped)
            end = speech.end
            start = speech.audio_start
            reason = end.reason if end is not None else "cancelled"
            pcm = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
            return Said(pcm, reason, start.seed if start else None, first_audio, time.perf_counter() - started,
                        interrupted=cut)  # fmt: skip
    except RequestError as exc:
        raise _refused(exc, daemon, reply) from exc
    except ConnectionLost as exc:
        raise UserError(f"the daemon on {daemon.path} closed the connection ({exc})") from exc


def _refused(exc: RequestError, daemon: checks.Daemon, reply: checks.Reply) -> Exception:
    """A daemon's `error` reply as the one-line error of the flag behind it."""
    detail = exc.message.split(";")[0]
    if exc.code == "invalid_params" and "'max_frames'" in exc.message:  # the API's name for --max-seconds
        return UserError(
            f"--max-seconds {reply.max_seconds:g} ({reply.max_frames} frames): longer than the daemon's model "
            "allows (its window); lower --max-seconds"
        )
    if exc.code == "context_overflow":
        return UserError(
            f"--max-seconds {reply.max_seconds:g} ({reply.max_frames} frames): the reply does not fit the window "
            f"of the daemon's model ({detail}); lower --max-seconds or shorten the text"
        )
    if exc.code == "internal":
        return DaemonFault(f"the daemon on {daemon.path} failed: {exc.message} (its log has the traceback)")
    if exc.code == "invalid_params" and "audio" in exc.message:
        return UserError(f"--context: the daemon refused the audio: {exc.message}")
    return UserError(f"the daemon on {daemon.path} refused the request ({exc.code}): {exc.message}")


class _Silent:
    """The player when there is no --play: takes chunks and drops them."""

    played = 0

    def __call__(self, pcm: np.ndarray) -> None:
        self.played += len(pcm)

    def clear(self) -> int:
        return 0


@contextlib.contextmanager
def _player(args: argparse.Namespace) -> Iterator[Speaker | _Silent]:
    """The speaker with --play (chunks played as they come), else a player that drops them."""
    if not args.play:
        yield _Silent()
        return
    from csmd.audio.devices import Speaker

    with flagged("--output-device" if args.output_device else "--play"), Speaker(device=args.output_device) as s:
        yield s


def _drain(speaker: Speaker | _Silent, total: int, stopped: Callable[[], bool]) -> None:
    """Wait until the speaker has played `total` samples, or Ctrl-C; then drop what is left (nothing, if all
    was played). Waiting here rather than in Speaker's exit keeps Ctrl-C answered while the tail plays."""
    deadline = time.monotonic() + max(0, total - speaker.played) / SAMPLE_RATE + 2.0
    while speaker.played < total and not stopped() and time.monotonic() < deadline:
        time.sleep(0.02)
    speaker.clear()


def _report(args: argparse.Namespace, said: Said) -> int:
    from csmd.audio import io

    frames = len(said.pcm) // FRAME_SAMPLES
    if frames == 0:
        if said.interrupted:
            print("csmd: interrupted before the first frame", file=sys.stderr)
            return INTERRUPTED
        raise UserError("the model ended the reply before its first frame, so there is no audio (try another --seed)")
    where = []
    if args.output:
        with flagged("-o"):
            io.write_audio(args.output, said.pcm)
        where.append(f"wrote {args.output}")
    if args.play:
        where.append("played")
    reason = "Ctrl-C" if said.interrupted else said.reason
    print(
        f"{' and '.join(where)}: {len(said.pcm) / io.SAMPLE_RATE:.2f} s ({frames} frames, ended by {reason}, "
        f"seed {said.seed}); first audio after {said.first_audio:.2f} s, total {said.total:.2f} s"
    )
    return 0
