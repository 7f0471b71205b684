"""`csmd bench run --plot DIR`: PNG charts of a report, drawn with matplotlib (the `bench` extra).

One chart per series a scenario recorded: the frame-interval histogram (`reply`), time to first audio
against context length, cached and prefilled (`context`), and the concurrency curve (`concurrency`).
"""

from __future__ import annotations

from pathlib import Path

from csmd.bench.report import Report
from csmd.errors import UserError


def plot(report: Report, directory: Path) -> list[Path]:
    """Write the charts into `directory` (made if missing); returns the files written."""
    try:
        import matplotlib
    except ImportError as exc:
        raise UserError('--plot needs matplotlib: pip install "csmd[bench]"') from exc
    matplotlib.use("Agg")  # files only: no screen needed
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for result in report.results:
        series = result.series
        fig, ax = plt.subplots(figsize=(7, 4))
        if "frame_intervals_ms" in series:
            ax.hist(series["frame_intervals_ms"], bins=40)
            ax.set_xlabel("time between audio chunks (ms)")
            ax.set_ylabel("chunks")
            ax.axvline(80, color="black", linestyle="--", label="80 ms: real time")
            ax.legend()
        elif "context_rows" in series:
            ax.plot(series["context_rows"], series["cached_ms"], marker="o", label="context in the KV cache")
            ax.plot(series["context_rows"], series["prefilled_ms"], marker="o", label="context prefilled")
            ax.set_xlabel("rows of context before the reply")
            ax.set_ylabel("time to first audio (ms)")
            ax.legend()
        elif "sessions" in series:
            ax.plot(series["sessions"], series["aggregate_fps"], marker="o", label="aggregate frames/s")
            ax.plot(series["sessions"], [12.5] * len(series["sessions"]), linestyle="--", label="one real-time stream")
            ax.set_xlabel("sessions speaking at once")
            ax.set_ylabel("frames per second")
            ax.legend()
        else:
            plt.close(fig)
            continue
        ax.set_title(f"{result.scenario} ({result.where}), {report.model}")
        fig.tight_layout()
        path = directory / f"{result.scenario}-{result.where}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
