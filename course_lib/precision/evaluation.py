"""How much INT8 costs in accuracy, and what it buys in speed -- measured, never assumed.

Chapter 5 introduces this module, after :mod:`course_lib.precision.int8` has written the Q/DQ models:

* :func:`int8_accuracy` -- per model and output, the INT8 model's error against the fp32 model on the
  same recorded inputs (use runs held out of calibration: :class:`~course_lib.precision.calibration.CalibrationReader`
  ``runs=``). ONNX Runtime executes Q/DQ graphs on the CPU, so this runs anywhere.
* :func:`compare_images` -- end to end: the image from the INT8 ControlNet/UNet against the fp32 image
  (PSNR, largest pixel difference, and the course's PD where pytorch-fid and its weights are installed).
* :func:`detection_agreement` -- YOLOv5: how many fp32 detections the INT8 model finds again.
* :func:`ort_latency` -- ONNX Runtime latency of one model on one feed (fp32 vs INT8 on the CPU here;
  TensorRT INT8 vs FP16 is measured with TensorRT engines on a GPU machine).
"""
from __future__ import annotations

import html
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class AccuracyRow:
    """INT8 vs fp32 for one output of one model over ``samples`` inputs (errors in float64)."""
    model: str
    output: str
    samples: int
    max_abs: float       # max |int8 - fp32|
    mean_abs: float      # mean |int8 - fp32|
    rel_l2: float        # ||int8 - fp32|| / ||fp32|| over all samples
    cosine: float        # mean over samples of the cosine similarity of the flattened outputs


@dataclass
class AccuracyTable:
    """Chapter 5: rows of :func:`int8_accuracy`; ``print(table)`` or a notebook's HTML rendering."""
    rows: list[AccuracyRow]
    title: str = "INT8 vs fp32"

    @classmethod
    def combine(cls, tables: Iterable["AccuracyTable"], title: str = "INT8 vs fp32") -> "AccuracyTable":
        return cls([r for t in tables for r in t.rows], title)

    def worst(self) -> AccuracyRow:
        """The row with the largest relative error."""
        return max(self.rows, key=lambda r: r.rel_l2)

    def _cells(self) -> tuple[list[str], list[list[str]]]:
        headers = ["model", "output", "samples", "max abs", "mean abs", "rel L2", "cosine"]
        body = [[r.model, r.output, str(r.samples), f"{r.max_abs:.3e}", f"{r.mean_abs:.3e}", f"{r.rel_l2:.2%}",
                 f"{r.cosine:.5f}"] for r in self.rows]
        return headers, body

    def __str__(self) -> str:
        headers, body = self._cells()
        widths = [max(len(h), *(len(row[i]) for row in body)) for i, h in enumerate(headers)]
        line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
        return "\n".join([self.title, line(headers), line(["-" * w for w in widths])] + [line(r) for r in body])

    def _repr_html_(self) -> str:
        headers, body = self._cells()
        head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
        rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body)
        return f"<table><caption>{html.escape(self.title)}</caption><tr>{head}</tr>{rows}</table>"


def _session(path, providers):
    from course_lib.onnx.session import ort_session

    return ort_session(path, list(providers) if providers else ["CPUExecutionProvider"])


def int8_accuracy(fp32_onnx, int8_onnx, feeds, name: str | None = None,
                  providers: Sequence[str] | None = None, progress: bool = True) -> AccuracyTable:
    """Chapter 5: run the fp32 and the INT8 model on the same inputs and measure the INT8 error.

    Args:
        fp32_onnx, int8_onnx: paths of the two models (same inputs and outputs).
        feeds: a :class:`~course_lib.precision.calibration.CalibrationReader` (its samples, in order) or any iterable
            of ``{input name: array}``; use held-out runs, not the ones the ranges were calibrated on.
        name: the model's name in the table (default: the fp32 file name).
        providers: ONNX Runtime providers (default CPU, where Q/DQ graphs run everywhere).
    Returns an :class:`AccuracyTable`, one row per output.
    """
    from pathlib import Path

    from course_lib.progress import tqdm

    ref, cand = _session(fp32_onnx, providers), _session(int8_onnx, providers)
    outputs = [o.name for o in ref.get_outputs()]
    if outputs != [o.name for o in cand.get_outputs()]:
        raise ValueError(f"{int8_onnx}: outputs differ from the fp32 model's {outputs}")
    feeds = feeds.feeds() if hasattr(feeds, "feeds") else feeds
    stats = {o: {"max": 0.0, "abs": 0.0, "n": 0, "d2": 0.0, "r2": 0.0, "cos": []} for o in outputs}
    for feed in tqdm(feeds, desc="INT8 vs fp32", disable=not progress):
        for o, a, b in zip(outputs, ref.run(outputs, feed), cand.run(outputs, feed)):
            a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
            d, s = b - a, stats[o]
            s["max"] = max(s["max"], float(np.abs(d).max(initial=0.0)))
            s["abs"] += float(np.abs(d).sum())
            s["n"] += d.size
            s["d2"] += float(d @ d)
            s["r2"] += float(a @ a)
            norms = math.sqrt(float(a @ a) * float(b @ b))
            s["cos"].append(float(a @ b) / norms if norms > 0 else float(np.array_equal(a, b)))
    if not stats[outputs[0]]["cos"]:
        raise ValueError("feeds: no inputs; expected at least one sample")
    name = name or Path(fp32_onnx).stem
    rows = [AccuracyRow(name, o, len(s["cos"]), s["max"], s["abs"] / max(s["n"], 1),
                        math.sqrt(s["d2"] / s["r2"]) if s["r2"] > 0 else math.inf * (s["d2"] > 0),
                        statistics.fmean(s["cos"])) for o, s in stats.items()]
    return AccuracyTable(rows, f"{name}: INT8 vs fp32 on {len(stats[outputs[0]]['cos'])} samples")


@dataclass(frozen=True)
class ImageAgreement:
    """Chapter 5: an INT8 pipeline's image against the fp32 one."""
    psnr_db: float
    max_pixel_diff: int
    pd: float | None          # the course's perceptual distance (None: pytorch-fid or its weights missing)

    def __str__(self) -> str:
        pd = "not measured (pytorch-fid or its weights missing)" if self.pd is None else f"{self.pd:.2f}"
        return f"PSNR {self.psnr_db:.2f} dB, max pixel difference {self.max_pixel_diff}, PD {pd}"


def compare_images(reference, candidate, with_pd: bool | None = None, device: str | None = None) -> ImageAgreement:
    """Chapter 5: PSNR, largest pixel difference and (where possible) PD of two uint8 HxWx3 images.

    ``with_pd``: True requires pytorch-fid and its weights; None measures PD where they are installed.
    """
    from course_lib.env import MissingDependency
    from course_lib.score import max_pixel_diff, perceptual_distance, psnr

    pd = None
    if with_pd is not False:
        try:
            pd = perceptual_distance(candidate, reference, device)
        except MissingDependency:
            if with_pd:
                raise
    return ImageAgreement(psnr(reference, candidate), max_pixel_diff(reference, candidate), pd)


@dataclass(frozen=True)
class DetectionAgreement:
    """Chapter 5: detections of an INT8 detector matched one to one against the fp32 detector's."""
    reference: int            # fp32 detections
    candidate: int            # INT8 detections
    matched: int              # pairs with the same class and IoU >= the threshold
    mean_iou: float           # over the matched pairs (nan when none)

    @property
    def recall(self) -> float:
        """Share of the fp32 detections found again (1.0 when there were none)."""
        return self.matched / self.reference if self.reference else 1.0

    @property
    def precision(self) -> float:
        """Share of the INT8 detections that match an fp32 one (1.0 when there were none)."""
        return self.matched / self.candidate if self.candidate else 1.0

    def __str__(self) -> str:
        return (f"{self.matched} of {self.reference} fp32 detections found again by INT8 ({self.recall:.0%}), "
                f"{self.candidate - self.matched} extra; mean IoU {self.mean_iou:.3f}")


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    x1, y1 = np.maximum(box[0], boxes[:, 0]), np.maximum(box[1], boxes[:, 1])
    x2, y2 = np.minimum(box[2], boxes[:, 2]), np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    return inter / np.maximum(area(box) + area(boxes) - inter, 1e-12)


def detection_agreement(reference, candidate, iou_threshold: float = 0.5) -> DetectionAgreement:
    """Chapter 5: match INT8 detections to fp32 detections (after NMS), greedily by confidence.

    Both are arrays (N, 6) of ``x1, y1, x2, y2, confidence, class``, or chapter 6's ``Detections``
    (``.boxes``, ``.scores``, ``.classes``). An fp32 detection is found again when an unmatched INT8
    detection of the same class overlaps it with IoU >= ``iou_threshold``.
    """
    def rows(d) -> np.ndarray:
        if hasattr(d, "boxes"):
            d = np.column_stack([np.asarray(d.boxes).reshape(-1, 4), np.asarray(d.scores), np.asarray(d.classes)])
        return np.asarray(d, np.float64).reshape(-1, 6)

    ref, cand = rows(reference), rows(candidate)
    free = np.ones(len(cand), bool)
    ious = []
    for det in ref[np.argsort(-ref[:, 4])]:
        options = np.flatnonzero(free & (cand[:, 5] == det[5]))
        if options.size == 0:
            continue
        overlap = _iou(det[:4], cand[options, :4])
        best = int(np.argmax(overlap))
        if overlap[best] >= iou_threshold:
            free[options[best]] = False
            ious.append(float(overlap[best]))
    return DetectionAgreement(len(ref), len(cand), len(ious), statistics.fmean(ious) if ious else math.nan)


@dataclass(frozen=True)
class Latency:
    """Chapter 5: ONNX Runtime latency of one model on one feed, in milliseconds."""
    model: str
    provider: str
    median_ms: float
    min_ms: float
    runs: int

    def __str__(self) -> str:
        return f"{self.model} on {self.provider}: median {self.median_ms:.2f} ms, min {self.min_ms:.2f} ms ({self.runs} runs)"


def ort_latency(onnx_path, feed: Mapping, runs: int = 20, warmup: int = 3, providers: Sequence[str] | None = None,
                intra_op_threads: int | None = None) -> Latency:
    """Chapter 5: time ``runs`` ONNX Runtime calls of one model on ``feed`` after ``warmup`` calls.

    ``intra_op_threads`` fixes ONNX Runtime's thread count (None: its default, all cores); compare fp32
    and INT8 with the same setting on the same machine, and quote the machine with the number.
    """
    import onnxruntime as ort
    from pathlib import Path

    from course_lib.timing import time_cpu

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if intra_op_threads:
        options.intra_op_num_threads = intra_op_threads
    providers = list(providers) if providers else ["CPUExecutionProvider"]
    session = ort.InferenceSession(str(onnx_path), sess_options=options, providers=providers)
    feed = {k: np.asarray(v) for k, v in feed.items()}
    times = time_cpu(lambda: session.run(None, feed), warmup=warmup, iters=runs, sync=lambda: None)
    return Latency(Path(onnx_path).name, session.get_providers()[0], statistics.median(times), min(times), runs)


__all__ = ["AccuracyRow", "AccuracyTable", "DetectionAgreement", "ImageAgreement", "Latency", "compare_images",
           "detection_agreement", "int8_accuracy", "ort_latency"]
