"""Homework 2 (chapter 2): per engine, builder optimization level 0..5 and CUDA graph on/off.

:func:`hw2_sweep` builds a static plan of each ONNX file at each ``builder_optimization_level`` and
times it with and without a CUDA graph (CUDA events, median and spread, raw samples kept); needs
TensorRT and a GPU. :func:`hw2_table` (one markdown table) and :func:`plot_hw2` (one bar chart) are
pure functions of its records, so they run and are tested anywhere. Timing and statistics come from
:mod:`course_lib.bench` (chapter 3 explains them in full).

    records = hw2_sweep("onnx_fp16", "plans_hw2")
    print(hw2_table(records)); plot_hw2(records, "plans_hw2/hw2.png")
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from course_lib.cnsd.contract import MODEL_NAMES
from course_lib.files import save_png, write_json
from course_lib.timing import markdown_table, spread, summarize, time_cuda

def hw2_feed(specs: Mapping[str, tuple[Sequence[int], object]], seed: int = 0) -> dict:
    """Chapter 2 (HW2): random inputs for ``{name: (shape, torch dtype)}``: ``input_ids`` from CLIP's
    vocabulary, other integers (timesteps) from 0..999, ``hint`` uniform in [0, 1], floats normal."""
    import torch

    g = torch.Generator().manual_seed(seed)
    feed = {}
    for name, (shape, dtype) in specs.items():
        if not dtype.is_floating_point:
            high = 49408 if name == "input_ids" else 1000
            feed[name] = torch.randint(0, high, tuple(shape), generator=g).to(dtype)
        else:
            x = torch.rand(tuple(shape), generator=g) if name == "hint" else torch.randn(tuple(shape), generator=g)
            feed[name] = x.to(dtype)
    return feed


def hw2_sweep(onnx_dir: str | Path, out_dir: str | Path, models: Sequence[str] = MODEL_NAMES,
              opt_levels: Sequence[int] = (0, 1, 2, 3, 4, 5), cuda_graph: Sequence[bool] = (False, True),
              warmup: int = 5, iters: int = 20, height: int = 256, width: int = 384,
              timing_cache: str | Path | None = None) -> list[dict]:
    """Chapter 2 (HW2): per engine, build a static plan at each builder_optimization_level and time it
    with and without a CUDA graph (CUDA events, median and spread). Needs TensorRT and a GPU.

    Plans go to ``out_dir/O<level>/<model>.plan``; the records (one per model, level, graph setting:
    ``{model, opt_level, cuda_graph, build_s, plan_mib, latency: summarize}``) to ``out_dir/hw2.json``.
    Use :func:`hw2_table` and :func:`plot_hw2` on them.
    """
    from course_lib.trt.flavour import require_tensorrt
    from course_lib.trt.build import build_plans
    from course_lib.trt.engine import Engine

    require_tensorrt("the HW2 sweep (building and timing TensorRT plans)")
    onnx_dir, out_dir = Path(onnx_dir), Path(out_dir)
    missing = [m for m in models if not (onnx_dir / f"{m}.onnx").is_file()]
    if missing:
        raise FileNotFoundError(f"{', '.join(f'{m}.onnx' for m in missing)} not in {onnx_dir}: export them first")
    if any(level not in range(6) for level in opt_levels):
        raise ValueError(f"opt_levels {list(opt_levels)}: expected builder optimization levels in 0..5")
    records = []
    for model in models:
        for level in opt_levels:
            start = time.perf_counter()
            plan = build_plans(onnx_dir, out_dir / f"O{level}", opt_level=level, timing_cache=timing_cache,
                               height=height, width=width, models=[model])[0]
            build_s = time.perf_counter() - start
            engine = Engine(plan).load().activate()
            buffers = engine.allocate_buffers()
            feed = hw2_feed({n: (tuple(buffers[n].shape), buffers[n].dtype) for n in engine.input_names})
            feed = {n: t.cuda() for n, t in feed.items()}
            for graph in cuda_graph:
                run = lambda e=engine, f=feed, g=graph: e.infer(f, use_cuda_graph=g)  # noqa: E731
                samples = time_cuda(run, warmup=max(warmup, 2), iters=iters)        # >= 2: warm-up, then capture
                records.append({"model": model, "opt_level": level, "cuda_graph": bool(graph), "build_s": build_s,
                                "plan_mib": plan.stat().st_size / 2**20, "latency": summarize(samples)})
            engine = buffers = None                                        # free the plan before the next one
            write_json(out_dir / "hw2.json", records)                  # partial results survive a failure
    return records


def hw2_table(records: Sequence[Mapping]) -> str:
    """Chapter 2 (HW2): one row per engine and optimization level: build time, median (p10-p90) without
    and with a CUDA graph, and what the graph saves."""
    cells: dict = {}
    for r in records:
        row = cells.setdefault((r["model"], r["opt_level"]), {"build_s": r["build_s"]})
        row[bool(r["cuda_graph"])] = r["latency"]
    rows = []
    for (model, level), row in cells.items():
        off, on = row.get(False), row.get(True)
        rows.append([model, level, row["build_s"], off and off["median"], off and spread(off), on and on["median"],
                     on and spread(on), off["median"] / on["median"] if off and on else None])
    return markdown_table(["engine", "opt level", "build s", "no graph ms", "p10-p90", "CUDA graph ms", "p10-p90",
                           "graph speed-up"], rows)


def plot_hw2(records: Sequence[Mapping], path: str | Path, figsize: tuple[float, float] = (10.0, 3.5)) -> Path:
    """Chapter 2 (HW2): one panel per engine, median latency by optimization level, bars without and with a
    CUDA graph (p10-p90 whiskers); PNG at ``path`` with a fixed ``figsize``."""
    from matplotlib.figure import Figure

    models = list(dict.fromkeys(r["model"] for r in records))
    if not models:
        raise ValueError("plot_hw2: no records to plot")
    fig = Figure(figsize=figsize)
    axes = np.atleast_1d(fig.subplots(1, len(models)))
    for ax, model in zip(axes, models):
        levels = sorted({r["opt_level"] for r in records if r["model"] == model})
        for k, graph in enumerate((False, True)):
            rs = {r["opt_level"]: r["latency"] for r in records if r["model"] == model and bool(r["cuda_graph"]) == graph}
            xs = [i + (k - 0.5) * 0.4 for i, lv in enumerate(levels) if lv in rs]
            meds = [rs[lv]["median"] for lv in levels if lv in rs]
            err = [[rs[lv]["median"] - rs[lv]["p10"] for lv in levels if lv in rs],
                   [rs[lv]["p90"] - rs[lv]["median"] for lv in levels if lv in rs]]
            if xs:
                ax.bar(xs, meds, width=0.4, yerr=err, capsize=2, label="CUDA graph" if graph else "no graph")
        ax.set_xticks(range(len(levels)), [str(lv) for lv in levels])
        ax.set_xlabel("builder optimization level")
        ax.set_title(model, fontsize=10)
    axes[0].set_ylabel("ms (median, p10-p90)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return save_png(fig, path)
