"""ONNX -> TensorRT plan, with the TensorRT 10/11 builder API. Introduced in chapter 2.

``build_engine_plan`` is the course's ``onnx2trt`` rewritten: parse the ONNX from its file (so the
UNet's external weights are found), set the workspace pool, the builder optimization level and the
optimization profiles, reuse a timing cache, build a *serialized* plan, and write it atomically with
its JSON sidecar (:mod:`course_lib.trt.plan`). ``TRT8_TO_TRT10`` lists what changed since the
original course scripts (TensorRT 8) and is shown in chapter 2's notebook.

Either TensorRT flavour builds (:mod:`.flavour`). Full TensorRT builds on the GPU that will run the
plan, timing kernels there (the timing cache keeps those timings for the next build). TensorRT for
RTX builds *ahead of time* without a GPU, for a list of compute capabilities (its default: 8.0,
8.6, 8.9, 12.0), and has no timing cache: asking for one raises one sentence saying so.

FP16 comes from an FP16 ONNX and a strongly typed network (chapter 3). The old FP16 builder flag
only exists on TensorRT 10.x and only for networks that are not strongly typed.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path

from course_lib.cnsd.contract import MODEL_NAMES
from course_lib.files import atomic_write_bytes, sha256_file
from course_lib.trt.flavour import RTX_DEFAULT_CCS, compute_capability_enum, flavour_of, is_rtx, label, require_feature
from course_lib.trt.network import parse_onnx, summarize_network
from course_lib.trt.plan import PlanSidecar, ahead_of_time_target, dotted_cc, normalize_cc, this_gpu, write_sidecar
from course_lib.trt.profiles import (
    Profile, check_profile, dynamic_profile, onnx_input_dims, profile_to_json, shapes_at, static_profile,
)

MODEL_FILES = MODEL_NAMES
_BUILT: list[dict] = []   # every plan this process built: {"plan", "tensorrt", "seconds", "bytes"}

# (TensorRT 8 call in the original course scripts, its TensorRT 10/11 replacement)
TRT8_TO_TRT10: list[tuple[str, str]] = [
    ("trt.Logger(trt.Logger.VERBOSE)", "a trt.ILogger subclass that logs through Python (course_lib.trt.logger)"),
    ("builder.create_network(1 << int(NetworkDefinitionCreationFlag.EXPLICIT_BATCH))",
     "builder.create_network(1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED)) (explicit batch is the default)"),
    ("config.max_workspace_size = 10 << 30", "config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, 10 << 30)"),
    ("parser.parse(f.read(), path=onnx_file)", "parser.parse_from_file(onnx_file) (external data found next to it)"),
    ("config.set_flag(trt.BuilderFlag.FP16)", "an FP16 ONNX + a strongly typed network (the flag is gone in 11.0)"),
    ("builder.platform_has_fast_fp16", "nothing: FP16 is decided by the ONNX's types"),
    ("config.int8_calibrator = IInt8EntropyCalibrator2(...)", "explicit Q/DQ nodes in the ONNX (ModelOpt)"),
    ("tensor.set_dynamic_range(lo, hi)", "explicit Q/DQ nodes in the ONNX (ModelOpt)"),
    ("BuilderFlag.OBEY_PRECISION_CONSTRAINTS", "strong typing: each tensor keeps the ONNX's type"),
    ("builder.build_engine(network, config); engine.serialize()", "builder.build_serialized_network(network, config)"),
    ("polygraphy engine_from_bytes(bytes_from_path(p))", "trt.Runtime(logger).deserialize_cuda_engine(plan_bytes)"),
    ("engine.create_execution_context_without_device_memory(); context.device_memory = m",
     "engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED); "
     "context.set_device_memory(ptr, engine.device_memory_size_v2)"),
    ("engine.num_bindings / engine[i]", "engine.num_io_tensors / engine.get_tensor_name(i)"),
    ("engine.binding_is_input(b)", "engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT"),
    ("engine.get_binding_shape(b) / get_binding_dtype(b)", "engine.get_tensor_shape(name) / get_tensor_dtype(name)"),
    ("context.set_binding_shape(i, shape)", "context.set_input_shape(name, shape)"),
    ("context.get_binding_shape(i)", "context.get_tensor_shape(name)"),
    ("engine.get_profile_shape(profile, b)", "engine.get_tensor_profile_shape(name, profile)"),
    ("context.execute_async_v2(bindings, stream)",
     "context.set_tensor_address(name, ptr) for each tensor, then context.execute_async_v3(stream)"),
    ("from cuda import cudart", "from cuda.bindings import runtime as cudart"),
]


def migration_table() -> str:
    """Chapter 2: ``TRT8_TO_TRT10`` as a two-column text table."""
    width = max(len(old) for old, _ in TRT8_TO_TRT10)
    lines = [f"{'TensorRT 8 (original course)':<{width}}  TensorRT 10 / 11"]
    lines += [f"{old:<{width}}  {new}" for old, new in TRT8_TO_TRT10]
    return "\n".join(lines)


def onnx_precision(onnx_path: str | Path) -> str:
    """The types of an ONNX's weights, e.g. ``"float16+float32"``, ``"float32+int8"`` (Q/DQ) (graph only)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    proto = onnx.TensorProto
    types = {proto.FLOAT: "float32", proto.FLOAT16: "float16", proto.BFLOAT16: "bfloat16",
             proto.DataType.Value("INT8"): "int8"}          # by name: `.INT8` reads as TensorRT's removed flag
    kinds = sorted({types[i.data_type] for i in model.graph.initializer if i.data_type in types})
    return "+".join(kinds) or "no float weights"


def _progress_monitor(trt):
    """A trt.IProgressMonitor drawing one tqdm bar per top-level build phase (None if unsupported)."""
    if not hasattr(trt, "IProgressMonitor"):
        return None
    from course_lib.progress import tqdm

    class TqdmMonitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.bars, self.lock = {}, threading.Lock()

        def phase_start(self, phase_name, parent_phase, num_steps):
            if parent_phase is None:
                with self.lock:
                    self.bars[phase_name] = tqdm(total=num_steps, desc=phase_name, leave=False)

        def step_complete(self, phase_name, step):
            with self.lock:
                if phase_name in self.bars:
                    self.bars[phase_name].update(1)
            return True

        def phase_finish(self, phase_name):
            with self.lock:
                bar = self.bars.pop(phase_name, None)
            if bar is not None:
                bar.close()

    return TqdmMonitor()


def built_plans() -> list[dict]:
    """The plans this process has built so far (the test session prints how many)."""
    return list(_BUILT)


def build_engine_plan(onnx_path: str | Path, plan_path: str | Path, profiles: Profile | Sequence[Profile] = (),
                      workspace_gib: float = 10, opt_level: int = 3, timing_cache: str | Path | None = None,
                      fp16_flag: bool = False, strongly_typed: bool = True, log_level: str = "warning",
                      progress: bool = True, tensorrt: str | None = None,
                      compute_capabilities: Sequence[str] | None = None, user_allocation: bool = False) -> PlanSidecar:
    """Chapter 2: build one TensorRT plan from an ONNX file; returns the sidecar written beside it.

    ``profiles``: one ``{input: (min, opt, max)}`` or a list of them (see :mod:`.profiles`); inputs
    that are static in the ONNX may be left out. ``opt_level``: builder_optimization_level 0..5.
    ``timing_cache``: a file loaded if present and saved (merged) after the build (full TensorRT
    only). ``fp16_flag``: the TensorRT 10.x FP16 builder flag, only for ``strongly_typed=False``
    (chapter 3 uses an FP16 ONNX). ``tensorrt``: the flavour (None: ``$COURSE_TENSORRT`` or auto).
    ``compute_capabilities``: TensorRT for RTX's targets, e.g. ``["8.6"]`` (default 8.0, 8.6, 8.9, 12.0).
    ``user_allocation``: TensorRT for RTX's REQUIRE_USER_ALLOCATION flag, which the course's own CUDA-graph
    capture (chapter 3) needs on its plans.
    A flavour asked for what it lacks raises ``FeatureMissing`` (a ValueError), before any work.
    """
    from course_lib.trt.flavour import require_tensorrt
    from course_lib.trt.logger import get_logger

    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"ONNX file {onnx_path} not found: export it first (chapter 1)")
    if not 0 <= opt_level <= 5:
        raise ValueError(f"opt_level {opt_level}: expected 0..5 (builder_optimization_level)")
    profiles = [profiles] if isinstance(profiles, Mapping) else list(profiles)
    trt = require_tensorrt("building TensorRT plans (chapter 2)", tensorrt)
    rtx = is_rtx(trt)
    if timing_cache:
        require_feature(trt, "timing_cache")
    if compute_capabilities:
        require_feature(trt, "compute_capability_targets")
    if user_allocation:
        require_feature(trt, "user_allocation")
    if fp16_flag:
        if strongly_typed:
            raise ValueError("fp16_flag=True with a strongly typed network: export an FP16 ONNX instead "
                             "(chapter 3), or pass strongly_typed=False on TensorRT 10")
        require_feature(trt, "fp16_flag")
    gpu, cc = this_gpu()
    if not rtx and cc is None:
        raise ValueError(f"{label(trt)} builds on the GPU that will run the plan and this machine has none: build "
                         f"without a GPU with TensorRT for RTX (pip install tensorrt-rtx; COURSE_TENSORRT=tensorrt_rtx)")

    logger = get_logger(log_level, trt=trt)
    builder = trt.Builder(logger)
    network, parser = parse_onnx(trt, builder, onnx_path, logger, strongly_typed=strongly_typed)
    parsed = summarize_network(trt, network, onnx_path)
    inputs = {name: tuple(d if d >= 0 else "?" for d in shape) for name, shape in parsed.inputs.items()}
    for profile in profiles:
        check_profile(profile, inputs)

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    config.builder_optimization_level = opt_level
    for profile in profiles:
        if profile:
            trt_profile = builder.create_optimization_profile()
            for name, (mn, opt, mx) in profile.items():
                trt_profile.set_shape(name, mn, opt, mx)
            config.add_optimization_profile(trt_profile)
    if fp16_flag:
        config.set_flag(getattr(trt.BuilderFlag, "FP16"))   # TensorRT 10.x only: require_feature checked it
    if user_allocation:
        config.set_flag(getattr(trt.BuilderFlag, "REQUIRE_USER_ALLOCATION"))   # TensorRT for RTX only
    if rtx:
        targets = [dotted_cc(c) for c in (compute_capabilities or RTX_DEFAULT_CCS)]
        if compute_capabilities:
            config.num_compute_capabilities = len(targets)
            for index, target in enumerate(targets):
                if not config.set_compute_capability(compute_capability_enum(trt, target), index):
                    raise ValueError(f"{label(trt)} refused compute capability {target} as a build target")
        target = ahead_of_time_target(targets) + (f" (built on {gpu})" if gpu else "")
    else:
        targets, target = [dotted_cc(cc)], f"{gpu} (compute capability {dotted_cc(cc)})"
    cache_path = Path(timing_cache) if timing_cache else None
    if cache_path is not None:
        cache_bytes = cache_path.read_bytes() if cache_path.is_file() else b""
        config.set_timing_cache(config.create_timing_cache(cache_bytes), False)
    monitor = _progress_monitor(trt) if progress else None
    if monitor is not None:
        config.progress_monitor = monitor

    print(f"building {plan_path.name} from {onnx_path.name} with {label(trt)} (opt level {opt_level}, "
          f"{'ahead of time' if rtx else 'on ' + str(gpu)}); this can take minutes ...")
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    del parser
    if serialized is None:
        recent = " | ".join(" ".join(m.split()) for m in list(getattr(logger, "errors", []))[-2:])
        raise RuntimeError(f"{label(trt)} could not build {plan_path.name} from {onnx_path}: "
                           f"{recent or 'see the TensorRT log above'}")
    atomic_write_bytes(plan_path, serialized)
    if cache_path is not None:
        _save_timing_cache(config, cache_path)

    sidecar = PlanSidecar(
        plan=plan_path.name, tensorrt=trt.__version__, gpu=gpu or "", compute_capability=",".join(
            normalize_cc(t) for t in targets), profiles=[profile_to_json(p) for p in profiles if p],
        precision="fp16 builder flag" if fp16_flag else f"as in the ONNX ({onnx_precision(onnx_path)})",
        builder_optimization_level=opt_level, workspace_gib=workspace_gib, strongly_typed=parsed.strongly_typed,
        build_seconds=round(seconds, 2), built_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        onnx_path=str(onnx_path), onnx_sha256=sha256_file(onnx_path),
        extra={"layers": parsed.layers, "layer_types": parsed.census, "user_allocation": user_allocation},
        flavour=flavour_of(trt), target=target, compute_capabilities=[normalize_cc(t) for t in targets],
    )
    write_sidecar(plan_path, sidecar)
    size = plan_path.stat().st_size
    _BUILT.append({"plan": str(plan_path), "tensorrt": label(trt), "seconds": round(seconds, 2), "bytes": size})
    print(f"built {plan_path} in {seconds:.0f} s ({size / 2**20:.1f} MiB)")
    return sidecar


def _save_timing_cache(config, cache_path: Path) -> None:
    """Save the config's timing cache, merged with what is on disk now (another build may have added)."""
    cache = config.get_timing_cache()
    if cache_path.is_file():
        on_disk = config.create_timing_cache(cache_path.read_bytes())
        cache.combine(on_disk, True)
    atomic_write_bytes(cache_path, cache.serialize())


def build_plans(onnx_dir: str | Path, out_dir: str | Path, profile: str = "static", opt_level: int = 3,
                timing_cache: str | Path | None = None, batch: int = 1, height: int = 256, width: int = 384,
                max_batch: int = 4, min_size: tuple[int, int] = (256, 256), max_size: tuple[int, int] = (512, 512),
                models: Sequence[str] = MODEL_FILES, **kwargs) -> list[Path]:
    """Chapter 2: build ``<model>.plan`` in ``out_dir`` for each ``<model>.onnx`` of ``onnx_dir``.

    ``profile="static"``: every input fixed at ``batch`` x ``height`` x ``width`` (the course's way);
    ``"dynamic"``: batch 1..``max_batch`` and images from ``min_size`` to ``max_size`` (H, W), tuned
    for ``batch`` x ``height`` x ``width``. Other keyword arguments (``tensorrt``, ``workspace_gib``,
    ``compute_capabilities``, ...) go to :func:`build_engine_plan`.
    This is what ``python -m course_lib build`` runs.
    """
    if profile not in ("static", "dynamic"):
        raise ValueError(f"profile {profile!r}: expected 'static' or 'dynamic'")
    onnx_dir, out_dir = Path(onnx_dir), Path(out_dir)
    found = [m for m in models if (onnx_dir / f"{m}.onnx").is_file()]
    if not found:
        raise FileNotFoundError(f"no {', '.join(f'{m}.onnx' for m in models)} in {onnx_dir}: "
                                f"export them first (python -m course_lib export)")
    plans = []
    for model in found:
        onnx_file = onnx_dir / f"{model}.onnx"
        dims = onnx_input_dims(onnx_file)
        if profile == "static":
            prof = static_profile(shapes_at(dims, batch, height, width), dims)
        else:
            prof = dynamic_profile(dims, (1, *min_size), (batch, height, width), (max_batch, *max_size))
        plan = out_dir / f"{model}.plan"
        build_engine_plan(onnx_file, plan, prof, opt_level=opt_level, timing_cache=timing_cache, **kwargs)
        plans.append(plan)
    return plans
