"""G-Ghost over torchvision / timm families with residual stages of >= 3 blocks (`pytest -m sweep`)."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode

from ghostify.config import ConvertConfig
from ghostify.errors import ConversionError
from ghostify.modules.ghost_stage import GGhostStage
from ghostify.rewrite.g_ghost import apply_g_ghost
from ghostify.rewrite.result import ConversionResult

pytestmark = pytest.mark.sweep

CONVERTIBLE = [
    "torchvision:resnet34",
    "torchvision:resnet50",
    "torchvision:resnext50_32x4d",
    "torchvision:regnet_x_400mf",
    "torchvision:regnet_y_400mf",
    "timm:seresnet50",
    "timm:regnetx_002",
    "timm:regnety_002",
    "timm:res2net50_26w_4s",
    "torchvision:wide_resnet50_2",
    "torchvision:resnet101",
    "timm:resnet50d",
    "timm:resnetv2_50",
    "timm:cspresnet50",
]
# Families whose stages all have fewer than 3 blocks (or are trees): a clear error, no conversion.
NO_STAGE = ["torchvision:resnet18", "timm:resnet26d", "timm:resnest14d", "timm:dla34"]


def _create(spec: str) -> torch.nn.Module:
    lib, name = spec.split(":")
    if lib == "timm":
        return timm.create_model(name, pretrained=False, num_classes=10).eval()
    return getattr(torchvision.models, name)(weights=None, num_classes=10).eval()


def _macs(model: torch.nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() // 2


@pytest.mark.parametrize("spec", CONVERTIBLE)
def test_family_converts(spec):
    model = _create(spec)
    x = torch.randn(2, 3, 64, 64)
    cfg = ConvertConfig(mode="g-ghost", ratio=2)
    out = copy.deepcopy(model)
    result = ConversionResult(model=out, config=cfg)
    apply_g_ghost(out, cfg, x, result)
    assert result.sites and all(isinstance(out.get_submodule(s.name), GGhostStage) for s in result.sites)
    out.eval()
    assert _macs(out, x[:1]) < _macs(model, x[:1])
    out.train()
    y = out(x)
    assert y.shape == model(x).shape
    y.square().mean().backward()
    missing = [n for n, p in out.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing


@pytest.mark.parametrize("spec", NO_STAGE)
def test_family_without_stage_says_so(spec):
    cfg = ConvertConfig(mode="g-ghost", ratio=2)
    model = _create(spec)
    with pytest.raises(ConversionError, match="no residual stage of 3 or more blocks"):
        apply_g_ghost(model, cfg, torch.randn(1, 3, 64, 64), ConversionResult(model=model, config=cfg))


def test_blocks_that_cannot_be_narrowed_name_the_layer():
    """ECA attention mixes neighbouring channels through a view + conv1d: narrowing would change it."""
    cfg = ConvertConfig(mode="g-ghost", ratio=2)
    model = _create("timm:ecaresnet50t")
    with pytest.raises(ConversionError, match=r"stage layer1 cannot be narrowed: block layer1\.1 uses"):
        apply_g_ghost(model, cfg, torch.randn(1, 3, 64, 64), ConversionResult(model=model, config=cfg))


def test_regnet_x_3_2gf_lands_near_the_paper():
    """Paper: G-Ghost-RegNetX-3.2GF has 1.8 GMACs and 10.5M params (from 3.2 GMACs / 15.3M)."""
    model = torchvision.models.regnet_x_3_2gf(weights=None).eval()
    x = torch.randn(1, 3, 224, 224)
    cfg = ConvertConfig(mode="g-ghost", ratio=2)
    out = copy.deepcopy(model)
    result = ConversionResult(model=out, config=cfg)
    apply_g_ghost(out, cfg, x, result)
    macs = _macs(out.eval(), x)
    params = sum(p.numel() for p in out.parameters())
    assert abs(macs / 1.8e9 - 1) < 0.10, macs
    assert abs(params / 10.5e6 - 1) < 0.10, params
    assert sorted(s.name for s in result.sites) == ["trunk_output.block2", "trunk_output.block3"]
