"""ghostify.distill: the phases learn, checkpoints resume to the same step, bad runs stop cleanly."""

import copy
import importlib.util

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import ghostify
from ghostify.config import ConvertConfig
from ghostify.distill import DistillConfig, DistillData, refresh_bn_stats
from ghostify.distill.blocks import TeacherTaps, find_blocks, student_inputs
from ghostify.distill.checkpoint import STATE_FILE
from ghostify.errors import ConfigError, DataError, FormatError, TrainingError
from ghostify.rewrite import convert_model


def _tiny_net(user_model_file):
    spec = importlib.util.spec_from_file_location("user_model", user_model_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    net = module.tiny_net().eval()
    with torch.no_grad():
        net.fc.weight.mul_(30)  # confident logits: a KD signal worth learning from
    refresh_bn_stats(
        net, [_data().train.dataset.tensors[0]]
    )  # BN statistics that fit the data, as if trained
    return net


@pytest.fixture
def teacher(user_model_file):
    return _tiny_net(user_model_file)


def _data(n=64, labels=True, batch=16):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (n,), generator=g) if labels else torch.full((n,), -1)
    return DistillData(
        DataLoader(TensorDataset(x, y), batch_size=batch), DataLoader(TensorDataset(x, y), batch)
    )


def _config(**kw):
    base = dict(
        epochs=1,
        blockwise_epochs=1,
        batch_size=16,
        calib_batches=1,
        workers=0,
        checkpoint_every=2,
        log_every=1,
    )
    return DistillConfig(**{**base, **kw})


def _converted(teacher, mode="c-ghost"):
    return convert_model(teacher, ConvertConfig(mode=mode, ratio=2), example_inputs=torch.randn(2, 3, 32, 32))


def test_blocks_pair_every_converted_site(teacher):
    result = _converted(teacher)
    blocks = find_blocks(result.model, teacher, result)
    assert [b.name for b in blocks] == [s.name for s in result.sites]
    assert all(b.teacher_in is teacher.get_submodule(b.name) for b in blocks)


def test_all_phases_run(teacher):
    result = _converted(teacher)
    out = ghostify.distill(result, teacher, _data(), _config(steps=2, blockwise_steps=2), progress=False)
    assert out.steps == {"blockwise": 2, "end-to-end": 2}
    assert set(out.accuracy) == {"teacher", "converted", "calibrated", "blockwise", "distilled"}
    assert out.calibration is not None and out.calibration.refitted == len(result.sites)
    assert not out.model.training


def _first_last(out, phase, part):
    records = [r for r in out.history.records() if r.phase == phase]
    return records[0].parts[part], records[-1].parts[part]


@pytest.mark.parametrize("inputs", ["student", "teacher"])
def test_blockwise_learns(teacher, inputs):
    result = _converted(teacher)
    config = _config(
        calib_batches=0,
        blockwise_steps=8,
        steps=0,
        blockwise_lr=1e-2,
        warmup_fraction=0,
        blockwise_inputs=inputs,
    )
    first, last = _first_last(
        ghostify.distill(result, teacher, _data(), config, progress=False), "blockwise", "mse"
    )
    assert last < 0.9 * first


def test_student_inputs_are_what_the_student_feeds_each_block(teacher):
    result = _converted(teacher)
    blocks = find_blocks(result.model, teacher, result)
    x = _data().train.dataset.tensors[0][:8]
    with torch.no_grad(), TeacherTaps(blocks) as taps, student_inputs(blocks) as seen:
        teacher(x)
        result.model.eval()(x)
        teacher_inputs = dict(taps.inputs)  # the taps forget them on exit
    first, last = blocks[0].name, blocks[-1].name
    assert torch.equal(seen[first], teacher_inputs[first])  # the unconverted stem feeds both alike
    assert not torch.allclose(seen[last], teacher_inputs[last])  # the converted blocks before it differ


def test_end_to_end_learns(teacher):
    naive = convert_model(teacher, ConvertConfig(ratio=2, weight_init="random"))
    config = _config(calib_batches=0, blockwise_steps=0, steps=8, ce_weight=0.0, optimizer="adamw")
    first, last = _first_last(
        ghostify.distill(naive, teacher, _data(), config, progress=False), "end-to-end", "kd"
    )
    assert last < 0.9 * first


def test_teacher_is_not_changed(teacher):
    before = copy.deepcopy(teacher.state_dict())
    ghostify.distill(
        _converted(teacher), teacher, _data(), _config(steps=2, blockwise_steps=2), progress=False
    )
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert all(p.requires_grad for p in teacher.parameters())


def test_g_ghost_and_feature_loss(user_model_file):
    import sys

    sys.path.insert(0, str(user_model_file.parents[2] / "examples"))
    from cifar_resnet import resnet20

    teacher = resnet20().eval()
    result = _converted(teacher, "g-ghost")
    out = ghostify.distill(
        result, teacher, _data(32), _config(steps=2, blockwise_steps=2, feature_weight=1.0), progress=False
    )
    assert [b.kind for b in find_blocks(result.model, teacher, result)] == ["g-ghost"] * 3
    assert "feature" in out.history.records()[-1].parts


def test_unlabelled_data_trains_without_cross_entropy(teacher):
    data = _data(labels=False)
    data.val = None
    out = ghostify.distill(
        _converted(teacher), teacher, data, _config(steps=2, blockwise_steps=0), progress=False
    )
    assert "ce" not in out.history.records()[-1].parts
    assert out.accuracy == {}
    assert any("no validation split" in note for note in out.notes)


def test_bare_module_skips_site_phases(teacher):
    student = copy.deepcopy(teacher)
    out = ghostify.distill(student, teacher, _data(), _config(steps=2), progress=False)
    assert out.steps == {"end-to-end": 2}


def _crash_at_loss(monkeypatch, n):
    """Interrupt the run (as Ctrl-C would) on its n-th loss computation, counted across gradient phases."""
    from ghostify.distill import trainer

    real, calls = trainer.distill_loss, {"n": 0}

    def crashing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "distill_loss", crashing)
    return lambda: monkeypatch.setattr(trainer, "distill_loss", real)


def test_checkpoints_resume_to_the_same_step(teacher, tmp_path, monkeypatch):
    result = _converted(teacher)
    config = _config(steps=6, blockwise_steps=4)
    restore = _crash_at_loss(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        ghostify.distill(result, teacher, _data(), config, out_dir=tmp_path, progress=False)
    state = torch.load(tmp_path / STATE_FILE, weights_only=False)
    assert (state["phase"], state["step"]) == ("end-to-end", 2)
    restore()

    fresh = _converted(teacher)  # a new process would rebuild the student from the saved folder
    out = ghostify.distill(fresh, teacher, _data(), config, out_dir=tmp_path, resume=True, progress=False)
    assert out.steps == {"blockwise": 4, "end-to-end": 6}
    steps = [r.step for r in out.history.records() if r.phase == "end-to-end"]
    assert steps == sorted(steps) and steps[-1] == 4 + 6
    assert (tmp_path / "history.png").read_bytes()[:4] == b"\x89PNG"


def test_resume_refuses_another_run(teacher, tmp_path):
    result = _converted(teacher)
    ghostify.distill(
        result, teacher, _data(), _config(steps=2, blockwise_steps=0), out_dir=tmp_path, progress=False
    )
    with pytest.raises(FormatError, match="from another run: --steps 2 \\(this run: 3\\)"):
        ghostify.distill(
            _converted(teacher), teacher, _data(), _config(steps=3, blockwise_steps=0), out_dir=tmp_path,
            resume=True, progress=False,
        )  # fmt: skip
    with pytest.raises(FormatError, match="a different model"):
        ghostify.distill(
            copy.deepcopy(teacher), teacher, _data(), _config(steps=2, blockwise_steps=0), out_dir=tmp_path,
            resume=True, progress=False,
        )  # fmt: skip


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_checkpoint(teacher, tmp_path, monkeypatch):
    from ghostify.distill import trainer

    real = trainer.distill_loss
    calls = {"n": 0}

    def nan_at_step_3(*args, **kwargs):
        calls["n"] += 1
        loss, parts = real(*args, **kwargs)
        return (loss * float("nan") if calls["n"] == 3 else loss), parts

    monkeypatch.setattr(trainer, "distill_loss", nan_at_step_3)
    config = _config(steps=6, blockwise_steps=0)
    with pytest.raises(TrainingError, match="NaN/inf at end-to-end step 3.*step 2 of end-to-end.*--resume"):
        ghostify.distill(_converted(teacher), teacher, _data(), config, out_dir=tmp_path, progress=False)
    state = torch.load(tmp_path / STATE_FILE, weights_only=False)
    assert state["step"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_batch_larger_than_data(teacher):
    with pytest.raises(DataError, match="batch size 128 is larger than the 64"):
        ghostify.distill(_converted(teacher), teacher, _data(), _config(batch_size=128), progress=False)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"optimizer": "lion"}, "optimizer must be one of"),
        ({"epochs": -1}, "--epochs must be >= 0"),
        ({"kd_weight": 0, "ce_weight": 0}, "nothing to train on"),
        ({"warmup_fraction": 1.5}, "warmup_fraction"),
        ({"blockwise_inputs": "both"}, "--blockwise-inputs"),
    ],
)
def test_bad_options(options, message):
    with pytest.raises(ConfigError, match=message):
        DistillConfig(**options)


class _Holes(torch.utils.data.Dataset):
    """Eight labelled images; the ones at `holes` are unreadable (None, as ghostify's folders give)."""

    def __init__(self, holes):
        g = torch.Generator().manual_seed(0)
        self.x, self.y, self.holes = torch.randn(8, 3, 32, 32, generator=g), torch.arange(8) % 10, holes

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return None if i in self.holes else (self.x[i], self.y[i])


def test_an_unreadable_batch_is_a_step_without_an_update(teacher):
    from ghostify.data import _SkippingLoader, collate_skip_none

    loader = _SkippingLoader(_Holes({5}), batch_size=1, collate_fn=collate_skip_none)
    assert len(list(loader)) == 7  # a plain pass drops it
    loader.keep_gaps = True
    assert [b is None for b in loader].count(True) == 1  # the trainer keeps its place
    data = DistillData(loader, DataLoader(TensorDataset(loader.dataset.x, loader.dataset.y), 4))
    config = _config(steps=8, blockwise_epochs=0, calib_batches=0, batch_size=1)
    out = ghostify.distill(_converted(teacher), teacher, data, config, progress=False)
    # one epoch of eight positions: eight steps, seven updates; before, the gap shifted every later batch
    assert out.steps == {"end-to-end": 8}
    assert len([r for r in out.history.records() if r.phase == "end-to-end"]) == 7


def test_teacher_adaptation_fits_the_labels_and_leaves_the_given_teacher(teacher):
    before = copy.deepcopy(teacher.state_dict())
    config = _config(teacher_steps=8, steps=2, blockwise_steps=0, calib_batches=0, warmup_fraction=0)
    out = ghostify.distill(_converted(teacher), teacher, _data(), config, progress=False)
    assert out.steps == {"teacher": 8, "end-to-end": 2}
    first, last = _first_last(out, "teacher", "ce")
    assert last < 0.9 * first  # the labels are random for this teacher: it has everything to learn
    assert out.accuracy["teacher-adapted"].top1 > out.accuracy["teacher"].top1
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    steps = [r.step for r in out.history.records()]
    assert steps == sorted(steps) and steps[-1] == 8 + 2  # one step axis: teacher first


def test_adapted_teacher_survives_a_resume(teacher, tmp_path, monkeypatch):
    config = _config(teacher_steps=4, steps=4, blockwise_steps=0, calib_batches=0)
    uninterrupted = ghostify.distill(_converted(teacher), teacher, _data(), config, progress=False)

    restore = _crash_at_loss(monkeypatch, 6)  # 4 teacher steps, then the end-to-end phase's second
    with pytest.raises(KeyboardInterrupt):
        ghostify.distill(_converted(teacher), teacher, _data(), config, out_dir=tmp_path, progress=False)
    restore()
    state = torch.load(tmp_path / STATE_FILE, weights_only=False)
    assert "teacher" in state["done"] and state["teacher"] is not None
    resumed = ghostify.distill(
        _converted(teacher), teacher, _data(), config, out_dir=tmp_path, resume=True, progress=False
    )
    assert resumed.steps == {"teacher": 4, "end-to-end": 4}
    # the second half learnt from the adapted teacher, as the uninterrupted run did
    assert resumed.accuracy["distilled"].top1 == pytest.approx(uninterrupted.accuracy["distilled"].top1)
    assert "teacher-adapted" in resumed.accuracy


def test_teacher_adaptation_needs_labels(teacher, tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_data import make_flat

    from ghostify.data import build_train_loader

    train = build_train_loader(make_flat(tmp_path, n=4), input_size=(3, 32, 32), batch_size=2, workers=0)
    with pytest.raises(ConfigError, match="--teacher-epochs 0 or labelled data"):
        config = _config(teacher_steps=1, batch_size=2)
        ghostify.distill(_converted(teacher), teacher, DistillData(train), config)
