"""Real TensorRT builds of every chapter's ONNX, on the CPU, with TensorRT for RTX (chapters 2-6).

TensorRT for RTX's builder needs no GPU, and the dev extra installs it (``tensorrt-rtx``): these
tests build real plans in CI and do not skip where it should be installed (Linux x86-64, Windows).
Each ONNX is exported once per module, at 64x64 (the tiny preset); the session prints how many
plans were built (tests/conftest.py). Running a plan needs an RTX-class GPU: not here.
"""
from __future__ import annotations

import copy
import json
import platform
import sys

import onnx
import pytest
import torch
from onnx import TensorProto, helper

from course_lib.cnsd import build_cnsd, contracts, example_inputs, get_config
from course_lib.cnsd.fusion import fuse_qkv
from course_lib.onnx.attention_census import count_attention_matmuls, expected_matmul_counts
from course_lib.onnx.export_cnsd import export_cnsd
from course_lib.trt import Engine, FeatureMissing, build_engine_plan, build_plans, inspect_onnx, read_sidecar
from course_lib.trt.flavour import RTX_DEFAULT_CCS
from course_lib.trt.plan import sidecar_path, this_gpu

FLAVOUR = "tensorrt_rtx"
TINY = get_config("tiny")
SIZE = 64
RTX_PLATFORM = sys.platform == "win32" or (sys.platform == "linux" and platform.machine() in ("x86_64", "AMD64"))
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not RTX_PLATFORM, reason="tensorrt-rtx has wheels for Linux x86-64 and Windows only")]
AOT = "ahead of time, for compute capability " + ", ".join(RTX_DEFAULT_CCS)


@pytest.fixture(scope="module")
def trt():
    """The real tensorrt_rtx module; a missing one is an error here, not a skip (the dev extra installs it)."""
    from course_lib.trt import require_tensorrt

    return require_tensorrt("the CI's real builds", FLAVOUR)


@pytest.fixture(scope="module")
def work(tmp_path_factory, trt):
    """The tiny CNSD (seed 0) and its four ONNX files at 64x64, static and dynamic (batch, image size)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("trt_builds")
    model = build_cnsd(TINY, seed=0)
    static = export_cnsd(model, folder / "static", height=SIZE, width=SIZE, progress=False)
    dynamic = export_cnsd(model, folder / "dynamic", height=SIZE, width=SIZE, dynamic={"B", "H", "W"}, progress=False)
    torch.set_num_threads(threads)
    return {"folder": folder, "model": model, "static": {k: r.path for k, r in static.items()},
            "dynamic": {k: r.path for k, r in dynamic.items()}}


def _build_all(folder, onnx_dir, profile):
    return build_plans(onnx_dir, folder / f"plans_{profile}", profile=profile, batch=1, height=SIZE, width=SIZE,
                       max_batch=2, min_size=(SIZE, SIZE), max_size=(2 * SIZE, 2 * SIZE), workspace_gib=1,
                       progress=False, tensorrt=FLAVOUR)


@pytest.fixture(scope="module")
def static_plans(work):
    return _build_all(work["folder"], work["static"]["unet"].parent, "static")


def test_four_static_plans_with_sidecars(trt, work, static_plans):
    assert [p.stem for p in static_plans] == ["clip", "controlnet", "unet", "decoder"]
    for plan in static_plans:
        side = read_sidecar(plan)
        assert (side.flavour, side.tensorrt) == (FLAVOUR, trt.__version__)
        assert side.target.startswith(AOT) and side.compute_capabilities == ["80", "86", "89", "120"]
        assert all(lo == opt == hi for lo, opt, hi in side.profiles[0].values())
        assert side.strongly_typed and side.precision == "as in the ONNX (float32)"
        onnx_file = work["static"][plan.stem]
        assert side.extra["layers"] == inspect_onnx(onnx_file, FLAVOUR).layers > 100
        assert plan.stat().st_size > 0.9 * onnx_file.stat().st_size     # the weights are inside the plan
    assert sorted(p.name for p in static_plans[0].parent.iterdir()) == sorted(
        [p.name for p in static_plans] + [sidecar_path(p).name for p in static_plans])   # no temp files left


def test_four_dynamic_plans(work):
    plans = _build_all(work["folder"], work["dynamic"]["unet"].parent, "dynamic")
    for plan in plans:
        profile = read_sidecar(plan).profiles[0]
        batch = {name: (lo[0], hi[0]) for name, (lo, _, hi) in profile.items()}
        assert set(batch.values()) == {(1, 2)}, plan.name
    hint = read_sidecar(plans[1]).profiles[0]["hint"]
    assert hint == [[1, 3, SIZE, SIZE], [1, 3, SIZE, SIZE], [2, 3, 2 * SIZE, 2 * SIZE]]


def test_census_of_the_parsed_unet(work):
    unet = inspect_onnx(work["static"]["unet"], FLAVOUR)
    assert unet.strongly_typed and unet.tensorrt.startswith("TensorRT for RTX")
    assert unet.count("MATRIX_MULTIPLY") > 0 and unet.count("CONVOLUTION") > 0 and unet.count("SOFTMAX") > 0
    assert sum(unet.census.values()) == unet.layers
    assert set(unet.inputs) == {t.name for t in contracts(TINY, 1, SIZE, SIZE)["unet"].inputs}
    assert unet.table().startswith(f"unet.onnx: {unet.layers} layers (")


def test_chapter3_fp16_onnx_builds(work):
    from course_lib.precision.fp16 import to_fp16_onnx

    for name in ("controlnet", "unet"):
        fp16 = to_fp16_onnx(work["static"][name], work["folder"] / "fp16" / f"{name}.onnx", progress=False)
        side = build_engine_plan(fp16.path, work["folder"] / "fp16" / f"{name}.plan", workspace_gib=1,
                                 progress=False, tensorrt=FLAVOUR)
        assert side.precision == "as in the ONNX (float16+float32)" and side.strongly_typed
        assert side.extra["layer_types"].get("CAST", 0) > 0                 # the fp32 islands (norms, softmax)


def test_chapter4_fused_qkv_parses_and_builds(work):
    fused_model = copy.deepcopy(work["model"])
    fuse_qkv(fused_model)
    torch.set_num_threads(1)
    fused = export_cnsd(fused_model, work["folder"] / "fused", height=SIZE, width=SIZE,
                        models=["controlnet", "unet"], progress=False)
    for name in ("controlnet", "unet"):
        unfused_net = inspect_onnx(work["static"][name], FLAVOUR)
        fused_net = inspect_onnx(fused[name].path, FLAVOUR)
        matmuls = {f: count_attention_matmuls(p) for f, p in ((False, work["static"][name]), (True, fused[name].path))}
        assert matmuls[False] == expected_matmul_counts(TINY, name, fused=False)
        assert matmuls[True] == expected_matmul_counts(TINY, name, fused=True)
        saved = matmuls[False]["total"] - matmuls[True]["total"]           # 2 per self-, 1 per cross-attention
        assert saved == 2 * matmuls[True]["self_layers"] + matmuls[True]["cross_layers"] > 0
        assert unfused_net.count("MATRIX_MULTIPLY") - fused_net.count("MATRIX_MULTIPLY") == saved, name
        side = build_engine_plan(fused[name].path, work["folder"] / "fused" / f"{name}.plan", workspace_gib=1,
                                 progress=False, tensorrt=FLAVOUR)
        assert side.extra["layers"] == fused_net.layers


class _Inputs:
    """ONNX Runtime calibration reader: two seeded example feeds of one model's contract."""

    def __init__(self, name):
        self.spec, self.i = contracts(TINY, 1, SIZE, SIZE)[name], 0

    def get_next(self):
        self.i += 1
        return None if self.i > 2 else {k: v.numpy() for k, v in example_inputs(self.spec, seed=self.i).items()}

    def rewind(self):
        self.i = 0


def test_chapter5_int8_qdq_builds(work):
    from course_lib.precision.int8 import quantize_int8

    for name in ("controlnet", "unet"):
        qdq = quantize_int8(work["static"][name], work["folder"] / "int8" / f"{name}.int8.onnx", _Inputs(name),
                            method="ort", progress=False)
        assert qdq.report.passed
        side = build_engine_plan(qdq.path, work["folder"] / "int8" / f"{name}.int8.plan", workspace_gib=1,
                                 progress=False, tensorrt=FLAVOUR)
        kinds = side.extra["layer_types"]
        assert kinds["QUANTIZE"] > 0 and kinds["DEQUANTIZE"] >= kinds["QUANTIZE"], kinds
        assert side.precision == "as in the ONNX (float32+int8)" and side.strongly_typed


def test_chapter6_yolov5_builds(work):
    from course_lib.onnx.export import export_onnx
    from course_lib.yolov5 import INPUT_NAME, OUTPUT_NAME, YOLOv5, yolov5_preset

    config = yolov5_preset("n", nc=9, img_size=SIZE)
    images = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    path = export_onnx(YOLOv5(config, seed=0).fuse_conv_bn(), {INPUT_NAME: images}, work["folder"] / "yolo" / "y.onnx",
                       output_names=[OUTPUT_NAME], progress=False).path
    assert inspect_onnx(path, FLAVOUR).outputs == {OUTPUT_NAME: config.output_shape(1, SIZE, SIZE)}
    side = build_engine_plan(path, path.with_suffix(".plan"), workspace_gib=1, progress=False, tensorrt=FLAVOUR)
    assert side.extra["layer_types"]["CONVOLUTION"] > 0


def test_compute_capability_target_is_recorded(work):
    plan = work["folder"] / "targets" / "clip.plan"
    side = build_engine_plan(work["static"]["clip"], plan, workspace_gib=1, progress=False, tensorrt=FLAVOUR,
                             compute_capabilities=["8.6"])
    assert side.compute_capabilities == ["86"] and side.target.startswith("ahead of time, for compute capability 8.6")
    with pytest.raises(ValueError, match="compute capability '9.0'"):
        build_engine_plan(work["static"]["clip"], plan, progress=False, tensorrt=FLAVOUR, compute_capabilities=["9.0"])


def test_what_tensorrt_for_rtx_lacks_is_one_sentence_before_any_work(work, tmp_path):
    clip = work["static"]["clip"]
    for kwargs, what in (({"timing_cache": tmp_path / "t.cache"}, "has no timing cache"),
                         ({"fp16_flag": True, "strongly_typed": False}, "has no FP16 builder flag")):
        with pytest.raises(FeatureMissing) as info:
            build_engine_plan(clip, tmp_path / "x.plan", progress=False, tensorrt=FLAVOUR, **kwargs)
        msg = str(info.value)
        assert "\n" not in msg and msg.startswith("TensorRT for RTX ") and what in msg
    assert list(tmp_path.iterdir()) == []


def test_parser_rejects_an_op_in_one_line_and_writes_nothing(tmp_path, trt):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"), helper.make_node("Det", ["r"], ["y"], name="odd_one")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(tmp_path / "det.onnx"))
    with pytest.raises(ValueError) as info:
        build_engine_plan(tmp_path / "det.onnx", tmp_path / "plans" / "det.plan", progress=False, tensorrt=FLAVOUR)
    msg = str(info.value)
    assert "\n" not in msg and "node 'odd_one' (op Det)" in msg and msg.startswith("TensorRT for RTX")
    assert not (tmp_path / "plans").exists()


def test_no_tensorrt_of_either_flavour_is_one_line(tmp_path, monkeypatch, work):
    from course_lib.env import MissingDependency

    for name in ("tensorrt", "tensorrt_rtx"):           # Python's own way to make an import fail
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(MissingDependency) as info:
        build_engine_plan(work["static"]["clip"], tmp_path / "clip.plan", progress=False)
    msg = str(info.value)
    assert "\n" not in msg and "pip install tensorrt-cu13" in msg and "pip install tensorrt-rtx" in msg
    assert not (tmp_path / "clip.plan").exists()


def test_loading_checks_the_sidecar_before_tensorrt(static_plans, tmp_path):
    plan = static_plans[0]
    gpu, cc = this_gpu()
    if cc is not None and cc in read_sidecar(plan).runs_on:
        pytest.skip(f"{gpu} runs TensorRT for RTX plans: loading is tested on the GPU")
    with pytest.raises(ValueError) as info:
        Engine(plan, tensorrt=FLAVOUR).load()
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("plan clip.plan") and "8.0, 8.6, 8.9, 12.0" in msg
    other = tmp_path / "clip.plan"                              # the same plan, said to come from full TensorRT
    other.write_bytes(plan.read_bytes())
    data = json.loads(sidecar_path(plan).read_text())
    data.update(flavour="tensorrt", tensorrt="10.13.3.9", target="NVIDIA GeForce RTX 3060 (compute capability 8.6)",
                gpu="NVIDIA GeForce RTX 3060", compute_capability="86", compute_capabilities=["86"])
    sidecar_path(other).write_text(json.dumps(data))
    engine = Engine(other, tensorrt=FLAVOUR)
    with pytest.raises(ValueError) as info:
        engine.load()
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("plan clip.plan was built by TensorRT 10.13.3.9 on NVIDIA GeForce RTX")
    assert f"rebuild it with COURSE_TENSORRT={FLAVOUR} python -m course_lib build" in msg
    assert msg.endswith("or load it with COURSE_TENSORRT=tensorrt")
    assert engine.engine is None and engine.trt is None                     # nothing was loaded

