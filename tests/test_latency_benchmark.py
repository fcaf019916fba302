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
    ],
)
def test_bad_peer_options_get_one_line_error(args, message) -> None:
    done = _bench(*QUICK, *args)
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr


@needs_torch_pruning
def test_peer_include_prunes_only_the_inner_channels_of_a_cifar_resnet() -> None:
    # Only the blocks' inner channels: the option-A shortcuts' zero padding keeps the residual width fixed.
    inner = _bench(*QUICK, "--peer-round-to", "1", "--peer-include", r"layer\d\.\d+\.conv1$")
    assert inner.returncode == 0, inner.stderr[-2000:]
    row = next(line for line in inner.stdout.splitlines() if line.startswith("| Torch-Pruning |"))
    assert "n/a" not in row
    assert "only the output channels of convs matching 'layer\\d\\.\\d+\\.conv1$'" in inner.stdout
    peer_macs_x = float(row.split("|")[3].strip().rstrip("x"))
    assert 1.8 < peer_macs_x < 2.0


@needs_torch_pruning
def test_peer_include_matching_no_conv_says_so_in_the_peer_row() -> None:
    done = _bench(*QUICK, "--peer-include", "no_such_layer$")
    assert done.returncode == 0, done.stderr[-2000:]
    row = "| Torch-Pruning | n/a (--peer-include 'no_such_layer$' matches no conv of this model)"
    assert row in done.stdout
