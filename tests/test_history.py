"""ghostify.distill.history: averaged step records, resumable JSON, and the PNG plot."""

from __future__ import annotations

import json
import sys

import pytest

from ghostify.distill.history import History, StepRecord

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _log(history: History, phase: str, steps: range) -> None:
    """Log steps whose loss is the step number, so the averages are easy to check."""
    for step in steps:
        history.log_step(phase, step, step / 100, float(step), 0.1, 1000.0, kd=step / 2, ce=1.0)


def test_one_record_per_every_steps_averaged() -> None:
    history = History(every=4)
    _log(history, "blockwise", range(1, 9))  # two full windows: steps 1-4 and 5-8
    assert [(r.step, r.steps) for r in history.steps] == [(4, 4), (8, 4)]
    first = history.steps[0]
    assert first.loss == pytest.approx(2.5)  # mean of 1, 2, 3, 4
    assert first.parts == pytest.approx({"kd": 1.25, "ce": 1.0})
    assert first.epoch == pytest.approx(0.04)  # the window's last step
    assert first.images_per_s == pytest.approx(1000.0)


def test_phase_change_stores_the_last_steps_of_a_phase() -> None:
    history = History(every=10)
    _log(history, "blockwise", range(1, 4))
    assert history.steps == []  # window still open
    _log(history, "end-to-end", range(4, 6))
    assert [(r.phase, r.step, r.steps) for r in history.steps] == [("blockwise", 3, 3)]
    assert history.steps[0].loss == pytest.approx(2.0)
    # The open window shows in records() and last_step() without being stored.
    assert [(r.phase, r.step) for r in history.records()] == [("blockwise", 3), ("end-to-end", 5)]
    assert history.last_step("blockwise") == 3 and history.last_step("end-to-end") == 5
    assert history.last_step("final") is None


def test_parts_average_over_the_steps_that_logged_them() -> None:
    history = History(every=3)
    history.log_step("e2e", 1, 0.0, 1.0, 0.1, 10.0, kd=2.0)
    history.log_step("e2e", 2, 0.0, 1.0, 0.1, 10.0)
    history.log_step("e2e", 3, 0.0, 1.0, 0.1, 10.0, kd=4.0, mse=1.0)
    (record,) = history.steps
    assert record.parts == pytest.approx({"kd": 3.0, "mse": 1.0})


def test_step_going_back_is_refused() -> None:
    history = History()
    _log(history, "blockwise", range(1, 3))
    with pytest.raises(ValueError, match="step 2 logged after step 2"):
        history.log_step("blockwise", 2, 0.0, 1.0, 0.1, 10.0)
    with pytest.raises(ValueError, match="every"):
        History(every=0)


def test_round_trip_and_resume_match_an_uninterrupted_run() -> None:
    straight = History(every=4)
    _log(straight, "blockwise", range(1, 11))
    _log(straight, "end-to-end", range(11, 20))
    straight.log_eval("end-to-end", 19, "student", 70.0, 90.0, 500)

    interrupted = History(every=4)
    _log(interrupted, "blockwise", range(1, 11))
    _log(interrupted, "end-to-end", range(11, 14))  # stops mid-window
    data = json.loads(json.dumps(interrupted.to_dict()))
    # Readers of the JSON see the open window averaged, at the end.
    assert data["steps"][-1]["step"] == 13 and data["steps"][-1]["steps"] == 3
    resumed = History.from_dict(data)
    assert resumed.to_dict() == interrupted.to_dict()
    assert resumed.last_step("end-to-end") == 13
    _log(resumed, "end-to-end", range(14, 20))
    resumed.log_eval("end-to-end", 19, "student", 70.0, 90.0, 500)

    def rows(h: History) -> list[tuple]:
        return [(r.phase, r.step, r.steps, round(r.loss, 9), round(r.parts["kd"], 9)) for r in h.records()]

    assert rows(resumed) == rows(straight)
    assert resumed.evals == straight.evals
    assert all(isinstance(r, StepRecord) for r in resumed.steps)


def test_summary_keeps_the_latest_eval_per_phase_and_model() -> None:
    history = History()
    history.log_eval("converted", 0, "teacher", 76.1, 92.9, 1000)
    history.log_eval("converted", 0, "student", 10.0, 30.0, 1000)
    history.log_eval("end-to-end", 100, "student", 60.0, 85.0, 1000)
    history.log_eval("end-to-end", 200, "student", 65.0, 87.0, 1000)
    summary = history.summary()
    assert list(summary) == ["converted", "end-to-end"]
    assert summary["converted"]["teacher"]["top1"] == pytest.approx(76.1)
    assert summary["end-to-end"]["student"] == {"step": 200, "top1": 65.0, "top5": 87.0, "images": 1000}


def test_save_json_and_plot_write_files_atomically(tmp_path) -> None:
    history = History(every=5)
    history.log_eval("converted", 0, "teacher", 76.0, 93.0, 256)
    history.log_eval("converted", 0, "student", 5.0, 15.0, 256)
    _log(history, "blockwise", range(1, 23))
    history.log_eval("blockwise", 22, "student", 40.0, 70.0, 256)
    _log(history, "end-to-end", range(23, 40))
    history.log_eval("final", 39, "student", 70.0, 90.0, 256)

    folder = tmp_path / "run"
    history.save_json(folder / "history.json")
    history.save_json(folder / "history.json")  # overwriting works too
    history.plot(folder / "history.png")
    history.plot(folder / "history.png")
    assert sorted(p.name for p in folder.iterdir()) == ["history.json", "history.png"]
    assert (folder / "history.png").read_bytes().startswith(PNG_SIGNATURE)
    data = json.loads((folder / "history.json").read_text())
    assert History.from_dict(data).to_dict() == history.to_dict()
    assert len(data["steps"]) == 5 + 4  # 22 steps in windows of 5, then 17 more


def test_plot_without_evals_or_steps(tmp_path) -> None:
    history = History()
    history.plot(tmp_path / "empty.png")  # nothing logged yet
    _log(history, "end-to-end", range(1, 30))
    history.plot(tmp_path / "no_evals.png")
    for name in ("empty.png", "no_evals.png"):
        assert (tmp_path / name).read_bytes().startswith(PNG_SIGNATURE)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.png", "no_evals.png"]


def test_plot_says_when_there_is_no_val_split(tmp_path, monkeypatch) -> None:
    from matplotlib.figure import Figure

    texts: list[str] = []
    savefig = Figure.savefig

    def spy(fig: Figure, *args, **kwargs):
        texts.extend(t.get_text() for ax in fig.axes for t in ax.texts)
        return savefig(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    pyplot_before = "matplotlib.pyplot" in sys.modules
    history = History()
    _log(history, "end-to-end", range(1, 5))
    history.plot(tmp_path / "a.png")
    assert texts == ["no labelled val split"]
    history.log_eval("final", 4, "student", 50.0, 80.0, 100)
    texts.clear()
    history.plot(tmp_path / "a.png")
    assert texts == []
    assert ("matplotlib.pyplot" in sys.modules) == pyplot_before  # pyplot's global state never touched
