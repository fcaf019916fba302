"""Graph rewriting: find sites on torch.fx graphs, swap in the paper's modules, inherit weights."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ghostify.config import ConvertConfig
from ghostify.errors import ConversionError
from ghostify.rewrite.c_ghost import apply_c_ghost
from ghostify.rewrite.result import ConversionResult, SiteRecord


def convert_model(
    model: nn.Module, config: ConvertConfig, example_inputs: torch.Tensor | None = None
) -> ConversionResult:
    """Convert a deep copy of `model` as `config` says; the input model is never touched.

    G-Ghost needs `example_inputs` (a batch the model accepts) to see the shapes of its stages.
    """
    if not isinstance(model, nn.Module):
        raise ConversionError(f"expected an nn.Module to convert, got {type(model).__name__}.")
    converted = copy.deepcopy(model)
    result = ConversionResult(model=converted, config=config)
    if config.mode in ("g-ghost", "both"):
        from ghostify.rewrite.g_ghost import apply_g_ghost

        if example_inputs is None:
            raise ConversionError(
                "G-Ghost needs example inputs to find the model's stages; pass example_inputs."
            )
        apply_g_ghost(converted, config, example_inputs, result)
    if config.mode in ("c-ghost", "both"):
        apply_c_ghost(converted, config, result)
        _note_nested_sites(result)
    if not result.sites:
        raise ConversionError(_nothing_converted(result))
    return result


def _note_nested_sites(result: ConversionResult) -> None:
    """Mode "both": say on each G-Ghost stage's record how many C-Ghost convs it now holds."""
    for stage in (s for s in result.sites if s.kind == "g-ghost"):
        inside = sum(1 for s in result.sites if s.kind == "c-ghost" and s.name.startswith(stage.name + "."))
        if inside:
            stage.detail += f", {inside} C-Ghost convs inside"


def _nothing_converted(result: ConversionResult) -> str:
    if not result.skipped:
        return "the model has no ordinary conv (nn.Conv2d with groups=1) to convert; nothing to do."
    reasons: dict[str, int] = {}
    for _, why in result.skipped:
        key = why.split(" (")[0].split(";")[0]
        reasons[key] = reasons.get(key, 0) + 1
    summary = ", ".join(f"{count} {why}" for why, count in reasons.items())
    hints = []
    if "stem" in reasons:
        hints.append("pass --convert-stem (skip_stem=False) to convert the stem")
    if any("--include/--exclude" in why for why in reasons):
        hints.append("loosen --include/--exclude")
    hint = "; ".join(hints) or "C-Ghost has nothing to replace in this model"
    return f"no eligible site to convert: {summary}; {hint}."


__all__ = ["ConversionResult", "SiteRecord", "convert_model"]
