"""Sample inputs that work offline: a real photograph shipped with matplotlib.

Chapter 1 introduces :func:`sample_photo` (the course's scoring used bird photos, which can't be shipped;
any RGB photo works as canny2image's input, and chapter 6 uses the same one for YOLOv5).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

SAMPLES = {"grace_hopper": "grace_hopper.jpg"}


def sample_photo_path(name: str = "grace_hopper") -> Path:
    """Chapter 1: the path of a photo from matplotlib's sample data."""
    from matplotlib import cbook

    if name not in SAMPLES:
        raise ValueError(f"sample photo {name!r}: expected one of {sorted(SAMPLES)}")
    return Path(cbook.get_sample_data(SAMPLES[name], asfileobj=False))


def read_image(path: str | Path) -> np.ndarray:
    """Chapter 1: an image file as uint8 RGB (H, W, 3); a clear error if it is missing or unreadable."""
    import cv2

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {path}: no such file")
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"image {path}: not a readable image file (expected PNG, JPEG, ...)")
    return np.ascontiguousarray(bgr[:, :, ::-1])


def write_image(path: str | Path, rgb: np.ndarray) -> Path:
    """Chapter 1: save a uint8 RGB image atomically (temp name, then os.replace); returns the path."""
    import cv2

    from course_lib.files import atomic_write_bytes

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"--out {path} is a folder: expected an image file name such as out.png")
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"image {rgb.shape} {rgb.dtype}: expected uint8 (H, W, 3)")
    try:                                        # encode in memory: a full disk is then an OSError, not a guess
        ok, encoded = cv2.imencode(path.suffix, np.ascontiguousarray(rgb[:, :, ::-1]))
    except cv2.error:
        ok = False
    if not ok:
        raise ValueError(f"image {path}: could not write it: unknown image extension {path.suffix!r} (use .png)")
    return atomic_write_bytes(path, encoded)


def center_crop_resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Chapter 1: crop the centre of ``image`` to the aspect of ``height x width``, then resize to it."""
    import cv2

    h, w = image.shape[:2]
    if height <= 0 or width <= 0:
        raise ValueError(f"size {height}x{width}: expected positive integers")
    scale = min(h / height, w / width)
    ch, cw = round(height * scale), round(width * scale)
    top, left = (h - ch) // 2, (w - cw) // 2
    crop = image[top:top + ch, left:left + cw]
    interp = cv2.INTER_AREA if scale > 1 else cv2.INTER_LANCZOS4
    return np.ascontiguousarray(cv2.resize(crop, (width, height), interpolation=interp))


def sample_photo(name: str = "grace_hopper", size: tuple[int, int] | None = (256, 384)) -> np.ndarray:
    """Chapter 1: the sample photo as uint8 RGB, cropped and resized to ``size`` = (H, W).

    The default 256 x 384 is the size of the course's scoring photos (384 x 256, W x H), which
    canny2image keeps as it is at ``image_resolution=256``. ``size=None`` gives the photo as shipped.
    """
    photo = read_image(sample_photo_path(name))
    return photo if size is None else center_crop_resize(photo, *size)
