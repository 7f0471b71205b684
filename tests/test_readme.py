"""Every shell command README.md shows is run here, so the README cannot rot.

Each ```bash block runs as one script (its `\\` continuations joined), in a temporary directory of its own,
offline (HF_HUB_OFFLINE=1), with no daemon in reach unless it asks for one. A block that must not run as
written is preceded immediately by one marker line:

- `<!-- readme: synopsis -->`: usage lines with [placeholders]; every flag shown must exist in that command's
  `--help`
- `<!-- readme: needs network -->`, `<!-- readme: needs sound -->`: skipped here
- `<!-- readme: install -->`: pip/apt lines, run by .ci/run instead
- `<!-- readme: needs daemon -->`: run against `csmd serve --model random:tiny`, reached through the default
  socket path (XDG_RUNTIME_DIR)
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from serving import csmd_serve

from csmd.cli import main

README = Path(__file__).resolve().parent.parent / "README.md"
MARKERS = ("synopsis", "needs network", "needs sound", "install", "needs daemon")
SKIPPED = {"needs network": "needs the network", "needs sound": "needs a sound device", "install": "run by .ci/run"}
_MARKER = re.compile(r"^<!-- readme: (.+?) -->$")
_FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*|-o)(?![\w-])")
BLOCK_TIMEOUT = 600  # seconds; the slowest block (a benchmark of the tiny model) takes well under a minute


@dataclass(frozen=True)
class Block:
    line: int  # of the opening fence, 1-based
    marker: str | None
    script: str

    @property
    def commands(self) -> list[str]:
        """Its command lines, continuations joined, comments and blank lines dropped."""
        joined = re.sub(r"\\\n\s*", " ", self.script)
        return [c.strip() for c in joined.splitlines() if c.strip() and not c.strip().startswith("#")]


def bash_blocks(text: str) -> list[Block]:
    lines = text.splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        if lines[i].strip() == "```bash":
            start = i
            previous = lines[i - 1].strip() if i else ""
            match = _MARKER.match(previous)
            i += 1
            body = []
            while lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            blocks.append(Block(start + 1, match[1] if match else None, "\n".join(body) + "\n"))
        i += 1
    return blocks


BLOCKS = bash_blocks(README.read_text())


def test_markers_are_known_and_every_block_is_found() -> None:
    text = README.read_text()
    for marker in _MARKER.findall("\n".join(line.strip() for line in text.splitlines())):
        assert marker in MARKERS, f"unknown README marker {marker!r}; known: {MARKERS}"
    assert len(BLOCKS) == text.count("```bash")
    assert any(b.marker is None for b in BLOCKS) and any(b.marker == "needs daemon" for b in BLOCKS)


def _environment(runtime_dir: Path) -> dict[str, str]:
    """Offline, csmd from this checkout on PATH, and a runtime directory of our own (no daemon but ours)."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(README.parent), env.get("PYTHONPATH")) if p)
    env["HF_HUB_OFFLINE"] = "1"
    env["XDG_RUNTIME_DIR"] = str(runtime_dir)
    return env


def _private_dir(factory: pytest.TempPathFactory, name: str) -> Path:
    path = factory.mktemp(name)
    path.chmod(0o700)  # the daemon's default socket directory must be private
    return path


@pytest.fixture(scope="module")
def daemon_runtime_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """`csmd serve --model random:tiny` on the default socket of a runtime directory of its own (one daemon
    for every block that needs one)."""
    runtime_dir = _private_dir(tmp_path_factory, "daemon-run")
    with csmd_serve(None, env=_environment(runtime_dir), listening_on=runtime_dir / "csmd" / "csmd.sock"):
        yield runtime_dir


def _run(block: Block, cwd: Path, runtime_dir: Path) -> None:
    script = "set -euo pipefail\n" + block.script
    done = subprocess.run(["bash", "-c", script], cwd=cwd, env=_environment(runtime_dir), capture_output=True,
                          text=True, timeout=BLOCK_TIMEOUT, check=False)  # fmt: skip
    assert done.returncode == 0, (
        f"README line {block.line}:\n{block.script}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    )


def _command_flags(command: str) -> tuple[list[str], list[str]]:
    """(the csmd subcommand path, e.g. ["bench", "frame"], the flags shown) of one synopsis line."""
    words = shlex.split(command.replace("[", " ").replace("]", " ").replace("|", " "))
    assert words[0] == "csmd", f"a synopsis line that is not a csmd command: {command!r}"
    sub = [words[1]] + ([words[2]] if words[1] == "bench" else [])
    return sub, sorted(set(_FLAG.findall(command)))


def _help(sub: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main([*sub, "--help"]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("block", BLOCKS, ids=[f"line{b.line}-{b.marker or 'run'}" for b in BLOCKS])
def test_readme_block(
    block: Block, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    if block.marker in SKIPPED:
        pytest.skip(SKIPPED[block.marker])
    if block.marker == "synopsis":
        for command in block.commands:
            sub, flags = _command_flags(command)
            shown = _help(sub, capsys)
            missing = [f for f in flags if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", shown)]
            assert not missing, f"README line {block.line}: `csmd {' '.join(sub)} --help` has no {missing}"
        return
    cwd = tmp_path_factory.mktemp("readme")
    # The README's commands run at the root of a checkout: examples/ is there (nothing the commands write is).
    (cwd / "examples").symlink_to(Path(__file__).resolve().parent.parent / "examples", target_is_directory=True)
    if block.marker == "needs daemon":
        _run(block, cwd, request.getfixturevalue("daemon_runtime_dir"))
    else:
        _run(block, cwd, _private_dir(tmp_path_factory, "run"))
