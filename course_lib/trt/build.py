"""ONNX -> TensorRT plan, with the TensorRT 10/11 builder API. Introduced in chapter 2.

``build_engine_plan`` is the course's ``onnx2trt`` rewritten: parse the ONNX from its file (so the
UNet's external weights are found), set the workspace pool, the builder optimization level and the
optimization profiles, reuse a timing cache, build a *serialized* plan, and write it atomically with
its JSON sidecar (:mod:`course_lib.trt.plan`). ``TRT8_TO_TRT10`` lists what changed since the
original course scripts (TensorRT 8) and is shown in chapter 2's notebook.

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
from course_lib.trt.plan import PlanSidecar, write_sidecar
from course_lib.trt.profiles import (
    Profile, check_profile, dynamic_profile, onnx_input_dims, profile_to_json, shapes_at, static_profile,
)

MODEL_FILES = MODEL_NAMES

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


def parser_error_lines(errors: Sequence[tuple[str, str, str]], onnx_path: str | Path) -> str:
    """One message listing ONNX parser errors, one ``node (op): description`` per line."""
    lines = [f"TensorRT could not parse {onnx_path} ({len(errors)} error(s)):"]
    lines += [f"  node {node or '?'} ({op or '?'}): {desc}" for node, op, desc in errors]
    return "\n".join(lines)


def onnx_precision(onnx_path: str | Path) -> str:
    """The float types of an ONNX's weights, e.g. ``"float16"`` or ``"float16+float32"`` (graph only)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    proto = onnx.TensorProto
    floats = {proto.FLOAT: "float32", proto.FLOAT16: "float16", proto.BFLOAT16: "bfloat16"}
    kinds = sorted({floats[i.data_type] for i in model.graph.initializer if i.data_type in floats})
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


def build_engine_plan(onnx_path: str | Path, plan_path: str | Path, profiles: Profile | Sequence[Profile] = (),
                      workspace_gib: float = 10, opt_level: int = 3, timing_cache: str | Path | None = None,
                      fp16_flag: bool = False, strongly_typed: bool = True, log_level: str = "warning",
                      progress: bool = True) -> PlanSidecar:
    """Chapter 2: build one TensorRT plan from an ONNX file; returns the sidecar written beside it.

    ``profiles``: one ``{input: (min, opt, max)}`` or a list of them (see :mod:`.profiles`); inputs
    that are static in the ONNX may be left out. ``opt_level``: builder_optimization_level 0..5.
    ``timing_cache``: a file loaded if present and saved (merged) after the build. ``fp16_flag``: the
    TensorRT 10.x FP16 builder flag, only for ``strongly_typed=False`` (chapter 3 uses an FP16 ONNX).
    """
    from course_lib.trt import require_tensorrt
    from course_lib.trt.logger import get_logger

    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"ONNX file {onnx_path} not found: export it first (chapter 1)")
    if not 0 <= opt_level <= 5:
        raise ValueError(f"opt_level {opt_level}: expected 0..5 (builder_optimization_level)")
    profiles = [profiles] if isinstance(profiles, Mapping) else list(profiles)
    trt = require_tensorrt("building TensorRT plans (chapter 2)")
    import torch

    logger = get_logger(log_level)
    builder = trt.Builder(logger)
    flags = 0
    strongly_typed = strongly_typed and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
    if strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [parser.get_error(i) for i in range(parser.num_errors)]
        rows = [(e.node_name(), getattr(e, "node_operator", lambda: "")(), e.desc()) for e in errors]
        raise ValueError(parser_error_lines(rows, onnx_path))

    inputs = {}
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        inputs[tensor.name] = tuple(d if d >= 0 else "?" for d in tensor.shape)
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
        if strongly_typed:
            raise ValueError("fp16_flag=True with a strongly typed network: export an FP16 ONNX instead "
                             "(chapter 3), or pass strongly_typed=False on TensorRT 10")
        if not hasattr(trt.BuilderFlag, "FP16"):
            raise ValueError(f"TensorRT {trt.__version__} has no FP16 builder flag: export an FP16 ONNX (chapter 3)")
        config.set_flag(trt.BuilderFlag.FP16)
    cache_path = Path(timing_cache) if timing_cache else None
    cache_bytes = cache_path.read_bytes() if cache_path and cache_path.is_file() else b""
    config.set_timing_cache(config.create_timing_cache(cache_bytes), False)
    monitor = _progress_monitor(trt) if progress else None
    if monitor is not None:
        config.progress_monitor = monitor

    print(f"building {plan_path.name} from {onnx_path.name} (opt level {opt_level}); this can take minutes ...")
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if serialized is None:
        recent = "; ".join(list(getattr(logger, "errors", []))[-3:]) or "see the TensorRT log above"
        raise RuntimeError(f"TensorRT could not build {plan_path.name} from {onnx_path}: {recent}")
    atomic_write_bytes(plan_path, serialized)
    if cache_path is not None:
        _save_timing_cache(config, cache_path)

    device = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(device)
    sidecar = PlanSidecar(
        plan=plan_path.name, tensorrt=trt.__version__, gpu=torch.cuda.get_device_name(device),
        compute_capability=f"{major}{minor}", profiles=[profile_to_json(p) for p in profiles if p],
        precision="fp16 builder flag" if fp16_flag else f"as in the ONNX ({onnx_precision(onnx_path)})",
        builder_optimization_level=opt_level, workspace_gib=workspace_gib, strongly_typed=strongly_typed,
        build_seconds=round(seconds, 2), built_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        onnx_path=str(onnx_path), onnx_sha256=sha256_file(onnx_path),
    )
    write_sidecar(plan_path, sidecar)
    print(f"built {plan_path} in {seconds:.0f} s ({plan_path.stat().st_size / 2**20:.1f} MiB)")
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
    for ``batch`` x ``height`` x ``width``. Other keyword arguments go to :func:`build_engine_plan`.
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
