"""ghostify.report: plain text off a terminal, rich tables on one, atomic JSON, Markdown."""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console

from ghostify.analysis import ConversionReport, LatencyStats, ModelStats, SiteRow, set_accuracy
from ghostify.evaluate import EvalResult
from ghostify.report import format_count, render, to_markdown, write_json

BOX_CHARS = set("─│┃━┏┓┗┛┡┩╇╋┼├┤┬┴╭╮╰╯═║╔╗╚╝")


def _latency(median: float) -> LatencyStats:
    return LatencyStats(
        median_ms=median,
        p10_ms=median * 0.9,
        p90_ms=median * 1.2,
        runs=20,
        warmup=5,
        batch_size=1,
        threads=2,
        device="cpu",
    )


def _report(n_sites: int = 3, latency: bool = True) -> ConversionReport:
    sites = [
        SiteRow(
            name=f"layer1.{i}.conv2",
            kind="c-ghost",
            detail="Conv2d 64->64 k3x3 s1 +bn+relu",
            macs_before=115_605_504,
            macs_after=59_006_976,
            params_before=36_992,
            params_after=18_880,
        )
        for i in range(n_sites)
    ]
    return ConversionReport(
        model="resnet50",
        config={"mode": "c-ghost", "ratio": 2, "dw_size": 3},
        before=ModelStats(25_557_032, 4_089_184_256, (1, 3, 224, 224), _latency(120.0) if latency else None),
        after=ModelStats(13_020_000, 2_180_000_000, (1, 3, 224, 224), _latency(100.0) if latency else None),
        sites=sites,
        skipped=[(f"skip{i}", f"reason {i}") for i in range(7)],
        notes=["fewer MACs is not lower latency"],
    )


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (25_557_032, "25.56M"),
        (4.11e9, "4.11G"),
        (1234, "1.23K"),
        (999, "999"),
        (999_999, "1.00M"),
        (0, "0"),
        (2.5e12, "2.50T"),
        (-1500, "-1.50K"),
    ],
)
def test_format_count(n: float, text: str) -> None:
    assert format_count(n) == text


def test_render_plain_off_terminal() -> None:
    buf = io.StringIO()
    render(_report(), Console(file=buf, width=120))
    out = buf.getvalue()
    assert not BOX_CHARS & set(out)
    assert "\x1b[" not in out
    assert out.isascii()
    lines = out.splitlines()
    assert lines[0] == "ghostify: resnet50 (mode c-ghost, ratio 2, dw_size 3), input 1x3x224x224"
    params = next(line for line in lines if line.startswith("params"))
    assert params.split() == ["params", "25.56M", "13.02M", "1.96x", "fewer"]
    macs = next(line for line in lines if line.startswith("MACs"))
    assert macs.split() == ["MACs", "4.09G", "2.18G", "1.88x", "fewer"]
    latency = next(line for line in lines if line.startswith("latency "))
    assert "120.00 ms (108.00-144.00)" in latency and latency.endswith("1.20x faster")  # 100 ms < p10 108
    assert "batch 1, 2 threads, device cpu" in out and "20 runs after 5 warm-up" in out
    site = next(line for line in lines if line.startswith("layer1.0.conv2"))
    assert "115.61M -> 59.01M" in site and site.endswith("1.96x")
    total = next(line for line in lines if line.startswith("total (3 sites)"))
    assert "346.82M -> 177.02M" in total
    assert "skipped: 7 sites left as they were" in out
    assert "  skip0: reason 0" in out and "skip5" not in out and "... 2 more" in out
    assert "note: fewer MACs is not lower latency" in out


def test_render_plain_truncates_rows_but_totals_cover_all() -> None:
    buf = io.StringIO()
    render(_report(n_sites=10), Console(file=buf, width=120), max_rows=4)
    out = buf.getvalue()
    assert sum(line.startswith("layer1.") for line in out.splitlines()) == 4
    assert "... 6 more rows (use --json for all)" in out
    assert "total (10 sites)" in out

    buf = io.StringIO()
    render(_report(n_sites=10), Console(file=buf, width=120), max_rows=None)
    assert sum(line.startswith("layer1.") for line in buf.getvalue().splitlines()) == 10


def test_render_without_latency_or_sites() -> None:
    report = _report(n_sites=0, latency=False)
    buf = io.StringIO()
    render(report, Console(file=buf, width=120))
    out = buf.getvalue()
    assert "not measured" in out and "no sites converted" in out
    assert "threads" not in out


def test_render_on_terminal_uses_rich_tables() -> None:
    buf = io.StringIO()
    report = _report(n_sites=50)
    report.notes.append("a [bracketed] note")
    render(report, Console(file=buf, width=140, force_terminal=True, color_system="truecolor"), max_rows=5)
    out = buf.getvalue()
    assert "\x1b[" in out  # styled
    assert "25.56M" in out and "1.96x fewer" in out and "1.20x faster" in out
    assert "45 more rows" in out and "[bracketed]" in out


def test_write_json_round_trips_atomically(tmp_path) -> None:
    path = tmp_path / "out" / "report.json"
    report = _report()
    write_json(report, path)
    write_json(report, path)  # overwriting works too
    with open(path) as f:
        data = json.load(f)
    assert data["model"] == "resnet50"
    assert data["macs_ratio"] == pytest.approx(4_089_184_256 / 2_180_000_000)
    assert data["latency_speedup"] == pytest.approx(1.2)
    assert len(data["sites"]) == 3 and len(data["skipped"]) == 7
    assert "conventions" in data
    assert [p.name for p in path.parent.iterdir()] == ["report.json"]


def test_to_markdown_has_tables() -> None:
    md = to_markdown(_report())
    assert md.startswith("## ghostify: resnet50")
    assert "|  | before | after | change |" in md
    assert "| params | 25.56M | 13.02M | 1.96x fewer |" in md
    assert "| layer1.0.conv2 | c-ghost |" in md
    assert "### Skipped (7)" in md and "- `skip6`: reason 6" in md
    assert "### Notes" in md


def _with_accuracy(*stages: str) -> ConversionReport:
    report = _report()
    figures = {
        "original": (76.13, 92.86),
        "converted": (0.52, 2.10),
        "calibrated": (41.00, 66.50),
        "distilled": (75.61, 92.70),
    }
    for stage in stages:
        top1, top5 = figures[stage]
        set_accuracy(report, stage, EvalResult(top1=top1, top5=top5, images=50_000, seconds=1.0))
    return report


def _plain(report: ConversionReport) -> str:
    buf = io.StringIO()
    render(report, Console(file=buf, width=160))
    return buf.getvalue()


def test_render_plain_accuracy_rows_for_original_vs_result() -> None:
    out = _plain(_with_accuracy("original", "distilled"))
    assert out.isascii()
    lines = out.splitlines()
    top1 = next(line for line in lines if line.startswith("top-1"))
    assert top1.split() == ["top-1", "76.13%", "75.61%", "-0.52", "pts"]
    top5 = next(line for line in lines if line.startswith("top-5"))
    assert top5.split() == ["top-5", "92.86%", "92.70%", "-0.16", "pts"]
    assert "accuracy: top-1 / top-5 in % on 50,000 labelled images; after = distilled" in out
    assert "stage" not in out  # two stages: the summary table says it all


def test_render_plain_accuracy_table_for_every_stage() -> None:
    out = _plain(_with_accuracy("original", "converted", "calibrated", "distilled"))
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("stage"))
    assert header.split() == ["stage", "top-1", "top-5", "images", "top-1", "vs", "original"]
    assert next(line for line in lines if line.startswith("original ")).split()[-1] == "-"
    calibrated = next(line for line in lines if line.startswith("calibrated"))
    assert calibrated.split() == ["calibrated", "41.00%", "66.50%", "50,000", "-35.13", "pts"]
    # Summary rows compare the original with the last stage measured.
    assert next(line for line in lines if line.startswith("top-1")).split()[2] == "75.61%"
    assert lines.index(header) < next(i for i, line in enumerate(lines) if line.startswith("name"))


def test_accuracy_without_original_or_result() -> None:
    out = _plain(_with_accuracy("original"))
    assert next(line for line in out.splitlines() if line.startswith("top-1")).split() == [
        "top-1",
        "76.13%",
        "-",
        "-",
    ]
    assert "after =" not in out
    out = _plain(_with_accuracy("distilled"))
    assert next(line for line in out.splitlines() if line.startswith("top-1")).split()[1:3] == ["-", "75.61%"]


def test_no_accuracy_leaves_the_output_as_it_was() -> None:
    out = _plain(_report())
    assert "top-1" not in out and "accuracy" not in out
    assert "top-1" not in to_markdown(_report())


def test_render_rich_accuracy() -> None:
    buf = io.StringIO()
    report = _with_accuracy("original", "converted", "calibrated", "distilled")
    render(report, Console(file=buf, width=160, force_terminal=True, color_system="truecolor"))
    out = buf.getvalue()
    assert "\x1b[" in out
    for text in (
        "top-1",
        "76.13%",
        "75.61%",
        "-0.52 pts",
        "accuracy by stage",
        "calibrated",
        "after = distilled",
    ):
        assert text in out


def test_markdown_and_json_accuracy(tmp_path) -> None:
    report = _with_accuracy("original", "converted", "distilled")
    md = to_markdown(report)
    assert "| top-1 | 76.13% | 75.61% | -0.52 pts |" in md
    assert "_accuracy: top-1 / top-5 in % on 50,000 labelled images; after = distilled_" in md
    assert "### Accuracy" in md and "| converted | 0.52% | 2.10% | 50,000 | -75.61 pts |" in md
    assert "### Accuracy" not in to_markdown(_with_accuracy("original", "distilled"))

    write_json(report, tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text())
    assert list(data["accuracy"]) == ["original", "converted", "distilled"]
    assert data["accuracy"]["distilled"] == {"top1": 75.61, "top5": 92.70, "images": 50_000}


def test_latency_change_inside_the_spread_is_called_noise() -> None:
    report = _report()
    report.before.latency = _latency(1.0)  # p10-p90 0.9-1.2 ms
    report.after.latency = _latency(0.95)
    buf = io.StringIO()
    render(report, Console(file=buf, width=120))
    latency = next(line for line in buf.getvalue().splitlines() if line.startswith("latency "))
    assert latency.endswith("same (within noise, 1.05x)")
