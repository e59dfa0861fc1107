"""Where the Triton server binary comes from on a machine without NVIDIA's container. Chapter 7.

PyPI has one package that ships a runnable ``tritonserver``: PyTriton (``nvidia-pytriton``). Version
0.7.0 bundles Triton Inference Server 2.51 with the **Python backend only** (no ONNX Runtime or
TensorRT backend: those come with NVIDIA's container, see :mod:`course_lib.serve.repository`).
Installing the package itself would pin ``numpy<2`` (and so downgrade numpy and OpenCV for the whole
course), and the course needs only the server, so :func:`install_tritonserver` takes the wheel with
``pip download --no-deps`` and unpacks just two folders of it, keeping their relative layout (the
binaries find their libraries through ``$ORIGIN``-relative paths)::

    <home>/pytriton/tritonserver/bin/tritonserver
    <home>/pytriton/tritonserver/backends/python/       libtriton_python.so, triton_python_backend_utils.py
    <home>/pytriton/tritonserver/python_backend_stubs/  one triton_python_backend_stub per Python 3.8-3.13
    <home>/nvidia_pytriton.libs/                        libtritonserver, libcudart, ... (auditwheel's copies)

``<home>`` is ``$COURSE_TRITON_HOME`` or ``<sys.prefix>/share/course_lib/pytriton-0.7.0``: it belongs to
this Python environment and goes away with it. An installed ``nvidia-pytriton`` is copied from instead
of downloading. Nothing here starts the server (:mod:`course_lib.serve.server` does).
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from course_lib.env import MissingDependency

PYTRITON_VERSION = "0.7.0"          # bundles tritonserver 2.51.0
TRITON_VERSION = "2.51.0"
_MEMBERS = ("pytriton/tritonserver/", "nvidia_pytriton.libs/")
INSTALL_COMMAND = "python -m course_lib serve-install"


def triton_home() -> Path:
    """Chapter 7: the folder the server is unpacked into (``$COURSE_TRITON_HOME`` or inside this environment)."""
    env = os.environ.get("COURSE_TRITON_HOME")
    return Path(env) if env else Path(sys.prefix) / "share" / "course_lib" / f"pytriton-{PYTRITON_VERSION}"


@dataclass(frozen=True)
class TritonDist:
    """Chapter 7: an unpacked Triton server: the binary, its backends folder and its libraries."""
    home: Path

    @property
    def server_dir(self) -> Path:
        return self.home / "pytriton" / "tritonserver"

    @property
    def binary(self) -> Path:
        return self.server_dir / "bin" / "tritonserver"

    @property
    def backends(self) -> Path:
        return self.server_dir / "backends"

    @property
    def libs(self) -> Path:
        return self.home / "nvidia_pytriton.libs"

    def stub(self, version: str | None = None) -> Path:
        """The Python backend's stub process built for Python ``version`` (default: this interpreter's)."""
        version = version or f"{sys.version_info[0]}.{sys.version_info[1]}"
        return self.server_dir / "python_backend_stubs" / version / "triton_python_backend_stub"

    def complete(self) -> bool:
        return self.binary.is_file() and (self.backends / "python" / "libtriton_python.so").is_file() \
            and self.libs.is_dir()

    def prepare_python_backend(self) -> Path:
        """Put the stub for this interpreter's Python next to ``libtriton_python.so`` (PyTriton does the
        same at start); returns the backends folder to pass as ``--backend-directory``."""
        source = self.stub()
        if not source.is_file():
            raise MissingDependency(f"tritonserver {TRITON_VERSION} has no Python backend stub for Python "
                                    f"{sys.version_info[0]}.{sys.version_info[1]} (it ships 3.8-3.13)")
        target = self.backends / "python" / "triton_python_backend_stub"
        if not target.is_file() or target.read_bytes() != source.read_bytes():
            tmp = target.with_name(f".{target.name}.{os.getpid()}")
            shutil.copy2(source, tmp)
            os.replace(tmp, target)
        return self.backends


def find_tritonserver() -> TritonDist | None:
    """Chapter 7: the unpacked server of this environment, or None when ``serve-install`` has not run."""
    dist = TritonDist(triton_home())
    return dist if dist.complete() else None


def require_tritonserver() -> TritonDist:
    """Chapter 7: the unpacked server, or :class:`MissingDependency` saying how to get it (one sentence)."""
    dist = find_tritonserver()
    if dist is None:
        raise MissingDependency(f"tritonserver is not installed in {triton_home()}: run {INSTALL_COMMAND} "
                                f"(unpacks the server of nvidia-pytriton {PYTRITON_VERSION}, a 55 MB download; "
                                f"numpy is left alone)")
    return dist


def _installed_pytriton() -> Path | None:
    """The site-packages folder holding an installed nvidia-pytriton (its server inside), if any."""
    try:
        spec = importlib.util.find_spec("pytriton")          # finds the package without importing it
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations))).parent
    return root if (root / "pytriton" / "tritonserver" / "bin" / "tritonserver").is_file() else None


def _unzip(wheel: Path, dest: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            if not info.filename.startswith(_MEMBERS) or info.is_dir():
                continue
            target = dest / info.filename
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
            mode = ((info.external_attr >> 16) & 0o777 or 0o644) & 0o755     # as the wheel records it
            if "/bin/" in info.filename or info.filename.endswith("_stub"):
                mode |= stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH
            os.chmod(target, mode)


def _download_wheel(folder: Path, say) -> Path:
    say(f"downloading nvidia-pytriton {PYTRITON_VERSION} with pip (no dependencies; about 55 MB)")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
           f"nvidia-pytriton=={PYTRITON_VERSION}", "-d", str(folder)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(folder.glob("nvidia_pytriton-*.whl"))
    if proc.returncode or not wheels:
        last = (proc.stderr.strip().splitlines() or ["no wheel was written"])[-1]
        raise MissingDependency(f"pip could not download nvidia-pytriton {PYTRITON_VERSION}: {last}")
    return wheels[0]


def install_tritonserver(say=print, force: bool = False) -> TritonDist:
    """Chapter 7: unpack PyTriton's ``tritonserver`` into :func:`triton_home` (once; ``force`` redoes it).

    Copies from an installed ``nvidia-pytriton`` if there is one, else downloads its wheel with pip
    (``--no-deps``: nothing in the environment changes). The folder appears whole or not at all.
    """
    dist = TritonDist(triton_home())
    if dist.complete() and not force:
        say(f"tritonserver {TRITON_VERSION} already unpacked in {dist.home}")
        return dist
    if sys.platform != "linux":
        raise MissingDependency("the tritonserver of nvidia-pytriton runs on Linux x86_64 only; "
                                "elsewhere use NVIDIA's tritonserver container")
    dist.home.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dist.home.parent, prefix=".pytriton-") as tmp:
        staging = Path(tmp) / "home"
        installed = _installed_pytriton()
        if installed is not None:
            say(f"copying tritonserver from the installed nvidia-pytriton in {installed}")
            for member in _MEMBERS:
                shutil.copytree(installed / member, staging / member, symlinks=True)
        else:
            _unzip(_download_wheel(Path(tmp), say), staging)
        if not TritonDist(staging).complete():
            raise MissingDependency(f"nvidia-pytriton {PYTRITON_VERSION} did not contain the expected "
                                    f"tritonserver layout ({', '.join(_MEMBERS)})")
        if dist.home.exists():
            shutil.rmtree(dist.home)
        os.replace(staging, dist.home)
    say(f"tritonserver {TRITON_VERSION} unpacked in {dist.home}")
    return dist
