"""Win back a ghost ResNet-56's accuracy on CIFAR-10, next to the references a user would compare with.

    python examples/cifar10_resnet56.py                  # every row, 2 epochs each, 10,000 test images
    python examples/cifar10_resnet56.py --rows c-ghost   # only ghostify's C-Ghost row
    python examples/cifar10_resnet56.py --limit-train 2048 --limit-val 1000 --epochs 0.5 --teacher-epochs 0.1

The pretrained ResNet-56 (../shared/data/pretrained) is the teacher. Rows, each with the same training
budget (`--epochs` passes over the training images, batch 128, SGD + warm-up/cosine):

- teacher: the pretrained model as it is;
- teacher-ft: the teacher fine-tuned on this (JPEG) data with cross-entropy: the fair reference;
- every distilled row first spends `--teacher-epochs` (0.5) of its budget adapting a copy of the teacher
  to this data (cross-entropy) and learns from that copy (0: the teacher as it is);
- c-ghost / g-ghost: ghostify at s=2: converted (data-free inheritance), calibrated (closed form, 8
  batches), then `--blockwise` epochs (0) of block-wise distillation (each block fed its input in the
  student) and the rest of the budget end-to-end distillation (KL on softened logits + cross-entropy);
- c-ghost-scratch: the same C-Ghost architecture from random weights, same budget and losses;
- torch-pruning: the peer, Torch-Pruning (L2 group magnitude) on the blocks' inner channels pruned to
  C-Ghost's MACs (option-A shortcuts block pruning the residual width), same budget and losses;
- torch-pruning-g: the same peer pruned to G-Ghost's (fewer) MACs, the row to put beside g-ghost.

`--include` / `--exclude` (regexes on module names) limit the ghost rows to some convs (`--include 'conv2$'`:
only the blocks' second convs), and the peer rows then match the MACs of that limited conversion;
`--fit-images N` adds every row's top-1 on N training images with the test-time transform, which tells a
student that cannot fit its data from one that does not generalise.

Results go to `--json` after every row (a crash keeps the finished rows) and a Markdown table at the end.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SHARED = REPO_ROOT / ".." / "shared"

try:
    import ghostify  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO_ROOT))

import cifar_resnet  # noqa: E402  (this file's neighbours)

import ghostify  # noqa: E402
from ghostify.analysis import count_macs, count_params  # noqa: E402
from ghostify.atomic import atomic_write_text  # noqa: E402
from ghostify.config import ConvertConfig  # noqa: E402
from ghostify.data import build_eval_loader, build_train_loader, extract_archive  # noqa: E402
from ghostify.distill import DistillConfig, DistillData  # noqa: E402
from ghostify.errors import GhostifyError  # noqa: E402
from ghostify.evaluate import evaluate  # noqa: E402
from ghostify.rewrite import convert_model  # noqa: E402

ROWS = ("teacher", "teacher-ft", "c-ghost", "c-ghost-scratch", "torch-pruning", "g-ghost", "torch-pruning-g")
PEER_MACS_OF = {"torch-pruning": "c-ghost", "torch-pruning-g": "g-ghost"}  # peer row -> ghost row it matches


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shared", type=Path, default=DEFAULT_SHARED, help="the shared folder (data/ inside)")
    p.add_argument("--work", type=Path, default=Path("/tmp/ghostify-cifar10"), help="where to unpack data")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {', '.join(ROWS)}")
    p.add_argument("--epochs", type=float, default=2.0, help="training budget of every row, in epochs")
    p.add_argument("--blockwise", type=float, default=0.0, help="ghost rows: epochs of it block-wise")
    p.add_argument(
        "--teacher-epochs", type=float, default=0.5,
        help="distilled rows: epochs of the budget spent adapting the teacher first (cross-entropy)",
    )  # fmt: skip
    d = DistillConfig()  # the library's defaults
    p.add_argument("--blockwise-lr", type=float, default=d.blockwise_lr, help="ghost rows: block-wise lr")
    p.add_argument("--blockwise-inputs", default=d.blockwise_inputs, help="ghost rows: student or teacher")
    p.add_argument("--calib-batches", type=int, default=d.calib_batches, help="ghost rows: 0 = none")
    p.add_argument("--temperature", type=float, default=d.temperature, help="KL softening, every row")
    p.add_argument("--kd-weight", type=float, default=d.kd_weight, help="KL weight, every row")
    p.add_argument("--ce-weight", type=float, default=d.ce_weight, help="CE weight, every row")
    p.add_argument(
        "--feature-weight", type=float, default=d.feature_weight,
        help="ghost rows: weight of the feature MSE at the converted sites (0 = off)",
    )  # fmt: skip
    p.add_argument("--include", default=None, help="ghost rows: convert only modules matching this regex")
    p.add_argument("--exclude", default=None, help="ghost rows: leave modules matching this regex alone")
    p.add_argument(
        "--fit-images", type=int, default=0,
        help="also score every row on this many training images (test-time transform): fit vs generalisation",
    )  # fmt: skip
    p.add_argument("--lr", type=float, default=None, help="peak lr of every row [default: the library's]")
    p.add_argument("--optimizer", default=d.optimizer, help="sgd or adamw, every row")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads [default: torch's]")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--limit-train", type=int, default=None, help="train on a fixed subset of this many")
    p.add_argument("--limit-val", type=int, default=None, help="evaluate on a fixed subset of this many")
    p.add_argument("--json", type=Path, default=Path("cifar10_resnet56.json"), help="results file")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def load_data(args: argparse.Namespace) -> tuple[DistillData, DataLoader | None]:
    """Training and test loaders, and (with `--fit-images`) a fixed subset of the training images with the
    test-time transform, to score how well each row fits its data."""
    archives = args.shared / "data" / "cifar10-jpeg"
    root = args.work
    for split in ("train", "test"):
        extract_archive(archives / f"{split}.tar.gz", root)
    common = dict(
        input_size=cifar_resnet.input_size,
        mean=cifar_resnet.MEAN,
        std=cifar_resnet.STD,
        batch_size=args.batch_size,
        workers=args.workers,
    )
    train = build_train_loader(root / "train", limit=args.limit_train, **common)
    val = build_eval_loader(root / "test", limit=args.limit_val, **common)
    fit = build_eval_loader(root / "train", limit=args.fit_images, **common) if args.fit_images else None
    return DistillData(train, val), fit


def teacher_model(args: argparse.Namespace) -> nn.Module:
    model = cifar_resnet.resnet56()
    cifar_resnet.load_checkpoint(model, args.shared / "data" / "pretrained" / "resnet56-4bfd9763.th")
    return model.eval()


def reinitialise(model: nn.Module) -> nn.Module:
    """Fresh random weights everywhere (the same architecture trained from scratch)."""
    for module in model.modules():
        if hasattr(module, "reset_parameters") and module is not model:
            module.reset_parameters()
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
    return model


def ghost_config(mode: str, args: argparse.Namespace, **extra) -> ConvertConfig:
    """The conversion of the ghost rows, and of the MACs their peer rows are pruned to."""
    return ConvertConfig(mode=mode, ratio=2, include=args.include, exclude=args.exclude, **extra)


def size(model: nn.Module) -> dict[str, int]:
    example = torch.zeros(1, *cifar_resnet.input_size)
    return {"macs": count_macs(model, example)[0], "params": count_params(model)}


def run_row(
    row: str,
    args: argparse.Namespace,
    data: DistillData,
    fit: DataLoader | None,
    teacher: nn.Module,
    macs: dict,
) -> dict:
    """Train one row and return its figures (top-1 per stage, size, wall time, top-1 on `fit` if given)."""
    figures = train_row(row, args, data, teacher, macs)
    student = figures.pop("model")
    if fit is not None:
        figures["train_top1"] = evaluate(student, fit, progress=not args.quiet).top1
    return figures


def train_row(row: str, args: argparse.Namespace, data: DistillData, teacher: nn.Module, macs: dict) -> dict:
    """The row's figures and, under "model", the network they describe."""
    start = time.perf_counter()
    budget = args.epochs
    example = torch.randn(2, *cifar_resnet.input_size, generator=torch.Generator().manual_seed(0))
    losses = dict(temperature=args.temperature, kd_weight=args.kd_weight, ce_weight=args.ce_weight)
    common = dict(
        batch_size=args.batch_size, workers=args.workers, lr=args.lr, optimizer=args.optimizer, **losses
    )
    adapt = args.teacher_epochs  # every distilled row spends this much of its budget adapting the teacher
    e2e_only = DistillConfig(
        epochs=budget - adapt, teacher_epochs=adapt, blockwise_epochs=0, calib_batches=0, **common
    )
    if row == "teacher":
        acc = evaluate(teacher, data.val, progress=not args.quiet)
        return {
            "row": row,
            **size(teacher),
            "top1": {"as-is": acc.top1},
            "seconds": time.perf_counter() - start,
            "model": teacher,
        }
    if row == "teacher-ft":
        ce_only = {**e2e_only.to_dict(), "kd_weight": 0.0, "ce_weight": 1.0}
        ce_only.update(epochs=budget, teacher_epochs=0.0)
        student, config = copy.deepcopy(teacher), DistillConfig(**ce_only)
        outcome = ghostify.distill(student, teacher, data, config, progress=not args.quiet)
    elif row in ("c-ghost", "g-ghost"):
        result = convert_model(teacher, ghost_config(row, args), example_inputs=example)
        config = DistillConfig(
            blockwise_epochs=args.blockwise,
            blockwise_lr=args.blockwise_lr,
            blockwise_inputs=args.blockwise_inputs,
            calib_batches=args.calib_batches,
            teacher_epochs=adapt,
            epochs=budget - adapt - args.blockwise,
            feature_weight=args.feature_weight,
            **common,
        )
        outcome = ghostify.distill(result, teacher, data, config, progress=not args.quiet)
        student = result.model
    elif row == "c-ghost-scratch":
        result = convert_model(teacher, ghost_config("c-ghost", args, weight_init="random"))
        student = reinitialise(result.model)
        outcome = ghostify.distill(student, teacher, data, e2e_only, progress=not args.quiet)
    elif row in PEER_MACS_OF:
        try:
            from cifar_pruning import prune_inner_channels  # needs torch-pruning: the bench extra
        except ImportError as err:
            raise SystemExit(f"the {row} row needs {err.name}: pip install -e '.[bench]'") from None
        ghost = PEER_MACS_OF[row]
        if ghost not in macs:  # MACs do not depend on the weights: skip fitting them
            converted = convert_model(
                teacher, ghost_config(ghost, args, weight_init="random"), example_inputs=example
            )
            macs[ghost] = size(converted.model)["macs"]
        target = macs[ghost]
        student, _ratio = prune_inner_channels(teacher, example[:1], target)
        outcome = ghostify.distill(student, teacher, data, e2e_only, progress=not args.quiet)
    else:
        raise SystemExit(f"unknown row {row!r}; choose from {', '.join(ROWS)}")
    top1 = {stage: acc.top1 for stage, acc in outcome.accuracy.items() if stage != "teacher"}
    if "teacher-adapted" in top1:
        top1["teacher"] = top1.pop("teacher-adapted")  # the teacher this row learnt from
    return {
        "row": row,
        **size(student),
        "top1": top1,
        "steps": outcome.steps,
        "seconds": time.perf_counter() - start,
        "model": outcome.model,
    }


def markdown(results: list[dict], args: argparse.Namespace) -> str:
    stages = ("as-is", "teacher", "converted", "calibrated", "blockwise", "distilled")
    fit = ["train top-1"] if args.fit_images else []
    lines = [
        f"| row | MACs | params | {' | '.join([*stages, *fit])} | wall time |",
        "| --- | ---: | ---: |" + " ---: |" * (len(stages) + len(fit)) + " ---: |",
    ]
    for r in results:
        cells = [f"{r['top1'][s]:.2f}%" if s in r["top1"] else "" for s in stages]
        cells += [f"{r['train_top1']:.2f}%"] if fit else []
        lines.append(
            f"| {r['row']} | {r['macs'] / 1e6:.1f}M | {r['params'] / 1e3:.0f}K | {' | '.join(cells)} "
            f"| {r['seconds'] / 60:.1f} min |"
        )
    images = "all" if args.limit_val is None else f"{args.limit_val}"
    lines.append(f"\n_top-1 on {images} CIFAR-10 test images; budget {args.epochs:g} epochs per row_")
    if fit:
        lines.append(f"_train top-1: {args.fit_images} fixed training images, test-time transform_")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.teacher_epochs + args.blockwise >= args.epochs:
        raise SystemExit(
            f"--teacher-epochs {args.teacher_epochs:g} + --blockwise {args.blockwise:g} leave nothing of the "
            f"--epochs {args.epochs:g} budget for end-to-end distillation; lower them or raise --epochs."
        )
    if args.fit_images < 0:
        raise SystemExit(f"--fit-images must be >= 0 (got {args.fit_images}); 0 skips that score.")
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        raise SystemExit(f"unknown rows {', '.join(unknown)}; choose from {', '.join(ROWS)}")
    try:  # the options every row shares, checked by the library before any data is read
        DistillConfig(
            lr=args.lr, optimizer=args.optimizer, temperature=args.temperature, kd_weight=args.kd_weight,
            ce_weight=args.ce_weight, feature_weight=args.feature_weight, calib_batches=args.calib_batches,
            blockwise_lr=args.blockwise_lr, blockwise_inputs=args.blockwise_inputs,
        )  # fmt: skip
        ConvertConfig(include=args.include, exclude=args.exclude)
    except GhostifyError as err:
        raise SystemExit(f"error: {err}") from None
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    data, fit = load_data(args)
    teacher = teacher_model(args)
    results: list[dict] = []
    macs: dict[str, int] = {}
    for row in rows:
        print(f"== {row}", flush=True)
        figures = run_row(row, args, data, fit, teacher, macs)
        macs[row] = figures["macs"]
        results.append(figures)
        atomic_write_text(args.json, json.dumps({"args": vars(args) | {"shared": str(args.shared)},
                                                 "rows": results}, indent=2, default=str))  # fmt: skip
        print(json.dumps(figures), flush=True)
    print(markdown(results, args))


if __name__ == "__main__":
    main()
