"""One interface for running a sub-model, whatever runs it: PyTorch, ONNX Runtime or TensorRT.

Introduced in chapter 2 (chapter 1's torch pipeline already goes through :class:`TorchBackend`). A
backend is anything with

* ``name`` -- which sub-model it runs ("clip", "controlnet", "unet", "decoder", ...);
* ``input_names`` / ``output_names`` -- the tensor names of the course's contract, in order;
* ``infer(feed) -> outputs`` -- a dict of torch tensors in, a dict of torch tensors out, by name.

The pipeline only ever calls ``infer``, so swapping PyTorch for ONNX Runtime or a TensorRT plan is
one line, and comparing them (chapter 2) is a loop over backends with the same feed.

Conventions shared by all three (so the pipeline's DDIM arithmetic is always float32):

* a feed with a missing or unknown name raises ``ValueError`` naming it and the expected names;
* outputs come back on the device of the feed's first tensor; floating outputs come back float32.
"""
from __future__ import annotations

import os
from typing import Mapping, Protocol, Sequence, runtime_checkable

import numpy as np
import torch

from .env import MissingDependency, require


@runtime_checkable
class Backend(Protocol):
    """Chapter 2: what the pipeline needs from a model runner."""
    name: str
    input_names: list[str]
    output_names: list[str]

    def infer(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        ...


def check_feed(backend_name: str, feed: Mapping[str, torch.Tensor], input_names: Sequence[str]) -> None:
    """Chapter 2: raise ``ValueError`` unless ``feed`` has exactly the tensors ``input_names`` asks for."""
    missing = [n for n in input_names if n not in feed]
    unknown = [n for n in feed if n not in input_names]
    if missing or unknown:
        what = "; ".join(part for part in (f"missing {missing}" if missing else "",
                                            f"unknown {unknown}" if unknown else "") if part)
        raise ValueError(f"{backend_name}: feed {what}; expected inputs {list(input_names)}")


def _feed_device(feed: Mapping[str, torch.Tensor]) -> torch.device:
    first = next(iter(feed.values()))
    return first.device if isinstance(first, torch.Tensor) else torch.device("cpu")


def _as_float32(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.is_floating_point() else t


class TorchBackend:
    """Chapter 1: run a PyTorch module through the backend interface.

    Args:
        module: a positional module, e.g. ``CNSD.positional("unet")``: its forward takes the contract's
            inputs in order and returns a tuple (or one tensor) in the contract's output order.
        contract: the :class:`~course_lib.cnsd.contract.ModelContract` (names and integer dtypes).
        name: defaults to ``contract.name``.

    The module runs under ``torch.inference_mode`` on its own device and dtype: floating inputs are cast
    to the module's dtype (an fp16 module gets fp16 inputs), integer inputs to the contract's dtype
    (int32), and outputs are returned float32 on the feed's device. Outputs are inference tensors:
    use them out of place (``y = y + 1``, not ``y += 1``) outside inference mode.
    """

    def __init__(self, module: torch.nn.Module, contract, name: str | None = None):
        self.module = module.eval()
        self.contract = contract
        self.name = name or contract.name
        self.input_names = list(contract.input_names)
        self.output_names = list(contract.output_names)
        self._dtypes = {spec.name: spec.dtype for spec in contract.inputs}
        param = next((p for p in module.parameters() if p.is_floating_point()), None)
        self.device = param.device if param is not None else torch.device("cpu")
        self.dtype = param.dtype if param is not None else torch.float32

    def _cast(self, name: str, t: torch.Tensor) -> torch.Tensor:
        dtype = self.dtype if t.is_floating_point() else self._dtypes[name]
        return t.to(device=self.device, dtype=dtype)

    def infer(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Chapter 1: run the module on a feed by name; returns ``{output name: float32 tensor}``."""
        check_feed(self.name, feed, self.input_names)
        device = _feed_device(feed)
        with torch.inference_mode():
            outs = self.module(*(self._cast(n, feed[n]) for n in self.input_names))
        outs = outs if isinstance(outs, (tuple, list)) else (outs,)
        if len(outs) != len(self.output_names):
            raise ValueError(f"{self.name}: the module returned {len(outs)} outputs, "
                             f"the contract names {len(self.output_names)}: {self.output_names}")
        return {n: _as_float32(o).to(device) for n, o in zip(self.output_names, outs)}

    def __repr__(self) -> str:
        return f"TorchBackend({self.name!r}, {self.device}, {str(self.dtype).replace('torch.', '')})"


# ONNX element types the course's models use -> numpy
_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int32)": np.int32,
              "tensor(int64)": np.int64, "tensor(bool)": np.bool_, "tensor(double)": np.float64}

# ONNX Runtime providers picked by default, best first. TensorRT's EP is left to an explicit
# ``providers=[...]``: it builds its own engine when the session starts (minutes for the UNet), and
# chapter 2 builds the course's engines itself.
DEFAULT_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")


def default_providers() -> list[str]:
    """Chapter 2: the ONNX Runtime providers :class:`OrtBackend` uses when none are given."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in DEFAULT_PROVIDERS if p in available] or ["CPUExecutionProvider"]


class OrtBackend:
    """Chapter 2: run an ONNX file with ONNX Runtime through the backend interface.

    Args:
        onnx_path: the .onnx file (external data next to it is found by ONNX Runtime).
        providers: ONNX Runtime execution providers; default :func:`default_providers` (CUDA when
            onnxruntime-gpu sees a GPU, else CPU). Pass ``["TensorrtExecutionProvider", ...]`` to try ORT's
            TensorRT EP.
        name: defaults to the file name without ``.onnx``.
        session_options: an ``onnxruntime.SessionOptions`` (default: warnings and errors only).

    Feeds go through host memory: each torch tensor becomes a numpy array of the dtype the graph
    declares (int32 timestep and input_ids stay int32, an fp16 graph gets fp16); outputs come back as
    float32 torch tensors on the feed's device. Simple and exact, not the fastest path on a GPU.
    """

    def __init__(self, onnx_path: str | os.PathLike, providers: Sequence[str] | None = None,
                 name: str | None = None, session_options=None):
        import onnxruntime as ort

        path = os.fspath(onnx_path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"ONNX file not found: {path}")
        if session_options is None:
            session_options = ort.SessionOptions()
            session_options.log_severity_level = 3
        self.providers = list(providers) if providers is not None else default_providers()
        self.session = ort.InferenceSession(path, sess_options=session_options, providers=self.providers)
        self.path = path
        self.name = name or os.path.basename(path).removesuffix(".onnx")
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._np_types = {}
        for i in self.session.get_inputs():
            if i.type not in _ORT_TYPES:
                raise ValueError(f"{self.name}: input {i.name!r} has type {i.type}, expected one of {list(_ORT_TYPES)}")
            self._np_types[i.name] = _ORT_TYPES[i.type]

    def infer(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Chapter 2: run the session on a feed by name; returns ``{output name: float32 tensor}``."""
        check_feed(self.name, feed, self.input_names)
        device = _feed_device(feed)
        np_feed = {n: feed[n].detach().cpu().numpy().astype(self._np_types[n], copy=False)
                   for n in self.input_names}
        outs = self.session.run(self.output_names, np_feed)
        return {n: _as_float32(torch.from_numpy(np.asarray(o))).to(device)
                for n, o in zip(self.output_names, outs)}

    def __repr__(self) -> str:
        return f"OrtBackend({self.name!r}, {self.path!r}, providers={self.providers})"


class TrtBackend:
    """Chapter 2: run a TensorRT plan (``course_lib.trt.engine.Engine``) through the backend interface.

    Args:
        plan_path: the serialized engine (.plan) built in chapter 2.
        use_cuda_graph: replay a captured CUDA graph after the first call (chapter 3).
        stream: a ``torch.cuda.Stream`` (or raw handle) to run on; default: torch's current stream.
        name: defaults to the file name without ``.plan``.
        copy_outputs: the Engine reuses its output buffers on every call, so by default the outputs are
            cloned; without the copy, the cond ``eps`` of a "separate" CFG step would be overwritten by
            the uncond call. Switch it off only where each output is consumed before the next call.

    Needs tensorrt and a CUDA GPU: without tensorrt it raises ``MissingDependency`` (one sentence).
    Feed tensors are moved to the GPU in the plan's input dtypes (int32 timestep, fp16 for an fp16
    plan); outputs stay there, float32.
    """

    def __init__(self, plan_path: str | os.PathLike, use_cuda_graph: bool = False, stream=None,
                 name: str | None = None, copy_outputs: bool = True):
        require("tensorrt", "running TensorRT plans (TrtBackend)")
        from .trt.engine import Engine  # the only place tensorrt is imported from

        path = os.fspath(plan_path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"TensorRT plan not found: {path}")
        self.path = path
        self.name = name or os.path.basename(path).removesuffix(".plan")
        self.use_cuda_graph = use_cuda_graph
        self.stream = stream
        self.copy_outputs = copy_outputs
        self.engine = Engine(path)
        self.engine.load()
        self.engine.activate()
        buffers = self.engine.allocate_buffers()
        self.input_names = list(self.engine.input_names)
        self.output_names = list(self.engine.output_names)
        self._dtypes = {n: buffers[n].dtype for n in self.input_names}   # fp16 plans take fp16 inputs

    def infer(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Chapter 2: run the plan on a feed by name; returns ``{output name: float32 CUDA tensor}``."""
        check_feed(self.name, feed, self.input_names)
        cuda_feed = {n: feed[n].to("cuda", self._dtypes[n], non_blocking=True) for n in self.input_names}
        outs = self.engine.infer(cuda_feed, stream=self.stream, use_cuda_graph=self.use_cuda_graph)
        if self.stream is not None:                                  # outputs are ready on self.stream
            stream = torch.cuda.ExternalStream(self.stream) if isinstance(self.stream, int) else self.stream
            torch.cuda.current_stream().wait_stream(stream)
        result = {}
        for n in self.output_names:
            out = _as_float32(outs[n])
            result[n] = out.clone() if self.copy_outputs and out is outs[n] else out
        return result

    def __repr__(self) -> str:
        return f"TrtBackend({self.name!r}, {self.path!r}, cuda_graph={self.use_cuda_graph})"


__all__ = ["Backend", "check_feed", "TorchBackend", "OrtBackend", "TrtBackend", "default_providers",
           "MissingDependency"]
