"""C-Ghost over whole model zoos, in the style of timm's tests/test_models.py.

Every torchvision classifier family and a wide spread of timm CNNs is built untrained at a small input,
converted with `convert_model(model, ConvertConfig(mode="c-ghost", ratio=2))`, and checked:
    - the input model is untouched (state-dict values and module types);
    - every nn.Conv2d of the model is accounted for (replaced, or skipped with a reason);
    - the output shape is unchanged (eval mode);
    - forward + backward run in train mode (batch 2) and every trainable parameter gets a gradient;
    - MACs drop (ghostify.analysis.count_macs);
    - the converted model still traces when the original did, and the traced graph equals eager output.
A model with no eligible conv must raise ConversionError with a message that says why.

CI runs the default lists (every torchvision family, >= 40 timm models from >= 15 families) in a few
minutes; `GHOSTIFY_SWEEP=full` adds bigger variants and more families.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import timm
import torch
import torch.fx as fx
import torchvision
from torch import nn

from ghostify.analysis import count_macs
from ghostify.config import ConvertConfig
from ghostify.errors import ConversionError
from ghostify.modules.ghost_module import GhostModule
from ghostify.rewrite import convert_model
from ghostify.rewrite.tracing import trace_model

pytestmark = pytest.mark.sweep

FULL = os.environ.get("GHOSTIFY_SWEEP", "").lower() == "full"
THREADS = 1  # the CI box has 2 busy cores: more threads only oversubscribe them


@dataclass(frozen=True)
class Case:
    """One model to sweep.

    Attributes:
        name: the builder's name (torchvision / timm) or a label for `build`.
        size: input height = width.
        kwargs: extra builder arguments.
        skip_stem: passed to ConvertConfig; False where the only ordinary conv is the patch-embedding stem.
        no_sites: the model has no eligible conv: conversion must raise ConversionError, with a message
            matching this regex (it has to say why).
        build: a factory to use instead of the registry builder.
        xfail: a known ghostify bug this model hits (strict: the test fails once the bug is fixed).
    """

    name: str
    size: int = 64
    kwargs: dict[str, Any] = field(default_factory=dict)
    skip_stem: bool = True
    no_sites: str | None = None
    build: Callable[[], nn.Module] | None = None
    xfail: str | None = None


def _params(cases: list[Case]) -> list[Any]:
    marks = {c.name: [pytest.mark.xfail(reason=c.xfail, strict=True)] if c.xfail else [] for c in cases}
    return [pytest.param(c, id=c.name, marks=marks[c.name]) for c in cases]


class _ReadsWeight(nn.Module):
    """Reads a conv's weight in forward (for its dtype), as timm's PositionalEncodingFourier does."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(self.stem(x).to(self.conv.weight.dtype))
        return self.head(self.conv2(x).mean(dim=(2, 3)))


class _DataDependent(nn.Module):
    """A block fx cannot trace (control flow on a tensor value), holding a pointwise and a depthwise conv."""

    def __init__(self, chs: int) -> None:
        super().__init__()
        self.pw = nn.Conv2d(chs, 2 * chs, 1)
        self.dw = nn.Conv2d(2 * chs, 2 * chs, 3, padding=1, groups=2 * chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.mean() > 1e9:  # never true; only there to stop the tracer
            x = -x
        return self.dw(self.pw(x))


def _partly_traceable() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        _DataDependent(16),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


def _small_maxvit() -> nn.Module:
    # maxvit_t's widths and depths; its builder pins partition_size=7, which needs 224x224 input.
    from torchvision.models.maxvit import MaxVit

    return MaxVit(
        input_size=(64, 64),
        stem_channels=64,
        partition_size=2,
        block_channels=[64, 128, 256, 512],
        block_layers=[2, 2, 5, 2],
        head_dim=32,
        stochastic_depth_prob=0.2,
    )


# ---------------------------------------------------------------------------------------------------------
# torchvision: one or two of every classification family by default.
TV_DEFAULT = [
    Case("resnet18"),
    Case("resnext50_32x4d"),
    Case("wide_resnet50_2"),
    Case("regnet_x_400mf"),
    Case("regnet_y_400mf"),
    Case("vgg11"),
    Case("vgg11_bn"),
    Case("alexnet"),
    Case("densenet121"),
    Case("googlenet", kwargs={"init_weights": False}),  # aux heads are used (and get gradients) in train mode
    Case("inception_v3", size=75, kwargs={"aux_logits": False, "init_weights": False}),  # aux head needs 299
    Case("mobilenet_v2"),
    Case("mobilenet_v3_small"),
    Case("mnasnet0_5"),
    Case("efficientnet_b0"),
    Case("efficientnet_v2_s"),
    Case("shufflenet_v2_x0_5"),
    Case("squeezenet1_0"),
    Case("squeezenet1_1"),
    Case("convnext_tiny"),
    # The only ordinary conv of ViT / Swin is the patch embedding, which is the stem: convert it explicitly
    # (test_patch_embed_only_models_refuse_by_default checks that the default refuses with a clear message).
    Case("vit_b_32", size=32, kwargs={"image_size": 32}, skip_stem=False),
    Case("swin_t", skip_stem=False),
    Case("maxvit_t_small_input", build=_small_maxvit),
]
TV_FULL = [
    Case("resnet34"),
    Case("resnet50"),
    Case("mobilenet_v3_large"),
    Case("resnet101"),
    Case("wide_resnet101_2"),
    Case("resnext101_32x8d"),
    Case("regnet_x_800mf"),
    Case("regnet_y_1_6gf"),
    Case("vgg16"),
    Case("vgg16_bn"),
    Case("densenet161"),
    Case("inception_v3", size=299, kwargs={"aux_logits": True, "init_weights": False}),
    Case("mnasnet1_0"),
    Case("efficientnet_b3"),
    Case("shufflenet_v2_x1_0"),
    Case("convnext_small"),
    Case("vit_b_16", size=32, kwargs={"image_size": 32}, skip_stem=False),
    Case("swin_v2_t", skip_stem=False),
    Case("maxvit_t", size=224),
]

# ---------------------------------------------------------------------------------------------------------
# timm: the smallest variant of many families.
TIMM_DEFAULT = [
    Case("resnet10t"),
    Case("resnet18d"),
    Case("resnetv2_18"),
    Case("resnext26ts"),
    Case("legacy_seresnet18"),
    Case("regnetx_002"),
    Case("regnety_002"),
    Case("regnetz_b16"),
    Case("efficientnet_b0"),
    Case("efficientnet_lite0"),
    Case("tf_efficientnet_b0"),
    Case("mobilenetv2_035"),
    Case("mobilenetv3_small_050"),
    Case("mobilenetv4_conv_small_035"),
    Case("mixnet_s"),
    Case("ghostnet_050"),
    Case("repghostnet_050"),
    Case("densenet121"),
    Case("dla46_c"),
    Case("dpn48b"),
    Case("hrnet_w18_small"),
    Case("cs3darknet_s"),
    Case("darknet17"),
    Case("rexnet_100"),
    Case("repvgg_a0"),
    Case("gernet_s"),
    Case("resnest14d"),
    Case("selecsls42b"),
    Case("convnext_atto"),
    Case("hardcorenas_a"),
    Case("lcnet_035"),
    Case("tinynet_e"),
    Case("fbnetc_100"),
    Case("legacy_xception"),
    Case("inception_v3", size=75),
    Case("nf_resnet26", no_sites="no ordinary conv|ScaledStdConv2d"),  # every conv is a ScaledStdConv2d
    Case("ese_vovnet19b_slim_dw"),
    Case("skresnet18"),
    Case("fastvit_t8"),
    Case("hgnetv2_b0"),
    Case("mnasnet_small"),
    Case("mobilevit_xxs"),  # convs inside MobileVitBlock, a timm no-trace leaf
    Case("efficientvit_b0"),  # convs inside LiteMLA, a timm no-trace leaf
    Case("nf_regnet_b0"),  # ScaledStdConv2d everywhere, ordinary SE convs
    Case("starnet_s050"),
    Case("vit_tiny_patch16_224", no_sites="stem"),  # its one ordinary conv is the patch-embedding stem
    Case("edgenext_xx_small"),
]
TIMM_FULL = [
    Case("mobileone_s0"),
    Case("vgg11"),  # pre_logits is a ConvMlp leaf; fitting its 7x7 4096-wide conv takes ~30 s
    Case("res2net50_14w_8s"),  # slow weight fit (assign_ghosts runs many rounds)
    Case("resnet50"),
    Case("seresnext26d_32x4d"),
    Case("ghostnetv2_100"),
    Case("dla34"),
    Case("cspresnet50"),
    Case("rexnetr_100"),
    Case("fbnetv3_b"),
    Case("xception41p"),
    Case("inception_v4", size=75),
    Case("dm_nfnet_f0"),  # ScaledStdConv2dSame (a timm leaf) everywhere, ordinary SE convs
    Case("spnasnet_100"),
    Case("repvit_m0_9"),
    Case("fasternet_t0"),
    Case("inception_next_atto"),
    Case("gcresnext26ts"),
    Case("eca_resnet33ts"),
    Case("resnet50_gn"),
    Case("densenetblur121d"),
]

# Models of our own that exercise what the zoos do not.
CUSTOM_CASES = [
    # An untraceable block: its convs are found one by one and must pass the same eligibility checks
    # (its depthwise conv must be skipped, not turned into a dense Ghost module).
    Case("partly_traceable", size=16, build=_partly_traceable),
    Case("reads_conv_weight", size=16, build=_ReadsWeight),
]

TV_CASES = TV_DEFAULT + (TV_FULL if FULL else [])
TIMM_CASES = TIMM_DEFAULT + (TIMM_FULL if FULL else [])


# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _threads():
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


def _build_torchvision(case: Case) -> nn.Module:
    if case.build is not None:
        return case.build()
    return torchvision.models.get_model(case.name, weights=None, **case.kwargs)


def _build_timm(case: Case) -> nn.Module:
    if case.build is not None:
        return case.build()
    return timm.create_model(case.name, pretrained=False, **case.kwargs)


def _tensors(out: Any) -> list[torch.Tensor]:
    """Every tensor in a model's output (a tensor, a (named) tuple such as GoogLeNetOutputs, a dict)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for item in out for t in _tensors(item)]
    return []


def _snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[tuple[str, type]]]:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    types = [(name, type(mod)) for name, mod in model.named_modules()]
    return state, types


def _assert_untouched(model: nn.Module, snapshot: tuple[dict[str, torch.Tensor], list]) -> None:
    state, types = snapshot
    now = model.state_dict()
    assert now.keys() == state.keys(), "the input model's state-dict keys changed"
    changed = [k for k in state if not torch.equal(now[k], state[k])]
    assert not changed, f"the input model's tensors changed: {changed[:5]}"
    assert [(n, type(m)) for n, m in model.named_modules()] == types, "the input model's modules changed"


def _traced_module(model: nn.Module) -> fx.GraphModule | None:
    trace = trace_model(model)
    if not trace.complete:
        return None
    part = trace.parts[0]
    return fx.GraphModule(part.module, part.graph)


def check_c_ghost(model: nn.Module, case: Case, weight_init: str = "fit") -> None:
    """Convert `model` with C-Ghost (ratio 2) and check everything the module docstring lists.

    The model is converted as built (train mode, as a freshly built student would be).
    """
    torch.manual_seed(0)
    x = torch.randn(1, 3, case.size, case.size)
    snapshot = _snapshot(model)
    config = ConvertConfig(mode="c-ghost", ratio=2, skip_stem=case.skip_stem, weight_init=weight_init)

    if case.no_sites:
        with pytest.raises(ConversionError, match=case.no_sites):
            convert_model(model, config)
        _assert_untouched(model, snapshot)
        return

    result = convert_model(model, config)
    converted = result.model
    _assert_untouched(model, snapshot)
    assert converted is not model

    # Every conv is either replaced or skipped with a reason: none may be missed silently.
    convs = {name for name, mod in model.named_modules() if isinstance(mod, nn.Conv2d)}
    replaced = {site.name for site in result.sites}
    skipped = {name for name, _ in result.skipped}
    assert replaced <= convs
    missed = sorted(convs - replaced - skipped)
    assert not missed, f"{len(missed)} conv(s) neither replaced nor skipped: {missed[:5]}"
    for name in replaced:
        original = model.get_submodule(name)
        assert type(original) is nn.Conv2d and original.groups == 1, f"{name} was not an ordinary conv"
        assert isinstance(converted.get_submodule(name), GhostModule), name

    # Eval: same output shape.
    model.eval()
    converted.eval()
    with torch.no_grad():
        before = _tensors(model(x))
        after = _tensors(converted(x))
    assert [t.shape for t in after] == [t.shape for t in before]
    assert all(torch.isfinite(t).all() for t in after)

    # MACs drop.
    macs_before, _ = count_macs(model, x)
    macs_after, _ = count_macs(converted, x)
    assert macs_after < macs_before, f"MACs did not drop: {macs_before} -> {macs_after}"

    # FX: the converted model traces whenever the original did, and the graph computes the same thing.
    traced_before = trace_model(model).complete
    traced = _traced_module(converted)
    if traced_before:
        assert traced is not None, "the original traced as one graph but the converted model does not"
    if traced is not None:
        traced.eval()
        with torch.no_grad():
            eager = _tensors(converted(x))
            graph = _tensors(traced(x))
        assert len(graph) == len(eager)
        for g, e in zip(graph, eager, strict=True):
            torch.testing.assert_close(g, e)

    # Train: forward + backward at batch 2, every trainable parameter gets a gradient.
    converted.train()
    xb = torch.randn(2, 3, case.size, case.size)
    outputs = _tensors(converted(xb))
    assert outputs, "the model returned no tensor"
    sum(out.float().mean() for out in outputs).backward()
    no_grad = [n for n, p in converted.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, f"{len(no_grad)} parameter(s) got no gradient: {no_grad[:5]}"


@pytest.mark.parametrize("case", _params(TV_CASES))
def test_torchvision_c_ghost(case: Case) -> None:
    check_c_ghost(_build_torchvision(case), case)


@pytest.mark.parametrize("case", _params(TIMM_CASES))
def test_timm_c_ghost(case: Case) -> None:
    check_c_ghost(_build_timm(case), case)


@pytest.mark.parametrize("case", _params(CUSTOM_CASES))
def test_custom_c_ghost(case: Case) -> None:
    check_c_ghost(case.build(), case)


@pytest.mark.parametrize(
    "name, kwargs", [("vit_b_32", {"image_size": 32}), ("swin_t", {})], ids=["vit_b_32", "swin_t"]
)
def test_patch_embed_only_models_refuse_by_default(name: str, kwargs: dict[str, Any]) -> None:
    """ViT / Swin: the patch embedding is the first conv, i.e. the stem, which is skipped by default."""
    model = torchvision.models.get_model(name, weights=None, **kwargs)
    with pytest.raises(ConversionError, match="stem"):
        convert_model(model, ConvertConfig(mode="c-ghost", ratio=2))


def test_eval_mode_conversion_accounts_for_training_only_convs() -> None:
    model = torchvision.models.googlenet(weights=None, init_weights=False).eval()
    result = convert_model(model, ConvertConfig(mode="c-ghost", ratio=2, weight_init="random"))
    convs = {name for name, mod in model.named_modules() if isinstance(mod, nn.Conv2d)}
    accounted = {site.name for site in result.sites} | {name for name, _ in result.skipped}
    assert {"aux1.conv.conv", "aux2.conv.conv"} <= convs
    assert convs <= accounted, f"unaccounted convs: {sorted(convs - accounted)}"


def _timm_family(name: str) -> str:
    return timm.models.model_entrypoint(name).__module__.rpartition(".")[2]


def test_default_sweep_is_wide_enough() -> None:
    """CI's bounded sweep still covers every torchvision family and >= 40 timm models of >= 15 families."""
    tv_names = {c.name for c in TV_DEFAULT}
    families = {
        "resnet18", "resnext50_32x4d", "wide_resnet50_2", "regnet_x_400mf", "regnet_y_400mf", "vgg11",
        "alexnet", "densenet121", "googlenet", "inception_v3", "mobilenet_v2", "mobilenet_v3_small",
        "mnasnet0_5", "efficientnet_b0", "efficientnet_v2_s", "shufflenet_v2_x0_5", "squeezenet1_0",
        "convnext_tiny", "vit_b_32", "swin_t", "maxvit_t_small_input",
    }  # fmt: skip
    assert families <= tv_names
    timm_ok = [c.name for c in TIMM_DEFAULT if not c.xfail]
    assert len(timm_ok) >= 40
    assert len({_timm_family(n) for n in timm_ok}) >= 15
