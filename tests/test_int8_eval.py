"""course_lib.precision.evaluation (chapter 5): INT8 vs fp32 error tables, image and detection agreement, ORT latency."""
import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from course_lib.precision.evaluation import (AccuracyTable, ImageAgreement, compare_images, detection_agreement, int8_accuracy,
                                  ort_latency)
from course_lib.precision.int8 import quantize_int8


def _feeds(n, seed=0):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(n)]


class Reader:
    """A minimal ONNX Runtime calibration reader (get_next / rewind) over a list of feeds."""

    def __init__(self, feeds):
        self.feeds_, self.i = feeds, 0

    def get_next(self):
        self.i += 1
        return self.feeds_[self.i - 1] if self.i <= len(self.feeds_) else None

    def rewind(self):
        self.i = 0


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """x -> Conv 3->8 -> Relu -> Conv 8->4 (y) and its INT8 copy."""
    folder = tmp_path_factory.mktemp("eval")
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3, "w1"),
             numpy_helper.from_array(rng.standard_normal((4, 8, 1, 1)).astype(np.float32) * 0.3, "w2")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    fp32 = folder / "small.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(fp32))
    result = quantize_int8(fp32, folder / "small.int8.onnx", Reader(_feeds(8)), method="ort", progress=False)
    assert result.samples == 8 and result.report.passed
    return fp32, result.path


def test_int8_accuracy_measures_the_int8_error(models):
    fp32, int8 = models
    table = int8_accuracy(fp32, int8, _feeds(3, seed=7), name="small", progress=False)
    (row,) = table.rows
    assert (row.model, row.output, row.samples) == ("small", "y", 3)
    assert 0 < row.rel_l2 < 0.05 and 0 < row.mean_abs <= row.max_abs and 0.99 < row.cosine < 1
    same = int8_accuracy(fp32, fp32, _feeds(2), progress=False).rows[0]
    assert (same.max_abs, same.rel_l2, same.cosine) == (0.0, 0.0, pytest.approx(1.0))
    both = AccuracyTable.combine([table, int8_accuracy(fp32, fp32, _feeds(2), name="copy", progress=False)])
    assert both.worst() is row and "small" in str(both) and "<table>" in both._repr_html_()
    with pytest.raises(ValueError, match="no inputs"):
        int8_accuracy(fp32, int8, [], progress=False)


def test_compare_images():
    a = np.zeros((4, 4, 3), np.uint8)
    b = a.copy()
    b[0, 0, 0] = 10
    agreement = compare_images(a, b, with_pd=False)
    assert isinstance(agreement, ImageAgreement) and agreement.max_pixel_diff == 10 and agreement.pd is None
    assert agreement.psnr_db == pytest.approx(10 * math.log10(255 ** 2 / (100 / 48)))
    assert "PD not measured" in str(agreement)


def test_detection_agreement_matches_by_class_and_iou():
    ref = np.array([[0, 0, 10, 10, 0.9, 1], [20, 20, 30, 30, 0.8, 2], [50, 50, 60, 60, 0.7, 0]])
    cand = np.array([[1, 0, 11, 10, 0.85, 1],          # same object, IoU 9/11
                     [20, 20, 30, 30, 0.8, 3],          # right box, wrong class
                     [80, 80, 90, 90, 0.6, 0]])         # a new detection
    agreement = detection_agreement(ref, cand)
    assert (agreement.reference, agreement.candidate, agreement.matched) == (3, 3, 1)
    assert agreement.mean_iou == pytest.approx(90 / 110) and agreement.recall == pytest.approx(1 / 3)
    assert detection_agreement(ref, ref).recall == 1.0 and detection_agreement(ref, ref).precision == 1.0
    class Detections:                                   # chapter 6's result type: boxes, scores, classes
        boxes, scores, classes = cand[:, :4], cand[:, 4], cand[:, 5].astype(int)

    assert detection_agreement(ref, Detections()).matched == 1
    empty = detection_agreement(np.zeros((0, 6)), np.zeros((0, 6)))
    assert empty.recall == 1.0 and empty.matched == 0 and math.isnan(empty.mean_iou)


def test_ort_latency(models):
    fp32, _ = models
    latency = ort_latency(fp32, _feeds(1)[0], runs=3, warmup=1, intra_op_threads=1)
    assert latency.runs == 3 and 0 < latency.min_ms <= latency.median_ms
    assert latency.provider == "CPUExecutionProvider" and "small.onnx" in str(latency)
