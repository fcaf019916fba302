"""Graph rewriting: find sites on torch.fx graphs, swap in the paper's modules, inherit weights."""

from __future__ import annotations

import copy
import dataclasses
from typing import TYPE_CHECKING

import torch
from torch import nn

from ghostify.config import ConvertConfig
from ghostify.errors import ConversionError
from ghostify.rewrite.c_ghost import apply_c_ghost
from ghostify.rewrite.result import ConversionResult, SiteRecord

if TYPE_CHECKING:
    from ghostify.select import MeasureOptions

UNCHANGED_NOTE = "no replacement was faster on {target}; the model is unchanged"
LEFT_BY_SELECTION = "left original by the latency selection"


def convert_model(
    model: nn.Module,
    config: ConvertConfig,
    example_inputs: torch.Tensor | None = None,
    *,
    measure: MeasureOptions | None = None,
) -> ConversionResult:
    """Convert a deep copy of `model` as `config` says; the input model is never touched.

    G-Ghost needs `example_inputs` (a batch the model accepts) to see the shapes of its stages; so does
    `select="latency"` (each site is timed at its real input shape, see `ghostify.select`), which returns
    `result.decisions` and a `result.config` whose `decided` replays the same architecture unmeasured.
    `measure` sets the timing of that selection (repeats, warm-up, threads, cache).
    """
    if not isinstance(model, nn.Module):
        raise ConversionError(f"expected an nn.Module to convert, got {type(model).__name__}.")
    if config.select == "latency" and config.decided is None:
        from ghostify.select import select_by_latency

        return select_by_latency(model, config, example_inputs, measure)
    return convert_sites(model, config, example_inputs)


def convert_sites(
    model: nn.Module, config: ConvertConfig, example_inputs: torch.Tensor | None = None
) -> ConversionResult:
    """One conversion pass without measuring: every eligible site, or exactly those `config.decided` names.

    With `decided`, G-Ghost sees only the stages decided "g-ghost" and C-Ghost only the convs decided
    "c-ghost" (mode "auto" and "both" run both, G-Ghost first, as "both" always does); when none is
    left the result is an unchanged copy with a note, not an error, since a selection may keep nothing.
    """
    converted = copy.deepcopy(model)
    result = ConversionResult(model=converted, config=config)
    decided = config.decided
    g_stages = config.mode in ("g-ghost", "both", "auto")
    c_convs = config.mode in ("c-ghost", "both", "auto")
    if decided is not None:
        g_stages = g_stages and "g-ghost" in decided.values()
    if g_stages:
        from ghostify.rewrite.g_ghost import apply_g_ghost

        if example_inputs is None:
            raise ConversionError(
                "G-Ghost needs example inputs to find the model's stages; pass example_inputs."
            )
        apply_g_ghost(converted, _only(config, "g-ghost"), example_inputs, result)
    if c_convs:
        apply_c_ghost(converted, _only(config, "c-ghost"), result)
        _note_nested_sites(result)
    if decided is not None:
        result.skipped = [(name, _left_why(config, name, why)) for name, why in result.skipped]
        if not result.sites:
            result.notes.append(UNCHANGED_NOTE.format(target=config.target or "the target"))
    elif not result.sites:
        raise ConversionError(_nothing_converted(result))
    return result


def _only(config: ConvertConfig, kind: str) -> ConvertConfig:
    """`config` with `decided` cut to the sites of one kind, so each rewriter selects only its own."""
    if config.decided is None:
        return config
    return dataclasses.replace(config, decided={n: c for n, c in config.decided.items() if c == kind})


def _left_why(config: ConvertConfig, name: str, why: str) -> str:
    """The reason a site was left alone, saying so when the latency selection (not the user) left it."""
    if not why.startswith("excluded by --include") or not config.selects(name, use_decided=False):
        return why
    if config.decided is not None and config.decided.get(name) == "c-ghost":
        return "C-Ghost chosen for its convs by the latency selection"
    return LEFT_BY_SELECTION


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


__all__ = ["ConversionResult", "SiteRecord", "convert_model", "convert_sites"]
