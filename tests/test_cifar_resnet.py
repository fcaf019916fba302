"""The CIFAR-10 ResNet example model: checkpoint compatibility, size, tracing."""

from __future__ import annotations

import importlib.util
import pickle
import sys
from pathlib import Path

import pytest
import torch
import torch.fx as fx

REPO_ROOT = Path(__file__).resolve().parents[1]
PRETRAINED = REPO_ROOT / ".." / "shared" / "data" / "pretrained"
RESNET20_CKPT = PRETRAINED / "resnet20-12fca82f.th"


def _load_example():
    spec = importlib.util.spec_from_file_location("cifar_resnet", REPO_ROOT / "examples" / "cifar_resnet.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # so that its classes pickle by reference
    spec.loader.exec_module(module)
    return module


cifar_resnet = _load_example()


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_module_constants():
    assert cifar_resnet.input_size == (3, 32, 32)
    assert cifar_resnet.MEAN == pytest.approx((0.485, 0.456, 0.406))
    assert cifar_resnet.STD == pytest.approx((0.229, 0.224, 0.225))


@pytest.mark.parametrize(
    "name, expected",
    [
        ("resnet20", 0.27e6),
        ("resnet32", 0.46e6),
        ("resnet44", 0.66e6),
        ("resnet56", 0.85e6),
        ("resnet110", 1.7e6),
    ],
)
def test_param_counts(name, expected):
    assert _params(getattr(cifar_resnet, name)()) == pytest.approx(expected, rel=0.02)


def test_exact_param_counts():
    assert _params(cifar_resnet.resnet20()) == 269_722
    assert _params(cifar_resnet.resnet56()) == 853_018


def test_output_shape_and_num_classes():
    torch.manual_seed(0)
    model = cifar_resnet.resnet20().eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert cifar_resnet.resnet20(num_classes=100)(torch.randn(2, 3, 32, 32)).shape == (2, 100)


def test_option_a_shortcut():
    pad = cifar_resnet.PadShortcut(8)
    x = torch.randn(2, 16, 8, 8)
    out = pad(x)
    assert out.shape == (2, 32, 4, 4)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert not out[:, :8].any() and not out[:, 24:].any()
    assert list(pad.parameters()) == []
    model = cifar_resnet.resnet20()
    assert isinstance(model.layer2[0].shortcut, cifar_resnet.PadShortcut)
    assert isinstance(model.layer1[0].shortcut, torch.nn.Identity)


def test_fx_trace_equals_eager_and_pickles():
    torch.manual_seed(0)
    model = cifar_resnet.resnet20().eval()
    x = torch.randn(2, 3, 32, 32)
    traced = fx.symbolic_trace(model)
    torch.testing.assert_close(traced(x), model(x), rtol=0, atol=0)
    targets = {n.target for n in traced.graph.nodes if n.op == "call_module"}
    assert "layer1.0.conv1" in targets and "linear" in targets
    assert any(n.op == "call_function" and n.target is torch.nn.functional.pad for n in traced.graph.nodes)
    clone = pickle.loads(pickle.dumps(model))
    torch.testing.assert_close(clone(x), model(x))


@pytest.mark.skipif(not RESNET20_CKPT.is_file(), reason="../shared/data is not available")
def test_state_dict_keys_match_checkpoint():
    checkpoint = torch.load(RESNET20_CKPT, map_location="cpu", weights_only=True)
    keys = {k.removeprefix("module.") for k in checkpoint["state_dict"]}
    model = cifar_resnet.resnet20()
    ours = {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}
    assert ours == keys
    cifar_resnet.load_checkpoint(model, RESNET20_CKPT)  # strict
    torch.testing.assert_close(model.linear.bias, checkpoint["state_dict"]["module.linear.bias"])
