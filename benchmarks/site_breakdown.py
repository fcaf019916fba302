"""Where the time goes: a latency selection's per-site timings grouped by layer pattern.

A `--select latency` (or `--mode auto`) run times every candidate site alone, in deploy form, before and
after. This groups those sites by their name with block indices replaced by `*` (`layer2.*.conv2`), so a
network of dozens of blocks reads as a handful of rows: MACs ratio next to the measured time ratio, and each
group's share of the original's time. The last lines put the timed sites next to the whole model's latency,
which says how much of the model the sites cover and what the speed-up could be if every site kept its
candidate (sites timed on --target cpu: the report's whole-model times are torch's, on the CPU). Mode auto
times a stage's convs twice, so its sites are grouped but not added up.

    ghostify resnet50 --mode c-ghost --select latency --min-speedup 0.01 --out r50-c-ghost
    python benchmarks/site_breakdown.py r50-c-ghost/report.json
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ghostify.report import format_count


def pattern(name: str) -> str:
    """`layer2.3.conv2` -> `layer2.*.conv2`: block indices out, so repeated blocks group together."""
    return re.sub(r"(?<=\.)\d+(?=\.|$)", "*", name)


def group_sites(decisions: list[dict]) -> dict[tuple[str, str], dict[str, float]]:
    """(unit, pattern) -> summed MACs and median times (ms) of the timed sites, original and candidate."""
    groups: dict[tuple[str, str], dict[str, float]] = {}
    for d in decisions:
        if not (d["ms_before"] > 0 and d["ms_after"] > 0):
            continue
        g = groups.setdefault(
            (d["unit"], pattern(d["name"])),
            {"sites": 0, "macs_before": 0, "macs_after": 0, "ms_before": 0.0, "ms_after": 0.0, "kept": 0},
        )
        g["sites"] += 1
        g["kept"] += d["choice"] != "original"
        for key in ("macs_before", "macs_after", "ms_before", "ms_after"):
            g[key] += d[key]
    return groups


HEADERS = ("sites", "unit", "kept", "MACs before -> candidate", "MACs ratio", "ms before -> candidate",
           "time ratio", "share of the unit's time")  # fmt: skip


def whole_model(report: dict, batch: int) -> dict | None:
    """The report's deploy-form latency row at `batch` (the form the sites were timed in), if measured."""
    rows = [r for r in report.get("latencies", []) if r["form"] == "deploy" and r["batch_size"] == batch]
    return rows[0] if rows else None


def main(argv: list[str] | None = None) -> None:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("report", type=Path, help="report.json of a --select latency or --mode auto run")
    args = parser.parse_args(argv)
    try:
        report = json.loads(args.report.read_text())
    except (OSError, ValueError) as err:
        sys.exit(f"error: cannot read {args.report}: {err}")
    decisions = report.get("decisions") or []
    if not decisions:
        sys.exit(f"error: {args.report} has no timed sites; run with --select latency or --mode auto.")
    groups = group_sites(decisions)
    totals = {unit: sum(g["ms_before"] for (u, _), g in groups.items() if u == unit) for unit, _ in groups}

    table = Table(title=f"{report['model']}: timed sites grouped by layer, each site timed alone")
    for header in HEADERS:
        table.add_column(header, justify="left" if header in ("sites", "unit") else "right")
    for (unit, name), g in groups.items():
        table.add_row(
            f"{name} (x{g['sites']})",
            unit,
            f"{g['kept']}/{g['sites']}",
            f"{format_count(g['macs_before'])} -> {format_count(g['macs_after'])}",
            f"{g['macs_before'] / g['macs_after']:.2f}x",
            f"{g['ms_before']:.2f} -> {g['ms_after']:.2f}",
            f"{g['ms_before'] / g['ms_after']:.2f}x",
            f"{100 * g['ms_before'] / totals[unit]:.0f}%",
        )
    console = Console(width=160)
    console.print(table)

    if report.get("config", {}).get("mode") == "auto":
        console.print("mode auto times a stage's convs twice (original and G-Ghost form): not added up")
        return
    batch = next((d["input_shape"][0] for d in decisions if d["input_shape"]), 1)
    model = whole_model(report, batch)
    for unit in totals:
        rows = [g for (u, _), g in groups.items() if u == unit]
        ms_b, ms_a = sum(g["ms_before"] for g in rows), sum(g["ms_after"] for g in rows)
        summed = f"{ms_b:.2f} -> {ms_a:.2f} ms summed"
        console.print(f"{unit}s: {summed}: {ms_b / ms_a:.2f}x if every candidate kept")
        if model and unit == "conv":
            total = model["before"]["median_ms"]
            rest = max(total - ms_b, 0.0)
            console.print(
                f"  whole original in deploy form at batch {batch}: {total:.2f} ms, so the timed sites are "
                f"{100 * ms_b / total:.0f}% of it; the rest ({rest:.2f} ms) unchanged, every candidate kept "
                f"would give {total / (rest + ms_a):.2f}x"
            )
    if model:
        before, after = model["before"]["median_ms"], model["after"]["median_ms"]
        console.print(
            f"measured whole model, deploy form, batch {batch}: {before:.2f} -> {after:.2f} ms "
            f"({before / after:.2f}x) with MACs {report['macs_ratio']:.2f}x fewer"
        )


if __name__ == "__main__":
    main()
