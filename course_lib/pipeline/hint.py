"""From a photo to ControlNet's ``hint``: resize the image, then draw its Canny edges.

Chapter 1 introduces these three steps of canny2image, in the order the pipeline runs them:

1. :func:`hwc3` -- any uint8 image (grey, RGB, RGBA) becomes 3-channel HxWx3;
2. :func:`resize_image` -- the short side goes to ``image_resolution`` and both sides are rounded to
   multiples of 64 (the latent is H/8 x W/8 and the UNet halves it three more times);
3. :func:`canny_hint` -- ``cv2.Canny`` edges as a uint8 map (for display) and as the float32 ``hint``
   tensor (1, 3, H, W) in [0, 1] that ControlNet reads.

Behaviour follows ControlNet 1.0's ``annotator/util.py`` and ``annotator/canny``; bad input raises a
one-line ``ValueError`` instead of an ``assert``.
"""
from __future__ import annotations

import cv2
import numpy as np
import torch

MULTIPLE = 64  # image sides are multiples of 64 pixels


def _check_image(image, what: str = "input image") -> None:
    if not isinstance(image, np.ndarray):
        raise ValueError(f"{what}: expected a numpy uint8 array HxW or HxWx{{1,3,4}}, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"{what}: expected dtype uint8, got {image.dtype}")
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
        raise ValueError(f"{what}: expected shape HxW or HxWx{{1,3,4}}, got {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"{what}: the image is empty (shape {image.shape})")


def hwc3(image: np.ndarray) -> np.ndarray:
    """Chapter 1: make a uint8 image 3-channel (HxWx3).

    Grey (HxW or HxWx1) is repeated three times; RGBA is composited on a white background
    (``rgb * alpha + 255 * (1 - alpha)``); RGB is returned as it is (the same array).
    """
    _check_image(image)
    if image.ndim == 2:
        image = image[:, :, None]
    channels = image.shape[2]
    if channels == 3:
        return image
    if channels == 1:
        return np.concatenate([image] * 3, axis=2)
    color = image[:, :, :3].astype(np.float32)
    alpha = image[:, :, 3:4].astype(np.float32) / 255.0
    return (color * alpha + 255.0 * (1.0 - alpha)).clip(0, 255).astype(np.uint8)


HWC3 = hwc3  # the original's name, for students who read both


def resize_image(image: np.ndarray, resolution: int) -> np.ndarray:
    """Chapter 1: scale a uint8 HxWxC image so its short side is ``resolution``, sides multiples of 64.

    Each side is scaled by ``k = resolution / min(H, W)`` and rounded to the nearest multiple of 64
    (a 256x384 bird at resolution 256 stays 256x384). Lanczos4 when enlarging (k > 1), INTER_AREA
    otherwise, as the original does. Returns a new uint8 array.
    """
    _check_image(image)
    if not isinstance(resolution, (int, np.integer)) or resolution < MULTIPLE:
        raise ValueError(f"image_resolution {resolution!r}: expected an integer >= {MULTIPLE}")
    height, width = image.shape[:2]
    k = float(resolution) / min(height, width)
    new_h = int(np.round(height * k / MULTIPLE)) * MULTIPLE
    new_w = int(np.round(width * k / MULTIPLE)) * MULTIPLE
    if new_h == 0 or new_w == 0:
        raise ValueError(f"image {height}x{width} at resolution {resolution}: a side rounds to 0 pixels "
                         f"(aspect ratio too extreme)")
    interpolation = cv2.INTER_LANCZOS4 if k > 1 else cv2.INTER_AREA
    return cv2.resize(image, (new_w, new_h), interpolation=interpolation)


def canny_hint(image: np.ndarray, low_threshold: int = 100, high_threshold: int = 200
               ) -> tuple[np.ndarray, torch.Tensor]:
    """Chapter 1: Canny edges of a uint8 image, as a picture and as ControlNet's ``hint``.

    Args:
        image: uint8 HxW or HxWx{1,3,4}, already resized (sides multiples of 64 for the pipeline).
        low_threshold, high_threshold: ``cv2.Canny`` hysteresis thresholds, 0 <= low <= high.

    Returns:
        ``(edge_map, hint)``: ``edge_map`` uint8 HxWx3 (255 on edges, 0 elsewhere) and ``hint`` a
        float32 tensor (1, 3, H, W) in [0, 1] (``edge_map / 255``, channels first) on the CPU.
    """
    _check_image(image)
    if not 0 <= low_threshold <= high_threshold:
        raise ValueError(f"canny thresholds low={low_threshold}, high={high_threshold}: "
                         f"expected 0 <= low <= high (e.g. 100, 200)")
    edges = cv2.Canny(hwc3(image), low_threshold, high_threshold)   # (H, W) uint8, 0 or 255
    edge_map = hwc3(edges)                                           # (H, W, 3)
    hint = torch.from_numpy(edge_map.copy()).float() / 255.0         # (H, W, 3)
    return edge_map, hint.permute(2, 0, 1).unsqueeze(0).contiguous() # (1, 3, H, W)
