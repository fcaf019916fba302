"""Render a `ConversionReport`: rich tables on a terminal, plain stable text otherwise, JSON, Markdown.

Nothing here measures anything; see `ghostify.analysis`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ghostify.analysis import ConversionReport, LatencyStats, ModelStats, SiteRow
from ghostify.atomic import atomic_write_text

SKIPPED_SHOWN = 5
_UNITS = ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K"))


def format_count(n: int | float) -> str:
    """A count in human units with two decimals: 25557032 -> "25.56M", 4.11e9 -> "4.11G", 1234 -> "1.23K"."""
    if isinstance(n, float) and not math.isfinite(n):
        return str(n)
    sign = "-" if n < 0 else ""
    value = abs(n)
    for i, (scale, unit) in enumerate(_UNITS):
        if value >= scale:
            # 999_999 rounds to "1000.00K": show it as "1.00M" instead.
            if i > 0 and round(value / scale, 2) >= 1000:
                scale, unit = _UNITS[i - 1]
            return f"{sign}{value / scale:.2f}{unit}"
    if float(value).is_integer():
        return f"{sign}{int(value)}"
    return f"{sign}{value:.2f}"


def _fewer(ratio: float | None) -> str:
    """before/after ratio of a cost as words: "1.87x fewer", "1.15x more", "same"."""
    if ratio is None:
        return "-"
    if round(ratio, 2) == 1.0:
        return "same"
    return f"{ratio:.2f}x fewer" if ratio > 1 else f"{1 / ratio:.2f}x more"


def _faster(
    speedup: float | None, before: LatencyStats | None = None, after: LatencyStats | None = None
) -> str:
    """'1.20x faster'; 'same (within noise)' when the after median lies inside the before p10-p90 spread."""
    if speedup is None:
        return "-"
    if round(speedup, 2) == 1.0:
        return "same"
    if before is not None and after is not None and before.p10_ms <= after.median_ms <= before.p90_ms:
        return f"same (within noise, {speedup:.2f}x)"
    return f"{speedup:.2f}x faster" if speedup > 1 else f"{1 / speedup:.2f}x slower"


def _site_ratio(row: SiteRow) -> str:
    ratio = row.macs_ratio
    return "-" if ratio is None else f"{ratio:.2f}x"


def _latency_cell(lat: LatencyStats | None, dash: str) -> str:
    if lat is None:
        return "not measured"
    return f"{lat.median_ms:.2f} ms ({lat.p10_ms:.2f}{dash}{lat.p90_ms:.2f})"


def _conditions(report: ConversionReport) -> str | None:
    lat = report.before.latency or report.after.latency
    if lat is None:
        return None
    return (
        f"latency: median (p10-p90) of {lat.runs} runs after {lat.warmup} warm-up, batch {lat.batch_size}, "
        f"{lat.threads} threads, device {lat.device}, before/after interleaved"
    )


def _title(report: ConversionReport) -> str:
    cfg = report.config
    keys = ["mode", "ratio"] + (["dw_size"] if cfg.get("mode") in ("c-ghost", "both") else [])
    settings = ", ".join(f"{k} {cfg[k]}" for k in keys if k in cfg)
    shape = "x".join(str(d) for d in report.before.input_shape)
    return f"ghostify: {report.model}" + (f" ({settings})" if settings else "") + f", input {shape}"


def _summary_rows(report: ConversionReport, dash: str) -> list[tuple[str, str, str, str]]:
    b, a = report.before, report.after
    rows = [
        ("params", format_count(b.params), format_count(a.params), _fewer(report.params_ratio)),
        ("MACs", format_count(b.macs), format_count(a.macs), _fewer(report.macs_ratio)),
        (
            "latency",
            _latency_cell(b.latency, dash),
            _latency_cell(a.latency, dash),
            _faster(report.latency_speedup, b.latency, a.latency),
        ),
    ]
    if report.accuracy:
        before = report.accuracy.get("original")
        stage = _result_stage(report)
        after = report.accuracy[stage] if stage else None
        for key, label in (("top1", "top-1"), ("top5", "top-5")):
            old = before[key] if before else None
            new = after[key] if after else None
            change = _points(new - old) if old is not None and new is not None else "-"
            rows.append((label, _percent(old), _percent(new), change))
    return rows


_LATENCY_HEADERS = ("form", "batch", "runs", "before", "after", "change")
LATENCY_TITLE = "latency by form and batch (ms, median and p10-p90, before/after interleaved)"


def _latency_rows(report: ConversionReport, dash: str) -> list[tuple[str, ...]]:
    """One row per (form, batch) when more than the summary's one was measured."""
    if len(report.latencies) <= 1:
        return []
    return [
        (
            row.form,
            str(row.batch_size),
            str(row.before.runs),
            _latency_cell(row.before, dash),
            _latency_cell(row.after, dash),
            _faster(row.speedup, row.before, row.after),
        )
        for row in report.latencies
    ]


def _result_stage(report: ConversionReport) -> str | None:
    """The stage the "after" column shows: the last student stage (never the original, adapted or not)."""
    stages = [s for s in report.accuracy if not s.startswith("original")]
    return stages[-1] if stages else None


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}%"


def _points(delta: float) -> str:
    """An accuracy change in percentage points: "+1.23 pts", "-0.52 pts", "same"."""
    return "same" if round(delta, 2) == 0 else f"{delta:+.2f} pts"


def _accuracy_conditions(report: ConversionReport) -> str | None:
    if not report.accuracy:
        return None
    stage = _result_stage(report)
    shown = [s for s in ("original", stage) if s in report.accuracy]
    counts = {s: int(report.accuracy[s].get("images", 0)) for s in shown}
    if len(set(counts.values())) == 1:
        images = f"{next(iter(counts.values())):,} labelled images"
    else:
        images = " / ".join(f"{n:,} ({s})" for s, n in counts.items()) + " labelled images"
    after = f"; after = {stage}" if stage else ""
    return f"accuracy: top-1 / top-5 in % on {images}{after}"


_ACCURACY_HEADERS = ("stage", "top-1", "top-5", "images", "top-1 vs original")


def _accuracy_rows(report: ConversionReport) -> list[tuple[str, ...]]:
    """One row per stage, when there are more than the two the summary table shows."""
    if len(report.accuracy) <= 2:
        return []
    original = report.accuracy.get("original")
    rows = []
    for stage, acc in report.accuracy.items():
        vs = "-" if original is None or stage == "original" else _points(acc["top1"] - original["top1"])
        rows.append(
            (stage, _percent(acc["top1"]), _percent(acc["top5"]), f"{int(acc.get('images', 0)):,}", vs)
        )
    return rows


def _site_cells(row: SiteRow, arrow: str) -> tuple[str, ...]:
    return (
        row.name,
        row.kind,
        row.detail,
        f"{format_count(row.macs_before)} {arrow} {format_count(row.macs_after)}",
        f"{format_count(row.params_before)} {arrow} {format_count(row.params_after)}",
        _site_ratio(row),
    )


def _total_cells(report: ConversionReport, arrow: str) -> tuple[str, ...]:
    macs_b = sum(r.macs_before for r in report.sites)
    macs_a = sum(r.macs_after for r in report.sites)
    params_b = sum(r.params_before for r in report.sites)
    params_a = sum(r.params_after for r in report.sites)
    ratio = "-" if not macs_a else f"{macs_b / macs_a:.2f}x"
    return (
        f"total ({len(report.sites)} sites)",
        "",
        "",
        f"{format_count(macs_b)} {arrow} {format_count(macs_a)}",
        f"{format_count(params_b)} {arrow} {format_count(params_a)}",
        ratio,
    )


_SITE_HEADERS = ("name", "kind", "detail", "MACs before -> after", "params before -> after", "MACs ratio")


_DECISION_HEADERS = ("name", "unit", "choice", "MACs before -> after", "time before -> after", "decision")


def _ms(value: float) -> str:
    return f"{value:.3f}" if value < 10 else f"{value:.2f}"


def _decision_cells(decision: Any, arrow: str) -> tuple[str, ...]:
    """One timed site of a latency selection: what it cost before and after, and what was decided."""
    timed = decision.ms_before > 0 or decision.ms_after > 0
    time = f"{_ms(decision.ms_before)} {arrow} {_ms(decision.ms_after)} ms" if timed else "-"
    return (
        decision.name,
        decision.unit,
        decision.choice,
        f"{format_count(decision.macs_before)} {arrow} {format_count(decision.macs_after)}",
        time,
        decision.reason,
    )


def _decision_totals(report: ConversionReport, arrow: str) -> list[tuple[str, ...]]:
    """One totals row per unit ("conv", "stage"): the timed sites added up, as chosen and as if every
    candidate were kept, so a report shows how much of the speed-up the sites alone can give.

    None in mode auto: there the convs of a stage are timed twice (in the original and inside its G-Ghost
    form), so their sum would count the same layers twice."""
    if report.config.get("mode") == "auto":
        return []
    rows = []
    for unit in dict.fromkeys(d.unit for d in report.decisions):
        timed = [d for d in report.decisions if d.unit == unit and d.ms_before > 0 and d.ms_after > 0]
        if not timed:
            continue
        before = sum(d.ms_before for d in timed)
        chosen = sum(d.ms_after if d.choice != "original" else d.ms_before for d in timed)
        every = sum(d.ms_after for d in timed)
        macs_b = sum(d.macs_before for d in timed)
        macs_a = sum(d.macs_after if d.choice != "original" else d.macs_before for d in timed)
        rows.append(
            (
                f"total ({len(timed)} {unit}s, each timed alone)",
                unit,
                "",
                f"{format_count(macs_b)} {arrow} {format_count(macs_a)}",
                f"{_ms(before)} {arrow} {_ms(chosen)} ms",
                f"chosen {before / chosen:.2f}x; every candidate {before / every:.2f}x",
            )
        )
    return rows


def _decisions_title(report: ConversionReport) -> str:
    kept = sum(d.choice != "original" for d in report.decisions)
    return f"latency selection: {kept} of {len(report.decisions)} timed sites kept"


def _shown_decisions(report: ConversionReport, max_rows: int | None) -> tuple[list[Any], int]:
    if max_rows is None or len(report.decisions) <= max_rows:
        return report.decisions, 0
    return report.decisions[: max(max_rows, 0)], len(report.decisions) - max(max_rows, 0)


def _shown_sites(report: ConversionReport, max_rows: int | None) -> tuple[list[SiteRow], int]:
    if max_rows is None or len(report.sites) <= max_rows:
        return report.sites, 0
    return report.sites[: max(max_rows, 0)], len(report.sites) - max(max_rows, 0)


def _skipped_lines(report: ConversionReport) -> list[str]:
    if not report.skipped:
        return []
    lines = [f"skipped: {len(report.skipped)} sites left as they were"]
    lines += [f"  {name}: {why}" for name, why in report.skipped[:SKIPPED_SHOWN]]
    if len(report.skipped) > SKIPPED_SHOWN:
        lines.append(f"  ... {len(report.skipped) - SKIPPED_SHOWN} more (use --json for all)")
    return lines


def _plain_table(headers: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    """Columns padded with spaces and separated by two spaces; a line of dashes under the header."""
    widths = [max(len(str(cells[i])) for cells in (headers, *rows)) for i in range(len(headers))]

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    return [line(headers), line(tuple("-" * w for w in widths)), *(line(r) for r in rows)]


def render_plain(report: ConversionReport, max_rows: int | None = 40) -> str:
    """The report as plain ASCII text (no colour, no box drawing), stable for scripts and tests."""
    lines = [_title(report), ""]
    lines += _plain_table(("", "before", "after", "change"), _summary_rows(report, "-"))
    lines += [c for c in (_conditions(report), _accuracy_conditions(report)) if c]
    lines.append("")
    latencies = _latency_rows(report, "-")
    if latencies:
        lines += [LATENCY_TITLE, *_plain_table(_LATENCY_HEADERS, latencies), ""]
    accuracy = _accuracy_rows(report)
    if accuracy:
        lines += [*_plain_table(_ACCURACY_HEADERS, accuracy), ""]
    if report.sites:
        shown, hidden = _shown_sites(report, max_rows)
        rows = [_site_cells(r, "->") for r in shown]
        table = _plain_table(_SITE_HEADERS, [*rows, _total_cells(report, "->")])
        # Put a dashed rule above the totals line, as under the header.
        lines += [*table[:-1], table[1], table[-1]]
        if hidden:
            lines.insert(len(lines) - 2, f"... {hidden} more rows (use --json for all)")
    else:
        lines.append("no sites converted")
    if report.decisions:
        shown, hidden = _shown_decisions(report, max_rows)
        lines += ["", _decisions_title(report)]
        totals = _decision_totals(report, "->")
        table = _plain_table(_DECISION_HEADERS, [*(_decision_cells(d, "->") for d in shown), *totals])
        if totals:  # a dashed rule above the totals, as under the header
            table.insert(len(table) - len(totals), table[1])
        lines += table
        if hidden:
            lines.append(f"... {hidden} more rows (use --json for all)")
    lines += _skipped_lines(report)
    lines += [f"note: {note}" for note in report.notes]
    return "\n".join(lines) + "\n"


def _rich_render(report: ConversionReport, console: Console, max_rows: int | None) -> None:
    summary = Table(title=escape(_title(report)), box=box.SIMPLE_HEAVY)
    summary.add_column("")
    summary.add_column("before", justify="right")
    summary.add_column("after", justify="right")
    summary.add_column("change", justify="right", style="bold")
    for label, before, after, change in _summary_rows(report, "–"):
        summary.add_row(label, before, after, _styled(change))
    console.print(summary)
    for conditions in (_conditions(report), _accuracy_conditions(report)):
        if conditions:
            console.print(f"[dim]{escape(conditions)}[/]", highlight=False)
    latencies = _latency_rows(report, "–")
    if latencies:
        table = Table(title=LATENCY_TITLE, box=box.SIMPLE)
        for header in _LATENCY_HEADERS:
            table.add_column(header, justify="left" if header == "form" else "right")
        for *cells, change in latencies:
            table.add_row(*(escape(c) for c in cells), _styled(change))
        console.print(table)
    accuracy = _accuracy_rows(report)
    if accuracy:
        table = Table(title="accuracy by stage", box=box.SIMPLE)
        for header in _ACCURACY_HEADERS:
            table.add_column(header, justify="left" if header == "stage" else "right")
        for stage, *cells, vs in accuracy:
            table.add_row(escape(stage), *cells, _styled(vs))
        console.print(table)

    if report.sites:
        shown, hidden = _shown_sites(report, max_rows)
        caption = f"... {hidden} more rows (use --json for all)" if hidden else None
        sites = Table(title="converted sites", box=box.SIMPLE, show_footer=True, caption=caption)
        totals = _total_cells(report, "→")
        for header, footer in zip(_SITE_HEADERS, totals, strict=True):
            numeric = "->" in header or "ratio" in header
            sites.add_column(
                header.replace("->", "→"),
                footer=footer,
                justify="right" if numeric else "left",
                no_wrap=header != "detail",
            )
        for row in shown:
            sites.add_row(*(escape(c) for c in _site_cells(row, "→")))
        console.print(sites)
    else:
        console.print("no sites converted")
    if report.decisions:
        shown, hidden = _shown_decisions(report, max_rows)
        caption = f"... {hidden} more rows (use --json for all)" if hidden else None
        table = Table(title=escape(_decisions_title(report)), box=box.SIMPLE, caption=caption)
        for header in _DECISION_HEADERS:
            numeric = "->" in header
            table.add_column(header.replace("->", "→"), justify="right" if numeric else "left")
        for decision in shown:
            *cells, reason = _decision_cells(decision, "→")
            style = "green" if decision.choice != "original" else "red"
            table.add_row(*(escape(c) for c in cells), f"[{style}]{escape(reason)}[/]")
        totals = _decision_totals(report, "→")
        if totals:
            table.add_section()  # a rule between the sites and their totals
        for cells in totals:
            table.add_row(*(escape(c) for c in cells), style="bold")
        console.print(table)
    for line in _skipped_lines(report):
        console.print(line, markup=False, highlight=False)
    for note in report.notes:
        console.print(f"[yellow]note:[/] {escape(note)}", highlight=False)


def _styled(change: str) -> str:
    """A change cell in rich markup: green when better, red when worse, plain when unchanged or unknown."""
    if change == "-" or change.startswith("same"):
        return change
    better = "fewer" in change or "faster" in change or change.startswith("+")
    return f"[{'green' if better else 'red'}]{change}[/]"


def render(report: ConversionReport, console: Console | None = None, max_rows: int | None = 40) -> None:
    """Print the report: rich tables on a terminal, plain text (see `render_plain`) otherwise.

    Args:
        report: what `ghostify.analysis.build_report` returned.
        console: where to print (default: a new stdout console).
        max_rows: most per-site rows to show (None: all); the totals always cover every site.
    """
    console = console or Console()
    if console.is_terminal:
        _rich_render(report, console, max_rows)
    else:
        console.out(render_plain(report, max_rows), highlight=False, end="")


def write_json(report: ConversionReport, path: str | Path) -> None:
    """Write `report.to_dict()` as JSON, atomically."""
    atomic_write_text(path, json.dumps(report.to_dict(), indent=2, default=str) + "\n")


def render_stats(stats: ModelStats, name: str, console: Console | None = None) -> None:
    """Print one model's params, MACs and latency (for `ghostify report MODEL`)."""
    console = console or Console()
    shape = "x".join(str(d) for d in stats.input_shape)
    lat = stats.latency
    lines = [
        f"{name}, input {shape}",
        f"params   {format_count(stats.params)}",
        f"MACs     {format_count(stats.macs)}",
        f"latency  {_latency_cell(lat, '-')}",
    ]
    if lat is not None:
        lines.append(
            f"latency: median (p10-p90) of {lat.runs} runs after {lat.warmup} warm-up, "
            f"batch {lat.batch_size}, {lat.threads} threads, device {lat.device}"
        )
    console.out("\n".join(lines), highlight=False)


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _md_table(headers: tuple[str, ...], rows: list[tuple[str, ...]], right: set[int]) -> list[str]:
    align = ["---:" if i in right else "---" for i in range(len(headers))]
    out = ["| " + " | ".join(_md_cell(h) for h in headers) + " |", "| " + " | ".join(align) + " |"]
    out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return out


def to_markdown(report: ConversionReport) -> str:
    """The report as Markdown: a summary table, the measurement conditions, accuracy by stage (when more
    than two stages were measured), every site, the latency selection's decisions (if any), skipped
    sites, notes."""
    lines = [f"## {_title(report)}", ""]
    lines += _md_table(("", "before", "after", "change"), _summary_rows(report, "–"), {1, 2, 3})
    for conditions in (_conditions(report), _accuracy_conditions(report)):
        if conditions:
            lines += ["", f"_{conditions}_"]
    lines.append("")
    latencies = _latency_rows(report, "–")
    if latencies:
        title = f"### {LATENCY_TITLE[0].upper()}{LATENCY_TITLE[1:]}"
        lines += [title, "", *_md_table(_LATENCY_HEADERS, latencies, {1, 2, 3, 4, 5}), ""]
    accuracy = _accuracy_rows(report)
    if accuracy:
        lines += ["### Accuracy", "", *_md_table(_ACCURACY_HEADERS, accuracy, {1, 2, 3, 4}), ""]
    if report.sites:
        rows = [_site_cells(r, "→") for r in report.sites]
        total = tuple(f"**{c}**" if c else "" for c in _total_cells(report, "→"))
        headers = tuple(h.replace("->", "→") for h in _SITE_HEADERS)
        lines += ["### Converted sites", "", *_md_table(headers, [*rows, total], {3, 4, 5}), ""]
    else:
        lines += ["No sites converted.", ""]
    if report.decisions:
        rows = [_decision_cells(d, "→") for d in report.decisions]
        rows += [tuple(f"**{c}**" if c else "" for c in t) for t in _decision_totals(report, "→")]
        headers = tuple(h.replace("->", "→") for h in _DECISION_HEADERS)
        title = _decisions_title(report)
        lines += [f"### {title[0].upper()}{title[1:]}", "", *_md_table(headers, rows, {3, 4}), ""]
    if report.skipped:
        lines += [f"### Skipped ({len(report.skipped)})", ""]
        lines += [f"- `{name}`: {why}" for name, why in report.skipped]
        lines.append("")
    if report.notes:
        lines += ["### Notes", "", *(f"- {note}" for note in report.notes), ""]
    return "\n".join(lines)
