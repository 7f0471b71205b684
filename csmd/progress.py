"""Progress bars for slow array work (loading, building and converting weights), in bytes, as
huggingface_hub shows its downloads.

A bar goes to stderr once the work has taken a second (so quick loads, like `random:tiny`, print nothing)
and is off with `HF_HUB_DISABLE_PROGRESS_BARS=1` (huggingface_hub's switch) or `TQDM_DISABLE=1`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import mlx.core as mx

SHOW_AFTER_SECONDS = 1.0


def bars_disabled() -> bool:
    return any(os.environ.get(name, "").lower() in ("1", "true", "yes", "on") for name in _SWITCHES)


_SWITCHES = ("HF_HUB_DISABLE_PROGRESS_BARS", "TQDM_DISABLE")


def evaluate(arrays: Iterable[mx.array], what: str) -> None:
    """`mx.eval` each array in turn (reading, casting or generating it), counting its bytes on a bar."""
    from tqdm import tqdm

    todo = list(arrays)
    total = sum(a.nbytes for a in todo)
    with tqdm(
        total=total,
        desc=what,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        delay=SHOW_AFTER_SECONDS,
        disable=bars_disabled(),
    ) as bar:
        for array in todo:
            mx.eval(array)
            bar.update(array.nbytes)
