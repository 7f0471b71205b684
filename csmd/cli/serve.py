"""`csmd serve`: the daemon on a Unix socket. A daemon already on the socket, or a bad model or codec
argument, is found before the model loads; SIGINT or SIGTERM stop it cleanly (exit 0)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from csmd.cli import checks
from csmd.cli.options import model_spec
from csmd.cli.runtime import apply_runtime
from csmd.cli.voice import load_voice


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    import trio

    from csmd.daemon.server import Daemon, default_socket_path, serve_until_signal

    path = Path(args.socket) if args.socket else default_socket_path()
    checks.no_daemon_on(path)
    spec = model_spec(args)
    checks.model_argument(spec)
    checks.codec_argument(args.codec)
    tokenizer = checks.tokenizer_file(args.tokenizer)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    apply_runtime(args)
    voice = load_voice(args, tokenizer)
    daemon = Daemon(voice.generator, voice.mimi, spec, args.max_sessions)
    trio.run(serve_until_signal, daemon, path, lambda p: print(f"csmd: serving {spec} on {p}", flush=True))
    print(f"csmd: stopped serving on {path}", file=sys.stderr)
    return 0
