"""Checks that run before anything slow: what `say`, `serve` and `talk` can find out about their arguments
without loading a model (text, output path, sound devices, a daemon on the socket, the model's window).

Each raises a UserError naming the flag the user typed.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from csmd.cli.errors import flagged
from csmd.cli.options import model_spec
from csmd.errors import UserError

if TYPE_CHECKING:
    from csmd.model.config import CsmConfig
    from csmd.model.tokenizer import TextTokenizer
    from csmd.protocol.messages import Welcome
    from csmd.speak import ContextClip

PROBE_TIMEOUT = 10.0  # seconds for a daemon to answer hello


def text(value: str, flag: str = "text") -> str:
    if not value.strip():
        raise UserError(f"{flag}: nothing to say (the text is empty)")
    return value


def output_path(path: str) -> None:
    from csmd.audio import io

    with flagged("-o"):
        io.check_writable(path)


def sound_device(name: str | None, kind: str, flag: str) -> None:
    """The device exists (the default one when `name` is None)."""
    from csmd.audio.devices import device_info

    with flagged(flag):
        device_info(name, kind)


def model_argument(spec: str, flag: str = "--model") -> None:
    from csmd.model.loading import check_argument

    with flagged(flag):
        check_argument(spec)


def codec_argument(spec: str | None) -> None:
    if spec is None:
        return
    from csmd.audio.mimi.loading import check_argument

    with flagged("--codec"):
        check_argument(spec)


def tokenizer_file(path: str | None) -> TextTokenizer | None:
    """--tokenizer, read now (it is small): a bad file fails before the model loads."""
    if path is None:
        return None
    from csmd.model.tokenizer import TextTokenizer

    with flagged("--tokenizer"):
        return TextTokenizer.from_file(path)


def read_clip(path: str, transcript: str, speaker: int, flag: str) -> ContextClip:
    from csmd.speak import ContextClip

    with flagged(flag):
        return ContextClip.read(path, transcript, speaker)


@dataclass(frozen=True)
class Reply:
    """What a reply needs from the model's window: its text and speaker, the longest it may get, the clips."""

    text: str
    speaker: int
    max_frames: int
    max_seconds: float
    clips: tuple[ContextClip, ...] = ()
    clips_flag: str = "--context"


def fits_window(cfg: CsmConfig, tokenizer: TextTokenizer | None, reply: Reply, model: str) -> None:
    """The clips and the reply (text rows, a row per frame, the closing frame) fit the model's window; without
    a tokenizer the text counts only its BOS and EOS rows. The generator checks the same, but names its API."""
    window = cfg.backbone.max_seq_len

    def rows(speaker: int, words: str) -> int:
        return len(tokenizer.encode_segment(speaker, words)) if tokenizer is not None else 2

    text_rows = rows(reply.speaker, reply.text)
    clip_rows = sum(rows(c.speaker, c.text) + c.frames + 1 for c in reply.clips)
    need = clip_rows + text_rows + reply.max_frames + 1
    if need <= window:
        return
    room = window - clip_rows - text_rows - 1
    parts = [f"the text ({text_rows} rows)"]
    if clip_rows:
        parts.append(f"{reply.clips_flag} ({clip_rows} rows)")
    what = " and ".join(parts)
    if room < 1:
        verb = "fill" if clip_rows else "fills"
        raise UserError(f"{what} {verb} the window of {model} ({window} rows): shorten the text or {reply.clips_flag}")
    raise UserError(
        f"--max-seconds {reply.max_seconds:g} ({reply.max_frames} frames) with {what} needs {need} rows, "
        f"more than the window of {model} ({window} rows): use --max-seconds {room * 0.08:.2f} or less"
    )


def window_before_loading(args: argparse.Namespace, tokenizer: TextTokenizer | None, reply: Reply) -> None:
    """`fits_window` where the model's window is known without loading it (random presets, local files)."""
    from csmd.model.loading import peek_config, peek_tokenizer

    spec = model_spec(args)
    with flagged("--model"):
        cfg = peek_config(spec)
        if cfg is not None and tokenizer is None:
            tokenizer = peek_tokenizer(spec)
    if cfg is not None:
        fits_window(cfg, tokenizer, reply, spec)


# ---- the daemon ----


def probe(path: Path) -> Welcome | None:
    """The welcome of a csmd daemon listening on `path`, or None when nothing listens there."""
    from csmd.protocol.blocking_client import connect
    from csmd.protocol.errors import ConnectionLost, UntrustedServerError

    if not path.is_socket():
        return None
    try:
        with connect(path, client="csmd probe", timeout=PROBE_TIMEOUT) as client:
            return client.welcome
    except (ConnectionRefusedError, FileNotFoundError):
        return None  # a stale socket file: its daemon is gone
    except UntrustedServerError as exc:  # another user's listener: nothing was sent to it
        raise UserError(str(exc)) from exc
    except PermissionError as exc:
        raise UserError(f"{path}: not allowed to connect to this socket ({exc.strerror})") from exc
    except TimeoutError as exc:
        raise UserError(f"{path}: something listens here but did not answer in {PROBE_TIMEOUT:g} s") from exc
    except ConnectionLost as exc:
        raise UserError(f"{path}: the daemon refused this connection ({exc})") from exc


@dataclass(frozen=True)
class Daemon:
    path: Path
    welcome: Welcome


def daemon_for(args: argparse.Namespace) -> Daemon | None:
    """The daemon `say` or `talk` should speak through: the one on --socket (which must answer), else one on
    the default path if it answers; None means: load the model in this process."""
    from csmd.daemon.unix_socket import SharedSocketDirError, default_socket_path

    if args.local:
        return None
    if args.socket:
        path = Path(args.socket)
        welcome = probe(path)
        if welcome is None:
            raise UserError(
                f"--socket {path}: no csmd daemon is listening there (start one with `csmd serve --socket {path}`, "
                "or leave out --socket to load the model in this process)"
            )
        return Daemon(path, welcome)
    try:
        path = default_socket_path()
    except SharedSocketDirError:  # the default directory is not private to us: no daemon of ours is there
        return None
    welcome = probe(path)
    return Daemon(path, welcome) if welcome is not None else None


_IN_PROCESS_FLAGS = (
    ("--dtype", "dtype"),
    ("--tokenizer", "tokenizer"),
    ("--codec", "codec"),
    ("--kv-cache", "kv_cache"),
)


def model_flags_for(daemon: Daemon, args: argparse.Namespace) -> None:
    """Flags that shape a model loaded in this process mean nothing to a daemon's: refuse them rather than
    ignore them. --model is fine when it names the daemon's own model."""
    typed = [flag for flag, name in _IN_PROCESS_FLAGS if getattr(args, name, None) is not None]
    if getattr(args, "codec_bf16", False):
        typed.append("--codec-bf16")
    if args.model is not None and not _same_model(args.model, daemon.welcome.model):
        typed.insert(0, "--model")
    if typed:
        flags = " and ".join(typed)
        raise UserError(
            f"{flags}: the daemon on {daemon.path} speaks with its own model ({daemon.welcome.model}); add --local "
            f"to load {model_spec(args)} in this process, or leave out {flags}"
        )


def _same_model(ours: str, theirs: str) -> bool:
    if ours == theirs:
        return True
    a, b = Path(ours).expanduser(), Path(theirs).expanduser()
    return a.exists() and b.exists() and os.path.samefile(a, b)


def socket_to_serve(path: Path, allow_shared_dir: bool) -> None:
    """For `serve`: a socket path the platform takes, in a directory no other user can change (unless
    --allow-shared-socket-dir); checked again when binding."""
    from csmd.daemon.unix_socket import SharedSocketDirError, check_socket_dir, max_socket_path_bytes

    if path.is_dir():
        raise UserError(f"--socket {path}: is a directory; give the socket file's path, e.g. {path / 'csmd.sock'}")
    size, most = len(os.fsencode(path)), max_socket_path_bytes()
    if size > most:
        raise UserError(
            f"--socket {path}: {size} bytes, longer than Unix sockets allow here ({most}); choose a shorter one"
        )
    if allow_shared_dir or not path.parent.exists():
        return
    try:
        check_socket_dir(path.parent)
    except SharedSocketDirError as exc:
        raise UserError(f"--socket {path}: {exc}") from exc


def no_daemon_on(path: Path) -> None:
    """For `serve`: nothing already listens on `path` (checked again, race-free, when binding)."""
    if path.exists() and not path.is_socket():
        raise UserError(f"--socket {path}: exists and is not a socket; refusing to replace it")
    welcome = probe(path)
    if welcome is not None:
        raise UserError(f"a csmd daemon is already listening on {path} (model {welcome.model}); stop it first")
