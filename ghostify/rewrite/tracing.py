"""Trace any nn.Module with torch.fx, falling back to its submodules where the whole will not trace.

The rewriters only *read* these graphs to find patterns (conv -> BN -> activation, residual stages);
the model itself is changed by swapping submodules, so it keeps its class and state-dict names.
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass, field

import torch.fx as fx
from torch import nn


@functools.cache
def _timm_notrace() -> tuple[tuple[type[nn.Module], ...], tuple]:
    """timm's registry of modules and functions the tracer must not enter (filled on import)."""
    try:
        import timm.models  # noqa: F401  (importing registers timm's leaf modules)
        from timm.layers import get_notrace_functions, get_notrace_modules
    except ImportError:  # pragma: no cover - timm is a dependency, but keep tracing usable without it
        return (), ()
    return tuple(get_notrace_modules()), tuple(get_notrace_functions())


class GhostifyTracer(fx.Tracer):
    """torch.fx tracer that treats timm's no-trace modules as leaves and wraps its no-trace functions."""

    def __init__(self) -> None:
        leaf_modules, functions = _timm_notrace()
        super().__init__(autowrap_functions=tuple(f for f in functions if callable(f)))
        self._leaf_types = tuple(leaf_modules)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, nn.Conv2d):  # subclasses too (timm's StdConv2d, ScaledStdConv2d): every conv a node
            return True
        if self._leaf_types and isinstance(m, self._leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)


@dataclass
class TracedPart:
    """One traced piece of the model: `module` lives at `prefix` in the root ("" is the root itself)."""

    prefix: str
    module: nn.Module
    graph: fx.Graph

    def qualified(self, target: str) -> str:
        """Name of a call_module target relative to the root model."""
        return f"{self.prefix}.{target}" if self.prefix else target

    def call_counts(self) -> Counter:
        """How many times each submodule is called in this graph (shared modules are called more)."""
        return Counter(n.target for n in self.graph.nodes if n.op == "call_module")


@dataclass
class TraceResult:
    """The graphs that cover the model, and what could not be traced."""

    parts: list[TracedPart] = field(default_factory=list)
    lone_convs: list[str] = field(default_factory=list)  # convs seen only as modules, not in any graph
    untraced: list[tuple[str, str]] = field(default_factory=list)  # (module name, why)

    @property
    def complete(self) -> bool:
        """True when the model's own forward traced (leaf modules may have been traced separately)."""
        return bool(self.parts) and self.parts[0].prefix == "" and not self.untraced

    def fallback_notes(self) -> list[str]:
        return [
            f"{name or '<model>'}: not traceable ({why}); converted inside its submodules instead"
            for name, why in self.untraced
        ]


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:160]


def trace_model(model: nn.Module) -> TraceResult:
    """Trace `model`; where a module does not trace, trace each of its children instead (recursively)."""
    result = TraceResult()
    _trace_into(model, "", result)
    return result


def _trace_into(module: nn.Module, prefix: str, result: TraceResult) -> None:
    tracer = GhostifyTracer()
    try:
        graph = tracer.trace(module)
    except Exception as err:  # noqa: BLE001 - any tracing failure means "fall back"
        result.untraced.append((prefix, _one_line(err)))
        for name, child in module.named_children():
            child_prefix = f"{prefix}.{name}" if prefix else name
            if isinstance(child, nn.Conv2d):
                result.lone_convs.append(child_prefix)
            elif any(isinstance(m, nn.Conv2d) for m in child.modules()):
                _trace_into(child, child_prefix, result)
        return
    part = TracedPart(prefix=prefix, module=module, graph=graph)
    result.parts.append(part)
    # Leaf modules the tracer did not enter (timm's no-trace list) may hold convs: look inside them too.
    for target in dict.fromkeys(n.target for n in graph.nodes if n.op == "call_module"):
        leaf = module.get_submodule(target)
        if not isinstance(leaf, nn.Conv2d) and any(isinstance(m, nn.Conv2d) for m in leaf.modules()):
            _trace_into(leaf, part.qualified(target), result)
