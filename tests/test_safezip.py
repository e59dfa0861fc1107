"""course_lib.homework.safezip (homework submission and grading): hashing, writing, and refusing unsafe zips."""
from __future__ import annotations

import stat
import zipfile

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from course_lib.homework.contents import check_external_data, check_file_types
from course_lib.homework.safezip import (UnsafeSubmission, ZipLimits, check_member_name, hash_files, inspect_zip,
                                safe_extract, sha256_file, verify_hashes, write_zip)


def make_zip(path, members: dict, links: dict | None = None, modes: dict | None = None):
    """A zip written with zipfile directly, so that it can hold what write_zip never writes."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            info = zipfile.ZipInfo(name)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = ((modes or {}).get(name, stat.S_IFREG | 0o644)) << 16
            zf.writestr(info, data)
        for name, target in (links or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return path


def listing(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


@pytest.mark.parametrize("name, why", [
    ("../evil.txt", "path traversal"), ("artifacts/../../x.json", "path traversal"),
    ("/etc/passwd.txt", "absolute"), ("C:/x/artifacts/a.json", "absolute"), ("artifacts\\a.json", "backslash"),
    ("artifacts/./a.json", "path traversal"), ("artifacts//a.json", "path traversal"),
    ("notes/a.json", "outside manifest.json"), ("artifacts/model.pt", "not accepted"),
    ("artifacts/unet.plan", "not accepted"), ("artifacts/x.pkl", "not accepted"), ("artifacts/a\x00.json", "control"),
])
def test_unsafe_member_names_are_refused(name, why):
    with pytest.raises(UnsafeSubmission, match=why):
        check_member_name(name)


def test_safe_member_names_pass():
    for name in ("manifest.json", "checks.json", "artifacts/onnx/unet.onnx", "artifacts/onnx/unet.onnx.data",
                 "artifacts/images/input.png", "artifacts/O3/unet.plan.json", "artifacts/"):
        assert check_member_name(name) == name


def test_write_zip_is_atomic_reproducible_and_extracts(tmp_path):
    src = tmp_path / "a.json"
    src.write_text('{"a": 1}')
    members = {"manifest.json": b"{}", "artifacts/a.json": src}
    first = write_zip(tmp_path / "out" / "s.zip", members).read_bytes()
    assert listing(tmp_path / "out") == ["s.zip"]                          # no temp file left behind
    assert write_zip(tmp_path / "out" / "s.zip", members).read_bytes() == first   # fixed dates and modes
    assert safe_extract(tmp_path / "out" / "s.zip", tmp_path / "x") == ["manifest.json", "artifacts/a.json"]
    assert (tmp_path / "x" / "artifacts" / "a.json").read_text() == '{"a": 1}'
    with pytest.raises(ValueError, match="ending in .zip"):
        write_zip(tmp_path / "s.tar", members)
    with pytest.raises(UnsafeSubmission, match="path traversal"):
        write_zip(tmp_path / "t.zip", {"artifacts/../a.json": b"{}"})
    assert not (tmp_path / "t.zip").exists()


@pytest.mark.parametrize("kind", ["traversal", "absolute", "symlink", "fifo", "duplicate", "case", "pickle"])
def test_unsafe_zips_are_refused_before_anything_is_written(tmp_path, kind):
    members, links, modes = {"manifest.json": b"{}"}, {}, {}
    if kind == "traversal":
        members["artifacts/../../evil.json"] = b"{}"
    elif kind == "absolute":
        members["/tmp/evil.json"] = b"{}"
    elif kind == "symlink":
        links["artifacts/secret.json"] = "/etc/passwd"
    elif kind == "fifo":
        members["artifacts/pipe.json"] = b""
        modes["artifacts/pipe.json"] = stat.S_IFIFO | 0o644
    elif kind == "duplicate":
        members["artifacts/a.json"] = b"{}"
    elif kind == "case":
        members["artifacts/A.json"] = b"{}"
        members["artifacts/a.json"] = b"{}"
    elif kind == "pickle":
        members["artifacts/weights.pth"] = b"\x80\x04N."
    path = make_zip(tmp_path / "s.zip", members, links, modes)
    if kind == "duplicate":                                                    # zipfile allows a second entry
        with zipfile.ZipFile(path, "a") as zf, pytest.warns(UserWarning):
            zf.writestr("artifacts/a.json", b"{}")
    with pytest.raises(UnsafeSubmission) as err:
        safe_extract(path, tmp_path / "dest")
    message = str(err.value)
    assert "\n" not in message and ("member" in message or "twice" in message)
    assert listing(tmp_path) == ["s.zip"]                                       # dest was never created


def test_size_limits(tmp_path):
    noise = np.random.default_rng(0).bytes(3 << 20)                            # incompressible
    big = make_zip(tmp_path / "big.zip", {"manifest.json": b"{}", "artifacts/a.data": noise})
    with pytest.raises(UnsafeSubmission, match="per-file limit of 1 MB"):
        inspect_zip(big, ZipLimits(max_file_mb=1))
    with pytest.raises(UnsafeSubmission, match="over the limit of 2 MB"):
        inspect_zip(big, ZipLimits(max_total_mb=2))
    bomb = make_zip(tmp_path / "bomb.zip", {"manifest.json": b"{}", "artifacts/a.data": b"\0" * (3 << 20)})
    with pytest.raises(UnsafeSubmission, match="expands 10..x, over the limit of 200x .a zip bomb"):
        inspect_zip(bomb)                                                      # zeros compress ~1000x
    many = make_zip(tmp_path / "many.zip", {f"artifacts/{i}.json": b"{}" for i in range(5)})
    with pytest.raises(UnsafeSubmission, match="6 members|5 members"):
        inspect_zip(many, ZipLimits(max_members=4))
    assert len(inspect_zip(big)) == 2                                          # within the defaults
    (tmp_path / "not.zip").write_text("hello")
    with pytest.raises(UnsafeSubmission, match="not a zip file"):
        inspect_zip(tmp_path / "not.zip")


def test_hash_files_and_verify_hashes(tmp_path, capsys):
    root = tmp_path / "root"
    (root / "artifacts").mkdir(parents=True)
    (root / "checks.json").write_text("{}")
    (root / "artifacts" / "a.data").write_bytes(b"x" * 5000)
    files = hash_files({"checks.json": root / "checks.json", "artifacts/a.data": root / "artifacts" / "a.data"},
                       progress=True, bar_from_bytes=1)
    assert "hashing" in capsys.readouterr().err                                 # the tqdm bar, on stderr
    assert files["artifacts/a.data"] == {"sha256": sha256_file(root / "artifacts" / "a.data"), "bytes": 5000}
    assert list(files) == ["artifacts/a.data", "checks.json"]
    verify_hashes(root, files)                                                 # unchanged: passes
    (root / "manifest.json").write_text("{}")                                  # the manifest itself is not listed
    verify_hashes(root, files)
    (root / "artifacts" / "a.data").write_bytes(b"y" * 5000)
    with pytest.raises(UnsafeSubmission, match="tampered file: artifacts/a.data"):
        verify_hashes(root, files)
    (root / "artifacts" / "a.data").write_bytes(b"x" * 5000)
    (root / "artifacts" / "extra.json").write_text("{}")
    with pytest.raises(UnsafeSubmission, match="extra.json is in the zip but not in its manifest"):
        verify_hashes(root, files)
    (root / "artifacts" / "extra.json").unlink()
    (root / "checks.json").unlink()
    with pytest.raises(UnsafeSubmission, match="checks.json is listed in the manifest but missing"):
        verify_hashes(root, files)


def test_file_types_are_sniffed(tmp_path):
    (tmp_path / "ok.json").write_text("[1]")
    np.savez(tmp_path / "ok.npz", a=np.arange(3))
    check_file_types(tmp_path, ["ok.json", "ok.npz"])
    (tmp_path / "bad.json").write_bytes(b"\x80\x04N.")                        # a pickle named .json
    with pytest.raises(UnsafeSubmission, match="bad.json: not a valid json file"):
        check_file_types(tmp_path, ["bad.json"])
    np.savez(tmp_path / "obj.npz", a=np.array([{"x": 1}], dtype=object))      # object arrays need pickle
    with pytest.raises(UnsafeSubmission, match="obj.npz: not a valid npz"):
        check_file_types(tmp_path, ["obj.npz"])
    (tmp_path / "fake.png").write_bytes(b"GIF89a")
    with pytest.raises(UnsafeSubmission, match="fake.png: not a valid png file"):
        check_file_types(tmp_path, ["fake.png"])
    (tmp_path / "w.safetensors").write_bytes(b"PK\x03\x04 a torch zip")
    with pytest.raises(UnsafeSubmission, match="w.safetensors"):
        check_file_types(tmp_path, ["w.safetensors"])


def _onnx_with_external(folder, location: str):
    """A one-node ONNX whose weight lives in external data at ``location`` (which may be hostile)."""
    weight = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    weight.ClearField("raw_data")
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "64")):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [weight])
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "m.onnx"
    onnx.save_model(helper.make_model(graph), str(path))
    return path


@pytest.mark.parametrize("location, why", [("../../secret.data", "not a plain relative path"),
                                           ("/etc/passwd", "not a plain relative path"),
                                           ("C:\\x.data", "not a plain relative path"),
                                           ("missing.data", "not in the submission")])
def test_external_data_must_stay_inside(tmp_path, location, why):
    path = _onnx_with_external(tmp_path / "root" / "onnx", location)
    with pytest.raises(UnsafeSubmission, match=why):
        check_external_data(path, tmp_path / "root")


def test_external_data_inside_passes(tmp_path):
    path = _onnx_with_external(tmp_path / "root" / "onnx", "m.onnx.data")
    (path.parent / "m.onnx.data").write_bytes(np.ones(16, np.float32).tobytes())
    assert check_external_data(path, tmp_path / "root") == ["m.onnx.data"]
    (path.parent / "m.onnx.data").unlink()
    assert check_external_data(path, tmp_path / "root", must_exist=False) == ["m.onnx.data"]
