"""Which TensorRT: full TensorRT (``tensorrt``) or TensorRT for RTX (``tensorrt_rtx``). Chapter 2.

Both are NVIDIA's TensorRT with the same Python API (``Builder``, ``OnnxParser``, profiles,
``build_serialized_network``, ``Runtime``, tensor names, ``execute_async_v3``). They differ in what
the builder does and where the plan runs:

* **TensorRT** (``pip install tensorrt-cu13``): the builder times kernels *on the GPU it runs on*
  (autotuning, the timing cache keeps the results); the plan runs on that kind of GPU only
  (same compute capability). Data-centre GPUs (H100, A100, A10, L4, T4) and RTX cards.
* **TensorRT for RTX** (``pip install tensorrt-rtx``): the builder needs no GPU (ahead of time:
  it picks kernel families for a list of compute capabilities, weights go inside the plan); the GPU
  compiles the kernels just in time on first use, and a *runtime cache* keeps them for the next
  run. Plans run on compute capability 8.0, 8.6, 8.9 and 12.0 (7.5 when targeted): A100, A10, RTX
  30/40/50, L4, L40 -- not on Hopper (H100/H200).

This module is the one place that imports either (:func:`load`). The choice: ``tensorrt=`` where a
function takes it, else :func:`select` (the CLI's ``--tensorrt``), else the environment variable
``COURSE_TENSORRT=tensorrt|tensorrt_rtx``, else automatic: full TensorRT first. Where the APIs
differ the code asks :func:`has_feature` (``hasattr`` on the real module's classes) and
:func:`require_feature` raises one sentence naming the flavour and the alternative.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass

from course_lib.env import (  # the facts about both flavours live on the ground floor, for `env`
    FLAVOURS, MissingDependency, PIP, RTX_DEFAULT_CCS, RTX_TARGETABLE_CCS, TRT_LABELS as LABELS, cc_digits, cc_dotted,
    has_module,
)

ENV_VAR = "COURSE_TENSORRT"
CHOICES = ("auto", *FLAVOURS)

_selected: str | None = None


class FeatureMissing(ValueError):
    """A chapter asked a TensorRT flavour for something it does not have (one sentence)."""


@dataclass(frozen=True)
class Feature:
    """Where the two APIs differ: the real API names a feature needs, and what to use without it."""
    what: str                     # "runtime cache of ..." (read as "<flavour> has no <what>")
    needs: tuple[str, ...]        # "Class.attr" or "Name" on the module; all must exist
    alternative: str              # what to do on a flavour without it
    rtx: bool | None = None       # True/False: only/never on TensorRT for RTX, whatever hasattr says


FEATURES: dict[str, Feature] = {
    "runtime_cache": Feature(
        "runtime cache of just-in-time compiled kernels",
        ("ICudaEngine.create_runtime_config", "IRuntimeConfig.create_runtime_cache",
         "IRuntimeConfig.set_runtime_cache", "IRuntimeCache.serialize", "IRuntimeCache.deserialize"),
        "leave runtime_cache off: full TensorRT compiles nothing at load time", rtx=True),
    "compute_capability_targets": Feature(
        "compute-capability targets (ahead-of-time builds)",
        ("IBuilderConfig.set_compute_capability", "IBuilderConfig.num_compute_capabilities", "ComputeCapability"),
        "build on the GPU that will run the plan, or use TensorRT for RTX (pip install tensorrt-rtx)"),
    "cuda_graph_strategy": Feature(
        "built-in CUDA-graph strategy",
        ("IRuntimeConfig.cuda_graph_strategy", "CudaGraphStrategy"),
        "use the course's own capture, Engine.infer(..., use_cuda_graph=True) (chapter 3)"),
    "fp16_flag": Feature(
        "FP16 builder flag",
        ("BuilderFlag.FP16",),
        "build an FP16 ONNX (course_lib.precision.to_fp16_onnx, chapter 3) into a strongly typed network"),
    "timing_cache": Feature(
        "timing cache (it times no kernels on the device; its timing-cache calls are deprecated no-ops "
        "that make the builder look for a GPU)",
        ("IBuilderConfig.create_timing_cache", "IBuilderConfig.set_timing_cache", "ITimingCache.serialize"),
        "leave timing_cache out; the runtime cache (Engine(..., runtime_cache=True)) keeps its JIT kernels",
        rtx=False),
    "user_allocation": Feature(
        "builder flag REQUIRE_USER_ALLOCATION (its plans need it for a stream capture of their own)",
        ("BuilderFlag.REQUIRE_USER_ALLOCATION",),
        "leave user_allocation off: full TensorRT plans can be stream-captured as built"),
    "engine_validity": Feature(
        "plan-header check against this GPU",
        ("Runtime.get_engine_validity", "EngineValidity", "EngineInvalidityDiagnostics"),
        "rely on the plan's sidecar check"),
}


def select(choice: str | None) -> None:
    """Chapter 2: use this flavour from now on in this process (the CLI's ``--tensorrt``); None: undo."""
    global _selected
    _selected = None if choice is None else check_choice(choice)


def check_choice(choice: str) -> str:
    """``choice`` if it is ``auto``, ``tensorrt`` or ``tensorrt_rtx``, else ValueError."""
    if choice not in CHOICES:
        raise ValueError(f"TensorRT flavour {choice!r}: expected one of {', '.join(CHOICES)} "
                         f"(--tensorrt or {ENV_VAR})")
    return choice


def chosen(tensorrt: str | None = None) -> str:
    """The choice in force: the argument, else :func:`select`'s, else ``$COURSE_TENSORRT``, else auto."""
    if tensorrt is not None:
        return check_choice(tensorrt)
    if _selected is not None:
        return _selected
    raw = os.environ.get(ENV_VAR, "").strip()
    return check_choice(raw) if raw else "auto"


def installed(name: str) -> bool:
    """True when ``import name`` would find the package (nothing is imported)."""
    return has_module(name)


def missing_message(purpose: str = "", name: str | None = None) -> str:
    """One sentence: what is missing (one flavour, or both) and the two packages that give it."""
    need = f" for {purpose}" if purpose else ""
    both = (f"install {LABELS['tensorrt']} (pip install {PIP['tensorrt']}, with an NVIDIA GPU) or "
            f"{LABELS['tensorrt_rtx']} (pip install {PIP['tensorrt_rtx']}; its builder needs no GPU)")
    if name is None:
        return f"neither tensorrt nor tensorrt_rtx is installed{need}: {both}."
    other = FLAVOURS[1 - FLAVOURS.index(name)]
    return (f"{name} ({LABELS[name]}) is asked for ({ENV_VAR} or --tensorrt) but not installed{need}: "
            f"pip install {PIP[name]}, or choose {other} or auto.")


def resolve(tensorrt: str | None = None, purpose: str = "") -> str:
    """The flavour to use (``"tensorrt"`` or ``"tensorrt_rtx"``); MissingDependency when it is absent."""
    choice = chosen(tensorrt)
    if choice == "auto":
        for name in FLAVOURS:
            if installed(name):
                return name
        raise MissingDependency(missing_message(purpose))
    if not installed(choice):
        raise MissingDependency(missing_message(purpose, choice))
    return choice


def load(tensorrt: str | None = None, purpose: str = ""):
    """Chapter 2: import and return the TensorRT module to use (``tensorrt`` or ``tensorrt_rtx``).

    Raises ``course_lib.env.MissingDependency`` with one sentence naming both packages.
    """
    name = resolve(tensorrt, purpose)
    try:
        return importlib.import_module(name)
    except ImportError as e:  # installed but broken (e.g. a missing CUDA library)
        raise MissingDependency(f"{name} is installed but does not import ({str(e).splitlines()[0]}): "
                                f"reinstall it (pip install {PIP[name]})") from e


def require_tensorrt(purpose: str = "building and running TensorRT plans", tensorrt: str | None = None):
    """Chapter 2: the TensorRT module in force (``tensorrt`` or ``tensorrt_rtx``).

    ``tensorrt``: ``"auto"``, ``"tensorrt"`` or ``"tensorrt_rtx"``; None: ``--tensorrt`` /
    ``$COURSE_TENSORRT`` / auto. Raises ``course_lib.env.MissingDependency`` saying what to install;
    the CLI prints its one line and exits with status 2.
    """
    return load(tensorrt, purpose)


def flavour_of(trt) -> str:
    """``"tensorrt"`` or ``"tensorrt_rtx"`` for a loaded module."""
    name = getattr(trt, "__name__", "").split(".")[0]      # the module's name (getattr: not a TensorRT API name)
    if name not in FLAVOURS:
        raise ValueError(f"module {name!r} is not a TensorRT flavour: expected one of {', '.join(FLAVOURS)}")
    return name


def is_rtx(trt) -> bool:
    return flavour_of(trt) == "tensorrt_rtx"


def label(trt_or_name) -> str:
    """``"TensorRT for RTX 1.7.1.116"`` for a module; ``"TensorRT for RTX"`` for a flavour name."""
    if isinstance(trt_or_name, str):
        return LABELS[trt_or_name]
    return f"{LABELS[flavour_of(trt_or_name)]} {trt_or_name.__version__}"


def _resolve_name(trt, dotted: str):
    obj = trt
    for part in dotted.split("."):
        if not hasattr(obj, part):
            return None
        obj = getattr(obj, part)
    return obj


def has_feature(trt, feature: str) -> bool:
    """Chapter 2: does this flavour have ``feature`` (a key of :data:`FEATURES`)? Looked up on the real module."""
    spec = FEATURES[feature]
    if spec.rtx is not None and spec.rtx != is_rtx(trt):
        return False
    return all(_resolve_name(trt, name) is not None for name in spec.needs)


def require_feature(trt, feature: str) -> None:
    """Raise :class:`FeatureMissing` (one sentence: the flavour, what it lacks, the alternative) unless present."""
    if not has_feature(trt, feature):
        spec = FEATURES[feature]
        raise FeatureMissing(f"{label(trt)} has no {spec.what}: {spec.alternative}.")


# --- the parts of the API that only one flavour has --------------------------------------------

def compute_capability_enum(trt, cc):
    """The ``trt.ComputeCapability`` member for ``"8.6"`` (TensorRT for RTX only)."""
    require_feature(trt, "compute_capability_targets")
    member = getattr(getattr(trt, "ComputeCapability"), f"SM{cc_digits(cc)}", None)  # RTX-only names: getattr
    if cc_dotted(cc) not in RTX_TARGETABLE_CCS or member is None:
        raise ValueError(f"compute capability {cc!r}: {label(trt)} targets {', '.join(RTX_TARGETABLE_CCS)}")
    return member


def whole_graph_strategy(trt):
    """``trt.CudaGraphStrategy.WHOLE_GRAPH_CAPTURE`` (TensorRT for RTX only)."""
    require_feature(trt, "cuda_graph_strategy")
    return getattr(trt, "CudaGraphStrategy").WHOLE_GRAPH_CAPTURE


def engine_validity(trt, runtime, plan_bytes) -> str | None:
    """TensorRT for RTX's header check of a plan against this GPU: None when valid, else one reason."""
    if not has_feature(trt, "engine_validity"):
        return None
    validity, diagnostics = runtime.get_engine_validity(plan_bytes)
    if validity == getattr(trt, "EngineValidity").VALID:
        return None
    flags = getattr(trt, "EngineInvalidityDiagnostics").__members__.items()
    reasons = [name.lower().replace("_", " ") for name, member in flags if int(diagnostics) & int(member)]
    return f"{validity.name.lower()} on this GPU ({', '.join(reasons) or 'no reason given'})"

