"""Clone a voice with the blocking client: pin a voice prompt, then stream a reply in that voice into a WAV.

    python examples/blocking_app.py prompt.wav --prompt-text "what prompt.wav says" -o reply.wav

The prompt (any file libsndfile reads, any sample rate) becomes the first segment of the session's
context, pinned so that it is never dropped when a long conversation fills the model's window. The reply
is spoken as the same speaker, so CSM continues in the prompt's voice. Each chunk is written to the file
the moment it arrives. Exit status: 0 on success, 2 for a bad argument (no daemon, unreadable prompt,
unwritable output), 1 if the daemon refused or failed the request.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import soundfile

from csmd.audio.io import AudioFileError, read_audio
from csmd.daemon.unix_socket import default_socket_path
from csmd.protocol.blocking_client import connect
from csmd.protocol.errors import ConnectionLost, RequestError, UntrustedServerError

SPEAKER = 0  # the prompt's speaker and the reply's: the same voice


def clone_voice(socket_path: Path, prompt: Path, prompt_text: str, text: str, out: Path, max_frames: int | None) -> int:
    voice = read_audio(prompt)  # mono float32, resampled to 24 kHz (the daemon would resample it too)
    with connect(socket_path, client="blocking-app") as client:
        welcome = client.welcome  # the handshake is done: what the daemon runs, at which rate
        print(f"connected to {welcome.server}, model {welcome.model}")
        client.open_session("voice")

        # The daemon Mimi-encodes the prompt into frames (12.5 per second) and keeps them in the context.
        added = client.add_context("voice", SPEAKER, prompt_text, audio=voice, rate=welcome.sample_rate, pinned=True)
        print(f"pinned a {len(voice) / welcome.sample_rate:.2f} s voice prompt: {added.frames} frames")

        started = time.perf_counter()
        first_audio: float | None = None
        samples = 0
        # start_speaking returns once the daemon accepted the request (audio.start), or raises RequestError.
        speech = client.start_speaking("voice", text, SPEAKER, max_frames=max_frames)
        with soundfile.SoundFile(out, "w", samplerate=welcome.sample_rate, channels=1, subtype="PCM_16") as wav:
            for chunk in speech:  # float32 at 24 kHz, one 80 ms frame per chunk, as soon as it is decoded
                if first_audio is None:
                    first_audio = time.perf_counter() - started
                wav.write(np.clip(chunk.pcm, -1.0, 1.0))  # libsndfile wraps, not clips, by default
                samples += len(chunk.pcm)
    end = speech.end  # the audio.end record: why the reply ended and how many frames it had
    assert end is not None and speech.audio_start is not None
    print(
        f"reply: {end.frames} frames ({samples} samples), reason {end.reason}, seed {speech.audio_start.seed}, "
        f"first audio after {1000 * (first_audio or 0):.1f} ms -> {out}"
    )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description="Speak in the voice of a WAV prompt, through the csmd daemon.")
    parser.add_argument("prompt", type=Path, help="the voice prompt (WAV, FLAC, ...)")
    parser.add_argument("--prompt-text", default="", help="what the prompt says (helps CSM follow the voice)")
    parser.add_argument("--text", default="This is my voice, spoken by csmd.", help="what to say")
    parser.add_argument("-o", "--output", type=Path, default=Path("reply.wav"), help="WAV file to write")
    parser.add_argument("--socket", type=Path, default=None, help="daemon socket (default: where csmd serve listens)")
    parser.add_argument("--max-frames", type=int, default=None, help="cap the reply (12.5 frames per second)")
    args = parser.parse_args()
    if not args.output.parent.is_dir():
        parser.error(f"-o/--output: no directory {args.output.parent}")
    path = args.socket or default_socket_path()
    try:
        return clone_voice(path, args.prompt, args.prompt_text, args.text, args.output, args.max_frames)
    except UntrustedServerError as exc:  # another user's process at the path: nothing was sent to it
        print(f"blocking_app: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        print(f"blocking_app: no csmd daemon at {path} (--socket): {exc.strerror}", file=sys.stderr)
        return 2
    except AudioFileError as exc:
        print(f"blocking_app: prompt: {exc}", file=sys.stderr)
        return 2
    except (RequestError, ConnectionLost) as exc:
        print(f"blocking_app: the daemon said {exc.code}: {exc.message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
