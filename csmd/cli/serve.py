"""`csmd serve`: the daemon on a Unix socket. A daemon already on the socket, or a bad model or codec
argument, is found before the model loads; SIGINT or SIGTERM stop it cleanly (exit 0)."""

from __future__ import annotations

import argparse
import math
import signal
import sys
from functools import partial
from pathlib import Path

from csmd.cli import checks
from csmd.cli.options import model_spec
from csmd.cli.runtime import apply_runtime
from csmd.cli.voice import load_voice

WARM_BATCH_SIZES = 8  # batched decodes traced at start: up to this many streams


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    import trio

    from csmd.daemon.limits import Limits
    from csmd.daemon.server import Daemon, serve_until_signal
    from csmd.daemon.unix_socket import default_socket_path

    path = Path(args.socket) if args.socket else default_socket_path()
    checks.socket_to_serve(path, args.allow_shared_socket_dir)
    checks.no_daemon_on(path)
    limits = Limits(
        max_connections=args.max_connections,
        max_sessions=args.max_sessions,
        max_sessions_per_connection=args.max_sessions_per_connection,
        idle_timeout=args.idle_timeout or math.inf,  # 0: never
    )
    spec = model_spec(args)
    checks.model_argument(spec)
    checks.codec_argument(args.codec)
    tokenizer = checks.tokenizer_file(args.tokenizer)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    apply_runtime(args)
    voice = load_voice(args, tokenizer)
    # Each size of a batched Mimi decode is one compiled trace: made now, for the sizes up to the default
    # session limit, rather than on the first frame that many sessions speak together (a 50-150 ms hiccup).
    voice.mimi.warm_up_batches(range(2, min(limits.max_sessions, WARM_BATCH_SIZES) + 1))
    daemon = Daemon(voice.generator, voice.mimi, spec, limits)

    served: list[Path] = []

    def announce(where: Path) -> None:
        served.append(where)
        print(f"csmd: serving {spec} on {where}", flush=True)

    try:
        try:
            trio.run(partial(serve_until_signal, allow_shared_dir=args.allow_shared_socket_dir), daemon, path, announce)
        finally:
            if served:  # the daemon has stopped: later signals have nothing left to stop
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
    except KeyboardInterrupt:
        # A second Ctrl-C during the shutdown is delivered again once the daemon has stopped (trio keeps it
        # until then): it has nothing left to interrupt. Before the daemon served, it is an interruption (130).
        if not served:
            raise
    print(f"csmd: stopped serving on {path}", file=sys.stderr)
    return 0
