"""Chapter 4's GPU numbers in one command: fused vs unfused q/k/v on sd15 (random weights), fp16.

    python tools/fusion_h100.py --out DIR                           # the H100 run (about 1-2 minutes)
    python tools/fusion_h100.py --out DIR --config tiny --device cpu --iters 3 --warmup 1   # CPU smoke test

One process, eager PyTorch, no TensorRT. The sd15 ControlNet and UNet (``build_cnsd(get_config("sd15"),
seed=0)``) in fp16 (GroupNorm32 layers keep fp32 weights: they normalise in fp32), for both attention
backends ("math": matmul-softmax-matmul as exported to ONNX; "sdpa": torch's fused attention):

* per attention layer: the first self- and cross-attention layer at each token count of a batch-2
  256x384 ControlNet forward (32x48, 16x24, 8x12 and the middle block's 4x6), the whole layer and its
  q/k/v projection alone, on random inputs of the layer's shape;
* per model: ControlNet and UNet forward, batch 2, 256x384 (the course's CFG batch).

Each timing: CUDA events around one call with the GPU synchronised before it (the latency of one call,
launch gaps included), after a warm-up; unfused and fused alternate in ``--rounds`` rounds so that a
drifting clock affects both alike; reported as median and p10/p90 over every sample, and each round's
median (the same version timed twice: differences smaller than that are noise). Fused-vs-unfused
output error in fp16 (same weights, same inputs): max abs error and max abs error over max |output|.

Writes DIR/fusion_h100.json (everything, raw samples included) and DIR/fusion_h100.md (the tables).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from course_lib.cnsd import build_cnsd, contracts, example_inputs, get_config  # noqa: E402
from course_lib.cnsd.attention import CrossAttention, set_attention_backend  # noqa: E402
from course_lib.cnsd.fusion import fuse_qkv, unfuse_qkv  # noqa: E402
from course_lib.cnsd.unet import GroupNorm32  # noqa: E402

BACKENDS = ("math", "sdpa")
MODELS = ("controlnet", "unet")


# ------------------------------------------------------------------------------------------ timing

def time_calls(fn, device: torch.device, warmup: int, iters: int) -> list[float]:
    """Milliseconds of ``iters`` calls after ``warmup``: CUDA events on a GPU, perf_counter on a CPU."""
    for _ in range(warmup):
        fn()
    samples = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
    else:
        for _ in range(iters):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
    return samples


def summary(samples: list[float]) -> dict:
    a = np.asarray(samples, dtype=np.float64)
    p10, p90 = np.percentile(a, [10, 90])
    return {"median": float(np.median(a)), "p10": float(p10), "p90": float(p90), "n": int(a.size)}


def compare_versions(model: nn.Module, run, device, warmup: int, iters: int, rounds: int) -> dict:
    """Time ``run()`` with ``model`` unfused and fused, alternating; ``model`` is left unfused."""
    samples = {"unfused": [], "fused": []}
    round_medians = {"unfused": [], "fused": []}
    for _ in range(rounds):
        for version in ("unfused", "fused"):
            (fuse_qkv if version == "fused" else unfuse_qkv)(model)
            s = time_calls(run, device, warmup, iters)
            samples[version] += s
            round_medians[version].append(float(np.median(s)))
    unfuse_qkv(model)
    out = {v: {**summary(samples[v]), "round_medians": round_medians[v], "raw": samples[v]} for v in samples}
    out["speedup"] = out["unfused"]["median"] / out["fused"]["median"]
    return out


def output_error(reference, candidate) -> dict:
    ref = torch.cat([t.float().flatten() for t in reference])
    got = torch.cat([t.float().flatten() for t in candidate])
    max_abs = float((ref - got).abs().max())
    scale = float(ref.abs().max())
    return {"max_abs": max_abs, "max_abs_ref": scale, "rel_to_max": max_abs / scale if scale else float("nan"),
            "finite": bool(torch.isfinite(got).all())}


# ------------------------------------------------------------------------------------------ model

def to_device(cnsd, device: torch.device, dtype: torch.dtype):
    """ControlNet and UNet on ``device`` in ``dtype``; GroupNorm32 keeps fp32 weights (it normalises x.float())."""
    for name in MODELS:
        sub = cnsd.submodule(name).to(device=device, dtype=dtype)
        for m in sub.modules():
            if isinstance(m, GroupNorm32):
                m.float()
    return cnsd


def model_feed(config, name: str, batch: int, height: int, width: int, device, dtype, seed: int = 0) -> list:
    feed = example_inputs(contracts(config, batch, height, width)[name], seed)
    return [t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype) for t in feed.values()]


def pick_layers(cnsd, feed: list) -> list[dict]:
    """The first self- and cross-attention layer at each token count of one ControlNet forward."""
    seen, picked = set(), []

    def hook(path):
        def record(module, args, kwargs):
            x = args[0]
            context = args[1] if len(args) > 1 else kwargs.get("context")
            key = (x.shape[1], module.is_self_attention)
            if key not in seen:
                seen.add(key)
                picked.append({"path": f"controlnet.{path}", "module": module, "x_shape": tuple(x.shape),
                               "context_shape": None if context is None else tuple(context.shape),
                               "kind": "self" if module.is_self_attention else "cross"})
        return record

    handles = [m.register_forward_pre_hook(hook(p), with_kwargs=True)
               for p, m in cnsd.controlnet.named_modules() if isinstance(m, CrossAttention)]
    with torch.no_grad():
        cnsd.positional("controlnet")(*feed)
    for h in handles:
        h.remove()
    return picked


# ------------------------------------------------------------------------------------------ report

def environment(device: torch.device) -> dict:
    info = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(), "python": platform.python_version(),
            "numpy": np.__version__, "cpus": os.cpu_count(), "device": str(device),
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, sms=props.multi_processor_count,
                    gpu_memory_gib=round(props.total_memory / 2**30, 1))
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError) as e:
            info["driver"] = f"unknown ({type(e).__name__})"
    else:
        info["gpu"] = platform.processor() or "cpu"
    return info


def _ms(s: dict) -> str:
    return f"{s['median']:.3f} ({s['p10']:.3f}-{s['p90']:.3f})"


def markdown(result: dict) -> str:
    env, a = result["environment"], result["args"]
    lines = [f"# Chapter 4: fused vs unfused q/k/v, {a['config']} {a['dtype']}, eager PyTorch",
             "",
             f"{env.get('gpu')} (driver {env.get('driver', '-')}), torch {env['torch']} (CUDA {env['cuda']}), "
             f"{env['date']}. Command: `{result['command']}`. Milliseconds: median (p10-p90) over "
             f"{a['rounds']} x {a['iters']} calls (layers: {a['rounds']} x {a['layer_iters']}), GPU synchronised "
             "before each call; speed-up = unfused / fused median.", "",
             "## Whole models, batch %d, %dx%d" % (a["batch"], a["height"], a["width"]), "",
             "| model | attention | unfused ms | fused ms | speed-up | round medians unfused / fused "
             "| max abs err (rel) |",
             "|---|---|---|---|---|---|---|"]
    for r in result["models"]:
        rm = " / ".join(", ".join(f"{x:.3f}" for x in r[v]["round_medians"]) for v in ("unfused", "fused"))
        e = r["error"]
        lines.append(f"| {r['model']} | {r['backend']} | {_ms(r['unfused'])} | {_ms(r['fused'])} | "
                     f"x{r['speedup']:.3f} | {rm} | {e['max_abs']:.1e} ({e['rel_to_max']:.1e}) |")
    lines += ["", "## Single attention layers (batch %d, context 77 tokens)" % a["batch"], "",
              "| layer | tokens | C | kind | attention | part | unfused ms | fused ms | speed-up | max abs err |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["layers"]:
        lines.append(f"| {r['path'].replace('controlnet.', '')} | {r['tokens']} | {r['channels']} | {r['kind']} | "
                     f"{r['backend']} | {r['part']} | {_ms(r['unfused'])} | {_ms(r['fused'])} | "
                     f"x{r['speedup']:.3f} | {r['error']['max_abs']:.1e} |")
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def strip_raw(result: dict) -> dict:
    """The result without raw samples (what the docs keep)."""
    def clean(x):
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items() if k != "raw"}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x
    return clean(result)


# ------------------------------------------------------------------------------------------ main

@torch.no_grad()
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for fusion_h100.json and fusion_h100.md")
    p.add_argument("--config", choices=["tiny", "sd15"], default="sd15")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", choices=["fp16", "fp32"], default="fp16")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--iters", type=int, default=60, help="timed calls per version and round (whole models)")
    p.add_argument("--layer-iters", type=int, default=200, help="timed calls per version and round (layers)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device, dtype = torch.device(args.device), {"fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here; expected a GPU (or pass --device cpu)")

    t0 = time.perf_counter()
    config = get_config(args.config)
    cnsd = to_device(build_cnsd(config, seed=0), device, dtype)
    print(f"built {args.config} in {time.perf_counter() - t0:.0f} s", flush=True)
    result = {"environment": environment(device), "args": vars(args),
              "command": "python tools/fusion_h100.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "models": [], "layers": []}

    # --- per attention layer
    feeds = {name: model_feed(config, name, args.batch, args.height, args.width, device, dtype) for name in MODELS}
    gen = torch.Generator().manual_seed(0)
    for info in pick_layers(cnsd, feeds["controlnet"]):
        layer, (b, n, c) = info["module"], info["x_shape"]
        holder = nn.ModuleDict({"attn": layer})                 # fuse_qkv swaps layers inside a model
        x = torch.randn(b, n, c, generator=gen).to(device, dtype)
        context = (None if info["context_shape"] is None
                   else torch.randn(*info["context_shape"], generator=gen).to(device, dtype))
        for backend in BACKENDS:
            set_attention_backend(layer, backend)
            for part in ("layer", "projection"):
                def run(part=part):
                    attn = holder["attn"]
                    return attn(x, context) if part == "layer" else attn.project(x, context)
                ref = run()
                timing = compare_versions(holder, run, device, args.warmup, args.layer_iters, args.rounds)
                fuse_qkv(holder)
                err = output_error(ref if part == "projection" else [ref], run() if part == "projection" else [run()])
                unfuse_qkv(holder)
                result["layers"].append({"path": info["path"], "kind": info["kind"], "tokens": n, "channels": c,
                                         "backend": backend, "part": part, **timing, "error": err})
                r = result["layers"][-1]
                print(f"{info['path']:<60} {backend:<5} {part:<10} unfused {_ms(r['unfused'])} fused "
                      f"{_ms(r['fused'])} x{r['speedup']:.3f} err {err['max_abs']:.1e}", flush=True)
        set_attention_backend(layer, "math")
    write_atomic(out / "fusion_h100.json", json.dumps(result, indent=1, default=str))

    # --- whole models
    for name in MODELS:
        run_model = cnsd.positional(name)
        feed = feeds[name]
        if name == "unet":                                        # the ControlNet's outputs as the controls
            set_attention_backend(cnsd, "math")
            feed = feed[:3] + list(cnsd.positional("controlnet")(*feeds["controlnet"]))
        for backend in BACKENDS:
            set_attention_backend(cnsd, backend)
            ref = run_model(*feed)
            timing = compare_versions(cnsd, lambda: run_model(*feed), device, args.warmup, args.iters, args.rounds)
            fuse_qkv(cnsd)
            set_attention_backend(cnsd, backend)
            err = output_error(ref, run_model(*feed))
            unfuse_qkv(cnsd)
            result["models"].append({"model": name, "backend": backend, **timing, "error": err})
            r = result["models"][-1]
            print(f"{name:<10} {backend:<5} unfused {_ms(r['unfused'])} fused {_ms(r['fused'])} "
                  f"x{r['speedup']:.3f} err {err['max_abs']:.1e} (max |out| {err['max_abs_ref']:.2f})", flush=True)
        write_atomic(out / "fusion_h100.json", json.dumps(result, indent=1, default=str))
    set_attention_backend(cnsd, "math")

    result["seconds"] = round(time.perf_counter() - t0, 1)
    write_atomic(out / "fusion_h100.json", json.dumps(result, indent=1, default=str))
    write_atomic(out / "fusion_h100_summary.json", json.dumps(strip_raw(result), indent=1, default=str))
    table = markdown(result)
    write_atomic(out / "fusion_h100.md", table)
    print(table)
    print(f"done in {result['seconds']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
