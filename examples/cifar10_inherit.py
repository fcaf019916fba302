"""How much of the pretrained function survives conversion, before any fine-tuning (CIFAR-10 ResNet-56).

    python examples/cifar10_inherit.py                 # all variants, all 10,000 test images
    python examples/cifar10_inherit.py --limit 2000    # a quicker, fixed subset

Variants: the original; C-Ghost s=2 with ghostify's data-free weight inheritance ("fit"); the naive swap
(first filters kept, random cheap ops: "random"); G-Ghost s=2 where available. Prints MACs and top-1.
"""

from __future__ import annotations

import argparse
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
from ghostify.evaluate import evaluate  # noqa: E402
from ghostify.rewrite import convert_model  # noqa: E402

VARIANTS = {
    "original": None,
    "c-ghost fit": ConvertConfig(mode="c-ghost", ratio=2, weight_init="fit"),
    "c-ghost random (naive)": ConvertConfig(mode="c-ghost", ratio=2, weight_init="random"),
    "g-ghost fit": ConvertConfig(mode="g-ghost", ratio=2, weight_init="fit"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shared", type=Path, default=DEFAULT_SHARED)
    parser.add_argument("--cache", type=Path, default=Path("~/.cache/ghostify/cifar10-jpeg"))
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--limit", type=int, default=None, help="score a fixed subset of this many images")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    data = args.shared / "data"
    root = extract_archive(data / "cifar10-jpeg" / "test.tar.gz", args.cache.expanduser())
    loader = build_eval_loader(
        root / "test",
        input_size=cifar_resnet.input_size,
        mean=cifar_resnet.MEAN,
        std=cifar_resnet.STD,
        workers=args.workers,
        limit=args.limit,
    )
    teacher = cifar_resnet.load_checkpoint(
        cifar_resnet.resnet56(), data / "pretrained" / "resnet56-4bfd9763.th"
    )
    teacher.eval()
    example = torch.zeros(1, *cifar_resnet.input_size)
    print(f"{'variant':<24} {'MACs':>8} {'params':>8} {'top-1':>7} {'top-5':>7} {'images':>7} {'seconds':>8}")
    for name in args.variants:
        config = VARIANTS[name]
        start = time.perf_counter()
        try:
            model = (
                teacher if config is None else convert_model(teacher, config, example_inputs=example).model
            )
        except Exception as err:  # noqa: BLE001 - report and go on with the other variants
            print(f"{name:<24} not available: {err}")
            continue
        convert_s = time.perf_counter() - start
        macs, _ = count_macs(model.eval(), example)
        params = sum(p.numel() for p in model.parameters())
        result = evaluate(model, loader, progress=sys.stderr.isatty())
        print(
            f"{name:<24} {macs / 1e6:>7.1f}M {params / 1e6:>7.3f}M {result.top1:>6.2f}% {result.top5:>6.2f}% "
            f"{result.images:>7} {result.seconds + convert_s:>8.1f}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
