"""What `csmd` shows when a command fails: a user error is one line and exit 2; anything else is a bug,
shown with its traceback, exit 1, and a line saying so.

User errors are `csmd.errors.UserError` (and the subclasses csmd's audio code raises) plus the library's
errors about what the user handed it: checkpoint and tokenizer files, a daemon already running, the
recognizer or chat endpoint of `talk`. Each is re-raised at the edge with the flag it came from
(`flagged`), so the line says which one to fix.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata

from csmd.errors import UserError


class DaemonFault(Exception):
    """The daemon failed at something it should not have (its `internal` error): one line, exit 1, marked as
    a bug. The traceback is in the daemon's log, not here."""


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception types that are the user's to fix (imported late: they live in heavy modules)."""
    from csmd.daemon.unix_socket import DaemonRunningError, SharedSocketDirError
    from csmd.model.errors import CheckpointError
    from csmd.model.tokenizer import TokenizerError
    from csmd.protocol.errors import UntrustedServerError
    from csmd.talk.recognizer import RecognizerError
    from csmd.talk.responder import ResponderError

    return (
        UserError, CheckpointError, TokenizerError, DaemonRunningError, SharedSocketDirError, UntrustedServerError,
        RecognizerError, ResponderError,
    )  # fmt: skip


@contextmanager
def flagged(flag: str) -> Iterator[None]:
    """Re-raise a user error from inside as a UserError that starts with the flag it came from."""
    try:
        yield
    except UserError as exc:
        if str(exc).startswith("-"):  # already names its flag
            raise
        raise UserError(f"{flag}: {exc}") from exc
    except Exception as exc:
        if not isinstance(exc, user_errors()):
            raise
        raise UserError(f"{flag}: {exc}") from exc


def show_user_error(exc: BaseException) -> None:
    print(f"csmd: error: {exc}", file=sys.stderr)


def show_bug(exc: BaseException | None) -> None:
    """The traceback (if the fault was here), then one line saying this is csmd's fault and where to report it."""
    if exc is not None:
        traceback.print_exception(exc)
    where = _issue_tracker()
    report = f" at {where}" if where else ""
    print(
        f"csmd: internal error: this is a bug in csmd, not in what you typed; please report it{report} "
        "with the traceback above and the output of `csmd info`",
        file=sys.stderr,
    )


def _issue_tracker() -> str | None:
    """The package's issue tracker URL, if its metadata names one."""
    try:
        urls = metadata.metadata("csmd").get_all("Project-URL") or []
    except metadata.PackageNotFoundError:
        return None
    for entry in urls:
        label, _, url = entry.partition(",")
        if label.strip().lower() in ("issues", "bug tracker", "bugs", "tracker"):
            return url.strip()
    return None
