"""The deploy form (BN folded, Ghost layouts simplified) and ONNX / ExportedProgram export (fast tests)."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torchvision
from fixtures.residual import Block
from torch import nn

from ghostify.config import ConvertConfig
from ghostify.deploy import GhostDeploy, concat_order, deploy_form
from ghostify.errors import ConfigError, FormatError
from ghostify.export import export, verify_export
from ghostify.rewrite import convert_model


class Net(nn.Module):
    """Stem, a 21-channel conv (odd: the Ghost concat is cut) and a depthwise conv, a residual stage of 4
    blocks, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.odd = nn.Sequential(
            *(nn.Conv2d(16, 21, 1), nn.BatchNorm2d(21), nn.ReLU6()),
            *(nn.Conv2d(21, 21, 3, padding=1, groups=21), nn.BatchNorm2d(21), nn.ReLU6()),
        )
        self.stage = nn.Sequential(Block(21, 32, 2), *[Block(32, 32) for _ in range(3)])
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.drop(self.stage(self.odd(self.stem(x))).mean((2, 3))))


class Untraceable(nn.Module):
    """Data-dependent control flow at the top: only the child can be traced."""

    def __init__(self) -> None:
        super().__init__()
        self.net = Net()

    def forward(self, x):
        return self.net(x) if x.sum() > -1e9 else -self.net(x)


def _net(cls: type[nn.Module] = Net) -> nn.Module:
    """A model with trained-looking BN statistics, in eval mode."""
    torch.manual_seed(0)
    model = cls()
    with torch.no_grad():
        for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    return model.eval()


@functools.cache  # converting takes seconds; no test changes the converted model
def _converted(mode: str = "c-ghost", weight_init: str = "fit") -> nn.Module:
    config = ConvertConfig(mode=mode, ratio=2, weight_init=weight_init)
    return convert_model(_net(), config, example_inputs=torch.randn(1, 3, 32, 32)).model.eval()


def _check_same(model: nn.Module, other: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        expected, got = model(x), other(x)
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()


X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    ("model", "layouts"),
    [
        (lambda: _converted("c-ghost", "fit"), {"raw", "gather"}),  # permuted GhostModules
        (lambda: _converted("c-ghost", "random"), {"raw", "concat"}),  # plain order, one cut concat
        (lambda: _converted("g-ghost"), set()),
        (lambda: _converted("both"), {"raw", "gather"}),
        (lambda: _net(Untraceable), set()),
    ],
    ids=["c-ghost-permuted", "c-ghost-plain", "g-ghost", "both", "untraceable-top"],
)
def test_deploy_form_matches_eager_and_folds_every_bn(model, layouts):
    model = model()
    deployed = deploy_form(model, example_inputs=X)
    _check_same(model, deployed, X)
    assert not any(isinstance(m, nn.BatchNorm2d | nn.Dropout) for m in deployed.modules())
    assert {m.layout for m in deployed.modules() if isinstance(m, GhostDeploy)} == layouts
    assert not any(p.requires_grad for p in deployed.parameters()) and not deployed.training


def test_deploy_form_of_an_original_torchvision_model():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    deployed = deploy_form(model)
    _check_same(model, deployed, torch.randn(2, 3, 64, 64))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in deployed.modules())


def test_concat_order_folds_a_grouped_permutation_only():
    # m=2 intrinsic channels, ratio 3: concat = [i0, i1, g0a, g0b, g1a, g1b]
    assert concat_order([1, 0, 4, 5, 3, 2], 2, 3) == [1, 0, 4, 5, 3, 2]
    assert concat_order([1, 0, 5], 2, 3) == [1, 0, 5, 4, 2, 3]  # cut to 3: unused slots go last
    assert concat_order([0, 2, 1, 3], 2, 2) is None  # a ghost among the first m channels
    assert concat_order([0, 1, 3, 2], 2, 2) is None  # ghosts not in their intrinsic channels' order


def test_deploy_and_export_leave_the_model_untouched(tmp_path):
    model = copy.deepcopy(_converted()).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    deploy_form(model, example_inputs=X)
    export(model, tmp_path / "m", "exported-program", example_inputs=X[:1])
    after = model.state_dict()
    assert model.training and before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_onnx_round_trip(tmp_path):
    pytest.importorskip("onnxruntime")
    model = _converted()
    path = export(model, tmp_path / "model", example_inputs=X[:1])
    assert path == tmp_path / "model.onnx" and sorted(tmp_path.iterdir()) == [path]
    assert verify_export(path, model, torch.randn(3, 3, 32, 32)) <= 1e-4  # another batch size


def test_exported_program_round_trip(tmp_path):
    model = _converted("both")
    path = export(model, tmp_path / "model.pt2", "exported-program", example_inputs=X[:1])
    assert verify_export(path, model, torch.randn(3, 3, 32, 32), atol=1e-4) <= 1e-4


def test_unknown_format_names_the_choices(tmp_path):
    with pytest.raises(ConfigError, match="onnx, exported-program"):
        export(_net(), tmp_path / "m", "tflite")


@pytest.mark.parametrize("fmt", ["onnx", "exported-program"])
def test_failed_export_leaves_no_file(tmp_path, fmt):
    pytest.importorskip("onnx")
    with pytest.raises(FormatError, match=f"{fmt} export failed .*; try the .* format instead"):
        export(_net(), tmp_path / "m", fmt, example_inputs=torch.randn(1, 5, 32, 32))  # 5 channels
    assert list(tmp_path.iterdir()) == []
