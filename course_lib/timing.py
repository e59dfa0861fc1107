"""Timing: how the course measures, summarizes and tabulates latency. Introduced in chapter 2.

* GPU work is asynchronous: :func:`time_cuda` times with CUDA events, :func:`time_cpu` with
  ``perf_counter`` between two synchronizations; both run untimed warm-up calls first.
* Report the median with its spread (p10-p90, IQR) over N runs and keep every raw sample:
  :func:`summarize` does both, so a reader (or the homework grader) can recompute the median.
* Say what the numbers were measured on: :func:`environment_info` (GPU, driver, versions, TF32 flags).
"""
from __future__ import annotations

import math
import os
import platform
import subprocess
import time
from typing import Callable, Mapping, Sequence

import numpy as np


def time_cuda(fn: Callable[[], object], warmup: int = 3, iters: int = 10, sync_each: bool = True,
              tick: Callable[[], None] | None = None) -> list[float]:
    """Chapter 3: milliseconds of ``iters`` calls of ``fn()`` measured with CUDA events, after ``warmup``.

    ``sync_each=True`` (default) waits for the GPU before each call, so a sample is the latency of one
    call including its launch gaps; False lets calls queue up back to back (throughput per call).
    ``tick()`` runs after each call, outside the timed part (a progress bar's update).
    """
    import torch

    if not torch.cuda.is_available():
        raise ValueError("time_cuda: no CUDA device here; expected a GPU (use time_cpu on the CPU)")
    _check_counts(warmup, iters)
    tick = tick or (lambda: None)
    for _ in range(warmup):
        fn()
        tick()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for start, end in events:
        if sync_each:
            torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        tick()                                  # after end is queued: not part of the sample
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in events]


def time_cpu(fn: Callable[[], object], warmup: int = 1, iters: int = 10,
             sync: Callable[[], None] | None = None, tick: Callable[[], None] | None = None) -> list[float]:
    """Chapter 2: wall-clock milliseconds (``perf_counter``) of ``iters`` calls of ``fn()`` after ``warmup``
    untimed ones -- the course's latency rule (compute_score.py), warm-up excluded.

    ``sync()`` runs before and after each timed call, so queued GPU work is counted where it belongs;
    by default ``torch.cuda.synchronize`` where a GPU is present, nothing on a CPU machine.
    ``tick()`` runs after each call, outside the timed part (a progress bar's update).
    """
    _check_counts(warmup, iters)
    if sync is None:
        import torch

        sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    tick = tick or (lambda: None)
    for _ in range(warmup):
        fn()
        tick()
    samples = []
    for _ in range(iters):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        samples.append((time.perf_counter() - start) * 1e3)
        tick()
    return samples


def time_each(fn: Callable[[object], object], inputs: Sequence, cuda: bool) -> tuple[list[float], list]:
    """Chapter 3: ``fn(x)`` for each of ``inputs``, each call timed alone: on a GPU with CUDA events after a
    synchronize (the host work inside the call counts, as in the course's latency rule), on the CPU with
    ``perf_counter``. Returns (milliseconds, outputs), both in the order of ``inputs``."""
    samples, outputs = [], []
    for x in inputs:
        if cuda:
            import torch

            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            outputs.append(fn(x))
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            outputs.append(fn(x))
            samples.append((time.perf_counter() - t) * 1e3)
    return samples, outputs


def _check_counts(warmup: int, iters: int) -> None:
    if iters < 1 or warmup < 0:
        raise ValueError(f"warmup={warmup}, iters={iters}: expected warmup >= 0 and iters >= 1")


def summarize(samples: Sequence[float]) -> dict:
    """Chapter 3: ``{median, p10, p90, iqr, min, max, mean, n, raw}`` of timing samples (ms).

    Percentiles are numpy's (linear interpolation); ``raw`` keeps every sample in order.
    """
    a = np.asarray(samples, dtype=np.float64)
    if a.ndim != 1 or a.size == 0 or not np.all(np.isfinite(a)):
        raise ValueError(f"samples: expected a non-empty list of finite numbers, got {list(samples)[:5]}")
    p10, p25, p75, p90 = np.percentile(a, [10, 25, 75, 90])
    return {"median": float(np.median(a)), "p10": float(p10), "p90": float(p90), "iqr": float(p75 - p25),
            "min": float(a.min()), "max": float(a.max()), "mean": float(a.mean()), "n": int(a.size),
            "raw": [float(x) for x in a]}


def spread(s: Mapping) -> str:
    """``"p10-p90"`` of a :func:`summarize` dict, e.g. ``"41.2-43.0"``."""
    return f"{s['p10']:.1f}-{s['p90']:.1f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """Chapter 1: a GitHub markdown table; None as "-", floats with 1 decimal from 10 up, 2 below,
    and 3 significant digits under 0.01 (errors such as ``1.23e-04``)."""
    def cell(v):
        if v is None:
            return "-"
        if isinstance(v, (float, np.floating)):
            if not math.isfinite(v) or v == 0:
                return str(float(v)).replace("0.0", "0")
            return f"{v:.2e}" if abs(v) < 0.01 else f"{v:.2f}" if abs(v) < 10 else f"{v:.1f}"
        return str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows])


def environment_info(device: str = "cuda") -> dict:
    """Chapter 3: what a benchmark ran on: GPU, driver, torch / CUDA / cuDNN versions, TF32 flags, host."""
    import torch

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "device": device, "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
            "tf32_cudnn": torch.backends.cudnn.allow_tf32}
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            info["driver"] = out.stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            info["driver"] = None
    return info
