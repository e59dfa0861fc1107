"""An export folder is one consistent set: the CNSD models of one export run. Chapter 1.

:func:`~course_lib.onnx.export_cnsd.export_cnsd` writes ``clip``, ``controlnet``, ``unet`` and ``decoder.onnx``
into one folder. Two exports into the same folder at once, or one killed half-way over an older export,
would leave a folder whose models come from different runs (different weights) and nothing would notice.
Two guards keep a folder whole:

* :func:`export_lock`: ``folder/.export.lock``, locked with ``flock``: exclusively by an export (for the
  whole export and its parity check), shared by the readers (``run``, ``build``). A second export, or a
  reader while an export writes, is refused at once with one line. The operating system drops the lock
  when its process ends (``kill -9`` included), so a stale lock cannot exist.
* run ids: each sidecar (``clip.onnx.json``, ...) records the ``run_id`` of the export that wrote it;
  :func:`check_export_folder` refuses a folder whose models carry different run ids (``run --backend
  ort``, ``build`` and the grader call it). Sidecars written before run ids existed have none: a folder
  where none has one passes, one where some have one and some not is mixed.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

LOCK_NAME = ".export.lock"
_held: dict[str, list] = {}           # resolved folder -> [fd, count]: this process's locks (re-entrant)
_guard = threading.Lock()


def new_run_id() -> str:
    """Chapter 1: a fresh run id, e.g. ``20250101T120000-1a2b3c4d`` (time, then 8 random hex digits)."""
    return f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def export_lock(folder: str | os.PathLike, exclusive: bool = True) -> Iterator[Path]:
    """Chapter 1: hold the export lock of ``folder`` (created if missing) for the ``with`` block.

    ``exclusive=True`` (an export) refuses while anyone holds it; ``exclusive=False`` (a reader: run,
    build) refuses only while an export holds it. Re-entrant within one process. Raises ValueError
    naming the folder (and the PID holding the lock, when it wrote one). A reader that cannot create
    the lock file (a read-only folder) reads without it.
    """
    folder = Path(folder)
    try:
        import fcntl
    except ImportError:                       # Windows: no flock; the run ids still catch a mixed folder
        yield folder
        return
    if exclusive:
        folder.mkdir(parents=True, exist_ok=True)
    key = str(folder.resolve())
    with _guard:
        if key in _held:
            _held[key][1] += 1
            fd = None
        else:
            fd = _open_lock(folder, exclusive)
            if fd is not None:
                try:
                    fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
                except OSError as e:
                    holder = _holder(fd)
                    os.close(fd)
                    if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                        raise
                    who = f" (pid {holder})" if holder else ""
                    if exclusive:
                        raise ValueError(f"{folder}: another export or run is using this folder{who}; wait for it "
                                         "to finish, or export to another folder") from None
                    raise ValueError(f"{folder}: an export is writing into this folder{who}; wait for it to "
                                     "finish") from None
                if exclusive:
                    try:                      # who holds it, for the message of the next one (best effort)
                        os.ftruncate(fd, 0)
                        os.write(fd, f"{os.getpid()}\n".encode())
                    except OSError:
                        pass
                _held[key] = [fd, 1]
    try:
        yield folder
    finally:
        with _guard:
            entry = _held.get(key)
            if entry is not None:
                entry[1] -= 1
                if entry[1] == 0:
                    del _held[key]
                    os.close(entry[0])        # closing the descriptor releases the flock


def _open_lock(folder: Path, exclusive: bool) -> int | None:
    try:
        return os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError as e:
        if not exclusive and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT):
            return None
        raise


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return ""
    return text if text.isdigit() else ""


def run_ids(folder: str | os.PathLike, names: Iterable[str] | None = None) -> dict[str, str | None]:
    """Chapter 1: ``{"clip.onnx": run id or None, ...}`` for the ``.onnx`` files of ``folder`` (or ``names``,
    those present), read from their sidecars. A missing or unreadable sidecar gives None."""
    folder = Path(folder)
    files = sorted(p.name for p in folder.glob("*.onnx")) if names is None else \
        [f"{n}.onnx" if not n.endswith(".onnx") else n for n in names]
    found = {}
    for name in files:
        if not (folder / name).is_file():
            continue
        try:
            sidecar = json.loads((folder / f"{name}.json").read_text(encoding="utf-8"))
            run = sidecar.get("run_id") if isinstance(sidecar, dict) else None
        except (OSError, ValueError):
            run = None
        found[name] = run if isinstance(run, str) and run else None
    return found


def check_export_folder(folder: str | os.PathLike, names: Iterable[str] | None = None) -> str | None:
    """Chapter 2: refuse a folder whose models come from different export runs (ValueError, one line).

    ``names``: the models to check (e.g. ``MODEL_NAMES``), default every ``.onnx`` in the folder.
    Returns the folder's run id (None for a folder exported before run ids were recorded).
    """
    folder = Path(folder)
    ids = run_ids(folder, names)
    runs = set(ids.values())
    if len(runs) <= 1:
        return next(iter(runs), None)
    by_run: dict[str | None, list[str]] = {}
    for name, run in ids.items():
        by_run.setdefault(run, []).append(name)
    parts = [f"{', '.join(files)} {'from run ' + run if run else 'without a run id'}"
             for run, files in sorted(by_run.items(), key=lambda kv: (kv[0] is None, kv[0] or ""))]
    raise ValueError(f"{folder}: a mixed export folder ({'; '.join(parts)}): two exports at once, or one that "
                     f"was interrupted; export all the models again into it (python -m course_lib export --out {folder})")
