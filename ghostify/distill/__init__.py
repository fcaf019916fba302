"""Recovering accuracy after conversion: calibration, block-wise and end-to-end distillation."""

from __future__ import annotations

import sys
import types

from ghostify.distill.calibrate import CalibrationReport, SiteCalibration, calibrate, refresh_bn_stats
from ghostify.distill.config import DistillConfig
from ghostify.distill.trainer import DistillData, DistillResult, distill

__all__ = [
    "CalibrationReport",
    "DistillConfig",
    "DistillData",
    "DistillResult",
    "SiteCalibration",
    "calibrate",
    "distill",
    "refresh_bn_stats",
]


class _CallableModule(types.ModuleType):
    """Lets `ghostify.distill(student, teacher, data, config)` call the trainer while
    `ghostify.distill.calibrate` & co. stay ordinary submodules."""

    def __call__(self, *args, **kwargs) -> DistillResult:  # noqa: ANN002, ANN003
        return distill(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
