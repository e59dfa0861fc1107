"""The hand-in writers (course_lib.homework.handin): what each homework's last chapter cell writes, and its errors.

HW1, HW3 and INT8 written from real tiny models are graded in tests/test_grade.py; here HW2 (made from
hw2_sweep's output as test data: the sweep itself needs TensorRT) and the writers' one-line errors.
"""
from __future__ import annotations

import json

import pytest

from course_lib.homework.handin import write_hw1_evidence, write_hw2_evidence, write_int8_evidence
from course_lib.homework import Evidence, run_tests
from course_lib.homework.submit import collect

GPU_MACHINE = {"versions": {"course_lib": "0.1.0", "python": "3.11", "torch": "2.8", "onnx": "1.19",
                            "onnxruntime": "1.22", "tensorrt": "10.8.0.43", "cuda": "12.8"},
               "gpu": {"name": "NVIDIA GeForce RTX 3060", "compute_capability": "86", "driver": "580.65"}}


def test_hw2_hands_in_the_records_and_sidecars_never_the_plans(tmp_path, fake_hw2_sweep):
    sweep = fake_hw2_sweep(tmp_path / "out" / "hw2")
    (sweep / "O3" / "unet.plan").write_bytes(b"engine bytes")
    work = tmp_path / "homework"
    stale = work / "hw2" / "O1" / "clip.plan.json"                  # from an earlier sweep at level 1
    stale.parent.mkdir(parents=True)
    stale.write_text("{}")
    folder = write_hw2_evidence(sweep, work)
    sidecars = [f"O{level}/{m}.plan.json" for level in (0, 3, 5) for m in ("clip", "controlnet", "decoder", "unet")]
    assert sorted(collect("2", work)) == sorted(["hw2.json", "hw2.png", *sidecars])
    assert not stale.exists() and not (folder / "O3" / "unet.plan").exists()
    assert (folder / "hw2.json").read_bytes() == (sweep / "hw2.json").read_bytes()
    assert (folder / "hw2.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    outcomes = run_tests(Evidence("2", folder, 7, machine=GPU_MACHINE))
    assert [o.status for o in outcomes] == ["passed"] * len(outcomes), outcomes
    (folder / "hw2.png").unlink()
    assert write_hw2_evidence(folder, work) == folder                # swept straight into the homework folder
    assert sorted(collect("2", work)) == sorted(["hw2.json", "hw2.png", *sidecars])


def test_hw2_errors_name_what_is_missing(tmp_path, fake_hw2_sweep):
    with pytest.raises(FileNotFoundError, match=r"hw2.json is missing: run hw2_sweep\(onnx_dir, .*\) first"):
        write_hw2_evidence(tmp_path / "nothing", tmp_path / "homework")
    sweep = fake_hw2_sweep(tmp_path / "sweep")
    (sweep / "O5" / "unet.plan.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"O5/unet.plan.json is missing: hw2_sweep writes a sidecar"):
        write_hw2_evidence(sweep, tmp_path / "homework")
    (sweep / "hw2.json").write_text(json.dumps({"model": "unet"}))
    with pytest.raises(ValueError, match="expected hw2_sweep's list of records"):
        write_hw2_evidence(sweep, tmp_path / "homework")
    assert not (tmp_path / "homework").exists()


def test_hw1_engines_need_the_onnx_files_and_the_plans_sidecars(tmp_path):
    from course_lib.cnsd import build_cnsd, get_config

    model = build_cnsd(get_config("tiny"), seed=0)
    with pytest.raises(FileNotFoundError, match=r"lacks the four ONNX files: run chapter 1's 'Hand it in' cell"):
        write_hw1_evidence(model, tmp_path, export=False, plan_dir=tmp_path / "plans")
    (tmp_path / "hw1" / "onnx").mkdir(parents=True)
    for name in ("clip", "controlnet", "unet", "decoder"):
        (tmp_path / "hw1" / "onnx" / f"{name}.onnx").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"plans/clip.plan.json is missing: build the plans from .*hw1/onnx"):
        write_hw1_evidence(model, tmp_path, export=False, plan_dir=tmp_path / "plans")
    assert not (tmp_path / "hw1" / "images").exists()


def test_int8_arguments_are_checked_before_any_work(tmp_path):
    with pytest.raises(ValueError, match=r"models \['clip'\]: the INT8 homework quantizes 'controlnet'"):
        write_int8_evidence(object(), tmp_path, models=["clip"])
    with pytest.raises(ValueError, match=r"models \['unet'\]: the INT8 homework quantizes 'controlnet'"):
        write_int8_evidence(object(), tmp_path, models=["unet"])      # controlnet is the one every test needs
    with pytest.raises(ValueError, match=r"keep_float \['softmax'\]: expected groups of sensitive_nodes"):
        write_int8_evidence(object(), tmp_path, keep_float=["softmax"])
    assert not list(tmp_path.iterdir())
