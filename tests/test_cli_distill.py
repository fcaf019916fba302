"""`ghostify MODEL --data DIR` and `ghostify distill OUT`: the whole job, resume after kill -9, torchrun."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

import ghostify
from ghostify.cli import main
from ghostify.distill.checkpoint import STATE_FILE

FAST = ["--calib-batches", "1", "--batch-size", "4", "--workers", "0", "--no-latency"]


def run(capsys, *args):
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exit_:
        code = exit_.code or 0
    out, err = capsys.readouterr()
    return code, out, err


def _images(folder, classes=("cat", "dog"), per_class=8, size=32):
    for c, name in enumerate(classes):
        (folder / name).mkdir(parents=True)
        for i in range(per_class):
            colour = (40 * c + 5 * i, 200 - 30 * c, 10 * i)
            Image.new("RGB", (size, size), colour).save(folder / name / f"{i}.jpg")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    _images(root / "train")
    _images(root / "val", per_class=4)
    return root


@pytest.fixture
def spec(user_model_file):
    return f"{user_model_file}:tiny_net"


def test_convert_with_data_does_the_whole_job(capsys, tmp_path, spec, data):
    out = tmp_path / "out"
    code, stdout, stderr = run(
        capsys, spec, "--num-classes", 2, "--data", data, "--out", out, "--steps", 2, "--blockwise-steps", 2,
        *FAST,
    )  # fmt: skip
    assert code == 0, stderr
    report = json.loads((out / "report.json").read_text())
    assert set(report["accuracy"]) == {"original", "converted", "calibrated", "block-wise", "distilled"}
    assert "top-1" in stdout and "distilled in" in stdout
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["history"][-1]["step"] == "distill"
    assert recipe["history"][-1]["steps"] == {"blockwise": 2, "end-to-end": 2}
    assert json.loads((out / "history.json").read_text())["evals"]
    assert (out / "history.png").read_bytes()[:4] == b"\x89PNG"
    model = ghostify.load(out)
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 2)


def test_distill_subcommand_continues_a_saved_model(capsys, tmp_path, spec, data, user_model_file):
    import importlib.util

    module_spec = importlib.util.spec_from_file_location("user_model", user_model_file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    weights = tmp_path / "teacher.pt"
    torch.save(module.tiny_net(num_classes=2).state_dict(), weights)
    out = tmp_path / "out"
    code, _, stderr = run(
        capsys, spec, "--num-classes", 2, "--weights", weights, "--out", out, "--no-latency"
    )
    assert code == 0, stderr
    code, _, stderr = run(
        capsys, "distill", out, "--data", data, "--steps", 1, "--blockwise-steps", 0, "--teacher-steps", 1,
        *FAST,
    )  # fmt: skip
    assert code == 0, stderr
    accuracy = json.loads((out / "report.json").read_text())["accuracy"]
    assert {"original", "original, adapted", "distilled"} <= set(accuracy)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "{tmp}/missing"], "data folder .*missing does not exist"),
        (["--num-classes", "10", "--data", "{data}"], "has 2 classes but the model outputs 10"),
        (["--num-classes", "2", "--data", "{data}", "--batch-size", "64"], "batch size 64 is larger"),
        (["--num-classes", "2", "--data", "{data}", "--optimizer", "lion"], "optimizer must be one of"),
        (["--num-classes", "2", "--data", "{data}", "--blockwise-inputs", "x"], "choose student or teacher"),
        (["--num-classes", "2", "--resume"], "--resume continues a distillation run: give --data"),
    ],
)
def test_bad_input_is_one_line(capsys, tmp_path, spec, data, args, message):
    import re

    args = [a.format(tmp=tmp_path, data=data) for a in args]
    base = ["--out", tmp_path / "out", "--workers", "0", "--no-latency"]
    code, _, stderr = run(
        capsys, spec, *base, *(["--batch-size", "4"] if "--batch-size" not in args else []), *args
    )
    assert code == 1
    assert stderr.startswith("error:") and "Traceback" not in stderr
    assert re.search(message, " ".join(stderr.split())), stderr


def test_no_val_split_distils_without_accuracy(capsys, tmp_path, spec):
    root = tmp_path / "data"
    _images(root / "train")
    code, _, stderr = run(
        capsys, spec, "--num-classes", 2, "--data", root, "--out", tmp_path / "out", "--steps", 1,
        "--blockwise-steps", 0, *FAST,
    )  # fmt: skip
    assert code == 0, stderr
    assert "no val/ or test/ split" in " ".join(stderr.split())
    assert json.loads((tmp_path / "out" / "report.json").read_text())["accuracy"] == {}


def test_unlabelled_data_with_teacher_adaptation_fails_before_converting(capsys, tmp_path, spec):
    root = tmp_path / "data" / "train"
    root.mkdir(parents=True)
    for i in range(8):
        Image.new("RGB", (32, 32), (10 * i, 50, 90)).save(root / f"{i}.jpg")
    out = tmp_path / "out"
    code, _, stderr = run(
        capsys, spec, "--num-classes", 2, "--data", root.parent, "--out", out, "--teacher-steps", 1, *FAST
    )
    assert code == 1 and "Traceback" not in stderr
    assert "--teacher-epochs 0 or labelled data" in " ".join(stderr.split())
    assert not out.exists()  # refused before the conversion was written


def test_distill_refuses_a_model_converted_without_weights(capsys, tmp_path, spec, data):
    out = tmp_path / "out"
    run(capsys, spec, "--num-classes", 2, "--weights", "none", "--out", out, "--no-latency")
    code, _, stderr = run(capsys, "distill", out, "--data", data)
    assert code == 1 and "--teacher-weights" in stderr


def test_resume_refuses_other_options(capsys, tmp_path, spec, data):
    out = tmp_path / "out"
    code, _, _ = run(
        capsys, spec, "--num-classes", 2, "--data", data, "--out", out, "--steps", 1, "--blockwise-steps", 0,
        *FAST,
    )  # fmt: skip
    assert code == 0
    code, _, stderr = run(
        capsys, spec, "--ratio", 4, "--num-classes", 2, "--data", data, "--out", out, "--resume", *FAST
    )
    assert code == 1 and "another conversion options" in " ".join(stderr.split())


def _cli(*args):
    return [sys.executable, "-m", "ghostify.cli", *map(str, args)]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "GHOSTIFY_OFFLINE": "1"}


@pytest.mark.slow
def test_kill_9_then_resume_reaches_the_same_step(tmp_path, spec, data):
    out = tmp_path / "out"
    args = [spec, "--num-classes", 2, "--data", data, "--out", out, "--steps", 400, "--blockwise-steps", 0,
            "--checkpoint-every", 5, *FAST]  # fmt: skip
    proc = subprocess.Popen(_cli(*args), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            if (out / STATE_FILE).exists() and torch.load(out / STATE_FILE, weights_only=False)["step"] >= 10:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    killed_at = torch.load(out / STATE_FILE, weights_only=False)["step"]
    assert 10 <= killed_at < 400
    assert ghostify.load(out)(torch.zeros(1, 3, 32, 32)).shape == (1, 2)  # loadable mid-run
    done = subprocess.run(_cli(*args, "--resume"), env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    state = torch.load(out / STATE_FILE, weights_only=False)
    assert state["steps"]["end-to-end"] == 400 and "end-to-end" in state["done"]
    steps = [r["step"] for r in json.loads((out / "history.json").read_text())["steps"]]
    assert steps == sorted(set(steps)) and steps[-1] == 400
    assert ghostify.load(out)(torch.zeros(1, 3, 32, 32)).shape == (1, 2)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_processes_on_cpu(tmp_path, spec, data):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(_free_port()), "-m", "ghostify.cli", spec, "--num-classes", 2, "--data", data, "--out", out,
           "--steps", 3, "--blockwise-steps", 2, "--teacher-steps", 1, "--checkpoint-every", 2,
           *FAST]  # fmt: skip
    done = subprocess.run(list(map(str, cmd)), env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("distilled in") == 1  # rank 0 alone reports
    state = torch.load(out / STATE_FILE, weights_only=False)
    assert state["fingerprint"]["world_size"] == 2 and state["steps"] == {
        "teacher": 1, "blockwise": 2, "end-to-end": 3
    }  # fmt: skip
    assert ghostify.load(out)(torch.zeros(1, 3, 32, 32)).shape == (1, 2)
