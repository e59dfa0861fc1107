"""What this machine can run: GPU, CUDA, TensorRT, ONNX Runtime providers -- in one place.

Chapter 1 introduces it (``python -m course_lib env``). Notebooks and tests ask this module, never
``import tensorrt`` themselves, so "what runs where" has one answer.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import platform
from dataclasses import dataclass, field

# what to install when an optional dependency is missing, by import name
INSTALL_HINTS = {
    "tensorrt": "TensorRT's Python package (pip install tensorrt-cu13, or the environment.yml of this course) "
                "on a machine with an NVIDIA GPU",
    "tensorrt_rtx": "TensorRT for RTX (pip install tensorrt-rtx; its builder needs no GPU, its plans run on "
                    "compute capability 8.0/8.6/8.9/12.0)",
    "cuda": "cuda-python (pip install cuda-python)",
    "polygraphy": "Polygraphy (pip install polygraphy)",
    "modelopt": "NVIDIA ModelOpt (pip install nvidia-modelopt[onnx]; keep it out of a CPU venv: it pulls onnxruntime-gpu)",
    "netron": "Netron (pip install netron)",
    "pytorch_fid": "pytorch-fid (pip install pytorch-fid) and its InceptionV3 weights",
    "onnxconverter_common": "onnxconverter-common (pip install onnxconverter-common)",
}


# the two TensorRT flavours (course_lib.trt.flavour uses them; `env` reports what each can do here)
FLAVOURS = ("tensorrt", "tensorrt_rtx")            # the automatic choice takes the first one installed
TRT_LABELS = {"tensorrt": "TensorRT", "tensorrt_rtx": "TensorRT for RTX"}
PIP = {"tensorrt": "tensorrt-cu13", "tensorrt_rtx": "tensorrt-rtx"}
RTX_DEFAULT_CCS = ("8.0", "8.6", "8.9", "12.0")    # where TensorRT for RTX plans run by default
RTX_TARGETABLE_CCS = ("7.5", "8.0", "8.6", "8.9", "12.0", "12.1")
RTX_GPUS = "A100, A10, RTX 30/40/50 series, L4, L40; not Hopper (H100, H200)"


class MissingDependency(ImportError):
    """An optional package a cell or command needs is not installed (one clear sentence)."""


def has_module(name: str) -> bool:
    """True when ``import name`` would find the package (nothing is imported)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def require(name: str, purpose: str = ""):
    """Import an optional dependency, or raise :class:`MissingDependency` saying what to install."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        what = INSTALL_HINTS.get(name.split(".")[0], f"the Python package {name!r}")
        need = f" for {purpose}" if purpose else ""
        raise MissingDependency(f"{name} is not installed{need}: install {what}.") from e


@dataclass
class Environment:
    """A snapshot of this machine's capabilities."""
    python: str
    torch: str
    cuda_available: bool
    gpu_name: str | None
    compute_capability: str | None
    cuda_runtime: str | None
    tensorrt: str | None
    onnxruntime: str | None
    ort_providers: list[str] = field(default_factory=list)
    cuda_python: bool = False
    polygraphy: str | None = None
    tensorrt_rtx: str | None = None          # TensorRT for RTX's version (course_lib.trt.flavour)

    @property
    def has_gpu(self) -> bool:
        return self.cuda_available

    def _flavours(self) -> dict[str, str | None]:
        return {"tensorrt": self.tensorrt, "tensorrt_rtx": self.tensorrt_rtx}

    @property
    def has_tensorrt(self) -> bool:
        """A TensorRT that runs plans here: full TensorRT with a GPU, or TensorRT for RTX with a GPU it targets."""
        return any(can_run(name, v, self.compute_capability) for name, v in self._flavours().items())

    @property
    def has_trt_builder(self) -> bool:
        """A TensorRT builder that works here: TensorRT for RTX (no GPU needed), or full TensorRT with a GPU."""
        return any(can_build(name, v, self.compute_capability) for name, v in self._flavours().items())

    def rows(self) -> list[tuple[str, str]]:
        yes = lambda b: "yes" if b else "no"  # noqa: E731
        return [
            ("python", self.python),
            ("torch", self.torch),
            ("CUDA GPU", f"{self.gpu_name} (sm_{self.compute_capability})" if self.cuda_available else "none"),
            ("CUDA runtime (torch)", self.cuda_runtime or "-"),
            ("TensorRT (tensorrt)", self._flavour_line("tensorrt")),
            ("TensorRT for RTX (tensorrt_rtx)", self._flavour_line("tensorrt_rtx")),
            ("cuda-python", yes(self.cuda_python)),
            ("polygraphy", self.polygraphy or "not installed"),
            ("onnxruntime", self.onnxruntime or "not installed"),
            ("ORT providers", ", ".join(self.ort_providers) or "-"),
        ]

    def _flavour_line(self, name: str) -> str:
        return status_line(name, self._flavours()[name], self.gpu_name, self.compute_capability)

    def skipped_cells(self) -> list[str]:
        """Which notebook cell tags will be skipped on this machine (see notebooks/conftest.py)."""
        tags = []
        if not self.has_gpu:
            tags.append("requires-gpu")
        if not self.has_tensorrt:
            tags.append("requires-tensorrt")
        if not self.has_trt_builder:
            tags.append("requires-trt-builder")
        return tags

    def report(self) -> str:
        width = max(len(k) for k, _ in self.rows())
        lines = [f"{k:<{width}}  {v}" for k, v in self.rows()]
        skipped = self.skipped_cells()
        lines.append(f"{'notebook cells':<{width}}  "
                     + ("all run" if not skipped else "skipped here: " + ", ".join(skipped)))
        return "\n".join(lines)


# --- what each TensorRT flavour can do on this machine ------------------------------------------

def cc_digits(cc) -> str:
    """A compute capability as digits: ``"8.6"``, ``(8, 6)``, ``"sm_86"``, ``"86"`` -> ``"86"``."""
    if isinstance(cc, (tuple, list)):
        return "".join(str(int(part)) for part in cc)
    return "".join(ch for ch in str(cc) if ch.isdigit())


def cc_dotted(cc) -> str:
    """``"86"`` -> ``"8.6"``, ``"120"`` -> ``"12.0"``."""
    digits = cc_digits(cc)
    return f"{digits[:-1]}.{digits[-1]}" if len(digits) > 1 else digits


def can_build(name: str, installed_version: str | None, gpu_cc: str | None) -> bool:
    """TensorRT for RTX builds anywhere; full TensorRT needs a GPU (it times kernels on it)."""
    return installed_version is not None and (name == "tensorrt_rtx" or gpu_cc is not None)


def can_run(name: str, installed_version: str | None, gpu_cc: str | None) -> bool:
    """Whether this machine runs this flavour's plans: a GPU, and for TensorRT for RTX one it targets."""
    if installed_version is None or gpu_cc is None:
        return False
    return name == "tensorrt" or cc_dotted(gpu_cc) in RTX_DEFAULT_CCS


def run_needs(name: str) -> str:
    """What running this flavour's plans needs, in words."""
    if name == "tensorrt_rtx":
        return f"a GPU of compute capability {'/'.join(RTX_DEFAULT_CCS)} ({RTX_GPUS})"
    return "a CUDA GPU of the compute capability the plan was built on"


def status_line(name: str, installed_version: str | None, gpu_name: str | None, gpu_cc: str | None) -> str:
    """One line for the ``env`` report: installed?, version, build yes/no, run: needs ... (and here?)."""
    if installed_version is None:
        return f"not installed (pip install {PIP[name]})"
    build = "yes" if can_build(name, installed_version, gpu_cc) else "no (needs a CUDA GPU)"
    if gpu_cc is None:
        here = "no GPU here"
    else:
        here = f"{gpu_name} (sm_{cc_digits(gpu_cc)}): {'yes' if can_run(name, installed_version, gpu_cc) else 'no'}"
    return f"{installed_version}; build: {build}; run: needs {run_needs(name)} -- {here}"


def _version(name: str) -> str | None:
    if not has_module(name):
        return None
    try:
        return getattr(importlib.import_module(name), "__version__", "unknown")
    except Exception:  # a broken install counts as missing  # noqa: BLE001
        return None


def detect() -> Environment:
    """Chapter 1: look at this machine once (torch, CUDA, both TensorRT flavours, ONNX Runtime)."""
    import torch

    cuda = torch.cuda.is_available()
    name = cc = None
    if cuda:
        name = torch.cuda.get_device_name(0)
        major, minor = torch.cuda.get_device_capability(0)
        cc = f"{major}{minor}"
    providers: list[str] = []
    ort = _version("onnxruntime")
    if ort:
        import onnxruntime

        providers = list(onnxruntime.get_available_providers())
    return Environment(
        python=platform.python_version(),
        torch=torch.__version__,
        cuda_available=cuda,
        gpu_name=name,
        compute_capability=cc,
        cuda_runtime=torch.version.cuda,
        tensorrt=_version("tensorrt"),
        tensorrt_rtx=_version("tensorrt_rtx"),
        onnxruntime=ort,
        ort_providers=providers,
        cuda_python=has_module("cuda.bindings") if has_module("cuda") else False,
        polygraphy=_version("polygraphy"),
    )


def required_capabilities() -> set[str]:
    """What the environment demands (``COURSE_REQUIRE=gpu,tensorrt``): tagged cells fail instead of skip."""
    raw = os.environ.get("COURSE_REQUIRE", "")
    return {part.strip().lower() for part in raw.split(",") if part.strip()}
