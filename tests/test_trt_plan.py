"""The plan sidecar (chapter 2), on CPU."""
from __future__ import annotations

import json
import warnings

import pytest

from course_lib.trt.plan import (
    PlanSidecar, check_sidecar, normalize_cc,
    read_sidecar, sidecar_path, write_sidecar,
)


def _sidecar(**changes) -> PlanSidecar:
    fields = dict(
        plan="unet.plan", tensorrt="10.8.0.43", gpu="NVIDIA GeForce RTX 3060", compute_capability="86",
        profiles=[{"x_noisy": [[1, 4, 32, 48]] * 3}], precision="as in the ONNX (float16)",
        builder_optimization_level=3, workspace_gib=10, strongly_typed=True, build_seconds=61.5,
        built_at="2026-01-01T00:00:00+00:00", onnx_path="onnx/unet.onnx", onnx_sha256="0" * 64,
    )
    fields.update(changes)
    return PlanSidecar(**fields)


def test_sidecar_round_trip(tmp_path):
    plan = tmp_path / "unet.plan"
    assert sidecar_path(plan).name == "unet.plan.json"
    write_sidecar(plan, _sidecar())
    assert read_sidecar(plan) == _sidecar()
    assert json.loads(sidecar_path(plan).read_text())["builder_optimization_level"] == 3


def test_read_sidecar_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m course_lib build"):
        read_sidecar(tmp_path / "none.plan")
    data = _sidecar().to_dict()
    del data["tensorrt"]
    sidecar_path(tmp_path / "old.plan").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="lacks tensorrt"):
        read_sidecar(tmp_path / "old.plan")
    sidecar_path(tmp_path / "bad.plan").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_sidecar(tmp_path / "bad.plan")


def test_check_sidecar_accepts_the_same_machine():
    check_sidecar(_sidecar(), "10.8.0.43", "NVIDIA GeForce RTX 3060", (8, 6))


@pytest.mark.parametrize("version, cc", [("11.1.0.5", "8.6"), ("10.8.0.43", "sm_90")])
def test_check_sidecar_rejects_other_tensorrt_or_gpu(version, cc):
    with pytest.raises(ValueError) as info:
        check_sidecar(_sidecar(), version, "NVIDIA H100", cc, plan_path="plans/unet.plan")
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith("plan unet.plan was built for TensorRT 10.8.0.43 on NVIDIA GeForce RTX 3060 (sm_86)")
    assert msg.endswith("rebuild it with python -m course_lib build --onnx-dir onnx --out plans")


def test_same_cc_other_gpu_model_warns_unless_strict():
    with pytest.warns(UserWarning, match="rebuild it"):
        check_sidecar(_sidecar(), "10.8.0.43", "NVIDIA GeForce RTX 3070", "86")
    with pytest.raises(ValueError, match="RTX 3070"):
        check_sidecar(_sidecar(), "10.8.0.43", "NVIDIA GeForce RTX 3070", "86", strict_gpu=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_sidecar(_sidecar(), "10.8.0.43", "NVIDIA GeForce RTX 3060", "86")


def test_normalize_cc():
    assert {normalize_cc(c) for c in [(8, 6), "8.6", "sm_86", "86"]} == {"86"}


def _rtx_sidecar(**changes) -> PlanSidecar:
    return _sidecar(**{"tensorrt": "1.7.1.116", "gpu": "", "compute_capability": "80,86,89,120",
                       "flavour": "tensorrt_rtx", "target": "ahead of time, for compute capability 8.0, 8.6, 8.9, 12.0",
                       "compute_capabilities": ["80", "86", "89", "120"], **changes})


def test_old_sidecars_are_full_tensorrt(tmp_path):
    data = _sidecar().to_dict()
    for key in ("flavour", "target", "compute_capabilities"):
        del data[key]
    data["format"] = 1
    sidecar_path(tmp_path / "old.plan").write_text(json.dumps(data))
    old = read_sidecar(tmp_path / "old.plan")
    assert old.flavour == "tensorrt" and old.runs_on == ["86"]
    assert old.describe() == "TensorRT 10.8.0.43 on NVIDIA GeForce RTX 3060 (sm_86)"


def test_rtx_plan_runs_on_any_gpu_it_targets():
    side = _rtx_sidecar()
    assert side.describe() == "TensorRT for RTX 1.7.1.116, ahead of time, for compute capability 8.0, 8.6, 8.9, 12.0"
    with warnings.catch_warnings():
        warnings.simplefilter("error")                      # another GPU model: no warning, JIT compiles for it
        for gpu, cc in (("NVIDIA GeForce RTX 3060", "8.6"), ("NVIDIA A10", "86"), ("NVIDIA L4", (8, 9)),
                        ("NVIDIA GeForce RTX 5090", "12.0"), ("NVIDIA A100-SXM4-80GB", "sm_80")):
            check_sidecar(side, "1.7.1.116", gpu, cc, flavour="tensorrt_rtx")


@pytest.mark.parametrize("flavour, version, gpu, cc, says", [
    ("tensorrt_rtx", "1.7.1.116", "NVIDIA H100 80GB HBM3", "9.0", "this machine has TensorRT for RTX 1.7.1.116 on "
     "NVIDIA H100 80GB HBM3 (sm_90): rebuild it with"),
    ("tensorrt_rtx", "1.7.1.116", "NVIDIA GeForce RTX 2080", "7.5", "(sm_75)"),
    ("tensorrt_rtx", "1.8.0.1", "NVIDIA GeForce RTX 3060", "8.6", "this machine has TensorRT for RTX 1.8.0.1: rebuild"),
    ("tensorrt", "1.7.1.116", "NVIDIA GeForce RTX 3060", "8.6", "this process uses TensorRT 1.7.1.116: rebuild it with "
     "COURSE_TENSORRT=tensorrt python -m course_lib build"),
    ("tensorrt_rtx", "1.7.1.116", None, None, "needs a CUDA GPU to run and this machine has none: run it on a GPU of "
     "compute capability 8.0, 8.6, 8.9, 12.0"),
])
def test_rtx_plan_elsewhere_is_one_line(flavour, version, gpu, cc, says):
    with pytest.raises(ValueError) as info:
        check_sidecar(_rtx_sidecar(), version, gpu, cc, flavour=flavour, plan_path="plans/unet.plan")
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("plan unet.plan ") and says in msg


def test_full_tensorrt_plan_for_rtx_process_names_both():
    with pytest.raises(ValueError) as info:
        check_sidecar(_sidecar(), "1.7.1.116", "NVIDIA GeForce RTX 3060", "8.6", flavour="tensorrt_rtx",
                      plan_path="plans/unet.plan")
    assert str(info.value) == (
        "plan unet.plan was built by TensorRT 10.8.0.43 on NVIDIA GeForce RTX 3060 (sm_86); this process uses "
        "TensorRT for RTX 1.7.1.116: rebuild it with COURSE_TENSORRT=tensorrt_rtx python -m course_lib build "
        "--onnx-dir onnx --out plans, or load it with COURSE_TENSORRT=tensorrt")
