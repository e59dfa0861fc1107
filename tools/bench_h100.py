"""Chapter 3's GPU benchmark in one command: canny2image on sd15 sizes (random weights), every variant.

    python tools/bench_h100.py --out DIR                       # the H100 run (about 5 minutes)
    python tools/bench_h100.py --out DIR --config tiny --device cpu --iters 1 --height 64 --width 64 \
        --steps 2 --curve-steps 1 --reuse "" --variants fp32-separate,fp32-batched --skip-errors   # CPU smoke test

One process: build the model, measure the compute ceiling (a large fp16 matmul), compare each
sub-model in fp16 with fp32, then run the variants of course_lib.pipeline.speedups (whole pipeline with CUDA
events, warm-up, median and spread over N images; per-stage times; PSNR against the fp32 image),
torch.compile variants last and only if the time budget allows, then the fewer-steps and eps-reuse
curve on the last variant (reusing its pipeline: no new graph capture or compile). Writes, atomically:
DIR/bench.json (everything, raw samples included, rewritten after every variant), DIR/bench.md
(the tables), DIR/bench.png (latency bars) and DIR/curve.png (latency vs PSNR). A variant that fails
is recorded with its error and the run goes on.
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from course_lib import bench, files, timing  # noqa: E402
from course_lib.pipeline.speedups import LADDER, Switches, to_half  # noqa: E402



def matmul_tflops(device: str, n: int = 8192, iters: int = 10) -> float | None:
    """Measured dense fp16 rate: an n x n x n product on random data, median of ``iters`` (None on CPU)."""
    if device != "cuda":
        return None
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.float16) for _ in range(2))
    ms = timing.summarize(timing.time_cuda(lambda: a @ b, warmup=3, iters=iters))["median"]
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for bench.json, bench.md, bench.png, curve.png")
    p.add_argument("--config", choices=["tiny", "sd15"], default="sd15")
    p.add_argument("--device", default="cuda")
    p.add_argument("--iters", type=int, default=10, help="timed images per variant (the fp32 baseline: at most 3)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--variants", default=",".join(LADDER), help="comma-separated variant names (the first is the baseline)")
    p.add_argument("--curve-base", help="the variant the curve varies (default: the last of --variants)")
    p.add_argument("--curve-steps", default="15,10,8,5", help="DDIM step counts for the latency/quality curve")
    p.add_argument("--reuse", default="4,2", help="eps-reuse periods for the curve (reuse-epsN)")
    p.add_argument("--budget-s", type=float, default=540, help="the run's time budget in seconds")
    p.add_argument("--compile-min-s", type=float, default=220, help="start a compile variant only with this much budget left")
    p.add_argument("--skip-errors", action="store_true", help="skip the per-model fp16 errors (slow on a CPU)")
    args = p.parse_args(argv)
    out = Path(args.out)
    t_start = time.perf_counter()
    say = lambda msg: print(f"[{time.perf_counter() - t_start:6.1f} s] {msg}", flush=True)  # noqa: E731

    env = bench.environment_info(args.device)
    say(f"environment: {env}")
    run = {"command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
           "environment": env, "config": args.config, "height": args.height, "width": args.width,
           "steps": args.steps, "prompt": "a bird", "seed": 2946901, "weights": "random (build_cnsd seed 0)",
           "results": [], "curve": []}
    run["matmul_tflops"] = matmul_tflops(args.device)
    run["image_tflop"] = bench.image_tflop(args.steps)
    run["floor_ms"] = bench.floor_ms(run["image_tflop"])
    run["floor_ms_measured"] = bench.floor_ms(run["image_tflop"], run["matmul_tflops"]) if run["matmul_tflops"] else None
    say(f"fp16 matmul {run['matmul_tflops']} TFLOP/s; floor {run['floor_ms']:.2f} ms at 800 TFLOP/s")

    from course_lib.cnsd import build_cnsd, get_config
    from course_lib.cnsd.tokenizer import get_tokenizer
    from course_lib.samples import sample_photo

    model = build_cnsd(get_config(args.config), seed=0)
    models = {"fp32": model.to(args.device)}
    models["fp16"] = to_half(models["fp32"])
    tokenizer = get_tokenizer(allow_fallback=True)
    photo = sample_photo(size=(args.height, args.width))
    run["tokenizer"] = repr(tokenizer)
    say(f"built {args.config} fp32 + fp16 on {args.device}")

    run["model_errors"] = {}
    for attention in () if args.skip_errors else ("math", "sdpa"):
        from course_lib.cnsd.attention import set_attention_backend
        set_attention_backend(models["fp16"], attention)
        try:
            run["model_errors"][f"fp16-{attention}"] = bench.model_errors(models["fp32"], models["fp16"], args.height, args.width)
        except Exception as e:  # noqa: BLE001 - record and go on
            run["model_errors"][f"fp16-{attention}"] = {"error": repr(e)}
        set_attention_backend(models["fp16"], "math")
    say(f"per-model errors: {run['model_errors']}")

    def save():
        files.write_json(out / "bench.json", run)
        try:
            report(run, out, args.config)
        except Exception as e:  # noqa: BLE001 - a plotting problem must not stop the measurements
            say(f"report failed: {e!r}")

    def measure(name: str, reference, stages: bool = True, iters: int | None = None, pipes=None) -> dict:
        say(f"{name} ...")
        try:
            r = bench.bench_pipeline(name, models, tokenizer, photo, device=args.device, iters=iters or args.iters,
                                     warmup=args.warmup, steps=args.steps, reference_image=reference, stages=stages,
                                     pipes=pipes)
            if "total" in r:
                say(f"{name}: median {r['total']['median']:.1f} ms (p10-p90 {timing.spread(r['total'])}), "
                    f"first call {r['first_call_ms']:.0f} ms, PSNR {r.get('psnr_vs_fp32')}")
            else:
                say(f"{name}: skipped ({r['skipped']})")
        except Exception as e:  # noqa: BLE001 - one failing variant must not lose the run
            r = {"variant": name, "error": repr(e), "traceback": traceback.format_exc()[-2000:]}
            say(f"{name}: FAILED {e!r}")
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
        return r

    variants = [v for v in args.variants.split(",") if v]
    baseline = measure(variants[0], None, iters=min(args.iters, 3))
    reference = baseline.get("_image")
    run["results"].append(baseline)
    run["baseline"] = baseline["variant"]
    save()
    if reference is not None and args.device == "cuda":          # how far the TF32 default is from strict fp32
        from course_lib.pipeline.canny2image import Canny2Image
        from course_lib.score import psnr
        tf32, torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.allow_tf32, False
        strict = Canny2Image.from_torch(models["fp32"], tokenizer, device=args.device, progress=False).process(
            photo, "a bird", image_resolution=min(args.height, args.width), ddim_steps=args.steps)[0]
        torch.backends.cudnn.allow_tf32 = tf32
        baseline["psnr_vs_strict_fp32"] = psnr(reference, strict)
        say(f"baseline (cuDNN TF32 on, the default) vs strict fp32: PSNR {baseline['psnr_vs_strict_fp32']:.1f} dB")
    later = [v for v in variants[1:] if not Switches.from_name(v).compile]
    compiled = [v for v in variants[1:] if Switches.from_name(v).compile]
    curve_base = Switches.from_name(args.curve_base or variants[-1]).name
    curve_pipes: dict = {}                     # the curve reuses the curve base's pipeline: no new capture/compile
    for name in later + compiled:
        left = args.budget_s - (time.perf_counter() - t_start)
        if Switches.from_name(name).compile and left < args.compile_min_s:
            run["results"].append({"variant": name, "skipped": f"time budget: {left:.0f} s left of {args.budget_s:.0f}"})
            say(f"{name}: skipped, {left:.0f} s left")
            continue
        pipes = curve_pipes if Switches.from_name(name).name == curve_base else None
        run["results"].append(measure(name, reference, pipes=pipes))
        save()

    # the latency/quality curve: fewer steps and eps reuse on the curve base (by default the last variant)
    ran = [r for r in run["results"] if "total" in r]
    top = next((r for r in ran if r["variant"] == curve_base), ran[-1] if ran else None)
    if top is not None and top["variant"] != curve_base:
        say(f"curve base {curve_base} did not run: the curve uses {top['variant']}")
        curve_base = top["variant"]
    curve_ref = top["_image"] if top else None
    run["curve_base"], run["curve_base_result"] = curve_base, top and top["total"]
    names = [f"{curve_base}-steps{n}" for n in args.curve_steps.split(",") if n]
    names += [f"{curve_base}-reuse-eps{n}" for n in args.reuse.split(",") if n]
    for name in names if top else []:
        left = args.budget_s - (time.perf_counter() - t_start)
        if left < 30 or (not curve_pipes and Switches.from_name(name).compile and left < args.compile_min_s):
            run["curve"].append({"variant": name, "skipped": f"time budget: {left:.0f} s left"})
            continue
        r = measure(name, reference, stages=False, pipes=curve_pipes)
        if "total" in r and curve_ref is not None:
            from course_lib.score import psnr
            r["psnr_vs_20_steps"] = psnr(r["_image"], curve_ref)
        run["curve"].append(r)
        save()

    run["wall_s"] = time.perf_counter() - t_start
    save()
    print(report(run, out, args.config), flush=True)
    say("done")
    return 0 if any("total" in r for r in run["results"]) else 1


def report(run: dict, out: Path, config: str) -> str:
    """Write bench.md, bench.png and curve.png from ``run`` (all of it so far); returns the markdown."""
    env = run["environment"]
    floor = run["floor_ms"] if config == "sd15" else None
    ok = [r for r in run["results"] if "total" in r]
    if ok:
        bench.plot_latencies([r["variant"] for r in ok], [r["total"] for r in ok], out / "bench.png",
                             title=f"canny2image {config} {run['height']}x{run['width']}, {run['steps']} DDIM steps "
                                   f"({env.get('gpu', env['device'])})", floor=floor)
    top = run.get("curve_base_result")
    points = [{"label": f"{run['steps']} steps", "ms": top["median"], "psnr": float("inf")}] if top else []
    for r in run["curve"]:
        if "total" in r and "psnr_vs_20_steps" in r:
            s = r["switches"]
            label = f"{s['steps']} steps" if s["steps"] else f"reuse every {s['reuse_every']}"
            points.append({"label": label, "ms": r["total"]["median"], "psnr": r["psnr_vs_20_steps"]})
    if len(points) > 1:
        bench.plot_quality_curve(points, out / "curve.png", title=f"fewer steps / eps reuse ({run.get('curve_base')})")
    errors = {k: v for k, v in run.get("model_errors", {}).items() if "error" not in v}
    md = [f"Command: `{run['command']}`", "",
          f"Device: {env.get('gpu', env['device'])}, driver {env.get('driver')}, torch {env['torch']}, "
          f"CUDA {env['cuda']}, cuDNN {env['cudnn']}; measured fp16 matmul {run['matmul_tflops'] or 0:.0f} TFLOP/s; "
          f"floor {run['floor_ms']:.2f} ms ({run['image_tflop']:.2f} TFLOP at 800 TFLOP/s)", "",
          bench.variant_table(run["results"], baseline=run.get("baseline"), floor=floor), "",
          bench.stage_table(run["results"]), "",
          "Per-model error of the fp16 model against fp32 (relative L2, worst output):", "",
          timing.markdown_table(["model", *errors], [[m, *(e[m]["rel_l2"] for e in errors.values())]
                                                    for m in ("clip", "controlnet", "unet", "decoder")])
          if errors else "(not measured)", "",
          "Latency/quality curve (PSNR against the same variant at full steps, and against the fp32 image):", "",
          timing.markdown_table(["variant", "median ms", "p10-p90", "PSNR vs full steps", "PSNR vs fp32", "eps reused"],
                               [[r["variant"], r["total"]["median"], timing.spread(r["total"]), r.get("psnr_vs_20_steps"),
                                 r.get("psnr_vs_fp32"), r.get("reused_steps")] for r in run["curve"] if "total" in r])]
    text = "\n".join(md) + "\n"
    tmp = out / ".bench.md.tmp"
    tmp.write_text(text)
    tmp.replace(out / "bench.md")
    return text


if __name__ == "__main__":
    sys.exit(main())
