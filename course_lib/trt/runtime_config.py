"""An engine's runtime config: TensorRT for RTX's runtime cache and CUDA-graph strategy. Chapter 2.

An ``IRuntimeConfig`` (``engine.create_runtime_config()``) says how an execution context is made:
its memory allocation strategy and, on TensorRT for RTX, the runtime cache and the CUDA-graph
strategy. :func:`make_runtime_config` fills one; ``Engine.activate`` makes the context from it.

A TensorRT for RTX plan holds no GPU kernels for any particular GPU: the first inference on a GPU
compiles them (just in time, JIT), which takes seconds for a UNet. The *runtime cache* keeps what was
compiled; saved to a file and loaded the next time, the plan starts without compiling again. The
course keeps it beside the plan (``unet.plan.runtime_cache``), written atomically after an inference
compiled something new. A cache from another GPU or TensorRT for RTX version is refused by TensorRT
(the file is then rewritten after the next inference).

Full TensorRT compiles nothing at load time (its plan holds the kernels it timed on the build GPU),
so there is no runtime cache there: :class:`RuntimeCacheFile` raises ``FeatureMissing`` on it.

Unverified here: this needs an RTX-class GPU (compute capability 8.0/8.6/8.9/12.0) to run; the
course's CI has none. It is written against the installed ``tensorrt_rtx`` module's API.
"""
from __future__ import annotations

import logging
from pathlib import Path

from course_lib.files import atomic_write_bytes
from course_lib.trt.flavour import label, require_feature, whole_graph_strategy

log = logging.getLogger("course_lib.trt")


def runtime_cache_path(plan_path: str | Path) -> Path:
    """``unet.plan`` -> ``unet.plan.runtime_cache``."""
    return Path(str(plan_path) + ".runtime_cache")


class RuntimeCacheFile:
    """Chapter 2: a runtime cache attached to an ``IRuntimeConfig``, loaded from and saved to one file.

    ``RuntimeCacheFile(trt, runtime_config, path)`` creates the cache, loads ``path`` if it exists
    (``loaded`` says whether TensorRT accepted it) and sets it on the config; :meth:`save` writes it.
    """

    def __init__(self, trt, runtime_config, path: str | Path) -> None:
        require_feature(trt, "runtime_cache")
        self.path = Path(path)
        self.cache = runtime_config.create_runtime_cache()
        self.loaded = False
        self.saved_for: tuple | None = None
        if self.path.is_file():
            self.loaded = bool(self.cache.deserialize(self.path.read_bytes()))
            if not self.loaded:
                log.warning("runtime cache %s was made for another GPU or %s version: kernels are "
                            "compiled again and the file is rewritten", self.path.name, label(trt))
        if not runtime_config.set_runtime_cache(self.cache):
            raise RuntimeError(f"{label(trt)} refused the runtime cache for {self.path.name}")

    def save(self) -> Path:
        """Write the cache (every kernel compiled so far) to :attr:`path`, atomically; returns the path."""
        return atomic_write_bytes(self.path, self.cache.serialize())

    def save_once_for(self, shapes: tuple) -> Path | None:
        """:meth:`save` after the first inference with these ``shapes`` (when new kernels were compiled)."""
        if shapes == self.saved_for:
            return None
        self.saved_for = shapes
        return self.save()


def check_capturable(context, stream_handle: int, name: str) -> None:
    """Raise ValueError when ``context`` (TensorRT for RTX) says it cannot be captured on that stream."""
    if hasattr(context, "is_stream_capturable") and not context.is_stream_capturable(stream_handle):
        raise ValueError(f"{name}: this execution context cannot be stream-captured (a TensorRT for RTX plan "
                         f"needs build_engine_plan(..., user_allocation=True)): rebuild it so, or use "
                         f"Engine(..., tensorrt_graphs=True), TensorRT for RTX's own CUDA graphs")


def make_runtime_config(trt, engine, allocation_strategy=None, cache_path: str | Path | None = None,
                        tensorrt_graphs: bool = False):
    """Chapter 2: ``(runtime config, RuntimeCacheFile or None)`` for one execution context of ``engine``.

    ``allocation_strategy``: a ``trt.ExecutionContextAllocationStrategy`` (None: TensorRT's default);
    ``cache_path``: the runtime cache file (TensorRT for RTX; None: no cache); ``tensorrt_graphs``:
    TensorRT for RTX captures and replays CUDA graphs itself (whole-graph strategy).
    """
    config = engine.create_runtime_config()
    if allocation_strategy is not None:
        config.set_execution_context_allocation_strategy(allocation_strategy)
    cache = RuntimeCacheFile(trt, config, cache_path) if cache_path is not None else None
    if tensorrt_graphs:
        config.cuda_graph_strategy = whole_graph_strategy(trt)
    return config, cache
