"""benchmarks/latency.py: the pruning peer's scope options (bad values; the CIFAR ResNets' inner peer)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "latency.py"
# one timed round of the small CIFAR ResNet-20: the tests read MACs and text, never latency
QUICK = ["--models", "examples/cifar_resnet.py:resnet20", "--input-size", "32", "--batch-sizes", "1"]
QUICK += ["--repeats", "1", "--warmup", "0", "--markdown"]
INNER = r"layer\d\.\d+\.conv1$"  # the blocks' inner channels: option-A shortcuts fix the residual width
needs_torch_pruning = pytest.mark.skipif(
    importlib.util.find_spec("torch_pruning") is None, reason="needs torch-pruning (the dev or bench extra)"
)


def _bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600, cwd=REPO
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--peer-include", "layer(1"], "--peer-include is not a valid regex"),
        (["--peer-round-to", "0"], "--peer-round-to must be >= 1"),
        (["--peer-at", "c-ghost,pruning"], "--peer-at takes ghost modes from"),
        (["--peer-at", "g-ghost", "--no-peer"], "--peer-at and --no-peer exclude each other"),
        (["--batch-sizes", "1,abc"], "--batch-sizes takes comma-separated positive integers"),
    ],
)
def test_bad_peer_options_get_one_line_error(args, message) -> None:
    done = _bench(*QUICK, *args)
    assert done.returncode == 2
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1


@needs_torch_pruning
def test_peer_include_prunes_only_the_inner_channels_of_a_cifar_resnet() -> None:
    # Only the blocks' inner channels: the option-A shortcuts' zero padding keeps the residual width fixed.
    inner = _bench(*QUICK, "--peer-round-to", "1", "--peer-include", INNER)
    assert inner.returncode == 0, inner.stderr[-2000:]
    row = next(
        line for line in inner.stdout.splitlines() if line.startswith("| Torch-Pruning (= C-Ghost MACs) |")
    )
    assert "n/a" not in row
    assert "only the output channels of convs matching 'layer\\d\\.\\d+\\.conv1$'" in inner.stdout
    peer_macs_x = float(row.split("|")[3].strip().rstrip("x"))
    assert 1.8 < peer_macs_x < 2.0


@needs_torch_pruning
def test_peer_include_matching_no_conv_says_so_in_the_peer_row() -> None:
    done = _bench(*QUICK, "--peer-include", "no_such_layer$")
    assert done.returncode == 0, done.stderr[-2000:]
    row = "| Torch-Pruning (= C-Ghost MACs) | n/a (--peer-include 'no_such_layer$' "
    row += "matches no conv of this model)"
    assert row in done.stdout


@needs_torch_pruning
def test_peer_at_adds_one_peer_per_ghost_variant_at_its_macs() -> None:
    done = _bench(*QUICK, "--peer-at", "c-ghost,g-ghost", "--peer-round-to", "1", "--peer-include", INNER)
    assert done.returncode == 0, done.stderr[-2000:]
    cells = {
        line.split("|")[1].strip(): line.split("|") for line in done.stdout.splitlines() if line[:2] == "| "
    }
    numbers = {label: row for label, row in cells.items() if label != "variant" and "n/a" not in row[2]}
    macs_x = {label: float(row[3].strip().rstrip("x")) for label, row in numbers.items()}
    for ghost in ("C-Ghost", "G-Ghost"):  # each peer within 3% of the MACs it was pruned to
        assert abs(macs_x[f"Torch-Pruning (= {ghost} MACs)"] / macs_x[ghost] - 1) < 0.03
    assert macs_x["G-Ghost"] < 0.8 * macs_x["C-Ghost"]  # ResNet-20: G-Ghost saves less, so the peers differ
