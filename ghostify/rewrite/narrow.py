"""Narrow a residual block to fewer residual channels by slicing its weights.

A block is read through its torch.fx graph. Every tensor in the graph lives in a *channel space*; a
channel-space union-find ties together the tensors whose channel `i` must stay channel `i`:

- the block input is the residual space R (its output must land in R too, through the residual add);
- a dense conv consumes a space on its in-channels and starts a new space on its out-channels;
- a depthwise conv, BN, activations, dropout / drop-path, pooling and per-channel means keep the space;
- elementwise add / mul / sub / div union the spaces of their operands (an SE gate joins its input);
- a grouped conv starts a new space coupled group-by-group to its input space (the same groups are kept
  on both sides, so the group width stays the same and the number of groups shrinks);
- anything else (split, cat, view, indexing, unknown modules...) *freezes* the spaces it touches: they keep
  all their channels. Freezing the residual space is an error: the block cannot be narrowed.

Kept channels: R keeps the indices the caller passes (chosen for the whole stage). Every other space keeps
the same fraction `len(keep) / c` of its channels (whole groups for grouped convs), chosen by importance:
the L2 norm of each channel's producing conv filter, times |gamma| / sqrt(running_var + eps) of the BN on
that channel (groups: the sum over their channels). Kept indices stay in ascending order, so a block narrowed
with every channel kept is the original block, exactly.
"""

from __future__ import annotations

import copy
import math
import operator
import weakref
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.shape_prop import ShapeProp

from ghostify.errors import ConversionError
from ghostify.modes import eval_mode
from ghostify.rewrite.tracing import GhostifyTracer

_BINARY = {
    operator.add,
    operator.iadd,
    operator.mul,
    operator.imul,
    operator.sub,
    operator.isub,
    operator.truediv,
    operator.itruediv,
    torch.add,
    torch.mul,
    torch.sub,
    torch.div,
}
_BINARY_METHODS = {"add", "add_", "mul", "mul_", "sub", "sub_", "div", "div_"}
_UNARY = {
    F.relu,
    F.relu6,
    F.silu,
    F.gelu,
    F.sigmoid,
    F.hardsigmoid,
    F.hardswish,
    F.leaky_relu,
    F.elu,
    F.mish,
    F.dropout,
    F.avg_pool2d,
    F.max_pool2d,
    F.adaptive_avg_pool2d,
    F.adaptive_max_pool2d,
    torch.relu,
    torch.sigmoid,
    torch.tanh,
    torch.mean,
    torch.amax,
    torch.clone,
}
_UNARY_METHODS = {
    "relu",
    "relu_",
    "sigmoid",
    "sigmoid_",
    "tanh",
    "tanh_",
    "contiguous",
    "clone",
    "mean",
    "amax",
    "sum",
    "clamp",
    "clamp_",
    "float",
    "to",
}
# Parameter-free modules whose output channel i depends on input channel i only.
_CHANNELWISE_MODULE_PREFIXES = (
    "torch.nn.modules.activation",
    "torch.nn.modules.dropout",
    "torch.nn.modules.pooling",
    "torchvision.ops.stochastic_depth",
    "timm.layers.activations",
    "timm.layers.drop",
    "timm.layers.pool2d_same",
)


def is_residual_add(node: fx.Node) -> bool:
    """Whether `node` is an elementwise addition of two tensors."""
    if node.op == "call_function" and node.target in (operator.add, operator.iadd, torch.add):
        pass
    elif node.op == "call_method" and node.target in ("add", "add_"):
        pass
    else:
        return False
    return sum(isinstance(a, fx.Node) for a in node.args[:2]) == 2


_TRACER: GhostifyTracer | None = None


def trace_block(block: nn.Module) -> fx.GraphModule:
    """Trace one block (timm's no-trace modules stay leaves)."""
    global _TRACER
    if _TRACER is None:
        _TRACER = GhostifyTracer()  # built once: collecting timm's no-trace registry is not free
    graph = _TRACER.trace(block)
    return fx.GraphModule(block, graph)


_PREPARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def prepared_graph(block: nn.Module, in_shape: tuple[int, ...]) -> fx.GraphModule:
    """`block` traced, with shapes propagated for `in_shape` (cached per block and shape)."""
    per_block = _PREPARED.setdefault(block, {})
    if in_shape not in per_block:
        gm = trace_block(block)
        propagate_shapes(gm, in_shape)
        per_block[in_shape] = gm
    return per_block[in_shape]


@torch.no_grad()
def propagate_shapes(gm: fx.GraphModule, in_shape: tuple[int, ...]) -> None:
    """Run ShapeProp on `gm` in eval mode with fake tensors; every module keeps its training flag."""
    with eval_mode(gm):
        try:
            prop = ShapeProp(gm)  # made outside the fake mode, so it does not copy the block
            with FakeTensorMode(allow_non_fake_inputs=True) as fake_mode:
                prop.propagate(fake_mode.from_tensor(torch.empty(*in_shape)))
        except Exception:  # noqa: BLE001 - some ops have no fake kernel: compute for real
            ShapeProp(gm).propagate(torch.randn(*in_shape))


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _channelwise_module(m: nn.Module) -> bool:
    if isinstance(m, nn.Identity):
        return True
    if any(True for _ in m.parameters()):
        return False
    return type(m).__module__.startswith(_CHANNELWISE_MODULE_PREFIXES)


def _op_name(node: fx.Node, gm: fx.GraphModule) -> str:
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return str(node.target)


@dataclass
class ChannelPlan:
    """The channel spaces of one block and the convs / BNs that live on them."""

    gm: fx.GraphModule
    parent: list[int] = field(default_factory=list)
    size: list[int] = field(default_factory=list)
    frozen_by: dict[int, str] = field(default_factory=dict)  # space -> "<op> at <node>" that froze it
    convs: list[tuple[str, int | None, int]] = field(default_factory=list)  # (target, in space, out space)
    bns: list[tuple[str, int]] = field(default_factory=list)  # (target, space)
    group_links: list[tuple[str, int, int, int]] = field(default_factory=list)  # (target, in, out, groups)
    residual: int = 0
    output: int = 0

    def new(self, size: int) -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        return len(self.parent) - 1

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra
            if rb in self.frozen_by and ra not in self.frozen_by:
                self.frozen_by[ra] = self.frozen_by[rb]
        return ra

    def freeze(self, s: int, why: str) -> None:
        self.frozen_by.setdefault(self.find(s), why)

    def frozen(self, s: int) -> str | None:
        root = self.find(s)
        for k, why in self.frozen_by.items():
            if self.find(k) == root:
                return why
        return None

    def group_widths(self) -> list[int]:
        """Input-channel group widths of the grouped (not depthwise) convs."""
        out = []
        for target, *_rest, groups in self.group_links:
            conv = self.gm.get_submodule(target)
            out.append(conv.in_channels // groups)
        return out


def analyse_block(
    block: nn.Module, in_shape: tuple[int, ...], name: str = "block", strict: bool = True
) -> ChannelPlan:
    """Build the channel-space plan of `block` for an input of shape `in_shape` (N, C, H, W).

    With `strict`, the block must map its residual channels to themselves in a way that can be sliced
    (else ConversionError); without, the plan is only read for channel scores and group widths.
    """
    gm = prepared_graph(block, tuple(in_shape))
    plan = ChannelPlan(gm=gm)
    space: dict[fx.Node, int] = {}

    def chan(node: fx.Node) -> int | None:
        shape = _shape(node)
        return shape[1] if shape is not None and len(shape) == 4 else None

    def unknown(node: fx.Node) -> None:
        why = f"{_op_name(node, gm)} at {node.name}"
        for arg in node.all_input_nodes:
            if arg in space:
                plan.freeze(space[arg], why)
        c = chan(node)
        if c is not None:
            space[node] = plan.new(c)
            plan.freeze(space[node], why)

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if node.target != next(iter(gm.graph.nodes)).target:
                unknown(node)
                continue
            plan.residual = plan.new(in_shape[1])
            space[node] = plan.residual
        elif node.op == "get_attr":
            continue  # a parameter used directly: caught as unknown where it meets a channel space
        elif node.op == "output":
            arg = node.args[0]
            if not isinstance(arg, fx.Node) or arg not in space:
                raise ConversionError(f"{name} does not return one tensor; it cannot be narrowed.")
            plan.output = space[arg]
            if plan.size[plan.output] == plan.size[plan.residual]:
                plan.union(plan.residual, plan.output)
            elif strict:
                raise ConversionError(f"{name} changes the number of channels; it cannot be narrowed.")
        elif node.op == "call_module":
            m = gm.get_submodule(node.target)
            src = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
            s_in = space.get(src) if src is not None else None
            if len(node.all_input_nodes) != 1 or s_in is None or chan(node) is None:
                unknown(node)
            elif isinstance(m, nn.Conv2d):
                if m.groups == 1:
                    space[node] = plan.new(m.out_channels)
                    plan.convs.append((node.target, s_in, space[node]))
                elif m.groups == m.in_channels == m.out_channels:
                    space[node] = s_in
                    plan.convs.append((node.target, None, s_in))
                else:
                    space[node] = plan.new(m.out_channels)
                    plan.convs.append((node.target, s_in, space[node]))
                    plan.group_links.append((node.target, s_in, space[node], m.groups))
            elif isinstance(m, nn.BatchNorm2d):
                space[node] = s_in
                plan.bns.append((node.target, s_in))
            elif _channelwise_module(m) and chan(node) == chan(src):
                space[node] = s_in
            else:
                unknown(node)
        elif node.op in ("call_function", "call_method"):
            tensors = [a for a in node.args if isinstance(a, fx.Node)]
            kw_nodes = [a for a in node.kwargs.values() if isinstance(a, fx.Node)]
            fn = node.target
            binary = fn in _BINARY if node.op == "call_function" else fn in _BINARY_METHODS
            unary = fn in _UNARY if node.op == "call_function" else fn in _UNARY_METHODS
            c_out = chan(node)
            if binary and not kw_nodes and c_out is not None:
                spaces = []
                ok = True
                for a in tensors:
                    c = chan(a)
                    if a in space and c == c_out:
                        spaces.append(space[a])
                    elif c is None or c != 1:
                        ok = False  # a parameter, or a tensor not in a channel space
                if ok and spaces:
                    root = spaces[0]
                    for s in spaces[1:]:
                        root = plan.union(root, s)
                    space[node] = root
                else:
                    unknown(node)
            elif unary and len(tensors) == 1 and not kw_nodes and tensors[0] in space:
                if c_out is not None and c_out == chan(tensors[0]):
                    space[node] = space[tensors[0]]
                else:
                    unknown(node)
            elif any(a in space for a in node.all_input_nodes):
                unknown(node)
            elif c_out is not None:
                unknown(node)
    why = plan.frozen(plan.residual)
    if strict and why is not None:
        raise ConversionError(f"{name} uses {why} on its residual channels")
    return plan


def _bn_scale(bn: nn.BatchNorm2d) -> torch.Tensor:
    scale = torch.ones(bn.num_features)
    if bn.weight is not None:
        scale = bn.weight.detach().abs().float()
    if bn.running_var is not None:
        scale = scale / torch.sqrt(bn.running_var.detach().float() + bn.eps)
    return scale


def space_scores(plan: ChannelPlan) -> dict[int, torch.Tensor]:
    """Importance per channel of every space: producing conv filter L2 norms times BN scales."""
    scores: dict[int, torch.Tensor] = {}
    for target, _s_in, s_out in plan.convs:
        w = plan.gm.get_submodule(target).weight.detach().float()
        norm = w.flatten(1).norm(dim=1)
        root = plan.find(s_out)
        scores[root] = scores.get(root, torch.zeros_like(norm)) + norm
    for target, s in plan.bns:
        root = plan.find(s)
        scale = _bn_scale(plan.gm.get_submodule(target))
        scores[root] = scores.get(root, torch.ones_like(scale)) * scale
    return scores


def residual_writer_scores(plan: ChannelPlan) -> torch.Tensor:
    """How strongly `plan`'s block writes each output channel (zeros where nothing inside writes it)."""
    root = plan.find(plan.output)
    scores = space_scores(plan)
    return scores.get(root, torch.zeros(plan.size[plan.output]))


def _top(score: torch.Tensor, k: int) -> torch.Tensor:
    idx = torch.topk(score, k, largest=True, sorted=False).indices if k < score.numel() else None
    return torch.arange(score.numel()) if idx is None else torch.sort(idx).values


def narrow_block(
    block: nn.Module,
    in_shape: tuple[int, ...],
    keep: torch.Tensor,
    name: str = "block",
) -> nn.Module:
    """Return a copy of `block` that works on the residual channels `keep` (ascending indices) only.

    Inner spaces keep the fraction len(keep) / C of their channels (at least one; whole groups where a
    grouped conv touches them), picked by importance (see the module docstring). Weights are the
    original weights sliced to the kept channels.

    Raises:
        ConversionError: the block does something to its residual channels that cannot be sliced.
    """
    plan = analyse_block(block, in_shape, name)
    c = in_shape[1]
    frac = keep.numel() / c
    scores = space_scores(plan)
    kept: dict[int, torch.Tensor] = {plan.find(plan.residual): keep.clone()}

    # Grouped convs first: the same groups on both sides.
    for target, s_in, s_out, groups in plan.group_links:
        r_in, r_out = plan.find(s_in), plan.find(s_out)
        n_in, n_out = plan.size[s_in] // groups, plan.size[s_out] // groups
        if r_in == plan.find(plan.residual) or r_out == plan.find(plan.residual):
            raise ConversionError(f"{name} uses a grouped conv ({target}) directly on its residual channels")
        chosen = None
        for r, n in ((r_in, n_in), (r_out, n_out)):
            if r in kept:
                sel = kept[r].view(-1, n)[:, 0] // n if kept[r].numel() % n == 0 else None
                if sel is None or not torch.equal(kept[r], _expand(sel, n)):
                    raise ConversionError(f"{name}: grouped conv {target} conflicts with another layer")
                chosen = sel
        if chosen is None:
            if plan.frozen(r_in) or plan.frozen(r_out):
                chosen = torch.arange(groups)
            else:
                m = min(groups, max(1, round(groups * frac)))
                g_score = torch.zeros(groups)
                for r, n in ((r_in, n_in), (r_out, n_out)):
                    if r in scores:
                        g_score += scores[r].view(groups, n).sum(1)
                chosen = _top(g_score, m)
        kept[r_in] = _expand(chosen, n_in)
        kept[r_out] = _expand(chosen, n_out)

    def keep_of(s: int) -> torch.Tensor:
        r = plan.find(s)
        if r not in kept:
            size = plan.size[s]
            if plan.frozen(r):
                kept[r] = torch.arange(size)
            else:
                k = min(size, max(1, round(size * frac)))
                kept[r] = _top(scores.get(r, torch.zeros(size)), k)
        return kept[r]

    new = copy.deepcopy(block)
    done: dict[str, tuple] = {}
    for target, s_in, s_out in plan.convs:
        conv = new.get_submodule(target)
        k_out = keep_of(s_out)
        if s_in is None:  # depthwise
            key = ("dw", tuple(k_out.tolist()))
        else:
            key = (tuple(keep_of(s_in).tolist()), tuple(k_out.tolist()))
        if target in done:
            if done[target] != key:
                raise ConversionError(f"{name}: conv {target} is called on different channel sets")
            continue
        done[target] = key
        _slice_conv(conv, None if s_in is None else keep_of(s_in), k_out)
    for target, s in plan.bns:
        if target in done:
            continue
        done[target] = ()
        _slice_bn(new.get_submodule(target), keep_of(s))
    return new


def _expand(groups: torch.Tensor, n: int) -> torch.Tensor:
    return (groups.view(-1, 1) * n + torch.arange(n).view(1, -1)).flatten()


def _param(t: torch.Tensor, like: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(t.clone().contiguous(), requires_grad=like.requires_grad)


@torch.no_grad()
def _slice_conv(conv: nn.Conv2d, k_in: torch.Tensor | None, k_out: torch.Tensor) -> None:
    w = conv.weight
    if k_in is None:  # depthwise: one filter per channel
        conv.weight = _param(w[k_out], w)
        conv.in_channels = conv.out_channels = conv.groups = k_out.numel()
    elif conv.groups == 1:
        conv.weight = _param(w[k_out][:, k_in], w)
        conv.in_channels, conv.out_channels = k_in.numel(), k_out.numel()
    else:  # grouped: whole groups, kept on both sides (see narrow_block)
        n_in = conv.in_channels // conv.groups
        conv.weight = _param(w[k_out], w)
        conv.groups = k_in.numel() // n_in
        conv.in_channels, conv.out_channels = k_in.numel(), k_out.numel()
    if conv.bias is not None:
        conv.bias = _param(conv.bias[k_out], conv.bias)


@torch.no_grad()
def _slice_bn(bn: nn.BatchNorm2d, k: torch.Tensor) -> None:
    if bn.weight is not None:
        bn.weight = _param(bn.weight[k], bn.weight)
    if bn.bias is not None:
        bn.bias = _param(bn.bias[k], bn.bias)
    if bn.running_mean is not None:
        bn.running_mean = bn.running_mean[k].clone()
        bn.running_var = bn.running_var[k].clone()
    bn.num_features = k.numel()


def round_raw(channels: int, ratio: int, group_widths: list[int]) -> int:
    """`channels / ratio` rounded to the nearest multiple of 8 and of every group width (ties go down)."""
    unit = 8
    for g in group_widths:
        unit = unit * g // math.gcd(unit, g)
    return max(unit, math.ceil(channels / ratio / unit - 0.5) * unit)
