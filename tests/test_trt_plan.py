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
