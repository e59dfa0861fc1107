"""course_lib.onnx.export: names, static/dynamic shapes, external data, atomic writes, clear errors."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile

import numpy as np
import onnx
import pytest
import torch

from course_lib.onnx.compare import check_onnx_against_torch

from course_lib.onnx.session import run_ort
from course_lib.onnx.export import dynamic_axes_from_names, export_onnx, load_onnx_checked

AXES = {"x": ("B", "C", "H", "W"), "t": ("B",), "y": ("B", "K"), "h": ("B", "C", "H", "W")}


class Tiny(torch.nn.Module):
    """conv + embedding of an int32 input + linear; two outputs."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.emb = torch.nn.Embedding(10, 16)
        self.lin = torch.nn.Linear(16, 5)

    def forward(self, x, t):
        h = torch.nn.functional.silu(self.conv(x)) + self.emb(t)[:, :, None, None]
        return self.lin(h.mean((2, 3))), h


def feed(batch=2, height=16, width=24):
    g = torch.Generator().manual_seed(batch)
    return {"x": torch.randn(batch, 3, height, width, generator=g),
            "t": torch.randint(0, 10, (batch,), generator=g, dtype=torch.int32)}


def leftovers(folder):
    return [p.name for p in folder.iterdir() if ".tmp-" in p.name]


def dims(value_info):
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def test_static_export_names_dtypes_parity_and_sidecar(tmp_path):
    m = Tiny().eval()
    result = export_onnx(m, feed(), tmp_path / "tiny.onnx", output_names=["y", "h"], progress=False)
    model = load_onnx_checked(result)
    assert [i.name for i in model.graph.input] == ["x", "t"]
    assert [o.name for o in model.graph.output] == ["y", "h"]
    assert dims(model.graph.input[0]) == [2, 3, 16, 24] and dims(model.graph.output[1]) == [2, 16, 16, 24]
    assert model.graph.input[1].type.tensor_type.elem_type == onnx.TensorProto.INT32
    assert model.opset_import[0].version == 18
    assert not result.external_data and not (tmp_path / "tiny.onnx.data").exists()
    assert check_onnx_against_torch(m, result, feed(), rtol=1e-4, atol=1e-5).passed
    assert run_ort(result, feed())["h"].shape == (2, 16, 16, 24)           # the result works as a path

    side = json.loads((tmp_path / "tiny.onnx.json").read_text())
    assert side["sha256"] == hashlib.sha256((tmp_path / "tiny.onnx").read_bytes()).hexdigest()
    assert side["inputs"] == [{"name": "x", "shape": [2, 3, 16, 24], "dtype": "float32"},
                              {"name": "t", "shape": [2], "dtype": "int32"}]
    assert [o["name"] for o in side["outputs"]] == ["y", "h"] and side["external_data"] is None
    assert side["opset"] == 18 and side["versions"]["torch"] == torch.__version__
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.onnx", "tiny.onnx.json"]


def test_static_export_rejects_another_batch(tmp_path):
    export_onnx(Tiny().eval(), feed(), tmp_path / "s.onnx", output_names=["y", "h"], progress=False)
    with pytest.raises(ValueError, match="the model expects"):
        run_ort(tmp_path / "s.onnx", feed(batch=3))


def test_dynamic_axes_from_names_run_at_other_sizes(tmp_path):
    m = Tiny().eval()
    axes = dynamic_axes_from_names(AXES, {"B", "H", "W"})
    assert axes["x"] == {0: "B", 2: "H", 3: "W"} and axes["y"] == {0: "B"}
    result = export_onnx(m, feed(), tmp_path / "dyn.onnx", output_names=["y", "h"], dynamic_axes=axes,
                         progress=False)
    model = load_onnx_checked(result)
    assert dims(model.graph.input[0]) == ["B", 3, "H", "W"] and dims(model.graph.input[1]) == ["B"]
    assert result.outputs[1].shape == ("B", 16, "H", "W")
    for batch, h, w in [(1, 16, 24), (5, 8, 40)]:
        table = check_onnx_against_torch(m, result, feed(batch, h, w), rtol=1e-4, atol=1e-5)
        assert table.passed and table.rows[1].ref_shape == (batch, 16, h, w)


def test_dynamic_axes_from_specs_and_unknown_names():
    class Spec:
        def __init__(self, name, axes):
            self.name, self.axes = name, axes

    specs = [Spec("x_noisy", ("B", "C", "h", "w")), Spec("control3", ("B", "C", "h/2", "w/2"))]
    assert dynamic_axes_from_names(specs, ["w"]) == {"x_noisy": {3: "w"}, "control3": {3: "w/2"}}
    assert dynamic_axes_from_names(specs, []) == {}
    with pytest.raises(ValueError, match=r"\['Q'\]"):
        dynamic_axes_from_names(specs, ["B", "Q"])


def test_external_data_forced_by_threshold(tmp_path):
    m = Tiny().eval()
    result = export_onnx(m, feed(), tmp_path / "ext.onnx", output_names=["y", "h"], progress=False,
                         external_data_threshold_bytes=100)
    data = tmp_path / "ext.onnx.data"
    assert result.external_data and result.data_path == data and data.is_file()
    model = onnx.load(str(tmp_path / "ext.onnx"), load_external_data=False)
    outside = {t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    assert outside == {"conv.weight"} and data.stat().st_size == 16 * 3 * 3 * 3 * 4   # tensors < 1 KiB stay inline
    locations = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"ext.onnx.data"}                   # one file, relative to the .onnx
    assert json.loads((tmp_path / "ext.onnx.json").read_text())["external_data"] == "ext.onnx.data"
    assert check_onnx_against_torch(m, result, feed()).passed
    assert len(load_onnx_checked(result).graph.initializer) == len(model.graph.initializer)

    # exporting again without external data replaces the trio and removes the stale .data
    again = export_onnx(m, feed(), tmp_path / "ext.onnx", output_names=["y", "h"], progress=False,
                        external_data=False)
    assert not again.external_data and not data.exists() and not leftovers(tmp_path)


def test_failure_mid_export_leaves_nothing(tmp_path, monkeypatch):
    def broken_checker(*args, **kwargs):
        raise RuntimeError("simulated crash after the weights were written")

    monkeypatch.setattr(onnx.checker, "check_model", broken_checker)
    with pytest.raises(RuntimeError, match="simulated crash"):
        export_onnx(Tiny().eval(), feed(), tmp_path / "a.onnx", output_names=["y", "h"], progress=False,
                    external_data=True)
    assert list(tmp_path.iterdir()) == []


def test_failure_inside_torch_export_leaves_nothing(tmp_path, monkeypatch):
    real = torch.onnx.export

    def half_written(module, args, f, **kwargs):
        real(module, args, f, **kwargs)
        with open(f, "r+b") as fh:
            fh.truncate(10)
        raise KeyboardInterrupt                        # e.g. Ctrl-C during the export

    monkeypatch.setattr(torch.onnx, "export", half_written)
    (tmp_path / "b.onnx").write_bytes(b"old export")    # an earlier, complete export stays untouched
    with pytest.raises(KeyboardInterrupt):
        export_onnx(Tiny().eval(), feed(), tmp_path / "b.onnx", output_names=["y", "h"], progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.onnx"]
    assert (tmp_path / "b.onnx").read_bytes() == b"old export"


def test_bad_targets(tmp_path, monkeypatch):
    m, f = Tiny().eval(), feed()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file: expected a folder"):
        export_onnx(m, f, tmp_path / "file" / "sub" / "m.onnx", output_names=["y", "h"], progress=False)
    (tmp_path / "dir.onnx").mkdir()
    with pytest.raises(ValueError, match="is a folder"):
        export_onnx(m, f, tmp_path / "dir.onnx", output_names=["y", "h"], progress=False)
    with pytest.raises(ValueError, match="ending in .onnx"):
        export_onnx(m, f, tmp_path / "m.pt", output_names=["y", "h"], progress=False)

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    with pytest.raises(PermissionError, match="not writable"):
        export_onnx(m, f, tmp_path / "m.onnx", output_names=["y", "h"], progress=False)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores folder permissions")
def test_unwritable_folder(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(PermissionError, match="not writable"):
            export_onnx(Tiny().eval(), feed(), locked / "m.onnx", output_names=["y", "h"], progress=False)
    finally:
        locked.chmod(0o700)


def test_bad_arguments(tmp_path):
    m, out = Tiny().eval(), tmp_path / "m.onnx"
    with pytest.raises(ValueError, match="example input 'x': expected a torch.Tensor, got ndarray"):
        export_onnx(m, {"x": np.zeros((2, 3, 16, 24), np.float32), "t": feed()["t"]}, out, output_names=["y", "h"])
    with pytest.raises(ValueError, match="expected as many input_names"):
        export_onnx(m, tuple(feed().values()), out, output_names=["y", "h"])
    with pytest.raises(ValueError, match="torch.nn.Module"):
        export_onnx(lambda x, t: x, feed(), out, output_names=["y"])
    with pytest.raises(ValueError, match="neither inputs nor outputs"):
        export_onnx(m, feed(), out, output_names=["y", "h"], dynamic_axes={"z": {0: "B"}})
    with pytest.raises(ValueError, match=r"returned 2 outputs \['y', 'onnx::"):
        export_onnx(m, feed(), out, output_names=["y"], progress=False)
    assert list(tmp_path.iterdir()) == []
    # a tuple with names works like the dict
    result = export_onnx(m, tuple(feed().values()), out, input_names=["x", "t"], output_names=["y", "h"],
                         progress=False)
    assert [t.name for t in result.inputs] == ["x", "t"]


def test_load_onnx_checked_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_onnx_checked(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(os.urandom(300))
    with pytest.raises(ValueError, match="not a valid ONNX model"):
        load_onnx_checked(tmp_path / "junk.onnx")

    good = export_onnx(Tiny().eval(), feed(), tmp_path / "g.onnx", output_names=["y", "h"], progress=False)
    raw = good.path.read_bytes()
    (tmp_path / "cut.onnx").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="cut.onnx is not a valid ONNX model"):
        load_onnx_checked(tmp_path / "cut.onnx")

    ext = export_onnx(Tiny().eval(), feed(), tmp_path / "e.onnx", output_names=["y", "h"], progress=False,
                      external_data=True)
    with open(ext.data_path, "r+b") as fh:
        fh.truncate(ext.data_path.stat().st_size // 2)
    with pytest.raises(ValueError, match="e.onnx.data is truncated"):
        load_onnx_checked(ext)
    ext.data_path.unlink()
    with pytest.raises(FileNotFoundError, match="e.onnx.data is missing"):
        load_onnx_checked(ext, load_external_data=False)



def test_one_file_per_weight_layout_is_gathered_into_one_data_file(tmp_path):
    # torch writes models over 2 GB as one file per weight; the export gathers them into <name>.data
    from course_lib.onnx.external_data import gather_weights

    m = Tiny().eval()
    export_onnx(m, feed(), tmp_path / "inline.onnx", output_names=["y", "h"], progress=False)
    split = tmp_path / "split"
    split.mkdir()
    onnx.save_model(onnx.load(str(tmp_path / "inline.onnx")), str(split / "t.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=False, size_threshold=0)
    assert len(list(split.iterdir())) == 1 + len(list(m.parameters()))
    assert gather_weights(split / "t.onnx", "t.onnx.data")
    for f in split.iterdir():
        if f.name not in ("t.onnx", "t.onnx.data"):
            f.unlink()                                   # the per-weight files are no longer needed
    assert check_onnx_against_torch(m, split / "t.onnx", feed()).passed
