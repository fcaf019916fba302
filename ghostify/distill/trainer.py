"""Win back a converted model's accuracy: calibrate, distil block by block, then distil end to end.

`distill(student, teacher, data, config)` runs the phases of `DistillConfig` in order, with the original
model as a frozen teacher:

0. teacher (off by default): a copy of the teacher is fine-tuned on the labelled data with cross-entropy
   first, for data the teacher was not trained on (a student that imitates a teacher ends near the
   teacher's accuracy); the user's teacher is never changed;
1. calibrate: the closed-form refit of `ghostify.distill.calibrate` on a few batches (no gradients);
2. block-wise: every converted site (C-Ghost module, G-Ghost stage) learns to reproduce the teacher's
   output for it, all sites in parallel from one teacher forward pass (relative MSE, AdamW, warm-up +
   cosine); each site is fed its input in the student (default: it keeps compensating the errors of
   the sites before it, as calibration fitted it to) or the teacher's input there (`blockwise_inputs`);
3. end-to-end: the student in train mode learns from the teacher's softened logits (KL), the labels
   (cross-entropy, when there are labels) and optionally the teacher's features at the converted sites.

With an output folder, rank 0 writes a checkpoint every `checkpoint_every` steps and at the end of every
phase (see `ghostify.distill.checkpoint`), plus history.json / history.png; `resume=True` continues an
interrupted run at the step it stopped, with the same data order. Under torchrun every process runs this
same function; DDP keeps the student replicas equal and rank 0 evaluates, logs and writes.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from ghostify.data import SeededItems, is_unlabelled
from ghostify.distill.blocks import Block, TeacherTaps, find_blocks, relative_mse, student_inputs
from ghostify.distill.calibrate import CalibrationReport, calibrate, refresh_bn_stats
from ghostify.distill.checkpoint import STATE_FILE, fingerprint, read_checkpoint, write_checkpoint
from ghostify.distill.config import DistillConfig
from ghostify.distill.distributed import World, init_world
from ghostify.distill.history import History
from ghostify.distill.losses import distill_loss
from ghostify.errors import ConfigError, DataError, TrainingError
from ghostify.evaluate import EvalResult, evaluate
from ghostify.rewrite.result import ConversionResult

__all__ = ["DistillData", "DistillResult", "distill"]

PHASES = ("teacher", "calibrate", "blockwise", "end-to-end")
TRAINED_PHASES = ("teacher", "blockwise", "end-to-end")  # in order: one step axis across them
HISTORY_JSON = "history.json"
HISTORY_PNG = "history.png"


@dataclass
class DistillData:
    """A training loader (labels may be -1: unlabelled) and an optional labelled validation loader."""

    train: DataLoader
    val: DataLoader | None = None


@dataclass
class DistillResult:
    """What a recovery run did and reached.

    Attributes:
        model: the student (unwrapped, eval mode).
        accuracy: evaluations by stage: "teacher", "converted", "calibrated", "blockwise", "distilled".
        steps: optimizer steps done per phase.
        history: the run's loss / accuracy history.
        calibration: the calibration's account, when it ran in this call.
        seconds: wall time of this call.
        notes: things the user should know (phases skipped and why).
    """

    model: nn.Module
    accuracy: dict[str, EvalResult] = field(default_factory=dict)
    steps: dict[str, int] = field(default_factory=dict)
    history: History = field(default_factory=History)
    calibration: CalibrationReport | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


class _BlockBank(nn.Module):
    """The converted sites as one module, so DDP can keep them in sync during block-wise training."""

    def __init__(self, blocks: list[Block]) -> None:
        super().__init__()
        self.sites = nn.ModuleList(b.student for b in blocks)

    def forward(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [site(x) for site, x in zip(self.sites, inputs, strict=True)]


def _warmup_cosine(total: int, warmup: float) -> Callable[[int], float]:
    warm = int(total * warmup)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        progress = (step - warm) / max(1, total - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _optimizer(params: list[nn.Parameter], name: str, lr: float, decay: float) -> torch.optim.Optimizer:
    """No weight decay on biases and norm weights (1-d tensors), the usual fine-tuning practice."""
    groups = [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": decay},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
    ]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)
    return torch.optim.AdamW(groups, lr=lr)


class _Run:
    """State shared by the phases of one `distill` call."""

    def __init__(self, student, teacher, data, config, result, out_dir, world, progress) -> None:  # noqa: ANN001
        self.student: nn.Module = student
        self.teacher: nn.Module = teacher
        self.data: DistillData = data
        self.config: DistillConfig = config
        self.result: ConversionResult | None = result
        self.out_dir: Path | None = out_dir
        self.world: World = world
        self.progress = progress and world.is_main
        self.history = History(every=config.log_every)
        self.accuracy: dict[str, EvalResult] = {}
        self.steps: dict[str, int] = {}
        self.done: list[str] = []
        self.fingerprint: dict[str, Any] = {}
        self.blocks = find_blocks(student, teacher, result) if result is not None else []
        self.device = world.device
        self.autocast, self.scaler = self._precision()
        self.channels_last = bool(
            config.channels_last or (config.channels_last is None and self.device.type == "cuda")
        )
        if self.channels_last:
            student.to(memory_format=torch.channels_last)
            teacher.to(memory_format=torch.channels_last)
        n = len(data.train.dataset)  # type: ignore[arg-type]
        per_rank = math.ceil(n / world.world_size)
        self.steps_per_epoch = max(1, math.ceil(per_rank / config.batch_size))

    # ------------------------------------------------------------------------------------ set-up

    def _precision(self):  # noqa: ANN202
        amp = self.config.amp
        if self.device.type != "cuda" or amp == "off":
            return contextlib.nullcontext, None
        dtype = torch.float16 if amp == "fp16" else torch.bfloat16
        if amp == "auto" and not torch.cuda.is_bf16_supported():
            dtype = torch.float16
        scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
        return (lambda: torch.autocast("cuda", dtype=dtype)), scaler

    def total_steps(self, phase: str) -> int:
        c = self.config
        if phase == "teacher":
            steps, epochs = c.teacher_steps, c.teacher_epochs
        elif phase == "blockwise":
            if not self.blocks:
                return 0
            steps, epochs = c.blockwise_steps, c.blockwise_epochs
        else:
            steps, epochs = c.steps, c.epochs
        return steps if steps is not None else math.ceil(epochs * self.steps_per_epoch)

    def global_step(self, phase: str, step: int) -> int:
        """Steps counted across phases (teacher, block-wise, end-to-end), for one x axis in the history."""
        if phase not in TRAINED_PHASES:
            return step
        earlier = TRAINED_PHASES[: TRAINED_PHASES.index(phase)]
        return step + sum(self.steps.get(p, 0) for p in earlier)

    def batches(self, phase: str, start: int, total: int) -> Iterator[tuple[int, Any]]:
        """(step, batch) from `start` to `total`, epoch after epoch, in an order fixed by seed and epoch.

        Each epoch's order comes from torch's DistributedSampler (this rank's share; the whole data in a
        world of one), so a resumed run skips exactly the batches it already trained on and augments
        the rest as the uninterrupted run would have (`SeededItems`). A batch whose
        every image was unreadable comes as None and still counts as a step, so positions stay aligned.
        """
        base = self.data.train
        sampler = DistributedSampler(
            base.dataset,  # type: ignore[arg-type]
            num_replicas=self.world.world_size,
            rank=self.world.rank,
            shuffle=True,
            seed=self.config.seed + {"blockwise": 1000, "teacher": 2000}.get(phase, 0),
        )
        step = start
        while step < total:
            epoch, offset = divmod(step, self.steps_per_epoch)
            sampler.set_epoch(epoch)
            indices = list(sampler)[offset * self.config.batch_size :]
            loader = type(base)(
                SeededItems(base.dataset, sampler.seed, epoch),  # augmentation fixed per (epoch, image)
                batch_size=self.config.batch_size,
                sampler=indices,
                num_workers=base.num_workers,
                collate_fn=base.collate_fn,
                pin_memory=base.pin_memory,
            )
            loader.keep_gaps = True  # ghostify's loaders: None for an all-unreadable batch, not a shift
            for batch in loader:
                yield step, batch
                step += 1
                if step >= total:
                    return

    def to_device(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        x, y = (batch[0], batch[1]) if isinstance(batch, (list, tuple)) else (batch, None)
        x = x.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, (y.to(self.device, non_blocking=True) if y is not None else None)

    # ------------------------------------------------------------------------------------ bookkeeping

    def evaluate(self, stage: str, model: nn.Module, phase: str, step: int) -> None:
        """Rank 0 scores `model` on the validation split (if any); the others wait."""
        if self.data.val is not None and self.world.is_main:
            acc = evaluate(
                model,
                self.data.val,
                self.device,
                progress=self.progress,
                max_batches=self.config.eval_batches,
            )
            self.accuracy[stage] = acc
            who = "teacher" if stage.startswith("teacher") else "student"
            self.history.log_eval(stage, self.global_step(phase, step), who, acc.top1, acc.top5, acc.images)
            if self.progress:
                from rich.console import Console

                Console(stderr=True).print(
                    f"{stage}: top-1 {acc.top1:.2f}%  top-5 {acc.top5:.2f}%  ({acc.images} images)",
                    highlight=False,
                )
        self.world.barrier()

    def checkpoint(self, phase: str, step: int, optimizer=None, scheduler=None) -> None:  # noqa: ANN001
        if self.out_dir is None or not self.world.is_main:
            return
        state = {
            "fingerprint": self.fingerprint,
            "phase": phase,
            "step": step,
            "done": list(self.done),
            "steps": dict(self.steps),
            "model": self.student.state_dict(),
            "teacher": self.teacher.state_dict() if self.config.adapts_teacher else None,
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "history": self.history.to_dict(),
            "accuracy": {k: v.to_dict() for k, v in self.accuracy.items()},
        }
        write_checkpoint(self.out_dir, self.student, state)
        self.history.save_json(self.out_dir / HISTORY_JSON)
        self.history.plot(self.out_dir / HISTORY_PNG)

    def restore(self, state: dict[str, Any]) -> None:
        self.student.load_state_dict(state["model"])
        if state.get("teacher") is not None:  # the adapted teacher, as far as it got
            self.teacher.load_state_dict(state["teacher"])
        self.done = list(state["done"])
        self.steps = dict(state.get("steps", {}))
        self.history = History.from_dict(state["history"])
        self.accuracy = {k: EvalResult(**v) for k, v in state.get("accuracy", {}).items()}

    # ------------------------------------------------------------------------------------ phases

    def calibrate(self) -> CalibrationReport | None:
        if self.result is None:
            return None
        fixed_order = type(self.data.train)(  # the train loader's class: skips unreadable images
            self.data.train.dataset,
            batch_size=self.config.batch_size,
            sampler=torch.randperm(
                len(self.data.train.dataset),  # type: ignore[arg-type]
                generator=torch.Generator().manual_seed(self.config.seed),
            ).tolist(),
            num_workers=self.data.train.num_workers,
            collate_fn=self.data.train.collate_fn,
        )
        return calibrate(
            self.student, self.teacher, fixed_order, self.result, self.config.calib_batches, self.progress
        )

    def train(self, phase: str, state: dict[str, Any] | None) -> None:
        """One gradient phase (block-wise or end-to-end), from `state`'s step when resuming it."""
        c = self.config
        total = self.total_steps(phase)
        if phase == "teacher":
            module: nn.Module = self.teacher
            params = [p for p in self.teacher.parameters() if p.requires_grad]
            optimizer = _optimizer(params, c.optimizer, c.peak_lr, c.decay)
        elif phase == "blockwise":
            bank = _BlockBank(self.blocks).to(self.device)
            module = bank
            params = [p for p in bank.parameters() if p.requires_grad]
            optimizer = _optimizer(params, "adamw", c.blockwise_lr, 0.0)
        else:
            module = self.student
            params = [p for p in self.student.parameters() if p.requires_grad]
            optimizer = _optimizer(params, c.optimizer, c.peak_lr, c.decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(total, c.warmup_fraction))
        start = 0
        if state is not None and state.get("phase") == phase and state.get("optimizer") is not None:
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if self.scaler is not None and state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
            start = int(state["step"])
        if self.world.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            module = nn.parallel.DistributedDataParallel(module, device_ids=ids)
        step_fn = {"teacher": self._teacher_step, "blockwise": self._blockwise_step}.get(
            phase, self._end_to_end_step
        )
        taps = (
            TeacherTaps(self.blocks, inputs=phase == "blockwise" and c.blockwise_inputs == "teacher")
            if phase == "blockwise" or (phase == "end-to-end" and c.feature_weight > 0)
            else contextlib.nullcontext()
        )
        last_good = start
        with taps, self._bar(phase, start, total) as advance:
            if phase != "teacher":
                self.teacher.eval()
            module.train()
            tick = time.perf_counter()
            for step, batch in self.batches(phase, start, total):
                # a batch whose every image was unreadable (on any rank, so DDP ranks stay in step):
                # a step without an update
                if not self.world.all_true(batch is not None):
                    scheduler.step()
                    advance(float("nan"), optimizer.param_groups[0]["lr"], 0.0)
                    continue
                x, y = self.to_device(batch)
                optimizer.zero_grad(set_to_none=True)
                with self.autocast():
                    loss, parts = step_fn(module, taps, x, y)
                if not self.world.all_true(bool(torch.isfinite(loss))):
                    raise TrainingError(self._nan_message(phase, step, last_good))
                if self.scaler is not None:
                    self.scaler.scale(loss).backward()
                    self.scaler.unscale_(optimizer)
                else:
                    loss.backward()
                if c.clip_grad is not None:
                    torch.nn.utils.clip_grad_norm_(params, c.clip_grad)
                if self.scaler is not None:
                    self.scaler.step(optimizer)
                    self.scaler.update()
                else:
                    optimizer.step()
                lr = optimizer.param_groups[0]["lr"]
                scheduler.step()
                now = time.perf_counter()
                ips = x.shape[0] * self.world.world_size / max(now - tick, 1e-9)
                tick = now
                done = step + 1
                self.history.log_step(
                    phase,
                    self.global_step(phase, done),
                    done / self.steps_per_epoch,
                    float(loss.detach()),
                    lr,
                    ips,
                    **parts,
                )
                advance(float(loss.detach()), lr, ips)
                if done % c.checkpoint_every == 0 and done < total:
                    self.steps[phase] = done
                    self.checkpoint(phase, done, optimizer, scheduler)
                    last_good = done
        self.steps[phase] = total
        self.done.append(phase)
        if phase == "teacher":
            self.teacher.eval()

    def _teacher_step(self, teacher: nn.Module, taps, x: torch.Tensor, y) -> tuple:  # noqa: ANN001
        """Cross-entropy on the labelled images: the teacher's copy adapts to this data."""
        logits = teacher(x)
        return distill_loss(logits, logits, y, self.config.temperature, 0.0, 1.0)

    def _blockwise_step(self, bank: nn.Module, taps: TeacherTaps, x: torch.Tensor, y) -> tuple:  # noqa: ANN001
        taps.clear()
        with torch.no_grad():
            self.teacher(x)
            if self.config.blockwise_inputs == "student":
                with student_inputs(self.blocks) as seen:
                    self.student(x)
                inputs = [seen[b.name] for b in self.blocks]
            else:
                inputs = [taps.inputs[b.name] for b in self.blocks]
        outputs = bank(inputs)
        losses = [
            relative_mse(out, taps.outputs[b.name]) for out, b in zip(outputs, self.blocks, strict=True)
        ]
        loss = torch.stack([term.float() for term in losses]).mean()
        return loss, {"mse": float(loss.detach())}

    def _end_to_end_step(self, student: nn.Module, taps, x: torch.Tensor, y) -> tuple:  # noqa: ANN001
        c = self.config
        features: dict[str, torch.Tensor] = {}
        hooks = []
        if c.feature_weight > 0:
            taps.clear()
            for b in self.blocks:
                hooks.append(b.student.register_forward_hook(self._keep(features, b.name)))
        try:
            with torch.no_grad():
                teacher_logits = self.teacher(x)
            student_logits = student(x)
        finally:
            for h in hooks:
                h.remove()
        terms = [relative_mse(features[n], taps.outputs[n]) for n in features if n in taps.outputs]
        return distill_loss(
            student_logits,
            teacher_logits,
            y,
            c.temperature,
            c.kd_weight,
            c.ce_weight,
            terms,
            c.feature_weight,
        )

    @staticmethod
    def _keep(store: dict[str, torch.Tensor], name: str):  # noqa: ANN205
        def hook(module, args, output):
            store[name] = output

        return hook

    def _nan_message(self, phase: str, step: int, last_good: int) -> str:
        where = (
            f"the last good checkpoint (step {last_good} of {phase}) is in {self.out_dir}; "
            "resume it with --resume and "
            if self.out_dir is not None and last_good > 0
            else "try again with "
        )
        return (
            f"the loss became NaN/inf at {phase} step {step + 1}; stopped. {where}a lower --lr "
            f"(now {self.config.peak_lr:g}) or --clip-grad."
        )

    @contextlib.contextmanager
    def _bar(self, phase: str, start: int, total: int) -> Iterator[Callable[[float, float, float], None]]:
        if not self.progress:
            yield lambda loss, lr, ips: None
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        bar = Progress(
            TextColumn(f"{phase:<10}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(
                "loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[ips]:.0f} img/s"
            ),
            TimeRemainingColumn(),
        )
        task = bar.add_task(phase, total=total, completed=start, loss=float("nan"), lr=0.0, ips=0.0)
        with bar:
            yield lambda loss, lr, ips: bar.update(task, advance=1, loss=loss, lr=lr, ips=ips)


def _unwrap(student: nn.Module | ConversionResult) -> tuple[nn.Module, ConversionResult | None]:
    if isinstance(student, ConversionResult):
        return student.model, student
    return student, None


def check_data(data: DistillData, config: DistillConfig, world: World) -> None:
    """Refuse data this run cannot use (batch larger than a process's share, labels the run needs)."""
    n = len(data.train.dataset)  # type: ignore[arg-type]
    per_rank = math.ceil(n / world.world_size)
    if config.batch_size > per_rank:
        raise DataError(
            f"batch size {config.batch_size} is larger than the {per_rank} training images per process; "
            f"use --batch-size {per_rank} or fewer."
        )
    if config.adapts_teacher and is_unlabelled(data.train):
        raise ConfigError(
            "--teacher-epochs adapts the teacher with the training labels, and this training data has "
            "none (no class subfolders); use --teacher-epochs 0 or labelled data."
        )


def distill(
    student: nn.Module | ConversionResult,
    teacher: nn.Module,
    data: DistillData,
    config: DistillConfig | None = None,
    *,
    out_dir: str | Path | None = None,
    resume: bool = False,
    run_options: dict[str, Any] | None = None,
    world: World | None = None,
    progress: bool = True,
) -> DistillResult:
    """Recover `student`'s accuracy from `teacher` on `data` (in place); see the module docstring.

    Args:
        student: the converted model, or better its `ConversionResult` (needed for calibration and
            block-wise distillation, which must know the converted sites; with a bare module those
            phases are skipped).
        teacher: the original model; frozen, evaluated in eval mode (with `config.teacher_epochs` a copy
            of it is adapted first; the model passed in is left as it is).
        data: training loader (labels or -1) and optional labelled validation loader.
        config: phases, budgets and optimiser settings.
        out_dir: a ghostify output folder to keep checkpoints, history.json and history.png in (rank 0
            writes); None keeps nothing on disk.
        resume: continue from `out_dir`'s checkpoint (an error if it is from another model or options).
        run_options: extra facts a checkpoint must match to be resumed (e.g. the conversion recipe).
        world: the torchrun process group (default: read from the environment).
        progress: rich progress bars and accuracy lines on rank 0.

    Raises:
        DataError: the data cannot train this model (batch larger than the data...).
        TrainingError: the loss became NaN/inf (the last good checkpoint is kept).
        FormatError: `resume` with a checkpoint of another run.
    """
    config = config or DistillConfig()
    start = time.perf_counter()
    world = world or init_world()
    model, result = _unwrap(student)
    model.to(world.device)
    teacher.to(world.device).eval()  # only ever run under no_grad: its own flags stay as they are
    check_data(data, config, world)
    if config.adapts_teacher:  # before _Run: its blocks must pair the student's sites with the copy's
        teacher = copy.deepcopy(teacher).requires_grad_(True)  # the user's teacher stays as given
    out = Path(out_dir) if out_dir is not None else None
    if out is not None and world.is_main:
        out.mkdir(parents=True, exist_ok=True)
    run = _Run(model, teacher, data, config, result, out, world, progress)
    options = {**config.resume_fingerprint(), **(run_options or {})}
    run.fingerprint = fingerprint(model, options, world.world_size)
    notes: list[str] = []
    state = None
    if resume and out is None:
        raise ConfigError("resume=True needs out_dir: the folder holding the run's checkpoint.")
    if resume and (out / STATE_FILE).is_file():
        state = read_checkpoint(out, run.fingerprint)
        run.restore(state)
        state.pop("model")  # restored; the optimizer state is still needed by the resumed phase
    elif resume:
        notes.append(f"no checkpoint in {out} yet: started from its saved model")
    if result is None:
        notes.append(
            "a bare module was given (no ConversionResult): calibration, block-wise and feature loss skipped"
        )
    if data.val is None:
        notes.append("no validation split: no accuracy reported")

    calibration = None
    if "teacher" not in run.accuracy:
        run.evaluate("teacher", teacher, "converted", 0)
        run.evaluate("converted", model, "converted", 0)
    if "teacher" not in run.done:
        if config.adapts_teacher:
            run.train("teacher", state)
            run.evaluate("teacher-adapted", teacher, "teacher", run.steps["teacher"])
            run.checkpoint("teacher", run.steps["teacher"])
        else:
            run.done.append("teacher")
    if "calibrate" not in run.done:
        if config.calib_batches > 0 and result is not None:
            calibration = run.calibrate()  # every rank refits on the same images: replicas agree
            run.evaluate("calibrated", model, "calibrated", 0)
        run.done.append("calibrate")
        run.checkpoint("calibrate", 0)
    for phase, stage in (("blockwise", "blockwise"), ("end-to-end", "distilled")):
        if phase in run.done:
            continue
        if run.total_steps(phase) > 0:
            run.train(phase, state)
            if phase == "blockwise":
                _refresh_bn(run)
            run.evaluate(stage, model, phase, run.steps[phase])
        else:
            run.done.append(phase)
        run.checkpoint(phase, run.steps.get(phase, 0))
    model.eval()
    return DistillResult(
        model=model,
        accuracy=dict(run.accuracy),
        steps=dict(run.steps),
        history=run.history,
        calibration=calibration,
        seconds=time.perf_counter() - start,
        notes=notes,
    )


def _refresh_bn(run: _Run) -> None:
    """Block-wise training saw the teacher's inputs; BN statistics must describe the student's own."""
    if run.config.calib_batches <= 0:
        return
    images = []
    for _, batch in run.batches("calibrate-bn", 0, min(run.config.calib_batches, run.steps_per_epoch)):
        if batch is not None:
            images.append(run.to_device(batch)[0])
    with torch.no_grad():
        refresh_bn_stats(run.student, images)
