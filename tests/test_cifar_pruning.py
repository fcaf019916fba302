"""The example's pruning peer: inner channels only, to a MACs budget, residual width untouched."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("torch_pruning")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import cifar_resnet  # noqa: E402
from cifar_pruning import prune_inner_channels  # noqa: E402

from ghostify.analysis import count_macs  # noqa: E402


def test_prune_inner_channels_meets_the_budget_and_keeps_the_residual_width() -> None:
    torch.manual_seed(0)
    model = cifar_resnet.resnet20().eval()
    example = torch.randn(1, 3, 32, 32)
    before = count_macs(model, example)[0]
    pruned, ratio = prune_inner_channels(model, example, before // 2)
    after = count_macs(pruned, example)[0]
    assert abs(after - before // 2) < 0.03 * before  # channel counts are whole: MACs move in steps
    assert 0.3 < ratio < 0.7
    blocks = [pruned.layer1[0], pruned.layer2[0], pruned.layer3[0]]
    assert [b.conv2.out_channels for b in blocks] == [16, 32, 64]  # residual width as it was
    assert all(b.conv1.out_channels < b.conv2.out_channels for b in blocks)  # inner channels pruned
    assert pruned(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert count_macs(model, example)[0] == before  # the caller's model is not touched
