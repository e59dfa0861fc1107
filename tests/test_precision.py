"""course_lib.precision.fp16 (chapter 3): FP16 ONNX of the four tiny CNSD models, parity with FP32 on ORT CPU.

ONNX Runtime's CPU provider runs most fp16 ops through casts to fp32 it inserts itself: these tests check
correctness (which ops stay FP32, I/O types, errors against FP32), not speed.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from course_lib.precision import fp16 as precision
from course_lib.cnsd import MODEL_NAMES, build_cnsd, contracts, example_inputs, get_config
from course_lib.onnx.compare import compare_outputs, layerwise_compare
from course_lib.onnx.session import run_ort
from course_lib.env import MissingDependency, has_module
from course_lib.onnx.export import export_onnx
from course_lib.precision.fp16 import KEEP_FP32_OPS, precision_report, sinusoid_argument_nodes, to_fp16_onnx

pytestmark = pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")     # from exporting the tiny models

# max |fp16 - fp32| / max |fp32| per output, measured on the tiny models over feed seeds 0-2: <= 1.3e-3 (clip),
# 2.4e-3 (controlnet; 1.0e-2 with the timestep embedding in fp16), 2.0e-3 (unet), 1.6e-3 (decoder)
FP16_MAX_REL = 5e-3


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The four tiny CNSD models at 64x64, exported once: {name: (fp32 path, feed)}."""
    folder = tmp_path_factory.mktemp("precision")
    config = get_config("tiny")
    cnsd = build_cnsd(config, seed=0)
    out = {}
    for name, contract in contracts(config, height=64, width=64).items():
        feed = example_inputs(contract, seed=1)
        path = export_onnx(cnsd.positional(name), feed, folder / f"{name}.onnx",
                           output_names=contract.output_names, progress=False).path
        out[name] = (path, feed)
    return out


@pytest.fixture(scope="module")
def fp16(models):
    """Each model converted with the default settings: {name: Fp16Result}."""
    return {name: to_fp16_onnx(path, path.with_name(f"{name}_fp16.onnx"), progress=False)
            for name, (path, _) in models.items()}


def test_auto_method_is_what_is_installed(fp16):
    expected = "modelopt" if has_module("modelopt.onnx.autocast") else "onnxconverter"
    assert {r.method for r in fp16.values()} == {expected}


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_kept_ops_compute_in_fp32_and_io_stays_as_exported(models, fp16, name):
    before, after = precision_report(models[name][0]), precision_report(fp16[name].path)
    assert after.inputs == before.inputs and after.outputs == before.outputs     # float32 (and int32) I/O
    assert all(dtype in ("float32", "int32") for _, dtype in after.inputs + after.outputs)
    for op, row in after.ops.items():
        if op in KEEP_FP32_OPS:
            assert row["float16"] == 0 and row["float32"] > 0, (op, row)
    for op in ("Conv", "MatMul", "Gemm"):                                       # the heavy ops went fp16
        if op in after.ops:
            assert after.ops[op]["float32"] == 0 and after.ops[op]["float16"] > 0, (op, after.ops[op])
    assert "Softmax" in after.ops and after.count("float16") > 5 * after.count("float32")
    # the graph itself: every kept node reads float32 inputs
    model = onnx.shape_inference.infer_shapes(onnx.load(str(fp16[name].path)))
    types = {v.name: v.type.tensor_type.elem_type for v in (*model.graph.value_info, *model.graph.input)}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    for node in model.graph.node:
        if node.op_type in ("LayerNormalization", "InstanceNormalization", "Softmax"):
            assert types[node.input[0]] == onnx.TensorProto.FLOAT, node.name


def test_the_ops_torch_emits_for_the_norms_are_the_kept_ones(models):
    """Opset 18, dynamo=False: LayerNorm -> LayerNormalization, GroupNorm -> InstanceNormalization."""
    ops = {name: {n.op_type for n in onnx.load(str(path)).graph.node} for name, (path, _) in models.items()}
    assert "LayerNormalization" in ops["clip"] and "InstanceNormalization" in ops["decoder"]
    assert {"Sin", "Cos"} <= ops["unet"] and {"Sin", "Cos"} <= ops["controlnet"]
    assert not {"ReduceMean", "Sqrt"} & set().union(*ops.values())             # no norm spelled out by hand
    nodes = sinusoid_argument_nodes(onnx.load(str(models["unet"][0]), load_external_data=False))
    ops_of = {n.name: n.op_type for n in onnx.load(str(models["unet"][0])).graph.node}
    assert sorted(ops_of[n] for n in nodes) == ["Cast", "Cos", "Mul", "Sin", "Unsqueeze"]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_fp16_outputs_match_fp32_on_ort_cpu(models, fp16, name):
    path, feed = models[name]
    reference, candidate = run_ort(path, feed), run_ort(fp16[name].path, feed)
    table = compare_outputs(reference, candidate, rtol=1e-2, atol=1e-2, title=f"{name}: fp16 vs fp32")
    print(table)
    assert all(v.dtype == np.float32 for v in candidate.values())
    assert all(not r.note for r in table.rows)                                  # no NaN/Inf, same shapes
    worst = max(r.max_rel for r in table.rows)
    assert 0 < worst < FP16_MAX_REL, f"{name}: max rel error {worst:.2e}"


@pytest.mark.skipif(not has_module("polygraphy"), reason="polygraphy is not installed")
def test_layerwise_comparison_names_the_fp16_timestep_embedding(models, fp16, tmp_path):
    """Sin/Cos in fp16: cos(t * freq) with t * freq up to 999 rad is the first tensor to go bad."""
    path, feed = models["controlnet"]
    loose = to_fp16_onnx(path, tmp_path / "controlnet_sincos16.onnx", method="onnxconverter", progress=False,
                         keep_fp32_ops=[op for op in KEEP_FP32_OPS if op not in ("Sin", "Cos")])
    assert loose.kept_fp32_nodes == () and len(fp16["controlnet"].kept_fp32_nodes) == 5
    feed = dict(feed, timestep=torch.tensor([527], dtype=torch.int32))
    found = layerwise_compare(path, loose.path, feed, rtol=1e-2, atol=1e-2)
    print(found.first_bad)
    assert found.first_bad is not None and found.first_bad.model.split()[0] in ("Sin", "Cos")
    assert found.first_bad.max_abs > 1e-2
    # the default conversion keeps that chain in fp32, and the ControlNet's outputs get closer for it
    reference = run_ort(path, feed)
    worst = {name: max(r.max_rel for r in compare_outputs(reference, run_ort(result, feed)).rows)
             for name, result in (("loose", loose.path), ("default", fp16["controlnet"].path))}
    assert worst["default"] < FP16_MAX_REL and worst["loose"] > 2 * worst["default"], worst


def test_sidecar_and_nothing_left_behind(models, fp16):
    result = fp16["clip"]
    side = json.loads(result.sidecar_path.read_text())
    assert side["method"] == result.method and side["keep_fp32_ops"] == list(KEEP_FP32_OPS)
    assert side["source"] == str(models["clip"][0]) and side["keep_io_types"] is True
    assert side["tensors"]["float16"] > side["tensors"]["float32"] > 0 == len(result.kept_fp32_nodes)
    assert side["fp32_nodes"] == len(precision_report(result.path).fp32_nodes)
    if result.method == "onnxconverter":                                        # ModelOpt may keep more
        assert side["fp32_nodes"] == 7                                          # 5 LayerNorm, 2 Softmax
    assert side["outputs"] == {"last_hidden_state": "float32"} and side["versions"]["onnx"] == onnx.__version__
    assert side["versions"][{"onnxconverter": "onnxconverter-common"}.get(result.method, "nvidia-modelopt")]
    assert result.data_path is None and not result.path.with_name(result.path.name + ".data").exists()
    assert not [p for p in result.path.parent.iterdir() if ".tmp-" in p.name]
    assert "fp16" in str(result) and "float16" in str(precision_report(result.path))


def test_failed_conversion_keeps_the_previous_file(models, tmp_path, monkeypatch):
    src = models["decoder"][0]
    dst = tmp_path / "decoder_fp16.onnx"
    to_fp16_onnx(src, dst, progress=False)
    before = dst.read_bytes()

    def broken(_path):
        raise RuntimeError("disk full")
    monkeypatch.setattr(precision, "precision_report", broken)                # fails after saving to temp
    with pytest.raises(RuntimeError, match="disk full"):
        to_fp16_onnx(src, dst, progress=False)
    assert dst.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [
        "decoder_fp16.onnx", "decoder_fp16.onnx.json"]


def test_external_data_in_and_out(models, tmp_path, monkeypatch):
    path, feed = models["clip"]
    src = tmp_path / "clip_ext.onnx"
    onnx.save_model(onnx.load(str(path)), str(src), save_as_external_data=True, location="clip_ext.onnx.data",
                    size_threshold=1024)
    assert (tmp_path / "clip_ext.onnx.data").stat().st_size > src.stat().st_size
    monkeypatch.setattr(precision, "EXTERNAL_DATA_THRESHOLD_BYTES", 0)        # force <dst>.data as for a big UNet
    result = to_fp16_onnx(src, tmp_path / "out" / "clip_fp16.onnx", progress=False)
    assert result.data_path == result.path.with_name("clip_fp16.onnx.data") and result.data_path.is_file()
    assert result.data_path.stat().st_size > result.path.stat().st_size
    table = compare_outputs(run_ort(path, feed), run_ort(result.path, feed))
    assert table.rows[0].max_rel < FP16_MAX_REL


def test_keep_io_types_false_gives_fp16_io(models, tmp_path):
    result = to_fp16_onnx(models["clip"][0], tmp_path / "clip_fp16io.onnx", keep_io_types=False, progress=False)
    report = precision_report(result.path)
    assert report.inputs == [("input_ids", "int32")] and report.outputs == [("last_hidden_state", "float16")]


def test_errors_name_the_problem(models, fp16, tmp_path):
    src = models["clip"][0]
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        to_fp16_onnx(tmp_path / "missing.onnx", tmp_path / "x.onnx", progress=False)
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(src.read_bytes()[:200])
    with pytest.raises(ValueError, match="corrupt.onnx"):
        to_fp16_onnx(corrupt, tmp_path / "x.onnx", progress=False)
    with pytest.raises(ValueError, match="already holds float16"):
        to_fp16_onnx(fp16["clip"].path, tmp_path / "again.onnx", progress=False)
    with pytest.raises(ValueError, match="overwrite"):
        to_fp16_onnx(src, src, progress=False)
    with pytest.raises(ValueError, match="method"):
        to_fp16_onnx(src, tmp_path / "x.onnx", method="tensorrt", progress=False)
    with pytest.raises(ValueError, match=r"\.onnx"):
        to_fp16_onnx(src, tmp_path / "x.plan", progress=False)
    with pytest.raises(FileNotFoundError):
        precision_report(tmp_path / "missing.onnx")
    if not has_module("modelopt.onnx.autocast"):
        with pytest.raises(MissingDependency, match="nvidia-modelopt"):
            to_fp16_onnx(src, tmp_path / "x.onnx", method="modelopt", progress=False)
    assert not (tmp_path / "x.onnx").exists()
