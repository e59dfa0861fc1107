"""Homework submissions as zip files: hashing what goes in, and opening what comes back without trusting it.

Used by the homework submission (``python -m course_lib submit``) and its grader (``python -m course_lib
grade``); see :mod:`course_lib.homework.submit` and :mod:`course_lib.homework.grade`. A submission is a zip of plain data:
``manifest.json`` (the SHA-256 of every other member), ``checks.json`` and ``artifacts/...`` (ONNX, their
external data, JSON, PNG, NPZ, safetensors). Nothing in it is ever unpickled.

The grader opens a zip it did not make, so :func:`safe_extract` checks the whole central directory before
writing a byte and refuses (:class:`UnsafeSubmission`, one line naming the member) on:

* a member name that is absolute, has a drive letter or backslash, a ``..`` / ``.`` / empty part, control
  characters, or lies outside ``manifest.json`` / ``checks.json`` / ``artifacts/``;
* a symbolic link or any other non-regular file, a duplicate name (also up to letter case);
* a suffix outside :data:`ALLOWED_SUFFIXES` (no ``.pt``, ``.pth``, ``.pkl``, ``.plan``);
* more members, more bytes per file or in all, or a higher compression ratio than :class:`ZipLimits`;
* encryption, or a compression method other than stored or deflated (what ``submit`` writes).

It then streams each member to a new file inside the destination (``O_EXCL | O_NOFOLLOW``) counting bytes.
:func:`verify_hashes` compares the result with the manifest, :func:`check_file_types` sniffs the content of
JSON / PNG / NPZ / safetensors members, and :func:`check_external_data` keeps an ONNX model's external-data
paths inside the submission (ONNX Runtime would otherwise read any file a location names); those two
content checks live in :mod:`course_lib.homework.contents`.

Archives inside the archive are bounded before they are inflated: an ``.npz`` (itself a zip) is held to the
same :class:`ZipLimits` member by member, and each ``.npy`` header must declare no more bytes than the member
holds, before numpy reads it; a PNG's header must not declare more pixels than ``max_file_mb`` of data.
"""
from __future__ import annotations

import os
import shutil
import stat
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from course_lib.files import atomic_path, sha256_file

ALLOWED_SUFFIXES = (".json", ".onnx", ".data", ".npz", ".png", ".safetensors")
TOP_LEVEL = ("manifest.json", "checks.json", "artifacts/")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_CHUNK = 1 << 20


TIMEOUT_S = 900.0
"""Homework grading: default wall-clock limit of one zip's grading (seconds); a tiny HW1 takes well under a minute."""
MAX_MEMORY_MB = 8192.0
"""Homework grading: default memory (MB) one zip's grading may allocate on top of the grader's own."""


class UnsafeSubmission(ValueError):
    """A submission zip that is refused: unsafe, over a limit, or not what its manifest says."""


@dataclass(frozen=True)
class ZipLimits:
    """Homework grading: what one submission zip may hold (the tiny preset needs well under 100 MB)."""
    max_members: int = 200
    max_file_mb: float = 256.0
    max_total_mb: float = 512.0
    max_ratio: float = 200.0           # uncompressed / compressed, for members over 1 MiB (zip bombs)

    def check_total(self, total: int) -> None:
        if total > self.max_total_mb * 2**20:
            raise UnsafeSubmission(f"the zip unpacks to {total / 2**20:.1f} MB, over the limit of "
                                   f"{self.max_total_mb:g} MB (grade --max-total-mb raises it)")


# ------------------------------------------------------------------------------------------- hashing

def hash_files(files: Mapping[str, str | Path], progress: bool = True,
               bar_from_bytes: int = 16 * 2**20) -> dict[str, dict]:
    """Homework submission: ``{name: {"sha256", "bytes"}}`` of ``{name: file path}``, sorted by name.

    A tqdm bar (bytes) is shown while hashing when ``progress`` and the files add up to at least
    ``bar_from_bytes`` (the large ONNX files of sd15 take a while; the tiny preset's a moment).
    """
    from course_lib.progress import tqdm

    sizes = {n: Path(files[n]).stat().st_size for n in sorted(files)}
    total = sum(sizes.values())
    out = {}
    with tqdm(total=total, unit="B", unit_scale=True, desc="hashing", leave=False,
              disable=not progress or total < bar_from_bytes) as bar:
        for name, size in sizes.items():
            out[name] = {"sha256": sha256_file(files[name], bar), "bytes": size}
    return out


def verify_hashes(root: str | Path, files: Mapping[str, Mapping], ignore: Iterable[str] = ("manifest.json",)) -> None:
    """Homework grading: every file under ``root`` is in ``files`` with its SHA-256 and size, and no more.

    Raises :class:`UnsafeSubmission` naming the first tampered, missing or unlisted file.
    """
    root = Path(root)
    present = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} - set(ignore)
    unlisted = sorted(present - set(files))
    if unlisted:
        raise UnsafeSubmission(f"{unlisted[0]} is in the zip but not in its manifest: the zip was changed "
                               "after it was made (make it again with python -m course_lib submit)")
    for name in sorted(files):
        if name not in present:
            raise UnsafeSubmission(f"{name} is listed in the manifest but missing from the zip")
        entry = files[name]
        if not isinstance(entry, Mapping) or not isinstance(entry.get("sha256"), str):
            raise UnsafeSubmission(f"manifest entry for {name}: expected {{'sha256': hex, 'bytes': int}}")
        got = sha256_file(root / name)
        if got != entry["sha256"] or (root / name).stat().st_size != entry.get("bytes"):
            raise UnsafeSubmission(f"tampered file: {name} has sha256 {got[:12]}..., the manifest says "
                                   f"{entry['sha256'][:12]}... (the file was changed after submit hashed it)")


# ------------------------------------------------------------------------------------------ writing

def write_zip(path: str | Path, members: Mapping[str, str | Path | bytes]) -> Path:
    """Homework submission: write ``{arcname: file path or bytes}`` as a zip, atomically (temp + os.replace).

    Members get a fixed date and mode 0644, so the same files give the same zip. Returns ``path``.
    """
    path = Path(path)
    if path.suffix != ".zip":
        raise ValueError(f"--out {path}: expected a file name ending in .zip")
    for name in members:
        check_member_name(name)
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6, allowZip64=True) as zf:
            for name, source in members.items():
                info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = (stat.S_IFREG | 0o644) << 16
                if isinstance(source, bytes):
                    zf.writestr(info, source)
                    continue
                with open(source, "rb") as src, zf.open(info, "w", force_zip64=True) as dst:
                    shutil.copyfileobj(src, dst, _CHUNK)
    return path


# ------------------------------------------------------------------------------------------ opening

def check_member_name(name: str) -> str:
    """Homework grading: ``name`` if it is a safe relative member name (see the module docstring), else raise."""
    if not isinstance(name, str) or not name:
        raise UnsafeSubmission("a zip member has an empty name")
    shown = repr(name)
    if any(ord(c) < 32 or c == "\x7f" for c in name) or len(name) > 240:
        raise UnsafeSubmission(f"member {shown}: control characters or a name over 240 characters")
    if name.startswith(("/", "\\")) or "\\" in name or (len(name) > 1 and name[1] == ":"):
        raise UnsafeSubmission(f"member {shown}: an absolute path or backslash; expected a relative path "
                               "like artifacts/onnx/unet.onnx")
    parts = name.rstrip("/").split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise UnsafeSubmission(f"member {shown}: '..', '.' or an empty part in the path (path traversal)")
    if not (name in TOP_LEVEL[:2] or name.startswith(TOP_LEVEL[2])):
        raise UnsafeSubmission(f"member {shown}: outside manifest.json, checks.json and artifacts/")
    if not name.endswith("/") and PurePosixPath(name).suffix.lower() not in ALLOWED_SUFFIXES:
        raise UnsafeSubmission(f"member {shown}: file type {PurePosixPath(name).suffix or '(none)'} is not "
                               f"accepted; expected one of {', '.join(ALLOWED_SUFFIXES)} (no pickles, no plans)")
    return name


def inspect_zip(path: str | Path, limits: ZipLimits = ZipLimits()) -> list[zipfile.ZipInfo]:
    """Homework grading: check every member of the zip at ``path`` (nothing is written); returns the files."""
    path = Path(path)
    if path.is_symlink() or not path.is_file():
        raise UnsafeSubmission(f"{path.name}: not a regular file (a link or a folder)")
    try:
        if not zipfile.is_zipfile(path):
            raise UnsafeSubmission(f"{path.name}: not a zip file")
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError, EOFError) as e:
        if isinstance(e, UnsafeSubmission):
            raise
        raise UnsafeSubmission(f"{path.name}: a corrupt or unreadable zip ({type(e).__name__}: "
                               f"{(str(e).strip().splitlines() or [''])[0][:160]})") from None
    if len(infos) > limits.max_members:
        raise UnsafeSubmission(f"{path.name}: {len(infos)} members, over the limit of {limits.max_members}")
    seen: set[str] = set()
    files, total = [], 0
    for info in infos:
        name = check_member_name(info.filename)
        mode = info.external_attr >> 16
        kind = stat.S_IFMT(mode)
        if kind == stat.S_IFLNK:
            raise UnsafeSubmission(f"member {name!r} is a symbolic link: links are refused")
        if kind not in (0, stat.S_IFREG, stat.S_IFDIR) or (info.is_dir() and kind == stat.S_IFREG):
            raise UnsafeSubmission(f"member {name!r} is not a regular file (mode {oct(mode)})")
        if name.lower().rstrip("/") in seen:
            raise UnsafeSubmission(f"member {name!r} appears twice (names are compared ignoring case)")
        seen.add(name.lower().rstrip("/"))
        if info.is_dir():
            continue
        if info.flag_bits & 0x1:
            raise UnsafeSubmission(f"member {name!r} is encrypted")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise UnsafeSubmission(f"member {name!r} uses compression method {info.compress_type}; expected stored "
                                   "or deflated (make the zip with python -m course_lib submit)")
        if info.file_size > limits.max_file_mb * 2**20:
            raise UnsafeSubmission(f"member {name!r} is {info.file_size / 2**20:.1f} MB, over the per-file limit "
                                   f"of {limits.max_file_mb:g} MB (grade --max-file-mb raises it)")
        if info.file_size > 2**20 and info.file_size > limits.max_ratio * max(info.compress_size, 1):
            raise UnsafeSubmission(f"member {name!r} expands {info.file_size / max(info.compress_size, 1):.0f}x, "
                                   f"over the limit of {limits.max_ratio:g}x (a zip bomb?)")
        total += info.file_size
        limits.check_total(total)
        files.append(info)
    return files


def safe_extract(path: str | Path, dest: str | Path, limits: ZipLimits = ZipLimits()) -> list[str]:
    """Homework grading: unpack a submission zip into the new folder ``dest`` after :func:`inspect_zip`.

    Bytes are counted while streaming (a member that inflates past its declared size is refused); on any
    refusal ``dest`` is removed again. Returns the member names written. Raises :class:`UnsafeSubmission`.
    """
    files = inspect_zip(path, limits)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=False)
    root = dest.resolve()
    total, written = 0, []
    try:
        with zipfile.ZipFile(path) as zf:
            for info in files:
                target = dest.joinpath(*info.filename.split("/"))
                if not target.resolve().is_relative_to(root):        # belt and braces after the name check
                    raise UnsafeSubmission(f"member {info.filename!r} would be written outside the folder")
                target.parent.mkdir(parents=True, exist_ok=True)
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
                size = 0
                with zf.open(info) as src, os.fdopen(os.open(target, flags, 0o644), "wb") as dst:
                    while block := src.read(_CHUNK):
                        size += len(block)
                        total += len(block)
                        if size > info.file_size:
                            raise UnsafeSubmission(f"member {info.filename!r} inflates past its declared size")
                        limits.check_total(total)
                        dst.write(block)
                written.append(info.filename)
    except zipfile.BadZipFile as e:
        shutil.rmtree(dest, ignore_errors=True)
        raise UnsafeSubmission(f"{Path(path).name}: a corrupt zip ({e})") from None
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return written
