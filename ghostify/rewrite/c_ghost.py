"""C-Ghost rewriter: find ordinary convs (with the BN and activation after them) and swap in Ghost modules.

Sites are found on torch.fx graphs (see tracing.py) and replaced by swapping submodules, so the model
keeps its class and state-dict names: `layer1.0.conv1` becomes a GhostModule, and the BN / activation it
absorbed become nn.Identity.

A Conv -> BN -> activation triple is absorbed as one unit, as in the official code, when each piece is
used only there. An activation module shared with other places (torchvision's `self.relu`) stays where
it is; it is copied into the Ghost module when applying it twice changes nothing (ReLU, ReLU6, Hardtanh),
else the Ghost module stops at the BN. A conv whose neighbours cannot be seen (inside an untraceable
module) is replaced on its own.
"""

from __future__ import annotations

import functools
import inspect
import math
import re
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ghostify.config import ConvertConfig
from ghostify.modules.ghost_module import GhostModule
from ghostify.modules.ghost_stage import GGhostStage
from ghostify.rewrite.inherit import inherit_weights
from ghostify.rewrite.result import ConversionResult, SiteRecord
from ghostify.rewrite.tracing import TracedPart, TraceResult, trace_model

ACTIVATIONS = (
    nn.ReLU,
    nn.ReLU6,
    nn.SiLU,
    nn.GELU,
    nn.Hardswish,
    nn.Hardtanh,
    nn.LeakyReLU,
    nn.ELU,
    nn.Mish,
    nn.PReLU,
    nn.SELU,
    nn.CELU,
)
IDEMPOTENT_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.Hardtanh)
FUNCTIONAL_RELU = {F.relu, torch.relu, torch.relu_, F.relu_}
METHOD_RELU = {"relu", "relu_"}


@dataclass
class ConvSite:
    """A conv to replace and the neighbours folded into its Ghost module."""

    conv: str
    bn: str | None = None
    act: str | None = None  # activation module to set to Identity (absorbed), if any
    act_layer: nn.Module | None = None  # activation to put inside the Ghost module, if any

    def detail(self, conv: nn.Conv2d) -> str:
        k = "x".join(map(str, conv.kernel_size))
        s = "x".join(map(str, conv.stride))
        tail = "".join(
            [
                " +bn" if self.bn else "",
                f" +{type(self.act_layer).__name__.lower()}" if self.act_layer else "",
            ]
        )
        return f"Conv2d {conv.in_channels}->{conv.out_channels} k{k} s{s}{tail}"


def _ineligible(module: nn.Conv2d, calls: int = 1) -> str | None:
    """Why this conv cannot become a Ghost module, or None when it can."""
    if type(module) is not nn.Conv2d:
        return f"{type(module).__name__} (a conv subclass) is left alone"
    if module.groups != 1:
        kind = "depthwise" if module.groups == module.in_channels else "grouped"
        return f"{kind} conv (groups={module.groups})"
    if calls > 1:
        return f"called {calls} times (shared module)"
    return None


def _attributes_read(model: nn.Module, name: str) -> str | None:
    """Why a conv of an untraced module cannot be swapped: its parent's forward reads its attributes.

    A Ghost module has no `.weight` (timm's PositionalEncodingFourier reads `token_projection.weight.dtype`).
    """
    parent_name, _, attr = name.rpartition(".")
    source = _forward_source(type(model.get_submodule(parent_name)))
    match = re.search(rf"self\.{re.escape(attr)}\.(\w+)", source)
    if match is None:
        return None
    return f"attribute read directly (the parent's forward uses `{attr}.{match.group(1)}`)"


@functools.cache
def _forward_source(cls: type) -> str:
    try:
        return inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return ""


def _absorbable_bn(module: nn.Module, channels: int) -> bool:
    return (
        type(module) is nn.BatchNorm2d
        and module.num_features == channels
        and module.track_running_stats
        and module.running_mean is not None
    )


def _single_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _match_activation(
    node: fx.Node | None, modules: dict[str, nn.Module], calls: dict[str, int]
) -> tuple[str | None, nn.Module | None]:
    """(name of the activation module to absorb or None, activation to copy inside or None)."""
    if node is None:
        return None, None
    if node.op == "call_module":
        module = modules.get(node.target)
        if not isinstance(module, ACTIVATIONS):
            return None, None
        if calls[node.target] == 1:
            return node.target, module
        if isinstance(module, IDEMPOTENT_ACTIVATIONS):
            return None, module
        return None, None
    if node.op == "call_function" and node.target in FUNCTIONAL_RELU:
        return None, nn.ReLU()
    if node.op == "call_method" and node.target in METHOD_RELU:
        return None, nn.ReLU()
    return None, None


def find_sites_in_part(part: TracedPart) -> tuple[list[ConvSite], list[tuple[str, str]]]:
    """Conv sites of one traced graph, in graph order, and the convs left alone with the reason."""
    modules = dict(part.module.named_modules())
    calls = part.call_counts()
    read_attrs = {n.target for n in part.graph.nodes if n.op == "get_attr"}
    sites: list[ConvSite] = []
    skipped: list[tuple[str, str]] = []
    for node in part.graph.nodes:
        if node.op != "call_module":
            continue
        module = modules.get(node.target)
        if not isinstance(module, nn.Conv2d):
            continue
        name = part.qualified(node.target)
        why = _ineligible(module, calls[node.target])
        read = sorted(t for t in read_attrs if t.startswith(node.target + "."))
        if not why and read:
            why = f"attribute read directly (the forward uses {', '.join(read)})"
        if why:
            skipped.append((name, why))
            continue
        site = ConvSite(conv=name)
        bn_node = _single_user(node)
        if bn_node is not None and bn_node.op == "call_module" and calls[bn_node.target] == 1:
            bn = modules.get(bn_node.target)
            if bn is not None and _absorbable_bn(bn, module.out_channels):
                site.bn = part.qualified(bn_node.target)
                act_name, site.act_layer = _match_activation(_single_user(bn_node), modules, calls)
                site.act = part.qualified(act_name) if act_name else None
        sites.append(site)
    return sites, skipped


def find_sites(model: nn.Module, trace: TraceResult, config: ConvertConfig) -> tuple[list[ConvSite], list]:
    """Every C-Ghost site of the model, after the stem / eligibility / include-exclude filters."""
    raw_sites: list[ConvSite] = []
    skipped: list[tuple[str, str]] = []
    for part in trace.parts:
        part_sites, part_skipped = find_sites_in_part(part)
        raw_sites += part_sites
        skipped += part_skipped
    for name in trace.lone_convs:
        why = _ineligible(model.get_submodule(name)) or _attributes_read(model, name)
        if why:
            skipped.append((name, why))
        else:
            raw_sites.append(ConvSite(conv=name))

    modules = dict(model.named_modules())
    first_conv = _first_conv_name(model, trace)
    cheap_paths = tuple(
        f"{name}.{part}."
        for name, m in modules.items()
        if isinstance(m, GGhostStage)
        for part in ("cheap", "merge")
    )
    sites = []
    for site in raw_sites:
        conv = modules[site.conv]
        if site.conv.startswith(cheap_paths):
            skipped.append((site.conv, "G-Ghost cheap/mix path (already cheap)"))
        elif config.skip_stem and site.conv == first_conv:
            skipped.append((site.conv, "stem (the first conv); --convert-stem (skip_stem=False) converts it"))
        elif not config.selects(site.conv):
            skipped.append((site.conv, "excluded by --include/--exclude"))
        elif math.ceil(conv.out_channels / config.ratio) >= conv.out_channels:
            skipped.append((site.conv, f"{conv.out_channels} output channel(s): nothing to make cheap"))
        else:
            sites.append(site)
    # A conv the traced forward never called (a training-only branch such as GoogLeNet's aux heads when
    # the model is in eval mode) is left alone, but say so: no conv may go unaccounted for.
    seen = {site.conv for site in raw_sites} | {name for name, _ in skipped}
    for name, module in modules.items():
        if isinstance(module, nn.Conv2d) and name not in seen:
            skipped.append((name, "not called by the traced forward (a branch used only in train mode?)"))
    return sites, skipped


def _first_conv_name(model: nn.Module, trace: TraceResult) -> str | None:
    """The stem: the first conv in graph order (definition order when the model did not trace whole)."""
    if trace.complete:
        part = trace.parts[0]
        modules = dict(part.module.named_modules())
        for node in part.graph.nodes:
            if node.op == "call_module" and isinstance(modules.get(node.target), nn.Conv2d):
                return node.target
    return next((name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)


def build_ghost(
    conv: nn.Conv2d, site: ConvSite, bn: nn.BatchNorm2d | None, config: ConvertConfig
) -> GhostModule:
    """A Ghost module shaped like `conv`, with weights inherited from it."""
    ghost = GhostModule(
        conv.in_channels,
        conv.out_channels,
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        ratio=config.ratio,
        dw_size=config.dw_size,
        bias=conv.bias is not None,
        norm=bn is not None,
        act_layer=site.act_layer,
        padding_mode=conv.padding_mode,
    ).to(device=conv.weight.device, dtype=conv.weight.dtype)
    inherit_weights(ghost, conv, bn, fit=config.weight_init == "fit")
    ghost.train(conv.training)
    return ghost


def apply_c_ghost(model: nn.Module, config: ConvertConfig, result: ConversionResult) -> None:
    """Swap every selected conv of `model` (in place) for a Ghost module; record what was done."""
    trace = trace_model(model)
    result.notes += trace.fallback_notes()
    sites, skipped = find_sites(model, trace, config)
    result.skipped += skipped
    for site in sites:
        conv = model.get_submodule(site.conv)
        bn = model.get_submodule(site.bn) if site.bn else None
        ghost = build_ghost(conv, site, bn, config)
        detail = site.detail(conv)
        model.set_submodule(site.conv, ghost)
        absorbed = [name for name in (site.bn, site.act) if name]
        for name in absorbed:
            model.set_submodule(name, nn.Identity())
        result.sites.append(SiteRecord(name=site.conv, kind="c-ghost", detail=detail, absorbed=absorbed))


__all__ = ["ConvSite", "apply_c_ghost", "find_sites"]
