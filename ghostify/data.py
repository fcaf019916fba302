"""Image data for calibration, distillation and evaluation: ImageFolder trees and .tar.gz archives.

A data folder is either a split (`<split>/<class>/<image>`, as torchvision's ImageFolder reads it) or a
root that holds splits (`<root>/train/...`, `<root>/val/...`). A training split may also hold its images
directly (`<split>/<image>`, no class subfolders): distillation needs no labels, so those images come
with label -1. Unreadable images are skipped and counted, never fatal: `skipped_images(loader)` says how
many a loader met so far.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import math
import multiprocessing
import os
import re
import shutil
import struct
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset, default_collate
from torchvision import transforms as T
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from ghostify.errors import ConfigError, DataError
from ghostify.models import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SafeImageFolder",
    "SeededItems",
    "UnlabelledImageFolder",
    "build_eval_loader",
    "build_train_loader",
    "check_num_classes",
    "collate_skip_none",
    "data_config",
    "extract_archive",
    "find_split",
    "is_unlabelled",
    "loader_classes",
    "parse_floats",
    "set_epoch",
    "skipped_images",
]

logger = logging.getLogger(__name__)

UNLABELLED = -1  # the label of every image in a folder without class subfolders

# What PIL raises on a truncated, corrupt or non-image file (UnidentifiedImageError is an OSError).
_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError)
_SPLIT_NAMES = {"train", "val", "valid", "validation", "test"}
_SMALL_IMAGE = 64  # up to this side length, train with random crop + padding (CIFAR style)
_CROP_PCT = 0.875  # eval: resize the shorter side to size / 0.875, then center-crop (ImageNet style)


# --------------------------------------------------------------------------------------------- folders


def find_split(root: str | Path, names: Sequence[str] = ("val", "test")) -> Path | None:
    """The first `root/<name>` folder that exists, in the order of `names`; None if there is none."""
    root = Path(root).expanduser()
    for name in names:
        candidate = root / name
        if candidate.is_dir():
            return candidate
    return None


def _is_image(path: Path) -> bool:
    return path.name.lower().endswith(IMG_EXTENSIONS) and not path.name.startswith(".") and path.is_file()


def _flat_images(folder: Path) -> list[Path]:
    """The images directly inside `folder` (not in subfolders), sorted."""
    return sorted(p for p in folder.iterdir() if _is_image(p))


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def _tree_has_images(folder: Path) -> bool:
    for _dirpath, _dirs, files in os.walk(folder, followlinks=True):
        if any(f.lower().endswith(IMG_EXTENSIONS) for f in files):
            return True
    return False


def _check_split(split: Path, allow_unlabelled: bool = False) -> bool:
    """True for a labelled split (`<class>/<image>`), False for a flat one (`<image>`, if allowed).

    Raises DataError, saying which layout is expected, when `split` is missing, empty or holds no images.
    """
    layout = f"{split}/<class>/<image>" + (
        f" (or {split}/<image> to distil without labels)" if allow_unlabelled else ""
    )
    if not split.exists():
        raise DataError(f"data folder {split} does not exist; pass a folder laid out as {layout}.")
    if not split.is_dir():
        raise DataError(f"data path {split} is not a folder; pass a folder laid out as {layout}.")
    flat = _flat_images(split)
    classes = _class_dirs(split)
    if any(_tree_has_images(d) for d in classes):
        if flat:
            logger.warning(
                "ignoring the %d images directly in %s: it has class subfolders, and only their images are "
                "used",
                len(flat),
                split,
            )
        return True
    if flat:
        if allow_unlabelled:
            return False
        raise DataError(
            f"{split} holds images but no class subfolders, and accuracy needs labels: "
            f"lay it out as {split}/<class>/<image> (one folder per class)."
        )
    if classes:
        raise DataError(
            f"no images found under {split} (looked for {', '.join(IMG_EXTENSIONS)}); "
            f"put the images in {layout}."
        )
    raise DataError(f"data folder {split} is empty; put the images in {layout}.")


def _resolve_split(
    root_or_split_dir: str | Path, names: Sequence[str], allow_unlabelled: bool = False
) -> Path:
    root = Path(root_or_split_dir).expanduser()
    if not root.exists():
        flat = " (or <split>/<image> to distil without labels)" if allow_unlabelled else ""
        raise DataError(
            f"data folder {root} does not exist; pass a folder laid out as <split>/<class>/<image>{flat}."
        )
    split = find_split(root, names) if root.is_dir() else None
    if split is not None:
        return split
    if root.is_dir():
        subdirs = {d.name for d in _class_dirs(root)}
        if subdirs and subdirs <= _SPLIT_NAMES:
            raise DataError(
                f"{root} holds the splits {', '.join(sorted(subdirs))} but none of {', '.join(names)}; "
                f"add {root / names[0]}/<class>/<image>, or pass the split folder itself "
                f"(e.g. {root / sorted(subdirs)[0]})."
            )
    return root


# --------------------------------------------------------------------------------------------- dataset


class SafeImageFolder(ImageFolder):
    """ImageFolder that returns None for an image it cannot read, and remembers which ones those were.

    The record lives in shared memory, so images skipped inside DataLoader worker processes are seen
    by the main process too; an image that fails again in a later epoch is counted once. Hidden folders
    (`.ipynb_checkpoints`...) are not classes.
    """

    def __init__(self, root: str | Path, transform: Any = None) -> None:
        try:
            super().__init__(str(root), transform=transform, allow_empty=True)
        except FileNotFoundError as err:  # _check_split normally catches these first
            raise DataError(f"cannot read {root} as an image folder ({err}).") from None
        self._bad = multiprocessing.RawArray(ctypes.c_bool, max(1, len(self.samples)))

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        classes = [d.name for d in _class_dirs(Path(directory))]
        return classes, {name: i for i, name in enumerate(classes)}

    def __getitem__(self, index: int) -> tuple[Any, int] | None:
        path, target = self.samples[index]
        try:
            sample = self.loader(path)
        except _IMAGE_ERRORS as err:
            if not self._bad[index]:
                self._bad[index] = True
                logger.warning("skipping unreadable image %s (%s)", path, err)
            return None
        if self.transform is not None:
            sample = self.transform(sample)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return sample, target

    @property
    def skipped(self) -> int:
        """How many distinct images could not be read so far."""
        return sum(self._bad)

    @property
    def skipped_paths(self) -> list[str]:
        """The files that could not be read so far."""
        return [path for (path, _), bad in zip(self.samples, self._bad, strict=False) if bad]

    def first_image_size(
        self, indices: Sequence[int] | None = None, tries: int = 16
    ) -> tuple[int, int] | None:
        """(height, width) of the first readable image among `indices` (default: all), None if none is."""
        order = indices if indices is not None else range(len(self.samples))
        for n, index in enumerate(order):
            if n >= tries:
                break
            try:
                with Image.open(self.samples[index][0]) as img:
                    width, height = img.size
                return height, width
            except _IMAGE_ERRORS:
                continue
        return None


class UnlabelledImageFolder(SafeImageFolder):
    """The images directly inside a folder, each labelled -1: distillation learns from the teacher alone.

    Batches stay `(images, labels)` pairs, so a trainer reads labelled and unlabelled data the same way.
    `classes` is empty.
    """

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        return [], {}

    def make_dataset(self, directory: str | Path, *args: Any, **kwargs: Any) -> list[tuple[str, int]]:
        return [(str(path), UNLABELLED) for path in _flat_images(Path(directory))]


def collate_skip_none(batch: list[Any]) -> Any:
    """default_collate, without the samples that came back None; None if none is left."""
    batch = [item for item in batch if item is not None]
    return default_collate(batch) if batch else None


def _worker_failure(err: BaseException) -> str | None:
    """A short reason when `err` is torch reporting a DataLoader worker that crashed or raised, else None."""
    text = str(err)
    if "DataLoader worker" not in text:
        return None
    if text.startswith("Caught ") and "Original Traceback" in text:  # the worker raised an exception
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        return f"it raised {lines[-1]}"
    found = re.search(r"DataLoader (worker \(pids?(?:\(s\))? [^)]*\) [^.]*)", text)
    reason = found.group(1).strip() if found else " ".join(text.split())[:160]
    if "shared memory" in text:
        reason += ", possibly out of shared memory"
    return reason


class _SkippingLoader(DataLoader):
    """A DataLoader that never yields a batch whose every image was unreadable, and that reports a
    crashed worker process as a DataError that says what to do.

    `keep_gaps = True` yields None in place of such a batch instead, so that a caller counting batch
    positions (the trainer, to resume at the right batch) stays aligned with the sampler."""

    keep_gaps = False

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        batches = super().__iter__()
        try:
            for batch in batches:
                if batch is not None or self.keep_gaps:
                    yield batch
        except Exception as err:
            reason = _worker_failure(err)
            if reason is None:
                raise
            stop = getattr(batches, "_shutdown_workers", None)
            if stop is not None:  # now: left to the garbage collector, the workers linger for 5 s
                stop()
            raise DataError(
                f"a data-loading worker crashed ({reason}); rerun with --workers 0 to see the failing image, "
                "or lower --workers."
            ) from err


class SeededItems(Dataset):
    """`dataset` whose item i draws its random augmentation from torch's CPU generator seeded by
    (seed, epoch, i).

    Each image of an epoch is then augmented the same way whatever the number of worker processes and
    wherever a resumed run restarts; the caller's own random state is left untouched. Transforms that
    draw from Python's `random` or numpy (not torchvision's own) are not covered.
    """

    def __init__(self, dataset: Dataset, seed: int, epoch: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, epoch

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only: torch.manual_seed would also reseed the caller's CUDA generators
            seed = hash((self.seed, self.epoch, int(index))) & 0x7FFF_FFFF_FFFF_FFFF
            torch.default_generator.manual_seed(seed)
            return self.dataset[index]


def _base_dataset(data: DataLoader | Dataset) -> Dataset:
    dataset = data.dataset if isinstance(data, DataLoader) else data
    while isinstance(dataset, (Subset, SeededItems)):
        dataset = dataset.dataset
    return dataset


def skipped_images(data: DataLoader | Dataset) -> int:
    """How many unreadable images a loader (or dataset) built here has skipped so far."""
    return getattr(_base_dataset(data), "skipped", 0)


def loader_classes(data: DataLoader | Dataset) -> list[str] | None:
    """The class names of a loader's (or dataset's) images, in label order; None when unlabelled."""
    classes = getattr(_base_dataset(data), "classes", None)
    return list(classes) if classes else None


def is_unlabelled(data: DataLoader | Dataset) -> bool:
    """True for a folder of images without class subfolders (every label -1)."""
    return isinstance(_base_dataset(data), UnlabelledImageFolder)


def check_num_classes(data: DataLoader | Dataset, num_classes: int | None) -> None:
    """Raise DataError when labelled data has another number of classes than the model outputs.

    Labels past the head would crash the loss (or silently mean other classes); this says so up front.
    A no-op for unlabelled data or when the model's class count is unknown (None).
    """
    classes = loader_classes(data)
    if classes is None or num_classes is None or len(classes) == num_classes:
        return
    n = len(classes)
    where = getattr(_base_dataset(data), "root", "the data")
    raise DataError(
        f"{where} has {n} classes but the model outputs {num_classes}; give a model with a {n}-class head "
        f"(--num-classes {n} with --weights FILE), or pass a folder without class subfolders to distil "
        "without labels."
    )


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Tell a distributed loader's sampler the epoch (it reshuffles by it); a no-op for other loaders."""
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)


# --------------------------------------------------------------------------------------------- config


def parse_floats(text: str, option: str = "--mean") -> tuple[float, ...]:
    """'0.5,0.5,0.5' (commas and/or spaces) -> (0.5, 0.5, 0.5); ConfigError naming `option` otherwise."""
    tokens = [t for t in re.split(r"[,\s]+", str(text).strip()) if t]
    try:
        values = tuple(float(t) for t in tokens)
    except ValueError:
        values = ()
    if not values or not all(math.isfinite(v) for v in values):
        raise ConfigError(f"{option} {text!r} is not a list of numbers; e.g. {option} 0.485,0.456,0.406.")
    return values


def _check_stats(values: Sequence[float], channels: int, name: str) -> tuple[float, ...]:
    values = tuple(float(v) for v in values)
    if len(values) not in (1, channels):
        raise ConfigError(
            f"--{name} has {len(values)} values but the input has {channels} channels; give {channels} "
            f"(or one for all)."
        )
    is_mean = name == "mean"
    if not all((0.0 <= v if is_mean else 0.0 < v) and v <= 1.0 for v in values):  # NaN fails too
        rule = "between 0 and 1" if is_mean else "above 0 and at most 1"
        raise ConfigError(
            f"--{name} {','.join(f'{v:g}' for v in values)} is out of range: values must be {rule}, on the "
            "[0, 1] pixel scale (divide 0-255 values by 255)."
        )
    return values


def data_config(
    loaded: Any = None,
    input_size: Sequence[int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> tuple[tuple[int, int, int], tuple[float, ...], tuple[float, ...]]:
    """(input_size, mean, std) for a model: explicit values (CLI options) win over the model's own.

    `loaded` is a `ghostify.models.LoadedModel` (or anything with `input_size`, `mean`, `std`; None for
    ImageNet defaults at 224 px). For a 1-channel input the model's 3-value mean/std are averaged.

    Raises:
        ConfigError: an input size that is not C,H,W with C 1 or 3, or a mean/std of the wrong length or
            outside [0, 1].
    """
    size = tuple(input_size if input_size is not None else getattr(loaded, "input_size", (3, 224, 224)))
    if len(size) == 2:
        size = (3, *size)
    if len(size) != 3 or not all(isinstance(s, int) and s > 0 for s in size) or size[0] not in (1, 3):
        raise ConfigError(
            f"input size {size} is not C,H,W with 1 or 3 channels and positive sides; e.g. 3,224,224."
        )
    resolved = []
    for name, given, default in (("mean", mean, IMAGENET_MEAN), ("std", std, IMAGENET_STD)):
        values = tuple(given if given is not None else (getattr(loaded, name, None) or default))
        if given is None and size[0] == 1 and len(values) == 3:
            values = (sum(values) / 3,)
        resolved.append(_check_stats(values, size[0], name))
    return size, resolved[0], resolved[1]  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------- loaders


def _hw(input_size: Sequence[int]) -> tuple[int, int]:
    if len(input_size) not in (2, 3) or any(int(s) <= 0 for s in input_size):
        raise DataError(
            f"input_size must be (C, H, W) or (H, W) with positive sides (got {tuple(input_size)})."
        )
    if len(input_size) == 3 and int(input_size[0]) not in (1, 3):
        raise DataError(f"input_size {tuple(input_size)}: images load as RGB (3 channels) or grayscale (1).")
    return int(input_size[-2]), int(input_size[-1])


def _to_tensor(input_size: Sequence[int], mean: Sequence[float], std: Sequence[float]) -> list[Any]:
    gray = [T.Grayscale(1)] if len(input_size) == 3 and int(input_size[0]) == 1 else []
    return [*gray, T.ToTensor(), T.Normalize(mean, std)]


def _limit_indices(n: int, limit: int | None, seed: int) -> list[int] | None:
    if limit is None or limit >= n:
        return None
    if limit < 1:
        raise DataError(f"limit must be a positive number of images (got {limit}).")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return sorted(perm[:limit].tolist())


def _dataset(
    split: Path, limit: int | None, seed: int, allow_unlabelled: bool = False
) -> tuple[SafeImageFolder, Dataset, list[int] | None]:
    labelled = _check_split(split, allow_unlabelled)
    folder = SafeImageFolder(split) if labelled else UnlabelledImageFolder(split)
    if not folder.samples:
        raise DataError(f"no images found under {split}; put the images in {split}/<class>/<image>.")
    indices = _limit_indices(len(folder), limit, seed)
    return folder, (Subset(folder, indices) if indices is not None else folder), indices


def _loader(
    dataset: Dataset,
    batch_size: int,
    workers: int,
    shuffle: bool,
    seed: int,
    sampler: DistributedSampler | None = None,
    drop_last: bool = False,
) -> DataLoader:
    return _SkippingLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate_skip_none,
        pin_memory=torch.cuda.is_available(),
        drop_last=drop_last,
        persistent_workers=False,
        generator=torch.Generator().manual_seed(seed) if shuffle else None,
    )


def eval_transform(
    input_size: Sequence[int], mean: Sequence[float], std: Sequence[float], image_size: tuple[int, int] | None
) -> T.Compose:
    """ToTensor + Normalize, after a resize (+ center crop) only if the images differ from the input size."""
    h, w = _hw(input_size)
    steps: list[Any] = []
    if image_size != (h, w):
        if image_size is not None and max(image_size) < min(h, w):
            steps.append(T.Resize((h, w)))  # small images up-scaled whole: cropping would lose content
        else:
            steps += [T.Resize(int(round(min(h, w) / _CROP_PCT))), T.CenterCrop((h, w))]
    return T.Compose(steps + _to_tensor(input_size, mean, std))


def train_transform(
    input_size: Sequence[int], mean: Sequence[float], std: Sequence[float], image_size: tuple[int, int] | None
) -> T.Compose:
    """Small inputs (<= 64 px): random crop with padding; larger: RandomResizedCrop. Then horizontal flip."""
    h, w = _hw(input_size)
    steps: list[Any] = []
    if max(h, w) <= _SMALL_IMAGE:
        if image_size != (h, w):
            steps.append(T.Resize((h, w)))
        steps.append(T.RandomCrop((h, w), padding=max(1, min(h, w) // 8)))
    else:
        steps.append(T.RandomResizedCrop((h, w)))
    steps.append(T.RandomHorizontalFlip())
    return T.Compose(steps + _to_tensor(input_size, mean, std))


def build_eval_loader(
    root_or_split_dir: str | Path,
    input_size: Sequence[int] = (3, 224, 224),
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    batch_size: int = 256,
    workers: int = 2,
    limit: int | None = None,
    seed: int = 0,
    names: Sequence[str] = ("val", "test"),
) -> DataLoader:
    """A loader over a labelled split, in file order, without augmentation (accuracy needs labels).

    Args:
        root_or_split_dir: a split (`<class>/<image>` inside) or a root holding one of `names`.
        input_size: (C, H, W) the model expects; images of another size are resized (and center-cropped).
            C is 3 (RGB) or 1 (converted to grayscale).
        mean: per-channel normalisation mean, on the [0, 1] scale.
        std: per-channel normalisation std.
        batch_size: images per batch (batches lose the images that cannot be read).
        workers: DataLoader worker processes (0 loads in this process).
        limit: use only this many images: a fixed subset, the same for a given `seed`.
        seed: picks the `limit` subset.
        names: split folders looked for under a root, in order.

    Raises:
        DataError: the folder is missing, empty, or has no class subfolders. Iterating raises DataError
            when a worker process crashes.
    """
    split = _resolve_split(root_or_split_dir, names)
    folder, dataset, indices = _dataset(split, limit, seed)
    folder.transform = eval_transform(input_size, mean, std, folder.first_image_size(indices))
    return _loader(dataset, batch_size, workers, shuffle=False, seed=seed)


def build_train_loader(
    root_or_split_dir: str | Path,
    input_size: Sequence[int] = (3, 224, 224),
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    batch_size: int = 128,
    workers: int = 2,
    limit: int | None = None,
    seed: int = 0,
    shuffle: bool = True,
    names: Sequence[str] = ("train",),
    world_size: int = 1,
    rank: int = 0,
    drop_last: bool = False,
) -> DataLoader:
    """A shuffled, augmented loader over a training split (see `build_eval_loader` for the arguments).

    The split may be labelled (`<class>/<image>`) or flat (`<image>` directly, every label -1: distillation
    needs none). Augmentation: random crop with padding for inputs up to 64 px (CIFAR style),
    RandomResizedCrop above; then a horizontal flip. `seed` fixes the `limit` subset and the shuffling.

    Args:
        world_size: processes sharing the data (torchrun's WORLD_SIZE); above 1 each process reads its own
            shard through a DistributedSampler, and the caller must call `set_epoch(loader, epoch)` (or
            `loader.sampler.set_epoch(epoch)`) before each epoch, or every epoch repeats one order.
        rank: this process's index among them (RANK).
        drop_last: drop the last, incomplete batch (and, distributed, the tail that does not split evenly
            across processes) so every batch is full: a batch of one breaks BatchNorm in training mode.

    Raises:
        DataError: the folder is missing or empty, or `batch_size` exceeds the images a process gets.
        ConfigError: batch_size, world_size or rank out of range.
    """
    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1 (got {batch_size}).")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is not in 0..{world_size - 1} (world size {world_size}).")
    split = _resolve_split(root_or_split_dir, names, allow_unlabelled=True)
    folder, dataset, indices = _dataset(split, limit, seed, allow_unlabelled=True)
    folder.transform = train_transform(input_size, mean, std, folder.first_image_size(indices))
    sampler = None
    if world_size > 1:
        sampler = DistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last
        )
    where = f"{split} (limited to {limit})" if indices is not None else str(split)
    _check_batch_size(batch_size, len(dataset), len(sampler) if sampler else len(dataset), where, world_size)
    return _loader(dataset, batch_size, workers, shuffle, seed, sampler=sampler, drop_last=drop_last)


def _check_batch_size(batch_size: int, total: int, per_rank: int, where: str, world_size: int) -> None:
    """A batch larger than the data would silently train on one short batch per epoch (or none)."""
    if batch_size <= per_rank:
        return
    if per_rank == 0:
        raise DataError(
            f"the {total} images in {where} are too few for {world_size} processes; add images or use fewer."
        )
    if world_size == 1:
        have = f"the {total} images in {where}"
    else:
        have = f"the {per_rank} images each of the {world_size} processes gets from {where} ({total} in all)"
    raise DataError(f"batch size {batch_size} is larger than {have}; use --batch-size {per_rank} or fewer.")


# --------------------------------------------------------------------------------------------- archives


def _marker(dest: Path, archive: Path) -> Path:
    return dest / f".{archive.name}.extracted"


def _fingerprint(archive: Path) -> dict[str, Any]:
    stat = archive.stat()
    return {"archive": archive.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _is_extracted(dest: Path, archive: Path) -> bool:
    try:
        return json.loads(_marker(dest, archive).read_text()) == _fingerprint(archive)
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def _locked(dest: Path) -> Iterator[None]:
    """An exclusive lock on `dest` across processes (e.g. torchrun ranks); a no-op where fcntl is missing."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(dest / ".extract.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _extract_all(tar: tarfile.TarFile, dest: Path) -> None:
    if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 / 3.11.4: refuses links and paths outside dest
        tar.extractall(dest, filter="data")
        return
    root = dest.resolve()  # pragma: no cover - older Pythons
    for member in tar.getmembers():
        target = (dest / member.name).resolve()
        if not (member.isfile() or member.isdir()) or (target != root and root not in target.parents):
            raise tarfile.TarError(f"refusing to extract {member.name!r} (link or path outside the folder)")
    tar.extractall(dest)


def extract_archive(tar_path: str | Path, dest_dir: str | Path) -> Path:
    """Extract a .tar(.gz) archive into `dest_dir` once; later calls return at once.

    The archive is unpacked into a temporary folder inside `dest_dir`, its top-level entries are then
    renamed into place, and only then is a marker file written: an interrupted extraction never looks
    complete and is redone next time. Several archives may share one `dest_dir`.

    Returns:
        `dest_dir`, which now holds the archive's top-level entries.

    Raises:
        DataError: the archive is missing or unreadable, or `dest_dir` cannot be written.
    """
    archive = Path(tar_path).expanduser()
    dest = Path(dest_dir).expanduser()
    if not archive.is_file():
        raise DataError(f"archive {archive} does not exist; check the path (or download it first).")
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"cannot create {dest} ({err.strerror}); choose another cache folder.") from None
    if _is_extracted(dest, archive):
        return dest
    with _locked(dest):
        if _is_extracted(dest, archive):  # another process finished it while we waited
            return dest
        tmp = Path(tempfile.mkdtemp(prefix=f".{archive.name}.", suffix=".partial", dir=dest))
        try:
            try:
                with tarfile.open(archive) as tar:
                    _extract_all(tar, tmp)
            except (tarfile.TarError, EOFError, OSError) as err:
                raise DataError(
                    f"cannot extract {archive} ({type(err).__name__}: {err}); "
                    f"the file may be truncated: replace it and retry."
                ) from None
            for entry in sorted(tmp.iterdir()):
                target = dest / entry.name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)  # left over from an interrupted extraction
                elif target.exists() or target.is_symlink():
                    target.unlink()
                entry.rename(target)
            _marker(dest, archive).write_text(json.dumps(_fingerprint(archive)))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest
