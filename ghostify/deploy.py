"""The deploy form: a model made lean for inference only, same outputs, less work per forward.

Training carries work that inference does not need: BatchNorm after a conv is an affine map per channel
and folds into the conv's weights; Identity and Dropout modules do nothing in eval mode; autograd tracks
parameters. A converted model adds a layout cost: a permuted GhostModule (fitted weights) computes
`concat(intrinsic, ghost)` and gathers the channels back into the original order (`index_select`), a
second full copy of its output.

`deploy_form` removes that work where it can prove the result unchanged:

1. Every GhostModule becomes a `GhostDeploy`: both BNs folded, and its gather folded away when the
   primary conv's and cheap conv's output channels can be reordered so that the plain concat is
   already in the original order.
2. The model is traced with torch.fx (as the rewriters trace it, GhostDeploy as a leaf) into one flat
   GraphModule, where every conv -> BN pair is folded (the pattern of `torch.fx.experimental.
   optimization.fuse`, plus a check that the conv is not shared) and Identity / Dropout calls are
   dropped. A GhostDeploy gather whose output only reaches convs (through element-wise activations and
   depthwise convs) is folded into those convs' weights; gathers feeding a residual add stay. Residual
   adds write into the conv output they add to, as eager `out += identity` did (tracing makes it `+`).
3. A model (or part) that does not trace keeps its structure; its traceable children get step 2.

It works on any nn.Module, so the original model's deploy form gives a fair baseline.
"""

from __future__ import annotations

import copy
import functools
import inspect
import operator
import re

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torch.utils._pytree import tree_leaves

from ghostify.errors import ConversionError
from ghostify.modes import eval_mode
from ghostify.modules.ghost_module import GhostModule
from ghostify.rewrite.tracing import GhostifyTracer

ELEMENTWISE_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.SiLU,
    nn.GELU,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.LeakyReLU,
    nn.ELU,
    nn.Mish,
    nn.SELU,
    nn.CELU,
    nn.Sigmoid,
    nn.Tanh,
)
ELEMENTWISE_FUNCTIONS = {F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.silu, F.gelu, F.hardswish}
ELEMENTWISE_FUNCTIONS |= {F.leaky_relu, F.hardtanh, F.elu, F.mish, torch.sigmoid, torch.tanh}
ELEMENTWISE_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_"}
NO_OP_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


class GhostDeploy(nn.Module):
    """A GhostModule for inference: BN folded into both convs, output in the cheapest faithful layout.

    `layout` says what forward returns after `concat(primary, cheap)`:
    "concat" (exactly the original channels), "slice" (the first out_chs of them), "gather"
    (`index_select` by out_index, as GhostModule does), or "raw" (the whole concat; the convs that
    consume it have taken the reordering into their weights).
    """

    def __init__(self, primary_conv: nn.Sequential, cheap_operation: nn.Sequential, out_index: torch.Tensor):
        super().__init__()
        self.primary_conv = primary_conv
        self.cheap_operation = cheap_operation
        self.out_chs = len(out_index)
        self.concat_chs = primary_conv[0].out_channels + cheap_operation[0].out_channels
        self.register_buffer("out_index", out_index.clone())
        identity = torch.equal(out_index.cpu(), torch.arange(self.out_chs))
        if not identity:
            self.layout = "gather"
        else:
            self.layout = "concat" if self.out_chs == self.concat_chs else "slice"

    @classmethod
    @torch.no_grad()
    def from_ghost(cls, ghost: GhostModule) -> GhostDeploy:
        primary = _conv_act(*ghost.primary_conv)
        cheap = _conv_act(*ghost.cheap_operation)
        plain = torch.arange(ghost.out_chs, device=ghost.out_index.device)
        index = ghost.out_index if ghost.permuted else plain
        order = concat_order(index.tolist(), ghost.init_chs, ghost.ratio)
        if order is not None:
            m = ghost.init_chs
            primary[0] = _take_out_channels(primary[0], torch.tensor(order[:m]))
            cheap[0] = _take_out_channels(cheap[0], torch.tensor(order[m:]) - m)
            index = plain
        return cls(primary, cheap, index.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.primary_conv(x)
        out = torch.cat([x1, self.cheap_operation(x1)], dim=1)
        if self.layout == "gather":
            return out.index_select(1, self.out_index)
        if self.layout == "slice":
            return out[:, : self.out_chs]
        return out

    def extra_repr(self) -> str:
        return f"out_chs={self.out_chs}, concat_chs={self.concat_chs}, layout={self.layout}"


def concat_order(index: list[int], m: int, ratio: int) -> list[int] | None:
    """A reordering of the concat's channels after which a plain concat (cut to n) equals `index`, or None.

    The primary conv's m outputs may be reordered freely; the cheap depthwise conv's outputs come in
    groups of ratio - 1 per intrinsic channel, so its groups must follow the primary's order (inside a
    group any order). That holds when the first m output channels are the intrinsic ones and the rest
    are ghosts grouped like their intrinsic channels, e.g. always for an unpermuted module.
    """
    n, per = len(index), ratio - 1
    if n < m or any(i >= m for i in index[:m]):
        return None
    primary = index[:m]
    cheap: list[int] = []
    for j, i in enumerate(index[m:]):
        slot = i - m
        if slot < 0 or slot // per != primary[j // per]:
            return None
        cheap.append(slot)
    used = set(cheap)
    for j in range(len(cheap), m * per):  # unused slots of the last groups, in any order
        group = primary[j // per]
        cheap.append(next(s for s in range(group * per, (group + 1) * per) if s not in used))
        used.add(cheap[-1])
    return primary + [m + s for s in cheap]


def deploy_form(model: nn.Module, example_inputs: torch.Tensor | None = None) -> nn.Module:
    """A new, inference-only copy of `model` (left untouched) with the same outputs and less work.

    Args:
        model: any nn.Module: a ghostify-converted model or an original one (its deploy form is the fair
            baseline: BN folded too).
        example_inputs: when given, the traced form is checked against `model` on them; if it differs (a
            forward that runs otherwise than it traces), the untraced form is returned, and if that
            differs too a ConversionError is raised.

    Returns:
        An nn.Module in eval mode with requires_grad off: usually a torch.fx GraphModule. Do not save it
        by pickling; rebuild it from the converted model instead.
    """
    deployed = _deploy_copy(model, trace=True)
    if example_inputs is None:
        return deployed
    expected = _run(model, example_inputs)
    if _matches(expected, _run(deployed, example_inputs)):
        return deployed
    deployed = _deploy_copy(model, trace=False)
    if _matches(expected, _run(deployed, example_inputs)):
        return deployed
    raise ConversionError("the deploy form does not reproduce the model's outputs; use the model as it is.")


def _deploy_copy(model: nn.Module, trace: bool) -> nn.Module:
    copied = copy.deepcopy(model).eval().requires_grad_(False)
    copied = _swap_ghosts(copied)
    if trace:
        copied = _deploy(copied)
    else:
        _fold_sequentials(copied)
    return copied


def _run(model: nn.Module, example_inputs: torch.Tensor) -> list[torch.Tensor]:
    with eval_mode(model), torch.no_grad():
        return [t for t in tree_leaves(model(example_inputs)) if isinstance(t, torch.Tensor)]


def _matches(expected: list[torch.Tensor], got: list[torch.Tensor]) -> bool:
    if len(expected) != len(got):
        return False
    for a, b in zip(expected, got, strict=True):
        if a.shape != b.shape:
            return False
        scale = a.abs().max().item() if a.numel() and a.is_floating_point() else 1.0
        if a.numel() and (a.double() - b.double()).abs().max().item() > 1e-3 * scale + 1e-6:
            return False
    return True


def _swap_ghosts(model: nn.Module) -> nn.Module:
    if isinstance(model, GhostModule):
        return GhostDeploy.from_ghost(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, GhostModule):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, GhostDeploy.from_ghost(module))
    return model


def _conv_act(conv: nn.Conv2d, bn: nn.Module, act: nn.Module) -> nn.Sequential:
    """Sequential(conv with the BN folded in, activation), Identities left out."""
    conv = fuse_conv_bn_eval(conv, bn) if _foldable_bn(bn) else conv
    return nn.Sequential(conv, *([] if isinstance(act, nn.Identity) else [act]))


def _foldable_bn(bn: nn.Module) -> bool:
    return type(bn) is nn.BatchNorm2d and bn.track_running_stats and bn.running_mean is not None


def _take_out_channels(conv: nn.Conv2d, order: torch.Tensor) -> nn.Conv2d:
    """`conv` with its output channels reordered (the weights move; groups must allow it)."""
    new = copy.deepcopy(conv)
    order = order.to(conv.weight.device)
    new.weight = nn.Parameter(conv.weight[order], requires_grad=False)
    if conv.bias is not None:
        new.bias = nn.Parameter(conv.bias[order], requires_grad=False)
    return new


def _fold_sequentials(model: nn.Module) -> None:
    """Fold BN into the conv before it inside Sequentials (where the order is known without tracing)."""
    for seq in [m for m in model.modules() if type(m) is nn.Sequential]:
        names = list(seq._modules)
        for a, b in zip(names, names[1:], strict=False):
            conv, bn = seq._modules[a], seq._modules[b]
            if type(conv) is not nn.Conv2d or not _foldable_bn(bn) or bn.num_features != conv.out_channels:
                continue
            if sum(m is conv for m in model.modules(remove_duplicate=False)) == 1:  # not used elsewhere
                seq._modules[a], seq._modules[b] = fuse_conv_bn_eval(conv, bn), nn.Identity()


class DeployTracer(GhostifyTracer):
    """The rewriters' tracer, with GhostDeploy kept whole (its layout branch is decided per module)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, GhostDeploy) or super().is_leaf_module(m, module_qualified_name)


def _deploy(module: nn.Module) -> nn.Module:
    """The traced, simplified form of `module`; where it does not trace, its children's forms."""
    try:
        graph = DeployTracer().trace(module)
    except Exception:  # noqa: BLE001 - any tracing failure means "keep the structure, go inside"
        _deploy_children(module)
        return module
    gm = fx.GraphModule(module, graph, class_name=type(module).__name__)
    modules = dict(gm.named_modules())
    leaves = {n.target for n in graph.nodes if n.op == "call_module" and _opaque(modules[n.target])}
    for target in leaves:  # leaves the tracer did not enter (timm's no-trace modules): go inside
        _set_module(gm, target, _deploy(modules[target]))
    _drop_no_ops(gm)
    _fold_conv_bn(gm)
    _absorb_gathers(gm)
    _add_in_place(gm)
    graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def _deploy_children(module: nn.Module) -> None:
    _fold_sequentials(module)
    for name, child in module.named_children():
        if not _opaque(child):
            continue
        if _only_called(type(module), name):
            setattr(module, name, _deploy(child))
        else:  # the forward reads the child's attributes, iterates it, or cannot be read: keep its class
            _deploy_children(child)


def _opaque(module: nn.Module) -> bool:
    """A module worth simplifying inside: not a plain torch.nn layer, not already deployed."""
    if isinstance(module, GhostDeploy | fx.GraphModule):
        return False
    return not type(module).__module__.startswith("torch.nn") or isinstance(
        module, nn.Sequential | nn.ModuleList | nn.ModuleDict
    )


@functools.cache
def _only_called(cls: type, name: str) -> bool:
    """Whether `cls.forward` uses `self.<name>` only by calling it (so a GraphModule may stand in)."""
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    uses = re.findall(rf"self\.{re.escape(name)}\b(.?)", source)
    return bool(uses) and all(after == "(" for after in uses)


def _call_counts(graph: fx.Graph) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            counts[node.target] = counts.get(node.target, 0) + 1
    return counts


def _drop_no_ops(gm: fx.GraphModule) -> None:
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and type(modules[node.target]) in NO_OP_MODULES and node.args:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)


def _set_module(gm: fx.GraphModule, target: str, module: nn.Module) -> None:
    parent, _, attr = target.rpartition(".")
    setattr(gm.get_submodule(parent), attr, module)


def _fold_conv_bn(gm: fx.GraphModule) -> None:
    """conv -> BN pairs where the conv's output goes only to the BN and neither module is shared."""
    modules = dict(gm.named_modules())
    calls = _call_counts(gm.graph)
    for node in list(gm.graph.nodes):
        conv_node = node.args[0] if node.op == "call_module" and node.args else None
        if not isinstance(conv_node, fx.Node) or conv_node.op != "call_module":
            continue
        conv, bn = modules[conv_node.target], modules[node.target]
        if type(conv) is not nn.Conv2d or not _foldable_bn(bn) or bn.num_features != conv.out_channels:
            continue
        if len(conv_node.users) != 1 or calls[conv_node.target] != 1 or calls[node.target] != 1:
            continue
        _set_module(gm, conv_node.target, fuse_conv_bn_eval(conv, bn))
        node.replace_all_uses_with(conv_node)
        gm.graph.erase_node(node)


def _absorb_gathers(gm: fx.GraphModule) -> None:
    """Let the convs that alone read a GhostDeploy's output take its raw concat (the reordering in weights).

    The walk goes through element-wise activations and depthwise convs (whose channels move along), so
    MobileNet-style expand -> depthwise -> project blocks lose the gather too.
    """
    modules = dict(gm.named_modules())
    calls = _call_counts(gm.graph)
    for node in gm.graph.nodes:
        ghost = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(ghost, GhostDeploy) or ghost.layout not in ("gather", "slice"):
            continue
        readers = _channel_readers(node, ghost.out_chs, modules, calls)
        if not readers:
            continue
        for target in readers:
            conv = modules[target]
            spread = _spread_channels(conv, ghost.out_index, ghost.concat_chs, _depthwise(conv))
            _set_module(gm, target, spread)
            modules[target] = spread
        ghost.layout = "raw"


def _depthwise(conv: nn.Module) -> bool:
    return type(conv) is nn.Conv2d and conv.groups == conv.in_channels == conv.out_channels


def _channel_readers(
    node: fx.Node, channels: int, modules: dict[str, nn.Module], calls: dict[str, int]
) -> list[str] | None:
    """Conv targets that see `node`'s channels: ungrouped convs reading them, depthwise convs passing them
    on (through element-wise activations); None if anything else reads them or a conv is shared."""
    found: list[str] = []
    for user in node.users:
        others = list(user.args[1:]) + list(user.kwargs.values())
        if not user.args or user.args[0] is not node or any(a is node for a in others):
            return None
        module = modules.get(user.target) if user.op == "call_module" else None
        shared = module is not None and calls[user.target] != 1  # harmless for a stateless activation
        target = user.target
        if isinstance(module, GhostDeploy):
            target = f"{user.target}.primary_conv.0"  # an ungrouped conv reads the module's input
            module = modules[target]
        if type(module) is nn.Conv2d and not shared and module.in_channels == channels:
            if module.groups == 1:
                found.append(target)
                continue
            if not _depthwise(module) or target != user.target:
                return None
            found.append(target)
            deeper = _channel_readers(user, channels, modules, calls)
        elif (
            isinstance(module, ELEMENTWISE_MODULES)
            or (user.op == "call_function" and user.target in ELEMENTWISE_FUNCTIONS)
            or (user.op == "call_method" and user.target in ELEMENTWISE_METHODS)
        ):
            deeper = _channel_readers(user, channels, modules, calls)
        else:
            return None
        if deeper is None:
            return None
        found += deeper
    return found


def _spread_channels(conv: nn.Conv2d, index: torch.Tensor, width: int, depthwise: bool) -> nn.Conv2d:
    """`conv` on a `width`-channel input whose channel index[j] holds its old input channel j.

    A depthwise conv keeps channels apart, so its output follows the same layout (zero where unused).
    """
    new = copy.deepcopy(conv)
    index = index.to(conv.weight.device)
    if depthwise:
        weight = conv.weight.new_zeros(width, *conv.weight.shape[1:])
        weight[index] = conv.weight
        if conv.bias is not None:
            new.bias = nn.Parameter(conv.bias.new_zeros(width).index_copy(0, index, conv.bias), False)
        new.out_channels = new.groups = width
    else:
        weight = conv.weight.new_zeros(conv.out_channels, width, *conv.kernel_size)
        weight[:, index] = conv.weight
    new.weight = nn.Parameter(weight, requires_grad=False)
    new.in_channels = width
    return new


def add_into(fresh: torch.Tensor, other: torch.Tensor | float) -> torch.Tensor:
    """`fresh + other`, written into `fresh` (a temporary nothing else reads) when the result fits in it."""
    if torch.jit.is_tracing():  # the ONNX exporter: no in-place ops there, and shapes are tensors
        return fresh + other
    if isinstance(other, torch.Tensor) and (
        other.dtype != fresh.dtype or torch.broadcast_shapes(fresh.shape, other.shape) != fresh.shape
    ):
        return fresh + other
    return fresh.add_(other)


def _add_in_place(gm: fx.GraphModule) -> None:
    """Residual adds into a conv's fresh output, as eager code's `out += identity` does.

    Tracing turns `out += identity` into an out-of-place add: a new output-sized tensor per block.
    """
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        is_add = node.op == "call_function" and node.target in (operator.add, operator.iadd, torch.add)
        if not is_add or len(node.args) != 2 or node.kwargs:
            continue
        for fresh, other in (node.args, node.args[::-1]):
            producer = (
                modules.get(fresh.target)
                if isinstance(fresh, fx.Node) and fresh.op == "call_module"
                else None
            )
            if isinstance(producer, nn.Conv2d | GhostDeploy) and len(fresh.users) == 1 and other is not fresh:
                with gm.graph.inserting_before(node):
                    new = gm.graph.call_function(add_into, (fresh, other))
                node.replace_all_uses_with(new)
                gm.graph.erase_node(node)
                break
