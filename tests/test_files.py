"""course_lib.files: artifacts are written whole or not at all, and hashed."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from course_lib.files import atomic_copy, atomic_path, atomic_write_bytes, atomic_write_text, sha256_file, write_json


def test_atomic_writes_leave_no_temp_files(tmp_path):
    target = tmp_path / "sub" / "x.plan"
    atomic_write_bytes(target, b"plan bytes")
    atomic_write_text(tmp_path / "t.txt", "héllo")
    assert target.read_bytes() == b"plan bytes"
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "héllo"
    with pytest.raises(TypeError):
        atomic_write_bytes(tmp_path / "broken.plan", object())  # not a buffer: fails mid-write
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["t.txt", "x.plan"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "r.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed half-way")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_write_json_and_copy(tmp_path):
    path = write_json(tmp_path / "a" / "r.json", {"x": np.float32(1.5), "n": np.int64(3), "inf": math.inf,
                                                  "_private": 1, "p": tmp_path})
    assert json.loads(path.read_text()) == {"x": 1.5, "n": 3, "inf": "inf", "p": str(tmp_path)}
    copy = atomic_copy(path, tmp_path / "b" / "r.json")
    assert copy.read_text() == path.read_text()


def test_sha256_file(tmp_path):
    (tmp_path / "abc.onnx").write_bytes(b"abc")
    assert sha256_file(tmp_path / "abc.onnx") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
