"""The CIFAR-10 example runs end to end on the real data of ../shared (a small slice of it)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO / ".." / "shared"


needs_data = pytest.mark.skipif(
    not (SHARED / "data" / "cifar10-jpeg" / "train.tar.gz").is_file(), reason="needs ../shared/data"
)


def _run_rows(tmp_path: Path, *args: str) -> tuple[dict, str]:
    """Run the example on a slice of the real data; its rows by name and its stdout."""
    out = tmp_path / "rows.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "examples" / "cifar10_resnet56.py"), *args, "--workers", "0",
         "--work", str(tmp_path / "cifar"), "--json", str(out), "--quiet"],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return {r["row"]: r for r in json.loads(out.read_text())["rows"]}, done.stdout


@needs_data
def test_cifar10_example_writes_every_stage_of_a_ghost_row(tmp_path) -> None:
    rows, stdout = _run_rows(
        tmp_path, "--rows", "teacher,c-ghost", "--limit-train", "512", "--limit-val", "256",
        "--epochs", "0.75", "--teacher-epochs", "0.25", "--blockwise", "0.25", "--fit-images", "128",
    )  # fmt: skip
    assert set(rows["c-ghost"]["top1"]) == {"teacher", "converted", "calibrated", "blockwise", "distilled"}
    assert rows["c-ghost"]["steps"] == {"teacher": 1, "blockwise": 1, "end-to-end": 1}
    assert rows["c-ghost"]["macs"] < 0.55 * rows["teacher"]["macs"]
    assert "| c-ghost |" in stdout  # the Markdown table at the end
    assert 0 <= rows["c-ghost"]["train_top1"] <= 100 and rows["teacher"]["train_top1"] > 50
    assert "train top-1" in stdout


@needs_data
def test_cifar10_example_include_converts_only_the_matching_convs(tmp_path) -> None:
    rows, _ = _run_rows(
        tmp_path, "--rows", "teacher,c-ghost", "--include", r"conv2$", "--limit-train", "256", "--limit-val",
        "64", "--epochs", "0.5", "--teacher-epochs", "0", "--calib-batches", "1",
    )  # fmt: skip
    # the blocks' second convs hold about half of ResNet-56's MACs; converting them at s=2 saves half of that
    assert 0.7 < rows["c-ghost"]["macs"] / rows["teacher"]["macs"] < 0.8


@needs_data
def test_cifar10_example_peer_rows_match_each_ghost_forms_macs(tmp_path) -> None:
    pytest.importorskip("torch_pruning")
    # the G-Ghost peer first: its target then comes from its own conversion, not from the g-ghost row
    rows, stdout = _run_rows(
        tmp_path, "--rows", "torch-pruning-g,g-ghost,c-ghost,torch-pruning", "--limit-train", "256",
        "--limit-val", "64", "--epochs", "0.5", "--teacher-epochs", "0", "--calib-batches", "1",
    )  # fmt: skip
    macs = {row: figures["macs"] for row, figures in rows.items()}
    for peer, ghost in (("torch-pruning-g", "g-ghost"), ("torch-pruning", "c-ghost")):
        assert abs(macs[peer] - macs[ghost]) < 0.03 * macs[ghost], (peer, macs)
    assert macs["g-ghost"] < 0.85 * macs["c-ghost"]  # so the two peers really differ
    assert "| torch-pruning-g |" in stdout


@needs_data
def test_cifar10_example_peer_row_matches_the_limited_conversion(tmp_path) -> None:
    pytest.importorskip("torch_pruning")
    rows, _ = _run_rows(
        tmp_path, "--rows", "teacher,torch-pruning", "--include", r"conv2$", "--limit-train", "256",
        "--limit-val", "64", "--epochs", "0.5", "--teacher-epochs", "0",
    )  # fmt: skip
    # C-Ghost on the second convs only saves about a quarter of the MACs, and the peer matches that
    assert 0.7 < rows["torch-pruning"]["macs"] / rows["teacher"]["macs"] < 0.8


@pytest.mark.parametrize(
    "args, message",
    [
        (["--feature-weight", "-1"], "error: loss weights .* must be >= 0"),
        (["--optimizer", "lion"], "error: optimizer must be one of sgd, adamw"),
        (["--teacher-epochs", "1", "--epochs", "1"], "leave nothing of the --epochs 1 budget"),
        (["--include", "layer(1"], "error: --include 'layer\\(1' is not a valid regular expression"),
        (["--fit-images", "-5"], "--fit-images must be >= 0"),
    ],
)
def test_cifar10_example_refuses_bad_options_in_one_line_before_reading_data(tmp_path, args, message) -> None:
    out = tmp_path / "rows.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "examples" / "cifar10_resnet56.py"), "--rows", "c-ghost",
         "--work", str(tmp_path / "cifar"), "--json", str(out), *args],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 1
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert re.search(message, done.stderr), done.stderr
    assert not out.exists() and not (tmp_path / "cifar").exists()  # nothing unpacked, nothing written
