"""One interface for running a sub-model, whatever runs it: PyTorch, ONNX Runtime or TensorRT.

Introduced in chapter 2 (chapter 1's torch pipeline already goes through :class:`TorchBackend`). A
backend is anything with

* ``name`` -- which sub-model it runs ("clip", "controlnet", "unet", "decoder", ...);
* ``input_names`` / ``output_names`` -- the tensor names of the course's contract, in order;
* ``infer(feed) -> outputs`` -- a dict of torch tensors in, a dict of torch tensors out, by name.

The pipeline only ever calls ``infer``, so swapping PyTorch for ONNX Runtime or a TensorRT plan is
one line, and comparing them (chapter 2) is a loop over backends with the same feed.
:func:`make_backends` gives the four sub-models' backends of one kind (what the CLI's ``run`` uses).

Conventions shared by all three (so the pipeline's DDIM arithmetic is always float32):

* a feed with a missing or unknown name raises ``ValueError`` naming it and the expected names;
* outputs come back on the device of the feed's first tensor; floating outputs come back float32.
"""
from __future__ import annotations

import os
from typing import Mapping, Protocol, Sequence, runtime_checkable

import numpy as np
import torch

from course_lib.cudagraph import CudaGraph
from course_lib.env import MissingDependency
from course_lib.onnx.session import ORT_TYPES, default_providers, ort_session, run_session


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


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    return t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()


def _as_float32(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.is_floating_point() else t


def stores_channels_last(module: torch.nn.Module) -> bool:
    """Chapter 3: whether ``module``'s k x k convolution weights (k > 1) are stored channels-last (NHWC)."""
    return any(p.dim() == 4 and p.shape[-1] > 1 and not p.is_contiguous()
               and p.is_contiguous(memory_format=torch.channels_last) for p in module.parameters())


class TorchBackend:
    """Chapter 1: run a PyTorch module through the backend interface.

    Args:
        module: a positional module, e.g. ``CNSD.positional("unet")``: its forward takes the contract's
            inputs in order and returns a tuple (or one tensor) in the contract's output order.
        contract: the :class:`~course_lib.cnsd.contract.ModelContract` (names and integer dtypes).
        name: defaults to ``contract.name``.

    The module runs under ``torch.inference_mode`` on its own device and dtype: floating inputs are cast
    to the module's dtype (an fp16 module gets fp16 inputs), integer inputs to the contract's dtype
    (int32), and outputs are returned float32 on the feed's device. A module whose convolutions are
    stored channels-last (chapter 3's "cl") gets its 4-D floating inputs channels-last too. Outputs are
    inference tensors: use them out of place (``y = y + 1``, not ``y += 1``) outside inference mode.
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
        self.channels_last = stores_channels_last(module)

    def _cast(self, name: str, t: torch.Tensor) -> torch.Tensor:
        dtype = self.dtype if t.is_floating_point() else self._dtypes[name]
        t = t.to(device=self.device, dtype=dtype)
        if self.channels_last and t.dim() == 4 and t.is_floating_point():
            t = t.contiguous(memory_format=torch.channels_last)
        return t

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


class OrtBackend:
    """Chapter 2: run an ONNX file with ONNX Runtime through the backend interface.

    Args:
        onnx_path: the .onnx file (external data next to it is found by ONNX Runtime).
        providers: ONNX Runtime execution providers; default :func:`default_providers` (CUDA when
            onnxruntime-gpu sees a GPU, else CPU). Pass ``["TensorrtExecutionProvider", ...]`` to try ORT's
            TensorRT EP. A provider this onnxruntime lacks is a ValueError.
        name: defaults to the file name without ``.onnx``.

    The session comes from :func:`course_lib.onnx.session.ort_session` (chapter 1), so the parity checks and
    the pipeline run the same way. Feeds go through host memory: each torch tensor becomes a numpy array
    of the dtype the graph declares (an int64 timestep becomes the graph's int32, an fp16 graph gets
    fp16); a shape that the graph fixes otherwise is a ValueError naming the input. A cast that would
    change a value's meaning is refused the same way, naming the input and the dtype expected: float
    token ids (an integer input fed floats), integers beyond the input's range, complex numbers, floats
    for a bool. Each value must be a torch tensor (a numpy array is refused). Outputs come back as
    float32 torch tensors on the feed's device. Simple and exact, not the fastest path on a GPU.
    """

    def __init__(self, onnx_path: str | os.PathLike, providers: Sequence[str] | None = None,
                 name: str | None = None):
        path = os.fspath(onnx_path)
        self.providers = list(providers) if providers is not None else default_providers()
        self.session = ort_session(path, self.providers)   # FileNotFoundError / ValueError, one line
        self.path = path
        self.name = name or os.path.basename(path).removesuffix(".onnx")
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._np_types, self._shapes = {}, {}
        for i in self.session.get_inputs():
            if i.type not in ORT_TYPES:
                raise ValueError(f"{self.name}: input {i.name!r} has type {i.type}, expected one of {list(ORT_TYPES)}")
            self._np_types[i.name] = ORT_TYPES[i.type]
            self._shapes[i.name] = tuple(d if isinstance(d, int) else None for d in i.shape)  # None: dynamic

    def _check_shape(self, name: str, shape: tuple[int, ...]) -> None:
        want = self._shapes[name]
        if len(shape) != len(want) or any(w is not None and w != g for w, g in zip(want, shape)):
            shown = tuple("?" if w is None else w for w in want)
            raise ValueError(f"{self.name}: input {name!r} has shape {shape}, the ONNX file expects {shown} "
                             f"(export it at this size, or with dynamic axes)")

    def _check_dtype(self, name: str, t) -> None:
        want = np.dtype(self._np_types[name])
        shown = f"{self.name}: input {name!r}"
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{shown} is a {type(t).__name__}, expected a torch.Tensor of {want.name}")
        if t.is_complex():
            raise ValueError(f"{shown} is {str(t.dtype).removeprefix('torch.')}, the ONNX file expects {want.name} "
                             "(complex numbers are not cast)")
        if want.kind == "f":
            ok = t.is_floating_point()                   # float32 -> float16 for an fp16 graph is fine
        elif want.kind == "b":
            ok = t.dtype == torch.bool
        else:                                            # integer inputs: token ids, timesteps
            ok = not t.is_floating_point() and t.dtype != torch.bool
            if ok and t.numel():
                info = np.iinfo(want)
                low, high = int(t.min()), int(t.max())
                if low < info.min or high > info.max:
                    raise ValueError(f"{shown} holds values from {low} to {high}, beyond the {want.name} the ONNX "
                                     f"file expects ({info.min}..{info.max})")
        if not ok:
            raise ValueError(f"{shown} is {str(t.dtype).removeprefix('torch.')}, the ONNX file expects {want.name}"
                             + (" (token ids and timesteps are integers)" if want.kind in "iu" else ""))

    def infer(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Chapter 2: run the session on a feed by name; returns ``{output name: float32 tensor}``."""
        check_feed(self.name, feed, self.input_names)
        for n in self.input_names:
            self._check_dtype(n, feed[n])
            self._check_shape(n, tuple(feed[n].shape))
        device = _feed_device(feed)
        np_feed = {n: _to_numpy(feed[n]).astype(self._np_types[n], copy=False) for n in self.input_names}
        outs = run_session(self.session, self.output_names, np_feed, self.path)
        return {n: _as_float32(torch.from_numpy(np.asarray(o))).to(device)
                for n, o in zip(self.output_names, outs)}

    def __repr__(self) -> str:
        return f"OrtBackend({self.name!r}, {self.path!r}, providers={self.providers})"


class TrtBackend:
    """Chapter 2: run a TensorRT plan (``course_lib.trt.engine.Engine``) through the backend interface.

    Args:
        plan_path: the serialized engine (.plan) built in chapter 2.
        use_cuda_graph: warm up, capture a CUDA graph, then replay it (chapter 2 §3.4).
        stream: a ``torch.cuda.Stream`` (or raw handle) to run on; default: torch's current stream.
        name: defaults to the file name without ``.plan``.
        copy_outputs: the Engine reuses its output buffers on every call, so by default the outputs are
            cloned; without the copy, the cond ``eps`` of a "separate" CFG step would be overwritten by
            the uncond call. Switch it off only where each output is consumed before the next call.

    Needs TensorRT (``tensorrt``, or ``tensorrt_rtx`` on a GPU it targets) and a CUDA GPU: without either
    flavour it raises ``MissingDependency`` (one sentence).
    Feed tensors are moved to the GPU in the plan's input dtypes (int32 timestep, fp16 for an fp16
    plan); outputs stay there, float32.
    """

    def __init__(self, plan_path: str | os.PathLike, use_cuda_graph: bool = False, stream=None,
                 name: str | None = None, copy_outputs: bool = True):
        from course_lib.trt.engine import Engine  # course_lib.trt: the only place TensorRT is imported from
        from course_lib.trt.flavour import require_tensorrt

        require_tensorrt("running TensorRT plans (TrtBackend)")   # tensorrt or tensorrt_rtx (COURSE_TENSORRT)

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


class GraphedBackend:
    """Chapter 3: another backend's ``infer`` replayed from CUDA graphs, one per input shapes.

    For torch backends (TensorRT has ``use_cuda_graph``; ONNX Runtime can't be captured). Outputs are
    copies of the graph's buffers, so they may be kept (e.g. in the text cache).
    """

    def __init__(self, backend: Backend, warmup: int = 1):
        self.backend = backend
        self.name, self.input_names, self.output_names = backend.name, backend.input_names, backend.output_names
        self.graph = CudaGraph(self._infer, f"{backend.name} graph", warmup=warmup)

    def _infer(self, *inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.backend.infer(dict(zip(self.input_names, inputs)))

    def infer(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        check_feed(self.name, feed, self.input_names)
        outs = self.graph(*(feed[n] for n in self.input_names))
        return {n: t.clone() for n, t in outs.items()}

    def __repr__(self) -> str:
        return f"GraphedBackend({self.backend!r})"


BACKEND_KINDS = ("torch", "ort", "trt")


def make_backends(kind: str, model=None, onnx_dir: str | os.PathLike | None = None,
                  plan_dir: str | os.PathLike | None = None, use_cuda_graph: bool = False) -> dict[str, Backend]:
    """Chapter 2: one backend per CNSD sub-model, all of one kind -- what ``Canny2Image`` takes.

    Args:
        kind: ``"torch"`` (the modules of ``model``, a ``CNSD`` from ``build_cnsd``, on its device),
            ``"ort"`` (``onnx_dir/<name>.onnx``, written by ``python -m course_lib export``) or
            ``"trt"`` (``plan_dir/<name>.plan``, written by ``python -m course_lib build``).
        model: the ``CNSD`` for ``kind="torch"``.
        onnx_dir, plan_dir: the folder for ``"ort"`` / ``"trt"``.
        use_cuda_graph: ``"trt"`` only: replay CUDA graphs (see :class:`TrtBackend`).

    Returns ``{"clip": ..., "controlnet": ..., "unet": ..., "decoder": ...}``. Mix kinds by merging
    dicts, e.g. ``{**make_backends("ort", onnx_dir=d), "clip": make_backends("torch", model)["clip"]}``.
    A missing argument, folder or file raises ValueError / FileNotFoundError naming it.
    """
    from course_lib.cnsd.contract import MODEL_NAMES, contracts   # cnsd's pipeline imports this module

    if kind not in BACKEND_KINDS:
        raise ValueError(f"backend {kind!r}: expected one of {', '.join(BACKEND_KINDS)}")
    if kind == "torch":
        if model is None:
            raise ValueError("backend 'torch' needs the CNSD model (build_cnsd or load_checkpoint)")
        table = contracts(model.config)
        return {n: TorchBackend(model.positional(n), table[n]) for n in MODEL_NAMES}
    folder, option, command = (onnx_dir, "onnx-dir", "export") if kind == "ort" else (plan_dir, "plan-dir", "build")
    if folder is None or os.fspath(folder) == "":
        raise ValueError(f"backend {kind!r} needs --{option} DIR ({option.replace('-', '_')}= in Python): the "
                         f"folder that python -m course_lib {command} writes")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--{option} {os.fspath(folder)}: no such folder (make it with python -m course_lib {command})")
    if kind == "ort":
        return {n: OrtBackend(os.path.join(folder, f"{n}.onnx")) for n in MODEL_NAMES}
    return {n: TrtBackend(os.path.join(folder, f"{n}.plan"), use_cuda_graph=use_cuda_graph) for n in MODEL_NAMES}


__all__ = ["Backend", "BACKEND_KINDS", "check_feed", "stores_channels_last", "TorchBackend", "OrtBackend", "TrtBackend", "GraphedBackend",
           "make_backends", "MissingDependency"]
