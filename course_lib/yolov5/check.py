"""Chapter 6: do two YOLOv5 outputs agree? -- raw numbers and the detections a student would see.

One definition, shared by ``python -m course_lib yolo check`` and the chapter:

* raw: every number within ``tolerance`` of its column group's scale -- boxes (x, y, w, h) are pixels of
  a 1120-pixel image, so their scale is the largest reference coordinate; objectness and class
  probabilities live in [0, 1], scale 1. A plain ``allclose(rtol, atol)`` either fails a correct export
  (6e-3 px on a 1000-px coordinate) or passes a wrong probability. ``FP32_TOLERANCE`` for torch vs ONNX
  Runtime, ``FP16_TOLERANCE`` for an FP16 engine;
* detections: both outputs post-processed alike at a confidence that finds boxes even on random
  weights (:func:`comparison_threshold`), boxes matched one to one by IoU; unmatched boxes, score
  differences and class disagreements are reported. A box whose score lies within the tolerance of
  the threshold may fall on either side of it: it is counted as borderline, not as a disagreement.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from course_lib.yolov5.processing import Detections, PostProcessor, box_iou

FP32_TOLERANCE = 1e-4       # torch vs ONNX Runtime (both fp32): the rounding of a different kernel order
FP16_TOLERANCE = 1e-2       # an FP16 engine against fp32
COMPARE_BOXES = 50          # detections are compared on (at least) the reference's 50 best rows


def _numpy(x) -> np.ndarray:
    return x.detach().cpu().float().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32)


@dataclass
class OutputCheck:
    """What :func:`check_outputs` found. ``passed``: within tolerance, finite, and the same detections."""
    shape: tuple
    within_tolerance: bool
    tolerance: float
    box_scale: float
    max_abs_err: float
    max_rel_err: float                 # relative to each column group's scale
    nonfinite_reference: int
    nonfinite_candidate: int
    conf_threshold: float
    detections_reference: int
    detections_candidate: int
    matched: int
    unmatched_reference: int
    unmatched_candidate: int
    borderline: int
    max_score_diff: float
    class_mismatches: int

    @property
    def detections_agree(self) -> bool:
        return self.unmatched_reference == 0 and self.unmatched_candidate == 0 and self.class_mismatches == 0

    @property
    def passed(self) -> bool:
        return (self.within_tolerance and self.nonfinite_reference == 0 and self.nonfinite_candidate == 0
                and self.detections_agree)

    def table(self) -> str:
        """A two-column plain-text table of every number, then the verdict."""
        rows = [
            ("output shape", str(self.shape)),
            (f"within {self.tolerance:g} x scale (boxes {self.box_scale:.0f} px, scores 1)", str(self.within_tolerance)),
            ("max abs error", f"{self.max_abs_err:.3e}"),
            ("max error / scale", f"{self.max_rel_err:.3e}"),
            ("NaN/Inf in reference / candidate", f"{self.nonfinite_reference} / {self.nonfinite_candidate}"),
            (f"detections at conf {self.conf_threshold:.3g} ref / cand",
             f"{self.detections_reference} / {self.detections_candidate}"),
            ("matched boxes", str(self.matched)),
            ("unmatched reference / candidate", f"{self.unmatched_reference} / {self.unmatched_candidate}"),
            ("borderline (score at the threshold)", str(self.borderline)),
            ("max score difference (matched)", f"{self.max_score_diff:.3e}"),
            ("class mismatches (matched)", str(self.class_mismatches)),
            ("passed", str(self.passed)),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)

    def __str__(self) -> str:
        return self.table()


def comparison_threshold(output, ceiling: float = 0.25, rows: int = COMPARE_BOXES) -> float:
    """The confidence at which two outputs' detections are compared: ``ceiling`` (0.25), or lower when
    fewer than ``rows`` rows reach it -- random weights are rarely confident, and comparing zero boxes
    with zero boxes proves nothing. Scores are obj x best class probability, as :class:`PostProcessor` has them."""
    out = _numpy(output).reshape(-1, _numpy(output).shape[-1])
    scores = np.sort(out[:, 4] * out[:, 5:].max(axis=1))[::-1]
    if len(scores) == 0:
        return ceiling
    kth = np.float32(scores[min(rows, len(scores)) - 1])
    return min(ceiling, float(np.nextafter(kth, np.float32(-np.inf))))    # just below the k-th, in float32


def match_detections(a: Detections, b: Detections, iou_threshold: float = 0.5) -> list[tuple[int, int]]:
    """Pair boxes of ``a`` and ``b`` one to one, highest IoU first, only pairs with IoU >= ``iou_threshold``."""
    if len(a) == 0 or len(b) == 0:
        return []
    iou = box_iou(a.boxes, b.boxes)
    pairs, used_a, used_b = [], set(), set()
    for flat in np.argsort(-iou, axis=None, kind="stable"):
        i, j = divmod(int(flat), iou.shape[1])
        if iou[i, j] < iou_threshold:
            break
        if i not in used_a and j not in used_b:
            pairs.append((i, j))
            used_a.add(i)
            used_b.add(j)
    return pairs


def check_outputs(reference, candidate, tolerance: float = FP32_TOLERANCE,
                  postprocessor: PostProcessor | None = None, match_iou: float = 0.5) -> OutputCheck:
    """Chapter 6: compare two YOLOv5 ``output0`` arrays (torch or numpy, same shape (1, rows, 5 + nc)).

    ``tolerance``: of each column group's scale (module docstring); ``postprocessor``: how detections are
    made on both sides (default: NMS IoU 0.5 at :func:`comparison_threshold` of the reference);
    ``match_iou``: IoU that makes two boxes the same object. ``print(result)`` shows the table.
    """
    ref, cand = _numpy(reference), _numpy(candidate)
    if ref.shape != cand.shape:
        raise ValueError(f"reference and candidate shapes differ: {ref.shape} vs {cand.shape}")
    if not tolerance > 0:
        raise ValueError(f"tolerance {tolerance}: expected a number > 0, e.g. {FP32_TOLERANCE} (fp32) or {FP16_TOLERANCE} (fp16)")
    finite = np.isfinite(ref) & np.isfinite(cand)
    box_scale = float(np.abs(np.where(finite, ref, 0)[..., :4]).max(initial=1.0))
    scale = np.ones(ref.shape[-1], np.float32)
    scale[:4] = box_scale
    err = np.where(finite, np.abs(ref - cand), 0.0)
    post = postprocessor or PostProcessor(conf_threshold=comparison_threshold(np.nan_to_num(ref)))
    dets_ref, dets_cand = post(np.nan_to_num(ref)), post(np.nan_to_num(cand))
    pairs = match_detections(dets_ref, dets_cand, match_iou)
    score_diff = [abs(float(dets_ref.scores[i] - dets_cand.scores[j])) for i, j in pairs]

    def decided(dets: Detections, matched: set[int]) -> tuple[int, int]:
        """(unmatched boxes clearly above the threshold, borderline ones)."""
        lone = [k for k in range(len(dets)) if k not in matched]
        border = sum(float(dets.scores[k]) - post.conf_threshold <= tolerance for k in lone)
        return len(lone) - border, border

    lone_ref, border_ref = decided(dets_ref, {i for i, _ in pairs})
    lone_cand, border_cand = decided(dets_cand, {j for _, j in pairs})
    return OutputCheck(
        shape=tuple(ref.shape),
        within_tolerance=bool(finite.all() and (err <= tolerance * scale).all()),
        tolerance=tolerance, box_scale=box_scale,
        max_abs_err=float(err.max(initial=0.0)),
        max_rel_err=float((err / scale).max(initial=0.0)),
        nonfinite_reference=int((~np.isfinite(ref)).sum()),
        nonfinite_candidate=int((~np.isfinite(cand)).sum()),
        conf_threshold=float(post.conf_threshold),
        detections_reference=len(dets_ref),
        detections_candidate=len(dets_cand),
        matched=len(pairs),
        unmatched_reference=lone_ref,
        unmatched_candidate=lone_cand,
        borderline=border_ref + border_cand,
        max_score_diff=max(score_diff, default=0.0),
        class_mismatches=sum(int(dets_ref.classes[i] != dets_cand.classes[j]) for i, j in pairs),
    )
