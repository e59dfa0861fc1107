"""A plan's JSON sidecar: what built it, so a later run can trust it. Introduced in chapter 2.

A TensorRT plan (``unet.plan``) only runs with the TensorRT version and the kind of GPU that built
it. Next to every plan the builder writes ``unet.plan.json`` with the TensorRT version, the GPU and
its compute capability, the profiles, the precision, the builder optimization level, the build time
and the ONNX it came from. :func:`check_sidecar` compares that with this machine before the plan is
deserialized, and says in one line how to rebuild it.
"""
from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from course_lib.files import atomic_write_text

SIDECAR_FORMAT = 1


def sidecar_path(plan_path: str | Path) -> Path:
    """``x.plan`` -> ``x.plan.json``."""
    return Path(str(plan_path) + ".json")


def normalize_cc(cc) -> str:
    """A compute capability as digits: ``(8, 6)``, ``"8.6"``, ``"sm_86"`` and ``"86"`` all give ``"86"``."""
    if isinstance(cc, (tuple, list)):
        return "".join(str(int(part)) for part in cc)
    return "".join(ch for ch in str(cc) if ch.isdigit())


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

    def describe(self) -> str:
        """One line: ``TensorRT 10.8.0.43 on NVIDIA GeForce RTX 3060 (sm_86)``."""
        return f"TensorRT {self.tensorrt} on {self.gpu} (sm_{self.compute_capability})"


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


def check_sidecar(sidecar: PlanSidecar, trt_version: str, gpu_name: str, cc, *,
                  plan_path: str | Path | None = None, strict_gpu: bool = False) -> None:
    """Chapter 2: raise one ValueError when a plan was built for another TensorRT or GPU.

    A plan needs the exact TensorRT version and the same compute capability. A different GPU model
    with the same compute capability runs but is not tuned for: a warning, or an error with
    ``strict_gpu=True``.
    """
    here_cc = normalize_cc(cc)
    version_ok = sidecar.tensorrt == trt_version
    cc_ok = normalize_cc(sidecar.compute_capability) == here_cc
    gpu_ok = sidecar.gpu == gpu_name
    if version_ok and cc_ok and gpu_ok:
        return
    name = Path(plan_path).name if plan_path is not None else sidecar.plan
    msg = (f"plan {name} was built for {sidecar.describe()}; this machine has TensorRT {trt_version} on "
           f"{gpu_name} (sm_{here_cc}): rebuild it with {rebuild_command(sidecar, plan_path)}")
    if version_ok and cc_ok and not strict_gpu:
        warnings.warn(msg, stacklevel=2)
        return
    raise ValueError(msg)
