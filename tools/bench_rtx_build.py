"""Measure TensorRT for RTX's ahead-of-time builds on this (CPU-only) machine: time and peak RAM per model.

Every export and every build runs in its own child process, so each peak RAM (the child's ru_maxrss,
from os.wait4) and CPU time is that step's alone. Repeated builds give a median and a min..max spread;
the 1-minute load average after each run shows how busy the machine was (a shared machine's builds
slow down by the other work; CPU seconds move less than wall seconds). Results go to a JSON file;
docs/benchmarks.md quotes them. Benchmarks are not tests: run by hand, e.g.

    nice -n 19 python tools/bench_rtx_build.py --out docs/bench/rtx_build_cpu.json            # tiny, 3 repeats
    nice -n 19 python tools/bench_rtx_build.py --config sd15 --models controlnet unet --repeat 2 \\
        --work /tmp/rtx_sd15 --out docs/bench/rtx_build_cpu_sd15.json                          # ~10 GB RAM

The sd15 models get random weights (no checkpoint is downloaded); the export alone needs ~10 GB RAM.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _child_export(config: str, models: list[str], out: str, height: int, width: int) -> None:
    import torch

    from course_lib.cnsd import build_cnsd, get_config
    from course_lib.onnx.export_cnsd import export_cnsd

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    model = build_cnsd(get_config(config), seed=0)
    export_cnsd(model, out, height=height, width=width, models=models, progress=False)


def _child_baseline() -> None:
    """What a build child holds before building: Python, torch (course_lib.trt imports it), tensorrt_rtx."""
    from course_lib.trt.flavour import require_tensorrt

    require_tensorrt(tensorrt="tensorrt_rtx")


def _cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _child_build(onnx_path: str, plan: str, height: int, width: int) -> None:
    from course_lib.trt.build import build_engine_plan
    from course_lib.trt.profiles import onnx_input_dims, shapes_at, static_profile

    dims = onnx_input_dims(onnx_path)
    side = build_engine_plan(onnx_path, plan, static_profile(shapes_at(dims, 1, height, width), dims),
                             workspace_gib=4, progress=False, tensorrt="tensorrt_rtx")
    print(json.dumps({"build_seconds": side.build_seconds, "layers": side.extra["layers"]}))


def run_child(*args: str) -> dict:
    """Run this script's ``_child`` in a new process; returns wall seconds, peak RSS (GiB) and its JSON line."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "_child", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    out, err = proc.stdout.read(), proc.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"child {args[0]} failed:\n{err[-2000:]}")
    line = next((ln for ln in reversed(out.splitlines()) if ln.startswith("{")), "{}")
    return {"wall_s": round(wall, 2), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2),
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 2), "load_1m_after": round(os.getloadavg()[0], 2),
            **json.loads(line)}


def summary(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 2), "min": round(min(values), 2), "max": round(max(values), 2),
            "n": len(values)}


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "_child":
        kind, *rest = sys.argv[2:]
        if kind == "baseline":
            _child_baseline()
        elif kind == "export":
            config, out, height, width, *models = rest
            _child_export(config, models, out, int(height), int(width))
        else:
            onnx_path, plan, height, width = rest
            _child_build(onnx_path, plan, int(height), int(width))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=["tiny", "sd15"], default="tiny")
    p.add_argument("--models", nargs="+", default=["clip", "controlnet", "unet", "decoder"])
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--repeat", type=int, default=3, help="builds per model (median and spread)")
    p.add_argument("--work", default="/tmp/rtx_build_bench", help="folder for the ONNX files and plans")
    p.add_argument("--keep", action="store_true", help="keep the ONNX files and plans")
    p.add_argument("--out", required=True, help="JSON file to write")
    args = p.parse_args(argv)

    import tensorrt_rtx  # noqa: F401 - only to record its version; the children build through course_lib.trt

    work = Path(args.work)
    onnx_dir = work / "onnx"
    record = {"device": f"{_cpu_name()}, {os.cpu_count()} CPU cores, no GPU",
              "python": platform.python_version(), "tensorrt_rtx": tensorrt_rtx.__version__,
              "config": args.config, "size": f"1x{args.height}x{args.width}", "command": " ".join(sys.argv),
              "baseline": run_child("baseline"), "export": None, "models": {}}
    print(f"exporting {args.config} {args.models} at {args.height}x{args.width} ...", flush=True)
    record["export"] = run_child("export", args.config, str(onnx_dir), str(args.height), str(args.width), *args.models)
    print(f"  export: {record['export']}", flush=True)
    for model in args.models:
        onnx_path = onnx_dir / f"{model}.onnx"
        runs = []
        for i in range(args.repeat):
            plan = work / "plans" / f"{model}.plan"
            runs.append(run_child("build", str(onnx_path), str(plan), str(args.height), str(args.width)))
            print(f"  {model} build {i + 1}/{args.repeat}: {runs[-1]}", flush=True)
        weights = sum(f.stat().st_size for f in onnx_dir.glob(f"{model}.onnx*") if not f.name.endswith(".json"))
        record["models"][model] = {
            "build_seconds": summary([r["build_seconds"] for r in runs]), "wall_seconds": summary([r["wall_s"] for r in runs]),
            "peak_rss_gib": summary([r["peak_rss_gib"] for r in runs]), "cpu_seconds": summary([r["cpu_s"] for r in runs]),
            "load_1m": [r["load_1m_after"] for r in runs], "layers": runs[0]["layers"],
            "onnx_mib": round(weights / 2**20, 1), "plan_mib": round((work / "plans" / f"{model}.plan").stat().st_size / 2**20, 1)}
        if not args.keep:
            (work / "plans" / f"{model}.plan").unlink()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
