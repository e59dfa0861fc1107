"""course_lib.homework.grade and course_lib.homework (homework grading): full marks for right work, exactly the right
tests lost for wrong work, refusals for unsafe zips, and the results format autograders read.

The module fixture makes real CPU submissions with the tiny preset at 64x64 (seed 1234): HW1 (alice), and
HW3 three ways: right (bea), q/k/v concatenated in the wrong order (carl), fused before loading (dana).
"""
from __future__ import annotations

import copy
import csv
import json
import shutil
import stat
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from course_lib.files import write_json
from course_lib.cnsd import build_cnsd, get_config
from course_lib.cnsd.fusion import FusedAttention, build_fused_in_init, fuse_qkv, time_attention
from course_lib.homework.grade import CSV_COLUMNS, grade_folder, grade_submission, read_roster, score_test
from course_lib.homework import MODELS, TESTS, Evidence, NotRecheckable, Outcome, fused_weight_problem, run_tests
from course_lib.homework.hw1 import engines
from course_lib.homework.int8 import int8_coverage, int8_outputs, int8_qdq_rules, int8_sidecar
from course_lib.precision.int8 import check_qdq
from course_lib.homework.safezip import ZipLimits
from course_lib.homework.handin import write_hw1_evidence, write_hw3_evidence, write_int8_evidence
from course_lib.homework.submit import submit
from course_lib.trt.plan import PlanSidecar, write_sidecar

SEED = 1234
TINY = get_config("tiny")
GPU = {"name": "NVIDIA GeForce RTX 3060", "compute_capability": "86", "driver": "580.65"}
GPU_MACHINE = {"versions": {"course_lib": "0.1.0", "python": "3.11", "torch": "2.8", "onnx": "1.19",
                            "onnxruntime": "1.22", "tensorrt": "10.8.0.43", "cuda": "12.8"}, "gpu": GPU}
HW3_CATCHERS = {"hw3_fused_weights", "hw3_onnx_outputs_controlnet", "hw3_onnx_outputs_unet"}


def hw3_models(reference) -> dict:
    right = copy.deepcopy(reference)
    fuse_qkv(right)
    wrong = copy.deepcopy(right)                       # a student's fusion that stacks k before q (v before k)
    for layer in wrong.modules():
        if isinstance(layer, FusedAttention):
            parts = (layer.to_k, layer.to_q, layer.to_v) if layer.is_self_attention else (layer.to_v, layer.to_k)
            layer.fused.weight = torch.cat([p.weight for p in parts]).detach()
            layer.fused.sources = ()                   # export the stored (wrong) weight
    early = build_fused_in_init(TINY, seed=0)          # chapter 4's pitfall: fused in __init__, loaded after
    early.load_state_dict(reference.state_dict())
    return {"bea": right, "carl": wrong, "dana": early}


@pytest.fixture(scope="module")
def graded(tmp_path_factory, fake_hw2_sweep):
    base = tmp_path_factory.mktemp("grading")
    reference = build_cnsd(TINY, seed=SEED)
    subs = base / "submissions"
    stale = [base / "alice" / "hw1" / "plans" / "unet.plan.json",
             base / "alice" / "hw1" / "images" / "canny2image_trt.png"]
    for path in stale:                                    # an earlier GPU run's engines: removed, not handed in
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")
    write_hw1_evidence(reference, base / "alice", height=64, width=64, steps=2, progress=False)
    assert not any(path.exists() for path in stale)
    submit("1", "alice", SEED, work=base / "alice", out=subs / "alice_hw1.zip", progress=False)
    for student, model in hw3_models(reference).items():
        timing = time_attention(model, height=64, width=64, repeats=3) if student == "bea" else None
        write_hw3_evidence(model, base / student, height=64, width=64, timing=timing, progress=False)
        submit("3", student, SEED, work=base / student, out=subs / f"{student}_hw3.zip", progress=False)
    for student, model in (("erin", reference), ("fay", build_cnsd(TINY, seed=SEED + 1))):   # fay: another seed's model
        (base / student / "int8").mkdir(parents=True)
        (base / student / "int8" / "unet.int8.onnx").write_bytes(b"an earlier run's")   # removed, not handed in
        write_int8_evidence(model, base / student, models=["controlnet"], progress=False)
        submit("int8", student, SEED, work=base / student, out=subs / f"{student}_int8.zip", progress=False)
    fake_hw2_sweep(base / "alice" / "hw2")                # alice's second homework, handed in twice
    submit("2", "alice", SEED, work=base / "alice", out=subs / "alice_hw2.zip", progress=False)
    shutil.copyfile(subs / "alice_hw2.zip", subs / "alice_hw2_(again).zip")   # folder: a sanitized name
    results = grade_folder(subs, base / "results", progress=False)
    first = {}
    for r in results:                                     # each student's first zip (sorted by name)
        first.setdefault(r["extra_data"]["student"], r)
    return base, first, results


def lost(results) -> set[str]:
    return {t["name"] for t in results["tests"] if t["score"] < t["max_score"]}


@pytest.mark.slow
def test_hw1_made_on_cpu_gets_full_marks(graded):
    r = graded[1]["alice"]
    assert r["score"] == r["max_score"] == 16.0, json.dumps(r, indent=1)
    tests = {t["name"]: t for t in r["tests"]}
    assert [t["name"] for t in r["tests"]] == [s.name for s in TESTS["1"]]
    assert tests["engines"]["max_score"] == 0 and tests["engines"]["tags"] == ["not applicable"]
    assert tests["onnx_parity_unet"]["visibility"] == "hidden" and tests["onnx_parity_unet"]["tags"] == ["re-checked"]
    assert "match the seed-1234 reference on fresh inputs" in tests["onnx_parity_unet"]["output"]
    assert r["extra_data"]["flags"] == [] and not r["extra_data"]["refused"]


@pytest.mark.slow
def test_hw3_right_fusion_gets_full_marks(graded):
    r = graded[1]["bea"]
    assert r["score"] == r["max_score"] == 14.0 and not lost(r), json.dumps(r, indent=1)   # 13 + timing.json
    timing = next(t for t in r["tests"] if t["name"] == "hw3_timing")
    assert timing["tags"] == ["consistency"] and "(medians of raw samples)" in timing["output"]


@pytest.mark.slow
def test_int8_made_on_cpu_gets_full_marks_and_another_seeds_model_fails_the_outputs(graded):
    erin, fay = graded[1]["erin"], graded[1]["fay"]
    assert erin["score"] == erin["max_score"] == 10.0 and not lost(erin), json.dumps(erin, indent=1)
    assert lost(fay) == {"int8_outputs"}                 # well-formed INT8, but not of the issued seed's model
    outputs = next(t for t in fay["tests"] if t["name"] == "int8_outputs")
    assert "worst output cosine similarity" in outputs["output"] and outputs["visibility"] == "hidden"
    for student in ("erin", "fay"):                        # the fp32 exports and calibration data were scratch
        assert sorted(p.name for p in (graded[0] / student).iterdir()) == ["int8"]
        assert sorted(p.name for p in (graded[0] / student / "int8").iterdir()) == ["controlnet.int8.onnx",
                                                                                   "controlnet.int8.onnx.json"]


@pytest.mark.slow
def test_hw3_wrong_order_loses_exactly_the_tests_that_catch_it(graded):
    r = graded[1]["carl"]
    assert lost(r) == HW3_CATCHERS and r["score"] == 13.0 - 7.0
    weights = next(t for t in r["tests"] if t["name"] == "hw3_fused_weights")
    assert "rows hold [to_k, to_q, to_v], expected [to_q, to_k, to_v]: wrong concatenation order" in weights["output"]


@pytest.mark.slow
def test_hw3_fused_before_loading_loses_exactly_the_tests_that_catch_it(graded):
    r = graded[1]["dana"]
    assert lost(r) == HW3_CATCHERS
    weights = next(t for t in r["tests"] if t["name"] == "hw3_fused_weights")
    assert "fused before the checkpoint was loaded?" in weights["output"]
    assert r["extra_data"]["flags"] == []                # the student's own run found the same failures


@pytest.mark.slow
def test_results_json_and_summary_csv(graded, tmp_path):
    base, _, everything = graded
    for r in everything:
        path = Path(r["extra_data"]["results"])
        on_disk = json.loads(path.read_text())
        assert on_disk == r and path.parent.parent == base / "results" and path.name == "results.json"
        assert set(on_disk) >= {"score", "max_score", "output", "tests", "visibility"}
        assert on_disk["score"] == sum(t["score"] for t in on_disk["tests"])
        assert on_disk["max_score"] == sum(t["max_score"] for t in on_disk["tests"])
        for t in on_disk["tests"]:
            assert set(t) >= {"name", "score", "max_score", "output", "visibility", "status", "tags"}
            assert t["visibility"] in ("visible", "hidden") and t["status"] in ("passed", "failed")
            assert isinstance(t["score"], float) and isinstance(t["output"], str) and 0 <= t["score"] <= t["max_score"]
    with open(base / "results" / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert [(r["student"], r["homework"]) for r in rows] == [("alice", "1"), ("alice", "2"), ("alice", "2"),
                                                             ("bea", "3"), ("carl", "3"), ("dana", "3"),
                                                             ("erin", "int8"), ("fay", "int8")]
    carl = rows[4]
    assert carl["status"] == "graded" and carl["percent"] == "46.2" and set(carl["failed"].split(";")) == HW3_CATCHERS
    assert sorted(p.name for p in (base / "results").iterdir()) == [
        "alice", "alice~hw2", "alice~hw2~alice_hw2__again_", "bea", "carl", "dana", "erin", "fay", "summary.csv"]
    hw2, again = graded[2][1], graded[2][2]               # another homework: no flag; the same one twice: flagged
    assert not any("graded first" in f for f in hw2["extra_data"]["flags"])
    assert again["extra_data"]["flags"][-1] == ("another zip of alice's homework 2 was graded first: "
                                                "these results are in alice~hw2~alice_hw2__again_")
    taken = {"alice": "1", "alice~hw2": "2", "alice~hw2~alice_hw2": "2"}          # a third copy: a free folder
    third = grade_submission(graded[0] / "submissions" / "alice_hw2.zip", tmp_path, progress=False, _taken=taken)
    assert third["extra_data"]["flags"][-1].endswith("these results are in alice~hw2~alice_hw2~2")
    assert (tmp_path / "alice~hw2~alice_hw2~2" / "results.json").is_file() and taken["alice~hw2~alice_hw2~2"] == "2"
    subs, taken = graded[0] / "submissions", {}          # a second HW2 zip named hw1.zip must not take HW1's folder
    shutil.copyfile(subs / "alice_hw2.zip", tmp_path / "hw1.zip")
    for zip_path in (subs / "alice_hw2.zip", tmp_path / "hw1.zip", subs / "alice_hw1.zip"):
        last = grade_submission(zip_path, tmp_path / "r", progress=False, _taken=taken)
    assert taken == {"alice": "2", "alice~hw2~hw1": "2", "alice~hw1": "1"}
    assert not any("graded first" in f for f in last["extra_data"]["flags"]) and last["score"] == last["max_score"]


@pytest.mark.slow
def test_engines_evidence_is_checked_for_consistency(graded, tmp_path):
    base = graded[0]
    folder = tmp_path / "hw1"
    shutil.copytree(base / "alice" / "hw1", folder)
    from course_lib.homework.safezip import sha256_file
    shutil.copyfile(folder / "images" / "canny2image_torch.png", folder / "images" / "canny2image_trt.png")
    for name in MODELS:
        write_sidecar(folder / "plans" / f"{name}.plan", PlanSidecar(
            f"{name}.plan", "10.8.0.43", GPU["name"], "86", [], "as in the ONNX (fp32)", 3, 10.0, True, 1.0,
            "2025-01-01T00:00:00", f"onnx/{name}.onnx", sha256_file(folder / "onnx" / f"{name}.onnx")))
    ev = Evidence("1", folder, SEED, machine=GPU_MACHINE)
    assert engines(ev)[0], engines(ev)[1]
    side = json.loads((folder / "plans" / "unet.plan.json").read_text())
    write_json(folder / "plans" / "unet.plan.json", side | {"onnx_sha256": "f" * 64})
    assert engines(ev) == (False, "plans/unet.plan.json was built from another ONNX file than onnx/unet.onnx")



@pytest.mark.slow
def test_a_cpu_rerun_keeps_the_tensorrt_evidence_that_still_belongs(graded, tmp_path, monkeypatch):
    """Chapter 1's cell re-run after chapter 2's must keep the GPU evidence while it still belongs, all of it,
    and drop all of it otherwise: other ONNX files, another machine, other settings, another photo."""
    from course_lib.homework import handin
    from course_lib.homework.safezip import sha256_file
    from course_lib.samples import sample_photo
    folder = tmp_path / "homework" / "hw1"
    shutil.copytree(graded[0] / "alice" / "hw1", folder)
    trt_image = folder / "images" / "canny2image_trt.png"

    def built_on_the_gpu() -> dict:                       # what chapter 2's cell leaves (test data: no TensorRT)
        shutil.copyfile(folder / "images" / "canny2image_torch.png", trt_image)
        for name in MODELS:
            write_sidecar(folder / "plans" / f"{name}.plan", PlanSidecar(
                f"{name}.plan", "10.8.0.43", GPU["name"], "86", [], "as in the ONNX (fp32)", 3, 10.0, True, 1.0,
                "2025-01-01T00:00:00", f"onnx/{name}.onnx", sha256_file(folder / "onnx" / f"{name}.onnx")))
        return {name: (folder / "plans" / f"{name}.plan.json").read_bytes() for name in MODELS}

    def rerun(model, **changes) -> bool:                  # chapter 1's cell again; True: the evidence is kept
        write_hw1_evidence(model, tmp_path / "homework", **{"height": 64, "width": 64, "steps": 2, "progress": False,
                                                             **changes})
        kept = sorted(p.name for p in folder.glob("plans/*")) == [f"{m}.plan.json" for m in sorted(MODELS)]
        assert kept == trt_image.exists()                 # all of it or none
        return kept

    reference = build_cnsd(TINY, seed=SEED)
    monkeypatch.setattr(handin, "_this_machine", lambda: ("10.8.0.43", GPU["name"]))   # the machine that built them
    sidecars = built_on_the_gpu()
    assert rerun(reference)                               # same seed: the same ONNX bytes
    assert {n: (folder / "plans" / f"{n}.plan.json").read_bytes() for n in MODELS} == sidecars
    upside_down = sample_photo(size=(64, 64))[::-1].copy()
    for changes in ({"onnx": "other"}, {"prompt": "a cat"}, {"photo": upside_down}, {"machine": (None, None)}):
        rerun(reference, export=False)                    # back to chapter 1's settings and photo
        built_on_the_gpu()
        if changes.pop("onnx", None):                     # plans built from other ONNX files (another seed's)
            write_json(folder / "plans" / "unet.plan.json", json.loads(sidecars["unet"]) | {"onnx_sha256": "f" * 64})
        if "machine" in changes:                          # the files copied to a machine without TensorRT
            machine = changes.pop("machine")
            monkeypatch.setattr(handin, "_this_machine", lambda: machine)
        assert not rerun(reference, export=False, **changes), changes

# --- HW2: timings checked for consistency (test data, no GPU needed) ------------------------------------------



def failures(ev) -> set[str]:
    return {o.name for o in run_tests(ev) if o.status != "passed"}


def test_hw2_consistency_checks(tmp_path, fake_hw2_sweep):
    folder = fake_hw2_sweep(tmp_path / "ok" / "hw2")
    assert failures(Evidence("2", folder, 7, machine=GPU_MACHINE)) == set()
    assert failures(Evidence("2", folder, 7, machine={**GPU_MACHINE, "gpu": {}})) == {"manifest_versions", "hw2_plans"}
    slow_graph = Evidence("2", fake_hw2_sweep(tmp_path / "slow" / "hw2", graph_factor=1.3), 7, machine=GPU_MACHINE)
    outcome = {o.name: o for o in run_tests(slow_graph)}["hw2_graph_ordering"]
    assert outcome.status == "failed" and "a CUDA graph made 12 engine(s) slower" in outcome.output
    few_samples = fake_hw2_sweep(tmp_path / "few" / "hw2", n=5)
    assert failures(Evidence("2", few_samples, 7, machine=GPU_MACHINE)) == {"hw2_raw_samples"}
    other_tensorrt = fake_hw2_sweep(tmp_path / "trt" / "hw2", tensorrt="10.0")
    assert failures(Evidence("2", other_tensorrt, 7, machine=GPU_MACHINE)) == {"hw2_plans"}
    records = json.loads((folder / "hw2.json").read_text())
    records[5]["latency"]["median"] *= 0.5                                   # a "better" median, same raw samples
    write_json(folder / "hw2.json", records)
    outcome = {o.name: o for o in run_tests(Evidence("2", folder, 7, machine=GPU_MACHINE))}["hw2_summaries"]
    assert outcome.status == "failed" and "but the raw samples give" in outcome.output
    write_json(folder / "hw2.json", [r for r in records if r["opt_level"] != 5])
    assert "hw2_records" in failures(Evidence("2", folder, 7, machine=GPU_MACHINE))


# --- refused zips ----------------------------------------------------------------------------------------------

def zip_with(path, members: dict, links: dict | None = None):
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        for name, target in (links or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return path


def rewrite(src, dst, name, data: bytes):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info, data if info.filename == name else zin.read(info))
    return dst


def tree(folder):
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")}


def test_unsafe_or_tampered_zips_are_refused_and_nothing_is_written_outside_results(tmp_path, fake_hw2_sweep):
    fake_hw2_sweep(tmp_path / "work" / "hw2")
    subs = tmp_path / "subs"
    good = submit("2", "bob", 42, work=tmp_path / "work", out=tmp_path / "bob_hw2.zip", progress=False).path
    subs.mkdir()
    records = json.loads(zipfile.ZipFile(good).read("artifacts/hw2.json"))
    records[0]["latency"]["median"] = 1.0
    rewrite(good, subs / "tampered.zip", "artifacts/hw2.json", json.dumps(records).encode())
    manifest = zipfile.ZipFile(good).read("manifest.json")
    claims_trust = json.loads(manifest) | {"stripped": {"hw2.json": "0" * 64}}   # "not re-checkable, trust me"
    rewrite(good, subs / "trustme.zip", "manifest.json", json.dumps(claims_trust).encode())
    zip_with(subs / "dotdot.zip", {"manifest.json": manifest, "artifacts/../../../evil.json": b"{}"})
    zip_with(subs / "absolute.zip", {"manifest.json": manifest, str(tmp_path / "evil_abs.json"): b"{}"})
    zip_with(subs / "link.zip", {"manifest.json": manifest}, links={"artifacts/hw2.json": "../../../../etc/passwd"})
    before = tree(tmp_path)
    results = {r["extra_data"]["zip"]: r for r in grade_folder(subs, tmp_path / "results", progress=False)}
    expected = {"tampered.zip": "tampered file: artifacts/hw2.json has sha256",
                "dotdot.zip": "'..', '.' or an empty part in the path (path traversal)",
                "absolute.zip": "an absolute path", "link.zip": "is a symbolic link: links are refused",
                "trustme.zip": "a tiny-preset submission lists files without their weights (hw2.json)"}
    for name, message in expected.items():
        r = results[name]
        assert r["score"] == 0 and r["extra_data"]["refused"] and message in r["output"], r["output"]
        assert r["output"].startswith(f"refused {name}: ") and "\n" not in r["output"]
        assert [t["name"] for t in r["tests"]] == ["submission_opened"] and r["tests"][0]["status"] == "failed"
    assert results["tampered.zip"]["max_score"] == 12.0                     # the manifest said homework 2
    added = tree(tmp_path) - before
    assert added and all(p.startswith("results") for p in added), sorted(added)
    assert not any("evil" in p for p in tree(tmp_path)) and not (tmp_path / "evil_abs.json").exists()
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["absolute", "bob", "dotdot", "link", "summary.csv",
                                                                        "trustme"]
    rows = list(csv.DictReader(open(tmp_path / "results" / "summary.csv", newline="")))
    assert {r["status"] for r in rows} == {"refused"} and all(r["message"].startswith("refused ") for r in rows)
    # an oversize zip, and the untouched original graded with a roster
    big = grade_submission(good, tmp_path / "r2", limits=ZipLimits(max_file_mb=0.001))
    assert big["extra_data"]["refused"] and "over the per-file limit of 0.001 MB" in big["output"]
    roster = tmp_path / "roster.csv"
    roster.write_text("student,seed\nbob,43\n")
    r = grade_submission(good, tmp_path / "r3", roster=read_roster(roster))
    seed = next(t for t in r["tests"] if t["name"] == "seed_issued")
    assert seed["score"] == 0 and "the manifest says seed 42, the roster issued 43" in seed["output"]
    r = grade_submission(good, tmp_path / "r4", roster={"someone": 1}, keep=True)
    assert "student 'bob' is not in the roster" in r["output"] and (tmp_path / "r4" / "bob" / "files" / "manifest.json").is_file()
    assert sorted(p.name for p in (tmp_path / "r4").iterdir()) == ["bob"]  # the unpack folder is gone
    assert grade_submission(good, tmp_path / "r5", points={"hw2_records": 5})["max_score"] == 15.0
    with pytest.raises(ValueError, match="--points: no test named 'speed'"):
        grade_submission(good, tmp_path / "r6", points={"speed": 1})
    assert not (tmp_path / "r6").exists()


def test_roster_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="--roster"):
        read_roster(tmp_path / "none.csv")
    (tmp_path / "r.csv").write_text("name,seed\nbob,1\n")
    with pytest.raises(ValueError, match="columns student and seed"):
        read_roster(tmp_path / "r.csv")
    (tmp_path / "r.csv").write_text("student,seed\nbob,x\n")
    with pytest.raises(ValueError, match="not an integer"):
        read_roster(tmp_path / "r.csv")


def test_grade_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        grade_folder(tmp_path / "none", tmp_path / "out")
    (tmp_path / "subs").mkdir()
    with pytest.raises(FileNotFoundError, match="no .zip files"):
        grade_folder(tmp_path / "subs", tmp_path / "out")
    zip_with(tmp_path / "subs" / "a.zip", {"manifest.json": b"{}"})
    with pytest.raises(ValueError, match="outside the submissions folder"):
        grade_folder(tmp_path / "subs", tmp_path / "subs" / "results")


# --- scoring one test ------------------------------------------------------------------------------------------

def spec(name):
    return next(s for h in TESTS.values() for s in h if s.name == name)


def test_score_test_trusts_flags_and_skips():
    flags: list[str] = []
    trusted = score_test(spec("onnx_parity_unet"), Outcome("onnx_parity_unet", "not re-checkable", "not re-checkable "
                         "on CPU: sd15"), {"status": "passed", "output": "1/1 outputs match"}, 2, False, flags)
    assert trusted["score"] == 2 and trusted["tags"] == ["trusted"] and "trusted from the student's own run: passed" in trusted["output"]
    assert flags == ["onnx_parity_unet: trusted (not re-checkable on CPU)"]
    unclaimed = score_test(spec("onnx_parity_unet"), Outcome("onnx_parity_unet", "not re-checkable", "x"), None, 2, False, [])
    assert unclaimed["score"] == 0 and unclaimed["status"] == "failed"
    na = Outcome("engines", "not applicable", "no plan sidecars")
    assert score_test(spec("engines"), na, None, 2, False, [])["max_score"] == 0
    required = score_test(spec("engines"), na, None, 2, True, [])
    assert required["max_score"] == 2 and required["score"] == 0 and required["output"].startswith("GPU evidence required")
    flags = []
    disagree = score_test(spec("images_agree"), Outcome("images_agree", "failed", "PSNR 12 dB"),
                          {"status": "passed"}, 1, False, flags)
    assert disagree["score"] == 0 and flags == ["images_agree: the student's run said passed, the re-check failed"]


def test_sd15_reference_is_not_recheckable(tmp_path):
    ev = Evidence("1", tmp_path, 0, config="sd15")
    with pytest.raises(NotRecheckable, match="the reference is the real checkpoint"):
        ev.reference()
    (tmp_path / "onnx").mkdir()
    (tmp_path / "onnx" / "unet.onnx").write_bytes(b"")
    ev = Evidence("1", tmp_path, 0, config="sd15", stripped=frozenset({"onnx/unet.onnx"}))
    with pytest.raises(NotRecheckable, match="without its weights"):
        ev.with_weights("onnx/unet.onnx")
    outcome = {o.name: o for o in run_tests(ev)}["onnx_parity_unet"]
    assert outcome.status == "not re-checkable" and outcome.output.startswith("not re-checkable on CPU")


def test_fused_weight_problem_names_what_is_wrong():
    q, k, v = (torch.full((2, 3), float(i)) for i in range(3))
    parts = {"to_q": q, "to_k": k, "to_v": v}
    assert fused_weight_problem(torch.cat([q, k, v]), parts) is None
    assert "rows hold [to_v, to_k, to_q]" in fused_weight_problem(torch.cat([v, k, q]), parts)
    assert "fused before the checkpoint" in fused_weight_problem(torch.randn(6, 3), parts)
    assert "shape (4, 3)" in fused_weight_problem(torch.cat([q, k]), parts)


# --- INT8 checks on a hand-made Q/DQ graph ---------------------------------------------------------------------

def qdq_model(path, zero_point=0):
    x_scale = numpy_helper.from_array(np.array(0.1, np.float32), "x_scale")
    x_zero = numpy_helper.from_array(np.array(zero_point, np.int8), "x_zero")
    w = numpy_helper.from_array(np.ones((4, 4), np.int8), "w_q")
    w_scale = numpy_helper.from_array(np.full(4, 0.01, np.float32), "w_scale")
    w_zero = numpy_helper.from_array(np.zeros(4, np.int8), "w_zero")
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["xq"], name="q"),
             helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zero"], ["xd"], name="dq"),
             helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["wd"], name="wdq", axis=1),
             helper.make_node("MatMul", ["xd", "wd"], ["y"], name="mm")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
                              [x_scale, x_zero, w, w_scale, w_zero])
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    write_json(path.with_name(path.name + ".json"), {"check": check_qdq(path).summary()})
    return path


def test_int8_checks(tmp_path):
    folder = tmp_path / "int8"
    folder.mkdir()
    path = qdq_model(folder / "controlnet.int8.onnx")
    ev = Evidence("int8", folder, 0)
    assert int8_qdq_rules(ev)[0] and int8_coverage(ev) == (True, "controlnet.int8.onnx: 100% of compute layers INT8")
    assert int8_sidecar(ev)[0]
    ok, message = int8_outputs(ev)
    assert not ok and "neither the ControlNet's nor the UNet's" in message
    qdq_model(path, zero_point=3)
    write_json(path.with_name(path.name + ".json"), {"check": {"passed": True}})
    ok, message = int8_qdq_rules(ev)
    assert not ok and "zero point not 0" in message
    assert int8_sidecar(ev) == (False, "controlnet.int8.onnx.json: its check differs from check_qdq on the file "
                                       "(was the file changed?)")


@pytest.mark.slow
def test_an_sd15_submission_leaves_the_weights_out_and_is_trusted(graded, tmp_path):
    """sd15 files are handed in as graphs only (safetensors not at all); what needs weights is trusted.
    (The tiny files stand in for sd15's here, so sd15's structure tests fail: that is not the point.)"""
    base = graded[0]
    sub = submit("3", "sam", SEED, work=base / "bea", out=tmp_path / "subs" / "sam.zip", config="sd15", progress=False)
    assert sorted(sub.stripped) == ["fused_qkv.safetensors", "onnx/controlnet.onnx", "onnx/unet.onnx"]
    assert sub.left_out == ["fused_qkv.safetensors"] and "  fused_qkv.safetensors  (left out: weights stay" in sub.report()
    with zipfile.ZipFile(sub.path) as zf:
        names = zf.namelist()
        manifest = json.loads(zf.read("manifest.json"))
        graph = onnx.load_from_string(zf.read("artifacts/onnx/unet.onnx")).graph
    assert "artifacts/fused_qkv.safetensors" not in names and sub.path.stat().st_size < 2**20
    assert set(manifest["stripped"]) == set(sub.stripped) and all(len(h) == 64 for h in manifest["stripped"].values())
    assert any(t.data_location == TensorProto.EXTERNAL for t in graph.initializer)
    r = grade_submission(sub.path, tmp_path / "results")
    tags = {t["name"]: t["tags"][0] for t in r["tests"]}
    assert {n for n, k in tags.items() if k == "trusted"} == {"hw3_fused_layers", "hw3_loaded_weights", "hw3_fused_weights",
                                                              "hw3_onnx_outputs_controlnet", "hw3_onnx_outputs_unet"}
    assert len(r["extra_data"]["flags"]) == 5 and not r["extra_data"]["refused"]
