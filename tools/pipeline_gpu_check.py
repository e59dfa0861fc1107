"""GPU check of the one pipeline and the one CUDA-graph mechanism (issue 13): what a CPU machine can't run.

    python tools/pipeline_gpu_check.py --out DIR                 # on an H100: about 4-6 minutes
    python tools/pipeline_gpu_check.py --out DIR --skip-sd15     # the tiny checks and timings only

1. ``CudaGraph`` on a torch module: warm-up, capture, replay per input shape, the same values as eager,
   outputs in the graph's own buffers; ``GraphedBackend`` on CUDA.
2. The eps strategies on the tiny model on CUDA against the default pipeline (bit for bit, or at most
   one pixel level): GuidedEps, the DDIM loop by hand, batched, HintOnce, GraphedEps over each of
   them (against the same strategy eagerly, for two seeds: one capture serves every step and image),
   ReuseEps graphed, the ladder's graph variants against their eager twins; fp16 variants by PSNR.
3. TensorRT, where installed: ``Engine.infer(use_cuda_graph=True)``, TrtBackend graphs, GraphedEps over
   TensorRT backends against the eager TensorRT pipeline.
4. Timings of chapter 3's ladder (course_lib.bench.bench_pipeline): tiny at 256x384, then sd15 with
   random weights at 256x384 (the compile rung only with --compile), beside the committed H100 numbers
   of the old fast path (docs/bench/h100_ch3.json).
5. Last (it may leave CUDA unusable if torch mishandles it): a capture that fails warns once and runs
   eagerly with the same results.

Writes DIR/pipeline_gpu_check.json (rewritten after each section) and prints a table at the end.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from course_lib import bench, files  # noqa: E402
from course_lib.backends import GraphedBackend, TorchBackend, make_backends  # noqa: E402
from course_lib.cnsd import build_cnsd, contracts, example_inputs, get_config  # noqa: E402
from course_lib.cnsd.tokenizer import byte_level_tokenizer  # noqa: E402
from course_lib.cudagraph import CudaGraph  # noqa: E402
from course_lib.env import has_module  # noqa: E402
from course_lib.pipeline.canny2image import A_PROMPT, N_PROMPT, Canny2Image  # noqa: E402
from course_lib.pipeline.eps import GraphedEps, GuidedEps, HintOnce, ReuseEps  # noqa: E402
from course_lib.pipeline.hint import canny_hint, hwc3, resize_image  # noqa: E402
from course_lib.pipeline.sampler import (  # noqa: E402
    classifier_free_guidance, make_ddim_schedule, run_controlnet, run_unet, timestep_tensor,
)
from course_lib.pipeline.speedups import LADDER, Switches, make_pipeline, to_half  # noqa: E402
from course_lib.samples import sample_photo  # noqa: E402
from course_lib.score import max_pixel_diff, psnr  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
T0 = time.perf_counter()


def say(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f} s] {msg}", flush=True)


class Report:
    def __init__(self, out: Path):
        self.out, self.data = out, {"checks": [], "timings": {}, "environment": bench.environment_info("cuda")}

    def check(self, name: str, ok: bool | None, **detail) -> None:
        """ok None: information only (no pass/fail rule, e.g. fp16 PSNR with random weights)."""
        self.data["checks"].append({"check": name, "ok": ok, **detail})
        say(f"{'PASS' if ok else 'info' if ok is None else 'FAIL'}  {name}  {detail}")
        self.save()

    def save(self) -> None:
        self.data["wall_s"] = time.perf_counter() - T0
        files.write_json(self.out / "pipeline_gpu_check.json", self.data)


def compare(a: np.ndarray, b: np.ndarray) -> dict:
    return {"identical": bool(np.array_equal(a, b)), "max_diff": int(max_pixel_diff(a, b)), "psnr": psnr(a, b)}


# ------------------------------------------------------------------------------------------ 1. graphs
def check_graph_mechanism(r: Report) -> None:
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.SiLU(), torch.nn.Linear(128, 64)).cuda().eval()
    graph, actions, equal, close = CudaGraph(module, "mlp"), [], [], []
    with torch.inference_mode():
        for rows in (8, 8, 8, 8, 16, 16, 16, 8):
            x = torch.randn(rows, 64, device="cuda")
            out, want = graph(x), module(x)
            actions.append(graph.last_action)
            equal.append(bool(torch.equal(out, want)))
            close.append(bool(torch.allclose(out, want, atol=1e-5)))
        first = graph(torch.randn(8, 64, device="cuda"))
        second = graph(torch.randn(8, 64, device="cuda"))
    want = ["warm-up", "capture", "replay", "replay", "warm-up", "capture", "replay", "replay"]
    r.check("CudaGraph on a torch module: warm-up, capture, replay per shape", actions == want and all(close)
            and first is second and len(graph.graphs) == 2, actions=actions, bit_identical=all(equal))

    model = build_cnsd(get_config("tiny"), seed=0).cuda()
    table = contracts(model.config, height=64, width=64)
    plain = TorchBackend(model.positional("decoder"), table["decoder"])
    graphed = GraphedBackend(TorchBackend(model.positional("decoder"), table["decoder"]))
    outs, ok = [], True
    for seed in range(4):
        feed = {k: v.cuda() for k, v in example_inputs(table["decoder"], seed).items()}
        got, want = graphed.infer(feed)["images"], plain.infer(feed)["images"]
        ok &= bool(torch.allclose(got, want, atol=1e-4))
        outs.append(got)
    r.check("GraphedBackend (decoder) on CUDA: same outputs, kept copies", ok and not torch.equal(outs[0], outs[1])
            and graphed.graph.last_action == "replay" and graphed.graph.failed is None,
            last_action=graphed.graph.last_action)


# ------------------------------------------------------------------------------------ 2. strategies
def check_strategies(r: Report) -> None:
    model = build_cnsd(get_config("tiny"), seed=0).cuda()
    tok, photo = byte_level_tokenizer(), sample_photo(size=(128, 192))
    backends = make_backends("torch", model)

    def run(eps=None, seed=2946901, pipe_backends=None):
        pipe = Canny2Image(pipe_backends or backends, tok, model.config, device="cuda", eps=eps, progress=False,
                           time_stages=False)
        return pipe, pipe.process(photo, "a bird", image_resolution=128, ddim_steps=20, seed=seed)[0]

    _, default = run()
    _, explicit = run(GuidedEps("separate"))
    r.check("GuidedEps('separate') == the default pipeline", np.array_equal(explicit, default), **compare(explicit, default))

    b, scales = backends, [1.0] * 13
    with torch.inference_mode():
        _, hint = canny_hint(resize_image(hwc3(photo), 128), 100, 200)
        hint = hint.cuda()
        cond, uncond = (b["clip"].infer({"input_ids": tok([text]).cuda()})["last_hidden_state"]
                        for text in ("a bird, " + A_PROMPT, N_PROMPT))
        x = torch.randn((1, 4, 16, 24), generator=torch.Generator().manual_seed(2946901)).cuda()
        s = make_ddim_schedule(20)
        for i in reversed(range(20)):
            t = timestep_tensor(s.timesteps[i], 1, "cuda")
            eps_c = run_unet(b["unet"], x, t, cond, run_controlnet(b["controlnet"], x, t, cond, hint, scales))
            eps_u = run_unet(b["unet"], x, t, uncond, run_controlnet(b["controlnet"], x, t, uncond, hint, scales))
            eps = classifier_free_guidance(eps_c, eps_u, 9.0)
            pred_x0 = (x - s.sqrt_one_minus_alphas[i].cuda() * eps) / s.sqrt_alphas[i].cuda()
            x = s.sqrt_alphas_prev[i].cuda() * pred_x0 + s.dir_coefs[i].cuda() * eps
        by_hand = Canny2Image(backends, tok, model.config, device="cuda").decode(x)[0]
    r.check("the DDIM loop by hand (chapter 1's cell) == process() on CUDA", max_pixel_diff(by_hand, default) <= 1,
            **compare(by_hand, default))

    strategies = {"batched": lambda: GuidedEps("batched"), "hint-once separate": lambda: HintOnce(model, "separate"),
                  "hint-once batched": lambda: HintOnce(model, "batched")}
    eager = {}
    for name, make in strategies.items():
        _, eager[name] = run(make())
        r.check(f"{name} vs the default pipeline (<= 1 level)", max_pixel_diff(eager[name], default) <= 1,
                **compare(eager[name], default))
    eager["separate"] = default
    strategies["separate"] = lambda: GuidedEps("separate")
    for name, make in strategies.items():
        graphed = GraphedEps(make())
        images = []
        for seed in (2946901, 7):
            pipe, image = run(graphed, seed=seed)
            want = eager[name] if seed == 2946901 else run(make(), seed=seed)[1]
            images.append(compare(image, want))
        ok = all(c["max_diff"] <= 1 for c in images) and graphed.graph.failed is None and len(graphed.graph.graphs) == 1
        r.check(f"GraphedEps({name}) vs {name} eagerly, two seeds, one capture", ok, seeds=images,
                last_action=graphed.graph.last_action, failed=graphed.graph.failed)
    pipe, reused_graphed = run(ReuseEps(GraphedEps(GuidedEps("batched")), every=4))
    reused_count = pipe.eps.reused
    _, reused_eager = run(ReuseEps(GuidedEps("batched"), every=4))
    r.check("ReuseEps(GraphedEps(batched)) vs ReuseEps(batched) eagerly", max_pixel_diff(reused_graphed, reused_eager) <= 1
            and reused_count == 4, reused=reused_count, **compare(reused_graphed, reused_eager))

    fp16 = to_half(model)
    models = {"fp32": model, "fp16": fp16}
    pairs = [("fp32-batched-graph", "fp32-batched"), ("fp32-batched-graph-cache-text", "fp32-batched"),
             ("fp16-batched-graph", "fp16-batched"), ("fp16-batched-graph-sdpa", "fp16-batched-sdpa"),
             ("fp16-batched-graph-sdpa-hint-once", "fp16-batched-sdpa-hint-once")]
    for graphed_name, eager_name in pairs:
        got = []
        for name in (graphed_name, eager_name):
            pipe = make_pipeline(models[Switches.from_name(name).dtype], tok, name, "cuda")
            got.append([pipe.process(photo, "a bird", image_resolution=128, ddim_steps=20)[0] for _ in range(3)][-1])
        r.check(f"{graphed_name} vs {eager_name} (3rd image: CLIP and decoder replayed)", max_pixel_diff(*got) <= 1,
                **compare(*got))
    for name in ("fp16-separate", "fp16-batched-sdpa", "fp16-batched-graph-sdpa-hint-once"):
        image = make_pipeline(fp16, tok, name, "cuda").process(photo, "a bird", image_resolution=128, ddim_steps=20)[0]
        r.check(f"{name} vs the fp32 default (PSNR, random weights)", None, **compare(image, default))


# -------------------------------------------------------------------------------------- 3. TensorRT
def check_tensorrt(r: Report, out: Path) -> None:
    from course_lib.onnx.export_cnsd import export_cnsd
    from course_lib.trt.build import build_plans
    from course_lib.trt.engine import Engine

    model = build_cnsd(get_config("tiny"), seed=0).cuda()
    tok, photo = byte_level_tokenizer(), sample_photo(size=(64, 64))
    export_cnsd(model, out / "trt" / "onnx", height=64, width=64, progress=False)
    build_plans(out / "trt" / "onnx", out / "trt" / "plans", profile="static", batch=1, height=64, width=64,
                opt_level=3, workspace_gib=2, progress=False)
    engine = Engine(out / "trt" / "plans" / "unet.plan").load().activate()
    table = contracts(model.config, height=64, width=64)
    actions, ok = [], True
    for seed in range(4):
        feed = {k: v.cuda() for k, v in example_inputs(table["unet"], seed).items()}
        got = engine.infer(feed, use_cuda_graph=True)["latent"].clone()
        actions.append(engine.last_action)
        ok &= bool(torch.allclose(got, engine.infer(feed)["latent"], atol=1e-5))
    r.check("Engine.infer(use_cuda_graph=True): warm-up, capture, replay; values as eager",
            ok and actions == ["warm-up", "capture", "replay", "replay"], actions=actions)

    def pipe_image(use_cuda_graph, eps=None):
        backends = make_backends("trt", plan_dir=out / "trt" / "plans", use_cuda_graph=use_cuda_graph)
        pipe = Canny2Image(backends, tok, model.config, device="cuda", eps=eps, progress=False, time_stages=False)
        images = [pipe.process(photo, "a bird", image_resolution=64, ddim_steps=20)[0] for _ in range(2)]
        return pipe, images[-1]
    _, eager = pipe_image(False)
    _, engine_graphs = pipe_image(True)
    r.check("TensorRT pipeline, a graph per engine vs eager", max_pixel_diff(engine_graphs, eager) <= 1,
            **compare(engine_graphs, eager))
    pipe, step_graph = pipe_image(False, GraphedEps())
    r.check("TensorRT pipeline, GraphedEps (the whole step in one graph) vs eager",
            max_pixel_diff(step_graph, eager) <= 1 and pipe.eps.graph.failed is None,
            failed=pipe.eps.graph.failed, **compare(step_graph, eager))


# --------------------------------------------------------------------------------------- 4. timings
def ladder_timings(r: Report, config: str, variants, iters: int, stages: bool, budget_end: float) -> None:
    model = build_cnsd(get_config(config), seed=0).cuda()
    models, tok, photo = {"fp32": model}, byte_level_tokenizer(), sample_photo(size=(256, 384))
    rows, reference = [], None
    for name in variants:
        if time.perf_counter() > budget_end:
            rows.append({"variant": name, "skipped": "time budget"})
            continue
        say(f"{config} {name} ...")
        try:
            res = bench.bench_pipeline(name, models, tok, photo, device="cuda", iters=iters, warmup=2, steps=20,
                                       reference_image=reference, stages=stages, stage_iters=5)
            reference = res["_image"] if reference is None else reference
            say(f"{config} {name}: {res['total']['median']:.1f} ms, PSNR vs fp32 {res.get('psnr_vs_fp32')}")
        except Exception as e:  # noqa: BLE001 - record and go on
            res = {"variant": name, "error": repr(e), "traceback": traceback.format_exc()[-1500:]}
            say(f"{config} {name}: FAILED {e!r}")
        rows.append(res)
        r.data["timings"][config] = rows
        r.save()
    del models, model
    torch.cuda.empty_cache()


# ------------------------------------------------------------------------------- 5. failed capture
def check_failed_capture(r: Report) -> None:
    x = torch.arange(4.0, device="cuda")

    def syncs(t):                      # .item() synchronizes: not allowed while capturing
        return t * 2 + float(t.sum().item())
    graph = CudaGraph(syncs, "syncs")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [graph(x + k) for k in range(4)]
    same = all(torch.equal(o, syncs(x + k)) for k, o in enumerate(outs))
    failed = [str(w.message) for w in caught if "capture failed" in str(w.message)]
    r.check("a failed capture warns once, then eager with the same results", same and len(failed) == 1
            and graph.failed is not None, warnings=failed, failed=graph.failed)


def table(data: dict) -> str:
    lines = ["| check | result | detail |", "|---|---|---|"]
    for c in data["checks"]:
        detail = {k: v for k, v in c.items() if k not in ("check", "ok") and k != "seeds"}
        result = "PASS" if c["ok"] else "info" if c["ok"] is None else "FAIL"
        lines.append(f"| {c['check']} | {result} | {json.dumps(detail, default=str)[:120]} |")
    before = {}
    old = REPO / "docs" / "bench" / "h100_ch3.json"
    if old.is_file():
        before = {x["variant"]: x["total"]["median"] for x in json.loads(old.read_text())["results"] if "total" in x}
    lines += ["", "| variant | tiny ms | sd15 ms | sd15 before (old fast path, H100) | sd15 step ms | sd15 PSNR vs fp32 |",
              "|---|---|---|---|---|---|"]
    rows = {}
    for config in ("tiny", "sd15"):
        for x in data["timings"].get(config, []):
            rows.setdefault(x["variant"], {})[config] = x
    for name, by in rows.items():
        def ms(config):
            x = by.get(config, {})
            return f"{x['total']['median']:.1f}" if "total" in x else (x.get("skipped") or x.get("error", "-"))[:30]
        sd = by.get("sd15", {})
        step = sd.get("stages", {}).get("step", {}).get("median")
        lines.append(f"| {name} | {ms('tiny')} | {ms('sd15')} | {before.get(name, '-') if not before.get(name) else f'{before[name]:.1f}'} "
                     f"| {'-' if step is None else f'{step:.2f}'} | {sd.get('psnr_vs_fp32', '-')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for pipeline_gpu_check.json (and the TensorRT files)")
    p.add_argument("--skip-sd15", action="store_true", help="no sd15 timings")
    p.add_argument("--compile", action="store_true", help="also time the torch.compile rung (minutes on sd15)")
    p.add_argument("--budget-s", type=float, default=450, help="stop starting new timings after this many seconds")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU: nothing to check here")
        return 2
    out = Path(args.out)
    r = Report(out)
    say(f"environment: {r.data['environment']}")
    sections = [("graphs", lambda: check_graph_mechanism(r)), ("strategies", lambda: check_strategies(r))]
    if has_module("tensorrt"):
        sections.append(("tensorrt", lambda: check_tensorrt(r, out)))
    else:
        r.data["tensorrt"] = "not installed: skipped"
    end = T0 + args.budget_s
    ladder = [v for v in LADDER if args.compile or not Switches.from_name(v).compile]
    sections += [("timings tiny", lambda: ladder_timings(r, "tiny", ladder, 5, True, end - (0 if args.skip_sd15 else 200))),
                 ("timings sd15", lambda: None if args.skip_sd15 else ladder_timings(r, "sd15", ladder, 3, True, end)),
                 ("failed capture", lambda: check_failed_capture(r))]
    for name, section in sections:
        say(f"--- {name}")
        try:
            section()
        except Exception as e:  # noqa: BLE001 - a broken section must not lose the others
            r.check(f"section {name} ran", False, error=repr(e), traceback=traceback.format_exc()[-2000:])
    r.save()
    text = table(r.data)
    (out / "pipeline_gpu_check.md").write_text(text + "\n")
    print(text, flush=True)
    failed = [c["check"] for c in r.data["checks"] if c["ok"] is False]
    say(f"done: {len(failed)} failed" + (f": {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
