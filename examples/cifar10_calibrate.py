"""Closed-form calibration on a few training batches: CIFAR-10 ResNet-56, C-Ghost s=2 and G-Ghost s=2.

    python examples/cifar10_calibrate.py                  # both modes, all 10,000 test images
    python examples/cifar10_calibrate.py --limit 2000     # a quicker, fixed subset of the test images
    python examples/cifar10_calibrate.py --limit 2000 --ablate   # also the calibration variants

Converts the pretrained ResNet-56 (data-free weight inheritance), then calibrates it with
`ghostify.distill.calibrate` on `--calib-batches` x `--batch-size` training images (a fixed random subset,
test-time transforms) and prints top-1 on the test images right after conversion and after calibration.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SHARED = REPO_ROOT / ".." / "shared"

try:
    import ghostify  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO_ROOT))

import cifar_resnet  # noqa: E402  (this file's neighbour)

from ghostify.analysis import count_macs  # noqa: E402
from ghostify.config import ConvertConfig  # noqa: E402
from ghostify.data import build_eval_loader, extract_archive  # noqa: E402
from ghostify.distill import calibrate  # noqa: E402
from ghostify.evaluate import evaluate  # noqa: E402
from ghostify.rewrite import convert_model  # noqa: E402

MODES = ("c-ghost", "g-ghost")
# calibration variants compared with --ablate (keyword arguments of `calibrate`)
ABLATIONS = {
    "calibrated": {},
    "primary: BN affine only": {"primary": "bn"},
    "no primary refit": {"primary": "none"},
    "no re-pairing": {"repair": False},
    "BN refresh before": {"bn_refresh": "before"},
    "no BN refresh": {"bn_refresh": "none"},
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shared", type=Path, default=DEFAULT_SHARED)
    parser.add_argument("--cache", type=Path, default=Path("~/.cache/ghostify/cifar10-jpeg"))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument(
        "--limit", type=int, default=None, help="score a fixed subset of this many test images"
    )
    parser.add_argument("--calib-batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--ablate", action="store_true", help="also run every calibration variant")
    parser.add_argument("--variants", nargs="+", choices=list(ABLATIONS), help="calibration variants to run")
    parser.add_argument("--teacher", action="store_true", help="also score the unconverted teacher")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    show = sys.stderr.isatty()

    data = args.shared / "data"
    cache = args.cache.expanduser()
    root = extract_archive(data / "cifar10-jpeg" / "test.tar.gz", cache)
    extract_archive(data / "cifar10-jpeg" / "train.tar.gz", cache)
    common = {"input_size": cifar_resnet.input_size, "mean": cifar_resnet.MEAN, "std": cifar_resnet.STD}
    test_loader = build_eval_loader(root / "test", workers=args.workers, limit=args.limit, **common)
    calib_loader = build_eval_loader(
        root / "train",
        batch_size=args.batch_size,
        workers=args.workers,
        limit=args.calib_batches * args.batch_size,
        seed=1,
        **common,
    )
    calib_batches = [batch for _, batch in zip(range(args.calib_batches), calib_loader, strict=False)]

    teacher = cifar_resnet.load_checkpoint(
        cifar_resnet.resnet56(), data / "pretrained" / "resnet56-4bfd9763.th"
    ).eval()
    example = torch.zeros(1, *cifar_resnet.input_size)
    print(f"{'model':<34} {'MACs':>7} {'top-1':>7} {'top-5':>7} {'images':>6} {'calib s':>8} {'eval s':>7}")

    def row(name: str, model: torch.nn.Module, calib_s: float | None = None) -> None:
        macs, _ = count_macs(model.eval(), example)
        res = evaluate(model, test_loader, progress=show)
        cs = f"{calib_s:8.1f}" if calib_s is not None else f"{'':>8}"
        print(
            f"{name:<34} {macs / 1e6:>6.1f}M {res.top1:>6.2f}% {res.top5:>6.2f}% {res.images:>6} {cs} "
            f"{res.seconds:>7.1f}",
            flush=True,
        )

    if args.teacher:
        row("teacher", teacher)
    for mode in args.modes:
        result = convert_model(teacher, ConvertConfig(mode=mode, ratio=2), example_inputs=example)
        row(f"{mode} s=2, converted", result.model)
        names = list(ABLATIONS) if args.ablate else (args.variants or ["calibrated"])
        variants = {name: ABLATIONS[name] for name in names}
        for label, options in variants.items():
            student = copy.deepcopy(result.model)
            result_copy = copy.copy(result)
            result_copy.model = student
            start = time.perf_counter()
            report = calibrate(
                student,
                teacher,
                calib_batches,
                result_copy,
                batches=args.calib_batches,
                progress=show,
                **options,
            )
            row(f"{mode} s=2, {label}", student, time.perf_counter() - start)
            if label == "calibrated":
                print(f"  {report.summary()}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
