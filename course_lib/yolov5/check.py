"""Chapter 6: do two YOLOv5 outputs agree? -- raw numbers and the detections a student would see.

``check_outputs(reference, candidate)`` compares two ``output0`` arrays (e.g. torch vs ONNX Runtime, FP32
vs FP16 TensorRT) in two ways:

* raw: ``allclose`` (rtol 1e-3, atol 1e-5 by default), max absolute / relative error, NaN / Inf counts;
* detections: both are post-processed the same way, boxes are matched one to one by IoU, and the table
  reports unmatched boxes on either side, the largest score difference and class disagreements.

The result prints as a plain-text table.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from course_lib.yolov5.processing import Detections, PostProcessor, box_iou


def _numpy(x) -> np.ndarray:
    return x.detach().cpu().float().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32)


@dataclass
class OutputCheck:
    """What :func:`check_outputs` found. ``passed``: raw allclose, finite, and the same detections."""
    shape: tuple
    allclose: bool
    max_abs_err: float
    max_rel_err: float
    nonfinite_reference: int
    nonfinite_candidate: int
    detections_reference: int
    detections_candidate: int
    matched: int
    unmatched_reference: int
    unmatched_candidate: int
    max_score_diff: float
    class_mismatches: int
    rtol: float
    atol: float

    @property
    def detections_agree(self) -> bool:
        return self.unmatched_reference == 0 and self.unmatched_candidate == 0 and self.class_mismatches == 0

    @property
    def passed(self) -> bool:
        return (self.allclose and self.nonfinite_reference == 0 and self.nonfinite_candidate == 0
                and self.detections_agree)

    def table(self) -> str:
        """A two-column plain-text table of every number, then the verdict."""
        rows = [
            ("output shape", str(self.shape)),
            (f"allclose (rtol {self.rtol:g}, atol {self.atol:g})", str(self.allclose)),
            ("max abs error", f"{self.max_abs_err:.3e}"),
            ("max rel error", f"{self.max_rel_err:.3e}"),
            ("NaN/Inf in reference / candidate", f"{self.nonfinite_reference} / {self.nonfinite_candidate}"),
            ("detections reference / candidate", f"{self.detections_reference} / {self.detections_candidate}"),
            ("matched boxes", str(self.matched)),
            ("unmatched reference / candidate", f"{self.unmatched_reference} / {self.unmatched_candidate}"),
            ("max score difference (matched)", f"{self.max_score_diff:.3e}"),
            ("class mismatches (matched)", str(self.class_mismatches)),
            ("passed", str(self.passed)),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)

    def __str__(self) -> str:
        return self.table()


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


def check_outputs(reference, candidate, rtol: float = 1e-3, atol: float = 1e-5,
                  postprocessor: PostProcessor | None = None, match_iou: float = 0.5) -> OutputCheck:
    """Chapter 6: compare two YOLOv5 ``output0`` arrays (torch or numpy, same shape (1, rows, 5 + nc)).

    ``postprocessor``: how detections are made on both sides (default ``PostProcessor(conf_threshold=0.25)``,
    lower than the course's 0.9 so more boxes are compared); ``match_iou``: IoU that makes two boxes the
    same object. Returns an :class:`OutputCheck`; ``print(result)`` shows the table.
    """
    ref, cand = _numpy(reference), _numpy(candidate)
    if ref.shape != cand.shape:
        raise ValueError(f"reference and candidate shapes differ: {ref.shape} vs {cand.shape}")
    finite = np.isfinite(ref) & np.isfinite(cand)
    diff = np.abs(ref - cand)[finite]
    rel = diff / np.maximum(np.abs(ref[finite]), 1e-12)
    post = postprocessor or PostProcessor(conf_threshold=0.25)
    dets_ref, dets_cand = post(np.nan_to_num(ref)), post(np.nan_to_num(cand))
    pairs = match_detections(dets_ref, dets_cand, match_iou)
    score_diff = [abs(float(dets_ref.scores[i] - dets_cand.scores[j])) for i, j in pairs]
    return OutputCheck(
        shape=tuple(ref.shape),
        allclose=bool(finite.all() and np.allclose(cand, ref, rtol=rtol, atol=atol)),
        max_abs_err=float(diff.max()) if diff.size else 0.0,
        max_rel_err=float(rel.max()) if rel.size else 0.0,
        nonfinite_reference=int((~np.isfinite(ref)).sum()),
        nonfinite_candidate=int((~np.isfinite(cand)).sum()),
        detections_reference=len(dets_ref),
        detections_candidate=len(dets_cand),
        matched=len(pairs),
        unmatched_reference=len(dets_ref) - len(pairs),
        unmatched_candidate=len(dets_cand) - len(pairs),
        max_score_diff=max(score_diff, default=0.0),
        class_mismatches=sum(int(dets_ref.classes[i] != dets_cand.classes[j]) for i, j in pairs),
        rtol=rtol, atol=atol,
    )
