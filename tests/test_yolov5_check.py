"""Chapter 6: check_outputs finds planted differences, raw and at the level of detections."""
import copy

import numpy as np
import pytest
import torch

from course_lib.yolov5 import PostProcessor, YOLOv5, check_outputs, comparison_threshold, yolov5_preset

AT_025 = PostProcessor(conf_threshold=0.25)                    # the three planted boxes, no background rows


def reference_output():
    """(1, 60, 14): three confident boxes of classes 1, 4, 7, the rest background."""
    rng = np.random.default_rng(0)
    out = np.zeros((1, 60, 14), np.float32)
    out[0, :, :2] = rng.uniform(20, 600, (60, 2))
    out[0, :, 2:4] = rng.uniform(10, 40, (60, 2))
    out[0, :, 4:] = rng.uniform(0.0, 0.1, (60, 10))
    for i, (x, y, c) in enumerate([(100, 100, 1), (300, 200, 4), (500, 400, 7)]):
        out[0, i, :5] = [x, y, 60, 40, 0.95]
        out[0, i, 5 + c] = 0.97
    return out


def test_identical_outputs_pass():
    ref = reference_output()
    result = check_outputs(ref, ref.copy(), postprocessor=AT_025)
    assert result.passed and result.max_abs_err == 0 and result.matched == 3
    assert "passed" in result.table() and str(result) == result.table()


def test_tiny_noise_passes_but_a_planted_error_does_not():
    ref = reference_output()
    assert check_outputs(ref, ref * (1 + 1e-5)).passed
    bad = ref.copy()
    bad[0, 30, 9] += 0.02                                       # one class probability of a background row
    result = check_outputs(ref, bad)
    assert not result.within_tolerance and not result.passed
    assert result.max_abs_err == pytest.approx(0.02, rel=1e-3)
    assert result.detections_agree                             # the detections did not change


def test_moved_box_and_flipped_class_are_reported():
    ref = reference_output()
    moved = ref.copy()
    moved[0, 0, :2] += 80                                       # box 0 moves away: no longer matches
    r = check_outputs(ref, moved, postprocessor=AT_025)
    assert (r.matched, r.unmatched_reference, r.unmatched_candidate) == (2, 1, 1)
    flipped = ref.copy()
    flipped[0, 1, [9, 6]] = flipped[0, 1, [6, 9]]              # class 4 -> class 1, same box and score
    r = check_outputs(ref, flipped, postprocessor=AT_025)
    assert r.class_mismatches == 1 and r.matched == 3 and not r.detections_agree
    lower = ref.copy()
    lower[0, 2, 4] = 0.93                                       # score 0.95*0.97 -> 0.93*0.97
    r = check_outputs(ref, lower, postprocessor=PostProcessor(conf_threshold=0.5))
    assert r.max_score_diff == pytest.approx(0.02 * 0.97, rel=1e-4)


def test_detections_are_compared_where_boxes_exist():
    ref = reference_output()
    assert comparison_threshold(ref, rows=3) == 0.25              # three rows above 0.25: the ceiling
    low = comparison_threshold(ref, rows=10)                      # random-like rows: lowered to find ten
    scores = ref[0, :, 4] * ref[0, :, 5:].max(axis=1)
    assert low < 0.25 and (scores > low).sum() == 10
    r = check_outputs(ref, ref.copy())
    assert r.conf_threshold < 0.25 and r.detections_reference >= 10 and r.passed


def test_a_box_at_the_threshold_is_borderline_not_a_disagreement():
    ref = reference_output()
    ref[0, 0, 4], ref[0, 0, 6] = 0.5, 0.5                       # score 0.25: on the threshold
    cand = ref.copy()
    ref[0, 0, 4] += 2e-5                                        # just above in one output, not the other
    r = check_outputs(ref, cand, postprocessor=AT_025)
    assert r.borderline == 1 and r.unmatched_reference == 0 and r.detections_agree and r.passed
    cand[0, 1, 4] = 0.2                                         # a confident box drops out: a real difference
    r = check_outputs(ref, cand, postprocessor=AT_025)
    assert r.unmatched_reference == 1 and not r.passed


def test_nan_and_inf_are_counted():
    ref = reference_output()
    bad = ref.copy()
    bad[0, 10, 3], bad[0, 11, 0] = np.nan, np.inf
    r = check_outputs(ref, bad)
    assert r.nonfinite_candidate == 2 and r.nonfinite_reference == 0 and not r.passed


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shapes differ"):
        check_outputs(np.zeros((1, 10, 14)), np.zeros((1, 10, 13)))


def test_fused_model_agrees_with_unfused():
    model = YOLOv5(yolov5_preset("n", nc=9), seed=0)
    x = torch.rand(1, 3, 192, 192)
    with torch.no_grad():
        y, fused = model(x), copy.deepcopy(model).fuse_conv_bn()(x)
    # box columns are pixels: the tolerance is relative to the largest coordinate, not to each value
    r = check_outputs(y, fused)
    assert r.passed, r.table()
    assert r.max_abs_err > 0                                   # fusing really changed the arithmetic
