"""The `csmd` command (`csmd.cli:main`): one module per command, the parser (parser.py), the checks made
before anything slow (checks.py), and one rule for failures (here and errors.py):

- a user error (a bad flag value, a missing file, the HF hub out of reach, no sound device, a daemon's
  refusal) is one line, `csmd: error: ...`, naming the flag, and exit status 2;
- Ctrl-C ends the work in progress with its summary (exit 0), or exits 130 if nothing had run yet;
- anything else is a bug: its traceback, a line saying so, and exit status 1.
"""

from __future__ import annotations

import sys

from csmd import environment
from csmd.cli.errors import DaemonFault, show_bug, show_user_error, user_errors
from csmd.cli.interrupt import INTERRUPTED
from csmd.cli.parser import build_parser

__all__ = ["build_parser", "main"]


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # --help, or a bad argument (already reported in one line)
        return done.code if isinstance(done.code, int) else 2
    try:
        environment.check()  # a bad CSMD_* variable is the user's error, whatever the command
        return int(args.func(args))
    except (SystemExit, GeneratorExit):
        raise
    except BrokenPipeError:
        return _reader_left()
    except BaseException as exc:  # trio raises what its nurseries collect as groups
        return _failed(exc)


def _reader_left() -> int:
    """The output's reader stopped reading (`csmd info | head -1`, `| grep -q`): not a failure of csmd's, so
    no traceback and exit 0 (a script under `set -o pipefail` then judges by its reader). Output still
    buffered would fail again at exit: stdout goes to /dev/null first."""
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 0


def _failed(exc: BaseException) -> int:
    leaves = _leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc]
    if all(isinstance(e, KeyboardInterrupt) for e in leaves):
        print("\ncsmd: interrupted", file=sys.stderr)
        return INTERRUPTED
    expected = user_errors()
    if all(isinstance(e, expected) for e in leaves):
        for leaf in leaves:
            show_user_error(leaf)
        return 2
    if all(isinstance(e, (DaemonFault, *expected)) for e in leaves):
        for leaf in leaves:
            show_user_error(leaf)
        show_bug(None)
        return 1
    show_bug(exc)
    return 1


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out
