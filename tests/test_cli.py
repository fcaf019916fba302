"""The `ghostify` command: the README's job end to end on a small user model, and one-line errors."""

import json

import pytest

from ghostify.cli import main


def run(capsys, *args):
    """Run the CLI in-process; return (exit code, stdout, stderr)."""
    try:
        main(list(args))
        code = 0
    except SystemExit as exit_:
        code = exit_.code or 0
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def spec(user_model_file):
    return f"{user_model_file}:tiny_net"


def test_convert_user_model_from_file(capsys, tmp_path, spec):
    out = tmp_path / "out"
    code, stdout, stderr = run(
        capsys,
        spec,
        "--mode",
        "c-ghost",
        "--ratio",
        "2",
        "--out",
        str(out),
        "--repeats",
        "3",
        "--json",
        str(tmp_path / "r.json"),
    )
    assert code == 0, stderr
    assert "params" in stdout and "MACs" in stdout and "latency" in stdout and "fewer" in stdout
    assert f"saved to {out}" in stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["after"]["macs"] < report["before"]["macs"]
    assert report["before"]["latency"]["median_ms"] > 0
    assert {"recipe.json", "model.safetensors", "report.json", "report.md"} <= {p.name for p in out.iterdir()}
    code, stdout, _ = run(capsys, "report", str(out), "--repeats", "2")
    assert code == 0 and "c-ghost" in stdout


def test_report_of_a_plain_model(capsys, spec):
    code, stdout, _ = run(capsys, "report", spec, "--no-latency")
    assert code == 0 and "params" in stdout and "MACs" in stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (["resnet5O"], "did you mean"),
        (["missing_file.py:net"], "missing_file.py"),
        (["{fixture}:nope"], "nope"),
        (["{fixture}:not_a_module"], "not_a_module"),
        (["{fixture}:tiny_net", "--ratio", "1"], "ratio must be an integer >= 2"),
        (["{fixture}:tiny_net", "--ratio", "2.5"], "ratio must be an integer >= 2"),
        (["{fixture}:tiny_net", "--ratio", "-2"], "ratio must be an integer >= 2"),
        (["{fixture}:tiny_net", "--ratio", "0"], "ratio must be an integer >= 2"),
        (["{fixture}:tiny_net", "--dw-size", "2"], "dw-size must be an odd integer"),
        (["{fixture}:tiny_net", "--dw-size", "0"], "dw-size must be an odd integer"),
        (["{fixture}:tiny_net", "--include", "nothing"], "no eligible site"),
        (["{fixture}:tiny_net", "--weights", "{tmp}/nope.pt"], "nope.pt"),
        (["{fixture}:tiny_net", "--input-size", "3,x"], "--input-size"),
        (["report", "{tmp}"], "not a ghostify output"),
    ],
)
def test_bad_input_is_one_line_no_traceback(capsys, tmp_path, user_model_file, args, message):
    args = [a.replace("{fixture}", str(user_model_file)).replace("{tmp}", str(tmp_path)) for a in args]
    code, stdout, stderr = run(capsys, *args, "--no-latency") if args[0] != "report" else run(capsys, *args)
    assert code == 1
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error:") and message in " ".join(lines)


def test_mismatched_weights_file(capsys, tmp_path, spec):
    import torch
    from torch import nn

    torch.save(nn.Linear(2, 2).state_dict(), tmp_path / "w.pt")
    code, _, stderr = run(capsys, spec, "--weights", str(tmp_path / "w.pt"), "--no-latency")
    assert code == 1 and "does not match" in stderr and "Traceback" not in stderr


def test_non_empty_out_refused_before_any_work(capsys, tmp_path, spec):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep")
    code, _, stderr = run(capsys, spec, "--out", str(out), "--no-latency")
    assert code == 1 and "--force" in stderr
    assert [p.name for p in out.iterdir()] == ["precious.txt"]


def test_help_shows_examples(capsys):
    code, stdout, _ = run(capsys, "--help")
    assert code == 0 and "ghostify resnet50 --mode c-ghost --ratio 2" in stdout


def test_debug_variable_brings_the_traceback_back(monkeypatch, spec):
    from ghostify.errors import ConfigError

    monkeypatch.setenv("GHOSTIFY_DEBUG", "1")
    with pytest.raises(ConfigError):
        main([spec, "--ratio", "1"])


@pytest.mark.parametrize("fmt, suffix", [("onnx", ".onnx"), ("exported-program", ".pt2")])
def test_export_command_writes_a_checked_file(capsys, tmp_path, spec, fmt, suffix):
    pytest.importorskip("onnxruntime") if fmt == "onnx" else None
    out = tmp_path / "out"
    code, _, stderr = run(capsys, spec, "--out", str(out), "--no-latency")
    assert code == 0, stderr
    code, stdout, stderr = run(capsys, "export", str(out), "--format", fmt)
    assert code == 0, stderr
    # rich wraps the line where the path ends, so compare with the line breaks taken out
    assert (out / f"model{suffix}").is_file() and "max |difference|" in " ".join(stdout.split())
    code, _, stderr = run(capsys, "export", str(out), "--format", "tflite")
    assert code == 1 and "choose one of onnx, exported-program" in stderr


def test_auto_mode_saves_its_decisions_for_replay(capsys, tmp_path, spec, monkeypatch):
    import ghostify

    monkeypatch.setenv("GHOSTIFY_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "out"
    code, stdout, stderr = run(capsys, spec, "--mode", "auto", "--out", str(out), "--repeats", "2")
    assert code == 0, stderr
    assert "latency selection" in stdout
    decided = json.loads((out / "recipe.json").read_text())["convert"]["decided"]
    assert set(decided) == {"layer1.0", "block.conv1", "block.conv2", "layer2.0"}
    import torch

    assert ghostify.load(out)(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
