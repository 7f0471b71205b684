"""What every scenario of `csmd bench run` reports, in one shape: named figures, each a set of samples with
their median and spread, and series for the charts. Rendered as a terminal table, Markdown or JSON, and two
JSON reports compared figure by figure (`csmd bench compare`).

A figure says which way is better (`lower`, `higher`, or `none` for a count that is only information), so a
comparison can tell a regression from an improvement.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

Better = Literal["lower", "higher", "none"]
BETTER = ("lower", "higher", "none")
FORMAT = "csmd-bench/1"  # the JSON report's format: compare refuses others


@dataclass(frozen=True)
class Figure:
    """One measured quantity: its samples (one per repetition, or per frame for an interval)."""

    name: str
    unit: str
    samples: tuple[float, ...]
    better: Better = "lower"

    @property
    def median(self) -> float:
        return float(np.median(self.samples)) if self.samples else math.nan

    @property
    def spread(self) -> tuple[float, float]:
        """The 25th and 75th percentiles (the middle half of the samples)."""
        if not self.samples:
            return math.nan, math.nan
        low, high = np.percentile(self.samples, [25, 75])
        return float(low), float(high)

    def as_dict(self) -> dict[str, Any]:
        low, high = self.spread
        return {
            "name": self.name,
            "unit": self.unit,
            "better": self.better,
            "median": self.median,
            "p25": low,
            "p75": high,
            "n": len(self.samples),
            "samples": list(self.samples),
        }


def figure(name: str, unit: str, samples: list[float] | tuple[float, ...], better: Better = "lower") -> Figure:
    return Figure(name, unit, tuple(float(s) for s in samples), better)


@dataclass
class ScenarioResult:
    """One scenario's figures, where it ran (`in-process`, `daemon` or `socket`), with what parameters, and
    the series its charts draw (for instance every frame interval, or time to first audio per context)."""

    scenario: str
    where: str
    params: dict[str, Any]
    figures: list[Figure] = field(default_factory=list)
    series: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what could not be measured here, and why

    def as_dict(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "where": self.where,
            "params": self.params,
            "figures": [f.as_dict() for f in self.figures],
            "series": self.series,
            "notes": self.notes,
        }


@dataclass
class Report:
    command: str  # as typed, so that the numbers can be made again
    model: str
    machine: dict[str, Any]
    results: list[ScenarioResult] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "command": self.command,
            "model": self.model,
            "machine": self.machine,
            "results": [r.as_dict() for r in self.results],
        }

    def write_json(self, path: Path) -> None:
        path.write_text(json.dumps(self.as_dict(), indent=2) + "\n")


class ReportError(ValueError):
    """A file that is not a `csmd bench run --json` report."""


def load_report(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise ReportError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except json.JSONDecodeError as exc:
        raise ReportError(f"{path} is not JSON ({exc.msg}, line {exc.lineno})") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ReportError(f"{path} is not a csmd bench report (written by `csmd bench run --json`)")
    problem = _shape_problem(data)
    if problem:
        raise ReportError(f"{path}: a csmd bench report with {problem}")
    return data


def _shape_problem(data: dict[str, Any]) -> str | None:
    """What `changes` reads, checked: every result's scenario, where and figures, every figure's name, unit,
    numeric median and direction."""
    results = data.get("results")
    if not isinstance(results, list):
        return "no list of results"
    for i, result in enumerate(results):
        if not isinstance(result, dict) or not all(isinstance(result.get(k), str) for k in ("scenario", "where")):
            return f"result {i} without a scenario and where it ran"
        figures = result.get("figures")
        if not isinstance(figures, list):
            return f"result {i} without a list of figures"
        for f in figures:
            ok = isinstance(f, dict) and all(isinstance(f.get(k), str) for k in ("name", "unit"))
            if not ok or not isinstance(f.get("median"), int | float) or f.get("better") not in BETTER:
                return f"a figure of result {i} that is not a name, unit, numeric median and better ({f!r:.80})"
    return None


# -- rendering ---------------------------------------------------------------------------------------------


def _number(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _rows(result: ScenarioResult) -> list[list[str]]:
    rows = []
    for f in result.figures:
        low, high = f.spread
        spread = "" if len(f.samples) < 2 else f"{_number(low)} .. {_number(high)}"
        rows.append([f.name, _number(f.median), spread, f.unit, str(len(f.samples))])
    return rows


HEADER = ["figure", "median", "middle half", "unit", "n"]


def _heading(result: ScenarioResult) -> str:
    params = ", ".join(f"{k} {v}" for k, v in result.params.items())
    return f"{result.scenario} ({result.where}; {params})" if params else f"{result.scenario} ({result.where})"


def table(report: Report) -> str:
    """The terminal form: one aligned table per scenario."""
    out = [f"model {report.model}"]
    for result in report.results:
        rows = [HEADER, *_rows(result)]
        widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER))]
        out.append("")
        out.append(_heading(result))
        for row in rows:
            cells = [row[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(row[1:], widths[1:], strict=True)]
            out.append("  " + "  ".join(cells))
        out.extend(f"  note: {note}" for note in result.notes)
    return "\n".join(out)


def markdown(report: Report) -> str:
    """BENCHMARKS.md's form: the machine and the command, then one table per scenario."""
    machine = ", ".join(f"{k} {v}" for k, v in report.machine.items())
    out = [f"Model `{report.model}`; machine: {machine}.", "", "```bash", report.command, "```"]
    for result in report.results:
        out += ["", f"**{_heading(result)}**", "", "| " + " | ".join(HEADER) + " |"]
        out.append("| --- | ---: | ---: | --- | ---: |")
        out += ["| " + " | ".join(row) + " |" for row in _rows(result)]
        out += [f"\n{note}" for note in result.notes]
    return "\n".join(out) + "\n"


# -- comparing two reports ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Change:
    scenario: str
    figure: str
    unit: str
    before: float
    after: float
    better: Better

    @property
    def ratio(self) -> float:
        return self.after / self.before if self.before else math.nan

    def regressed(self, threshold: float) -> bool:
        """Worse by more than `threshold` (a fraction: 0.1 is 10%)."""
        if math.isnan(self.ratio):
            return False
        if self.better == "lower":
            return self.ratio > 1 + threshold
        if self.better == "higher":
            return self.ratio < 1 - threshold
        return False


def changes(before: dict[str, Any], after: dict[str, Any]) -> tuple[list[Change], list[str]]:
    """The figures both reports have (matched by scenario, where it ran, and name), and the names of those
    only one of them has."""

    def figures(report: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
        return {(f"{r['scenario']} ({r['where']})", f["name"]): f for r in report["results"] for f in r["figures"]}

    a, b = figures(before), figures(after)
    found = [
        Change(key[0], key[1], b[key]["unit"], float(a[key]["median"]), float(b[key]["median"]), b[key]["better"])
        for key in a
        if key in b
    ]
    unmatched = [f"{s}: {n}" for s, n in sorted(set(a) ^ set(b))]
    return found, unmatched


def format_changes(found: list[Change], threshold: float) -> str:
    out = []
    for c in found:
        mark = "WORSE" if c.regressed(threshold) else ""
        ratio = "n/a" if math.isnan(c.ratio) else f"{c.ratio:.3f}x"
        values = f"{_number(c.before):>9} -> {_number(c.after):>9} {c.unit:9} {ratio:>8}"
        out.append(f"{c.scenario:32} {c.figure:34} {values}  {mark}".rstrip())
    return "\n".join(out)
