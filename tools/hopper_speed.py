"""Issue 19: canny2image faster on Hopper without TensorRT -- each switch's speed and image quality side by side
with the fp32 original, from one run.

    python tools/hopper_speed.py --out DIR                      # H100/H200, sd15 random weights, --budget-s 540
    python tools/hopper_speed.py --out /tmp/hs --preset tiny --device cpu --budget-s 120     # the CPU dry run
    python tools/hopper_speed.py --out DIR --ladder fp16-batched-graph-sdpa-hint-once-compile-max-cl-loop-graph
                                                                # another call: compile-max with the reference

Sections in priority order; what no longer fits the budget is recorded as skipped with the reason:
 1. the fp32 original (fp32-separate): the reference image of each seed, 3 timed images;
 2. the profile of one step of the fp16 batched path, eager (kernel count, ms per kernel class);
 3. the ladder's best (fp16-batched-graph-sdpa-hint-once-compile), then the profile of its compiled step;
 4. + cl, + loop-graph (on + cl's compiled modules: no new compile), + fp8, each on top of the one before;
 5. on the fastest full-quality path (PSNR >= 40 dB): steps10, steps8, reuse-eps4 ("other image" rows), its
    stages (CLIP, the DDIM loop, VAE; the rest is host work) and the profile of its compiled step;
 6. compile-max (mode max-autotune-no-cudagraphs), only if >= 240 s remain.
A variant: a fresh pipeline's first image (wall time: compile, warm-up), 2 untimed images (capture, first
replay), then --iters images timed with CUDA events around process(), cycling over the seeds; PSNR and max
pixel difference against the fp32 image of the same seed; compile s = first image - median. On the CPU a
CUDA-only variant is recorded as skipped and its CPU twin (fp32, no graph/compile/fp8) runs instead.
DIR/hopper_speed.json (raw samples), .md and .png are rewritten after every section; at the budget (+5 s)
a watchdog writes them and exits 3.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import threading
import time
import traceback
from dataclasses import asdict, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from speed_run import Run, cpu_twin, fastest_full_quality, one_line, prune, run_variant, say  # noqa: E402  (starts the clock)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from course_lib.cnsd import build_cnsd, get_config  # noqa: E402
from course_lib.pipeline.canny2image import A_PROMPT, N_PROMPT, Canny2Image, control_scales  # noqa: E402
from course_lib.pipeline.eps import Conditioning, GraphedEps  # noqa: E402
from course_lib.pipeline.hint import canny_hint, hwc3, resize_image  # noqa: E402
from course_lib.pipeline.sampler import ddim_sample, make_ddim_schedule  # noqa: E402
from course_lib.pipeline.speedups import HOPPER_LADDER, LADDER, Switches, make_pipeline, model_for  # noqa: E402
from course_lib.profiling import profile_kernels  # noqa: E402
from course_lib.score import psnr  # noqa: E402
from course_lib.timing import summarize, time_cpu, time_cuda, time_each  # noqa: E402

ORIGINAL, BEST, EAGER = "fp32-separate", LADDER[-1], "fp16-batched-sdpa-hint-once"
COMPILE_MAX = "fp16-batched-graph-sdpa-hint-once-compile-max-cl-loop-graph"
COMPILE_MAX_NEEDS_S, WATCHDOG_GRACE_S = 240.0, 5.0


# --------------------------------------------------------------------------------------- sections
def peaks(run: Run) -> None:
    """What the matrix units sustain on one 8192^3 product: fp16, and fp8 where supported."""
    if not run.cuda:
        return
    n, result = 8192, {}
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.float16) for _ in range(2))
    result["fp16_tflops"] = 2 * n ** 3 / summarize(time_cuda(lambda: a @ b, 3, 10))["median"] / 1e9
    if torch.cuda.get_device_capability() >= (8, 9):
        a8, b8, one = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).t().contiguous().t(), torch.ones((), device="cuda")
        fn = lambda: torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=torch.float16)  # noqa: E731
        result["fp8_tflops"] = 2 * n ** 3 / summarize(time_cuda(fn, 3, 10))["median"] / 1e9
    run.data["peaks"] = result
    say(f"peaks: {result}")


def reference(run: Run) -> None:
    run.models["fp32"] = model = build_cnsd(get_config(run.args.preset), seed=0).to(run.device)
    say(f"{run.args.preset} built on {run.device}; --- {ORIGINAL}")
    run.current = ORIGINAL
    process = run.process(make_pipeline(model, run.tok, ORIGINAL, run.device))
    row = {"variant": ORIGINAL, "kind": "reference", "switches": asdict(Switches()), "form": "fp32"}
    t = time.perf_counter()
    first = process(run.seeds[0])
    row["first_image_ms"] = (time.perf_counter() - t) * 1e3
    seeds = [run.seeds[i % len(run.seeds)] for i in range(max(3, len(run.seeds)))]
    samples, outs = time_each(process, seeds, run.cuda)
    run.reference = run.images[ORIGINAL] = dict(zip(seeds, outs))
    row.update(total=summarize(samples), repeatable=bool(np.array_equal(first, run.reference[run.seeds[0]])),
               psnr_vs_fp32=float("inf"), max_diff_vs_fp32=0)
    run.data["variants"].append(row)
    say(f"  {ORIGINAL}: median {row['total']['median']:.0f} ms, repeatable {row['repeatable']}")
    if run.cuda:                                           # the fp32 weights are not needed again on the GPU
        model_for(Switches(dtype="fp16"), run.models)
        del run.models["fp32"], model, process
        gc.collect()
        torch.cuda.empty_cache()


def conditioning(run: Run, pipe: Canny2Image) -> tuple[Conditioning, torch.Tensor]:
    """What process() gives the DDIM loop for the photo (contexts, canny hint) and a seeded x_T."""
    with torch.inference_mode():
        _, hint = canny_hint(resize_image(hwc3(run.photo), min(run.size)), 100, 200)
        cond, uncond = (pipe.encode_text([t]).clone() for t in ("a bird, " + A_PROMPT, N_PROMPT))
        c = Conditioning(cond, uncond, hint.to(run.device), tuple(control_scales()), 9.0)
    shape = (1, pipe.config.unet.in_channels, run.size[0] // 8, run.size[1] // 8)
    return c, torch.randn(shape, generator=torch.Generator().manual_seed(run.seeds[0])).to(run.device)


def profile(run: Run, label: str, pipe: Canny2Image) -> None:
    """Kernels of one DDIM step of ``pipe``'s strategy (not its graph: the step's own launches)."""
    if not run.fits(f"profile {label}", 15):
        return
    run.current = f"profile {label}"
    try:
        c, x = conditioning(run, pipe)
        inner = pipe.eps.inner if isinstance(pipe.eps, GraphedEps) else pipe.eps
        with torch.inference_mode():
            prepared = inner.prepare(pipe.backends, c)

        def step():
            with torch.inference_mode():
                return inner.step(pipe.backends, x, 951, prepared)
        result = profile_kernels(step, run.args.device, iters=3, warmup=2)
        run.data["profiles"][label] = {**result, "eps": repr(inner)}
        say(f"  profile {label}: {result['kernels']:.0f} kernels, {result['gpu_ms']:.2f} ms in kernels, "
            f"{result['wall_ms']:.2f} ms wall per step")
    except Exception as e:  # noqa: BLE001
        run.data["profiles"][label] = {"error": one_line(e), "traceback": traceback.format_exc()[-2000:]}
        say(f"  profile {label} FAILED {one_line(e)}")
    run.save()


def stages(run: Run, row: dict, pipe: Canny2Image) -> None:
    """CLIP, the 20-step loop as the variant runs it and the decoder, each timed alone; the rest is host work."""
    if not run.fits(f"stages of {row['variant']}", 20):
        return
    run.current = f"stages of {row['variant']}"
    try:
        c, x = conditioning(run, pipe)
        schedule = make_ddim_schedule(20)

        def loop():
            with torch.inference_mode():
                if pipe.eps.whole_loop:
                    return pipe.eps.sample(pipe.backends, c, schedule, x)
                return ddim_sample(pipe.eps.eps_fn(pipe.backends, c, schedule), x, schedule)
        latent = loop().clone()
        fns = {"CLIP (2 prompts)": lambda: [pipe.encode_text([t]) for t in ("a bird, " + A_PROMPT, N_PROMPT)],
               "DDIM loop (20 steps)": loop, "VAE decoder (+ copy to host)": lambda: pipe.decode(latent)}
        timer = time_cuda if run.cuda else time_cpu
        result = {name: summarize(timer(fn, 2, 10)) for name, fn in fns.items()}
        rest = row["total"]["median"] - sum(v["median"] for v in result.values())
        run.data["stages"] = {"variant": row["variant"], "whole": row["total"]["median"], "stages": result, "rest": rest}
        say("  stages: " + ", ".join(f"{k} {v['median']:.2f}" for k, v in result.items()) + f", rest {rest:.2f} ms")
    except Exception as e:  # noqa: BLE001
        run.data["stages"] = {"variant": row["variant"], "error": one_line(e)}
    run.save()


def profile_eager(run: Run) -> None:
    s = Switches.from_name(EAGER) if run.cuda else cpu_twin(Switches.from_name(EAGER))
    pipe = make_pipeline(model_for(s, run.models), run.tok, s, run.device)
    profile(run, "fp16 batched step, eager" if run.cuda else f"{s.name} step (cpu)", pipe)


def rung(run: Run, name: str, ladder: list[str]) -> None:
    row = run_variant(run, name)
    if row is not None and name == BEST and run.cuda:            # on the CPU the row is BEST's twin
        profile(run, "fp16 batched step, compiled", run.pipes[Switches.from_name(name).build_key])
    fastest = fastest_full_quality(run)
    prune(run, [name] + ([fastest["variant"]] if fastest else []), ladder[ladder.index(name) + 1:] + [COMPILE_MAX])


def fastest_extras(run: Run) -> None:
    row = fastest_full_quality(run)
    pipe = run.pipes.get(Switches.from_name(row["variant"]).build_key) if row else None
    if pipe is None:
        run.data["skipped"].append({"what": "other-image rows", "reason": "no full-quality pipeline to run them on"})
        return
    run.data["fastest"] = row["variant"]
    s = Switches.from_name(row["variant"])
    for extra in (replace(s, steps=10), replace(s, steps=8), replace(s, reuse_every=4)):
        other = run_variant(run, extra.name, kind="other image", base=pipe)
        if other is not None:
            mine = run.images[row["variant"]]
            other["psnr_vs_20_steps"] = min(psnr(run.images[extra.name][k], img) for k, img in mine.items())
            run.save()
    stages(run, row, pipe)
    if run.cuda and row["variant"] != BEST:
        profile(run, f"fastest step ({row['variant'].replace(BEST, 'best')}), compiled", pipe)
    prune(run, [], [COMPILE_MAX])


def compile_max(run: Run) -> None:
    if any(r["variant"] == COMPILE_MAX for r in run.data["variants"]):
        return                                         # --ladder had it
    if run.cuda and not run.fits(COMPILE_MAX, COMPILE_MAX_NEEDS_S):
        return
    run_variant(run, COMPILE_MAX)                   # on the CPU: recorded as skipped (its twin ran already)
    prune(run, [], [])


def cut_off(run: Run) -> None:
    run.data["cut_off"] = (f"stopped by the watchdog at the budget ({run.args.budget_s:.0f} s + {WATCHDOG_GRACE_S:.0f} s) "
                           f"in: {run.current}")
    say(run.data["cut_off"])
    try:
        run.save()
    finally:
        os._exit(3)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for hopper_speed.json/.md/.png")
    p.add_argument("--budget-s", type=float, default=540.0, help="seconds for the whole run (a watchdog stops it)")
    p.add_argument("--preset", default="sd15", choices=("sd15", "tiny"))
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: the dry run (CUDA-only variants skipped)")
    p.add_argument("--iters", type=int, default=None, help="timed images per variant (default 20 on CUDA, 3 on the CPU)")
    p.add_argument("--seeds", default="2946901,1234", help="comma-separated seeds, the same for every variant")
    p.add_argument("--size", default=None, help="photo HxW (default 256x384 on CUDA, 128x192 on the CPU)")
    p.add_argument("--ladder", default=",".join([BEST, *HOPPER_LADDER]),
                   help="the variants of section 3-4, in order (default: the best, + cl, + loop-graph, + fp8)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA GPU here (--device cpu is the dry run)")
        return 2
    try:
        [Switches.from_name(n) for n in args.ladder.split(",")]
    except ValueError as e:
        print(f"error: --ladder: {e}")
        return 2
    args.iters = args.iters or (20 if args.device == "cuda" else 3)
    args.size = args.size or ("256x384" if args.device == "cuda" else "128x192")
    run = Run(args)
    run.out.mkdir(parents=True, exist_ok=True)
    watchdog = threading.Timer(max(run.left(), 1.0) + WATCHDOG_GRACE_S, cut_off, (run,))
    watchdog.daemon = True
    watchdog.start()
    try:
        run_sections(run)
    finally:
        watchdog.cancel()
    run.current = "done"
    run.save()
    print((run.out / "hopper_speed.md").read_text(), flush=True)
    say("done")
    return 0


def run_sections(run: Run) -> None:
    import torch._dynamo

    for knob in ("recompile_limit", "cache_size_limit"):     # each compiled variant adds entries for the same
        if hasattr(torch._dynamo.config, knob):               # forward(): never let dynamo fall back to eager
            setattr(torch._dynamo.config, knob, 64)
    run.data["environment"]["dynamo_recompile_limit"] = 64
    say(f"environment: {run.data['environment']}")
    ladder = [Switches.from_name(n).name for n in run.args.ladder.split(",")]
    sections = [("peaks", lambda: peaks(run)), ("reference", lambda: reference(run)), ("profile eager", lambda: profile_eager(run))]
    sections += [(name, lambda name=name: rung(run, name, ladder)) for name in ladder]
    sections += [("fastest: other images, stages, profile", lambda: fastest_extras(run)), ("compile-max", lambda: compile_max(run))]
    for name, section in sections:
        say(f"=== {name}")
        t = time.perf_counter()
        try:
            section()
            run.data["sections"].append({"section": name, "s": time.perf_counter() - t})
        except Exception as e:  # noqa: BLE001 - a broken section must not lose the others
            run.data["sections"].append({"section": name, "error": one_line(e), "traceback": traceback.format_exc()[-2500:]})
            say(f"section {name} FAILED: {one_line(e)}")
            if name == "reference":
                break                                  # nothing to compare with
        run.save()

if __name__ == "__main__":
    sys.exit(main())
