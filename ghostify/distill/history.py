"""The record of one distillation run: losses per step and accuracies per stage, as JSON and as a PNG plot.

The history goes into every checkpoint (`to_dict` / `from_dict`) so that a resumed run carries on the
same curves. Every step is logged, but to keep the JSON small only one averaged record is stored per
`every` steps; a phase's last steps are always stored.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ghostify.atomic import atomic_write, atomic_write_text

__all__ = ["EvalRecord", "History", "StepRecord"]


@dataclass
class StepRecord:
    """Training figures averaged over `steps` consecutive optimizer steps of one phase.

    Attributes:
        phase: e.g. "blockwise" or "end-to-end".
        step: global step of the last step averaged.
        epoch: epoch position (fractional) at that step.
        loss: mean total loss.
        lr: learning rate at that step.
        images_per_s: mean throughput.
        parts: mean of each loss component (kd, ce, feature, mse...), over the steps that logged it.
        steps: how many steps were averaged.
    """

    phase: str
    step: int
    epoch: float
    loss: float
    lr: float
    images_per_s: float
    parts: dict[str, float] = field(default_factory=dict)
    steps: int = 1


@dataclass
class EvalRecord:
    """Accuracy of one model at one point of the run.

    Attributes:
        phase: the stage evaluated, e.g. "converted", "calibrated", "blockwise", "end-to-end", "final".
        step: global step at which it was measured.
        model: "teacher" or "student".
        top1: top-1 accuracy in percent.
        top5: top-5 accuracy in percent.
        images: how many labelled images were scored.
    """

    phase: str
    step: int
    model: str
    top1: float
    top5: float
    images: int


@dataclass
class _Window:
    """Running sums of the steps not yet stored (they become one StepRecord)."""

    phase: str
    step: int = 0
    epoch: float = 0.0
    lr: float = 0.0
    steps: int = 0
    loss: float = 0.0
    images_per_s: float = 0.0
    parts: dict[str, float] = field(default_factory=dict)
    part_steps: dict[str, int] = field(default_factory=dict)

    def add(self, step: int, epoch: float, loss: float, lr: float, images_per_s: float, parts: dict) -> None:
        self.step, self.epoch, self.lr = step, epoch, lr
        self.steps += 1
        self.loss += loss
        self.images_per_s += images_per_s
        for name, value in parts.items():
            self.parts[name] = self.parts.get(name, 0.0) + float(value)
            self.part_steps[name] = self.part_steps.get(name, 0) + 1

    def record(self) -> StepRecord:
        return StepRecord(
            phase=self.phase,
            step=self.step,
            epoch=self.epoch,
            loss=self.loss / self.steps,
            lr=self.lr,
            images_per_s=self.images_per_s / self.steps,
            parts={name: total / self.part_steps[name] for name, total in self.parts.items()},
            steps=self.steps,
        )


class History:
    """Losses and accuracies of a distillation run; JSON-able, resumable, and plottable.

    `step` is the global optimizer step (counting on across phases), so that all phases share one x axis.

    Args:
        every: store one record per this many steps of a phase, averaged over them.
    """

    def __init__(self, every: int = 10) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1 (got {every}).")
        self.every = every
        self.steps: list[StepRecord] = []
        self.evals: list[EvalRecord] = []
        self._window: _Window | None = None

    def log_step(
        self,
        phase: str,
        step: int,
        epoch: float,
        loss: float,
        lr: float,
        images_per_s: float,
        **parts: float,
    ) -> None:
        """Log one optimizer step; `parts` are the loss components (kd=..., ce=..., feature=..., mse=...).

        Raises ValueError when `step` does not come after the phase's last logged step: that is a resumed
        run logging the same steps twice.
        """
        last = self.last_step(phase)
        if last is not None and step <= last:
            raise ValueError(f"phase {phase!r}: step {step} logged after step {last}.")
        if self._window is not None and self._window.phase != phase:
            self._flush()  # the previous phase is over: store its last steps
        if self._window is None:
            self._window = _Window(phase)
        self._window.add(int(step), float(epoch), float(loss), float(lr), float(images_per_s), parts)
        if self._window.steps >= self.every:
            self._flush()

    def log_eval(self, phase: str, step: int, model: str, top1: float, top5: float, images: int) -> None:
        """Log an accuracy measurement of `model` ("teacher" / "student") at stage `phase`."""
        self.evals.append(EvalRecord(phase, int(step), model, float(top1), float(top5), int(images)))

    def _flush(self) -> None:
        if self._window is not None and self._window.steps:
            self.steps.append(self._window.record())
        self._window = None

    def records(self) -> list[StepRecord]:
        """Stored step records plus the steps not yet stored, averaged (without storing them)."""
        pending = [self._window.record()] if self._window is not None and self._window.steps else []
        return [*self.steps, *pending]

    def last_step(self, phase: str) -> int | None:
        """Global step of the last step logged in `phase`, or None when it has none (where to resume)."""
        if self._window is not None and self._window.phase == phase:
            return self._window.step
        return max((r.step for r in self.steps if r.phase == phase), default=None)

    def summary(self) -> dict[str, dict[str, dict[str, Any]]]:
        """The latest eval per phase and model: {phase: {model: {"step", "top1", "top5", "images"}}}."""
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for rec in self.evals:
            latest = out.setdefault(rec.phase, {}).get(rec.model)
            if latest is None or rec.step >= latest["step"]:
                out[rec.phase][rec.model] = {
                    "step": rec.step,
                    "top1": rec.top1,
                    "top5": rec.top5,
                    "images": rec.images,
                }
        return out

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict. "steps" ends with the not yet stored steps averaged (for readers); "pending"
        keeps their sums so that `from_dict` carries on exactly where this run stopped."""
        pending = self._window if self._window is not None and self._window.steps else None
        return {
            "every": self.every,
            "steps": [asdict(r) for r in self.records()],
            "evals": [asdict(r) for r in self.evals],
            "pending": asdict(pending) if pending is not None else None,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> History:
        """Rebuild a history from `to_dict()` (e.g. from a checkpoint) to resume the run."""
        history = cls(every=int(data.get("every", 10)))
        steps = [StepRecord(**r) for r in data.get("steps", [])]
        pending = data.get("pending")
        if pending is not None:
            steps = steps[:-1]  # that record is the pending window, averaged: restore the sums instead
            history._window = _Window(**pending)
        history.steps = steps
        history.evals = [EvalRecord(**r) for r in data.get("evals", [])]
        return history

    def save_json(self, path: str | Path) -> None:
        """Write `to_dict()` as JSON, atomically (a reader never sees a half-written file)."""
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1) + "\n")

    def plot(self, path: str | Path) -> None:
        """Write a PNG: loss vs step per phase (left), student top-1 vs step (right); atomically.

        Uses a bare Figure with the Agg canvas, so no display is needed and pyplot's global state is
        never touched.
        """
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(12, 4.5), layout="constrained")
        FigureCanvasAgg(fig)
        loss_ax, acc_ax = fig.subplots(1, 2)
        self._plot_loss(loss_ax)
        self._plot_accuracy(acc_ax)

        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))

    def _plot_loss(self, ax: Any) -> None:
        records = self.records()
        ax.set_title("training loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        if not records:
            ax.text(0.5, 0.5, "no training steps yet", ha="center", va="center", transform=ax.transAxes)
            return
        for phase in dict.fromkeys(r.phase for r in records):
            mine = [r for r in records if r.phase == phase]
            ax.plot([r.step for r in mine], [r.loss for r in mine], label=phase)
        finite = [r.loss for r in records if math.isfinite(r.loss)]
        if finite and min(finite) > 0:
            ax.set_yscale("log")  # losses fall over orders of magnitude; log needs them all positive
        ax.grid(True, alpha=0.3)
        ax.legend()

    def _plot_accuracy(self, ax: Any) -> None:
        ax.set_title("student top-1")
        ax.set_xlabel("step")
        ax.set_ylabel("top-1 (%)")
        if not self.evals:
            ax.text(0.5, 0.5, "no labelled val split", ha="center", va="center", transform=ax.transAxes)
            return
        student = sorted((r for r in self.evals if r.model == "student"), key=lambda r: r.step)
        if student:
            ax.plot([r.step for r in student], [r.top1 for r in student], color="0.7", zorder=1)
            for phase in dict.fromkeys(r.phase for r in student):
                mine = [r for r in student if r.phase == phase]
                ax.scatter([r.step for r in mine], [r.top1 for r in mine], label=phase, zorder=2)
        teacher = [r for r in self.evals if r.model == "teacher"]
        if teacher:
            top1 = sorted(teacher, key=lambda r: r.step)[-1].top1  # the latest
            ax.axhline(top1, linestyle="--", color="k", label=f"teacher {top1:.2f}%")
        ax.grid(True, alpha=0.3)
        ax.legend()
