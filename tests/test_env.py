"""course_lib.env: one place that says what this machine can run."""
import pytest

from course_lib import env


def test_detect_reports_this_machine():
    e = env.detect()
    report = e.report()
    assert "torch" in report and "ORT providers" in report
    assert "TensorRT (tensorrt)" in report and "TensorRT for RTX (tensorrt_rtx)" in report
    assert "CPUExecutionProvider" in e.ort_providers
    if not e.has_gpu:
        assert "requires-gpu" in e.skipped_cells() and "requires-tensorrt" in e.skipped_cells()
        assert not e.has_tensorrt


def test_both_flavours_say_what_they_can_do_here():
    e = env.detect()
    rtx = dict(e.rows())["TensorRT for RTX (tensorrt_rtx)"]
    if e.tensorrt_rtx is None:
        assert rtx == "not installed (pip install tensorrt-rtx)"
    else:
        assert rtx.startswith(f"{e.tensorrt_rtx}; build: yes; run: needs a GPU of compute capability 8.0/8.6/8.9/12.0")
        assert "not Hopper" in rtx and e.has_trt_builder and "requires-trt-builder" not in e.skipped_cells()
    no_gpu = env.Environment("3.11", "2.13", False, None, None, None, tensorrt="10.13.3.9", onnxruntime=None,
                             tensorrt_rtx="1.7.1.116")
    assert no_gpu.has_trt_builder and not no_gpu.has_tensorrt
    assert dict(no_gpu.rows())["TensorRT (tensorrt)"] == ("10.13.3.9; build: no (needs a CUDA GPU); run: needs a CUDA "
                                                          "GPU of the compute capability the plan was built on -- no GPU here")
    hopper = env.Environment("3.11", "2.13", True, "NVIDIA H100 80GB HBM3", "90", "12.8", tensorrt=None,
                             onnxruntime=None, tensorrt_rtx="1.7.1.116")
    assert not hopper.has_tensorrt and hopper.has_trt_builder
    assert dict(hopper.rows())["TensorRT for RTX (tensorrt_rtx)"].endswith("NVIDIA H100 80GB HBM3 (sm_90): no")
    rtx3060 = env.Environment("3.11", "2.13", True, "NVIDIA GeForce RTX 3060", "86", "12.8", tensorrt=None,
                              onnxruntime=None, tensorrt_rtx="1.7.1.116")
    assert rtx3060.has_tensorrt and rtx3060.skipped_cells() == []
    nothing = env.Environment("3.11", "2.13", False, None, None, None, tensorrt=None, onnxruntime=None)
    assert nothing.skipped_cells() == ["requires-gpu", "requires-tensorrt", "requires-trt-builder"]


def test_require_names_what_to_install():
    with pytest.raises(env.MissingDependency, match=r"no_such_pkg_xyz is not installed for testing: install"):
        env.require("no_such_pkg_xyz", "testing")
    assert env.require("json").dumps([]) == "[]"


def test_require_tensorrt_message_is_one_sentence():
    if env.has_module("tensorrt"):
        pytest.skip("tensorrt is installed here")
    with pytest.raises(env.MissingDependency) as info:
        env.require("tensorrt", "building plans")
    assert "\n" not in str(info.value) and "tensorrt-cu13" in str(info.value)


def test_required_capabilities(monkeypatch):
    monkeypatch.setenv("COURSE_REQUIRE", " GPU, tensorrt ,")
    assert env.required_capabilities() == {"gpu", "tensorrt"}
    monkeypatch.delenv("COURSE_REQUIRE")
    assert env.required_capabilities() == set()
