"""Artifacts on disk: written whole or not at all, and hashed. Used by every chapter.

Every file the course writes (ONNX sidecars, plans, images, JSON records, zips) goes to a hidden
temporary name in the destination folder first and is renamed into place with ``os.replace`` only
once complete, so an interrupted run never leaves a half-written file under a final name. Finished
files get the usual mode (0644 under the usual umask), not the 0600 of a temporary file.

Temporary names say who made them: ``.<name>.tmp-<machine>-<pid>-<random>[suffix]``, where ``<machine>``
is 8 hex digits of this host and PID namespace. A run killed with ``kill -9`` leaves one behind; the
next write into the same folder removes it (:func:`clean_stale_temps`) once it is provably stale: made
on this machine by a process that no longer exists, or (any machine) untouched for
:data:`STALE_AFTER_S` seconds (7 days). A live run's temporaries are never touched.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

_CHUNK = 1 << 20
STALE_AFTER_S = 7 * 24 * 3600
"""A temporary of another machine (or PID namespace) is stale once untouched this long (seconds)."""
_TEMP = re.compile(r"^\..+\.tmp-(?P<machine>[0-9a-f]{8})-(?P<pid>\d+)-[A-Za-z0-9_]+(\.[A-Za-z0-9]+)?$")


def _machine() -> str:
    """8 hex digits naming this host and PID namespace (a PID means something only inside both)."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    return hashlib.sha1(f"{socket.gethostname()}|{namespace}".encode()).hexdigest()[:8]


def _temp_prefix(name: str) -> str:
    return f".{name[:180]}.tmp-{_machine()}-{os.getpid()}-"


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:                          # EPERM: it exists, someone else's
        return True
    return True


def is_stale_temp(path: str | Path, now: float | None = None) -> bool:
    """True for a temporary of :mod:`course_lib.files` that no run will finish: made on this machine by
    a process that is gone, or untouched for :data:`STALE_AFTER_S`. Anything else (other names, live
    runs, a PID that was reused) is False."""
    path = Path(path)
    match = _TEMP.match(path.name)
    if not match:
        return False
    if match["machine"] == _machine() and not _alive(int(match["pid"])):
        return True
    try:
        age = (time.time() if now is None else now) - path.lstat().st_mtime
    except OSError:
        return False
    return age > STALE_AFTER_S


def clean_stale_temps(folder: str | Path) -> list[Path]:
    """Remove the stale temporaries (:func:`is_stale_temp`) that killed runs left in ``folder``; returns them.

    Called by every atomic write before it makes its own temporary, so the next run cleans up."""
    removed = []
    try:
        entries = [e for e in os.scandir(folder) if e.name.startswith(".") and ".tmp-" in e.name]
    except OSError:
        return removed
    for entry in entries:
        path = Path(entry.path)
        if not is_stale_temp(path):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
        except OSError:
            pass                             # another run cleaned it first, or not ours to remove
    return removed


def naming_target(e: OSError, path: str | Path, tmp: str | Path) -> OSError:
    """``e`` (an OSError, e.g. a full disk, raised while writing the temporary ``tmp``, a file or a folder)
    as the same kind of error naming the final ``path``: the user never saw the hidden temporary's name.
    An error about some other file is returned as it is. Use: ``raise naming_target(e, path, tmp) from e``."""
    name = None if e.filename is None else os.fspath(e.filename)
    if e.errno is None or not (name is None or name == os.fspath(tmp) or name.startswith(os.fspath(tmp) + os.sep)):
        return e
    return OSError(e.errno, e.strerror or str(e), os.fspath(path))


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a hidden temporary path beside ``path``; on success rename it to ``path``, else delete it.

    ``suffix`` lets writers that pick a format from the name (cv2, matplotlib) see the right one. An
    OSError while writing (a full disk) names ``path``, not the temporary. Stale temporaries of killed
    runs in the folder are removed first (:func:`clean_stale_temps`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path.name), suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())              # mkstemp makes 0600; a finished file is 0644
        os.replace(tmp, path)
    except OSError as e:
        raise naming_target(e, path, tmp) from None
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
    sidecar) that are moved into place one by one once all are complete. The caller removes it; the
    next run removes it if the caller was killed first (:func:`clean_stale_temps`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(path.parent)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path.name), dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())                  # mkdtemp makes 0700; a folder swapped in keeps its mode
    return tmp


def os_error_text(e: OSError) -> str:
    """One line for an OSError: the file it names and what went wrong, e.g.
    ``out/unet.onnx: No space left on device (free some space, or write elsewhere)``."""
    what = e.strerror or str(e)
    if e.errno == errno.ENOSPC or e.errno == getattr(errno, "EDQUOT", None):
        what += " (free some space, or write elsewhere)"
    where = ": ".join(os.fspath(f) for f in (e.filename, e.filename2) if f is not None)
    return f"{where}: {what}" if where else what


def sha256_file(path: str | Path, bar=None) -> str:
    """The SHA-256 of one file (hex), advancing a tqdm ``bar`` by its bytes if one is given."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
            if bar is not None:
                bar.update(len(block))
    return digest.hexdigest()
