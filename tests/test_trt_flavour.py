"""Which TensorRT (chapter 2): the choice, the one-sentence errors, and the feature checks on the real module."""
from __future__ import annotations

import sys

import pytest

from course_lib.env import MissingDependency, has_module
from course_lib.trt import flavour
from course_lib.trt.flavour import FEATURES, FeatureMissing, has_feature, require_feature

INSTALLED = [name for name in flavour.FLAVOURS if has_module(name)]


@pytest.fixture(autouse=True)
def no_selection(monkeypatch):
    monkeypatch.delenv(flavour.ENV_VAR, raising=False)
    flavour.select(None)
    yield
    flavour.select(None)


def test_the_choice_argument_then_select_then_environment_then_auto(monkeypatch):
    assert flavour.chosen() == "auto"
    monkeypatch.setenv(flavour.ENV_VAR, "tensorrt_rtx")
    assert flavour.chosen() == "tensorrt_rtx"
    flavour.select("tensorrt")
    assert flavour.chosen() == "tensorrt" and flavour.chosen("auto") == "auto"
    monkeypatch.setenv(flavour.ENV_VAR, "tensorRT")
    flavour.select(None)
    with pytest.raises(ValueError, match="TensorRT flavour 'tensorRT': expected one of auto, tensorrt, tensorrt_rtx"):
        flavour.chosen()


def test_auto_takes_full_tensorrt_first(monkeypatch):
    if not INSTALLED:
        pytest.skip("no TensorRT flavour installed")
    assert flavour.resolve() == INSTALLED[0]
    if "tensorrt_rtx" in INSTALLED:
        monkeypatch.setitem(sys.modules, "tensorrt", None)       # as if full TensorRT were not there
        assert flavour.resolve() == "tensorrt_rtx"


def test_missing_flavours_are_one_sentence_naming_the_packages(monkeypatch):
    for name in flavour.FLAVOURS:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(MissingDependency) as info:
        flavour.load(purpose="chapter 2")
    assert str(info.value) == (
        "neither tensorrt nor tensorrt_rtx is installed for chapter 2: install TensorRT (pip install tensorrt-cu13, "
        "with an NVIDIA GPU) or TensorRT for RTX (pip install tensorrt-rtx; its builder needs no GPU).")
    with pytest.raises(MissingDependency) as info:
        flavour.load("tensorrt_rtx")
    assert str(info.value) == ("tensorrt_rtx (TensorRT for RTX) is asked for (COURSE_TENSORRT or --tensorrt) but not "
                               "installed: pip install tensorrt-rtx, or choose tensorrt or auto.")


@pytest.mark.parametrize("name", INSTALLED)
def test_features_on_the_real_module(name):
    trt = flavour.load(name)
    assert flavour.flavour_of(trt) == name and flavour.label(trt) == f"{flavour.LABELS[name]} {trt.__version__}"
    present = {f for f in FEATURES if has_feature(trt, f)}
    if name == "tensorrt_rtx":
        assert present == {"runtime_cache", "compute_capability_targets", "cuda_graph_strategy", "user_allocation",
                           "engine_validity"}
        assert flavour.compute_capability_enum(trt, "8.6") == trt.ComputeCapability.SM86
        assert flavour.whole_graph_strategy(trt) == trt.CudaGraphStrategy.WHOLE_GRAPH_CAPTURE
        with pytest.raises(ValueError, match="compute capability '9.0'"):
            flavour.compute_capability_enum(trt, "9.0")
    else:
        assert {"timing_cache"} <= present and "runtime_cache" not in present
    for feature in set(FEATURES) - present:
        with pytest.raises(FeatureMissing) as info:
            require_feature(trt, feature)
        msg = str(info.value)
        assert "\n" not in msg and msg.startswith(f"{flavour.label(trt)} has no ") and msg.endswith(".")


def test_what_each_flavour_can_do_on_a_machine():
    from course_lib import env

    assert env.can_build("tensorrt_rtx", "1.7.1.116", None) and not env.can_build("tensorrt", "10.13", None)
    assert not env.can_run("tensorrt_rtx", "1.7.1.116", "90") and env.can_run("tensorrt_rtx", "1.7", "8.6")
    assert env.can_run("tensorrt", "10.13", "90") and not env.can_run("tensorrt", None, "90")
    assert env.status_line("tensorrt", None, None, None) == "not installed (pip install tensorrt-cu13)"
    assert env.cc_dotted("120") == "12.0" and env.cc_digits((8, 9)) == "89"
