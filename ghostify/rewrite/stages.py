"""Find residual stages: runs of residual blocks that make up one container module.

Detection reads graphs and shapes, never class names:

1. One eager forward with hooks records every module's input / output shape and call count
   (this works even where the model as a whole does not trace).
2. A *container* is any module whose own FX graph, traced with its direct children as leaves, is a plain
   chain `input -> child_1 -> child_2 -> ... -> child_k -> output` over all its children (torchvision
   `layer3`, RegNet `AnyStage`, timm `RegStage`, any user `nn.Sequential`). Only such a container can be
   swapped for a G-Ghost stage without changing what the rest of the model sees.
3. A child is a *residual block* when its FX graph (shapes propagated with ShapeProp) adds two tensors of the
   same shape, one of them the block input or a projection of it (a chain of single-input ops on the input,
   with fewer convs than the other operand's path), and the block returns that sum (possibly through
   single-input activations).
4. A stage is a container whose children are all residual blocks, taking and returning 4-D tensors; it is
   *eligible* with n >= 3 blocks whose outputs all have the first block's output shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from ghostify.modes import eval_mode
from ghostify.rewrite.narrow import is_residual_add, prepared_graph
from ghostify.rewrite.tracing import GhostifyTracer


@dataclass
class StageInfo:
    """A container of residual blocks, eligible for G-Ghost or not (`why` says why not)."""

    name: str
    blocks: list[str]  # qualified names of the blocks, in call order
    in_shape: tuple[int, ...]
    out_shapes: list[tuple[int, ...]]
    eligible: bool
    why: str = ""
    block_in_shapes: list[tuple[int, ...]] = field(default_factory=list)

    @property
    def channels(self) -> int:
        return self.out_shapes[0][1]


@dataclass
class ModuleCall:
    count: int = 0
    in_shape: tuple[int, ...] | None = None
    out_shape: tuple[int, ...] | None = None


class _ChildLeafTracer(GhostifyTracer):
    """Trace a container with its direct children kept as leaves."""

    def __init__(self) -> None:
        super().__init__()
        self._children: set[int] = set()

    def trace_container(self, root: nn.Module) -> fx.Graph:
        self._children = {id(m) for m in root.children()}
        return self.trace(root)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if id(m) in self._children and "." not in module_qualified_name:
            return True
        return super().is_leaf_module(m, module_qualified_name)


_CHILD_TRACER: _ChildLeafTracer | None = None


def _as_tuple(example_inputs) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


def call_model(model: nn.Module, example_inputs, convert=lambda t: t) -> None:
    """model(example_inputs) for a tensor, a tuple of positional inputs or a dict of keyword inputs."""
    if isinstance(example_inputs, dict):
        model(**{k: convert(v) if isinstance(v, torch.Tensor) else v for k, v in example_inputs.items()})
    else:
        model(*(convert(v) if isinstance(v, torch.Tensor) else v for v in _as_tuple(example_inputs)))


@torch.no_grad()
def record_calls(model: nn.Module, example_inputs) -> dict[str, ModuleCall]:
    """Shapes and call counts of every module on one eval-mode forward (training flags are restored)."""
    calls: dict[str, ModuleCall] = {name: ModuleCall() for name, _ in model.named_modules()}
    handles = []

    def hook(name):
        def fn(module, args, output):
            rec = calls[name]
            rec.count += 1
            if rec.count == 1:
                if args and isinstance(args[0], torch.Tensor):
                    rec.in_shape = tuple(args[0].shape)
                if isinstance(output, torch.Tensor):
                    rec.out_shape = tuple(output.shape)

        return fn

    for name, m in model.named_modules():
        handles.append(m.register_forward_hook(hook(name)))
    try:
        with eval_mode(model):
            try:
                with FakeTensorMode(allow_non_fake_inputs=True) as fake_mode:
                    call_model(model, example_inputs, fake_mode.from_tensor)
            except Exception:  # noqa: BLE001 - some ops have no fake kernel: compute for real
                for rec in calls.values():
                    rec.count, rec.in_shape, rec.out_shape = 0, None, None
                call_model(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
    return calls


def chain_children(container: nn.Module) -> list[str] | None:
    """Names of the container's children if its forward is exactly child_1 -> ... -> child_k, else None."""
    children = [n for n, _ in container.named_children()]
    if not children:
        return None
    try:
        global _CHILD_TRACER
        if _CHILD_TRACER is None:
            _CHILD_TRACER = _ChildLeafTracer()
        graph = _CHILD_TRACER.trace_container(container)
    except Exception:  # noqa: BLE001 - a container that does not trace is not a stage
        return None
    order: list[str] = []
    prev: fx.Node | None = None
    for node in graph.nodes:
        if node.op == "placeholder":
            if prev is not None:
                return None
            prev = node
        elif node.op == "call_module":
            if node.target not in children or len(node.all_input_nodes) != 1 or node.args[0] is not prev:
                return None
            order.append(node.target)
            prev = node
        elif node.op == "output":
            if node.args[0] is not prev:
                return None
        else:
            return None
    return order if order == children else None


def _conv_count(node: fx.Node, stop: fx.Node, gm: fx.GraphModule) -> int | None:
    """Convs on the paths from `stop` (the input) to `node`; None when `node` does not depend on `stop`."""
    seen: set[fx.Node] = set()
    stack = [node]
    convs = 0
    reaches = False
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n is stop:
            reaches = True
            continue
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.Conv2d):
            convs += 1
        stack.extend(n.all_input_nodes)
    return convs if reaches else None


def residual_add(block: nn.Module, in_shape: tuple[int, ...]) -> fx.Node | None:
    """The residual add of `block` (see the module docstring), or None."""
    try:
        gm = prepared_graph(block, tuple(in_shape))
    except Exception:  # noqa: BLE001 - untraceable blocks are not recognised as residual
        return None
    nodes = list(gm.graph.nodes)
    inputs = [n for n in nodes if n.op == "placeholder"]
    if not inputs:
        return None
    x = inputs[0]
    out = next(n for n in nodes if n.op == "output").args[0]
    if not isinstance(out, fx.Node):
        return None
    # Walk back from the output through single-input channel-wise tails (activations) to the add.
    node = out
    for _ in range(4):
        if is_residual_add(node):
            break
        if len(node.all_input_nodes) != 1:
            return None
        node = node.all_input_nodes[0]
    if not is_residual_add(node):
        return None
    a, b = node.args[:2]
    sa, sb = a.meta.get("tensor_meta"), b.meta.get("tensor_meta")
    if sa is None or sb is None or tuple(sa.shape) != tuple(sb.shape):
        return None
    ca, cb = _conv_count(a, x, gm), _conv_count(b, x, gm)
    if ca is None or cb is None or ca == cb:
        return None
    shortcut = a if ca < cb else b
    while shortcut is not x:  # the shortcut must be the input or a plain chain of ops on it
        if len(shortcut.all_input_nodes) != 1:
            return None
        shortcut = shortcut.all_input_nodes[0]
    return node


def find_stages(model: nn.Module, example_inputs) -> list[StageInfo]:
    """Every container of residual blocks in `model`, eligible or not, in module order."""
    calls = record_calls(model, example_inputs)
    stages: list[StageInfo] = []
    residual_cache: dict[str, bool] = {}
    for name, container in model.named_modules():
        rec = calls.get(name)
        if rec is None or rec.count != 1 or rec.in_shape is None or rec.out_shape is None:
            continue
        if len(rec.in_shape) != 4 or len(rec.out_shape) != 4:
            continue
        order = chain_children(container)
        if order is None:
            continue
        qualified = [f"{name}.{c}" if name else c for c in order]
        ok = True
        for q in qualified:
            crec = calls[q]
            if crec.count != 1 or crec.in_shape is None or crec.out_shape is None or len(crec.in_shape) != 4:
                ok = False
                break
            if q not in residual_cache:
                residual_cache[q] = residual_add(model.get_submodule(q), crec.in_shape) is not None
            if not residual_cache[q]:
                ok = False
                break
        if not ok:
            continue
        out_shapes = [calls[q].out_shape for q in qualified]
        info = StageInfo(
            name=name,
            blocks=qualified,
            in_shape=rec.in_shape,
            out_shapes=out_shapes,
            eligible=False,
            block_in_shapes=[calls[q].in_shape for q in qualified],
        )
        if name == "":
            info.why = "the model itself is the stage; wrap it in a module to convert it"
        elif len(qualified) < 3:
            info.why = f"fewer than 3 blocks ({len(qualified)})"
        elif any(s != out_shapes[0] for s in out_shapes[1:]):
            info.why = "block output shapes differ after the first block"
        else:
            info.eligible = True
        stages.append(info)
    return stages


def non_residual_note(model: nn.Module) -> str:
    """A short description used when no stage at all was found."""
    return f"{type(model).__name__} has no container whose children are all residual blocks"
