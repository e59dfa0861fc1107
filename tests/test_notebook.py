"""course_lib.notebook (the %%needs cell magic, every), course_lib.progress, and Netron on a free port."""
from __future__ import annotations

import dataclasses
import urllib.request

import pytest

from course_lib import notebook, progress
from course_lib.env import Environment

CPU = Environment(python="3.11", torch="2.13.0+cpu", cuda_available=False, gpu_name=None, compute_capability=None,
                  cuda_runtime=None, tensorrt=None, onnxruntime="1.22.0")
GPU_TRT = dataclasses.replace(CPU, cuda_available=True, gpu_name="NVIDIA H100", compute_capability="90",
                              tensorrt="10.13.3.9")


@pytest.fixture
def shell(monkeypatch):
    """An IPython shell with the extension loaded, on a machine that looks like ``shell.machine``."""
    from IPython.testing.globalipapp import get_ipython

    ip = get_ipython()                              # one test shell for the whole session
    ip.run_cell("%load_ext course_lib.notebook")
    machine = {"env": CPU}
    monkeypatch.setattr(notebook, "_environment", lambda: machine["env"])
    monkeypatch.delenv("COURSE_REQUIRE", raising=False)
    ip.machine = machine
    for name in ("ran", "value"):
        ip.user_ns.pop(name, None)
    return ip


def test_a_missing_need_prints_one_line_and_runs_nothing(shell, capsys):
    result = shell.run_cell("%%needs gpu tensorrt --see docs/benchmarks.md, \"Chapter 3\"\nran = True\n1 / 0")
    assert result.success and result.result is None and "ran" not in shell.user_ns
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out == (
        "Skipped: this cell needs a CUDA GPU and TensorRT; this machine has no CUDA GPU, TensorRT not installed. "
        "Not run (a GPU run's result: docs/benchmarks.md, \"Chapter 3\").\n")


def test_a_met_need_runs_the_body_in_the_notebook_namespace(shell, capsys):
    shell.machine["env"] = GPU_TRT
    result = shell.run_cell("%%needs gpu tensorrt\nran = True\nvalue = 20\nvalue + 1")
    assert result.success and result.result == 21 and shell.user_ns["ran"] is True
    assert "Skipped" not in capsys.readouterr().out


def test_errors_in_the_body_are_the_cells_own(shell, capsys):
    shell.machine["env"] = GPU_TRT
    result = shell.run_cell("%%needs gpu\nvalue = 1\nraise KeyError('boom')")
    assert not result.success and isinstance(result.error_in_exec, KeyError) and shell.user_ns["value"] == 1


def test_course_require_turns_the_skip_into_a_failure(shell, monkeypatch):
    monkeypatch.setenv("COURSE_REQUIRE", "tensorrt")            # demands a GPU too
    result = shell.run_cell("%%needs gpu\nran = True")
    assert isinstance(result.error_in_exec, notebook.MissingCapability) and "ran" not in shell.user_ns
    assert "COURSE_REQUIRE demands gpu" in str(result.error_in_exec)


@pytest.mark.parametrize("line, error", [("", "name what the cell needs"), ("gpus", "unknown need 'gpus'")])
def test_bad_needs_lines(line, error):
    with pytest.raises(ValueError, match=error):
        notebook.parse_needs(line)


def test_what_a_machine_lacks():
    assert notebook.lacking(["gpu", "tensorrt"], CPU) == {"gpu": "no CUDA GPU", "tensorrt": "TensorRT not installed"}
    no_gpu = dataclasses.replace(GPU_TRT, cuda_available=False, gpu_name=None, compute_capability=None)
    assert notebook.lacking(["tensorrt"], no_gpu) == {"tensorrt": "TensorRT 10.13.3.9 but no CUDA GPU to run it"}
    assert {"gpu", "tensorrt"} <= notebook.capabilities(GPU_TRT) and not {"gpu", "tensorrt"} & notebook.capabilities(CPU)


def test_trt_builder_is_tensorrt_for_rtx_on_a_cpu_and_tensorrt_implies_it(monkeypatch):
    rtx_cpu = dataclasses.replace(CPU, tensorrt_rtx="1.7.1.116")
    assert notebook.lacking(["trt-builder"], CPU) == {
        "trt-builder": "neither TensorRT nor TensorRT for RTX installed"}
    assert notebook.lacking(["trt-builder", "tensorrt"], rtx_cpu) == {
        "tensorrt": "TensorRT for RTX 1.7.1.116 but no CUDA GPU to run it"}
    assert notebook.capabilities(rtx_cpu) >= {"trt-builder"} and "trt-builder" in notebook.capabilities(GPU_TRT)
    monkeypatch.setenv("COURSE_REQUIRE", "tensorrt")
    assert notebook._demanded() == {"tensorrt", "gpu", "trt-builder"}


def test_the_needs_are_the_build_tools_capabilities():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("build_notebooks", Path(__file__).parents[1] / "tools" / "build_notebooks.py")
    bn = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bn)
    assert set(notebook.NEEDS) == set(bn.CAPABILITIES)
    assert notebook.IMPLIED == bn.IMPLIED
    assert {tag: capability for tag, (capability, _) in bn.HARDWARE_TAGS.items()} == {
        f"requires-{n}": n for n in notebook.NEEDS}


def test_every_does_not_pass_over_nothing():
    assert notebook.every([]) == "nothing to check" and notebook.every(x for x in {}.values()) == "nothing to check"
    assert notebook.every([1, True]) is True and notebook.every([True, 0]) is False


@pytest.mark.parametrize("value, expected", [("", "auto"), ("TEXT", "text"), ("off", "off")])
def test_progress_mode(monkeypatch, value, expected):
    monkeypatch.setenv("COURSE_PROGRESS", value)
    assert progress.mode() == expected


def test_progress_bars(monkeypatch, capsys):
    monkeypatch.setenv("COURSE_PROGRESS", "text")
    assert list(progress.tqdm(range(3), desc="steps")) == [0, 1, 2]
    assert "steps: 100%" in capsys.readouterr().err
    monkeypatch.setenv("COURSE_PROGRESS", "off")
    assert list(progress.tqdm(range(3), desc="steps")) == [0, 1, 2] and capsys.readouterr().err == ""
    monkeypatch.setenv("COURSE_PROGRESS", "widgets")
    with pytest.raises(ValueError, match="expected one of auto, text, off"):
        progress.tqdm(range(3))


def test_netron_serves_on_a_free_port_one_server_at_a_time(tmp_path, capsys):
    pytest.importorskip("netron", reason="netron is in the dev extra: pip install -e '.[dev]'")
    import torch

    from course_lib.onnx import graph
    from course_lib.onnx.export import export_onnx

    path = export_onnx(torch.nn.Linear(2, 2), {"x": torch.randn(1, 2)}, tmp_path / "net.onnx",
                       output_names=["y"], progress=False).path
    try:
        first = graph.show_in_netron(path)
        second = graph.show_in_netron(path, height=300)
        line = capsys.readouterr().out.splitlines()[-1]
        assert second.src.startswith("http://127.0.0.1:") and second.height == 300
        assert line.startswith(f"Netron shows net.onnx at {second.src} ") and "ssh -N -L" in line
        with urllib.request.urlopen(second.src, timeout=10) as page:
            assert page.status == 200 and b"netron" in page.read().lower()
        if first.src != second.src:                   # the first server was stopped
            with pytest.raises(OSError):
                urllib.request.urlopen(first.src, timeout=5)
    finally:
        graph.stop_netron()
    with pytest.raises(OSError):
        urllib.request.urlopen(second.src, timeout=5)
