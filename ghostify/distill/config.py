"""Options of the recovery run (calibration, block-wise and end-to-end distillation), validated up front."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from ghostify.errors import ConfigError

OPTIMIZERS = ("sgd", "adamw")
AMP = ("auto", "bf16", "fp16", "off")
BLOCKWISE_INPUTS = ("student", "teacher")

# Options that change what a run computes: a checkpoint written under other values cannot be resumed.
RESUME_KEYS = (
    "teacher_epochs",
    "teacher_steps",
    "epochs",
    "steps",
    "blockwise_epochs",
    "blockwise_steps",
    "calib_batches",
    "batch_size",
    "optimizer",
    "lr",
    "blockwise_lr",
    "blockwise_inputs",
    "weight_decay",
    "warmup_fraction",
    "temperature",
    "kd_weight",
    "ce_weight",
    "feature_weight",
    "clip_grad",
    "amp",
    "seed",
    "limit_train",
)


@dataclass
class DistillConfig:
    """How to win back the accuracy a conversion lost.

    Phases, in order, each skipped when its budget is 0: teacher adaptation (a copy of the teacher
    fine-tuned on the labelled training data with cross-entropy: a student imitating a teacher cannot
    beat the teacher's accuracy on data the teacher was not trained for), calibration (closed-form refit on
    `calib_batches` batches), block-wise distillation (every converted site learns to reproduce the
    teacher's output for it from the teacher's input, MSE), end-to-end distillation (KL on softened logits
    + cross-entropy when labels exist + optional feature MSE at the converted sites).

    Attributes:
        teacher_epochs: epochs fine-tuning the teacher's copy before the student learns from it (same
            optimizer, lr and schedule as end-to-end); 0 (default) keeps the teacher as given.
        teacher_steps: teacher-adaptation steps; overrides `teacher_epochs` when given.
        epochs: end-to-end epochs (fractions allowed); 0 skips the phase.
        steps: end-to-end optimizer steps; overrides `epochs` when given.
        blockwise_epochs: block-wise epochs; 0 skips the phase.
        blockwise_steps: block-wise steps; overrides `blockwise_epochs` when given.
        calib_batches: batches for the closed-form calibration; 0 skips it.
        batch_size: images per step (per process under torchrun).
        optimizer: "sgd" (momentum 0.9, nesterov) or "adamw", for the end-to-end phase.
        lr: end-to-end peak learning rate [default: 0.05 for sgd, 1e-3 for adamw, scaled by batch / 128].
        blockwise_lr: block-wise peak learning rate (AdamW).
        blockwise_inputs: what each converted block is fed during block-wise training: "student" (its
            input in the student, as calibration does, so each block keeps compensating the errors of
            the blocks before it) or "teacher" (the teacher's input there: blocks independent).
        weight_decay: [default: 5e-4 for sgd, 0.05 for adamw].
        warmup_fraction: fraction of each phase's steps spent warming the learning rate up linearly
            (then cosine to zero).
        temperature: softening temperature T of the KL term (scaled by T^2).
        kd_weight: weight of the KL term.
        ce_weight: weight of the cross-entropy on labels (ignored for unlabelled data).
        feature_weight: weight of the relative feature MSE at the converted sites' outputs (0 = off).
        clip_grad: clip the gradient norm to this (None = no clipping).
        checkpoint_every: write a checkpoint every this many steps (and at the end of every phase).
        workers: data-loading worker processes.
        seed: data order, subsets and initialisation; a resumed run continues the same order.
        amp: mixed precision on CUDA: "auto" (bf16 when supported, else fp16), "bf16", "fp16", "off".
            CPU runs in float32.
        channels_last: use channels_last memory format [default: on CUDA only].
        limit_train: train on a fixed random subset of this many images (quick runs).
        limit_val: evaluate on a fixed random subset of this many images.
        eval_batches: cap on evaluation batches (None = the whole split).
        log_every: the history keeps one record (averaged) per this many steps.
    """

    teacher_epochs: float = 0.0
    teacher_steps: int | None = None
    epochs: float = 1.0
    steps: int | None = None
    blockwise_epochs: float = 1.0
    blockwise_steps: int | None = None
    calib_batches: int = 8
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float | None = None
    blockwise_lr: float = 1e-3
    blockwise_inputs: str = "student"
    weight_decay: float | None = None
    warmup_fraction: float = 0.05
    temperature: float = 4.0
    kd_weight: float = 1.0
    ce_weight: float = 1.0
    feature_weight: float = 0.0
    clip_grad: float | None = 5.0
    checkpoint_every: int = 200
    workers: int = 2
    seed: int = 0
    amp: str = "auto"
    channels_last: bool | None = None
    limit_train: int | None = None
    limit_val: int | None = None
    eval_batches: int | None = None
    log_every: int = 10

    def __post_init__(self) -> None:
        self.optimizer = str(self.optimizer).lower()
        self.amp = str(self.amp).lower()
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {', '.join(OPTIMIZERS)} (got {self.optimizer!r}).")
        if self.blockwise_inputs not in BLOCKWISE_INPUTS:
            raise ConfigError(
                f"unknown --blockwise-inputs {self.blockwise_inputs!r}; choose student or teacher."
            )
        if self.amp not in AMP:
            raise ConfigError(f"amp must be one of {', '.join(AMP)} (got {self.amp!r}).")
        for name in ("teacher_epochs", "epochs", "blockwise_epochs"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0 (got {value}).")
        for name in ("teacher_steps", "steps", "blockwise_steps", "limit_train", "limit_val", "eval_batches"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0 (got {value}).")
        for name in ("batch_size", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(self, name)}).")
        if self.calib_batches < 0 or self.workers < 0:
            raise ConfigError("--calib-batches and --workers must be >= 0.")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"--lr must be > 0 (got {self.lr}).")
        if not self.blockwise_lr > 0 or not self.temperature > 0:
            raise ConfigError("--blockwise-lr and --temperature must be > 0.")
        if not 0 <= self.warmup_fraction < 1:
            raise ConfigError(
                f"warmup_fraction is a fraction of the steps in [0, 1) (got {self.warmup_fraction})."
            )
        if min(self.kd_weight, self.ce_weight, self.feature_weight) < 0:
            raise ConfigError("loss weights (--kd-weight, --ce-weight, --feature-weight) must be >= 0.")
        if self.kd_weight == self.ce_weight == self.feature_weight == 0:
            raise ConfigError("all loss weights are 0: nothing to train on; set --kd-weight 1.")
        if self.clip_grad is not None and not self.clip_grad > 0:
            raise ConfigError(f"--clip-grad must be > 0 (got {self.clip_grad}).")

    @property
    def adapts_teacher(self) -> bool:
        """Whether a teacher-adaptation phase runs (its steps, or else its epochs, above 0)."""
        budget = self.teacher_steps if self.teacher_steps is not None else self.teacher_epochs
        return budget > 0

    @property
    def peak_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        base = 0.05 if self.optimizer == "sgd" else 1e-3
        return base * self.batch_size / 128

    @property
    def decay(self) -> float:
        if self.weight_decay is not None:
            return self.weight_decay
        return 5e-4 if self.optimizer == "sgd" else 0.05

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DistillConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def resume_fingerprint(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in RESUME_KEYS}
