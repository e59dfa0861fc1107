"""course_lib.precision.int8 (chapter 5): INT8 Q/DQ models TensorRT accepts, and the check that says so.

The tiny ControlNet at 64x64 is exported once and quantized once (ONNX Runtime's quantizer: ~10 s);
the check's failure cases use two-layer graphs built on the spot.
"""
import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

from course_lib.backends import OrtBackend
from course_lib.precision.calibration import capture_calibration
from course_lib.cnsd import build_cnsd, get_config
from course_lib.onnx.export_cnsd import export_cnsd
from course_lib.pipeline.canny2image import Canny2Image
from course_lib.cnsd.tokenizer import get_tokenizer
from course_lib.env import MissingDependency, has_module
from course_lib.precision.int8 import ORT_TRT_OPTIONS, check_qdq, quantize_int8, sensitive_nodes

SIZE, STEPS = 64, 2


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """fp32 ControlNet ONNX, its calibration data (2 runs), and an INT8 copy with two groups kept float."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("int8")
    cnsd = build_cnsd(get_config("tiny"), seed=0)
    fp32 = export_cnsd(cnsd, folder / "onnx", height=SIZE, width=SIZE, models=["controlnet"], progress=False)
    fp32 = fp32["controlnet"].path
    yy, xx = np.mgrid[:SIZE, :SIZE]
    photo = np.stack([xx * 3, yy * 3, (xx + yy) % 200], axis=-1).astype(np.uint8)
    pipe = Canny2Image.from_torch(cnsd, get_tokenizer(allow_fallback=True), progress=False)
    calib = capture_calibration(pipe, [photo, np.ascontiguousarray(photo.transpose(1, 0, 2))], ["a bird"], folder / "calib", seeds=[1, 2],
                                models=["controlnet"], image_resolution=SIZE, ddim_steps=STEPS, progress=False)
    torch.set_num_threads(threads)
    groups = sensitive_nodes(fp32)
    kept = {g: groups[g] for g in ("time_embed", "first_last_conv")}
    result = quantize_int8(fp32, folder / "int8" / "controlnet.int8.onnx", calib.reader("controlnet", runs=[0]),
                           method="ort", exclude_nodes=kept, progress=False)
    return {"fp32": fp32, "calib": calib, "groups": groups, "kept": kept, "result": result}


@pytest.mark.slow
def test_sensitive_groups_of_the_controlnet(work):
    groups = work["groups"]
    # 7 transformer blocks x (self + cross attention) x (q·kᵀ, softmax·v)
    assert len(groups["attention"]) == 28 and all(n.endswith(("/MatMul", "/MatMul_1")) for n in groups["attention"])
    convs = groups["first_last_conv"]
    assert "/model/input_hint_block/input_hint_block.0/Conv" in convs            # reads the hint
    assert "/model/input_blocks.0/input_blocks.0.0/Conv" in convs                # conv_in reads x_noisy
    assert sum("zero_convs" in n or "middle_block_out" in n for n in convs) == 13  # write control0..12
    assert len(convs) == 15
    assert any("/time_embed/" in n for n in groups["time_embed"])
    assert all("time_embed" in n or "emb_layers" in n for n in groups["time_embed"])
    assert groups["norm"] and all("Normalization" in n for n in groups["norm"])
    with pytest.raises(ValueError, match="groups"):
        sensitive_nodes(work["fp32"], ["softmax"])


@pytest.mark.slow
def test_qdq_controlnet_passes_the_check_and_runs_in_onnxruntime(work):
    result = work["result"]
    report = result.report
    assert result.method == "ort" and result.samples == STEPS * 2
    assert report.passed, str(report)
    assert report.per_channel_weights > 0 and report.per_tensor_weights == 0
    # an independent look at the file: every zero point is int8 0, every weight int8
    model = onnx.load(str(result.path))
    inits = {t.name: t for t in model.graph.initializer}
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert len(qdq) == report.quantize + report.dequantize > 100
    for node in qdq:
        zero = inits[node.input[2]]
        assert zero.data_type == TensorProto.INT8 and not numpy_helper.to_array(zero).any()
    # the exclusion list is honoured: exactly those layers stayed float
    kept = {n for group in work["kept"].values() for n in group}
    assert {s.split(" ", 1)[1] for s in report.float_layers} == kept
    assert len(report.quantized_layers) == len([n for n in model.graph.node
                                                if n.op_type in ("Conv", "MatMul", "Gemm")]) - len(kept)
    sidecar = json.loads(result.path.with_name(result.path.name + ".json").read_text())
    assert sidecar["check"]["passed"] and sidecar["ort_options"] == ORT_TRT_OPTIONS
    assert sorted(p.name for p in result.path.parent.iterdir()) == ["controlnet.int8.onnx", "controlnet.int8.onnx.json"]
    # INT8 runs in ONNX Runtime, on a held-out sample, close to fp32
    feed = {k: torch.from_numpy(v) for k, v in work["calib"].reader("controlnet", runs=[1]).load(3).items()}
    ref = OrtBackend(work["fp32"], providers=["CPUExecutionProvider"]).infer(feed)
    out = OrtBackend(result.path, providers=["CPUExecutionProvider"]).infer(feed)
    for name in ref:
        a, b = ref[name].flatten(), out[name].flatten()
        assert torch.isfinite(b).all() and not torch.equal(a, b)             # really quantized
        assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.98


@pytest.mark.slow
def test_quantize_int8_arguments(work, tmp_path):
    reader = work["calib"].reader("controlnet", runs=[0])
    with pytest.raises(ValueError, match="exclude_nodes: 1 name"):
        quantize_int8(work["fp32"], tmp_path / "x.onnx", reader, method="ort", exclude_nodes=["/no/such/Conv"])
    with pytest.raises(ValueError, match="entropy.*modelopt"):
        quantize_int8(work["fp32"], tmp_path / "x.onnx", reader, method="ort", calibration="entropy")
    with pytest.raises(ValueError, match="method"):
        quantize_int8(work["fp32"], tmp_path / "x.onnx", reader, method="tensorrt")
    with pytest.raises(ValueError, match="not the fp32 model"):
        quantize_int8(work["fp32"], work["fp32"], reader, method="ort")
    with pytest.raises(FileNotFoundError):
        quantize_int8(tmp_path / "missing.onnx", tmp_path / "x.onnx", reader, method="ort")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.skipif(has_module("modelopt"), reason="ModelOpt is installed here: its error path cannot be shown")
def test_modelopt_missing_is_one_clear_sentence(work, tmp_path):
    with pytest.raises(MissingDependency, match=r"modelopt.*not installed.*pip install nvidia-modelopt"):
        quantize_int8(work["fp32"], tmp_path / "x.onnx", work["calib"].reader("controlnet"), method="modelopt")
    assert list(tmp_path.iterdir()) == []

# ------------------------------------------------------------------ what TensorRT rejects, on small graphs


class Feeds(CalibrationDataReader):
    def __init__(self, n=4):
        rng = np.random.default_rng(0)
        self.items = iter([{"x": (rng.random((1, 3, 8, 8), dtype=np.float32) * 4 + 1)} for _ in range(n)])

    def get_next(self):
        return next(self.items, None)


def _conv_matmul(path):
    """x (1,3,8,8) -> Conv 3->4 -> Reshape (1,4,64) -> MatMul (64,16) -> y: two weighted layers."""
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b"),
             numpy_helper.from_array(np.array([1, 4, 64], np.int64), "shape"),
             numpy_helper.from_array(rng.standard_normal((64, 16)).astype(np.float32), "m")]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Reshape", ["c", "shape"], ["r"], name="reshape"),
             helper.make_node("MatMul", ["r", "m"], ["y"], name="matmul")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 16])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


@pytest.mark.parametrize("activation_type, symmetric, problem", [
    (QuantType.QUInt8, False, "type UINT8, TensorRT needs INT8"),
    (QuantType.QInt8, False, "zero point not 0"),
])
def test_check_rejects_asymmetric_and_uint8_quantization(tmp_path, activation_type, symmetric, problem):
    fp32 = _conv_matmul(tmp_path / "small.onnx")
    out = tmp_path / "small.asym.onnx"
    quantize_static(str(fp32), str(out), Feeds(), quant_format=QuantFormat.QDQ, activation_type=activation_type,
                    weight_type=QuantType.QInt8, extra_options={"ActivationSymmetric": symmetric})
    report = check_qdq(out)
    assert not report.passed
    assert any(problem in p for p in report.problems), report.problems
    assert "FAILED" in str(report)
    # the same graph the TensorRT way passes
    good = tmp_path / "small.int8.onnx"
    quantize_static(str(fp32), str(good), Feeds(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8,
                    weight_type=QuantType.QInt8, extra_options=dict(ORT_TRT_OPTIONS))
    assert check_qdq(good).passed and check_qdq(good).layer_counts() == {"Conv": (1, 0), "MatMul": (1, 0)}


def test_check_counts_weights_kept_float_behind_a_qdq_pair(tmp_path):
    """ModelOpt (and ORT's AddQDQPairToWeight) keep weights float and put Q -> DQ after them."""
    fp32 = _conv_matmul(tmp_path / "small.onnx")
    out = tmp_path / "small.qdqw.onnx"
    quantize_static(str(fp32), str(out), Feeds(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    extra_options={**ORT_TRT_OPTIONS, "AddQDQPairToWeight": True})
    report = check_qdq(out)
    assert report.passed and (report.per_channel_weights, report.per_tensor_weights) == (2, 0)
    assert report.quantize == report.dequantize == 4                     # 2 activations + 2 weights


def test_check_rejects_quantized_bias_missing_zero_point_and_a_lone_dequantize(tmp_path):
    fp32 = _conv_matmul(tmp_path / "small.onnx")
    biased = tmp_path / "small.bias.onnx"                 # ORT's default quantizes the conv bias to int32
    quantize_static(str(fp32), str(biased), Feeds(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8,
                    weight_type=QuantType.QInt8, extra_options={"ActivationSymmetric": True})
    assert any("INT32 initializer" in p for p in check_qdq(biased).problems)

    s = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    nodes = [helper.make_node("QuantizeLinear", ["x", "s"], ["q"], name="q"),          # no zero point: uint8
             helper.make_node("DequantizeLinear", ["q", "s"], ["d"], name="dq"),
             helper.make_node("DequantizeLinear", ["x8", "s"], ["y"], name="lone")]  # reads a graph input
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4]),
                                           helper.make_tensor_value_info("x8", TensorProto.INT8, [4])],
                              [helper.make_tensor_value_info("d", TensorProto.FLOAT, [4]),
                               helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], [s])
    path = tmp_path / "hand.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    problems = check_qdq(path).problems
    assert any(p.startswith("QuantizeLinear q: type UINT8") for p in problems)
    assert any(p.startswith("DequantizeLinear lone: reads 'x8'") for p in problems)
    with pytest.raises(FileNotFoundError):
        check_qdq(tmp_path / "missing.onnx")
