"""Two conversations speaking at once over one trio client; the second is cancelled mid-reply.

    python examples/trio_app.py --max-frames 50 --cancel-after 5

Sessions "a" and "b" each ask for a reply, and both replies are read at once, each by its own task. The
daemon advances every running reply one frame at a time in turn, so their chunks arrive interleaved.
After `--cancel-after` chunks of "b" the app cancels it: generation stops at the next frame boundary, the
chunks already on their way still arrive, and the reply ends with reason "cancelled". Session "a" is
untouched and runs to its end. Prints what each session got and the order in which chunks arrived. Exit
status: 0 on success, 2 if no daemon listens at the socket path, 1 if the daemon refused or failed a request.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import trio

from csmd.daemon.unix_socket import default_socket_path
from csmd.protocol import trio_client
from csmd.protocol.errors import ConnectionLost, RequestError, UntrustedServerError

TEXTS = {"a": "I will say my whole sentence.", "b": "I am going to be interrupted."}


async def listen(speech: trio_client.Speech, cancel_after: int | None, arrivals: list[str], rate: int) -> str:
    """Read one reply to its end (cancelling it after `cancel_after` chunks) and describe what came back."""
    chunks = samples = 0
    cancelled = None
    async for chunk in speech:  # float32 samples of one 80 ms frame each
        chunks += 1
        samples += len(chunk.pcm)
        arrivals.append(speech.session)
        if chunks == cancel_after:
            # Answered once the daemon stopped; meanwhile the reader keeps delivering this speech's chunks.
            cancelled = await speech.cancel()
    end = speech.end  # the audio.end record
    assert end is not None
    seconds = samples / rate
    line = f"session {speech.session}: {chunks} chunks, {end.frames} frames ({seconds:.2f} s), reason {end.reason}"
    if cancelled is not None:
        line += f"; cancel sent after chunk {cancel_after}, the daemon had sent {cancelled.frames_sent} frames"
    return line


async def run(socket_path: Path, max_frames: int | None, cancel_after: int) -> int:
    arrivals: list[str] = []  # which session each chunk came from, in order
    reports: dict[str, str] = {}
    failures = 0
    async with trio_client.open_client(socket_path, client="trio-app") as client:
        print(f"connected to {client.welcome.server}, model {client.welcome.model}")
        speeches = []
        try:
            for session, text in TEXTS.items():
                await client.open_session(session)
                # Returns once the daemon accepted the request (audio.start): from then on it generates.
                speeches.append(await client.start_speaking(session, text, 0, max_frames=max_frames))
        except (RequestError, ConnectionLost) as exc:
            print(f"trio_app: the daemon said {exc.code}: {exc.message}", file=sys.stderr)
            return 1

        async def report(speech: trio_client.Speech, cancel: int | None) -> None:
            # Each task reports its own failure: an exception would cancel the other task and leave the
            # nursery wrapped in an ExceptionGroup.
            nonlocal failures
            try:
                reports[speech.session] = await listen(speech, cancel, arrivals, client.welcome.sample_rate)
            except (RequestError, ConnectionLost) as exc:
                reports[speech.session] = f"session {speech.session}: failed: {exc.code}: {exc.message}"
                failures += 1

        async with trio.open_nursery() as nursery:  # both replies are read at once, each by its own task
            nursery.start_soon(report, speeches[0], None)
            nursery.start_soon(report, speeches[1], cancel_after)
    for session in sorted(reports):
        print(reports[session])
    print("arrival order:", "".join(arrivals))
    return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(description="Two csmd sessions speaking at once; one is cancelled mid-reply.")
    parser.add_argument("--socket", type=Path, default=None, help="daemon socket (default: where csmd serve listens)")
    parser.add_argument("--max-frames", type=int, default=None, help="cap each reply (12.5 frames per second)")
    parser.add_argument("--cancel-after", type=int, default=5, help="cancel session b after this many chunks")
    args = parser.parse_args()
    if args.cancel_after < 1:
        parser.error("--cancel-after must be at least 1")
    path = args.socket or default_socket_path()
    try:
        return trio.run(run, path, args.max_frames, args.cancel_after)
    except UntrustedServerError as exc:  # another user's process at the path: nothing was sent to it
        print(f"trio_app: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        print(f"trio_app: no csmd daemon at {path} (--socket): {exc.strerror}", file=sys.stderr)
        return 2
    except ConnectionLost as exc:  # the handshake failed, or the daemon went away
        print(f"trio_app: the daemon said {exc.code}: {exc.message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
