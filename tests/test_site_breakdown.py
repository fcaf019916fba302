"""benchmarks/site_breakdown.py: a latency selection's sites grouped by layer pattern."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "site_breakdown.py"
_spec = importlib.util.spec_from_file_location("site_breakdown", SCRIPT)
site_breakdown = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(site_breakdown)


def _decision(name: str, ms_before: float, ms_after: float, choice: str = "c-ghost") -> dict:
    return {
        "name": name,
        "unit": "conv",
        "choice": choice,
        "input_shape": [1, 64, 56, 56],
        "ms_before": ms_before,
        "ms_after": ms_after,
        "macs_before": 200,
        "macs_after": 100,
    }


def test_pattern_replaces_block_indices_only() -> None:
    assert site_breakdown.pattern("layer2.3.conv2") == "layer2.*.conv2"
    assert site_breakdown.pattern("layer1.0.downsample.0") == "layer1.*.downsample.*"
    assert site_breakdown.pattern("features.12") == "features.*"
    assert site_breakdown.pattern("conv1") == "conv1"


def test_groups_sum_times_and_count_kept_sites() -> None:
    decisions = [
        _decision("layer1.0.conv1", 2.0, 1.0),
        _decision("layer1.1.conv1", 2.0, 3.0, choice="original"),
        _decision("layer1.0.conv2", 4.0, 2.0),
        {**_decision("layer9.0.conv1", 0.0, 0.0), "input_shape": []},  # not timed: left out
    ]
    groups = site_breakdown.group_sites(decisions)
    assert list(groups) == [("conv", "layer1.*.conv1"), ("conv", "layer1.*.conv2")]
    first = groups[("conv", "layer1.*.conv1")]
    assert (first["sites"], first["kept"], first["ms_before"], first["ms_after"]) == (2, 1, 4.0, 4.0)


def test_main_puts_the_sites_beside_the_whole_model(tmp_path, capsys) -> None:
    report = {
        "model": "toy",
        "macs_ratio": 1.8,
        "decisions": [_decision("layer1.0.conv1", 3.0, 1.0), _decision("layer1.1.conv1", 3.0, 2.0)],
        "latencies": [
            {"form": "eager", "batch_size": 1, "before": {"median_ms": 20.0}, "after": {"median_ms": 15.0}},
            {"form": "deploy", "batch_size": 1, "before": {"median_ms": 10.0}, "after": {"median_ms": 8.0}},
        ],
    }
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    site_breakdown.main([str(path)])
    out = " ".join(capsys.readouterr().out.split())
    # Sites: 6 ms of the 10 ms deploy-form model; 6 -> 3 ms, so at best 10 / (4 + 3) = 1.43x.
    assert "6.00 -> 3.00 ms summed: 2.00x if every candidate kept" in out
    assert "the timed sites are 60% of it" in out and "would give 1.43x" in out
    assert "10.00 -> 8.00 ms (1.25x) with MACs 1.80x fewer" in out


def test_a_report_without_timed_sites_is_refused(tmp_path) -> None:
    path = tmp_path / "report.json"
    path.write_text(json.dumps({"model": "toy"}))
    with pytest.raises(SystemExit, match="no timed sites; run with --select latency"):
        site_breakdown.main([str(path)])
