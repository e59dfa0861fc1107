"""The course score: latency, perceptual distance (PD) and how they combine. Introduced in chapter 2.

The hackathon scored each generated image against the PyTorch-fp32 reference image:

* latency: wall time around ``process()`` for one image, warm-up excluded;
* PD: the L2 distance between the two images' InceptionV3 2048-d pool features (pytorch_fid);
  PD > 12 fails the image, and the average latency must stay under 2600 ms;
* score = ``pd_factor(PD) * 7000 / latency_ms``, with ``pd_factor`` piecewise linear and continuous.

PSNR and the largest pixel difference are cheap extra checks that need no network.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PD_LIMIT = 12.0
LATENCY_LIMIT_MS = 2600.0
SCORE_SCALE = 7000.0
FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
LATENCY_FILE = "latencies.json"


def pd_factor(pd: float) -> float:
    """Chapter 2: how much of the speed score an image keeps at perceptual distance ``pd``.

    ``[0, 4)``: 1 - 0.1 PD; ``[4, 8)``: 0.6 - 0.0125 (PD - 4); ``[8, 12]``: 0.55 - 0.1375 (PD - 8);
    anything else (negative, above 12, NaN): 0. Continuous: 0.6 at 4, 0.55 at 8, 0 at 12.
    """
    if 0 <= pd < 4:
        return 1.0 - 0.1 * pd
    if 4 <= pd < 8:
        return 0.6 - 0.0125 * (pd - 4)
    if 8 <= pd <= PD_LIMIT:
        return 0.55 - 0.1375 * (pd - 8)
    return 0.0


def course_score(pd: float, latency_ms: float) -> float:
    """Chapter 2: one image's score, ``pd_factor(pd) * 7000 / latency_ms``."""
    if not latency_ms > 0:
        raise ValueError(f"latency {latency_ms} ms: expected a positive number of milliseconds")
    return pd_factor(pd) * SCORE_SCALE / latency_ms


def _pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"images have different shapes {a.shape} and {b.shape}: expected the same H x W x C")
    return a.astype(np.float64), b.astype(np.float64)


def psnr(a, b, max_value: float = 255.0) -> float:
    """Chapter 2: peak signal-to-noise ratio in dB of two same-shape images (inf when identical)."""
    a, b = _pair(a, b)
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(max_value ** 2 / mse)


def max_pixel_diff(a, b) -> int:
    """Chapter 2: the largest absolute difference of two uint8 images (0 .. 255)."""
    a, b = _pair(a, b)
    return int(np.max(np.abs(a - b))) if a.size else 0


def fid_weights_path() -> Path:
    """Where pytorch_fid looks for its InceptionV3 weights (torch hub's checkpoint folder)."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_FILE


def check_fid_weights(path: Path | None = None) -> Path:
    """Raise MissingDependency unless the InceptionV3 weights are on disk (the course never downloads)."""
    from course_lib.env import MissingDependency

    path = fid_weights_path() if path is None else Path(path)
    if not path.is_file():
        raise MissingDependency(f"pytorch_fid's InceptionV3 weights are not at {path}: copy {FID_WEIGHTS_FILE} "
                                f"there (from the pytorch-fid release page) to compute PD")
    return path


_INCEPTION: dict[str, object] = {}


def _inception(device: str):
    from course_lib.env import require

    inception = require("pytorch_fid.inception", "the perceptual distance (PD)")
    check_fid_weights()
    if device not in _INCEPTION:
        model = inception.InceptionV3([inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
        _INCEPTION[device] = model.to(device).eval()
    return _INCEPTION[device]


def inception_features(image, device: str | None = None) -> np.ndarray:
    """Chapter 2: the 2048-d InceptionV3 pool features of one RGB uint8 image (H x W x 3) or file."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = _inception(device)
    rgb = read_rgb(image) if isinstance(image, (str, Path)) else np.asarray(image)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"image of shape {rgb.shape}: expected H x W x 3 RGB")
    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float().div(255.0)  # like ToTensor
    with torch.no_grad():
        features = model(x.to(device))[0]  # (1, 2048, 1, 1)
    return features.reshape(-1).double().cpu().numpy()


def perceptual_distance(image, reference, device: str | None = None) -> float:
    """Chapter 2: PD, the L2 distance of the InceptionV3 features of ``image`` and ``reference``.

    Both are RGB uint8 arrays (H x W x 3) or image files. Needs pytorch-fid and its weights already on
    disk (:func:`check_fid_weights`); raises MissingDependency with one sentence otherwise. The
    hackathon compared JPEG files, so PD from arrays can differ slightly from PD from saved files.
    """
    return float(np.linalg.norm(inception_features(image, device) - inception_features(reference, device)))


def read_rgb(path: str | Path) -> np.ndarray:
    """Read an image file as RGB uint8 (H x W x 3)."""
    import cv2

    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise FileNotFoundError(f"could not read image {path}: expected a PNG/JPEG file")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


@dataclass
class ImageScore:
    """One row of :func:`score_folder`'s table; ``None`` where a value could not be computed."""
    name: str
    latency_ms: float | None
    psnr_db: float
    max_diff: int
    pd: float | None
    score: float | None


def score_folder(images_dir: str | Path, reference_dir: str | Path, with_pd: bool | None = None,
                 device: str | None = None) -> list[ImageScore]:
    """Chapter 2: score every image of ``images_dir`` against the same-named file in ``reference_dir``.

    Latencies come from ``images_dir/latencies.json`` when present: a JSON object mapping each image's file
    name to its latency in milliseconds (``{"bird_0.png": 812.5, ...}``), written by whoever timed the images.
    ``with_pd``: True needs pytorch-fid, False skips PD, None computes it where pytorch-fid is usable.
    The score needs both a latency and a PD.
    """
    from course_lib.env import MissingDependency

    images_dir, reference_dir = Path(images_dir), Path(reference_dir)
    names = sorted(p.name for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) \
        if images_dir.is_dir() else []
    if not names:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {images_dir}")
    latency_file = images_dir / LATENCY_FILE
    latencies = json.loads(latency_file.read_text()) if latency_file.is_file() else {}
    rows = []
    for name in names:
        ref_path = reference_dir / name
        if not ref_path.is_file():
            raise FileNotFoundError(f"reference image {ref_path} not found: expected one per image of {images_dir}")
        image, ref = read_rgb(images_dir / name), read_rgb(ref_path)
        pd = None
        if with_pd is not False:
            try:
                pd = perceptual_distance(image, ref, device)
            except MissingDependency:
                if with_pd:
                    raise
                with_pd = False  # say nothing more per image; the table shows "-"
        latency = latencies.get(name)
        score = course_score(pd, latency) if pd is not None and latency is not None else None
        rows.append(ImageScore(name, latency, psnr(image, ref), max_pixel_diff(image, ref), pd, score))
    return rows


def pd_unavailable() -> str | None:
    """Chapter 2: one sentence saying why PD cannot be computed here (pytorch-fid or its weights missing), or None."""
    from course_lib.env import MissingDependency, require

    try:
        require("pytorch_fid.inception", "the perceptual distance (PD)")
        check_fid_weights()
    except MissingDependency as e:
        return str(e)
    return None


def score_table(rows: list[ImageScore], pd_note: str | None = None) -> str:
    """Chapter 2: the rows as a text table (columns aligned, "-" where a value is missing) with a summary
    line (means; PD and latency limits); ``pd_note``, why no row has a PD, ends the table as one line."""
    columns = [("latency ms", "latency_ms", ".1f"), ("PSNR dB", "psnr_db", ".2f"), ("max diff", "max_diff", "d"),
               ("PD", "pd", ".2f"), ("score", "score", ".3f")]

    def cell(value, spec, width):
        return f"{'-' if value is None else format(value, spec):>{width}}"

    width = max(len("image"), *(len(r.name) for r in rows))
    lines = [f"{'image':<{width}}  " + "  ".join(f"{head:>10}" for head, _, _ in columns)]
    lines += [f"{r.name:<{width}}  " + "  ".join(cell(getattr(r, key), spec, 10) for _, key, spec in columns)
              for r in rows]
    lat = [r.latency_ms for r in rows if r.latency_ms is not None]
    pds = [r.pd for r in rows if r.pd is not None]
    scores = [r.score for r in rows if r.score is not None]
    summary = [f"{len(rows)} images"]
    if lat:
        summary.append(f"mean latency {np.mean(lat):.1f} ms (limit {LATENCY_LIMIT_MS:.0f}: "
                       f"{'ok' if np.mean(lat) < LATENCY_LIMIT_MS else 'too slow'})")
    if pds:
        summary.append(f"max PD {max(pds):.2f} (limit {PD_LIMIT:.0f}: {'ok' if max(pds) <= PD_LIMIT else 'failed'})")
    if scores:
        summary.append(f"mean score {np.mean(scores):.3f}")
    if not pds and pd_note:
        lines.append(f"PD and score not shown: {pd_note}")
    return "\n".join(lines + ["; ".join(summary)])
