"""Data loading: ImageFolder trees, unreadable images, error messages, archive extraction."""

from __future__ import annotations

import io
import os
import re
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from ghostify import data
from ghostify.data import (
    SeededItems,
    build_eval_loader,
    build_train_loader,
    check_num_classes,
    data_config,
    extract_archive,
    find_split,
    loader_classes,
    parse_floats,
    set_epoch,
    skipped_images,
)
from ghostify.errors import ConfigError, DataError
from ghostify.models import LoadedModel

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


def make_flat(folder: Path, n: int = 6, size: int = 8) -> Path:
    """folder/<i>.png, no class subfolders."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (size, size), (10 * i,) * 3).save(folder / f"{i}.png")
    return folder


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
    same = build_train_loader(tmp_path, (3, 32, 32), MEAN, STD, batch_size=8, workers=0, limit=12, seed=1)
    other = build_train_loader(tmp_path, (3, 32, 32), MEAN, STD, batch_size=8, workers=0, limit=12, seed=2)
    assert same.dataset.indices == loader.dataset.indices != other.dataset.indices
    big = build_train_loader(tmp_path, (3, 96, 96), MEAN, STD, batch_size=8, workers=0)
    assert type(big.dataset.transform.transforms[0]).__name__ == "RandomResizedCrop"


def test_seeded_items_fix_the_augmentation_per_epoch_and_image(tmp_path):
    g = torch.Generator().manual_seed(0)
    (tmp_path / "train" / "cat").mkdir(parents=True)
    for i in range(4):  # noise, so that every crop offset and flip gives other pixels
        pixels = torch.randint(0, 256, (32, 32, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(tmp_path / "train" / "cat" / f"{i}.png")
    dataset = build_train_loader(tmp_path, (3, 32, 32), MEAN, STD, batch_size=2, workers=0).dataset
    epoch0 = SeededItems(dataset, seed=0, epoch=0)
    torch.manual_seed(1)
    first = epoch0[3][0]
    torch.manual_seed(2)
    assert torch.equal(epoch0[3][0], first)  # whatever the caller's random state (or worker) was
    assert not torch.equal(SeededItems(dataset, seed=0, epoch=1)[3][0], first)  # a new epoch, a new crop
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    epoch0[0]
    assert torch.equal(torch.rand(3), expected)  # the caller's random state is left as it was
    assert skipped_images(SeededItems(dataset, 0, 0)) == 0 and len(epoch0) == 4


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


# ---------------------------------------------------------------------------------- unlabelled folders


@pytest.mark.parametrize("layout", ["root/train", "flat"])
def test_train_loader_reads_a_folder_without_classes_as_unlabelled(tmp_path, layout):
    folder = make_flat(tmp_path / "train" if layout == "root/train" else tmp_path, n=5)
    loader = build_train_loader(tmp_path, (3, 8, 8), MEAN, STD, batch_size=2, workers=0)
    x, y = all_batches(loader)
    assert x.shape == (5, 3, 8, 8)
    assert y.dtype == torch.long and y.tolist() == [-1] * 5
    assert loader_classes(loader) is None
    assert Path(loader.dataset.root) == folder
    limited = build_train_loader(tmp_path, (3, 8, 8), MEAN, STD, batch_size=2, workers=0, limit=3)
    assert loader_classes(limited) is None and len(limited.dataset) == 3


def test_loader_classes_of_labelled_data(tmp_path):
    make_tree(tmp_path, per_class=2, size=8)
    (tmp_path / ".ipynb_checkpoints").mkdir()  # hidden folders are not classes
    make_flat(tmp_path, n=2)  # images beside class folders are ignored
    loader = build_train_loader(tmp_path, (3, 8, 8), MEAN, STD, batch_size=2, workers=0, limit=4)
    assert loader_classes(loader) == list(CLASSES)
    assert loader_classes(loader.dataset) == list(CLASSES)
    assert len(build_eval_loader(tmp_path, (3, 8, 8), MEAN, STD, workers=0).dataset) == 6
    distributed = build_train_loader(tmp_path, (3, 8, 8), MEAN, STD, batch_size=2, workers=0, world_size=2)
    assert loader_classes(distributed) == list(CLASSES)


def test_eval_loader_refuses_unlabelled_data(tmp_path):
    make_flat(tmp_path / "val")
    with pytest.raises(
        DataError, match=r"no class subfolders, and accuracy needs labels: lay it out as .*/val/<class>"
    ):
        build_eval_loader(tmp_path, (3, 8, 8), MEAN, STD)


def test_training_error_messages_offer_the_unlabelled_layout(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(
        DataError, match=r"train is empty; .*<class>/<image> \(or .*train/<image> to distil without"
    ):
        build_train_loader(tmp_path, (3, 8, 8), MEAN, STD)
    (tmp_path / "train").rmdir()
    make_tree(tmp_path / "val", per_class=1, size=8)
    with pytest.raises(
        DataError, match=r"holds the splits val but none of train; add .*train/<class>/<image>"
    ):
        build_train_loader(tmp_path, (3, 8, 8), MEAN, STD)


# --------------------------------------------------------------------------------------- distributed


def test_distributed_shards_cover_the_data_once(tmp_path):
    make_flat(tmp_path, n=10)
    loaders = [
        build_train_loader(tmp_path, (3, 8, 8), MEAN, STD, batch_size=5, workers=0, world_size=2, rank=r)
        for r in (0, 1)
    ]
    shards = [list(loader.sampler) for loader in loaders]
    assert sorted(shards[0] + shards[1]) == list(range(10))
    sampler = loaders[0].sampler
    assert isinstance(sampler, torch.utils.data.DistributedSampler)
    assert (sampler.num_replicas, sampler.rank, sampler.shuffle) == (2, 0, True)
    set_epoch(loaders[0], 1)
    assert sampler.epoch == 1 and list(sampler) != shards[0]
    assert all_batches(loaders[1])[0].shape == (5, 3, 8, 8)


def test_drop_last(tmp_path):
    make_flat(tmp_path, n=7)
    single = build_train_loader(tmp_path, (3, 8, 8), MEAN, STD, batch_size=3, workers=0, drop_last=True)
    assert [len(y) for _, y in single] == [3, 3]
    set_epoch(single, 1)  # a no-op without a DistributedSampler
    kept = build_train_loader(tmp_path, (3, 8, 8), MEAN, STD, batch_size=3, workers=0)
    assert [len(y) for _, y in kept] == [3, 3, 1]
    ranks = [
        build_train_loader(
            tmp_path, (3, 8, 8), MEAN, STD, batch_size=2, workers=0, world_size=2, rank=r, drop_last=True
        )
        for r in (0, 1)
    ]
    assert [len(r.sampler) for r in ranks] == [3, 3]  # the odd image out is dropped, not repeated
    assert [len(y) for _, y in ranks[0]] == [2]


def test_batch_size_larger_than_the_data(tmp_path):
    folder = make_flat(tmp_path / "train", n=6)
    with pytest.raises(DataError) as info:
        build_train_loader(tmp_path, (3, 8, 8), MEAN, STD, batch_size=256, workers=0)
    assert str(info.value) == (
        f"batch size 256 is larger than the 6 images in {folder}; use --batch-size 6 or fewer."
    )
    build_train_loader(tmp_path, (3, 8, 8), MEAN, STD, batch_size=6, workers=0)  # equal is fine
    with pytest.raises(
        DataError, match=r"than the 4 images in .*train \(limited to 4\); use --batch-size 4 or fewer"
    ):
        build_train_loader(tmp_path, (3, 8, 8), MEAN, STD, batch_size=5, workers=0, limit=4)
    with pytest.raises(
        DataError,
        match=r"than the 3 images each of the 2 processes gets from .* \(6 in all\); use --batch-size 3",
    ):
        build_train_loader(tmp_path, (3, 8, 8), MEAN, STD, batch_size=4, workers=0, world_size=2, rank=1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, "batch size must be at least 1"),
        ({"world_size": 2, "rank": 2}, "rank 2 is not in 0..1"),
    ],
)
def test_bad_loader_arguments(tmp_path, kwargs, match):
    make_flat(tmp_path)
    with pytest.raises(ConfigError, match=match):
        build_train_loader(tmp_path, (3, 8, 8), MEAN, STD, workers=0, **kwargs)


# ------------------------------------------------------------------------------------ worker crashes


def _exit_in_worker(image):
    if torch.utils.data.get_worker_info() is not None:
        os._exit(3)
    return image


def _raise(image):
    raise ValueError("boom")


def test_crashed_worker_becomes_a_data_error(tmp_path):
    make_flat(tmp_path, n=2)
    loader = build_train_loader(tmp_path, (3, 8, 8), MEAN, STD, batch_size=2, workers=1)
    loader.dataset.transform = _exit_in_worker
    with pytest.raises(DataError) as info:
        list(loader)
    message = str(info.value)
    assert re.match(r"a data-loading worker crashed \(worker \(pid.*\) exited unexpectedly", message)
    assert message.endswith("rerun with --workers 0 to see the failing image, or lower --workers.")


def test_raising_worker_becomes_a_data_error_but_not_in_process(tmp_path):
    make_flat(tmp_path, n=2)
    loader = build_train_loader(tmp_path, (3, 8, 8), MEAN, STD, batch_size=2, workers=1)
    loader.dataset.transform = _raise
    with pytest.raises(
        DataError, match=r"worker crashed \(it raised ValueError: boom\); rerun with --workers 0"
    ):
        list(loader)
    loader = build_train_loader(tmp_path, (3, 8, 8), MEAN, STD, batch_size=2, workers=0)
    loader.dataset.transform = _raise
    with pytest.raises(ValueError, match="^boom$"):  # in-process: the real error and its traceback
        list(loader)


def test_worker_failure_reasons():
    killed = RuntimeError(
        "DataLoader worker (pid 4242) is killed by signal: Bus error. It is possible that dataloader's "
        "workers are out of shared memory. Please try to raise your shared memory limit."
    )
    assert data._worker_failure(killed) == (
        "worker (pid 4242) is killed by signal: Bus error, possibly out of shared memory"
    )
    gone = RuntimeError("DataLoader worker (pid(s) 11, 12) exited unexpectedly")
    assert data._worker_failure(gone) == "worker (pid(s) 11, 12) exited unexpectedly"
    assert data._worker_failure(RuntimeError("CUDA out of memory")) is None


# ------------------------------------------------------------------------------------- class counts


def test_check_num_classes(tmp_path):
    make_tree(tmp_path / "labelled", per_class=1, size=8)
    labelled = build_train_loader(tmp_path / "labelled", (3, 8, 8), MEAN, STD, batch_size=1, workers=0)
    check_num_classes(labelled, 3)
    check_num_classes(labelled, None)  # unknown head: nothing to compare
    with pytest.raises(DataError) as info:
        check_num_classes(labelled, 1000)
    assert str(info.value) == (
        f"{tmp_path / 'labelled'} has 3 classes but the model outputs 1000; give a model with a 3-class head "
        "(--num-classes 3 with --weights FILE), or pass a folder without class subfolders to distil without "
        "labels."
    )
    unlabelled = build_train_loader(
        make_flat(tmp_path / "flat"), (3, 8, 8), MEAN, STD, batch_size=1, workers=0
    )
    check_num_classes(unlabelled, 1000)


# ------------------------------------------------------------------------------------- data config


def loaded(**kwargs):
    fields = {
        "model": torch.nn.Identity(),
        "spec": "x",
        "source": "timm",
        "name": "x",
        "weights": "none",
        "input_size": (3, 256, 256),
        "num_classes": 10,
        **kwargs,
    }
    return LoadedModel(**fields)


def test_data_config_prefers_explicit_values():
    model = loaded(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    assert data_config(model) == ((3, 256, 256), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    assert data_config(model, input_size=(3, 32, 32), mean=(0.5, 0.5, 0.5), std=[0.25]) == (
        (3, 32, 32),
        (0.5, 0.5, 0.5),
        (0.25,),
    )
    assert data_config(loaded()) == ((3, 256, 256), data.IMAGENET_MEAN, data.IMAGENET_STD)
    assert data_config(None) == ((3, 224, 224), data.IMAGENET_MEAN, data.IMAGENET_STD)
    size, mean, std = data_config(loaded(), input_size=(1, 28, 28))  # grayscale: the model's stats averaged
    assert size == (1, 28, 28) and len(mean) == len(std) == 1
    assert mean[0] == pytest.approx(sum(data.IMAGENET_MEAN) / 3)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mean": (0.5, 0.5)}, "--mean has 2 values but the input has 3 channels"),
        ({"std": (0.2, 0.0, 0.2)}, r"--std 0.2,0,0.2 is out of range: values must be above 0"),
        ({"mean": (123.7, 116.3, 103.5)}, r"on the \[0, 1\] pixel scale \(divide 0-255 values by 255\)"),
        ({"input_size": (4, 32, 32)}, "not C,H,W with 1 or 3 channels"),
        ({"input_size": (3, 0, 32)}, "positive sides"),
    ],
)
def test_data_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        data_config(loaded(), **kwargs)


def test_parse_floats():
    assert parse_floats("0.5,0.5,0.5") == (0.5, 0.5, 0.5)
    assert parse_floats(" 0.1 0.2, 0.3 ") == (0.1, 0.2, 0.3)
    for bad in ("", "a,b,c", "0.5,,nan"):
        with pytest.raises(ConfigError, match=r"--std .* is not a list of numbers; e.g. --std 0.485"):
            parse_floats(bad, "--std")


def test_grayscale_input(tmp_path):
    make_tree(tmp_path, per_class=1, size=8)
    size, mean, std = data_config(None, input_size=(1, 8, 8))
    x, _ = all_batches(build_eval_loader(tmp_path, size, mean, std, workers=0))
    assert x.shape == (3, 1, 8, 8)
