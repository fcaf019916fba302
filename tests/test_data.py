"""Data loading: ImageFolder trees, unreadable images, error messages, archive extraction."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from ghostify import data
from ghostify.data import (
    build_eval_loader,
    build_train_loader,
    extract_archive,
    find_split,
    skipped_images,
)
from ghostify.errors import DataError

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
CLASSES = ("cat", "dog", "frog")


def make_tree(root: Path, per_class: int = 4, size: int = 32, classes=CLASSES) -> Path:
    """root/<class>/<i>.png, every pixel of class k at value 40 * (k + 1)."""
    for k, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.new("RGB", (size, size), (40 * (k + 1),) * 3).save(folder / f"{i}.png")
    return root


def all_batches(loader):
    xs, ys = zip(*list(loader), strict=True)
    return torch.cat(xs), torch.cat(ys)


def test_find_split(tmp_path):
    assert find_split(tmp_path) is None
    (tmp_path / "test").mkdir()
    assert find_split(tmp_path) == tmp_path / "test"
    (tmp_path / "val").mkdir()
    assert find_split(tmp_path) == tmp_path / "val"
    assert find_split(tmp_path, ("train",)) is None
    assert find_split(tmp_path / "missing") is None


def test_eval_loader_same_size_is_totensor_normalize(tmp_path):
    make_tree(tmp_path / "val")
    loader = build_eval_loader(tmp_path, (3, 32, 32), MEAN, STD, batch_size=5, workers=0)
    x, y = all_batches(loader)
    assert x.shape == (12, 3, 32, 32)
    assert y.tolist() == [0] * 4 + [1] * 4 + [2] * 4  # file order, classes alphabetical
    expected = (torch.tensor([40.0, 80.0, 120.0]) / 255 - 0.5) / 0.25
    torch.testing.assert_close(x[:, 0, 0, 0], expected.repeat_interleave(4))
    names = [type(t).__name__ for t in loader.dataset.transform.transforms]
    assert names == ["ToTensor", "Normalize"]


def test_eval_loader_resizes_other_sizes(tmp_path):
    make_tree(tmp_path, per_class=1, size=48)
    x, _ = all_batches(build_eval_loader(tmp_path, (3, 32, 32), MEAN, STD, workers=0))
    assert x.shape == (3, 3, 32, 32)
    x, _ = all_batches(build_eval_loader(tmp_path, (3, 64, 64), MEAN, STD, workers=0))  # up-scaled
    assert x.shape == (3, 3, 64, 64)


def test_train_loader_augments_and_limits(tmp_path):
    make_tree(tmp_path / "train", per_class=10)
    loader = build_train_loader(tmp_path, (3, 32, 32), MEAN, STD, batch_size=8, workers=0, limit=12, seed=1)
    assert len(loader.dataset) == 12
    names = [type(t).__name__ for t in loader.dataset.dataset.transform.transforms]
    assert names[:2] == ["RandomCrop", "RandomHorizontalFlip"]
    x, y = all_batches(loader)
    assert x.shape == (12, 3, 32, 32) and y.shape == (12,)
    same = build_train_loader(tmp_path, (3, 32, 32), MEAN, STD, workers=0, limit=12, seed=1)
    other = build_train_loader(tmp_path, (3, 32, 32), MEAN, STD, workers=0, limit=12, seed=2)
    assert same.dataset.indices == loader.dataset.indices != other.dataset.indices
    big = build_train_loader(tmp_path, (3, 96, 96), MEAN, STD, workers=0)
    assert type(big.dataset.transform.transforms[0]).__name__ == "RandomResizedCrop"


def test_eval_limit_is_a_fixed_subset(tmp_path):
    make_tree(tmp_path, per_class=10)
    a = build_eval_loader(tmp_path, (3, 32, 32), MEAN, STD, workers=0, limit=7)
    b = build_eval_loader(tmp_path, (3, 32, 32), MEAN, STD, workers=0, limit=7)
    assert a.dataset.indices == b.dataset.indices == sorted(a.dataset.indices)
    assert len(all_batches(a)[1]) == 7
    assert len(build_eval_loader(tmp_path, (3, 32, 32), MEAN, STD, workers=0, limit=100).dataset) == 30


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_images_are_skipped_and_counted(tmp_path, workers):
    make_tree(tmp_path, per_class=3)
    (tmp_path / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    (tmp_path / "cat" / "empty.jpg").write_bytes(b"")
    png = io.BytesIO()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(png, format="PNG")
    (tmp_path / "frog" / "truncated.png").write_bytes(png.getvalue()[:60])
    loader = build_eval_loader(tmp_path, (3, 32, 32), MEAN, STD, batch_size=4, workers=workers)
    assert skipped_images(loader) == 0
    x, y = all_batches(loader)
    assert len(y) == 9
    assert skipped_images(loader) == 3
    assert sorted(Path(p).name for p in loader.dataset.skipped_paths) == [
        "broken.png",
        "empty.jpg",
        "truncated.png",
    ]
    all_batches(loader)  # a second epoch counts the same files once
    assert loader.dataset.skipped == 3


def test_batch_of_only_corrupt_images_is_dropped(tmp_path):
    make_tree(tmp_path, per_class=1)
    bad = tmp_path / "zebra"
    bad.mkdir()
    for i in range(3):
        (bad / f"{i}.png").write_bytes(b"garbage")
    loader = build_eval_loader(tmp_path, (3, 32, 32), MEAN, STD, batch_size=3, workers=0)
    batches = list(loader)
    assert len(batches) == 1 and batches[0][1].tolist() == [0, 1, 2]
    assert skipped_images(loader) == 3


def test_error_missing_dir(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        build_eval_loader(tmp_path / "nope", (3, 32, 32), MEAN, STD)


def test_error_empty_dir(tmp_path):
    with pytest.raises(DataError, match="is empty"):
        build_eval_loader(tmp_path, (3, 32, 32), MEAN, STD)


def test_error_class_folders_without_images(tmp_path):
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "notes.txt").write_text("hi")
    with pytest.raises(DataError, match="no images"):
        build_train_loader(tmp_path, (3, 32, 32), MEAN, STD)


def test_error_images_without_class_folders(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    with pytest.raises(DataError, match="no class subfolders"):
        build_eval_loader(tmp_path, (3, 32, 32), MEAN, STD)


def test_error_root_without_the_wanted_split(tmp_path):
    make_tree(tmp_path / "train", per_class=1)
    with pytest.raises(DataError, match="pass the split folder itself"):
        build_eval_loader(tmp_path, (3, 32, 32), MEAN, STD)
    assert len(build_eval_loader(tmp_path / "train", (3, 32, 32), MEAN, STD, workers=0).dataset) == 3


def test_error_messages_are_one_line(tmp_path):
    for call in (
        lambda: build_eval_loader(tmp_path / "nope", (3, 32, 32), MEAN, STD),
        lambda: build_eval_loader(tmp_path, (3, 32, 32), MEAN, STD),
        lambda: extract_archive(tmp_path / "nope.tar.gz", tmp_path / "out"),
    ):
        with pytest.raises(DataError) as info:
            call()
        assert "\n" not in str(info.value)


def make_archive(path: Path, source: Path) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        tar.add(source / "test", arcname="test")
    return path


def test_extract_archive_is_idempotent(tmp_path, monkeypatch):
    make_tree(tmp_path / "src" / "test", per_class=2)
    archive = make_archive(tmp_path / "test.tar.gz", tmp_path / "src")
    dest = tmp_path / "cache"
    assert extract_archive(archive, dest) == dest
    assert sorted(p.name for p in (dest / "test").iterdir()) == list(CLASSES)
    assert len(list((dest / "test").rglob("*.png"))) == 6
    assert not list(dest.glob("*.partial"))

    calls = []
    monkeypatch.setattr(data, "_extract_all", lambda *a: calls.append(a))
    (dest / "test" / "cat" / "0.png").unlink()
    assert extract_archive(archive, dest) == dest
    assert calls == []  # already extracted: the archive is not opened again
    loader = build_eval_loader(dest, (3, 32, 32), MEAN, STD, workers=0, names=("test",))
    assert len(loader.dataset) == 5


def test_extract_archive_interrupted_is_redone(tmp_path, monkeypatch):
    make_tree(tmp_path / "src" / "test", per_class=2)
    archive = make_archive(tmp_path / "test.tar.gz", tmp_path / "src")
    dest = tmp_path / "cache"
    real = data._extract_all

    def interrupted(tar, where):
        real(tar, where)
        raise KeyboardInterrupt

    monkeypatch.setattr(data, "_extract_all", interrupted)
    with pytest.raises(KeyboardInterrupt):
        extract_archive(archive, dest)
    assert not (dest / "test").exists()  # nothing half-done in place
    assert not list(dest.glob("*.partial"))
    monkeypatch.setattr(data, "_extract_all", real)

    # a crash between moving entries in and writing the marker: the next call extracts again
    (dest / "test").mkdir()
    (dest / "test" / "stale.txt").write_text("x")
    extract_archive(archive, dest)
    assert not (dest / "test" / "stale.txt").exists()
    assert len(list((dest / "test").rglob("*.png"))) == 6


def test_extract_archive_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        extract_archive(tmp_path / "missing.tar.gz", tmp_path / "out")
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00 this is not gzip data")
    with pytest.raises(DataError, match="cannot extract"):
        extract_archive(bad, tmp_path / "out")
    assert not list((tmp_path / "out").iterdir()) or all(
        p.name == ".extract.lock" for p in (tmp_path / "out").iterdir()
    )
