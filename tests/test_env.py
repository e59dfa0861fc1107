"""course_lib.env: one place that says what this machine can run."""
import pytest

from course_lib import env


def test_detect_reports_this_machine():
    e = env.detect()
    report = e.report()
    assert "torch" in report and "TensorRT" in report and "ORT providers" in report
    assert "CPUExecutionProvider" in e.ort_providers
    assert e.has_tensorrt == (e.tensorrt is not None and e.cuda_available)
    if not e.has_gpu:
        assert "requires-gpu" in e.skipped_cells() and "requires-tensorrt" in e.skipped_cells()


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
