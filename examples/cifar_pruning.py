"""Channel-pruning baseline for the CIFAR ResNets of `cifar_resnet.py`: Torch-Pruning, L2 group magnitude.

Only the blocks' *inner* channels are pruned: each BasicBlock's conv1 output channels, bn1 and conv2's
input channels. The residual width (stem conv1, every block's conv2/bn2 output, the linear layer) stays as
is: the option-A shortcuts are parameter-free `x[:, :, ::2, ::2]` plus a fixed zero-pad of planes // 4
channels per side, so there is nothing to prune them with. Removing residual channels would leave the pad
adding the wrong (and too many) channels, and the sums in the blocks would no longer line up.

One uniform ratio is applied to every block and bisected to meet a MACs budget.

Pitfalls: build `ignored_layers` from the copy being pruned (TP matches modules by identity; layers of
the caller's model ignore nothing, so the residual groups get pruned and the model breaks), and prune a
fresh copy for every trial ratio: pruning an already pruned model by 0.5 again keeps a quarter of the
inner channels (about 32M MACs, chance accuracy).
"""

from __future__ import annotations

import copy

import torch
import torch_pruning as tp
from torch import nn

from ghostify.analysis import count_macs


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The residual blocks: modules with conv1/bn1/conv2/bn2 and a shortcut (the root has no conv2)."""
    names = ("conv1", "bn1", "conv2", "bn2", "shortcut")
    return [m for m in model.modules() if all(hasattr(m, n) for n in names)]


def _prune_copy(model: nn.Module, example: torch.Tensor, ratio: float) -> nn.Module:
    pruned = copy.deepcopy(model).eval()
    inner = {id(b.conv1) for b in _blocks(pruned)}
    ignored = [m for m in pruned.modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and id(m) not in inner]
    if ratio > 0:
        tp.pruner.MetaPruner(
            pruned,
            example,
            importance=tp.importance.GroupMagnitudeImportance(p=2),
            pruning_ratio=ratio,
            ignored_layers=ignored,
        ).step()
    return pruned


def prune_inner_channels(
    model: nn.Module, example: torch.Tensor, target_macs: int, iters: int = 20
) -> tuple[nn.Module, float]:
    """Prune a deep copy of `model`'s inner block channels by one uniform ratio, to about `target_macs` MACs.

    MACs fall in steps as the ratio grows (channel counts are whole), so the ratio is bisected to the step
    that brackets the target and the closer of its two sides is kept.

    Returns:
        (the pruned copy, the pruning ratio used).
    """

    def macs(r: float) -> int:
        return count_macs(_prune_copy(model, example, r), example)[0]

    lo, hi = 0.0, 0.99  # macs(lo) >= target > macs(hi) when the target is reachable
    m_lo, m_hi = macs(lo), macs(hi)
    if target_macs >= m_lo:
        return _prune_copy(model, example, lo), lo
    for _ in range(iters):
        mid = (lo + hi) / 2
        m = macs(mid)
        if m >= target_macs:
            lo, m_lo = mid, m
        else:
            hi, m_hi = mid, m
    ratio = lo if m_lo - target_macs <= target_macs - m_hi else hi
    return _prune_copy(model, example, ratio), ratio
