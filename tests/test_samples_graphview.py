"""Offline sample photo, atomic image writing, and the ONNX graph helpers."""
import numpy as np
import pytest
import torch

from course_lib.onnx.graph import io_table, op_census
from course_lib.onnx.export import export_onnx
from course_lib.samples import center_crop_resize, read_image, sample_photo, write_image


def test_sample_photo_is_a_real_photo_at_the_course_size():
    photo = sample_photo()
    assert photo.shape == (256, 384, 3) and photo.dtype == np.uint8
    assert photo.std() > 20                       # a photograph, not a flat image
    assert sample_photo(size=None).shape == (600, 512, 3)


def test_center_crop_keeps_the_middle():
    image = np.zeros((100, 300, 3), np.uint8)
    image[:, 100:200] = 255                       # a bright middle third
    out = center_crop_resize(image, 50, 50)
    assert out.shape == (50, 50, 3) and out.mean() > 250


def test_write_and_read_round_trip(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 255, (8, 12, 3), dtype=np.uint8)
    path = write_image(tmp_path / "a" / "x.png", rgb)
    assert np.array_equal(read_image(path), rgb)
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.png"]   # no temp file left


@pytest.mark.parametrize("target, error", [("dir", "is a folder"), ("x.nope", "could not write")])
def test_write_image_errors(tmp_path, target, error):
    (tmp_path / "dir").mkdir()
    with pytest.raises(ValueError, match=error):
        write_image(tmp_path / target, np.zeros((4, 4, 3), np.uint8))
    assert not list(tmp_path.glob("*.tmp*")) and not list(tmp_path.glob(".*"))


def test_read_image_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_image(tmp_path / "missing.png")
    (tmp_path / "bad.png").write_text("not an image")
    with pytest.raises(ValueError, match="not a readable image"):
        read_image(tmp_path / "bad.png")


def test_op_census_and_io_table(tmp_path):
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x).softmax(-1)

    path = export_onnx(Net(), {"x": torch.randn(2, 4)}, tmp_path / "net.onnx", output_names=["y"],
                       dynamic_axes={"x": {0: "B"}, "y": {0: "B"}}, progress=False).path
    census = op_census(path)
    assert census["Softmax"] == 1 and census["Gemm"] + census["MatMul"] == 1
    assert io_table(path).splitlines() == ["input  x                   float32  (B, 4)",
                                           "output y                   float32  (B, 3)"]
    (tmp_path / "bad.onnx").write_bytes(b"\x08\x99garbage")
    with pytest.raises(ValueError, match="not a readable ONNX"):
        op_census(tmp_path / "bad.onnx")
