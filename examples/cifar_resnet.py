"""CIFAR-10 ResNets (He et al. 2016, sec. 4.2), state-dict compatible with akamaster/pytorch_resnet_cifar10.

Written from the architecture description in ../shared/data/README.md. The pretrained checkpoints there
(`resnet20-12fca82f.th`, `resnet56-4bfd9763.th`) load strictly with `load_checkpoint`.

Usable as a ghostify user model file::

    ghostify convert examples/cifar_resnet.py:resnet56 ...

Module-level `input_size`, `MEAN` and `STD` describe the input the models were trained on.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BasicBlock",
    "CifarResNet",
    "PadShortcut",
    "input_size",
    "load_checkpoint",
    "MEAN",
    "STD",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
]

input_size = (3, 32, 32)
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample by 2 and zero-pad `pad` channels on each side (no parameters)."""

    def __init__(self, pad: int) -> None:
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad), "constant", 0.0)

    def extra_repr(self) -> str:
        return f"pad={self.pad}"


class BasicBlock(nn.Module):
    """conv3x3 (stride) -> BN -> ReLU -> conv3x3 -> BN, plus shortcut, then ReLU."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        if stride != 1 or in_planes != planes:
            # akamaster's option A: assumes stride 2 and planes == 2 * in_planes.
            self.shortcut: nn.Module = PadShortcut(planes // 4)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + self.shortcut(x)
        return self.relu2(out)


class CifarResNet(nn.Module):
    """conv1/bn1 stem (16 channels), layer1..layer3 (16, 32, 64 wide), global average pool, `linear`."""

    def __init__(self, num_blocks: tuple[int, int, int], num_classes: int = 10) -> None:
        super().__init__()
        self.in_planes = 16
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.layer1 = self._make_layer(16, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(32, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(64, num_blocks[2], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes * BasicBlock.expansion
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = torch.flatten(self.avgpool(out), 1)
        return self.linear(out)


def resnet20(num_classes: int = 10) -> CifarResNet:
    """ResNet-20 (3 blocks per stage, 0.27M parameters, about 41M MACs)."""
    return CifarResNet((3, 3, 3), num_classes)


def resnet32(num_classes: int = 10) -> CifarResNet:
    """ResNet-32 (5 blocks per stage)."""
    return CifarResNet((5, 5, 5), num_classes)


def resnet44(num_classes: int = 10) -> CifarResNet:
    """ResNet-44 (7 blocks per stage)."""
    return CifarResNet((7, 7, 7), num_classes)


def resnet56(num_classes: int = 10) -> CifarResNet:
    """ResNet-56 (9 blocks per stage, 0.85M parameters, about 125M MACs)."""
    return CifarResNet((9, 9, 9), num_classes)


def resnet110(num_classes: int = 10) -> CifarResNet:
    """ResNet-110 (18 blocks per stage)."""
    return CifarResNet((18, 18, 18), num_classes)


def load_checkpoint(model: nn.Module, path: str | Path) -> nn.Module:
    """Load an akamaster checkpoint (`{"state_dict": {"module.<key>": tensor}}`) strictly into `model`.

    Returns:
        `model`, for chaining: `load_checkpoint(resnet56(), "resnet56-4bfd9763.th").eval()`.
    """
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = checkpoint.get("state_dict", checkpoint)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    model.load_state_dict(state, strict=True)
    return model
