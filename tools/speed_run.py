"""The measuring core of tools/hopper_speed.py (issue 19): one run's budget, model forms, pipelines and rows.

A variant is measured as the issue asks: a fresh pipeline's first image (wall time: compile, warm-up),
2 untimed images (graph capture, first replay), then N images timed with CUDA events around process(),
cycling over the seeds; PSNR and max pixel difference against the fp32 image of the same seed; compile s =
first image - median. Each variant runs in try/except: a failure is its one-line error in the JSON.
"""
from __future__ import annotations

import time

T0 = time.perf_counter()          # before torch's import: the budget counts it

import gc  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from dataclasses import asdict, replace  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch._dynamo.utils  # noqa: E402

from course_lib import bench, files  # noqa: E402
from course_lib.cnsd.tokenizer import byte_level_tokenizer  # noqa: E402
from course_lib.pipeline.canny2image import Canny2Image  # noqa: E402
from course_lib.pipeline.eps import GraphedEps  # noqa: E402
from course_lib.pipeline.loopgraph import LoopGraphEps  # noqa: E402
from course_lib.pipeline.speedups import Switches, form_name, make_pipeline, model_for, with_reuse  # noqa: E402
from course_lib.samples import sample_photo  # noqa: E402
from course_lib.score import max_pixel_diff, psnr  # noqa: E402
from course_lib.speed_report import plot_speed, speed_markdown  # noqa: E402
from course_lib.timing import summarize, time_each  # noqa: E402

FULL_QUALITY_DB, TARGET_MS = 40.0, 60.0


def say(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f} s] {msg}", flush=True)


def one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".splitlines()[0][:300]


class Run:
    """What one run measures, its model forms and pipelines, and the budget."""

    def __init__(self, args):
        self.args, self.out, self.device = args, Path(args.out), torch.device(args.device)
        self.cuda, self.deadline = self.device.type == "cuda", T0 + args.budget_s
        self.size = tuple(int(v) for v in args.size.split("x"))                      # (H, W)
        self.photo, self.tok = sample_photo(size=self.size), byte_level_tokenizer()
        self.seeds, self.warmup = [int(s) for s in args.seeds.split(",")], 2 if self.cuda else 0
        self.models, self.pipes, self.images, self.reference = {}, {}, {}, {}     # pipes: build_key -> Canny2Image
        self.compile_s: list[float] = []
        self.current = "setup"
        settings = {"preset": args.preset, "device": args.device, "seeds": self.seeds, "iters": args.iters,
                    "warmup": self.warmup, "steps": 20, "size": list(self.size), "prompt": "a bird",
                    "budget_s": args.budget_s, "target_ms": TARGET_MS, "full_quality_db": FULL_QUALITY_DB,
                    "floor_ms": bench.floor_ms(bench.image_tflop(20)) if args.preset == "sd15" else None}
        self.data: dict = {"issue": 19, "command": "python " + " ".join(sys.argv), "settings": settings,
                           "environment": bench.environment_info(args.device), "variants": [], "profiles": {},
                           "skipped": [], "sections": []}
        if self.cuda:
            props = torch.cuda.get_device_properties(self.device)
            self.data["environment"].update(compute_capability=f"{props.major}.{props.minor}",
                                            sms=props.multi_processor_count, memory_gib=props.total_memory / 2**30)

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def fits(self, what: str, need_s: float) -> bool:
        if self.left() >= need_s:
            return True
        self.data["skipped"].append({"what": what, "reason": f"{self.left():.0f} s of the budget left, "
                                                             f"about {need_s:.0f} s needed"})
        say(f"skip {what}: {self.data['skipped'][-1]['reason']}")
        self.save()
        return False

    def save(self) -> None:
        self.data["wall_s"] = time.perf_counter() - T0
        files.write_json(self.out / "hopper_speed.json", self.data)
        try:                                              # a table or plot must never lose the JSON
            files.atomic_write_text(self.out / "hopper_speed.md", speed_markdown(self.data))
            plot_speed(self.data, self.out / "hopper_speed.png")
        except Exception as e:  # noqa: BLE001
            self.data["report_error"] = one_line(e)

    def process(self, pipe: Canny2Image, steps: int = 20):
        return lambda seed: pipe.process(self.photo, "a bird", image_resolution=min(self.size), ddim_steps=steps,
                                         seed=seed)[0]


# ------------------------------------------------------------------------------------------- variants
def measure(run: Run, s: Switches, pipe: Canny2Image, row: dict) -> None:
    process = run.process(pipe, s.steps or 20)
    if run.cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    first = process(run.seeds[0])
    row["first_image_ms"] = (time.perf_counter() - t) * 1e3
    say(f"  first image {row['first_image_ms']:.0f} ms")
    for i in range(run.warmup):                                            # capture, first replay
        process(run.seeds[i % len(run.seeds)])
    seeds = [run.seeds[i % len(run.seeds)] for i in range(run.args.iters)]
    samples, outs = time_each(process, seeds, run.cuda)
    images = dict(zip(seeds, outs))                                          # the last image of each seed
    row["total"], med = summarize(samples), float(np.median(samples))
    if s.compile and "reuses" not in row:
        row["compile_s"] = (row["first_image_ms"] - med) / 1e3
        run.compile_s.append(row["compile_s"])
    row["first_vs_timed_max_diff"] = max_pixel_diff(first, images[run.seeds[0]])
    row["per_seed"] = {seed: {"psnr": psnr(img, run.reference[seed]), "max_diff": max_pixel_diff(img, run.reference[seed])}
                       for seed, img in images.items()}
    row["psnr_vs_fp32"] = min(v["psnr"] for v in row["per_seed"].values())
    row["max_diff_vs_fp32"] = max(v["max_diff"] for v in row["per_seed"].values())
    row["reused_steps"] = getattr(pipe.eps, "reused", 0)
    graphs = [("step", getattr(pipe.eps, "graph", None)), ("loop", getattr(pipe.eps, "loop", None))]
    graphs += [(n, getattr(b, "graph", None)) for n, b in pipe.backends.items()]
    row["capture_failed"] = [f"{n}: {g.failed}" for n, g in graphs if g is not None and g.failed]
    if run.cuda:
        row["gpu_mem_gib"] = {"allocated": torch.cuda.memory_allocated() / 2**30,
                              "peak": torch.cuda.max_memory_allocated() / 2**30}
    row["dynamo_stats"] = {k: int(v) for k, v in torch._dynamo.utils.counters["stats"].items()}   # cumulative
    twin = replace(s, loop_graph=False, cuda_graph=True).name
    if s.loop_graph and twin in run.images:                                # the per-step graphed path's image
        diffs = [max_pixel_diff(img, run.images[twin][seed]) for seed, img in images.items()]
        row["twin"] = {"variant": twin, "identical": all(np.array_equal(img, run.images[twin][seed])
                                                        for seed, img in images.items()), "max_diff": max(diffs)}
    run.images[row["variant"]] = images
    say(f"  {row['variant']}: median {med:.1f} ms (p10 {row['total']['p10']:.1f}, p90 {row['total']['p90']:.1f}), "
        f"PSNR {row['psnr_vs_fp32']:.1f} dB, compile {row.get('compile_s') or 0:.0f} s")


def cpu_twin(s: Switches) -> Switches:
    """What of ``s`` a CPU runs: fp32, no CUDA graph, no compile, no fp8."""
    return replace(s, dtype="fp32", cuda_graph=False, compile=False, compile_max=False, loop_graph=False, fp8=False)


def loop_twin(s: Switches) -> Switches:
    return replace(s.build_key, loop_graph=False, cuda_graph=True)


def build(run: Run, s: Switches, row: dict) -> Canny2Image:
    """A built pipeline of the same build key; for loop-graph one over its per-step twin's backends and inner
    strategy (the compiled modules: no new compile); else make_pipeline on the variant's model form."""
    key = s.build_key
    if key not in run.pipes and s.loop_graph and loop_twin(s) in run.pipes:
        base = run.pipes[loop_twin(s)]
        inner = base.eps.inner if isinstance(base.eps, GraphedEps) else base.eps
        run.pipes[key] = Canny2Image(base.backends, base.tokenizer, base.config, device=base.device,
                                     eps=LoopGraphEps(inner), progress=False, time_stages=False)
        row["reuses"] = f"the compiled modules and backends of {loop_twin(s).name}"
    elif key not in run.pipes:
        run.pipes[key] = make_pipeline(model_for(s, run.models), run.tok, key, run.device)
    else:
        row["reuses"] = "the pipeline built before"
    return run.pipes[key]


def need_s(run: Run, s: Switches) -> float:
    """A variant's seconds, estimated high: compile (none when reused) + images at the fastest rate so far."""
    done = [r["total"]["median"] for r in run.data["variants"] if "total" in r and r["kind"] == "variant"]
    ref = [r["total"]["median"] for r in run.data["variants"] if "total" in r and r["kind"] == "reference"]
    per_image = (min(done) if done else 300.0 if run.cuda or not ref else ref[0]) / 1e3
    compiles = s.compile and s.build_key not in run.pipes and not (s.loop_graph and loop_twin(s) in run.pipes)
    compile_s = max(run.compile_s) * 1.15 + 10 if run.compile_s else 150.0 if run.args.preset == "sd15" else 40.0
    return (compile_s if compiles else 5.0) + (run.args.iters + 1 + run.warmup) * per_image * 1.5 + 10


def run_variant(run: Run, name: str, kind: str = "variant", base: Canny2Image | None = None,
                twin_of: str | None = None) -> dict | None:
    """Measure one variant; ``base``: on that built pipeline, with ``name``'s steps and eps reuse."""
    s = Switches.from_name(name)
    row: dict = {"variant": s.name, "kind": kind, "switches": asdict(s), "form": form_name(s)}
    row.update({"twin_of": twin_of} if twin_of else {})
    if s.needs_cuda and not run.cuda:
        run.data["variants"].append({**row, "skipped": "needs a CUDA GPU"})
        twin = cpu_twin(s)
        if not any(r["variant"] == twin.name for r in run.data["variants"]):
            return run_variant(run, twin.name, kind, base, twin_of=s.name)
        return None
    if not run.fits(s.name, need_s(run, s)):
        return None
    run.current = s.name
    say(f"--- {s.name} ({run.left():.0f} s left)")
    saved = base.eps if base is not None else None
    try:
        t = time.perf_counter()
        if base is not None:
            pipe, base.eps, row["reuses"] = base, with_reuse(saved, s.reuse_every), "the fastest full-quality pipeline"
        else:
            pipe = build(run, s, row)
        row["build_s"], row["eps"] = time.perf_counter() - t, repr(pipe.eps)
        measure(run, s, pipe, row)
    except Exception as e:  # noqa: BLE001 - a failed variant is recorded, the run goes on
        row.update(error=one_line(e), traceback=traceback.format_exc()[-2500:])
        say(f"  FAILED {row['error']}")
    finally:
        if base is not None:
            base.eps = saved
    run.data["variants"].append(row)
    run.save()
    return row if "total" in row else None


def fastest_full_quality(run: Run) -> dict | None:
    ok = [r for r in run.data["variants"] if "total" in r and r["kind"] == "variant"
          and r["psnr_vs_fp32"] >= FULL_QUALITY_DB]
    return min(ok, key=lambda r: r["total"]["median"]) if ok else None


def prune(run: Run, keep: list[str], upcoming: list[str]) -> None:
    """Free the pipelines not in ``keep`` and the model forms no kept pipeline or upcoming variant needs."""
    keep_keys = {Switches.from_name(n).build_key for n in keep}
    for key in [k for k in run.pipes if k not in keep_keys]:
        del run.pipes[key]
    needed = {form_name(k) for k in run.pipes}
    for form in (form_name(Switches.from_name(n)) for n in upcoming):
        needed |= {"-".join(form.split("-")[:i]) for i in range(1, form.count("-") + 2)}
    for form in [f for f in run.models if f not in needed and f != "fp32"]:
        del run.models[form]
    gc.collect()
    if run.cuda:
        torch.cuda.empty_cache()
