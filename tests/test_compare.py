"""course_lib.onnx.compare: parity tables, ONNX Runtime helpers, layer-wise search through Polygraphy."""
from __future__ import annotations

import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from course_lib.onnx.compare import ComparisonTable, check_onnx_against_torch, compare_outputs, layerwise_compare
from course_lib.onnx.session import ort_session, run_ort
from course_lib.env import MissingDependency
from course_lib.onnx.export import export_onnx


class Net(torch.nn.Module):
    """conv -> relu -> conv -> relu -> conv, plus an embedding of an int32 input."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.c1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.c3 = torch.nn.Conv2d(8, 4, 1)
        self.emb = torch.nn.Embedding(10, 4)

    def forward(self, x, t):
        h = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.c3(h) + self.emb(t)[:, :, None, None], h


FEED = {"x": torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)),
        "t": torch.tensor([1, 5], dtype=torch.int32)}


@pytest.fixture(scope="module")
def net_onnx(tmp_path_factory):
    path = tmp_path_factory.mktemp("compare") / "net.onnx"
    export_onnx(Net().eval(), FEED, path, output_names=["y", "h"], progress=False)
    return path


def test_identical_outputs_pass_and_table_prints():
    ref = {"a": np.linspace(-2, 2, 12, dtype=np.float32).reshape(3, 4), "b": torch.ones(5)}
    table = compare_outputs(ref, {"a": ref["a"].copy(), "b": torch.ones(5)})
    assert table.passed and [r.name for r in table.rows] == ["a", "b"]
    assert table.rows[0].max_abs == 0 and table.rows[0].max_rel == 0
    lines = str(table).splitlines()
    assert lines[0].split() == ["output", "shape", "max", "abs", "max", "rel", "allclose", "result"]
    assert lines[2].split()[:2] == ["a", "3x4"] and lines[-1].endswith("PASSED")
    col = lines[0].index("max abs")                                   # fixed width: numbers line up
    assert [line[col:col + 9] for line in lines[2:4]] == ["0.000e+00", "0.000e+00"]
    assert "<table>" in table._repr_html_() and "PASSED" in table._repr_html_()


def test_planted_difference_is_caught_with_its_size():
    ref = np.full((4, 4), 2.0, np.float32)
    cand = ref.copy()
    cand[1, 2] += 0.01
    row = compare_outputs({"y": ref}, {"y": cand}).rows[0]
    assert not row.allclose and not row.passed
    assert row.max_abs == pytest.approx(0.01, rel=1e-4)
    assert row.max_rel == pytest.approx(0.01 / 2.0, rel=1e-4)       # relative to max |reference|
    assert compare_outputs({"y": ref}, {"y": cand}, rtol=1e-2).passed  # 0.01 <= 1e-5 + 1e-2 * 2


def test_nan_inf_shape_and_names_fail_with_a_note():
    ref = {"a": np.zeros(3, np.float32), "b": np.zeros((2, 3)), "c": np.ones(2), "d": np.ones(1)}
    cand = {"a": np.array([0, np.nan, 0], np.float32), "b": np.zeros((3, 2)), "c": np.array([1, np.inf]),
            "e": np.ones(1)}
    table = compare_outputs(ref, cand)
    notes = {r.name: r.note for r in table.rows}
    assert notes == {"a": "NaN/Inf in candidate", "b": "shape mismatch", "c": "NaN/Inf in candidate",
                     "d": "missing in candidate", "e": "not in reference"}
    assert not table.passed and len(table.failed) == 5
    assert "FAIL: shape mismatch" in str(table) and "2x3 vs 3x2" in str(table)
    assert compare_outputs({"a": np.array([np.nan])}, {"a": np.array([np.nan])}).rows[0].note == \
        "NaN/Inf in reference and candidate"


def test_combined_report_has_a_row_per_model_and_output():
    good = compare_outputs({"y": np.ones(2)}, {"y": np.ones(2)})
    bad = compare_outputs({"y": np.ones(2), "z": np.ones(2)}, {"y": np.ones(2), "z": np.zeros(2)})
    report = ComparisonTable.combine({"clip": good, "unet": bad}, title="parity")
    assert [(r.model, r.name) for r in report.rows] == [("clip", "y"), ("unet", "y"), ("unet", "z")]
    assert not report.passed and [r.name for r in report.failed] == ["z"]
    text = str(report).splitlines()
    assert text[0] == "parity" and text[1].split()[0] == "model" and text[-1].endswith("FAILED (1 of 3 rows)")


def test_ort_session_and_run_ort_keep_int32(net_onnx):
    import onnxruntime

    session = ort_session(net_onnx)
    assert session.get_providers()[0] in onnxruntime.get_available_providers()
    out = run_ort(session, FEED)
    assert list(out) == ["y", "h"] and out["y"].shape == (2, 4, 8, 8) and out["y"].dtype == np.float32
    assert list(run_ort(net_onnx, FEED, output_names=["h"])) == ["h"]
    with pytest.raises(ValueError, match="input 't': got int64, the model expects tensor\\(int32\\)"):
        run_ort(session, {"x": FEED["x"], "t": FEED["t"].long()})
    with pytest.raises(ValueError, match="feed names"):
        run_ort(session, {"x": FEED["x"]})
    with pytest.raises(ValueError, match="NoSuchExecutionProvider"):
        ort_session(net_onnx, providers=["NoSuchExecutionProvider"])
    with pytest.raises(FileNotFoundError):
        ort_session(net_onnx.with_name("absent.onnx"))


def test_check_onnx_against_torch_passes_then_catches_changed_weights(net_onnx):
    net = Net().eval()
    table = check_onnx_against_torch(net, net_onnx, FEED, rtol=1e-4, atol=1e-5)
    assert table.passed and [r.name for r in table.rows] == ["y", "h"]
    with torch.no_grad():
        net.c3.bias[0] += 0.1                          # the torch module no longer matches the ONNX
    table = check_onnx_against_torch(net, net_onnx, FEED)
    assert [r.passed for r in table.rows] == [False, True]


def _perturbed_copy(src, dst, initializer):
    model = onnx.load(str(src))
    for init in model.graph.initializer:
        if init.name == initializer:
            w = numpy_helper.to_array(init).copy()
            w.flat[0] += 0.5
            init.CopyFrom(numpy_helper.from_array(w, init.name))
    onnx.save(model, str(dst))
    return dst


def test_layerwise_names_the_planted_bad_layer(net_onnx, tmp_path):
    bad = _perturbed_copy(net_onnx, tmp_path / "bad.onnx", "c2.weight")
    result = layerwise_compare(net_onnx, bad, FEED)
    first = result.first_bad
    assert first is not None and first.name == "/c2/Conv_output_0" and first.model == "Conv /c2/Conv"
    names = [r.name for r in result.table.rows]
    assert names.index("/c1/Conv_output_0") < names.index("/c2/Conv_output_0") < names.index("y")
    assert all(r.passed for r in result.table.rows[: names.index("/c2/Conv_output_0")])
    assert "first tensor out of tolerance: '/c2/Conv_output_0' from Conv /c2/Conv" in str(result)

    same = layerwise_compare(net_onnx, net_onnx, FEED)
    assert same.first_bad is None and same.table.passed and len(same.table.rows) == len(names)


def test_layerwise_runs_an_fp16_candidate(net_onnx, tmp_path):
    from onnxconverter_common import float16

    fp16 = tmp_path / "net_fp16.onnx"
    onnx.save(float16.convert_float_to_float16(onnx.load(str(net_onnx)), keep_io_types=False), str(fp16))
    result = layerwise_compare(net_onnx, fp16, FEED, rtol=1e-2, atol=1e-2)
    assert result.table.rows[0].name == "/c1/Conv_output_0" and result.table.passed
    assert 0 < result.table.rows[0].max_abs < 1e-2                 # fp16 rounding, visible but small


def test_layerwise_without_polygraphy_says_what_to_install(net_onnx, monkeypatch):
    monkeypatch.setitem(sys.modules, "polygraphy.backend.onnxrt", None)
    with pytest.raises(MissingDependency, match="pip install polygraphy"):
        layerwise_compare(net_onnx, net_onnx, FEED)
