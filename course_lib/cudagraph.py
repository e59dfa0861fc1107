"""CUDA graphs: record one call's kernel launches once, replay them with a single launch. Chapter 2 (§3.4).

A graph replays the *same* kernels on the *same* addresses, so the rule is, for each call of ``fn``:

* the key is the inputs' shapes and dtypes (and their addresses when the inputs are the buffers the
  graph itself reads, ``copy_inputs=False`` -- a TensorRT context's bound tensors);
* the first call(s) with a key run eagerly: warm-up (lazy initialisation, algorithm choice);
* the next call captures ``fn`` into a ``torch.cuda.CUDAGraph`` and replays it;
* later calls copy the inputs into the captured buffers and replay;
* a capture that fails warns once and runs eagerly from then on: same results, no speed-up.

The same object serves torch modules and TensorRT: ``execute_async_v3`` launched on torch's current
stream during ``torch.cuda.graph`` is captured like any torch kernel.
"""
from __future__ import annotations

import warnings
from collections import Counter
from typing import Callable

import torch


def graph_key(inputs, with_addresses: bool = False) -> tuple:
    """The key a call is graphed under: (shape, dtype, device[, address]) per tensor, other inputs by value."""
    key = []
    for i, x in enumerate(inputs):
        if isinstance(x, torch.Tensor):
            key.append((tuple(x.shape), x.dtype, str(x.device)) + ((x.data_ptr(),) if with_addresses else ()))
        else:
            try:
                hash(x)
            except TypeError:
                raise ValueError(f"input {i}: a {type(x).__name__}; expected a tensor or a hashable constant "
                                 f"(a graph bakes constants in)") from None
            key.append(x)
    return tuple(key)


class CudaGraph:
    """Chapter 2: ``fn(*inputs)`` warmed up, captured and replayed per :func:`graph_key` (rule above).

    Args:
        fn: the work to graph; it must only launch GPU work (no host copies, no synchronization).
        name: named in the warning when a capture fails.
        warmup: eager calls per key before the capture.
        copy_inputs: True -- inputs are copied into static buffers before each replay (a torch
            function called with fresh tensors); False -- the inputs *are* the buffers the graph reads
            (their addresses join the key; nothing is copied).

    The outputs of a replay are the graph's own buffers, overwritten by the next replay of the same
    key: use them before the next call, or ``.clone()`` them. ``last_action`` says what the last call
    did: "warm-up", "capture", "replay" or "eager" (after a failed capture).
    """

    def __init__(self, fn: Callable, name: str = "graph", *, warmup: int = 1, copy_inputs: bool = True):
        if warmup < 0:
            raise ValueError(f"warmup={warmup}: expected >= 0")
        self.fn, self.name, self.warmup, self.copy_inputs = fn, name, warmup, copy_inputs
        self.graphs: dict[tuple, tuple] = {}          # key -> (graph, static inputs, static outputs)
        self.warm: Counter = Counter()
        self.failed: str | None = None
        self.last_action: str | None = None

    def __call__(self, *inputs):
        if self.failed is not None:
            self.last_action = "eager"
            return self.fn(*inputs)
        key = graph_key(inputs, with_addresses=not self.copy_inputs)
        if key not in self.graphs:
            if self.warm[key] < self.warmup:
                self.warm[key] += 1
                self.last_action = "warm-up"
                return self.fn(*inputs)
            static = [_static_copy(x) for x in inputs] if self.copy_inputs else list(inputs)
            try:
                graph, outputs = self._capture(static)
            except Exception as e:  # noqa: BLE001 - any failed capture: no graph, same results eagerly
                self.failed = f"{type(e).__name__}: {e}".splitlines()[0]
                warnings.warn(f"{self.name}: CUDA graph capture failed ({self.failed}); running eagerly from now on",
                              RuntimeWarning, stacklevel=2)
                self.last_action = "eager"
                return self.fn(*inputs)
            self.graphs[key] = (graph, static, outputs)
            self.last_action = "capture"
        else:
            self.last_action = "replay"
        graph, static, outputs = self.graphs[key]
        if self.copy_inputs:
            with torch.no_grad():
                for buffer, x in zip(static, inputs):
                    if isinstance(x, torch.Tensor):
                        buffer.copy_(x)
        graph.replay()
        return outputs

    def _capture(self, static: list) -> tuple:
        """Record ``fn(*static)`` into a new CUDA graph; returns (graph, static outputs)."""
        on_host = [i for i, x in enumerate(static) if isinstance(x, torch.Tensor) and not x.is_cuda]
        if on_host:                       # a graph records GPU work only: host work would not replay
            raise ValueError(f"inputs {on_host} are not on a CUDA device")
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = self.fn(*static)
        return graph, outputs

    def reset(self) -> None:
        """Forget every graph and warm-up (e.g. after the buffers or the TensorRT context changed)."""
        self.graphs.clear()
        self.warm.clear()
        self.failed = self.last_action = None

    def __repr__(self) -> str:
        state = f"failed: {self.failed}" if self.failed else f"{len(self.graphs)} captured"
        return f"CudaGraph({self.name!r}, {state})"


def _static_copy(x):
    """A buffer the graph owns, holding ``x`` now: a normal tensor (not an inference tensor), so it can be
    refilled in or out of ``torch.inference_mode``."""
    if not isinstance(x, torch.Tensor):
        return x
    with torch.inference_mode(False), torch.no_grad():
        buffer = torch.empty_like(x)
        buffer.copy_(x)
    return buffer
