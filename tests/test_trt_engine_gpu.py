"""Build a tiny plan and run it through Engine (chapters 2 and 3); needs a TensorRT that runs plans here.

Full TensorRT with a CUDA GPU, or TensorRT for RTX with a GPU it targets (compute capability 8.0, 8.6,
8.9, 12.0); the flavour in force is used (COURSE_TENSORRT or auto). Not run in the course's CI (no GPU);
with TensorRT for RTX these tests are unverified (no RTX-class GPU was available).

A two-node ONNX (Conv + Relu, made with onnx.helper) is built into static and dynamic plans; the
Engine's outputs are compared with ONNX Runtime's on the same inputs.
"""
from __future__ import annotations

import json
import logging

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from course_lib.env import detect

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.tensorrt,
    pytest.mark.skipif(not detect().has_tensorrt,
                       reason="needs a TensorRT that runs plans here (a CUDA GPU with tensorrt, or one tensorrt_rtx targets)"),
]


def _has(feature):
    from course_lib.trt import has_feature, require_tensorrt

    return has_feature(require_tensorrt(), feature)


def _tiny_onnx(path, batch="B", op="Relu"):
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4, 8, 8])
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "weight"),
             numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "bias")]
    nodes = [helper.make_node("Conv", ["x", "weight", "bias"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node(op, ["c"], ["y"], name="act")]
    model = helper.make_model(helper.make_graph(nodes, "tiny", [x], [y], inits),
                              opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save_model(model, str(path))
    return path


def _ort(path, x: torch.Tensor) -> np.ndarray:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["y"], {"x": x.numpy()})[0]


def _build(tmp_path, name="tiny", dynamic=False, **kwargs):
    from course_lib.trt import build_engine_plan, dynamic_profile, onnx_input_dims, shapes_at, static_profile

    onnx_path = _tiny_onnx(tmp_path / f"{name}.onnx", batch="B")
    dims = onnx_input_dims(onnx_path)
    profile = (dynamic_profile(dims, (1, 64, 64), (2, 64, 64), (4, 64, 64)) if dynamic
               else static_profile(shapes_at(dims, 1, 64, 64), dims))
    plan = tmp_path / f"{name}.plan"
    kwargs.setdefault("workspace_gib", 1)
    sidecar = build_engine_plan(onnx_path, plan, profile, **kwargs)
    return onnx_path, plan, sidecar


def test_static_plan_matches_onnxruntime(tmp_path):
    from course_lib.trt import Engine

    cache = tmp_path / "timing.cache" if _has("timing_cache") else None      # full TensorRT only
    onnx_path, plan, sidecar = _build(tmp_path, timing_cache=cache, opt_level=2)
    assert plan.is_file() and (cache is None or cache.is_file()) and (tmp_path / "tiny.plan.json").is_file()
    assert sidecar.builder_optimization_level == 2 and sidecar.profiles == [{"x": [[1, 3, 8, 8]] * 3}]
    engine = Engine(plan).load().activate()
    assert engine.input_names == ["x"] and engine.output_names == ["y"]
    engine.allocate_buffers()
    assert "(1, 4, 8, 8)" in engine.info()
    x = torch.randn(1, 3, 8, 8)
    y = engine.infer({"x": x.cuda()})["y"].clone()  # the engine reuses its output buffer
    np.testing.assert_allclose(y.cpu().numpy(), _ort(onnx_path, x), atol=2e-2, rtol=1e-2)  # TF32 convs
    with pytest.raises(ValueError, match="'x'.*outside the plan's profile \\(1, 3, 8, 8\\) .. \\(1, 3, 8, 8\\)"):
        engine.infer({"x": torch.randn(2, 3, 8, 8, device="cuda")})  # min = opt = max: static
    assert torch.equal(engine.infer({"x": x.cuda()})["y"], y)  # the context is left as it was
    with pytest.raises(ValueError, match="'z', which is not an input"):
        engine.infer({"x": x.cuda(), "z": x.cuda()})
    with pytest.raises(ValueError, match="torch.float16"):
        engine.infer({"x": x.half().cuda()})
    _build(tmp_path, name="again", timing_cache=cache)  # the cache is read and merged again (full TensorRT)


def test_dynamic_plan_follows_the_feed(tmp_path):
    from course_lib.trt import Engine

    onnx_path, plan, _ = _build(tmp_path, dynamic=True)
    engine = Engine(plan).load().activate()
    engine.allocate_buffers()
    assert tuple(engine.tensors["x"].shape) == (2, 3, 8, 8)  # the profile's opt shape
    for batch in (1, 3, 4):
        x = torch.randn(batch, 3, 8, 8)
        y = engine.infer({"x": x.cuda()})["y"]
        torch.cuda.synchronize()
        np.testing.assert_allclose(y.cpu().numpy(), _ort(onnx_path, x), atol=2e-2, rtol=1e-2)
    with pytest.raises(ValueError, match="outside the plan's profile"):
        engine.infer({"x": torch.randn(5, 3, 8, 8, device="cuda")})


def test_cuda_graph_warm_up_capture_replay(tmp_path):
    from course_lib.trt import Engine

    onnx_path, plan, _ = _build(tmp_path)
    engine = Engine(plan).load().activate()
    actions = []
    for seed in range(4):
        x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
        y = engine.infer({"x": x.cuda()}, use_cuda_graph=True)["y"]
        actions.append(engine.last_action)
        torch.cuda.synchronize()
        np.testing.assert_allclose(y.cpu().numpy(), _ort(onnx_path, x), atol=2e-2, rtol=1e-2)
    assert actions == ["warm-up", "capture", "replay", "replay"]
    engine.infer({"x": x.cuda()})
    assert engine.last_action == "eager" and len(engine.graph.graphs) == 1


def test_two_engines_share_device_memory(tmp_path):
    from course_lib.trt import Engine, shared_device_memory

    onnx_a, plan_a, _ = _build(tmp_path, name="a")
    onnx_b, plan_b, _ = _build(tmp_path, name="b", dynamic=True)
    engines = [Engine(plan_a).load(), Engine(plan_b).load()]
    block = shared_device_memory(engines)
    for engine, onnx_path in zip(engines, (onnx_a, onnx_b)):
        engine.activate(shared_device_memory=block)
        x = torch.randn(1, 3, 8, 8)
        y = engine.infer({"x": x.cuda()})["y"]
        torch.cuda.synchronize()
        np.testing.assert_allclose(y.cpu().numpy(), _ort(onnx_path, x), atol=2e-2, rtol=1e-2)
    with pytest.raises(ValueError, match="at least"):
        Engine(plan_a).load().activate(shared_device_memory=torch.empty(0, dtype=torch.uint8, device="cuda"))


def test_sidecar_from_another_tensorrt_blocks_loading(tmp_path):
    from course_lib.trt import Engine

    _, plan, _ = _build(tmp_path)
    sidecar = tmp_path / "tiny.plan.json"
    data = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**data, "tensorrt": "8.6.1"}))
    with pytest.raises(ValueError, match="built for TensorRT (for RTX )?8.6.1.*rebuild it with python -m course_lib build"):
        Engine(plan).load()
    Engine(plan, check_sidecar=False).load()  # trusted on purpose


def test_parser_errors_and_fp16_rules(tmp_path):
    from course_lib.trt import build_engine_plan

    bad = _tiny_onnx(tmp_path / "bad.onnx", batch=1, op="NotARealOp")
    with pytest.raises(ValueError, match="cannot parse bad.onnx: node 'act' \\(op NotARealOp\\)"):
        build_engine_plan(bad, tmp_path / "bad.plan", {}, workspace_gib=1)
    good = _tiny_onnx(tmp_path / "good.onnx", batch=1)
    with pytest.raises(ValueError, match="FP16 ONNX"):
        build_engine_plan(good, tmp_path / "good.plan", {}, workspace_gib=1, fp16_flag=True)
    assert not (tmp_path / "bad.plan").exists() and not (tmp_path / "good.plan").exists()


def test_fully_static_onnx_needs_no_profile(tmp_path):
    from course_lib.trt import Engine, build_engine_plan

    good = _tiny_onnx(tmp_path / "good.onnx", batch=1)
    sidecar = build_engine_plan(good, tmp_path / "good.plan", {}, workspace_gib=1)
    assert sidecar.profiles == [] and sidecar.precision == "as in the ONNX (float32)"
    engine = Engine(tmp_path / "good.plan").load().activate()
    with pytest.raises(ValueError, match="static at \\(1, 3, 8, 8\\)"):
        engine.allocate_buffers({"x": (2, 3, 8, 8)})
    x = torch.randn(1, 3, 8, 8)
    y = engine.infer({"x": x.cuda()})["y"]
    np.testing.assert_allclose(y.cpu().numpy(), _ort(good, x), atol=2e-2, rtol=1e-2)
    with pytest.raises(ValueError, match="'x': expected shape \\(1, 3, 8, 8\\)"):
        engine.infer({"x": torch.randn(2, 3, 8, 8, device="cuda")})


def test_logger_goes_through_python_logging(caplog):
    from course_lib.trt import require_tensorrt
    from course_lib.trt.logger import make_logger

    trt = require_tensorrt()

    logger = make_logger("verbose")
    with caplog.at_level(logging.DEBUG, logger="course_lib.trt"):
        trt.Builder(logger)
    assert any(r.name == "course_lib.trt" and r.message.startswith("[TensorRT]") for r in caplog.records)
