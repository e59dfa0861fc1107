"""Does an image follow its hint and its prompt? Edge F1 and colour read-back, on numpy images.

Chapter 1 introduces these with the toy model (:mod:`course_lib.toy.evaluate` runs them over held-out
scenes); chapters 3 and 5 use them to ask whether an FP16 or INT8 pipeline still draws the same picture.

* :func:`edge_f1` -- precision (edges drawn where the hint has one, within ``tolerance`` pixels), recall
  (hint edges the image reproduces, within ``tolerance``) and their harmonic mean. A tolerance of t
  pixels counts two edge pixels as matching when they are at most t apart along both axes.
* :func:`read_colour` -- the named colour nearest (in RGB) to the median colour of a region.
* :func:`regions` -- the shape's inside and the background, each shrunk by a margin so that the
  anti-aliased rim (and an edge a pixel or two off) does not blur the colour read back.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from course_lib.toy.data import COLOUR_NAMES, COLOURS

DEFAULT_TOLERANCE = 2      # pixels, at 64x64


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Grow a boolean (H, W) mask by ``radius`` pixels (a (2r+1)^2 square)."""
    if radius == 0:
        return mask.copy()
    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    return F.max_pool2d(t, 2 * radius + 1, stride=1, padding=radius)[0, 0].numpy() > 0


def edge_f1(edges: np.ndarray, target: np.ndarray, tolerance: int = DEFAULT_TOLERANCE
            ) -> tuple[float, float, float]:
    """``(precision, recall, f1)`` of edge map ``edges`` against ``target`` (both (H, W), non-zero = edge).

    Two empty maps agree perfectly (1, 1, 1); one empty map against a non-empty one scores 0.
    """
    edges, target = np.asarray(edges) > 0, np.asarray(target) > 0
    if edges.shape != target.shape or edges.ndim != 2:
        raise ValueError(f"edge maps {edges.shape} and {target.shape}: expected two (H, W) maps of one size")
    if tolerance < 0:
        raise ValueError(f"tolerance {tolerance}: expected >= 0 pixels")
    n_edges, n_target = int(edges.sum()), int(target.sum())
    if n_edges == 0 and n_target == 0:
        return 1.0, 1.0, 1.0
    if n_edges == 0 or n_target == 0:
        return 0.0, 0.0, 0.0
    precision = float((edges & _dilate(target, tolerance)).sum()) / n_edges
    recall = float((target & _dilate(edges, tolerance)).sum()) / n_target
    f1 = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    return precision, recall, f1


def regions(cover: np.ndarray, margin: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """``(inside, outside)`` boolean masks from a coverage map (H, W) in [0, 1], shrunk by ``margin`` px."""
    cover = np.asarray(cover, dtype=np.float32)
    inside = ~_dilate(cover < 0.99, margin)
    outside = ~_dilate(cover > 0.01, margin)
    return inside, outside


def read_colour(image: np.ndarray, mask: np.ndarray) -> str | None:
    """The name of the palette colour nearest to the median RGB of ``image`` (H, W, 3) under ``mask``;
    None when the mask is empty."""
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[:2] != mask.shape:
        raise ValueError(f"image {image.shape} and mask {mask.shape}: expected (H, W, 3) and (H, W)")
    if not mask.any():
        return None
    median = np.median(image[mask].astype(np.float32), axis=0)                 # (3,)
    palette = np.array(list(COLOURS.values()), dtype=np.float32)               # (8, 3)
    return COLOUR_NAMES[int(np.argmin(((palette - median) ** 2).sum(axis=1)))]
