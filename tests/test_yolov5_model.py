"""Chapter 6: the YOLOv5 model -- shapes, the yolov5 state_dict layout, decoding, fusion, weight loading."""
import copy
import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from course_lib.yolov5 import YOLOv5, load_yolov5_weights, yolov5_preset

LAYOUT = Path(__file__).parent / "data" / "yolov5s_nc9_layout.json"


@pytest.fixture(scope="module")
def nano():
    return YOLOv5(yolov5_preset("n", nc=9), seed=0)


def test_course_shape_at_1120(nano):
    assert yolov5_preset("s", nc=9).output_shape() == (1, 77175, 14)
    with torch.no_grad():
        y = nano(torch.rand(1, 3, 1120, 1120))
    assert tuple(y.shape) == (1, 77175, 14)
    assert torch.isfinite(y).all()
    assert ((y[..., 4:] >= 0) & (y[..., 4:] <= 1)).all() and (y[..., 2:4] > 0).all()


def test_non_square_input_and_other_nc():
    model = YOLOv5(yolov5_preset("n", nc=3), seed=None)
    with torch.no_grad():
        y = model(torch.rand(2, 3, 256, 320))
    assert tuple(y.shape) == (2, 3 * (32 * 40 + 16 * 20 + 8 * 10), 8) == model.config.output_shape(2, 256, 320)


def test_state_dict_matches_pinned_ultralytics_layout():
    pinned = json.loads(LAYOUT.read_text())
    model = YOLOv5(yolov5_preset("s", nc=9), seed=None)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert sorted(set(ours) ^ set(pinned["keys"])) == []
    assert {k: v for k, v in ours.items() if v != pinned["keys"][k]} == {}
    assert sum(p.numel() for p in model.parameters()) == pinned["num_parameters"]


def test_detect_decoding_rows_and_pixels(nano):
    """Zero head convs: every sigmoid is 0.5, so each row is its cell centre and exactly its anchor size."""
    model = copy.deepcopy(nano)
    det = model.model[24]
    for conv in det.m:
        torch.nn.init.zeros_(conv.weight)
        torch.nn.init.zeros_(conv.bias)
    with torch.no_grad():
        y = model(torch.rand(1, 3, 64, 96))[0]                 # grids 8x12, 4x6, 2x3
    start = 3 * 8 * 12                                          # level 1 (stride 16) starts here
    a, gy, gx = 2, 3, 5                                         # anchor 2, cell row 3, column 5
    row = y[start + a * 4 * 6 + gy * 6 + gx]
    assert row[:2].tolist() == [(gx + 0.5) * 16, (gy + 0.5) * 16]
    assert torch.allclose(row[2:4], torch.tensor([59.0, 119.0]))   # the 3rd stride-16 anchor, in pixels
    assert torch.all(row[4:] == 0.5)


def test_fuse_conv_bn_keeps_outputs(nano):
    x = torch.rand(1, 3, 256, 256)
    fused = copy.deepcopy(nano).fuse_conv_bn()
    with torch.no_grad():
        y, yf = nano(x), fused(x)
    assert not any(".bn." in k for k in fused.state_dict())
    assert "model.0.conv.bias" in fused.state_dict()
    assert torch.allclose(yf[..., 4:], y[..., 4:], atol=1e-4)              # probabilities
    assert torch.allclose(yf[..., :4], y[..., :4], rtol=1e-4, atol=1e-2)   # pixels
    assert (nano.model[0].bn.running_var != 1).any()                       # the BN really did something


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_strict_load_round_trip(nano, tmp_path, suffix):
    path = tmp_path / f"w{suffix}"
    if suffix == ".pt":
        torch.save(nano.state_dict(), path)
    else:
        save_file({k: v.contiguous() for k, v in nano.state_dict().items()}, str(path))
    other = YOLOv5(yolov5_preset("n", nc=9), seed=None)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert not torch.equal(other(x), nano(x))
        assert load_yolov5_weights(other, path) is other
        assert torch.equal(other(x), nano(x))


def test_load_errors(nano, tmp_path):
    model = YOLOv5(yolov5_preset("n", nc=9), seed=None)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_yolov5_weights(model, tmp_path / "nothing.pt")

    state = nano.state_dict()
    missing = {k: v for k, v in state.items() if k != "model.24.anchors"}
    torch.save(missing, tmp_path / "missing.pt")
    with pytest.raises(ValueError, match=r"missing \['model.24.anchors'\]"):
        load_yolov5_weights(model, tmp_path / "missing.pt")

    torch.save(YOLOv5(yolov5_preset("n", nc=3), seed=None).state_dict(), tmp_path / "nc3.pt")
    with pytest.raises(ValueError, match=r"model.24.m.0.weight has shape \(24, 64, 1, 1\).*nc=3"):
        load_yolov5_weights(model, tmp_path / "nc3.pt")

    (tmp_path / "junk.pt").write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="neither a file written by torch.save nor a .safetensors"):
        load_yolov5_weights(model, tmp_path / "junk.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"nor is this")
    with pytest.raises(ValueError, match="not a readable .safetensors"):
        load_yolov5_weights(model, tmp_path / "junk.safetensors")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "missing.pt").read_bytes()[:5000])   # a truncated download
    with pytest.raises(ValueError, match="weights_only"):
        load_yolov5_weights(model, tmp_path / "cut.pt")

    torch.save(nano, tmp_path / "whole_model.pt")              # like an ultralytics best.pt: a pickled model
    with pytest.raises(ValueError, match=r"pickles Python objects.*torch.save\(m.float\(\).state_dict\(\)"):
        load_yolov5_weights(model, tmp_path / "whole_model.pt")

    fused = copy.deepcopy(nano).fuse_conv_bn()
    torch.save(state, tmp_path / "ok.pt")
    with pytest.raises(ValueError, match="already fused"):
        load_yolov5_weights(fused, tmp_path / "ok.pt")


class _Payload:
    """A pickle that runs code when loaded without weights_only."""
    marker = None

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_load_refuses_pickled_code(tmp_path):
    _Payload.marker = str(tmp_path / "ran.txt")
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"model.0.conv.weight": _Payload()}, f)
    with pytest.raises(ValueError, match="weights_only"):
        load_yolov5_weights(YOLOv5(yolov5_preset("n"), seed=None), tmp_path / "evil.pt")
    assert not (tmp_path / "ran.txt").exists()


def test_preset_errors():
    with pytest.raises(ValueError, match="unknown YOLOv5 size 'q'"):
        yolov5_preset("q")
    with pytest.raises(ValueError, match="multiple of 32"):
        yolov5_preset("s", img_size=1000)
    with pytest.raises(ValueError, match="nc"):
        yolov5_preset("s", nc=0)


def test_random_init_is_stable_and_input_dependent(nano):
    """Lessons compare backends and precisions on the random model: it must not amplify rounding (chaos)
    nor ignore its input (dead). float32 vs float64 stays close; two images give clearly different outputs."""
    g = torch.Generator().manual_seed(5)
    a, b = torch.rand(1, 3, 128, 128, generator=g), torch.rand(1, 3, 128, 128, generator=g) * 0.5
    with torch.no_grad():
        ya, yb = nano(a), nano(b)
        y64 = copy.deepcopy(nano).double()(a.double())
    assert (ya[..., 4:] - y64[..., 4:]).abs().max() < 1e-4
    assert (ya[..., 4:] - yb[..., 4:]).abs().max() > 0.05
    bn = nano.model[4].cv1.bn
    assert bn.running_var.std() > 0 and bn.running_mean.abs().max() > 0
