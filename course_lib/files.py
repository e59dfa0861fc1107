"""Artifacts on disk: written whole or not at all, and hashed. Used by every chapter.

Every file the course writes (ONNX sidecars, plans, images, JSON records, zips) goes to a hidden
temporary name in the destination folder first and is renamed into place with ``os.replace`` only
once complete, so an interrupted run never leaves a half-written file under a final name.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

_CHUNK = 1 << 20


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a hidden temporary path beside ``path``; on success rename it to ``path``, else delete it.

    ``suffix`` lets writers that pick a format from the name (cv2, matplotlib) see the right one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data) -> Path:
    """Write bytes (or any buffer, e.g. TensorRT's IHostMemory) to ``path`` atomically, synced to disk."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(memoryview(data))
        f.flush()
        os.fsync(f.fileno())
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 text to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def _jsonable(value):
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items() if not str(k).startswith("_")}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:      # numpy / torch scalars
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)            # inf -> "inf"
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: str | Path, data) -> Path:
    """Write ``data`` as JSON atomically; keys starting with "_" are left out, non-finite floats become
    strings ("inf"), numpy scalars and paths plain values. Returns the path."""
    return atomic_write_text(path, json.dumps(_jsonable(data), indent=1) + "\n")


def atomic_copy(src: str | Path, dst: str | Path) -> Path:
    """Copy ``src`` to ``dst`` atomically."""
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
    return Path(dst)


def save_png(fig, path: str | Path) -> Path:
    """Save a matplotlib Figure as PNG atomically (PNG keeps notebook outputs stable; SVG embeds a date)."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"plot {path}: expected a .png file name (PNG keeps notebook outputs stable)")
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return path


def temp_dir_beside(path: str | Path) -> Path:
    """A fresh hidden folder next to ``path``, for artifacts made of several files (graph + weights +
    sidecar) that are moved into place one by one once all are complete. The caller removes it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))


def sha256_file(path: str | Path, bar=None) -> str:
    """The SHA-256 of one file (hex), advancing a tqdm ``bar`` by its bytes if one is given."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
            if bar is not None:
                bar.update(len(block))
    return digest.hexdigest()
