"""Chapter 6: what happens around the detector -- letterbox in, boxes out.

``PreProcessor``  image (H, W, 3) uint8 -> ``images`` (1, 3, S, S) float in [0, 1], RGB, plus a
                  :class:`Letterbox` that remembers how the image was scaled and padded.
``PostProcessor`` ``output0`` (1, rows, 5 + nc) -> :class:`Detections` in the ORIGINAL image's pixels:
                  score = obj * class probability, threshold, best class, NMS, undo the letterbox.
``draw_boxes``    the detections drawn on a copy of the image.

Two bugs of the original course script are fixed here: nc is read from the LAST axis of the output
(``output.shape[-1] - 5``), and boxes are mapped back by removing the padding before dividing by the
scale (the old code divided by the per-axis stretch, which is wrong for any non-square image).
Everything is numpy (and OpenCV for resizing and drawing), so the same code serves torch, ONNX Runtime
and TensorRT outputs.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch

PAD_VALUE = 114  # the grey yolov5 pads with


@dataclass(frozen=True)
class Letterbox:
    """How an image was fitted into the model input: ``input = resize(image, scale)`` placed at ``pad``.

    ``scale``: resize factor (same for both axes); ``pad``: (left, top) pixels of grey before the image;
    ``image_shape`` / ``input_shape``: (height, width) of the original image and of the model input.
    """
    scale: float
    pad: tuple[int, int]
    image_shape: tuple[int, int]
    input_shape: tuple[int, int]

    def to_image(self, boxes_xyxy: np.ndarray) -> np.ndarray:
        """Map (N, 4) x1y1x2y2 boxes from model-input pixels to original-image pixels, clipped to the image."""
        left, top = self.pad
        out = (np.asarray(boxes_xyxy, dtype=np.float32) - [left, top, left, top]) / self.scale
        h, w = self.image_shape
        out[:, [0, 2]] = out[:, [0, 2]].clip(0, w)
        out[:, [1, 3]] = out[:, [1, 3]].clip(0, h)
        return out


def letterbox(image: np.ndarray, size: int | tuple[int, int] = 1120) -> tuple[np.ndarray, Letterbox]:
    """Chapter 6: resize ``image`` (H, W, C) keeping its aspect ratio, pad it centred with grey 114.

    ``size``: the model input, an int (square) or (height, width). Returns the padded uint8 image and
    its :class:`Letterbox`. Odd padding puts the extra pixel on the bottom / right.
    """
    th, tw = (size, size) if isinstance(size, int) else size
    h, w = image.shape[:2]
    scale = min(th / h, tw / w)
    nh, nw = round(h * scale), round(w * scale)
    resized = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR) if (nh, nw) != (h, w) else image
    top, left = (th - nh) // 2, (tw - nw) // 2
    out = np.full((th, tw) + image.shape[2:], PAD_VALUE, dtype=image.dtype)
    out[top:top + nh, left:left + nw] = resized
    return out, Letterbox(scale, (left, top), (h, w), (th, tw))


class PreProcessor:
    """Chapter 6: image -> ``images`` tensor for YOLOv5.

    ``size``: model input (int or (height, width), multiples of 32; the course uses 1120).
    ``channel_order``: the order of the images you pass in: ``"bgr"`` for ``cv2.imread`` (default),
    ``"rgb"`` for PIL / matplotlib. The model always receives RGB, as yolov5 was trained.
    """

    def __init__(self, size: int | tuple[int, int] = 1120, channel_order: str = "bgr"):
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        if any(s <= 0 or s % 32 for s in self.size):
            raise ValueError(f"model input size must be positive multiples of 32 (the largest stride), got {size}")
        if channel_order.lower() not in ("bgr", "rgb"):
            raise ValueError(f"channel_order must be 'bgr' or 'rgb', got {channel_order!r}")
        self.channel_order = channel_order.lower()

    def __call__(self, image: np.ndarray) -> tuple[torch.Tensor, Letterbox]:
        """``image``: uint8 (H, W, 3). Returns (``images`` float32 (1, 3, S, S) in [0, 1], :class:`Letterbox`)."""
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected a uint8 image of shape (H, W, 3), got {image.dtype} {image.shape}")
        boxed, box = letterbox(image, self.size)
        if self.channel_order == "bgr":
            boxed = boxed[:, :, ::-1]                                 # BGR -> RGB
        chw = np.ascontiguousarray(boxed.transpose(2, 0, 1))          # HWC -> CHW
        return torch.from_numpy(chw).float().div_(255).unsqueeze(0), box


@dataclass
class Detections:
    """Boxes found in one image: ``boxes`` (N, 4) x1, y1, x2, y2 in pixels, ``scores`` (N,), ``classes`` (N,)."""
    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray

    def __len__(self) -> int:
        return len(self.scores)

    def rows(self, names: list[str] | None = None) -> list[str]:
        """One line per box: class, score, box -- for printing in a notebook."""
        return [f"{names[c] if names else c:>10}  {s:.3f}  [{', '.join(f'{v:7.1f}' for v in b)}]"
                for b, s, c in zip(self.boxes, self.scores, self.classes)]


def xywh_to_xyxy(xywh: np.ndarray) -> np.ndarray:
    """(N, 4) centre x, centre y, width, height -> (N, 4) x1, y1, x2, y2."""
    xy, half = xywh[:, :2], xywh[:, 2:4] / 2
    return np.concatenate([xy - half, xy + half], axis=1)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in ``a`` (N, 4) with every box in ``b`` (M, 4), x1y1x2y2 -> (N, M)."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float = 0.5) -> np.ndarray:
    """Chapter 6: greedy non-maximum suppression; returns indices of the kept boxes, best score first.

    Take the best remaining box, drop every remaining box that overlaps it by IoU > ``iou_threshold``,
    repeat. Each step compares one box with all the others at once (numpy).
    """
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        best, order = order[0], order[1:]
        keep.append(best)
        if order.size:
            order = order[box_iou(boxes[best:best + 1], boxes[order])[0] <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


class PostProcessor:
    """Chapter 6: ``output0`` -> :class:`Detections`.

    ``conf_threshold``: keep rows with obj > it and obj * class probability > it (the course used 0.9);
    ``iou_threshold``: NMS overlap (0.5 in the course); ``agnostic``: one NMS over all classes instead of
    one per class; ``max_det``: at most this many boxes per image.
    """

    def __init__(self, conf_threshold: float = 0.9, iou_threshold: float = 0.5, agnostic: bool = False,
                 max_det: int = 300):
        self.conf_threshold, self.iou_threshold = conf_threshold, iou_threshold
        self.agnostic, self.max_det = agnostic, max_det

    def __call__(self, output, letterbox: Letterbox | None = None) -> Detections:
        """``output``: one image's output0, (1, rows, 5 + nc) or (rows, 5 + nc), torch or numpy.

        With ``letterbox`` the boxes come back in the original image's pixels, else in model-input pixels.
        """
        out = output.detach().cpu().numpy() if isinstance(output, torch.Tensor) else np.asarray(output)
        if out.ndim == 3:
            if out.shape[0] != 1:
                raise ValueError(f"PostProcessor takes one image's output, got a batch of {out.shape[0]}: "
                                 "pass output[i:i+1] per image")
            out = out[0]
        nc = out.shape[-1] - 5                                   # x, y, w, h, obj, then one column per class
        if out.ndim != 2 or nc < 1:
            raise ValueError(f"expected output0 of shape (1, rows, 5 + nc), got {tuple(np.shape(output))}")
        out = out[out[:, 4] > self.conf_threshold].astype(np.float32)
        probs = out[:, 5:] * out[:, 4:5]                          # P(class and object) = obj * cls
        classes = probs.argmax(axis=1)
        scores = probs[np.arange(len(probs)), classes]
        ok = scores > self.conf_threshold
        boxes, scores, classes = xywh_to_xyxy(out[ok, :4]), scores[ok], classes[ok]
        if self.agnostic:
            keep = nms(boxes, scores, self.iou_threshold)
        else:  # shift each class to its own region so boxes of different classes never overlap
            span = float(boxes.max() - boxes.min()) + 1.0 if len(boxes) else 0.0
            shift = span * classes[:, None].astype(np.float32)
            keep = nms(boxes + shift, scores, self.iou_threshold)
        keep = keep[: self.max_det]
        boxes, scores, classes = boxes[keep], scores[keep], classes[keep]
        if letterbox is not None:
            boxes = letterbox.to_image(boxes)
        return Detections(boxes.astype(np.float32), scores.astype(np.float32), classes.astype(np.int64))


def draw_boxes(image: np.ndarray, detections: Detections, names: list[str] | None = None,
               thickness: int = 2) -> np.ndarray:
    """Chapter 6: a copy of ``image`` (H, W, 3) uint8 with each box, its class name and score drawn on it.

    Colours follow the class; the channel order of ``image`` is kept (draw on what you will show).
    """
    canvas = np.ascontiguousarray(image).copy()
    for (x1, y1, x2, y2), score, cls in zip(detections.boxes, detections.scores, detections.classes):
        hue = int(cls) * 47 % 180
        color = tuple(int(v) for v in cv2.cvtColor(np.uint8([[[hue, 220, 230]]]), cv2.COLOR_HSV2BGR)[0, 0])
        p1, p2 = (int(round(x1)), int(round(y1))), (int(round(x2)), int(round(y2)))
        cv2.rectangle(canvas, p1, p2, color, thickness)
        label = f"{names[cls] if names else cls} {score:.2f}"
        (tw, th), _ = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, 0.5, 1)
        top = max(p1[1] - th - 4, 0)
        cv2.rectangle(canvas, (p1[0], top), (p1[0] + tw + 2, top + th + 4), color, -1)
        cv2.putText(canvas, label, (p1[0] + 1, top + th + 1), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1,
                    cv2.LINE_AA)
    return canvas
