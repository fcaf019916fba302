"""Evaluate the pretrained CIFAR-10 ResNets of ../shared/data on the 10,000 JPEG test images.

    python examples/cifar10_eval.py                       # ResNet-20 and ResNet-56
    python examples/cifar10_eval.py --models resnet56 --limit 1000

Expected (../shared/data/README.md): ResNet-20 81.03%, ResNet-56 83.20% top-1.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SHARED = REPO_ROOT / ".." / "shared"
CHECKPOINTS = {"resnet20": "resnet20-12fca82f.th", "resnet56": "resnet56-4bfd9763.th"}
EXPECTED_TOP1 = {"resnet20": 81.03, "resnet56": 83.20}

try:
    import ghostify.data  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO_ROOT))

import cifar_resnet  # noqa: E402  (this file's neighbour)

from ghostify.data import build_eval_loader, extract_archive, skipped_images  # noqa: E402
from ghostify.errors import GhostifyError  # noqa: E402
from ghostify.evaluate import evaluate  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shared", type=Path, default=DEFAULT_SHARED, help="the shared folder (holds data/)")
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path("~/.cache/ghostify/cifar10-jpeg"),
        help="where test.tar.gz is extracted (once)",
    )
    parser.add_argument("--models", nargs="+", choices=sorted(CHECKPOINTS), default=sorted(CHECKPOINTS))
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--limit", type=int, default=None, help="score a fixed subset of this many images")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    data = args.shared / "data"
    try:
        start = time.perf_counter()
        root = extract_archive(data / "cifar10-jpeg" / "test.tar.gz", args.cache)
        print(f"test images in {root / 'test'} ({time.perf_counter() - start:.1f} s to check/extract)")
        loader = build_eval_loader(
            root,
            input_size=cifar_resnet.input_size,
            mean=cifar_resnet.MEAN,
            std=cifar_resnet.STD,
            batch_size=args.batch_size,
            workers=args.workers,
            limit=args.limit,
            names=("test",),
        )
    except GhostifyError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for name in args.models:
        model = cifar_resnet.load_checkpoint(
            getattr(cifar_resnet, name)(), data / "pretrained" / CHECKPOINTS[name]
        )
        result = evaluate(model, loader, progress=not args.no_progress)
        print(
            f"{name}: top-1 {result.top1:.2f}%  top-5 {result.top5:.2f}%  on {result.images} images "
            f"in {result.seconds:.1f} s  (README: top-1 {EXPECTED_TOP1[name]:.2f}% on all 10,000)"
        )
    if skipped_images(loader):
        print(f"skipped {skipped_images(loader)} unreadable images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
