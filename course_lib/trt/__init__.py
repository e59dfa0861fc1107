"""TensorRT for the course: the only package that imports ``tensorrt`` (lazily). Chapters 2 and 3.

* :mod:`.profiles`  optimization profiles from ONNX inputs (static, dynamic) -- pure Python
* :mod:`.plan`      the plan's JSON sidecar and atomic writes -- pure Python
* :mod:`.logger`    TensorRT's log through Python ``logging``
* :mod:`.build`     ONNX -> plan (``build_engine_plan``, ``build_plans``) and the TRT 8 -> 10 table
* :mod:`.engine`    ``Engine``: load, activate, allocate buffers by name, infer

Importing this package never imports ``tensorrt``; the functions that need it call
:func:`require_tensorrt`, which raises ``MissingDependency`` with one sentence when it is missing.
"""
from __future__ import annotations


def require_tensorrt(purpose: str = "building and running TensorRT plans"):
    """Chapter 2: ``import tensorrt``, or raise ``course_lib.env.MissingDependency`` saying how to get it.

    The CLI catches that error, prints its one line and exits with status 2.
    """
    from course_lib.env import require

    return require("tensorrt", purpose)


def tensorrt_version() -> str | None:
    """The installed TensorRT version, or None (nothing is imported when it is missing)."""
    from course_lib.env import has_module

    if not has_module("tensorrt"):
        return None
    try:
        return require_tensorrt().__version__
    except ImportError:
        return None


from course_lib.trt.build import TRT8_TO_TRT10, build_engine_plan, build_plans, migration_table  # noqa: E402
from course_lib.trt.engine import Engine, check_feed, shared_device_memory, torch_dtype  # noqa: E402
from course_lib.trt.plan import PlanSidecar, check_sidecar, read_sidecar, sidecar_path, write_sidecar  # noqa: E402
from course_lib.trt.profiles import (  # noqa: E402
    check_profile, dims_from_contract, dynamic_profile, onnx_input_dims, profile_table, shapes_at, static_profile,
)

__all__ = [
    "require_tensorrt", "tensorrt_version",
    "TRT8_TO_TRT10", "build_engine_plan", "build_plans", "migration_table",
    "Engine", "check_feed", "shared_device_memory", "torch_dtype",
    "PlanSidecar", "check_sidecar", "read_sidecar", "sidecar_path", "write_sidecar",
    "check_profile", "dims_from_contract", "dynamic_profile", "onnx_input_dims", "profile_table",
    "shapes_at", "static_profile",
]
