"""TensorRT for RTX's runtime cache: the GPU kernels it compiled just in time, kept in a file. Chapter 2.

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

from .flavour import label, require_feature
from .plan import atomic_write_bytes

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
