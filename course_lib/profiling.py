"""Chapter 3: where the GPU time goes -- kernels counted and timed by class with ``torch.profiler``.

A latency says how long, a profile says on what. :func:`profile_kernels` runs a function a few times
under ``torch.profiler`` and sums, per call, the kernels of each class (:data:`KERNEL_CLASSES`):
matrix products, convolutions, attention, normalisation, layout transposes, the rest (elementwise,
reductions), memory copies. Two more numbers tell a launch-bound program from a compute-bound one:
``kernels`` (how many launches one call makes) and ``gpu_busy`` (kernel time / wall time).

On a CPU the same function classifies the ``aten::`` operators by their own (self) CPU time instead,
so a lesson without a GPU still shows the shape of the table.
"""
from __future__ import annotations

import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

KERNEL_CLASSES = ("gemm/matmul", "convolution", "attention", "normalization", "layout (NCHW<->NHWC)",
                  "elementwise/other", "memcpy")

# substrings of kernel (or aten operator) names, checked in this order: the first class that matches wins
_RULES = (
    ("layout (NCHW<->NHWC)", ("nchwtonhwc", "nhwctonchw")),
    ("attention", ("flash", "fmha", "attention", "sdpa", "softmax", "attn")),
    ("normalization", ("norm", "moments")),
    ("convolution", ("fprop", "convolution", "conv2d", "convolve", "implicit_gemm", "winograd", "cudnn", "dgrad")),
    ("gemm/matmul", ("gemm", "matmul", "nvjet", "cublas", "cutlass", "xmma", "aten::mm", "addmm", "bmm",
                     "scaled_mm", "aten::linear", "s16816", "h16816")),
)
_CPU_COPIES = ("aten::copy_", "aten::_to_copy", "aten::clone", "aten::contiguous")


def kernel_class(name: str) -> str:
    """Chapter 3: the class of a CUDA kernel or aten operator, from its name (:data:`KERNEL_CLASSES`).

    Inductor's kernels say what they fused: ``triton_tem_*`` are matmul/convolution templates,
    ``triton_poi/red/per_*`` fused pointwise/reduction kernels -- normalisation when a norm is among
    what they fused (GroupNorm + SiLU), attention for a softmax, elementwise otherwise (a convolution's
    bias add fused with the next SiLU is elementwise work, not a convolution).
    """
    n = name.lower()
    if n.startswith(("memcpy", "memset")) or n in _CPU_COPIES:
        return "memcpy"
    if n.startswith("triton_tem"):
        return "convolution" if "conv" in n else "gemm/matmul"
    if n.startswith("triton"):
        return "normalization" if "norm" in n else "attention" if "softmax" in n else "elementwise/other"
    for cls, keys in _RULES:
        if any(k in n for k in keys):
            return cls
    return "elementwise/other"


def summarize_kernels(kernels: list[tuple[str, float]], calls: int, wall_ms: float, top: int = 12) -> dict:
    """Chapter 3: ``(name, microseconds)`` of every kernel over ``calls`` calls -> per call: ``kernels``,
    ``gpu_ms``, ``wall_ms``, ``gpu_busy``, ``classes`` {class: {count, ms, share}} and the ``top`` kernels."""
    classes: dict = {c: {"count": 0.0, "ms": 0.0} for c in KERNEL_CLASSES}
    by_name: dict = defaultdict(lambda: [0, 0.0])
    for name, us in kernels:
        cls = classes[kernel_class(name)]
        cls["count"] += 1 / calls
        cls["ms"] += us / 1e3 / calls
        by_name[name][0] += 1
        by_name[name][1] += us / 1e3 / calls
    gpu_ms = sum(c["ms"] for c in classes.values())
    for c in classes.values():
        c["share"] = c["ms"] / gpu_ms if gpu_ms else 0.0
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top]
    return {"calls": calls, "kernels": len(kernels) / calls, "gpu_ms": gpu_ms, "wall_ms": wall_ms,
            "gpu_busy": gpu_ms / wall_ms if wall_ms else None, "classes": classes,
            "top": [{"name": k[:120], "class": kernel_class(k), "count": v[0] / calls, "ms": v[1]} for k, v in ranked]}


def profile_kernels(fn: Callable[[], object], device: str = "cuda", iters: int = 3, warmup: int = 1) -> dict:
    """Chapter 3: profile ``iters`` calls of ``fn()`` (after ``warmup``) and :func:`summarize_kernels` them.

    On CUDA the kernels, copies and memsets come from the profiler's trace (GPU time); on the CPU the
    ``aten::`` operators' self times stand in for kernels. ``wall_ms`` is measured under the profiler,
    which adds a little host time per launch.
    """
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.device(device).type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        sync()
        wall_ms = (time.perf_counter() - start) * 1e3 / iters
    if cuda:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "trace.json"
            prof.export_chrome_trace(str(path))
            events = json.loads(path.read_text()).get("traceEvents", [])
        cats = {"kernel": "", "gpu_memcpy": "memcpy ", "gpu_memset": "memcpy "}
        kernels = [(cats[e["cat"].lower()] + e["name"], float(e.get("dur", 0.0)))
                   for e in events if str(e.get("cat", "")).lower() in cats]
        if not kernels:                 # a trace without kernel events: the CUDA events the profiler parsed
            from torch.autograd import DeviceType
            kernels = [(e.name, e.time_range.elapsed_us()) for e in prof.events() if e.device_type == DeviceType.CUDA]
    else:
        kernels = [(e.key, e.self_cpu_time_total / e.count) for e in prof.key_averages()
                   if e.key.startswith("aten::") and e.self_cpu_time_total > 0 for _ in range(e.count)]
    result = summarize_kernels(kernels, iters, wall_ms)
    result["device"] = "cuda kernels" if cuda else "cpu aten operators (self time)"
    if not kernels:
        result["note"] = "the profiler recorded no kernels (on a GPU: is CUPTI available to this process?)"
    return result


def kernel_table(profiles: dict[str, dict]) -> str:
    """Chapter 3: one markdown row per kernel class, one column pair (ms, count per call) per profile."""
    from course_lib.timing import markdown_table

    names = list(profiles)
    rows = [[cls] + [v for n in names for v in (profiles[n]["classes"][cls]["ms"], profiles[n]["classes"][cls]["count"])]
            for cls in KERNEL_CLASSES]
    rows.append(["all kernels"] + [v for n in names for v in (profiles[n]["gpu_ms"], profiles[n]["kernels"])])
    rows.append(["wall (profiled), GPU busy"] + [v for n in names for v in (profiles[n]["wall_ms"], profiles[n]["gpu_busy"])])
    header = ["kernel class"] + [h for n in names for h in (f"{n} ms", "count")]
    return markdown_table(header, rows)
