"""``python -m course_lib <command>``: the course's scripts in one place.

Chapter 1: ``env``, ``demo``, ``export``. Chapter 2: ``build``, ``run``, ``score``. Later chapters add
``bench`` (3) and ``yolo`` (6). Bad input prints one line (``error: ...``) and exits with code 2.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .env import MissingDependency
from .safezip import ZipLimits

EXIT_USAGE = 2


# ----------------------------------------------------------------------------------- shared helpers
def _say(msg: str) -> None:
    print(msg, flush=True)


def _model(config: str, checkpoint: str | None, seed: int = 0):
    """The CNSD model of a preset: the checkpoint's weights if given, else seeded random weights."""
    from .cnsd import build_cnsd, get_config
    from .cnsd.checkpoint import load_checkpoint

    cfg = get_config(config)
    _say(f"building CNSD ({config})" + (f" and loading {checkpoint}" if checkpoint else f", random weights (seed {seed})"))
    model = build_cnsd(cfg, seed=seed)
    if checkpoint:
        _say(str(load_checkpoint(checkpoint, model)))
    return model


def _tokenizer(config: str, vocab: str | None):
    """The tiny preset runs offline on the byte-level tokenizer; sd15 needs CLIP's real vocabulary."""
    from .cnsd.tokenizer import byte_level_tokenizer, get_tokenizer

    if vocab is None and config == "tiny":
        return byte_level_tokenizer()
    return get_tokenizer(vocab)


# ------------------------------------------------------------------------------------------ commands
def cmd_env(args) -> int:
    from .env import detect

    _say(detect().report())
    return 0


def cmd_export(args) -> int:
    from .cnsd.export import check_exports, export_cnsd

    start = time.perf_counter()
    model = _model(args.config, args.checkpoint, args.seed)
    dynamic = [a for a in args.dynamic.split(",") if a] if args.dynamic else []
    results = export_cnsd(model, args.out, batch=args.batch, height=args.height, width=args.width,
                          dynamic=dynamic, models=args.models)
    for result in results.values():
        _say(f"wrote {result}")
    if args.no_check:
        return 0
    table = check_exports(model, args.out, batch=args.batch, height=args.height, width=args.width,
                          models=args.models)
    _say(str(table))
    _say(f"export finished in {time.perf_counter() - start:.0f} s")
    return 0 if table.passed else 1


def cmd_demo(args) -> int:
    """Chapter 1's whole story on the tiny model, offline: export, parity, canny2image on torch and ORT."""
    import numpy as np

    from .backends import make_backends
    from .cnsd.export import check_exports, export_cnsd
    from .cnsd.pipeline import Canny2Image
    from .samples import sample_photo, write_image
    from .score import max_pixel_diff, psnr

    start = time.perf_counter()
    out = Path(args.out)
    model = _model("tiny", None, seed=0)
    tokenizer = _tokenizer("tiny", None)
    photo = sample_photo(size=(args.height, args.width))
    export_cnsd(model, out / "onnx", height=args.height, width=args.width, progress=False)
    table = check_exports(model, out / "onnx", height=args.height, width=args.width)
    images = {}
    for kind in ("torch", "ort"):
        pipe = Canny2Image(make_backends(kind, model, onnx_dir=out / "onnx"), tokenizer, model.config,
                           progress=not args.quiet)
        images[kind] = pipe.process(photo, "a bird", image_resolution=min(args.height, args.width),
                                    ddim_steps=args.steps)[0]
        write_image(out / f"canny2image_{kind}.png", images[kind])
        _say(f"{kind:5s}: {pipe.last_timings.total:.0f} ms -> {out / f'canny2image_{kind}.png'}")
    write_image(out / "canny_hint.png", pipe.last_edge_map)
    _say(str(table))
    diff = max_pixel_diff(images["torch"], images["ort"])
    _say(f"image torch vs ONNX Runtime: max pixel difference {diff}, PSNR {psnr(images['torch'], images['ort']):.1f} dB")
    _say(f"demo finished in {time.perf_counter() - start:.0f} s (random tiny weights: the image is noise-like "
         "by design; load the sd15 checkpoint for real pictures)")
    return 0 if table.passed and diff <= 2 and np.isfinite(images["ort"]).all() else 1


def cmd_run(args) -> int:
    from .backends import make_backends
    from .cnsd import get_config
    from .cnsd.pipeline import Canny2Image
    from .samples import read_image, sample_photo, write_image

    photo = read_image(args.image) if args.image else sample_photo()      # bad input first, before any model
    config = get_config(args.config)
    tokenizer = _tokenizer(args.config, args.vocab)
    device = args.device or ("cuda" if args.backend == "trt" else "cpu")
    model = _model(args.config, args.checkpoint, args.seed_weights).to(device) if args.backend == "torch" else None
    backends = make_backends(args.backend, model, args.onnx_dir, args.plan_dir, args.cuda_graph)
    pipe = Canny2Image(backends, tokenizer, config, device=device, cfg=args.cfg)
    image = pipe.process(photo, args.prompt, image_resolution=args.resolution, ddim_steps=args.steps, seed=args.seed)[0]
    write_image(args.out, image)
    _say(f"{args.backend}: {pipe.last_timings.total:.0f} ms -> {args.out}")
    return 0


def cmd_build(args) -> int:
    from .trt import require_tensorrt

    require_tensorrt("building TensorRT plans")
    from .trt.build import build_plans

    plans = build_plans(args.onnx_dir, args.out, profile=args.profile, opt_level=args.opt_level,
                        timing_cache=args.timing_cache)
    for plan in plans:
        _say(f"wrote {plan}")
    return 0


def cmd_bench(args) -> int:
    """Chapter 3: one pipeline variant on a random-weight preset; JSON under --out."""
    from .bench import run_bench, stage_table, variant_table

    result = run_bench(args.config, args.variant, device=args.device, iters=args.iters, warmup=args.warmup,
                       height=args.height, width=args.width, steps=args.steps, seed=args.seed, out=args.out,
                       stages=not args.no_stages)
    _say(variant_table([result]))
    if not args.no_stages:
        _say(stage_table([result]))
    return 0


def _yolo_model(args):
    from .yolov5 import YOLOv5, load_yolov5_weights, yolov5_preset

    model = YOLOv5(yolov5_preset(args.size, args.nc, args.img_size), seed=0)
    if args.weights:
        load_yolov5_weights(model, args.weights)
    else:
        _say(f"yolov5{args.size}, nc={args.nc}: random weights (boxes mean nothing; pass --weights for a trained model)")
    return model.fuse_conv_bn().eval()


def _yolo_runner(args):
    """output0 for an ``images`` tensor from --plan (TensorRT), --onnx (ONNX Runtime) or the torch model."""
    if args.plan:
        from .backends import TrtBackend

        engine = TrtBackend(args.plan)
        return "tensorrt", lambda images: engine.infer({"images": images})["output0"].cpu().numpy()
    if args.onnx:
        from .compare import ort_session, run_ort

        session = ort_session(args.onnx)
        return "onnxruntime", lambda images: run_ort(session, {"images": images})["output0"]
    model = _yolo_model(args)
    return "torch", lambda images: model(images).detach().numpy()


def cmd_yolo(args) -> int:
    """Chapter 6: the course's export / onnx2trt / trt_yolov5 / check scripts in one command."""
    import torch

    from .yolov5 import PostProcessor, PreProcessor, check_outputs, draw_boxes

    if args.yolo_command == "export":
        from .onnx_export import export_onnx

        model = _yolo_model(args)
        images = torch.rand(1, 3, args.img_size, args.img_size, generator=torch.Generator().manual_seed(0))
        axes = {"images": {0: "B"}, "output0": {0: "B"}} if args.dynamic_batch else None
        result = export_onnx(model, {"images": images}, args.out, output_names=["output0"], dynamic_axes=axes)
        _say(f"wrote {result}")
        return 0
    if args.yolo_command == "build":
        from .trt import require_tensorrt

        require_tensorrt("building the YOLOv5 engine")
        from .trt.build import build_engine_plan
        from .trt.profiles import onnx_input_dims, shapes_at, static_profile

        onnx_path = Path(args.onnx)
        if args.fp16:
            from .precision import to_fp16_onnx

            onnx_path = to_fp16_onnx(onnx_path, Path(args.out).with_suffix(".fp16.onnx")).path
        dims = onnx_input_dims(onnx_path)
        profile = static_profile(shapes_at(dims, batch=args.batch, height=args.img_size, width=args.img_size), dims)
        build_engine_plan(onnx_path, args.out, profile, opt_level=args.opt_level)
        _say(f"wrote {args.out}")
        return 0
    from .samples import read_image, sample_photo, write_image

    rgb = read_image(args.image) if args.image else sample_photo(size=None)
    images, box = PreProcessor(args.img_size, channel_order="rgb")(rgb)
    post = PostProcessor(conf_threshold=args.conf, iou_threshold=args.iou)
    if args.yolo_command == "detect":
        name, run = _yolo_runner(args)
        with torch.inference_mode():
            detections = post(run(images), box)
        _say(f"{name}: {len(detections)} boxes at conf > {args.conf}")
        for row in detections.rows():
            _say(row)
        if args.out:
            write_image(args.out, draw_boxes(rgb, detections))
            _say(f"wrote {args.out}")
        return 0
    # check: ONNX Runtime against TensorRT where a plan is given, else against torch
    if not args.onnx:
        raise ValueError("yolo check needs --onnx PATH (and --plan PATH to check TensorRT against it)")
    from .compare import run_ort

    reference = run_ort(args.onnx, {"images": images})["output0"]
    if args.plan:
        _, run = _yolo_runner(args)
        candidate = run(images)
    else:
        with torch.inference_mode():
            candidate = _yolo_model(args)(images).numpy()
    result = check_outputs(reference, candidate, postprocessor=post)
    _say(str(result))
    return 0 if result.passed else 1


def cmd_submit(args) -> int:
    """Homework: run the homework's checks here and write one zip of evidence."""
    from .submit import check_seed, collect, sanitize_student_id, submit

    if args.checkpoint and args.config != "sd15":
        raise ValueError("--checkpoint: the tiny preset's reference is rebuilt from --seed; "
                         "a checkpoint goes with --config sd15")
    if args.config == "sd15" and not args.checkpoint and args.hw != "2":
        raise ValueError(f"--config sd15: homework {args.hw}'s tests compare your files with the real model; "
                         "give --checkpoint control_sd15_canny.pth (or .safetensors)")
    limits = _zip_limits(args)
    sanitize_student_id(args.student)              # the cheap checks first: sd15 takes minutes and GBs to load
    check_seed(args.seed)
    if args.out is not None and Path(args.out).suffix != ".zip":
        raise ValueError(f"--out {args.out}: expected a file name ending in .zip")
    collect(args.hw, args.work)
    reference = None
    if args.checkpoint and args.hw != "2":         # homework 2's tests need no reference
        if not Path(args.checkpoint).is_file():
            raise FileNotFoundError(f"--checkpoint {args.checkpoint}: no such file "
                                    "(expected control_sd15_canny.pth or .safetensors)")
        import torch                               # the real model, on the GPU where there is one (TF32 off there)
        reference = _model("sd15", args.checkpoint).to("cuda" if torch.cuda.is_available() else "cpu")
    result = submit(args.hw, args.student, args.seed, work=args.work, out=args.out, config=args.config,
                    reference=reference, limits=limits, progress=not args.quiet)
    _say(str(result))
    return 0 if result.passed else 1


def _zip_limits(args) -> ZipLimits:
    """submit / grade --max-members, --max-file-mb, --max-total-mb: the zip's size limits (each > 0)."""
    for name, value in (("--max-members", args.max_members), ("--max-file-mb", args.max_file_mb),
                        ("--max-total-mb", args.max_total_mb)):
        if not value > 0:
            raise ValueError(f"{name} {value:g}: expected a number > 0")
    return ZipLimits(args.max_members, args.max_file_mb, args.max_total_mb)


def _read_points(path: str | None) -> dict | None:
    """grade --points: a JSON object {test name: points}; checked against the tests by grade_folder."""
    if path is None:
        return None
    try:
        points = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise ValueError(f"--points {path}: {(e.strerror or str(e)).lower()}; expected a JSON file like "
                         '{"onnx_parity_unet": 4}') from None
    except UnicodeDecodeError:
        raise ValueError(f"--points {path}: not UTF-8 text; expected a JSON file like "
                         '{"onnx_parity_unet": 4}') from None
    except json.JSONDecodeError as e:
        raise ValueError(f"--points {path}: not JSON ({e.msg} at line {e.lineno}); "
                         'expected an object like {"onnx_parity_unet": 4}') from None
    if not isinstance(points, dict):
        raise ValueError(f'--points {path}: expected a JSON object like {{"onnx_parity_unet": 4}}, '
                         f"got {type(points).__name__}")
    return points


def cmd_grade(args) -> int:
    """Homework: grade a folder of submission zips on a CPU machine."""
    from .grade import grade_folder, read_roster, summary_row

    limits = _zip_limits(args)
    roster = read_roster(args.roster) if args.roster else None
    results = grade_folder(args.submissions, args.out, roster=roster, salt=args.salt, require_gpu=args.require_gpu,
                           points=_read_points(args.points), limits=limits, keep=args.keep,
                           progress=not args.quiet)
    for row in map(summary_row, results):
        _say(f"{row['student'] or row['zip']:<20} hw {row['homework']}: {row['score']:g} / {row['max_score']:g}"
             f" ({row['status']})")
    _say(f"wrote {Path(args.out) / 'summary.csv'}")
    return 0


def cmd_score(args) -> int:
    from .score import score_folder, score_table

    _say(score_table(score_folder(args.images, args.reference, with_pd=args.pd)))
    return 0


# -------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m course_lib", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("env", help="what this machine can run (GPU, CUDA, TensorRT, ORT) and which cells skip")

    d = sub.add_parser("demo", help="chapter 1 on the tiny model, offline: export, parity, canny2image on torch and ORT")
    d.add_argument("--out", default="demo_out", help="folder for the ONNX files and images (default: demo_out)")
    d.add_argument("--height", type=int, default=128, help="image height (default 128: under a minute on 2 CPU cores)")
    d.add_argument("--width", type=int, default=192, help="image width (default 192; the course scores 256x384)")
    d.add_argument("--steps", type=int, default=20, help="DDIM steps (default 20, as the course)")
    d.add_argument("--quiet", action="store_true", help="no progress bars")

    e = sub.add_parser("export", help="export the four CNSD models to ONNX and check them against torch")
    e.add_argument("--config", choices=["tiny", "sd15"], default="tiny")
    e.add_argument("--checkpoint", help="control_sd15_canny.pth or .safetensors (default: random weights)")
    e.add_argument("--out", required=True, help="output folder")
    e.add_argument("--batch", type=int, default=1)
    e.add_argument("--height", type=int, default=256)
    e.add_argument("--width", type=int, default=384)
    e.add_argument("--dynamic", default="", help="dynamic axes, e.g. B or B,H,W (default: static shapes)")
    e.add_argument("--models", nargs="+", choices=["clip", "controlnet", "unet", "decoder"])
    e.add_argument("--seed", type=int, default=0, help="seed of the random weights (no --checkpoint)")
    e.add_argument("--no-check", action="store_true", help="skip the ONNX Runtime parity check")

    b = sub.add_parser("build", help="build TensorRT plans from a folder of ONNX files (needs TensorRT)")
    b.add_argument("--onnx-dir", required=True)
    b.add_argument("--out", required=True)
    b.add_argument("--profile", choices=["static", "dynamic"], default="static")
    b.add_argument("--opt-level", type=int, default=3, choices=range(6), metavar="0..5")
    b.add_argument("--timing-cache", help="timing cache file to load and update")

    r = sub.add_parser("run", help="canny2image on torch, ONNX Runtime or TensorRT")
    r.add_argument("--backend", choices=["torch", "ort", "trt"], default="torch")
    r.add_argument("--image", help="input photo (default: a sample photo shipped with matplotlib)")
    r.add_argument("--prompt", default="a bird")
    r.add_argument("--out", required=True, help="output image (.png)")
    r.add_argument("--config", choices=["tiny", "sd15"], default="tiny")
    r.add_argument("--checkpoint", help="weights for --backend torch (default: random, --seed-weights)")
    r.add_argument("--seed-weights", type=int, default=0)
    r.add_argument("--onnx-dir", help="folder with clip/controlnet/unet/decoder.onnx (--backend ort)")
    r.add_argument("--plan-dir", help="folder with clip/controlnet/unet/decoder.plan (--backend trt)")
    r.add_argument("--vocab", help="CLIP vocabulary (HF tokenizer folder or bpe_simple_vocab_16e6.txt.gz)")
    r.add_argument("--steps", type=int, default=20)
    r.add_argument("--resolution", type=int, default=256)
    r.add_argument("--seed", type=int, default=2946901)
    r.add_argument("--cfg", choices=["separate", "batched"], default="separate")
    r.add_argument("--cuda-graph", action="store_true", help="replay CUDA graphs (--backend trt)")
    r.add_argument("--device", help="cpu or cuda (default: cuda for trt, else cpu)")

    n = sub.add_parser("bench", help="time one canny2image variant (chapter 3), e.g. fp16-batched-graph-sdpa")
    n.add_argument("--config", choices=["tiny", "sd15"], default="tiny")
    n.add_argument("--variant", default="fp32-separate",
                   help="switches joined by '-': fp32|fp16, separate|batched, graph, sdpa, hint-once, compile, "
                        "reuse-epsN, stepsN, cache-text")
    n.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    n.add_argument("--iters", type=int, default=5)
    n.add_argument("--warmup", type=int, default=1)
    n.add_argument("--height", type=int, default=256)
    n.add_argument("--width", type=int, default=384)
    n.add_argument("--steps", type=int, default=20)
    n.add_argument("--seed", type=int, default=2946901)
    n.add_argument("--out", help="folder for bench_<variant>.json")
    n.add_argument("--no-stages", action="store_true", help="time the whole pipeline only")

    y = sub.add_parser("yolo", help="chapter 6: YOLOv5 export | build | detect | check")
    ysub = y.add_subparsers(dest="yolo_command", required=True)
    for name, text in (("export", "export the detector to ONNX (images -> output0)"),
                       ("build", "build a TensorRT plan from the ONNX (needs TensorRT)"),
                       ("detect", "detect on a photo with torch, ONNX Runtime (--onnx) or TensorRT (--plan)"),
                       ("check", "compare ONNX Runtime with TensorRT (--plan) or torch: raw outputs and detections")):
        c = ysub.add_parser(name, help=text)
        c.add_argument("--size", choices=["n", "s", "m", "l", "x"], default="s")
        c.add_argument("--nc", type=int, default=9, help="number of classes (course: 9)")
        c.add_argument("--img-size", type=int, default=1120, help="square model input (course: 1120)")
        c.add_argument("--weights", help="state_dict (.pt/.safetensors) of a model trained with ultralytics/yolov5")
        if name == "export":
            c.add_argument("--out", required=True, help="the .onnx file to write")
            c.add_argument("--dynamic-batch", action="store_true")
        if name == "build":
            c.add_argument("--onnx", required=True)
            c.add_argument("--out", required=True, help="the .plan file to write")
            c.add_argument("--fp16", action="store_true", help="build from an FP16 copy of the ONNX (chapter 3)")
            c.add_argument("--batch", type=int, default=1)
            c.add_argument("--opt-level", type=int, default=3, choices=range(6), metavar="0..5")
        if name in ("detect", "check"):
            c.add_argument("--onnx", help="run this ONNX file with ONNX Runtime")
            c.add_argument("--plan", help="run this TensorRT plan")
            c.add_argument("--image", help="photo (default: a sample photo shipped with matplotlib)")
            c.add_argument("--conf", type=float, default=0.9, help="confidence threshold (course: 0.9)")
            c.add_argument("--iou", type=float, default=0.5, help="NMS IoU threshold (course: 0.5)")
        if name == "detect":
            c.add_argument("--out", help="write the photo with its boxes here (.png)")

    h = sub.add_parser("submit", help="homework: run its checks and write one zip (see docs/instructors.md)")
    h.add_argument("--hw", required=True, choices=["1", "2", "3", "int8"])
    h.add_argument("--student", required=True, help="your ID (letters, digits, '.', '_', '-')")
    h.add_argument("--seed", type=int, default=0, help="the seed your instructor issued")
    h.add_argument("--out", help="the zip to write (default: only run the checks and list the files)")
    h.add_argument("--work", default="homework", help="folder with hw1/, hw2/, hw3/, int8/ (default: homework)")
    h.add_argument("--config", choices=["tiny", "sd15"], default="tiny")
    h.add_argument("--checkpoint", help="sd15: control_sd15_canny.pth or .safetensors, the reference for the tests")

    g = sub.add_parser("grade", help="instructors: grade a folder of submission zips on a CPU machine")
    g.add_argument("submissions", help="folder of *.zip")
    g.add_argument("--out", required=True, help="results folder: <student>/results.json and summary.csv")
    g.add_argument("--roster", help="CSV student,seed of the seeds you issued")
    g.add_argument("--salt", default="", help="a secret mixed into the seeds of the re-check inputs")
    g.add_argument("--require-gpu", action="store_true", help="GPU evidence (engines) counts towards the score")
    g.add_argument("--points", help='JSON file {"test name": points, ...} overriding the default points')
    g.add_argument("--keep", action="store_true", help="keep each unpacked submission in <out>/<student>/files/")
    for cmd in (h, g):
        cmd.add_argument("--max-members", type=int, default=ZipLimits.max_members,
                         help="files per zip (default %(default)s)")
        cmd.add_argument("--max-file-mb", type=float, default=ZipLimits.max_file_mb,
                         help="MB per file (default %(default)s)")
        cmd.add_argument("--max-total-mb", type=float, default=ZipLimits.max_total_mb,
                         help="MB unpacked per zip (default %(default)s)")
        cmd.add_argument("--quiet", action="store_true", help="no progress bars")

    s = sub.add_parser("score", help="PSNR, max pixel difference, PD and the course score of a folder of images")
    s.add_argument("images")
    s.add_argument("--reference", required=True, help="folder with the fp32 reference images (same names)")
    s.add_argument("--pd", action=argparse.BooleanOptionalAction, default=None,
                   help="compute PD with pytorch_fid (default: when installed)")
    return p


COMMANDS = {"env": cmd_env, "demo": cmd_demo, "export": cmd_export, "build": cmd_build, "run": cmd_run,
            "score": cmd_score, "bench": cmd_bench, "yolo": cmd_yolo, "submit": cmd_submit, "grade": cmd_grade}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
            MissingDependency) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
