"""The fault table (issue 16): what a hostile student hands in and a careless user types, and what the
course promises for each.

Every test carries ``@fault(cls, promise)`` (the trial is its parameter, or its docstring's first line);
``python tools/fault_table.py`` runs this file and writes docs/faults.md from the results. Hostile zips are
made here, small; the "good" zips are homework 2 (no model: made and graded in a fraction of a second).
A full disk is a tmpfs mounted for the test where that is allowed (root), else a fake that raises ENOSPC
at the write (``COURSE_FAULTS_NO_MOUNT=1`` forces the fake).
"""
from __future__ import annotations

import builtins
import contextlib
import csv
import errno
import hashlib
import io
import json
import os
import pickle
import signal
import subprocess
import sys
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from course_lib.cli import EXIT_USAGE, main

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parent.parent


def fault(cls: str, promise: str):
    return pytest.mark.fault(cls=cls, promise=promise)


def run_main(argv) -> tuple[int, str, str]:
    """``main(argv)`` -> (exit code, stdout, stderr); a SystemExit (argparse's usage block) is its code."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


def lines(stderr: str) -> list[str]:
    """stderr without progress bars (tqdm redraws with \\r)."""
    return [line for line in stderr.splitlines() if line.strip() and "it/s]" not in line and "s/it]" not in line
            and not line.lstrip().startswith(("export ", "DDIM", "hashing", "homework "))]


def one_error_line(code, stderr: str, *words: str) -> str:
    """Exit 2 and exactly one ``error:`` line on stderr (no usage block, no traceback, no warnings) naming ``words``."""
    shown = lines(stderr)
    assert code == EXIT_USAGE, (code, stderr[-2000:])
    assert len(shown) == 1 and shown[0].startswith("error: "), stderr[-2000:]
    for word in words:
        assert word in shown[0], (word, shown[0])
    return shown[0]


# ------------------------------------------------------------------------------------------ zips

def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def members_of(zip_path) -> dict[str, bytes]:
    with zipfile.ZipFile(zip_path) as zf:
        return {i.filename: zf.read(i) for i in zf.infolist() if not i.is_dir()}


def make_zip(path: Path, members: dict[str, bytes], *, add: dict | None = None, manifest: dict | None = None,
             raw_manifest: bytes | None = None, compression=zipfile.ZIP_DEFLATED) -> Path:
    """A zip like submit's: ``members`` plus ``add``, the manifest's hashes made to match (so it gets past
    the hash check to the trial), ``manifest`` fields changed, or the manifest replaced by ``raw_manifest``."""
    members = {**members, **(add or {})}
    m = json.loads(members["manifest.json"])
    m.update(manifest or {})
    m["files"] = {n: {"sha256": sha256(b), "bytes": len(b)} for n, b in members.items() if n != "manifest.json"}
    members["manifest.json"] = raw_manifest if raw_manifest is not None else json.dumps(m).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def npz_bytes(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG with only its header (RGBA, 8 bit) and end: what a decompression bomb declares."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 6, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def tiny_onnx(size: int = 64, external: str | None = None, constant_external: str | None = None,
              int_input: bool = False, fp16: bool = False) -> onnx.ModelProto:
    """images (1, 3, size, size) -> output0 = images + w. ``external``: w's data in that file (not written);
    ``constant_external``: w comes from a Constant node whose tensor's data is in that file.
    ``int_input``: also an int32 input ``ids`` (1, 4) added as float (token ids); ``fp16``: float16 graph."""
    ftype = TensorProto.FLOAT16 if fp16 else TensorProto.FLOAT
    w = helper.make_tensor("w", ftype, [1], np.zeros(1, np.float16 if fp16 else np.float32).tobytes(), raw=True)
    def move_out(tensor, location):
        tensor.ClearField("raw_data")
        for key, value in (("location", location), ("offset", "0"), ("length", "4")):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        tensor.data_location = TensorProto.EXTERNAL

    nodes, inits = [], [w]
    if external:
        move_out(w, external)
    if constant_external:
        move_out(w, constant_external)
        nodes, inits = [helper.make_node("Constant", [], ["w"], value=w)], []
    inputs = [helper.make_tensor_value_info("images", ftype, [1, 3, size, size])]
    nodes.append(helper.make_node("Add", ["images", "w"], ["output0"]))
    if int_input:
        inputs = [helper.make_tensor_value_info("ids", TensorProto.INT32, [1, 4]),
                  helper.make_tensor_value_info("x", ftype, [1, 4])]
        nodes = [helper.make_node("Cast", ["ids"], ["idsf"], to=ftype), helper.make_node("Add", ["idsf", "x"], ["y"])]
    outputs = [helper.make_tensor_value_info("y" if int_input else "output0", ftype, [1, 4] if int_input else [1, 3, size, size])]
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=[] if int_input else inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


@pytest.fixture(scope="module")
def good(tmp_path_factory, fake_hw2_sweep):
    """A homework 2 submission (alice's) and what it scores when graded alone."""
    from course_lib.homework.grade import grade_submission
    from course_lib.homework.submit import submit

    base = tmp_path_factory.mktemp("good")
    fake_hw2_sweep(base / "work" / "hw2")
    zip_path = submit("2", "alice", 3, work=base / "work", out=base / "alice.zip", progress=False).path
    alone = grade_submission(zip_path, base / "alone")
    assert not alone["extra_data"]["refused"] and alone["max_score"] > 0
    return zip_path, members_of(zip_path), alone["score"]


def mixed_folder(m: dict, onnx_sidecars: dict[str, str]) -> dict[str, bytes]:
    add = {}
    for name, run in onnx_sidecars.items():
        add[f"artifacts/onnx/{name}.onnx"] = tiny_onnx().SerializeToString()
        add[f"artifacts/onnx/{name}.onnx.json"] = json.dumps({"run_id": run}).encode()
    return add


def unsupported_method(path: Path, m: dict) -> Path:
    """Every member marked with compression method 93 (zstd: Python 3.11's zipfile cannot read it)."""
    make_zip(path, m, compression=zipfile.ZIP_STORED)
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        locals_ = [i.header_offset for i in zf.infolist()]
        start = zf.start_dir
    for offset in locals_:
        data[offset + 8:offset + 10] = (93).to_bytes(2, "little")
    at = start
    while data[at:at + 4] == b"PK\x01\x02":
        data[at + 10:at + 12] = (93).to_bytes(2, "little")
        at += 46 + int.from_bytes(data[at + 28:at + 30], "little") + int.from_bytes(data[at + 30:at + 32], "little") \
            + int.from_bytes(data[at + 32:at + 34], "little")
    path.write_bytes(bytes(data))
    return path


def corrupt_directory(path: Path, good_zip: Path) -> Path:
    data = good_zip.read_bytes()
    at = data.index(b"PK\x01\x02")
    path.write_bytes(data[:at] + b"PK\x01\x00" + data[at + 4:])      # the end record still says "zip"
    return path


# name -> (builder(path, good members, good zip), class, expected status, words of the message)
HOSTILE = {
    "a corrupt central directory": (lambda p, m, z: corrupt_directory(p, z), "isolation", "refused", "corrupt"),
    "members compressed with a method the zip reader lacks":
        (lambda p, m, z: unsupported_method(p, m), "isolation", "refused", "compression method 93"),
    "manifest.json nested 100000 deep":
        (lambda p, m, z: make_zip(p, m, raw_manifest=b"[" * 100000 + b"]" * 100000), "isolation", "refused",
         "RecursionError"),
    "manifest.json with a 5000-digit seed":
        (lambda p, m, z: make_zip(p, m, raw_manifest=m["manifest.json"].replace(b'"seed": 3', b'"seed": ' + b"9" * 5000)),
         "isolation", "refused", "digits"),
    "checks.json whose tests are a number":
        (lambda p, m, z: make_zip(p, m, add={"checks.json": b'{"tests": 5}'}), "isolation", "refused", "checks.json"),
    "a student ID that is the grader's summary.csv":
        (lambda p, m, z: make_zip(p, m, manifest={"student": "summary.csv"}), "isolation", "graded", ""),
    "an .npz member inflating 1000x (8 MB of zeros)":
        (lambda p, m, z: make_zip(p, m, add={"artifacts/bomb.npz": npz_bytes(a=np.zeros(2**21, np.float32))}),
         "nested archives", "refused", "zip bomb inside the zip"),
    "a PNG declaring 100000 x 100000 pixels":
        (lambda p, m, z: make_zip(p, m, add={"artifacts/bomb.png": png_header(100000, 100000)}),
         "nested archives", "refused", "decompression bomb"),
    "ONNX external data in a Constant node, outside the submission":
        (lambda p, m, z: make_zip(p, m, add={"artifacts/evil.onnx": tiny_onnx(
            constant_external="../../../../etc/hostname").SerializeToString()}), "bad ONNX", "refused",
         "external data location"),
    "an onnx/ folder mixing two export runs":
        (lambda p, m, z: make_zip(p, m, add=mixed_folder(m, {"clip": "run-a", "decoder": "run-b"})), "bad ONNX",
         "refused", "mixed export folder"),
}
MORE_HOSTILE = {        # refused before this change too; in the mixed folder to show they still are
    "not a zip at all": (lambda p, m, z: p.write_bytes(b"hello") and p, "refused", "not a zip"),
    "a member named ../evil.json": (lambda p, m, z: make_zip(p, m, add={"../evil.json": b"{}"}), "refused", "traversal"),
    "an .npy header declaring 1 TiB": (lambda p, m, z: make_zip(p, m, add={"artifacts/big.npz": _declared_npz()}),
                                       "refused", "declares"),
    "a tampered hash": (lambda p, m, z: _tampered(p, m), "refused", "tampered"),
}


def _declared_npz() -> bytes:
    """An .npz whose one array's header declares 2**37 float64 (1 TiB) and holds no data."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False, "shape": (2**37,)})
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("a.npy", header.getvalue())
    return buffer.getvalue()


def _tampered(path: Path, m: dict) -> Path:
    make_zip(path, m)
    members = members_of(path)
    members["artifacts/hw2.json"] = members["artifacts/hw2.json"].replace(b"1", b"2", 1)
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def grade_class(folder: Path, out: Path, **options) -> dict[str, dict]:
    """grade_folder over ``folder``; the summary.csv rows by zip name (the run must write it)."""
    from course_lib.homework.grade import grade_folder

    grade_folder(folder, out, progress=False, **options)
    with open(out / "summary.csv", newline="") as f:
        return {row["zip"]: row for row in csv.DictReader(f)}


def check_row(row: dict, status: str, words: str, out: Path) -> None:
    assert row["status"] == status, row
    if status != "graded":
        assert words in row["message"], row["message"]
        assert row["score"] == "0.0"


def hostile_trial(kind: str, good, tmp_path) -> None:
    build, _, status, words = HOSTILE[kind]
    zip_path, m, score = good
    subs = tmp_path / "subs"
    subs.mkdir()
    build(subs / "a_hostile.zip", m, zip_path)
    (subs / "b_good.zip").write_bytes(zip_path.read_bytes())
    rows = grade_class(subs, tmp_path / "results")
    check_row(rows["a_hostile.zip"], status, words, tmp_path / "results")
    assert rows["b_good.zip"]["status"] == "graded" and float(rows["b_good.zip"]["score"]) == score
    if kind.startswith("a student ID"):
        assert (tmp_path / "results" / "summary.csv").is_file()
        assert (tmp_path / "results" / "summary.csv~hw2" / "results.json").is_file()


@fault("isolation", "one student's zip cannot stop the grading of the class: it gets its row, the others are "
                    "graded, summary.csv is written")
@pytest.mark.parametrize("kind", [k for k, v in HOSTILE.items() if v[1] == "isolation"])
def test_one_zip_never_stops_the_class(kind, good, tmp_path):
    hostile_trial(kind, good, tmp_path)


@fault("nested archives", "an archive inside the zip is held to the zip's limits before it is inflated")
@pytest.mark.parametrize("kind", [k for k, v in HOSTILE.items() if v[1] == "nested archives"])
def test_nested_archives_are_bounded(kind, good, tmp_path):
    hostile_trial(kind, good, tmp_path)


@fault("bad ONNX", "a submission's ONNX files are refused when their data points outside or their folder mixes runs")
@pytest.mark.parametrize("kind", [k for k, v in HOSTILE.items() if v[1] == "bad ONNX"])
def test_onnx_in_a_submission(kind, good, tmp_path):
    hostile_trial(kind, good, tmp_path)


@fault("isolation", "a folder mixing good zips with every hostile kind above grades every good one and writes summary.csv")
def test_a_class_of_good_and_hostile_zips(good, tmp_path):
    """good and hostile zips of every kind, graded in one run"""
    zip_path, m, score = good
    subs = tmp_path / "subs"
    subs.mkdir()
    expected = {}
    for i, (kind, (build, _, status, words)) in enumerate(HOSTILE.items()):
        build(subs / f"h{i:02d}.zip", m, zip_path)
        expected[f"h{i:02d}.zip"] = (status, words)
    for i, (kind, (build, status, words)) in enumerate(MORE_HOSTILE.items()):
        build(subs / f"m{i:02d}.zip", m, zip_path)
        expected[f"m{i:02d}.zip"] = (status, words)
    for name in ("g1.zip", "g2.zip", "g3.zip"):
        (subs / name).write_bytes(zip_path.read_bytes())
    rows = grade_class(subs, tmp_path / "results")
    assert len(rows) == len(expected) + 3
    for name, (status, words) in expected.items():
        check_row(rows[name], status, words, tmp_path / "results")
    for name in ("g1.zip", "g2.zip", "g3.zip"):
        assert rows[name]["status"] == "graded" and float(rows[name]["score"]) == score, rows[name]
    assert not [p for p in (tmp_path / "results").iterdir() if p.name.startswith(".")]       # no temporaries left


@fault("limits", "a zip whose grading needs more memory than --max-memory-mb gets an error row; the next is graded")
def test_memory_limit(good, tmp_path):
    """an .npz of 64 MB within loosened zip limits, graded with 32 MB of memory"""
    from course_lib.homework.safezip import ZipLimits

    zip_path, m, score = good
    subs = tmp_path / "subs"
    make_zip(subs / "a_hog.zip", m, add={"artifacts/hog.npz": npz_bytes(a=np.zeros(2**24, np.float32))})
    (subs / "b_good.zip").write_bytes(zip_path.read_bytes())
    rows = grade_class(subs, tmp_path / "results", limits=ZipLimits(max_ratio=1e9), max_memory_mb=32)
    check_row(rows["a_hog.zip"], "error", "memory limit of 32 MB", tmp_path / "results")
    assert rows["b_good.zip"]["status"] == "graded" and float(rows["b_good.zip"]["score"]) == score


@fault("limits", "a zip whose grading takes longer than --timeout is stopped and gets an error row")
def test_time_limit(good, tmp_path):
    """a time limit of 1 ms"""
    zip_path, _, _ = good
    subs = tmp_path / "subs"
    subs.mkdir()
    (subs / "a.zip").write_bytes(zip_path.read_bytes())
    rows = grade_class(subs, tmp_path / "results", timeout=0.001)
    check_row(rows["a.zip"], "error", "time limit of 0.001 s", tmp_path / "results")


@fault("limits", "a crash (a signal) in one zip's grading process stays in that process")
@pytest.mark.parametrize("trial,function,args", [("a segmentation fault", "ctypes.string_at", [0]),
                                                 ("an abort", "os.abort", [])], ids=["segfault", "abort"])
def test_a_crash_stays_in_its_process(trial, function, args, tmp_path):
    from course_lib.homework.isolate import run_isolated

    outcome = run_isolated(function, args, tmp_path / "r.json", timeout=60, max_memory_mb=None)
    assert not outcome.finished and outcome.signal in (signal.SIGSEGV, signal.SIGABRT)
    assert "signal" in outcome.describe()


# ------------------------------------------------------------------------------------------ ONNX Runtime

def write_model(path: Path, model_or_bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model_or_bytes if isinstance(model_or_bytes, bytes) else model_or_bytes.SerializeToString())
    return path


ORT_FAILURES = {
    "a file that is not ONNX": (lambda d: write_model(d / "m.onnx", b"not an onnx model"), "not a valid ONNX model"),
    "a truncated .onnx": (lambda d: write_model(d / "m.onnx", tiny_onnx().SerializeToString()[:-40]),
                          "not a valid ONNX model"),
    "external data that is missing": (lambda d: write_model(d / "m.onnx", tiny_onnx(external="w.bin")),
                                      "external data file"),
    "external data outside the model's folder": (lambda d: _outside(d, tiny_onnx(external="../outside.bin")),
                                                 "outside the model's folder"),
    "a Constant's external data outside the model's folder":
        (lambda d: _outside(d, tiny_onnx(constant_external="../outside.bin")), "outside the model's folder"),
    "an input size the model was not exported for": (lambda d: write_model(d / "m.onnx", tiny_onnx(size=32)),
                                                     "has shape (1, 3, 64, 64), the model expects (1, 3, 32, 32)"),
}


def _outside(folder: Path, model) -> Path:
    (folder.parent / "outside.bin").write_bytes(b"\0" * 4)
    return write_model(folder / "m.onnx", model)


@fault("bad ONNX", "an ONNX file ONNX Runtime cannot load or run is one error line (exit 2), not a traceback")
@pytest.mark.parametrize("kind", list(ORT_FAILURES))
def test_ort_failures_are_one_line(kind, tmp_path):
    """yolo detect --onnx on it"""
    build, words = ORT_FAILURES[kind]
    path = build(tmp_path / "models")
    code, _, err = run_main(["yolo", "detect", "--onnx", path, "--img-size", 64, "--size", "n"])
    one_error_line(code, err, words)


@fault("bad ONNX", "run --backend ort on a folder with a truncated model is one error line")
def test_run_ort_with_a_truncated_model(tmp_path):
    """run --backend ort, clip.onnx truncated"""
    folder = tmp_path / "onnx"
    write_model(folder / "clip.onnx", tiny_onnx().SerializeToString()[:-40])
    code, _, err = run_main(["run", "--backend", "ort", "--onnx-dir", folder, "--steps", 1, "--out", tmp_path / "x.png"])
    one_error_line(code, err, "clip.onnx", "not a valid ONNX model")
    assert not (tmp_path / "x.png").exists()


# ------------------------------------------------------------------------------------------ full disk

@contextlib.contextmanager
def _fake_full(folder: Path):
    """Where no tmpfs can be mounted: every file opened for writing under ``folder`` raises ENOSPC at write."""
    real_open, real_fdopen = builtins.open, os.fdopen
    root = str(folder.resolve())

    class Full(io.RawIOBase):
        def __init__(self, f):
            self.f = f
        def writable(self):
            return True
        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        def close(self):
            self.f.close()
            super().close()
        def __getattr__(self, name):
            return getattr(self.f, name)

    def under(name) -> bool:
        try:
            return str(Path(os.fspath(name)).resolve()).startswith(root)
        except TypeError:
            return False

    def fake_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        return Full(f) if any(c in mode for c in "wax+") and not isinstance(file, int) and under(file) else f

    def fake_fdopen(fd, mode="r", *args, **kwargs):
        f = real_fdopen(fd, mode, *args, **kwargs)
        return Full(f) if any(c in mode for c in "wax+") and under(os.readlink(f"/proc/self/fd/{fd}")) else f

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(builtins, "open", fake_open)
        mp.setattr(io, "open", fake_open)
        mp.setattr(os, "fdopen", fake_fdopen)
        from course_lib.homework import grade           # children do not see the fake: grade in this process
        mp.setattr(grade, "_grade_isolated", lambda job, *a: grade._grade_job(job))
        yield folder


@pytest.fixture
def full_disk(tmp_path, request):
    """A folder on a tiny tmpfs (16 KiB) filled up, or the fake where mounting is not allowed."""
    folder = tmp_path / "disk"
    folder.mkdir()
    mounted = False
    if os.environ.get("COURSE_FAULTS_NO_MOUNT") != "1":
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(folder)],
                                 capture_output=True).returncode == 0
    try:
        request.node.user_properties.append(("disk", "a full tmpfs" if mounted else "a fake raising ENOSPC"))
        if mounted:
            fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT)    # full: not a byte more fits
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * 512)
            os.close(fd)
            yield folder
        else:
            with _fake_full(folder):
                yield folder
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def nothing_under_final_names(folder: Path, *names: str) -> None:
    left = sorted(p.name for p in folder.rglob("*") if p.is_file())
    assert not any(n in left for n in names), left
    assert not [n for n in left if ".tmp-" in n], left


@fault("full disk", "export onto a full disk is one error line naming the file, with nothing under a final name")
def test_export_onto_a_full_disk(full_disk):
    """export --out on a full disk"""
    code, _, err = run_main(["export", "--out", full_disk / "onnx", "--height", 64, "--width", 64, "--no-check"])
    one_error_line(code, err, "No space left on device", "clip.onnx")
    nothing_under_final_names(full_disk, "clip.onnx", "clip.onnx.json")


@fault("full disk", "submit onto a full disk is one error line, and no zip")
def test_submit_onto_a_full_disk(full_disk, tmp_path, fake_hw2_sweep, monkeypatch):
    """submit --out on a full disk"""
    fake_hw2_sweep(tmp_path / "homework" / "hw2")
    monkeypatch.chdir(tmp_path)
    code, _, err = run_main(["submit", "--hw", "2", "--student", "bob", "--seed", 3, "--quiet",
                             "--out", full_disk / "bob.zip"])
    one_error_line(code, err, "No space left on device", "bob.zip")
    nothing_under_final_names(full_disk, "bob.zip")


@fault("full disk", "grade onto a full disk is one error line (no zip is blamed), and no summary.csv")
def test_grade_onto_a_full_disk(full_disk, good, tmp_path):
    """grade --out on a full disk"""
    subs = tmp_path / "subs"
    subs.mkdir()
    (subs / "a.zip").write_bytes(good[0].read_bytes())
    code, _, err = run_main(["grade", subs, "--out", full_disk / "results", "--quiet"])
    one_error_line(code, err, "No space left on device")
    nothing_under_final_names(full_disk, "summary.csv", "results.json")


@fault("full disk", "run --out onto a full disk says the disk is full (not 'unknown extension'), and no image")
def test_run_onto_a_full_disk(full_disk):
    """run --out x.png on a full disk"""
    code, _, err = run_main(["run", "--steps", 1, "--resolution", 64, "--out", full_disk / "x.png"])
    one_error_line(code, err, "No space left on device", "x.png")
    nothing_under_final_names(full_disk, "x.png")


# ------------------------------------------------------------------------------------------ export folders

def folder_of_runs(folder: Path, runs: dict[str, str | None]) -> Path:
    for name, run in runs.items():
        write_model(folder / f"{name}.onnx", tiny_onnx())
        if run is not None:
            (folder / f"{name}.onnx.json").write_text(json.dumps({"run_id": run}))
    return folder


@fault("export folders", "two exports into one --out cannot interleave: the second is refused at once, the first "
                         "leaves one consistent set")
def test_concurrent_exports(tmp_path):
    """two export commands into one folder at once"""
    from course_lib.onnx.folder import LOCK_NAME, check_export_folder, run_ids

    out = tmp_path / "onnx"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    first = subprocess.Popen([sys.executable, "-m", "course_lib", "export", "--out", str(out), "--height", "64",
                              "--width", "64", "--no-check"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while first.poll() is None and time.monotonic() < deadline:
        lock = out / LOCK_NAME
        if lock.is_file() and lock.read_text().strip():
            break
        time.sleep(0.05)
    code, _, err = run_main(["export", "--out", out, "--height", 64, "--width", 64, "--seed", 1, "--no-check"])
    stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-2000:]
    one_error_line(code, err, str(out), "another export")
    ids = run_ids(out)
    assert sorted(ids) == ["clip.onnx", "controlnet.onnx", "decoder.onnx", "unet.onnx"] and len(set(ids.values())) == 1
    assert check_export_folder(out) is not None


@fault("export folders", "a lock held by a killed export (kill -9) is gone: the next export is not blocked")
def test_a_killed_exports_lock_is_released(tmp_path):
    """kill -9 a process holding the export lock"""
    from course_lib.onnx.folder import export_lock

    code = (f"import sys, time; sys.path.insert(0, {str(REPO)!r}); from course_lib.onnx.folder import export_lock\n"
            f"with export_lock({str(tmp_path / 'onnx')!r}):\n    print('locked', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(ValueError, match="another export"), export_lock(tmp_path / "onnx"):
        pass
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with export_lock(tmp_path / "onnx"):
        pass


@fault("export folders", "run and build refuse an ONNX folder whose models come from different export runs, in one line")
@pytest.mark.parametrize("command", ["run", "build"])
def test_a_mixed_folder_is_refused(command, tmp_path):
    folder = folder_of_runs(tmp_path / "onnx", {"clip": "run-a", "controlnet": "run-a", "unet": "run-b",
                                               "decoder": None})
    argv = (["run", "--backend", "ort", "--onnx-dir", folder, "--steps", 1, "--out", tmp_path / "x.png"]
            if command == "run" else ["build", "--onnx-dir", folder, "--out", tmp_path / "plans"])
    code, _, err = run_main(argv)
    one_error_line(code, err, "mixed export folder", "unet.onnx from run run-b", "decoder.onnx without a run id")


# ------------------------------------------------------------------------------------------ arguments

BAD_ARGUMENTS = [
    ("env --bogus", ["env", "--bogus"], "--bogus"),
    ("no command", ["nosuch"], "nosuch"),
    ("demo --steps 0 (before any export)", ["demo", "--steps", "0", "--out", "d"], "--steps"),
    ("export --seed -5", ["export", "--out", "o", "--seed", "-5"], "--seed"),
    ("build --out naming a file", ["build", "--onnx-dir", ".", "--out", "afile.txt"], "--out"),
    ("run --device bogus", ["run", "--device", "bogus", "--out", "x.png"], "--device"),
    ("run --device cuda without a GPU", ["run", "--device", "cuda", "--steps", "1", "--out", "x.png"], "--device cuda"),
    ("run --out x.txt (was refused only after the run)", ["run", "--steps", "1", "--out", "x.txt"], "--out"),
    ("bench --device bogus", ["bench", "--device", "bogus"], "--device"),
    ("score without --reference", ["score", "imgs"], "--reference"),
    ("yolo export --img-size 0", ["yolo", "export", "--img-size", "0", "--out", "y.onnx"], "--img-size"),
    ("yolo export --img-size -32", ["yolo", "export", "--img-size", "-32", "--out", "y.onnx"], "--img-size"),
    ("yolo build --out y.txt", ["yolo", "build", "--onnx", "y.onnx", "--out", "y.txt"], "--out"),
    ("yolo detect --conf 2", ["yolo", "detect", "--conf", "2", "--size", "n", "--img-size", "64"], "--conf"),
    ("yolo detect --iou -1", ["yolo", "detect", "--iou", "-1", "--size", "n", "--img-size", "64"], "--iou"),
    ("yolo check --iou -1 (was accepted)", ["yolo", "check", "--iou", "-1"], "--iou"),
    ("submit --hw 9", ["submit", "--hw", "9", "--student", "a"], "--hw"),
    ("grade --out naming a file", ["grade", "subs", "--out", "afile.txt"], "--out"),
    ("grade --timeout 0", ["grade", "subs", "--out", "r", "--timeout", "0"], "--timeout"),
]


@fault("arguments", "a bad argument value is one error line naming the option (exit 2), before any work")
@pytest.mark.parametrize("argv,option", [pytest.param(a, o, id=t) for t, a, o in BAD_ARGUMENTS])
def test_bad_arguments(argv, option, tmp_path, monkeypatch):
    if argv[:3] == ["run", "--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile.txt").write_text("x")
    (tmp_path / "subs").mkdir()
    (tmp_path / "subs" / "x.zip").write_bytes(b"not a zip")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    code, out, err = run_main(argv)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before         # nothing written: refused before any work
    one_error_line(code, err, option)


# ------------------------------------------------------------------------------------------ backend feeds

@pytest.fixture(scope="module")
def backends(tmp_path_factory):
    from course_lib.backends import OrtBackend

    folder = tmp_path_factory.mktemp("feeds")
    return {precision: OrtBackend(write_model(folder / f"{precision}.onnx", tiny_onnx(int_input=True, fp16=precision == "fp16")))
            for precision in ("fp32", "fp16")}


FEEDS = {
    "float token ids": ({"ids": torch.ones(1, 4), "x": torch.ones(1, 4)}, "input 'ids' is float32, the ONNX file expects int32"),
    "int64 token ids beyond int32": ({"ids": torch.full((1, 4), 2**40), "x": torch.ones(1, 4)},
                                     "beyond the int32"),
    "complex latents": ({"ids": torch.ones(1, 4, dtype=torch.int32), "x": torch.ones(1, 4, dtype=torch.complex64)},
                        "input 'x' is complex64"),
    "a numpy array instead of a tensor": ({"ids": torch.ones(1, 4, dtype=torch.int32), "x": np.ones((1, 4), np.float32)},
                                          "input 'x' is a ndarray, expected a torch.Tensor of float32"),
}


@fault("backend feeds", "OrtBackend.infer refuses a feed whose cast would change it, naming the input and the dtype "
                        "expected; int64 ids in range and float32 into an fp16 graph still work")
@pytest.mark.parametrize("kind", list(FEEDS))
def test_backend_feeds(kind, backends):
    feed, message = FEEDS[kind]
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        backends["fp32"].infer(feed)
    ok = backends["fp32"].infer({"ids": torch.full((1, 4), 7, dtype=torch.int64), "x": torch.ones(1, 4)})
    assert torch.equal(ok["y"], torch.full((1, 4), 8.0))
    half = backends["fp16"].infer({"ids": torch.ones(1, 4, dtype=torch.int32), "x": torch.ones(1, 4)})
    assert half["y"].dtype == torch.float32 and torch.equal(half["y"], torch.full((1, 4), 2.0))


# ------------------------------------------------------------------------------------------ small things

@fault("small things", "the temporary a killed run (kill -9) left is removed by the next write into its folder; "
                       "live and foreign temporaries stay")
def test_stale_temporaries_are_cleaned(tmp_path):
    """kill -9 a writer half-way, then write again"""
    from course_lib.files import atomic_path, write_json

    code = (f"import sys, time; sys.path.insert(0, {str(REPO)!r}); from course_lib.files import atomic_path\n"
            f"with atomic_path({str(tmp_path / 'a.json')!r}) as t:\n"
            "    t.write_text('half'); print('ready', flush=True); time.sleep(120)")
    writer = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "ready"
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    [stale] = [p for p in tmp_path.iterdir() if p.name.startswith(".a.json.")]
    (tmp_path / ".notes.tmp").write_text("not ours")
    with atomic_path(tmp_path / "live.json") as live:             # this process's own, still being written
        live.write_text("{}")
        write_json(tmp_path / "b.json", {"x": 1})
        assert not stale.exists() and live.exists() and (tmp_path / ".notes.tmp").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".notes.tmp", "b.json", "live.json"]


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@fault("small things", "a checkpoint that carries code is refused in one line naming the function, no warnings first")
@pytest.mark.parametrize("writer", ["torch.save", "pickle protocol 4"])
def test_pickle_refusal(writer, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    if writer == "torch.save":
        torch.save({"w": _Evil(marker)}, path)
    else:
        path.write_bytes(pickle.dumps({"w": _Evil(marker)}, protocol=4))
    code, _, err = run_main(["run", "--checkpoint", path, "--steps", 1, "--out", tmp_path / "x.png"])
    one_error_line(code, err, "refused to unpickle", "posix.system" if os.name == "posix" else "system")
    assert not marker.exists()


@fault("small things", "a submit zip is mode 0644 (under umask 022), not 0600")
def test_submit_zip_mode(tmp_path, fake_hw2_sweep):
    from course_lib.homework.submit import submit

    fake_hw2_sweep(tmp_path / "homework" / "hw2")
    old = os.umask(0o022)
    try:
        result = submit("2", "cem", 3, work=tmp_path / "homework", out=tmp_path / "cem.zip", progress=False)
    finally:
        os.umask(old)
    assert oct(result.path.stat().st_mode & 0o777) == oct(0o644)


@fault("small things", "an unexpected bug still shows its traceback (it is not turned into an error line)")
def test_a_bug_keeps_its_traceback(monkeypatch):
    """a command raising ZeroDivisionError"""
    from course_lib.cli import cnsd

    def broken(args):
        return 1 / 0
    monkeypatch.setattr(cnsd, "cmd_env", broken)
    with pytest.raises(ZeroDivisionError):
        main(["env"])
