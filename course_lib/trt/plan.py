"""A plan's JSON sidecar: what built it, so a later run can trust it. Introduced in chapter 2.

A TensorRT plan (``unet.plan``) only runs with the TensorRT flavour and version that built it, and
only on the GPUs it was built for: full TensorRT's on the kind of GPU that built it (same compute
capability), TensorRT for RTX's on the compute capabilities it targeted (built ahead of time, often
on a machine without a GPU). Next to every plan the builder writes ``unet.plan.json`` with the
flavour, its version, the target (GPU and compute capability, or "ahead of time, for compute
capability ..."), the profiles, the precision, the builder optimization level, the build time and
the ONNX it came from. :func:`check_sidecar` compares that with this machine before the plan is
deserialized, and says in one line which part differs and how to rebuild it.
"""
from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from course_lib.env import cc_digits as normalize_cc   # "8.6", (8, 6), "sm_86" -> "86"
from course_lib.env import cc_dotted as dotted_cc      # "86" -> "8.6", "120" -> "12.0"
from course_lib.files import atomic_write_text

SIDECAR_FORMAT = 2       # 2: flavour, target and compute_capabilities added (format-1 sidecars: full TensorRT)
FLAVOUR_LABELS = {"tensorrt": "TensorRT", "tensorrt_rtx": "TensorRT for RTX"}


def sidecar_path(plan_path: str | Path) -> Path:
    """``x.plan`` -> ``x.plan.json``."""
    return Path(str(plan_path) + ".json")


def ahead_of_time_target(ccs) -> str:
    """``"ahead of time, for compute capability 8.0, 8.6, 8.9, 12.0"``."""
    return "ahead of time, for compute capability " + ", ".join(dotted_cc(c) for c in ccs)


@dataclass
class PlanSidecar:
    """What built one plan. ``profiles`` holds JSON lists: ``[{input: [min, opt, max]}, ...]``."""
    plan: str
    tensorrt: str
    gpu: str
    compute_capability: str
    profiles: list[dict[str, list[list[int]]]]
    precision: str
    builder_optimization_level: int
    workspace_gib: float
    strongly_typed: bool
    build_seconds: float
    built_at: str
    onnx_path: str
    onnx_sha256: str
    format: int = SIDECAR_FORMAT
    extra: dict = field(default_factory=dict)
    flavour: str = "tensorrt"                # "tensorrt" or "tensorrt_rtx" (format 1: always "tensorrt")
    target: str = ""                         # "NVIDIA GeForce RTX 3060 (compute capability 8.6)" or
                                             # "ahead of time, for compute capability 8.0, 8.6, 8.9, 12.0"
    compute_capabilities: list[str] = field(default_factory=list)  # where it runs, as digits: ["80", "86"]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "sidecar") -> "PlanSidecar":
        names = [f.name for f in dataclasses.fields(cls)]
        required = [f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [n for n in required if n not in data]
        if missing:
            raise ValueError(f"{source} lacks {', '.join(missing)}: rebuild the plan with python -m course_lib build")
        return cls(**{k: v for k, v in data.items() if k in names})

    @property
    def runs_on(self) -> list[str]:
        """The compute capabilities (digits) the plan runs on."""
        return [normalize_cc(c) for c in self.compute_capabilities] or [normalize_cc(self.compute_capability)]

    @property
    def ahead_of_time(self) -> bool:
        return self.target.startswith("ahead of time")

    def describe(self) -> str:
        """One line: ``TensorRT 10.8.0.43 on NVIDIA GeForce RTX 3060 (sm_86)``, or for TensorRT for RTX
        ``TensorRT for RTX 1.7.1.116, ahead of time, for compute capability 8.0, 8.6, 8.9, 12.0``."""
        name = FLAVOUR_LABELS.get(self.flavour, self.flavour)
        if self.flavour == "tensorrt" and not self.ahead_of_time:
            return f"{name} {self.tensorrt} on {self.gpu} (sm_{self.compute_capability})"
        return f"{name} {self.tensorrt}, {self.target or ahead_of_time_target(self.runs_on)}"


def write_sidecar(plan_path: str | Path, sidecar: PlanSidecar) -> Path:
    """Chapter 2: write ``<plan>.json`` atomically; returns its path."""
    return atomic_write_text(sidecar_path(plan_path), json.dumps(sidecar.to_dict(), indent=2) + "\n")


def read_sidecar(plan_path: str | Path) -> PlanSidecar:
    """Chapter 2: read ``<plan>.json``; FileNotFoundError (with the rebuild command) when it is missing."""
    path = sidecar_path(plan_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {Path(plan_path).name} has no sidecar; rebuild it with "
                                f"python -m course_lib build, or load it with check_sidecar=False if you trust it")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}): rebuild the plan with python -m course_lib build") from e
    return PlanSidecar.from_dict(data, source=str(path))


def rebuild_command(sidecar: PlanSidecar, plan_path: str | Path | None = None) -> str:
    """The CLI line that rebuilds a plan from the ONNX named in its sidecar."""
    onnx_dir = Path(sidecar.onnx_path).parent if sidecar.onnx_path else Path("DIR")
    out_dir = Path(plan_path).parent if plan_path is not None else Path("DIR")
    return f"python -m course_lib build --onnx-dir {onnx_dir} --out {out_dir}"


def check_sidecar(sidecar: PlanSidecar, trt_version: str, gpu_name: str | None, cc, *, flavour: str = "tensorrt",
                  plan_path: str | Path | None = None, strict_gpu: bool = False) -> None:
    """Chapter 2: raise one ValueError when a plan was built for another TensorRT, version or GPU.

    ``flavour``/``trt_version``: the TensorRT of this process; ``gpu_name``/``cc``: this machine's GPU
    (None: no GPU). A plan needs the same flavour and exact version, and a GPU it was built for:
    full TensorRT's the same compute capability (another GPU model of that compute capability runs
    it, untuned: a warning, or an error with ``strict_gpu=True``); TensorRT for RTX's one of the
    compute capabilities it targeted (any GPU model: its kernels are compiled on the GPU).
    """
    name = Path(plan_path).name if plan_path is not None else sidecar.plan
    here = FLAVOUR_LABELS.get(flavour, flavour)
    fix = f"rebuild it with {rebuild_command(sidecar, plan_path)}"
    if sidecar.flavour != flavour:
        raise ValueError(f"plan {name} was built by {sidecar.describe()}; this process uses {here} {trt_version}: "
                         f"rebuild it with COURSE_TENSORRT={flavour} {rebuild_command(sidecar, plan_path)}, "
                         f"or load it with COURSE_TENSORRT={sidecar.flavour}")
    if sidecar.tensorrt != trt_version:
        raise ValueError(f"plan {name} was built for {sidecar.describe()}; this machine has {here} {trt_version}: {fix}")
    if cc is None:
        raise ValueError(f"plan {name} ({sidecar.describe()}) needs a CUDA GPU to run and this machine has none: "
                         f"run it on a GPU of compute capability {', '.join(dotted_cc(c) for c in sidecar.runs_on)}")
    here_cc = normalize_cc(cc)
    if normalize_cc(here_cc) not in sidecar.runs_on:
        raise ValueError(f"plan {name} was built for {sidecar.describe()}; this machine has {here} {trt_version} on "
                         f"{gpu_name} (sm_{here_cc}): {fix}")
    if flavour == "tensorrt_rtx" or sidecar.ahead_of_time or sidecar.gpu == gpu_name:
        return
    msg = (f"plan {name} was built for {sidecar.describe()}; this machine has {here} {trt_version} on "
           f"{gpu_name} (sm_{here_cc}): {fix}")
    if not strict_gpu:
        warnings.warn(msg, stacklevel=2)
        return
    raise ValueError(msg)


def this_gpu() -> tuple[str | None, str | None]:
    """Chapter 2: this machine's CUDA GPU as ``(name, compute capability digits)``, or ``(None, None)``.

    Asks torch (the CPU build of torch, or no GPU, gives ``(None, None)``; nothing fails).
    """
    try:
        import torch
    except ImportError:
        return None, None
    if not torch.cuda.is_available():
        return None, None
    device = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(device)
    return torch.cuda.get_device_name(device), f"{major}{minor}"
