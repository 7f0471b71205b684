"""`csmd bench run` (named scenarios through a daemon, reports, charts) and `csmd bench compare`.

The scenarios run on random:tiny, short: what is checked is that every figure is there and sane (orders that
must hold, shares within 0..100%), not how fast anything is.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from csmd.bench.daemon import daemon_in_thread
from csmd.bench.report import Report, ScenarioResult, changes, figure, load_report, markdown, table
from csmd.cli import main
from csmd.daemon.server import Daemon
from csmd.model.generator import Generator
from csmd.model.loading import load_model

RUN = ["bench", "run", "--model", "random:tiny", "--repeats", "2", "--warmup", "0", "--frames", "5"]


def _figures(report: dict, scenario: str) -> dict[str, dict]:
    (result,) = [r for r in report["results"] if r["scenario"] == scenario]
    return {f["name"]: f for f in result["figures"]}


def test_reply_and_context_scenarios_report_every_figure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report.json"
    args = [*RUN, "--scenarios", "reply,context", "--json", str(out), "--markdown", str(tmp_path / "r.md")]
    assert main([*args, "--plot", str(tmp_path / "plots")]) == 0
    printed = capsys.readouterr().out
    report = load_report(out)
    assert report["command"].startswith("csmd bench run") or report["command"] == "csmd bench run"
    reply = _figures(report, "reply")
    for name in (
        "time to first byte", "time to first audio", "time to first non-silent audio", "frame interval p50",
        "frame interval p95", "frame interval p99", "frame interval jitter (std)", "real-time factor",
        "Mimi share of a frame", "cancel to end of stream", "peak RSS (this process)", "MLX peak memory",
    ):  # fmt: skip
        assert name in reply, name
        assert name in printed
    median = {name: f["median"] for name, f in reply.items()}
    assert 0 < median["time to first byte"] <= median["time to first audio"] <= median["time to first non-silent audio"]
    assert 0 < median["frame interval p50"] <= median["frame interval p95"] <= median["frame interval p99"]
    assert 0 < median["Mimi share of a frame"] < 100 and median["real-time factor"] > 0
    assert median["cancel to end of stream"] > 0 and median["peak RSS (this process)"] > 10
    assert reply["time to first audio"]["n"] == 2 and len(reply["time to first audio"]["samples"]) == 2
    context = _figures(report, "context")
    assert {f"first audio, {rows} rows {how}" for rows in (0, 200) for how in ("cached", "prefilled")} <= set(context)
    (result,) = [r for r in report["results"] if r["scenario"] == "context"]
    assert result["series"]["context_rows"][0] == 0 and result["series"]["context_rows"][1] >= 200
    assert (tmp_path / "r.md").read_text().count("| figure |") == 2
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["context-daemon.png", "reply-daemon.png"]


def test_a_running_daemon_is_measured_through_its_socket(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    loaded = load_model("random:tiny")
    from csmd.audio.mimi.loading import load_mimi

    daemon = Daemon(Generator(loaded.model, loaded.tokenizer), load_mimi("random:tiny"), "random:tiny")
    out = tmp_path / "socket.json"
    with daemon_in_thread(daemon) as path:
        args = ["--socket", str(path), "--scenarios", "reply", "--repeats", "1", "--json", str(out)]
        assert main([*RUN[:2], *args]) == 0
        capsys.readouterr()
        # More frames than that daemon's window: its refusal, one line naming the flags, not a traceback.
        assert main([*RUN[:2], "--socket", str(path), "--scenarios", "reply", "--frames", "100000"]) == 2
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("csmd: error:")]
        assert len(errors) == 1 and "Traceback" not in err and "internal error" not in err, err
        assert "--socket" in errors[0] and "--frames 100000" in errors[0] and "max_frames" in errors[0]
    report = load_report(out)
    assert report["model"] == "random:tiny"
    (result,) = report["results"]
    assert result["where"] == "socket"
    names = {f["name"] for f in result["figures"]}
    assert {"time to first audio", "frame interval p95", "cancel to end of stream", "peak RSS (daemon)"} <= names
    assert any("only measured for a daemon in this process" in note for note in result["notes"])


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--scenarios", "reply,bogus"], "--scenarios"),
        (["--scenarios", "reply,reply"], "--scenarios"),
        (["--socket", "/nonexistent/csmd.sock", "--scenarios", "reply"], "--socket"),
        (["--socket", "/nonexistent/csmd.sock", "--scenarios", "reply,frame"], "--scenarios frame"),
        (["--json", "/nonexistent/dir/r.json"], "--json"),
        (["--repeats", "0"], "--repeats"),
        (["--frames", "100000000"], "--frames"),
        (["--plot", __file__], "--plot"),
        (["--plot", "/nonexistent/dir/charts"], "--plot"),
    ],
)
def test_bad_arguments_are_one_line_naming_the_flag(
    args: list[str], flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*RUN, *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag in err[0] and "Traceback" not in err[0], err


def _report(**medians: float) -> Report:
    report = Report("csmd bench run", "random:tiny", {"cores": 2})
    result = ScenarioResult("reply", "daemon", {})
    result.figures += [
        figure("time to first audio", "ms", [medians["ttfa"]]),
        figure("real-time factor", "x", [medians["rtf"]], better="higher"),
        figure("bandwidth floor", "ms", [medians["floor"]], better="none"),
    ]
    report.results.append(result)
    return report


def test_compare_flags_what_got_worse_and_only_that(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before, after = tmp_path / "a.json", tmp_path / "b.json"
    _report(ttfa=100, rtf=2.0, floor=10).write_json(before)
    _report(ttfa=105, rtf=1.9, floor=30).write_json(after)  # within 10%; a "none" figure never regresses
    assert main(["bench", "compare", str(before), str(after)]) == 0
    assert "WORSE" not in capsys.readouterr().out
    _report(ttfa=100, rtf=1.5, floor=10).write_json(after)  # the real-time factor fell by 25%
    assert main(["bench", "compare", str(before), str(after)]) == 3
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[2:5] for line in out if "WORSE" in line] == [["real-time", "factor", "2.00"]]
    assert main(["bench", "compare", str(before), str(after), "--threshold", "30"]) == 0
    _report(ttfa=150, rtf=2.0, floor=10).write_json(after)
    assert main(["bench", "compare", str(before), str(after)]) == 3


def test_compare_refuses_what_is_not_a_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good, bad = tmp_path / "a.json", tmp_path / "b.json"
    _report(ttfa=100, rtf=2.0, floor=10).write_json(good)
    bad.write_text(json.dumps({"model": "x"}))
    shapeless = tmp_path / "c.json"  # the right format tag, but a figure without its median
    report = _report(ttfa=100, rtf=2.0, floor=10).as_dict()
    del report["results"][0]["figures"][0]["median"]
    shapeless.write_text(json.dumps(report))
    for other in (bad, tmp_path / "missing.json", shapeless):
        assert main(["bench", "compare", str(good), str(other)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(other) in err[0]


def test_changes_match_figures_by_scenario_where_and_name() -> None:
    a, b = _report(ttfa=100, rtf=2.0, floor=10).as_dict(), _report(ttfa=50, rtf=4.0, floor=10).as_dict()
    b["results"][0]["figures"].pop()  # the floor only in the first
    found, unmatched = changes(a, b)
    assert [(c.figure, c.ratio) for c in found] == [("time to first audio", 0.5), ("real-time factor", 2.0)]
    assert unmatched == ["reply (daemon): bandwidth floor"]


def test_figures_give_median_and_middle_half() -> None:
    f = figure("x", "ms", [1, 2, 3, 4, 100])
    assert f.median == 3 and f.spread == (2, 4)
    text = table(_report(ttfa=100, rtf=2.0, floor=10))
    assert "time to first audio" in text and "real-time factor" in text
    assert "| time to first audio | 100 |" in markdown(_report(ttfa=100, rtf=2.0, floor=10))
