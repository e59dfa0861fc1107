"""``yolo export | build | detect | check``: chapter 6's scripts in one command."""
from __future__ import annotations

from pathlib import Path

from course_lib.cli.args import fraction, image_file, positive_int, suffixed, yolo_size
from course_lib.cli.common import add_tensorrt_option, say, use_tensorrt


def _yolo_model(args):
    from course_lib.yolov5 import YOLOv5, load_yolov5_weights, yolov5_preset

    model = YOLOv5(yolov5_preset(args.size, args.nc, args.img_size), seed=0)
    if args.weights:
        load_yolov5_weights(model, args.weights)
    else:
        say(f"yolov5{args.size}, nc={args.nc}: random weights (boxes mean nothing; pass --weights for a trained model)")
    return model.fuse_conv_bn().eval()


def _yolo_runner(args):
    """output0 for an ``images`` tensor from --plan (TensorRT), --onnx (ONNX Runtime) or the torch model."""
    if args.plan:
        from course_lib.backends import TrtBackend

        engine = TrtBackend(args.plan)
        return "tensorrt", lambda images: engine.infer({"images": images})["output0"].cpu().numpy()
    if args.onnx:
        from course_lib.onnx.session import ort_session, run_ort

        session = ort_session(args.onnx)
        return "onnxruntime", lambda images: run_ort(session, {"images": images})["output0"]
    model = _yolo_model(args)
    return "torch", lambda images: model(images).detach().numpy()


def cmd_yolo(args) -> int:
    """Chapter 6: the course's export / onnx2trt / trt_yolov5 / check scripts in one command."""
    import torch

    from course_lib.yolov5 import FP16_TOLERANCE, FP32_TOLERANCE, PostProcessor, PreProcessor, check_outputs, draw_boxes

    use_tensorrt(args)

    if args.yolo_command == "export":
        from course_lib.onnx.export import export_onnx

        model = _yolo_model(args)
        images = torch.rand(1, 3, args.img_size, args.img_size, generator=torch.Generator().manual_seed(0))
        axes = {"images": {0: "B"}, "output0": {0: "B"}} if args.dynamic_batch else None
        result = export_onnx(model, {"images": images}, args.out, output_names=["output0"], dynamic_axes=axes)
        say(f"wrote {result}")
        return 0
    if args.yolo_command == "build":
        from course_lib.trt.flavour import require_tensorrt

        require_tensorrt("building the YOLOv5 engine")
        from course_lib.trt.build import build_engine_plan
        from course_lib.trt.profiles import onnx_input_dims, static_profile

        onnx_path = Path(args.onnx)
        if args.fp16:
            from course_lib.precision.fp16 import to_fp16_onnx

            onnx_path = to_fp16_onnx(onnx_path, Path(args.out).with_suffix(".fp16.onnx")).path
        dims = onnx_input_dims(onnx_path)          # a free axis: the batch (axis 0) or the image size
        shapes = {name: tuple(d if isinstance(d, int) else args.batch if i == 0 else args.img_size
                              for i, d in enumerate(dim)) for name, dim in dims.items()}
        profile = static_profile(shapes, dims)
        build_engine_plan(onnx_path, args.out, profile, opt_level=args.opt_level, progress=False)
        say(f"wrote {args.out}")
        return 0
    from course_lib.samples import read_image, sample_photo, write_image

    rgb = read_image(args.image) if args.image else sample_photo(size=None)
    images, box = PreProcessor(args.img_size, channel_order="rgb")(rgb)
    if args.yolo_command == "detect":
        post = PostProcessor(conf_threshold=args.conf, iou_threshold=args.iou)
        name, run = _yolo_runner(args)
        with torch.inference_mode():
            detections = post(run(images), box)
        say(f"{name}: {len(detections)} boxes at conf > {args.conf}")
        for row in detections.rows():
            say(row)
        if args.out:
            write_image(args.out, draw_boxes(rgb, detections))
            say(f"wrote {args.out}")
        return 0
    # check: ONNX Runtime against TensorRT where a plan is given, else against torch
    if not args.onnx:
        raise ValueError("yolo check needs --onnx PATH (and --plan PATH to check TensorRT against it)")
    from course_lib.onnx.session import run_ort

    reference = run_ort(args.onnx, {"images": images})["output0"]
    if args.plan:
        _, run = _yolo_runner(args)
        candidate = run(images)
    else:
        with torch.inference_mode():
            candidate = _yolo_model(args)(images).numpy()
    result = check_outputs(reference, candidate, FP16_TOLERANCE if args.plan else FP32_TOLERANCE)
    say(str(result))
    return 0 if result.passed else 1


def add_commands(sub) -> None:
    """Register ``yolo`` and its four subcommands."""
    y = sub.add_parser("yolo", help="chapter 6: YOLOv5 export | build | detect | check")
    ysub = y.add_subparsers(dest="yolo_command", required=True)
    for name, text in (("export", "export the detector to ONNX (images -> output0)"),
                       ("build", "build a TensorRT plan from the ONNX (TensorRT for RTX: no GPU needed)"),
                       ("detect", "detect on a photo with torch, ONNX Runtime (--onnx) or TensorRT (--plan)"),
                       ("check", "compare ONNX Runtime with TensorRT (--plan) or torch: raw outputs and detections "
                                 "(course_lib.yolov5.check: one definition of agreement)")):
        c = ysub.add_parser(name, help=text)
        c.add_argument("--size", choices=["n", "s", "m", "l", "x"], default="s", help="YOLOv5 model size")
        c.add_argument("--nc", type=positive_int, default=9, help="number of classes (course: 9)")
        c.add_argument("--img-size", type=yolo_size, default=1120, help="square model input (course: 1120)")
        c.add_argument("--weights", help="state_dict (.pt/.safetensors) of a model trained with ultralytics/yolov5")
        if name == "export":
            c.add_argument("--out", required=True, type=suffixed(".onnx"), help="the .onnx file to write")
            c.add_argument("--dynamic-batch", action="store_true", help="a dynamic batch axis (default: batch 1)")
        if name == "build":
            c.add_argument("--onnx", required=True, help="the .onnx file yolo export wrote")
            c.add_argument("--out", required=True, type=suffixed(".plan"), help="the .plan file to write")
            c.add_argument("--fp16", action="store_true", help="build from an FP16 copy of the ONNX (chapter 3)")
            c.add_argument("--batch", type=positive_int, default=1, help="batch the plan is built for")
            c.add_argument("--opt-level", type=int, default=3, choices=range(6), metavar="0..5",
                           help="builder optimisation level")
        if name in ("detect", "check"):
            c.add_argument("--onnx", help="run this ONNX file with ONNX Runtime")
            c.add_argument("--plan", help="run this TensorRT plan")
            c.add_argument("--image", help="photo (default: a sample photo shipped with matplotlib)")
        if name == "detect":
            c.add_argument("--conf", type=fraction, default=0.9, help="confidence threshold (default: 0.9, the course's)")
            c.add_argument("--iou", type=fraction, default=0.5, help="NMS IoU threshold (default: 0.5, the course's)")
            c.add_argument("--out", type=image_file, help="write the photo with its boxes here (.png)")
        if name in ("build", "detect", "check"):
            add_tensorrt_option(c)
    y.set_defaults(func=cmd_yolo)
