"""Model and codec arguments that name an HF hub repo: telling them from local paths, and downloads whose
failures say what to do.

A path the user means is never sent to the hub: anything that exists, starts like a path (`./`, `../`, `/`,
`~`) or names a checkpoint file (`.safetensors`, `.pt`, ...) is local, and a missing one is "no such file".
Only `owner/name` is a repo id. Download failures become `HubError`s that name the repo and say what to do:
a gated repo needs its terms accepted and `hf auth login`; without the hub a local path or a `random:`
preset still works.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from csmd.errors import UserError

# Suffixes of files a model or codec argument may name; a repo id never ends in one of these.
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".json", ".model", ".gguf", ".npz")
# HF's rule for each half of a repo id: letters, digits, '-', '_', '.', not starting or ending with - or .
_REPO_PART = re.compile(r"^(?![-.])[\w.-]{1,96}(?<![-.])$")


class HubError(UserError):
    """The HF hub could not give us a repo; the message names it and says what to do."""


def looks_local(spec: str) -> bool:
    """Whether `spec` is a path the user means (so it must never be looked up on the hub)."""
    if spec in (".", "..") or spec.startswith(("./", "../", "/", "~")):
        return True
    if Path(spec).expanduser().exists():
        return True
    return spec.lower().endswith(CHECKPOINT_SUFFIXES)


def is_repo_id(spec: str) -> bool:
    """`owner/name` as the hub spells repo ids (and not a path: see `looks_local`)."""
    parts = spec.split("/")
    return len(parts) == 2 and all(_REPO_PART.match(p) and ".." not in p and "--" not in p for p in parts)


def download(
    repo_id: str, *, files: Sequence[str] | None = None, patterns: Sequence[str] | None = None, fallback: str
) -> Path:
    """The local directory holding `files` (or everything matching `patterns`) of `repo_id`, downloaded into
    huggingface_hub's cache unless already there. `fallback` is what to use instead without the hub (a
    `random:` preset), for the message."""
    import httpx
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    instead = f"pass a local checkpoint path, or {fallback} to run without weights (random weights do not speak)"
    try:
        if files is not None:
            paths = [Path(hf_hub_download(repo_id, name)) for name in files]
            return paths[0].parent
        return Path(snapshot_download(repo_id, allow_patterns=list(patterns or ())))
    except GatedRepoError as exc:  # (a RepositoryNotFoundError, so first)
        raise HubError(
            f"{repo_id} is a gated repo: accept its terms on https://huggingface.co/{repo_id} and log in with "
            f"`hf auth login` (or {instead})"
        ) from exc
    except RepositoryNotFoundError as exc:
        raise HubError(
            f"{repo_id}: no such repo on the HF hub (or it is private: log in with `hf auth login`); "
            "a local path must exist, or start with ./ or /"
        ) from exc
    except RevisionNotFoundError as exc:
        raise HubError(f"{repo_id}: the HF hub has no such revision of it ({exc})") from exc
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, httpx.TransportError) as exc:
        # Offline (HF_HUB_OFFLINE=1) or unreachable, and not in the cache either.
        why = "HF_HUB_OFFLINE is set" if _offline() else f"the HF hub is out of reach: {_first_line(exc)}"
        raise HubError(f"{repo_id} is not in the local HF cache and {why}; {instead}") from exc
    except EntryNotFoundError as exc:
        raise HubError(f"{repo_id} lacks a file csmd needs ({_first_line(exc)})") from exc
    except HfHubHTTPError as exc:
        raise HubError(f"{repo_id}: the HF hub refused the download: {_first_line(exc)}") from exc


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[0].removeprefix("Got: ") if lines else type(exc).__name__
