"""Watching the contexts a daemon or conversation makes, to check what they hold."""

from __future__ import annotations

import pytest

from csmd.model.generator import Context, Generator


def capture_contexts(generator: Generator, monkeypatch: pytest.MonkeyPatch) -> list[Context]:
    """Every context `generator.new_context` makes from now on (until the test ends), in order."""
    contexts: list[Context] = []
    original = generator.new_context

    def new_context(max_positions: int | None = None) -> Context:
        contexts.append(original(max_positions))
        return contexts[-1]

    monkeypatch.setattr(generator, "new_context", new_context)
    return contexts
