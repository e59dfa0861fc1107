"""The CNSD commands: env, demo, export (chapter 1), build, run, score (chapter 2), bench (chapter 3)."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from course_lib.cnsd.contract import MODEL_NAMES
from course_lib.cli.args import (bench_variant, check_device, ddim_steps, device, image_file, image_side, int_at_least,
                                 nonneg_int, out_folder, positive_int, seed_int)
from course_lib.cli.common import add_tensorrt_option, load_model, make_tokenizer, say, use_tensorrt


def cmd_env(args) -> int:
    from course_lib.env import detect

    say(detect().report())
    return 0


def cmd_export(args) -> int:
    from course_lib.onnx.export_cnsd import check_exports, export_cnsd
    from course_lib.onnx.folder import export_lock

    start = time.perf_counter()
    dynamic = [a for a in args.dynamic.split(",") if a] if args.dynamic else []
    with export_lock(args.out):                     # a second export is refused now, not after loading the model;
        model = load_model(args.config, args.checkpoint, args.seed)     # the parity check reads this run's files
        results = export_cnsd(model, args.out, batch=args.batch, height=args.height, width=args.width,
                              dynamic=dynamic, models=args.models)
        for result in results.values():
            say(f"wrote {result}")
        if args.no_check:
            return 0
        table = check_exports(model, args.out, batch=args.batch, height=args.height, width=args.width,
                              models=args.models)
    say(str(table))
    say(f"export finished in {time.perf_counter() - start:.0f} s")
    return 0 if table.passed else 1


def cmd_demo(args) -> int:
    """Chapter 1's whole story, offline: export, parity, canny2image on torch and ONNX Runtime -- on the trained
    toy (images that follow the hint's edges and the prompt's colours) or, with ``--model tiny``, on random
    tiny weights (structure only: the image is noise)."""
    from course_lib.toy.weights import TOY_WEIGHTS, weights_status

    if args.model == "toy" and not TOY_WEIGHTS.is_file():
        say(weights_status() + "; the demo runs tiny instead")
        args.model = "tiny"
    return (_demo_toy if args.model == "toy" else _demo_tiny)(args)


def _export_and_check(model, out: Path, height: int, width: int):
    from course_lib.onnx.export_cnsd import check_exports, export_cnsd

    say(f"exporting clip, controlnet, unet and decoder to ONNX in {out / 'onnx'} with torch.onnx.export "
        f"({height}x{width})")
    export_cnsd(model, out / "onnx", height=height, width=width, progress=False)
    say("parity check: each ONNX file on ONNX Runtime against PyTorch on the same inputs")
    table = check_exports(model, out / "onnx", height=height, width=width)
    say(str(table))
    return table


def _demo_toy(args) -> int:
    import numpy as np

    from course_lib.backends import make_backends
    from course_lib.pipeline.canny2image import Canny2Image
    from course_lib.samples import write_image
    from course_lib.score import max_pixel_diff
    from course_lib.toy.data import IMAGE_SIZE
    from course_lib.toy.evaluate import evaluate_pipeline, evaluation_table
    from course_lib.toy.make import plot_samples

    start, out = time.perf_counter(), Path(args.out)
    model = load_model("toy", None)
    tokenizer = make_tokenizer("toy", None)
    table = _export_and_check(model, out, IMAGE_SIZE, IMAGE_SIZE)
    rows, scores = {}, []
    for kind in ("torch", "ort"):
        say(f"canny2image on {'PyTorch' if kind == 'torch' else 'ONNX Runtime'}: {args.scenes} held-out shapes, "
            f"{args.steps} DDIM steps, CFG 9")
        pipe = Canny2Image(make_backends(kind, model, onnx_dir=out / "onnx"), tokenizer, model.config)
        rows[kind] = []
        scores.append(evaluate_pipeline(pipe, kind, n=args.scenes, ddim_steps=args.steps, keep_images=rows[kind],
                                        progress=not args.quiet))
    for kind in rows:                                       # the first scene alone, as the tiny demo writes it
        write_image(out / f"canny2image_{kind}.png", rows[kind][0][2])
    write_image(out / "canny_hint.png", rows["torch"][0][1])
    grid = plot_samples(rows, out / "canny2image.png", count=args.scenes)
    say(evaluation_table(scores))
    diff = max(max_pixel_diff(a[2], b[2]) for a, b in zip(rows["torch"], rows["ort"]))
    say(f"images torch vs ONNX Runtime: max pixel difference {diff} over {len(rows['torch'])} scenes")
    say(f"demo finished in {time.perf_counter() - start:.0f} s: {grid or out} (rows: input, hint, torch, ort)")
    finite = all(np.isfinite(r[2]).all() for r in rows["ort"])
    return 0 if table.passed and diff <= 2 and finite else 1


def _demo_tiny(args) -> int:
    import numpy as np

    from course_lib.backends import make_backends
    from course_lib.pipeline.canny2image import Canny2Image
    from course_lib.samples import sample_photo, write_image
    from course_lib.score import max_pixel_diff, psnr

    start, out = time.perf_counter(), Path(args.out)
    model = load_model("tiny", None, seed=0)
    tokenizer = make_tokenizer("tiny", None)
    photo = sample_photo(size=(args.height, args.width))
    table = _export_and_check(model, out, args.height, args.width)
    images = {}
    for kind in ("torch", "ort"):
        say(f"canny2image on {'PyTorch' if kind == 'torch' else 'ONNX Runtime'}: {args.steps} DDIM steps, "
            f"{args.height}x{args.width}")
        pipe = Canny2Image(make_backends(kind, model, onnx_dir=out / "onnx"), tokenizer, model.config,
                           progress=not args.quiet)
        images[kind] = pipe.process(photo, "a bird", image_resolution=min(args.height, args.width),
                                    ddim_steps=args.steps)[0]
        write_image(out / f"canny2image_{kind}.png", images[kind])
        say(f"{kind:5s}: {pipe.last_timings.total:.0f} ms -> {out / f'canny2image_{kind}.png'}")
    say(f"writing the Canny hint to {out / 'canny_hint.png'}")
    write_image(out / "canny_hint.png", pipe.last_edge_map)
    diff = max_pixel_diff(images["torch"], images["ort"])
    say(f"image torch vs ONNX Runtime: max pixel difference {diff}, PSNR {psnr(images['torch'], images['ort']):.1f} dB")
    say(f"demo finished in {time.perf_counter() - start:.0f} s (random tiny weights: the image is noise-like "
        "by design; the toy model follows the edges, sd15 with its checkpoint draws real pictures)")
    return 0 if table.passed and diff <= 2 and np.isfinite(images["ort"]).all() else 1


def cmd_run(args) -> int:
    from course_lib.backends import make_backends
    from course_lib.cnsd import get_config
    from course_lib.pipeline.canny2image import Canny2Image
    from course_lib.pipeline.speedups import Switches, eps_strategy
    from course_lib.samples import read_image, sample_photo, write_image

    photo = read_image(args.image) if args.image else sample_photo()      # bad input first, before any model
    check_device(args.device)
    eps = eps_strategy(Switches(guidance=args.guidance, cuda_graph=args.graph_step, reuse_every=args.reuse_eps))
    config = get_config(args.config)
    tokenizer = make_tokenizer(args.config, args.vocab)
    device = args.device or ("cuda" if args.backend == "trt" else "cpu")
    model = load_model(args.config, args.checkpoint, args.seed_weights).to(device) if args.backend == "torch" else None
    use_tensorrt(args)
    if args.backend == "ort" and args.onnx_dir and Path(args.onnx_dir).is_dir():
        from course_lib.onnx.folder import check_export_folder, export_lock

        with export_lock(args.onnx_dir, exclusive=False):             # no export writes while the models load
            check_export_folder(args.onnx_dir, MODEL_NAMES)
            backends = make_backends(args.backend, model, args.onnx_dir, args.plan_dir, args.cuda_graph)
    else:
        backends = make_backends(args.backend, model, args.onnx_dir, args.plan_dir, args.cuda_graph)
    pipe = Canny2Image(backends, tokenizer, config, device=device, eps=eps)
    image = pipe.process(photo, args.prompt, image_resolution=args.resolution, ddim_steps=args.steps, seed=args.seed)[0]
    write_image(args.out, image)
    say(f"{args.backend}: {pipe.last_timings.total:.0f} ms -> {args.out}")
    return 0


def cmd_build(args) -> int:
    from course_lib.trt.flavour import label, require_tensorrt

    from course_lib.onnx.folder import check_export_folder, export_lock

    check_export_folder(args.onnx_dir, MODEL_NAMES)                   # one export's models, not two mixed
    use_tensorrt(args)
    trt = require_tensorrt("building TensorRT plans")
    from course_lib.trt.build import build_plans

    say(f"building with {label(trt)}")
    with export_lock(args.onnx_dir, exclusive=False):                 # no export writes while plans are built
        check_export_folder(args.onnx_dir, MODEL_NAMES)               # (again: one may have finished meanwhile)
        plans = build_plans(args.onnx_dir, args.out, profile=args.profile, opt_level=args.opt_level,
                            timing_cache=args.timing_cache, batch=args.batch, height=args.height, width=args.width,
                            compute_capabilities=args.compute_capability or None, progress=False)
    for plan in plans:
        say(f"wrote {plan}")
    return 0


def cmd_bench(args) -> int:
    """Chapter 3: one pipeline variant on a random-weight preset; JSON under --out. A variant this machine
    cannot run (graph, compile on a CPU) is one error line before any work (run_bench checks first)."""
    import torch

    from course_lib.bench import run_bench, stage_table, variant_table
    from course_lib.pipeline.speedups import Switches, check_device as check_variant

    check_device(args.device)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    switches = Switches.from_name(args.variant)
    check_variant(switches, device)                                  # graph/compile on a CPU: one line, no work
    say(f"bench {args.variant} on {device} ({args.config}, {args.height}x{args.width}, {switches.steps or args.steps} "
        f"steps): " + ("" if args.variant == "fp32-separate" else "the fp32-separate reference image, then ")
        + f"warm-up and {args.iters} timed images" + ("" if args.no_stages else ", then each stage alone"))
    result = run_bench(args.config, args.variant, device=device, iters=args.iters, warmup=args.warmup,
                       height=args.height, width=args.width, steps=args.steps, seed=args.seed, out=args.out,
                       stages=not args.no_stages, progress=not args.quiet)
    say(variant_table([result]))
    if not args.no_stages:
        say(stage_table([result]))
    return 0


SCORE_DESCRIPTION = (
    "Score each image of IMAGES_DIR against the file of the same name in --reference: PSNR, the largest "
    "pixel difference, PD (the distance of InceptionV3 features; needs pytorch-fid and its weights on disk) "
    "and the course score, pd_factor(PD) x 7000 / latency in ms. Latencies come from IMAGES_DIR/latencies.json "
    "if it exists: one JSON object mapping an image's file name to the milliseconds it took, e.g. "
    '{"bird_0.png": 812.5, "bird_1.png": 790.0} (nothing writes it for you: put in the ms that run printed, '
    "or your own timings, warm-up excluded). An image without a latency or a PD has no score.")


def cmd_score(args) -> int:
    from course_lib.score import pd_unavailable, score_folder, score_table

    rows = score_folder(args.images, args.reference, with_pd=args.pd)
    note = None
    if all(r.pd is None for r in rows):
        note = "--no-pd was given" if args.pd is False else pd_unavailable()
    say(score_table(rows, pd_note=note))
    return 0


def add_commands(sub) -> None:
    """Register env, demo, export, build, run, bench and score with their handlers."""
    sub.add_parser("env", help="what this machine can run (GPU, CUDA, TensorRT, ORT) and which cells skip").set_defaults(func=cmd_env)

    d = sub.add_parser("demo", help="chapter 1 offline: export, parity, canny2image on torch and ORT (the trained toy)")
    d.add_argument("--model", choices=["toy", "tiny"], default="toy",
                   help="toy: trained weights shipped with course_lib, 64x64 shapes; tiny: random weights, structure only "
                        "(default: toy)")
    d.add_argument("--scenes", type=positive_int, default=8, help="toy: held-out shapes to draw (default 8)")
    d.add_argument("--out", default="demo_out", type=out_folder, help="folder for the ONNX files and images (default: demo_out)")
    d.add_argument("--height", type=image_side, default=128, help="tiny: image height (default 128: under a minute on 2 CPU cores)")
    d.add_argument("--width", type=image_side, default=192, help="tiny: image width (default 192; the course scores 256x384)")
    d.add_argument("--steps", type=ddim_steps, default=20, help="DDIM steps (default 20, as the course)")
    d.add_argument("--quiet", action="store_true", help="no progress bars")

    e = sub.add_parser("export", help="export the four CNSD models to ONNX and check them against torch")
    e.add_argument("--config", choices=["tiny", "toy", "sd15"], default="tiny",
                   help="preset: tiny (small widths, runs on a CPU), toy (the trained toy, 64x64) or sd15 "
                        "(the real model's sizes)")
    e.add_argument("--checkpoint", help="control_sd15_canny.pth or .safetensors (default: random weights)")
    e.add_argument("--out", required=True, type=out_folder, help="output folder")
    e.add_argument("--batch", type=positive_int, default=1, help="batch of the example inputs (static shapes)")
    e.add_argument("--height", type=image_side, default=256, help="image height, a multiple of 64")
    e.add_argument("--width", type=image_side, default=384, help="image width, a multiple of 64")
    e.add_argument("--dynamic", default="", help="dynamic axes, e.g. B or B,H,W (default: static shapes)")
    e.add_argument("--models", nargs="+", choices=MODEL_NAMES, help="export only these (default: all four)")
    e.add_argument("--seed", type=seed_int, default=0, help="seed of the random weights (no --checkpoint)")
    e.add_argument("--no-check", action="store_true", help="skip the ONNX Runtime parity check")

    b = sub.add_parser("build", help="build TensorRT plans from a folder of ONNX files (TensorRT for RTX: no GPU needed)")
    b.add_argument("--onnx-dir", required=True, help="the folder python -m course_lib export wrote")
    b.add_argument("--out", required=True, type=out_folder, help="folder for <name>.plan and their sidecars")
    b.add_argument("--profile", choices=["static", "dynamic"], default="static",
                   help="optimisation profile: the one shape given, or a range around it")
    b.add_argument("--opt-level", type=int, default=3, choices=range(6), metavar="0..5",
                   help="builder optimisation level: higher tries more tactics (slower build)")
    b.add_argument("--timing-cache", help="timing cache file to load and update (full TensorRT only)")
    b.add_argument("--batch", type=positive_int, default=1, help="batch the plans are built (static) or tuned (dynamic) for")
    b.add_argument("--height", type=image_side, default=256, help="image height (default 256, as the course)")
    b.add_argument("--width", type=image_side, default=384, help="image width (default 384, as the course)")
    b.add_argument("--compute-capability", action="append", metavar="CC",
                   help="TensorRT for RTX: a target such as 8.6 (repeatable; default 8.0, 8.6, 8.9, 12.0)")
    add_tensorrt_option(b)

    r = sub.add_parser("run", help="canny2image on torch, ONNX Runtime or TensorRT")
    r.add_argument("--backend", choices=["torch", "ort", "trt"], default="torch",
                   help="torch (needs nothing), ort (needs --onnx-dir) or trt (needs --plan-dir)")
    r.add_argument("--image", help="input photo (default: a sample photo shipped with matplotlib)")
    r.add_argument("--prompt", default="a bird", help="what to draw on the photo's edges")
    r.add_argument("--out", required=True, type=image_file, help="output image (.png)")
    r.add_argument("--config", choices=["tiny", "toy", "sd15"], default="tiny",
                   help="preset the models come from (toy: the trained weights shipped with course_lib)")
    r.add_argument("--checkpoint", help="weights for --backend torch (default: random, --seed-weights)")
    r.add_argument("--seed-weights", type=seed_int, default=0, help="seed of the random weights (--backend torch, no --checkpoint)")
    r.add_argument("--onnx-dir", help="folder with clip/controlnet/unet/decoder.onnx (required with --backend ort)")
    r.add_argument("--plan-dir", help="folder with clip/controlnet/unet/decoder.plan (required with --backend trt)")
    r.add_argument("--vocab", help="CLIP vocabulary (HF tokenizer folder or bpe_simple_vocab_16e6.txt.gz)")
    r.add_argument("--steps", type=ddim_steps, default=20, help="DDIM steps")
    r.add_argument("--resolution", type=int_at_least(64), default=256, help="the photo's shorter side is resized to this")
    r.add_argument("--seed", type=seed_int, default=2946901, help="seed of the initial noise (the course's)")
    r.add_argument("--guidance", choices=["separate", "batched"], default="separate",
                   help="cond and uncond as two calls of each model (the original) or one batch of 2")
    r.add_argument("--cuda-graph", action="store_true", help="replay a CUDA graph per engine (--backend trt)")
    r.add_argument("--graph-step", action="store_true",
                   help="replay each DDIM step from one CUDA graph (torch on cuda, or trt without --cuda-graph)")
    r.add_argument("--reuse-eps", type=nonneg_int, default=0, metavar="N",
                   help="reuse the previous step's eps on every N-th step (0: off; changes the image)")
    r.add_argument("--device", type=device, help="cpu or cuda (default: cuda for trt, else cpu)")
    add_tensorrt_option(r)

    n = sub.add_parser("bench", help="time one canny2image variant (chapter 3), e.g. fp16-batched-graph-sdpa")
    n.add_argument("--config", choices=["tiny", "sd15"], default="tiny", help="preset, with seeded random weights")
    n.add_argument("--variant", type=bench_variant, default="fp32-separate",
                   help="switches joined by '-': fp32|fp16, separate|batched (guidance), graph, sdpa, hint-once, "
                        "compile, reuse-epsN, stepsN, cache-text; graph and compile need a CUDA GPU")
    n.add_argument("--device", type=device, help="cpu or cuda (default: cuda when available)")
    n.add_argument("--iters", type=positive_int, default=5, help="timed images (the table gives their median)")
    n.add_argument("--warmup", type=nonneg_int, default=1, help="untimed images first (compiles, graph captures)")
    n.add_argument("--height", type=image_side, default=256, help="image height")
    n.add_argument("--width", type=image_side, default=384, help="image width")
    n.add_argument("--steps", type=ddim_steps, default=20, help="DDIM steps (a stepsN part of --variant overrides it)")
    n.add_argument("--seed", type=seed_int, default=2946901, help="seed of the initial noise")
    n.add_argument("--out", type=out_folder, help="folder for bench_<variant>.json")
    n.add_argument("--no-stages", action="store_true", help="time the whole pipeline only")
    n.add_argument("--quiet", action="store_true", help="no progress bars")

    s = sub.add_parser("score", help="PSNR, max pixel difference, PD and the course score of a folder of images",
                       description=SCORE_DESCRIPTION)
    s.add_argument("images", metavar="IMAGES_DIR", help="folder of the images to score (.png, .jpg, .jpeg, .bmp), "
                   "with an optional latencies.json")
    s.add_argument("--reference", required=True, metavar="DIR",
                   help="folder with the fp32 reference images, one per image of IMAGES_DIR, same file names")
    s.add_argument("--pd", action=argparse.BooleanOptionalAction, default=None,
                   help="compute PD with pytorch_fid (default: when installed)")
    for parser, func in ((d, cmd_demo), (e, cmd_export), (b, cmd_build), (r, cmd_run), (n, cmd_bench), (s, cmd_score)):
        parser.set_defaults(func=func)
