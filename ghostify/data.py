"""Image data for calibration, distillation and evaluation: ImageFolder trees and .tar.gz archives.

A data folder is either a split (`<split>/<class>/<image>`, as torchvision's ImageFolder reads it) or a
root that holds splits (`<root>/train/...`, `<root>/val/...`). Unreadable images are skipped and
counted, never fatal: `skipped_images(loader)` says how many a loader met so far.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import multiprocessing
import os
import shutil
import struct
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset, default_collate
from torchvision import transforms as T
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from ghostify.errors import DataError

__all__ = [
    "SafeImageFolder",
    "build_eval_loader",
    "build_train_loader",
    "collate_skip_none",
    "extract_archive",
    "find_split",
    "skipped_images",
]

logger = logging.getLogger(__name__)

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


def _has_images(folder: Path) -> bool:
    return any(p.is_file() and p.name.lower().endswith(IMG_EXTENSIONS) for p in folder.iterdir())


def _check_split(split: Path) -> None:
    """Raise DataError unless `split` is a folder of class subfolders holding at least one image."""
    if not split.exists():
        raise DataError(
            f"data folder {split} does not exist; pass a folder laid out as <split>/<class>/<image>."
        )
    if not split.is_dir():
        raise DataError(
            f"data path {split} is not a folder; pass a folder laid out as <split>/<class>/<image>."
        )
    classes = [d for d in split.iterdir() if d.is_dir() and not d.name.startswith(".")]
    if not classes:
        if _has_images(split):
            raise DataError(
                f"{split} holds images but no class subfolders; a labelled split needs "
                f"{split}/<class>/<image> (move the images into one folder per class)."
            )
        raise DataError(f"data folder {split} is empty; put the images in {split}/<class>/<image>.")
    for class_dir in classes:
        for _dirpath, _dirs, files in os.walk(class_dir, followlinks=True):
            if any(f.lower().endswith(IMG_EXTENSIONS) for f in files):
                return
    raise DataError(
        f"no images found under {split} (looked for {', '.join(IMG_EXTENSIONS)}); "
        f"put the images in {split}/<class>/<image>."
    )


def _resolve_split(root_or_split_dir: str | Path, names: Sequence[str]) -> Path:
    root = Path(root_or_split_dir).expanduser()
    if not root.exists():
        raise DataError(
            f"data folder {root} does not exist; pass a folder laid out as <split>/<class>/<image>."
        )
    split = find_split(root, names) if root.is_dir() else None
    if split is not None:
        return split
    if root.is_dir():
        subdirs = {d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")}
        if subdirs and subdirs <= _SPLIT_NAMES:
            raise DataError(
                f"{root} holds the splits {', '.join(sorted(subdirs))} but none of {', '.join(names)}; "
                f"pass the split folder itself (e.g. {root / sorted(subdirs)[0]})."
            )
    return root


# --------------------------------------------------------------------------------------------- dataset


class SafeImageFolder(ImageFolder):
    """ImageFolder that returns None for an image it cannot read, and remembers which ones those were.

    The record lives in shared memory, so images skipped inside DataLoader worker processes are seen
    by the main process too; an image that fails again in a later epoch is counted once.
    """

    def __init__(self, root: str | Path, transform: Any = None) -> None:
        try:
            super().__init__(str(root), transform=transform, allow_empty=True)
        except FileNotFoundError as err:  # _check_split normally catches these first
            raise DataError(f"cannot read {root} as an image folder ({err}).") from None
        self._bad = multiprocessing.RawArray(ctypes.c_bool, max(1, len(self.samples)))

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


def collate_skip_none(batch: list[Any]) -> Any:
    """default_collate, without the samples that came back None; None if none is left."""
    batch = [item for item in batch if item is not None]
    return default_collate(batch) if batch else None


class _SkippingLoader(DataLoader):
    """A DataLoader that never yields a batch whose every image was unreadable."""

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        return (batch for batch in super().__iter__() if batch is not None)


def skipped_images(data: DataLoader | Dataset) -> int:
    """How many unreadable images a loader (or dataset) built here has skipped so far."""
    dataset = data.dataset if isinstance(data, DataLoader) else data
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return getattr(dataset, "skipped", 0)


# --------------------------------------------------------------------------------------------- loaders


def _hw(input_size: Sequence[int]) -> tuple[int, int]:
    if len(input_size) not in (2, 3) or any(int(s) <= 0 for s in input_size):
        raise DataError(
            f"input_size must be (C, H, W) or (H, W) with positive sides (got {tuple(input_size)})."
        )
    return int(input_size[-2]), int(input_size[-1])


def _limit_indices(n: int, limit: int | None, seed: int) -> list[int] | None:
    if limit is None or limit >= n:
        return None
    if limit < 1:
        raise DataError(f"limit must be a positive number of images (got {limit}).")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return sorted(perm[:limit].tolist())


def _dataset(split: Path, limit: int | None, seed: int) -> tuple[SafeImageFolder, Dataset, list[int] | None]:
    _check_split(split)
    folder = SafeImageFolder(split)
    if not folder.samples:
        raise DataError(f"no images found under {split}; put the images in {split}/<class>/<image>.")
    indices = _limit_indices(len(folder), limit, seed)
    return folder, (Subset(folder, indices) if indices is not None else folder), indices


def _loader(dataset: Dataset, batch_size: int, workers: int, shuffle: bool, seed: int) -> DataLoader:
    return _SkippingLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=workers,
        collate_fn=collate_skip_none,
        pin_memory=torch.cuda.is_available(),
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
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(steps)


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
    steps += [T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(steps)


def build_eval_loader(
    root_or_split_dir: str | Path,
    input_size: Sequence[int] = (3, 224, 224),
    mean: Sequence[float] = (0.485, 0.456, 0.406),
    std: Sequence[float] = (0.229, 0.224, 0.225),
    batch_size: int = 256,
    workers: int = 2,
    limit: int | None = None,
    seed: int = 0,
    names: Sequence[str] = ("val", "test"),
) -> DataLoader:
    """A loader over a labelled split, in file order, without augmentation.

    Args:
        root_or_split_dir: a split (`<class>/<image>` inside) or a root holding one of `names`.
        input_size: (C, H, W) the model expects; images of another size are resized (and center-cropped).
        mean: per-channel normalisation mean, on the [0, 1] scale.
        std: per-channel normalisation std.
        batch_size: images per batch (batches lose the images that cannot be read).
        workers: DataLoader worker processes (0 loads in this process).
        limit: use only this many images: a fixed subset, the same for a given `seed`.
        seed: picks the `limit` subset.
        names: split folders looked for under a root, in order.

    Raises:
        DataError: the folder is missing, empty, or has no class subfolders.
    """
    split = _resolve_split(root_or_split_dir, names)
    folder, dataset, indices = _dataset(split, limit, seed)
    folder.transform = eval_transform(input_size, mean, std, folder.first_image_size(indices))
    return _loader(dataset, batch_size, workers, shuffle=False, seed=seed)


def build_train_loader(
    root_or_split_dir: str | Path,
    input_size: Sequence[int] = (3, 224, 224),
    mean: Sequence[float] = (0.485, 0.456, 0.406),
    std: Sequence[float] = (0.229, 0.224, 0.225),
    batch_size: int = 128,
    workers: int = 2,
    limit: int | None = None,
    seed: int = 0,
    shuffle: bool = True,
    names: Sequence[str] = ("train",),
) -> DataLoader:
    """A shuffled, augmented loader over a labelled split (see `build_eval_loader` for the arguments).

    Augmentation: random crop with padding for inputs up to 64 px (CIFAR style), RandomResizedCrop above;
    then a horizontal flip. `seed` fixes both the `limit` subset and the shuffling order.
    """
    split = _resolve_split(root_or_split_dir, names)
    folder, dataset, indices = _dataset(split, limit, seed)
    folder.transform = train_transform(input_size, mean, std, folder.first_image_size(indices))
    return _loader(dataset, batch_size, workers, shuffle=shuffle, seed=seed)


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
