"""course_lib.homework.submit (homework submission): what goes into the zip, and the errors a student sees.

Homework 2's evidence (timings and plan sidecars) is written here as test data, so these tests need no
model; the full HW1 and HW3 submissions are made (and graded) in test_grade.py.
"""
from __future__ import annotations

import json
import os
import zipfile

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from course_lib.homework.handin import save_fused_weights
from course_lib.homework import TESTS, homework_name
from course_lib.homework.contents import check_external_data
from course_lib.homework.safezip import ZipLimits, sha256_file
from course_lib.homework.submit import FORMAT, collect, machine_info, sanitize_student_id, strip_weights, submit


def test_student_ids():
    assert sanitize_student_id(" alice_01 ") == "alice_01"
    assert sanitize_student_id(20231234) == "20231234"
    for bad in ("", "../bob", "a/b", ".hidden", "x" * 65, "名字", "a b", "bob."):
        with pytest.raises(ValueError, match="expected 1-64 letters"):
            sanitize_student_id(bad)


def test_homework_names():
    assert [homework_name(h) for h in (1, "hw2", "3", "INT8")] == ["1", "2", "3", "int8"]
    with pytest.raises(ValueError, match="expected one of 1, 2, 3, int8"):
        homework_name(4)


def test_a_missing_artifact_names_the_file_and_the_chapter_cell(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"hw1/onnx/clip.onnx is missing; it is made by chapter 1, "
                                                r"'Hand it in' cell: write_hw1_evidence"):
        collect("1", tmp_path)
    (tmp_path / "hw3").mkdir()
    for name in ("controlnet", "unet"):
        for suffix in (".onnx", ".onnx.json"):
            (tmp_path / "hw3" / "onnx").mkdir(exist_ok=True)
            (tmp_path / "hw3" / "onnx" / (name + suffix)).write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"hw3/fused_qkv.safetensors is missing; it is made by chapter 4, "
                                                r"'Hand it in' cell: write_hw3_evidence"):
        collect("3", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"hw2/hw2.json is missing; it is made by chapter 2, "
                                                r"'Hand it in' cell: hw2_sweep\(onnx_dir, sweep_dir\), then write_hw2_evidence"):
        collect("2", tmp_path)


def test_collect_takes_only_the_homework_files(tmp_path, fake_hw2_sweep):
    folder = fake_hw2_sweep(tmp_path / "hw2")
    (folder / "O3" / "unet.plan").write_bytes(b"engine")                 # plans never go in
    (folder / "notes.pt").write_bytes(b"\x80\x04N.")                     # nor anything else
    (folder / ".hw2.tmp.png").write_bytes(b"half a plot")                # nor an interrupted write's temporary
    names = collect("2", tmp_path)
    assert names[0] == "hw2.json" and len(names) == 1 + 12
    assert all(n == "hw2.json" or n.endswith(".plan.json") for n in names)
    os.symlink(folder / "hw2.json", folder / "plot.png")
    with pytest.raises(ValueError, match="plot.png is a symbolic link"):
        collect("2", tmp_path)


def tiny_onnx(path, weight_rows=4):
    weight = numpy_helper.from_array(np.arange(weight_rows * 4, dtype=np.float32).reshape(weight_rows, 4), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, weight_rows])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [weight])
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(helper.make_model(graph), str(path))
    return path


def test_strip_weights_keeps_the_graph(tmp_path):
    src = tiny_onnx(tmp_path / "a.onnx", weight_rows=64)                  # 1 KiB of weights
    strip_weights(src, tmp_path / "b.onnx")
    stripped = onnx.load(str(tmp_path / "b.onnx"), load_external_data=False)
    w = stripped.graph.initializer[0]
    assert w.data_location == TensorProto.EXTERNAL and not w.raw_data and list(w.dims) == [64, 4]
    assert [n.op_type for n in stripped.graph.node] == ["MatMul"]
    assert (tmp_path / "b.onnx").stat().st_size < 200 < src.stat().st_size - 900
    assert check_external_data(tmp_path / "b.onnx", tmp_path, must_exist=False) == ["b.onnx.stripped"]


def test_machine_info_names_the_versions():
    info = machine_info()
    assert {"course_lib", "python", "torch", "onnx", "onnxruntime", "tensorrt", "cuda"} <= set(info["versions"])
    assert info["versions"]["onnx"] == onnx.__version__ and isinstance(info["gpu"], dict) and info["platform"]


def test_submit_writes_one_zip_with_a_manifest_of_every_file(tmp_path, fake_hw2_sweep):
    folder = fake_hw2_sweep(tmp_path / "homework" / "hw2")
    (folder / "O0" / "clip.plan").write_bytes(b"engine")
    out = tmp_path / "out" / "bob_hw2.zip"
    sub = submit(2, "bob", 42, work=tmp_path / "homework", out=out, progress=False)
    assert sub.path == out and sorted(os.listdir(out.parent)) == ["bob_hw2.zip"]     # atomic: no temp left
    with zipfile.ZipFile(out) as zf:
        names = zf.namelist()
        manifest = json.loads(zf.read("manifest.json"))
        checks = json.loads(zf.read("checks.json"))
        assert set(manifest["files"]) == set(names) - {"manifest.json"}
        for name, entry in manifest["files"].items():                                # every hash is right
            data = zf.read(name)
            assert entry["bytes"] == len(data) and entry["sha256"] == __import__("hashlib").sha256(data).hexdigest()
    assert "artifacts/hw2.json" in names and not any(n.endswith((".plan", ".pt", ".pkl", ".pth")) for n in names)
    assert manifest["format"] == FORMAT and manifest["homework"] == "2" and manifest["student"] == "bob"
    assert manifest["seed"] == 42 and manifest["config"] == "tiny" and manifest["created"].endswith("Z")
    assert manifest["versions"]["torch"] and manifest["versions"]["onnxruntime"] and "gpu" in manifest
    assert [t["name"] for t in checks["tests"]] == [s.name for s in TESTS["2"]]
    by_name = {t["name"]: t for t in checks["tests"]}
    assert by_name["hw2_summaries"]["status"] == "passed" and by_name["hw2_graph_ordering"]["status"] == "passed"
    if not manifest["versions"]["tensorrt"]:                  # made on a machine without TensorRT: said so
        assert by_name["manifest_versions"]["status"] == "failed"
        assert "lacks tensorrt" in by_name["manifest_versions"]["output"]
    text = str(sub)
    assert text.startswith("homework 2, student bob, seed 42: ") and "hw2.json" in text and "[PASSED] hw2_summaries" in text


def test_dry_run_writes_nothing_and_bad_arguments_are_one_line_errors(tmp_path, fake_hw2_sweep):
    fake_hw2_sweep(tmp_path / "hw2")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    sub = submit("2", "bob", 1, work=tmp_path, out=None, progress=False)
    assert sub.path is None and "not written (dry run)" in str(sub) and len(sub.files) == 13
    report = sub.report().splitlines()                   # what the notebook cell prints: no machine-dependent numbers
    assert report[0] == "homework 2: 13 files to hand in" and report[1:3] == ["  hw2.json", "  O0/clip.plan.json"]
    assert "  [failed] hw2_plans" in report and report[-1] == "ready to hand in: False"   # no TensorRT here
    assert "  [passed] hw2_summaries: median, p10, p90" in sub.report(outputs=True)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    with pytest.raises(ValueError, match="--student '../x'"):
        submit("2", "../x", 1, work=tmp_path, out=tmp_path / "x.zip")
    with pytest.raises(ValueError, match="--seed -1"):
        submit("2", "bob", -1, work=tmp_path, out=tmp_path / "x.zip")
    with pytest.raises(ValueError, match="--config 'big'"):
        submit("2", "bob", 1, work=tmp_path, out=tmp_path / "x.zip", config="big")
    with pytest.raises(ValueError, match="over the grader's limits"):
        submit("2", "bob", 1, work=tmp_path, out=tmp_path / "x.zip", limits=ZipLimits(max_total_mb=0.01), progress=False)
    with pytest.raises(ValueError, match="ending in .zip"):
        submit("2", "bob", 1, work=tmp_path, out=tmp_path / "x.tar", progress=False)
    assert not list(tmp_path.glob("x.*"))


def test_save_fused_weights(tmp_path):
    import torch
    from safetensors.torch import load_file

    from course_lib.cnsd import build_cnsd, get_config
    from course_lib.cnsd.fusion import fuse_qkv

    model = build_cnsd(get_config("tiny"), seed=3)
    with pytest.raises(ValueError, match="no fused attention layers"):
        save_fused_weights(model, tmp_path / "f.safetensors")
    fuse_qkv(model)
    tensors = load_file(str(save_fused_weights(model, tmp_path / "f.safetensors")))
    key = "unet.middle_block.1.transformer_blocks.0.attn1"
    assert torch.equal(tensors[f"{key}.to_qkv.weight"], torch.cat([tensors[f"{key}.{p}.weight"] for p in ("to_q", "to_k", "to_v")]))
    assert sum(k.endswith(".to_qkv.weight") for k in tensors) == 23 and sum(k.endswith(".to_kv.weight") for k in tensors) == 23
    assert sha256_file(tmp_path / "f.safetensors") and not list(tmp_path.glob(".*tmp"))
