"""TensorRT for the course: the only package that imports ``tensorrt`` or ``tensorrt_rtx`` (lazily). Chapters 2, 3.

* :mod:`.flavour`   which TensorRT: full TensorRT or TensorRT for RTX, and where their APIs differ
* :mod:`.network`   an ONNX parsed into a TensorRT network: layer count, census of layer types
* :mod:`.profiles`  optimization profiles from ONNX inputs (static, dynamic) -- pure Python
* :mod:`.plan`      the plan's JSON sidecar and atomic writes -- pure Python
* :mod:`.logger`    TensorRT's log through Python ``logging``
* :mod:`.build`     ONNX -> plan (``build_engine_plan``, ``build_plans``) and the TRT 8 -> 10 table
* :mod:`.engine`    ``Engine``: load, activate, allocate buffers by name, infer
* :mod:`.cudagraph` CUDA graph capture / replay (chapter 3)

Importing this package never imports TensorRT; the functions that need it call
:func:`require_tensorrt`, which raises ``MissingDependency`` with one sentence (naming both
packages) when neither is installed.
"""
from __future__ import annotations


def require_tensorrt(purpose: str = "building and running TensorRT plans", tensorrt: str | None = None):
    """Chapter 2: the TensorRT module in force (``tensorrt`` or ``tensorrt_rtx``, see :mod:`.flavour`).

    ``tensorrt``: ``"auto"``, ``"tensorrt"`` or ``"tensorrt_rtx"``; None: ``--tensorrt`` /
    ``$COURSE_TENSORRT`` / auto. Raises ``course_lib.env.MissingDependency`` saying what to install;
    the CLI prints its one line and exits with status 2.
    """
    from .flavour import load

    return load(tensorrt, purpose)


def tensorrt_version(tensorrt: str | None = None) -> str | None:
    """The version of the TensorRT flavour in force (e.g. ``"1.7.1.116"``), or None when none is installed."""
    from course_lib.env import MissingDependency

    try:
        return require_tensorrt(tensorrt=tensorrt).__version__
    except (MissingDependency, ValueError):
        return None


from .build import TRT8_TO_TRT10, build_engine_plan, build_plans, migration_table  # noqa: E402
from .cudagraph import CudaGraphRunner, GraphAction, GraphPolicy, GraphState, TorchGraphed  # noqa: E402
from .engine import Engine, check_feed, shared_device_memory, torch_dtype  # noqa: E402
from .flavour import FeatureMissing, has_feature, require_feature  # noqa: E402
from .network import NetworkSummary, inspect_onnx, layer_census  # noqa: E402
from .plan import PlanSidecar, check_sidecar, read_sidecar, sidecar_path, write_sidecar  # noqa: E402
from .profiles import (  # noqa: E402
    check_profile, dims_from_contract, dynamic_profile, onnx_input_dims, profile_table, shapes_at, static_profile,
)

__all__ = [
    "require_tensorrt", "tensorrt_version", "FeatureMissing", "has_feature", "require_feature",
    "NetworkSummary", "inspect_onnx", "layer_census",
    "TRT8_TO_TRT10", "build_engine_plan", "build_plans", "migration_table",
    "CudaGraphRunner", "GraphAction", "GraphPolicy", "GraphState", "TorchGraphed",
    "Engine", "check_feed", "shared_device_memory", "torch_dtype",
    "PlanSidecar", "check_sidecar", "read_sidecar", "sidecar_path", "write_sidecar",
    "check_profile", "dims_from_contract", "dynamic_profile", "onnx_input_dims", "profile_table",
    "shapes_at", "static_profile",
]
