"""Measure, from the client's side, how fast the csmd daemon answers: time to first audio and chunk gaps.

    python examples/latency_probe.py -n 5 --max-frames 25

Asks for `-n` replies, one after the other in one session (so the context grows as in a conversation), and
times each chunk's arrival. Time to first audio runs from sending `speak` to the first chunk; a gap is the
time between two chunks of one reply. Real-time playback needs gaps of at most one frame (80 ms) on
average; a player holds back a prebuffer to ride out the slow ones. Exit status: 0 on success, 2 if no
daemon listens at the socket path, 1 if the daemon refused or failed a request.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import numpy as np

from csmd.daemon.unix_socket import default_socket_path
from csmd.protocol.blocking_client import connect
from csmd.protocol.errors import ConnectionLost, RequestError, UntrustedServerError

FRAME_MS = 80.0  # one Mimi frame: 1920 samples at 24 kHz


def summary(name: str, values_ms: list[float], unit: str) -> str:
    p50, p95 = np.percentile(values_ms, [50, 95])
    return f"{name} ({len(values_ms)} {unit}): p50 {p50:.1f} ms, p95 {p95:.1f} ms, max {max(values_ms):.1f} ms"


def probe(socket_path: Path, replies: int, text: str, max_frames: int | None) -> int:
    first_audio: list[float] = []
    gaps: list[float] = []
    with connect(socket_path, client="latency-probe") as client:
        print(f"connected to {client.welcome.server}, model {client.welcome.model}")
        client.open_session("probe")
        for n in range(1, replies + 1):
            speech = client.speak("probe", text, 0, max_frames=max_frames)
            sent = time.perf_counter()
            arrivals = [time.perf_counter() for _chunk in speech]  # the first iteration sends the request
            end = speech.end
            assert end is not None
            if not arrivals:
                print(f"reply {n}: no audio, reason {end.reason}")
                continue
            first_audio.append(1000 * (arrivals[0] - sent))
            reply_gaps = [1000 * (b - a) for a, b in itertools.pairwise(arrivals)]
            gaps += reply_gaps
            # The daemon's first_audio_ms counts from when it accepted the request: the difference is the
            # socket both ways, the client, and the daemon's work before it accepted the request.
            print(
                f"reply {n}: {end.frames} frames, reason {end.reason}, first audio {first_audio[-1]:.1f} ms "
                f"(daemon: {end.first_audio_ms or 0:.1f} ms), largest gap {max(reply_gaps, default=0):.1f} ms"
            )
    if not first_audio:
        print("latency_probe: no reply made any audio", file=sys.stderr)
        return 1
    print(summary("time to first audio", first_audio, "replies"))
    if gaps:
        print(summary("gap between chunks", gaps, "gaps") + f" (real time: {FRAME_MS:.0f} ms per frame)")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description="Time to first audio and chunk gaps of csmd replies.")
    parser.add_argument("-n", "--replies", type=int, default=5, help="how many replies to time")
    parser.add_argument("--text", default="Testing, one, two, three.", help="what each reply says")
    parser.add_argument("--socket", type=Path, default=None, help="daemon socket (default: where csmd serve listens)")
    parser.add_argument("--max-frames", type=int, default=None, help="cap each reply (12.5 frames per second)")
    args = parser.parse_args()
    if args.replies < 1:
        parser.error("-n/--replies must be at least 1")
    path = args.socket or default_socket_path()
    try:
        return probe(path, args.replies, args.text, args.max_frames)
    except UntrustedServerError as exc:  # another user's process at the path: nothing was sent to it
        print(f"latency_probe: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        print(f"latency_probe: no csmd daemon at {path} (--socket): {exc.strerror}", file=sys.stderr)
        return 2
    except (RequestError, ConnectionLost) as exc:
        print(f"latency_probe: the daemon said {exc.code}: {exc.message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
