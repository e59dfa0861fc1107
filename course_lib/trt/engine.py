"""The course's ``Engine``: load a plan, give every tensor a buffer by name, run it. Introduced in chapter 2.

The original course's ``Engine.py`` (TensorRT 8) addressed tensors by *binding index*. TensorRT 10
addresses them by *name*: ``get_tensor_name(i)``, ``get_tensor_mode(name)``, ``set_input_shape(name,
shape)``, ``set_tensor_address(name, ptr)``, then ``execute_async_v3(stream)``. Buffers are torch CUDA
tensors, so the pipeline hands them around without copies.

    engine = Engine("plans/unet.plan").load().activate()
    engine.allocate_buffers()                       # static plan: shapes come from the plan
    out = engine.infer(feed)                        # {name: tensor}; use_cuda_graph=True: §3.4

Both TensorRT flavours (:mod:`.flavour`). ``load()`` checks the plan's sidecar first (flavour,
version, GPU: one line saying which differs), before TensorRT deserializes anything. With TensorRT
for RTX, ``activate()`` goes through the engine's runtime config: the runtime cache of JIT-compiled
kernels is kept beside the plan (:mod:`.runtime_config`), and ``Engine(..., tensorrt_graphs=True)``
lets TensorRT for RTX capture CUDA graphs itself (its CUDA-graph strategy) instead of the course's
capture (``infer(..., use_cuda_graph=True)``). The TensorRT for RTX runtime path is unverified on a
GPU: the course's CI has no RTX-class GPU (see chapter 2).

:func:`check_feed` (pure, tested on CPU) is the check every ``infer`` does first.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from course_lib.cudagraph import CudaGraph
from course_lib.trt.runtime_config import check_capturable

# TensorRT DataType member name -> torch dtype (looked up by name: no TensorRT needed)
TRT_TO_TORCH = {
    "FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT8": torch.int8,
    "INT32": torch.int32, "INT64": torch.int64, "BOOL": torch.bool, "UINT8": torch.uint8,
    "FP8": torch.float8_e4m3fn,
}

Spec = tuple[str, tuple[int, ...], torch.dtype]  # (name, shape, dtype); -1 in a shape matches any size


def torch_dtype(trt_dtype) -> torch.dtype:
    """The torch dtype for a TensorRT ``DataType`` (or its name, e.g. ``"HALF"``)."""
    name = getattr(trt_dtype, "name", str(trt_dtype)).split(".")[-1]
    if name not in TRT_TO_TORCH:
        raise ValueError(f"TensorRT data type {name}: not supported here (expected one of {', '.join(TRT_TO_TORCH)})")
    return TRT_TO_TORCH[name]


def check_feed(feed: Mapping[str, Any], specs: Sequence[Spec]) -> None:
    """Chapter 2: raise ValueError unless ``feed`` has exactly the inputs ``specs`` describe.

    ``feed`` maps names to tensors (anything with ``.shape`` and ``.dtype``); the message names the
    tensor and what was expected. Shapes with -1 accept any size in that dimension.
    """
    expected = {name: (tuple(shape), dtype) for name, shape, dtype in specs}
    for name in feed:
        if name not in expected:
            raise ValueError(f"feed has {name!r}, which is not an input of this engine: its inputs are "
                             f"{', '.join(expected) or 'none'}")
    for name, (shape, dtype) in expected.items():
        if name not in feed:
            raise ValueError(f"feed lacks input {name!r}: expected a {dtype} tensor of shape {shape}")
        tensor = feed[name]
        got_shape, got_dtype = tuple(tensor.shape), tensor.dtype
        shape_ok = len(got_shape) == len(shape) and all(w in (-1, g) for w, g in zip(shape, got_shape))
        if not shape_ok or got_dtype != dtype:
            raise ValueError(f"input {name!r}: expected shape {shape} {dtype}, got {got_shape} {got_dtype}")


def format_io_table(rows: Sequence[tuple[str, str, tuple, Any, str]]) -> str:
    """Chapter 2: rows of (name, mode, shape, dtype, note) as a text table."""
    head = ("tensor", "mode", "shape", "dtype", "")
    cells = [head] + [(n, m, str(tuple(s)), str(d).replace("torch.", ""), note) for n, m, s, d, note in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(4)]
    return "\n".join("  ".join(c[i].ljust(widths[i]) for i in range(4)) + (f"  {c[4]}" if c[4] else "")
                     for c in cells).rstrip()


def shared_device_memory(engines: Sequence["Engine"], device: str = "cuda") -> torch.Tensor:
    """Chapter 3: one scratch block big enough for each loaded engine (pass to ``activate``).

    Engines that never run at the same time (CLIP, ControlNet, UNet, decoder) can share it.
    """
    size = max(e.device_memory_size for e in engines)
    return torch.empty(size, dtype=torch.uint8, device=device)


class Engine:
    """Chapter 2: one TensorRT plan, its execution context and its buffers (torch tensors by name)."""

    def __init__(self, plan_path: str | Path, check_sidecar: bool = True, strict_gpu: bool = False,
                 tensorrt: str | None = None, runtime_cache: bool | str | Path | None = None,
                 tensorrt_graphs: bool = False) -> None:
        """``tensorrt``: the flavour (None: ``$COURSE_TENSORRT`` or auto). ``runtime_cache``: None uses
        TensorRT for RTX's runtime cache beside the plan where the flavour has one; True insists on it,
        a path puts it there, False turns it off. ``tensorrt_graphs``: TensorRT for RTX's own CUDA-graph
        strategy (whole-graph capture). Both raise ``FeatureMissing`` on full TensorRT when asked for."""
        self.plan_path = Path(plan_path)
        self.check_sidecar = check_sidecar
        self.strict_gpu = strict_gpu
        self.tensorrt = tensorrt
        self.runtime_cache = runtime_cache
        self.tensorrt_graphs = tensorrt_graphs
        self.trt = self.engine = self.context = None
        self.cache_file = None            # RuntimeCacheFile (TensorRT for RTX)
        self._runtime_config = None       # kept alive as long as the context
        self.tensors: dict[str, torch.Tensor] = {}
        self.graph = CudaGraph(self._execute, self.plan_path.name, copy_inputs=False)
        self.last_action: str | None = None        # "eager", or the graph's "warm-up" / "capture" / "replay"
        self._shared_memory: torch.Tensor | None = None

    def load(self) -> "Engine":
        """Check the plan's sidecar against this process and GPU, then deserialize the plan."""
        from course_lib.trt.flavour import engine_validity, flavour_of, label, require_tensorrt
        from course_lib.trt.logger import get_logger
        from course_lib.trt.plan import check_sidecar, read_sidecar, rebuild_command, this_gpu

        if not self.plan_path.is_file():
            raise FileNotFoundError(f"plan {self.plan_path} not found: build it with python -m course_lib build")
        trt = require_tensorrt("running TensorRT plans (chapter 2)", self.tensorrt)
        gpu, cc = this_gpu()
        sidecar = read_sidecar(self.plan_path) if self.check_sidecar else None
        if sidecar is not None:
            check_sidecar(sidecar, trt.__version__, gpu, cc, flavour=flavour_of(trt), plan_path=self.plan_path,
                          strict_gpu=self.strict_gpu)
        elif cc is None:
            raise RuntimeError(f"plan {self.plan_path.name} needs a CUDA GPU to run and this machine has none")
        if self.tensorrt_graphs:
            from course_lib.trt.flavour import require_feature

            require_feature(trt, "cuda_graph_strategy")
        logger = get_logger(trt=trt)
        self.trt = trt
        self.runtime = trt.Runtime(logger)
        plan_bytes = self.plan_path.read_bytes()
        invalid = engine_validity(trt, self.runtime, plan_bytes)      # TensorRT for RTX: the plan's header
        if invalid is not None:
            fix = f": rebuild it with {rebuild_command(sidecar, self.plan_path)}" if sidecar is not None else ""
            raise ValueError(f"plan {self.plan_path.name}: {label(trt)} says it is {invalid}{fix}")
        self.engine = self.runtime.deserialize_cuda_engine(plan_bytes)
        if self.engine is None:
            errors = " | ".join(" ".join(m.split()) for m in list(logger.errors)[-2:]) or "see the TensorRT log"
            raise RuntimeError(f"{label(trt)} could not deserialize {self.plan_path}: {errors}")
        return self

    @property
    def device_memory_size(self) -> int:
        """Bytes of scratch memory the engine needs (``device_memory_size_v2``)."""
        self._need("engine")
        return int(self.engine.device_memory_size_v2)

    def activate(self, shared_device_memory: torch.Tensor | None = None) -> "Engine":
        """Create the execution context; with ``shared_device_memory`` (a CUDA tensor) it uses that block.

        TensorRT 10 replaced ``create_execution_context_without_device_memory`` with the
        USER_MANAGED allocation strategy plus ``set_device_memory(ptr, size)``. Where the engine has
        a runtime config (TensorRT for RTX, recent TensorRT 10), the context is made from one: it
        carries the allocation strategy, the runtime cache and the CUDA-graph strategy.
        """
        from course_lib.trt.flavour import has_feature, require_feature
        from course_lib.trt.runtime_config import make_runtime_config, runtime_cache_path

        if self.engine is None:
            self.load()
        trt, shared = self.trt, shared_device_memory
        cache = None if self.runtime_cache is False or (self.runtime_cache is None and not has_feature(
            trt, "runtime_cache")) else self.runtime_cache
        if cache is not None:
            require_feature(trt, "runtime_cache")
            cache = runtime_cache_path(self.plan_path) if cache is True or cache is None else cache
        strategy = None if shared is None else trt.ExecutionContextAllocationStrategy.USER_MANAGED
        nbytes = 0 if shared is None else shared.numel() * shared.element_size()
        if shared is not None and (not shared.is_cuda or nbytes < self.device_memory_size):
            raise ValueError(f"shared device memory: expected a CUDA tensor of at least {self.device_memory_size} "
                             f"bytes for {self.plan_path.name}, got {nbytes} bytes on {shared.device}")
        if hasattr(self.engine, "create_runtime_config"):
            self._runtime_config, self.cache_file = make_runtime_config(trt, self.engine, strategy, cache,
                                                                        self.tensorrt_graphs)
            self.context = self.engine.create_execution_context(self._runtime_config)
        else:
            self.context = self.engine.create_execution_context(*([strategy] if strategy is not None else []))
        if self.context is None:
            raise RuntimeError(f"TensorRT could not create an execution context for {self.plan_path.name}")
        if shared_device_memory is not None:
            if hasattr(self.context, "set_device_memory"):
                self.context.set_device_memory(shared_device_memory.data_ptr(), nbytes)
            else:
                self.context.device_memory = shared_device_memory.data_ptr()
            self._shared_memory = shared_device_memory  # keep it alive as long as the context
        self.graph.reset()                          # graphs recorded the old context's launches
        return self

    def save_runtime_cache(self) -> Path | None:
        """TensorRT for RTX: write the runtime cache beside the plan now (``infer`` does it after compiling)."""
        return self.cache_file.save() if self.cache_file is not None else None

    def _need(self, what: str) -> None:
        if getattr(self, what) is None:
            step = "load()" if what == "engine" else "activate()"
            raise ValueError(f"{self.plan_path.name}: call {step} first")

    def _names(self, mode_name: str) -> list[str]:
        self._need("engine")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        return [n for n in names if self.engine.get_tensor_mode(n).name == mode_name]

    @property
    def input_names(self) -> list[str]:
        return self._names("INPUT")

    @property
    def output_names(self) -> list[str]:
        return self._names("OUTPUT")

    def allocate_buffers(self, shapes: Mapping[str, Sequence[int]] | None = None,
                         device: str = "cuda") -> dict[str, torch.Tensor]:
        """Set the input shapes and make one torch tensor per input and output, by tensor name.

        ``shapes`` gives input shapes; inputs left out take the plan's shape (a dynamic input: its
        profile's opt shape). Output shapes follow from the inputs. Returns (and keeps) ``{name: tensor}``.
        """
        if self.context is None:
            self.activate()
        shapes = dict(shapes or {})
        inputs = self.input_names
        unknown = [n for n in shapes if n not in inputs]
        if unknown:
            raise ValueError(f"shapes name {unknown[0]!r}, which is not an input of {self.plan_path.name}: "
                             f"its inputs are {', '.join(inputs)}")
        for name in inputs:
            shape = tuple(shapes.get(name, tuple(self.engine.get_tensor_shape(name))))
            if name not in shapes and any(d < 0 for d in shape):
                shape = tuple(self.engine.get_tensor_profile_shape(name, 0)[1])  # the profile's opt shape
            if not self.context.set_input_shape(name, shape):
                for old_name, old in self.tensors.items():  # leave the context as the buffers are
                    if old_name in inputs:
                        self.context.set_input_shape(old_name, tuple(old.shape))
                plan_shape = tuple(self.engine.get_tensor_shape(name))
                if all(d >= 0 for d in plan_shape):
                    raise ValueError(f"input {name!r}: shape {shape}, but the plan is static at {plan_shape}")
                lo, _, hi = (tuple(s) for s in self.engine.get_tensor_profile_shape(name, 0))
                raise ValueError(f"input {name!r}: shape {shape} is outside the plan's profile {lo} .. {hi}")
        tensors = {}
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            shape = tuple(self.context.get_tensor_shape(name))
            tensors[name] = torch.empty(shape, dtype=torch_dtype(self.engine.get_tensor_dtype(name)), device=device)
        self.tensors = tensors
        self.graph.reset()
        return tensors

    def info(self) -> str:
        """Chapter 2: a table of the plan's tensors (name, mode, shape, dtype, profile range)."""
        self._need("engine")
        rows = []
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            mode = self.engine.get_tensor_mode(name).name.lower()
            buffer = self.tensors.get(name)
            shape = tuple(buffer.shape) if buffer is not None else tuple(self.engine.get_tensor_shape(name))
            note = ""
            if mode == "input" and any(d < 0 for d in self.engine.get_tensor_shape(name)):
                lo, _, hi = (tuple(s) for s in self.engine.get_tensor_profile_shape(name, 0))
                note = f"profile {lo} .. {hi}"
            rows.append((name, mode, shape, torch_dtype(self.engine.get_tensor_dtype(name)), note))
        return format_io_table(rows)

    def infer(self, feed: Mapping[str, torch.Tensor], stream=None,
              use_cuda_graph: bool = False) -> dict[str, torch.Tensor]:
        """Run the plan once on ``feed`` (``{input name: tensor}``); returns ``{output name: tensor}``.

        Buffers are allocated on the first call (a dynamic plan: from the feed's shapes, and again
        when they change; a static plan raises ValueError for other shapes). The returned tensors are the
        engine's own output buffers, overwritten by the next call (``.clone()`` what you keep), and
        ready on ``stream`` (a ``torch.cuda.Stream``, a raw handle, or None for the current stream).
        ``use_cuda_graph=True`` (chapter 2 §3.4): warm up, capture, replay, keyed by the buffers' shapes
        and addresses (:class:`course_lib.cudagraph.CudaGraph`); ``last_action`` says which happened. An
        Engine made with ``tensorrt_graphs=True`` leaves that to TensorRT for RTX (one capture at a time).
        """
        if use_cuda_graph and self.tensorrt_graphs:
            raise ValueError(f"{self.plan_path.name}: use_cuda_graph=True with tensorrt_graphs=True: TensorRT for RTX "
                             f"already captures CUDA graphs itself; choose one")
        if self.context is None:
            self.activate()
        inputs = self.input_names
        dynamic = any(d < 0 for n in inputs for d in self.engine.get_tensor_shape(n))
        if not self.tensors or (dynamic and any(tuple(feed[n].shape) != tuple(self.tensors[n].shape)
                                                for n in inputs if n in feed)):
            # first call, or new shapes for a dynamic plan: (re)allocate from the feed's shapes
            check_feed(feed, [(n, (-1,) * len(self.engine.get_tensor_shape(n)),
                               torch_dtype(self.engine.get_tensor_dtype(n))) for n in inputs])
            self.allocate_buffers({n: tuple(feed[n].shape) for n in inputs} if dynamic else None)
        try:
            check_feed(feed, [(n, tuple(self.tensors[n].shape), self.tensors[n].dtype) for n in inputs])
        except ValueError as e:
            raise ValueError(f"{self.plan_path.name}: {e}") from None
        stream = _as_torch_stream(stream)
        if stream != torch.cuda.current_stream():
            stream.wait_stream(torch.cuda.current_stream())
        for name, tensor in self.tensors.items():
            self.context.set_tensor_address(name, tensor.data_ptr())
        if use_cuda_graph:
            check_capturable(self.context, stream.cuda_stream, self.plan_path.name)
        with torch.cuda.stream(stream):
            for name in inputs:
                self.tensors[name].copy_(feed[name], non_blocking=True)
            if use_cuda_graph:
                self.graph(*self.tensors.values())            # the buffers: their addresses are the key
                self.last_action = self.graph.last_action
            else:
                self._execute()
                self.last_action = "eager"
        if self.cache_file is not None:                       # new shapes: new JIT kernels to keep
            self.cache_file.save_once_for(tuple((n, tuple(t.shape)) for n, t in self.tensors.items()))
        return {name: self.tensors[name] for name in self.output_names}

    def _execute(self, *buffers: torch.Tensor) -> None:
        """Launch the plan on torch's current stream (``buffers``: only the graph's key; they are bound)."""
        if not self.context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise RuntimeError(f"TensorRT inference of {self.plan_path.name} failed (execute_async_v3 returned False)")


def _as_torch_stream(stream) -> torch.cuda.Stream:
    if stream is None:
        return torch.cuda.current_stream()
    if isinstance(stream, int):
        return torch.cuda.ExternalStream(stream)
    return stream
