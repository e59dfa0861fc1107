"""Homework grading: what is inside a submission's files, checked before anything reads them for real.

Chapter-free helpers of the grader (:mod:`course_lib.homework.grade_zip`) and of ``submit``: after
:func:`course_lib.homework.safezip.safe_extract` has unpacked a zip safely, :func:`check_file_types`
sniffs the content of JSON / PNG / NPZ / safetensors members (archives inside the archive bounded by the
same :class:`~course_lib.homework.safezip.ZipLimits` before they are inflated, a PNG's header against
``max_file_mb``), and :func:`check_external_data` keeps an ONNX model's external-data paths inside the
submission (ONNX Runtime would otherwise read any file a location names). Every refusal is an
:class:`~course_lib.homework.safezip.UnsafeSubmission` naming the file.
"""
from __future__ import annotations

import json
import zipfile
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from course_lib.homework.safezip import PNG_MAGIC, UnsafeSubmission, ZipLimits

def check_file_types(root: str | Path, names: Iterable[str], limits: ZipLimits = ZipLimits()) -> None:
    """Homework grading: JSON parses, PNG has its magic and a size within ``limits``, NPZ holds only ``.npy``
    arrays without objects, within ``limits`` (checked before numpy inflates them), safetensors has its JSON
    header. Raises :class:`UnsafeSubmission` naming the first bad file."""
    import numpy as np

    root = Path(root)
    for name in sorted(names):
        path, suffix = root / name, PurePosixPath(name).suffix.lower()
        try:
            if suffix == ".json":
                json.loads(path.read_text(encoding="utf-8"))
            elif suffix == ".png":
                check_png_size(path, limits)
            elif suffix == ".npz":
                check_npz(path, limits)
                with np.load(path, allow_pickle=False) as data:
                    for key in data.files:
                        data[key]
            elif suffix == ".safetensors":
                with open(path, "rb") as f:
                    n = int.from_bytes(f.read(8), "little")
                    if not 2 <= n <= 100 * 2**20:
                        raise ValueError(f"header length {n}")
                    json.loads(f.read(n))
        except UnsafeSubmission as e:
            raise UnsafeSubmission(f"{name}: {e}") from None
        except MemoryError:                  # the grader's memory limit: its own row, not "not a valid file"
            raise
        except Exception as e:  # json, zipfile, numpy raise many kinds  # noqa: BLE001
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise UnsafeSubmission(f"{name}: not a valid {suffix[1:]} file ({first})") from None


_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}       # colour type -> samples per pixel


def check_png_size(path: str | Path, limits: ZipLimits = ZipLimits()) -> None:
    """Homework grading: a PNG's signature, and an image (width x height x samples x bit depth, from its
    header) of at most ``limits.max_file_mb`` once decoded. Raises UnsafeSubmission or ValueError."""
    with open(path, "rb") as f:
        head = f.read(33)
    if head[:8] != PNG_MAGIC:
        raise ValueError("no PNG signature")
    if len(head) < 33 or head[12:16] != b"IHDR":
        raise ValueError("no IHDR header")
    width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    depth, colour = head[24], head[25]
    decoded = width * height * _PNG_CHANNELS.get(colour, 4) * max(depth, 8) // 8
    if decoded > limits.max_file_mb * 2**20:
        raise UnsafeSubmission(f"a {width}x{height} image decodes to {decoded / 2**20:.0f} MB, over the per-file "
                               f"limit of {limits.max_file_mb:g} MB (a decompression bomb?)")


def check_npz(path: str | Path, limits: ZipLimits = ZipLimits()) -> None:
    """Homework grading: an ``.npz`` (a zip inside the zip) within the same :class:`ZipLimits` as the
    submission, member by member, and each ``.npy`` header declaring no more bytes than its member holds:
    all checked from the zip's directory and the headers, before numpy inflates anything."""
    import numpy as np

    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
        if len(infos) > limits.max_members:
            raise UnsafeSubmission(f"{len(infos)} arrays, over the limit of {limits.max_members} members")
        total = 0
        for info in infos:
            shown = f"array {info.filename!r}"
            if not info.filename.endswith(".npy"):
                raise ValueError("holds something other than .npy arrays")
            if info.flag_bits & 0x1 or info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise UnsafeSubmission(f"{shown} is encrypted or uses compression method {info.compress_type}")
            if info.file_size > limits.max_file_mb * 2**20:
                raise UnsafeSubmission(f"{shown} inflates to {info.file_size / 2**20:.1f} MB, over the per-file "
                                       f"limit of {limits.max_file_mb:g} MB (a zip bomb inside the zip?)")
            if info.file_size > 2**20 and info.file_size > limits.max_ratio * max(info.compress_size, 1):
                raise UnsafeSubmission(f"{shown} expands {info.file_size / max(info.compress_size, 1):.0f}x, over "
                                       f"the limit of {limits.max_ratio:g}x (a zip bomb inside the zip?)")
            total += info.file_size
            if total > limits.max_total_mb * 2**20:
                raise UnsafeSubmission(f"its arrays inflate to over {limits.max_total_mb:g} MB in all, the limit")
            with zf.open(info) as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, _, dtype = np.lib.format.read_array_header_1_0(f)
                elif version == (2, 0):
                    shape, _, dtype = np.lib.format.read_array_header_2_0(f)
                else:
                    raise ValueError(f"{shown}: .npy version {version} (expected 1.0 or 2.0)")
                header = f.tell()
            if dtype.hasobject:
                raise ValueError(f"{shown} holds Python objects (pickles are refused)")
            declared = int(np.prod(shape, dtype=object)) * dtype.itemsize
            if declared > info.file_size - header:
                raise UnsafeSubmission(f"{shown} declares {declared} bytes of data but holds "
                                       f"{info.file_size - header} (a header made to allocate more?)")


def external_data_locations(onnx_path: str | Path) -> list[str]:
    """Homework grading: the external-data file names an ONNX model's tensors point at (initializers and
    tensors in node attributes, subgraphs included; the graph is read, not the data)."""
    import onnx

    from course_lib.onnx.external_data import external_tensors

    model = onnx.load(str(onnx_path), load_external_data=False)
    found = []
    for tensor in external_tensors(model):
        location = {e.key: e.value for e in tensor.external_data}.get("location", "")
        if location not in found:
            found.append(location)
    return found


def check_external_data(onnx_path: str | Path, root: str | Path, must_exist: bool = True) -> list[str]:
    """Homework grading: every external-data location of ``onnx_path`` is a plain relative path that stays
    inside ``root`` (and exists there, with ``must_exist``). Returns the locations; raises UnsafeSubmission."""
    onnx_path, root = Path(onnx_path), Path(root).resolve()
    try:
        locations = external_data_locations(onnx_path)
    except Exception as e:  # protobuf DecodeError  # noqa: BLE001
        raise UnsafeSubmission(f"{onnx_path.name}: not a readable ONNX model ({type(e).__name__})") from None
    for location in locations:
        shown = f"{onnx_path.name}: external data location {location!r}"
        if not location or location.startswith(("/", "\\")) or "\\" in location or ":" in location \
                or any(p in ("", ".", "..") for p in location.split("/")):
            raise UnsafeSubmission(f"{shown} is not a plain relative path inside the submission")
        target = (onnx_path.parent / location).resolve()
        if not target.is_relative_to(root):
            raise UnsafeSubmission(f"{shown} points outside the submission")
        if must_exist and not target.is_file():
            raise UnsafeSubmission(f"{shown}: that file is not in the submission")
    return locations
