"""CUDA graphs: record one inference's kernel launches once, replay them cheaply. Introduced in chapter 3.

A CUDA graph replays the *same* kernels on the *same* addresses. So a graph is only valid while the
input shapes and buffer addresses stay what they were at capture; TensorRT also wants one ordinary
run before a capture (it sets things up lazily on the first run). :class:`GraphPolicy` is that rule as
a small state machine, pure Python, tested on CPU:

    when (key = the shapes and addresses of all tensors)            state             action
    graphs not asked for                                            -                 run eagerly
    no ordinary run with this key yet                               warm-up needed    run eagerly (warm-up)
    warmed up with this key, no graph yet                           no graph          capture, launch
    a graph for this key                                            captured          replay
    warmed up with this key, the graph is for another key           no graph          re-capture, launch
    a capture failed before                                         failed            fallback (eager)

:class:`CudaGraphRunner` is the glue that acts on those decisions with cuda-python
(``cuda.bindings.runtime``, imported lazily); :class:`TorchGraphed` does the same for a torch callable
with torch's own ``torch.cuda.CUDAGraph``.
"""
from __future__ import annotations

import enum
import warnings
from collections.abc import Callable, Hashable


class GraphAction(enum.Enum):
    EAGER = "run eagerly"
    CAPTURE = "capture"
    REPLAY = "replay"
    RECAPTURE = "re-capture"
    FALLBACK = "fallback after failure"


class GraphState(enum.Enum):
    NO_GRAPH = "no graph"
    WARMUP_NEEDED = "warm-up run needed"
    CAPTURED = "captured"
    FAILED = "failed"


class GraphPolicy:
    """Chapter 3: decide, call by call, whether to run eagerly, capture, replay or re-capture.

    Use: ``action = policy.decide(key, use_graph)``; do it; then report with :meth:`ran_eagerly`,
    :meth:`captured` or :meth:`capture_failed`.
    """

    def __init__(self) -> None:
        self.graph_key: Hashable | None = None   # key of the captured graph (None: no graph)
        self.warm_key: Hashable | None = None    # key of the last ordinary run
        self.failure: str | None = None
        self.last_key: Hashable | None = None    # key of the last decide()
        self._wanted = False

    @property
    def state(self) -> GraphState:
        """Where the last key stands (see the table in the module docstring)."""
        if self.failure is not None:
            return GraphState.FAILED
        if self.graph_key is not None and self.graph_key == self.last_key:
            return GraphState.CAPTURED
        if self._wanted and self.warm_key != self.last_key:
            return GraphState.WARMUP_NEEDED
        return GraphState.NO_GRAPH

    def decide(self, key: Hashable, use_graph: bool) -> GraphAction:
        self.last_key = key
        if not use_graph:
            return GraphAction.EAGER
        self._wanted = True
        if self.failure is not None:
            return GraphAction.FALLBACK
        if self.graph_key is not None and key == self.graph_key:
            return GraphAction.REPLAY
        if key != self.warm_key:
            return GraphAction.EAGER  # the warm-up run for this key
        return GraphAction.CAPTURE if self.graph_key is None else GraphAction.RECAPTURE

    def ran_eagerly(self, key: Hashable) -> None:
        self.warm_key = key

    def captured(self, key: Hashable) -> None:
        self.graph_key = key

    def capture_failed(self, reason: str) -> str:
        """Record a failed capture; returns the warning to show (graphs stay off from now on)."""
        self.failure = reason
        self.graph_key = None
        return f"CUDA graph capture failed ({reason}); running without a graph from now on"

    def reset(self) -> None:
        """Forget the graph and the warm-up (e.g. after buffers were reallocated)."""
        self.graph_key = self.warm_key = self.failure = None


def _cudart():
    from course_lib.env import require

    return require("cuda.bindings.runtime", "CUDA graphs (chapter 3)")


def _check(result, what: str):
    """Unpack a cuda-python call's ``(err, *values)``; raise RuntimeError naming the call on error."""
    cudart = _cudart()
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        name = cudart.cudaGetErrorName(err)[1]
        raise RuntimeError(f"{what} failed: {name.decode() if isinstance(name, bytes) else name}")
    return values[0] if len(values) == 1 else (values or None)


class CudaGraphRunner:
    """Chapter 3: run ``enqueue(stream_handle)`` eagerly or through a CUDA graph, per :class:`GraphPolicy`.

    ``enqueue`` must only launch work on the given stream (e.g. TensorRT's ``execute_async_v3``).
    Captures happen on the runner's own non-default stream, ordered after the caller's stream.
    """

    def __init__(self, name: str = "engine") -> None:
        self.name = name
        self.policy = GraphPolicy()
        self._graph = None
        self._exec = None
        self._stream = None  # torch.cuda.Stream, made on first capture

    def run(self, enqueue: Callable[[int], None], key: Hashable, stream, use_graph: bool) -> GraphAction:
        """Run once on the torch CUDA ``stream``; returns what was done."""
        import torch

        action = self.policy.decide(key, use_graph)
        if action in (GraphAction.EAGER, GraphAction.FALLBACK):
            enqueue(stream.cuda_stream)
            self.policy.ran_eagerly(key)
            return action
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=stream.device)
        side = self._stream
        side.wait_stream(stream)
        if action is not GraphAction.REPLAY:
            self.release()
            try:
                self._capture(enqueue, side.cuda_stream)
            except Exception as e:  # noqa: BLE001 - any capture failure means: no graph, run eagerly
                self.release()
                warnings.warn(f"{self.name}: {self.policy.capture_failed(str(e))}", stacklevel=3)
                enqueue(stream.cuda_stream)
                return GraphAction.FALLBACK
            self.policy.captured(key)
        _check(_cudart().cudaGraphLaunch(self._exec, side.cuda_stream), "cudaGraphLaunch")
        stream.wait_stream(side)
        return action

    def _capture(self, enqueue: Callable[[int], None], handle: int) -> None:
        cudart = _cudart()
        mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal
        _check(cudart.cudaStreamBeginCapture(handle, mode), "cudaStreamBeginCapture")
        try:
            enqueue(handle)
        finally:
            err, graph = cudart.cudaStreamEndCapture(handle)  # always leave capture mode
            cudart.cudaGetLastError()                          # clear a capture error, if any
        _check((err,), "cudaStreamEndCapture")
        self._graph = graph
        self._exec = _check(cudart.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")

    def release(self) -> None:
        """Destroy the graph (if any); the policy keeps its state."""
        if self._exec is not None or self._graph is not None:
            cudart = _cudart()
            if self._exec is not None:
                cudart.cudaGraphExecDestroy(self._exec)
            if self._graph is not None:
                cudart.cudaGraphDestroy(self._graph)
        self._exec = self._graph = None

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


class TorchGraphed:
    """Chapter 3: a torch callable captured once in a ``torch.cuda.CUDAGraph``, replayed on new inputs.

    ``graphed = TorchGraphed(module, *example_inputs)``; ``graphed(*inputs)`` copies the inputs into
    the static input buffers, replays, and returns the static outputs (overwritten by the next call:
    ``.clone()`` what you keep). Inputs must keep the example inputs' shapes and dtypes.
    """

    def __init__(self, fn: Callable, *example_inputs, warmup: int = 3) -> None:
        import torch

        self.fn = fn
        self.static_inputs = [x.detach().clone() for x in example_inputs]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.no_grad(), torch.cuda.stream(side):
            for _ in range(warmup):   # warm-up on a side stream, as torch's docs recommend
                fn(*self.static_inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(self.graph):
            self.static_outputs = fn(*self.static_inputs)

    def __call__(self, *inputs):
        if len(inputs) != len(self.static_inputs):
            raise ValueError(f"expected {len(self.static_inputs)} inputs, got {len(inputs)}")
        for i, (dst, src) in enumerate(zip(self.static_inputs, inputs)):
            if tuple(src.shape) != tuple(dst.shape) or src.dtype != dst.dtype:
                raise ValueError(f"input {i}: expected {tuple(dst.shape)} {dst.dtype} as captured, "
                                 f"got {tuple(src.shape)} {src.dtype}")
            dst.copy_(src)
        self.graph.replay()
        return self.static_outputs
