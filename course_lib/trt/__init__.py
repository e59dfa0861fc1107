"""TensorRT for the course: the only package that imports ``tensorrt`` or ``tensorrt_rtx`` (lazily). Chapters 2, 3.

* :mod:`.flavour`   which TensorRT: full TensorRT or TensorRT for RTX, and where their APIs differ
* :mod:`.network`   an ONNX parsed into a TensorRT network: layer count, census of layer types
* :mod:`.profiles`  optimization profiles from ONNX inputs (static, dynamic) -- pure Python
* :mod:`.plan`      the plan's JSON sidecar and its check against this machine -- pure Python
* :mod:`.logger`    TensorRT's log through Python ``logging``
* :mod:`.build`     ONNX -> plan (``build_engine_plan``, ``build_plans``) and the TRT 8 -> 10 table
* :mod:`.engine`    ``Engine``: load, activate, allocate buffers by name, infer
* :mod:`.runtime_config` the engine's runtime config: TensorRT for RTX's JIT-kernel cache and CUDA graphs
* :mod:`.sweep`     homework 2's sweep over optimization levels and CUDA graphs

CUDA graphs (the course's capture, for torch functions and engines alike) live in :mod:`course_lib.cudagraph`.

Importing this package never imports TensorRT; the functions that need it call
:func:`require_tensorrt`, which raises ``MissingDependency`` with one sentence (naming both
packages) when neither is installed.
"""
from __future__ import annotations

from course_lib.trt.flavour import require_tensorrt


def tensorrt_version(tensorrt: str | None = None) -> str | None:
    """The version of the TensorRT flavour in force (e.g. ``"1.7.1.116"``), or None when none is installed."""
    from course_lib.env import MissingDependency

    try:
        return require_tensorrt(tensorrt=tensorrt).__version__
    except (MissingDependency, ValueError):
        return None


from course_lib.trt.build import TRT8_TO_TRT10, build_engine_plan, build_plans, migration_table  # noqa: E402
from course_lib.trt.engine import Engine, check_feed, shared_device_memory, torch_dtype  # noqa: E402
from course_lib.trt.flavour import FeatureMissing, has_feature, require_feature  # noqa: E402
from course_lib.trt.network import NetworkSummary, inspect_onnx, layer_census  # noqa: E402
from course_lib.trt.plan import PlanSidecar, check_sidecar, read_sidecar, sidecar_path, write_sidecar  # noqa: E402
from course_lib.trt.profiles import (  # noqa: E402
    check_profile, dims_from_contract, dynamic_profile, onnx_input_dims, profile_table, shapes_at, static_profile,
)

__all__ = [
    "require_tensorrt", "tensorrt_version", "FeatureMissing", "has_feature", "require_feature",
    "NetworkSummary", "inspect_onnx", "layer_census",
    "TRT8_TO_TRT10", "build_engine_plan", "build_plans", "migration_table",
    "Engine", "check_feed", "shared_device_memory", "torch_dtype",
    "PlanSidecar", "check_sidecar", "read_sidecar", "sidecar_path", "write_sidecar",
    "check_profile", "dims_from_contract", "dynamic_profile", "onnx_input_dims", "profile_table",
    "shapes_at", "static_profile",
]
