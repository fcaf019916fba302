"""Recovering accuracy after conversion: closed-form calibration on a few batches of real data."""

from __future__ import annotations

from ghostify.distill.calibrate import CalibrationReport, SiteCalibration, calibrate, refresh_bn_stats

__all__ = ["CalibrationReport", "SiteCalibration", "calibrate", "refresh_bn_stats"]
