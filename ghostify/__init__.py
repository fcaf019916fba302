"""ghostify: make existing CNNs cheaper with GhostNet's C-Ghost and G-Ghost ideas.

import ghostify
student = ghostify.convert(model, mode="c-ghost", ratio=2)
"""

from __future__ import annotations

__version__ = "0.1.0"

import torch
from torch import nn

from ghostify.config import ConvertConfig
from ghostify.deploy import deploy_form
from ghostify.errors import (
    ConfigError,
    ConversionError,
    DataError,
    FormatError,
    GhostifyError,
    ModelLoadError,
    TrainingError,
)
from ghostify.export import export, verify_export
from ghostify.io import load, save
from ghostify.rewrite import ConversionResult, convert_model


def convert(
    model: nn.Module,
    mode: str = "c-ghost",
    ratio: int = 2,
    *,
    dw_size: int = 3,
    include: str | None = None,
    exclude: str | None = None,
    example_inputs: torch.Tensor | None = None,
    config: ConvertConfig | None = None,
    **options,
) -> nn.Module:
    """Return a converted copy of `model`; `model` itself is left untouched (it is the teacher).

    Args:
        model: any nn.Module (torchvision, timm, your own).
        mode: "c-ghost", "g-ghost" or "both".
        ratio: the paper's s (integer >= 2).
        dw_size: kernel of the C-Ghost cheap depthwise op.
        include / exclude: regexes on module names.
        example_inputs: a batch the model accepts; needed for G-Ghost to find stages and fit its cheap
            path (defaults to one random 3x224x224 image).
        config: a full ConvertConfig instead of the keyword options.
    """
    if config is None:
        config = ConvertConfig(
            mode=mode, ratio=ratio, dw_size=dw_size, include=include, exclude=exclude, **options
        )
    if example_inputs is None and config.mode != "c-ghost":
        example_inputs = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    return convert_model(model, config, example_inputs=example_inputs).model


# `ghostify.distill` is the subpackage and, being callable, also `ghostify.distill(student, teacher, ...)`.
from ghostify import distill  # noqa: E402
from ghostify.distill import DistillConfig, DistillData, DistillResult  # noqa: E402

__all__ = [
    "ConfigError",
    "ConversionError",
    "ConversionResult",
    "ConvertConfig",
    "DataError",
    "DistillConfig",
    "DistillData",
    "DistillResult",
    "FormatError",
    "GhostifyError",
    "ModelLoadError",
    "TrainingError",
    "__version__",
    "convert",
    "convert_model",
    "deploy_form",
    "distill",
    "export",
    "load",
    "save",
    "verify_export",
]
