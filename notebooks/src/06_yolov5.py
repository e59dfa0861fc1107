# %% [markdown]
# # Chapter 6 — YOLOv5 end to end: letterbox, ONNX, parity, post-processing, TensorRT
#
# The course's second model is a **YOLOv5 detector with 9 classes at 1120×1120**. In this chapter you
#
# 1. letterbox a real photograph into the model input and read the raw output `output0`,
# 2. export the detector to ONNX (static, and with a dynamic batch) and check it against PyTorch,
#    number by number and detection by detection,
# 3. post-process and draw boxes — and see the two post-processing bugs of the course's script,
# 4. (on a GPU with TensorRT) build FP32 and FP16 engines, check them and time them.
#
# Everything before section 6 runs on a CPU. The weights are **random** (seeded): the plumbing is what
# we test, the boxes mean nothing. Section 4 shows how your own trained weights load.

# %% tags=["nbval-ignore-output"]
# %load_ext course_lib.notebook
from course_lib.env import detect

print(detect().report())   # section 6 needs a CUDA GPU and TensorRT

# %% [markdown]
# ## 1. Letterbox: fit the photo without distorting it
#
# YOLOv5 takes a square RGB image in [0, 1]. The photo (600×512, H×W, shipped with matplotlib) is
# **resized keeping its aspect ratio** until its longer side fits, then **padded with grey 114,
# centred**. `PreProcessor(channel_order=...)` states what *you* pass in: `"bgr"` for `cv2.imread`
# (the default, as in the course's script), `"rgb"` for matplotlib / PIL; the model always receives RGB.
# The `Letterbox` it returns remembers the scale and the padding — post-processing needs both.

# %%
import matplotlib.pyplot as plt

from course_lib.samples import sample_photo
from course_lib.yolov5 import PreProcessor, letterbox

photo = sample_photo(size=None)                      # uint8 RGB, (600, 512, 3)
boxed, box = letterbox(photo, 640)
print("photo", photo.shape, "->", boxed.shape, f"| scale {box.scale:.4f}, pad (left, top) {box.pad}")
print("pad pixels are 114:", bool((boxed[:, :box.pad[0]] == 114).all()))
fig, axes = plt.subplots(1, 2, figsize=(8, 4))
for ax, img, title in zip(axes, (photo, boxed), ("photo 600x512 (HxW)", "letterboxed 640x640")):
    ax.imshow(img)
    ax.set_title(title)
    ax.axis("off")
plt.show()

# %% [markdown]
# ## 2. The raw output: where 77175 comes from
#
# The course's input is 1120×1120. The detector predicts at three strides, 8, 16 and 32, i.e. on grids
# of 140², 70² and 35² cells, with 3 anchor boxes per cell: **3 × (140² + 70² + 35²) = 77175 rows**.
# Each row has **14 numbers = 4 box (centre x, y, width, height in input pixels) + 1 objectness + 9
# class probabilities**, already through a sigmoid. We build yolov5n (the smallest width; the course
# trains yolov5s — same rows, same columns), fold its BatchNorms into the convs as for export, and run
# it once at 1120. Everything after this cell runs at 640 to stay quick on a CPU.

# %%
import torch

from course_lib.yolov5 import YOLOv5, yolov5_preset

config = yolov5_preset("n", nc=9, img_size=1120)
model = YOLOv5(config, seed=0).fuse_conv_bn()
images_1120, box_1120 = PreProcessor(1120, channel_order="rgb")(photo)
with torch.no_grad():
    output_1120 = model(images_1120)
rows = 3 * (140**2 + 70**2 + 35**2)
print("images", tuple(images_1120.shape), "-> output0", tuple(output_1120.shape))
print("3 x (140^2 + 70^2 + 35^2) =", rows, "| 4 + 1 + nc =", 4 + 1 + config.nc)
print("matches config.output_shape():", tuple(output_1120.shape) == config.output_shape())

# %% [markdown]
# ## 3. Export to ONNX and check parity
#
# `export_onnx` names the input `images` and the output `output0`, as the course's TensorRT code
# expects. The static export fixes every dimension; the dynamic one names the batch axis `B` so one
# file serves several images at once.

# %%
from pathlib import Path

from course_lib.onnx.export import export_onnx
from course_lib.yolov5 import INPUT_NAME, OUTPUT_NAME

out = Path("out/06_yolov5")
images, box = PreProcessor(640, channel_order="rgb")(photo)
static = export_onnx(model, {INPUT_NAME: images}, out / "yolov5n_640.onnx", output_names=[OUTPUT_NAME])
dynamic = export_onnx(model, {INPUT_NAME: images}, out / "yolov5n_640_dynamic.onnx", output_names=[OUTPUT_NAME],
                      dynamic_axes={INPUT_NAME: {0: "B"}, OUTPUT_NAME: {0: "B"}})
for result in (static, dynamic):
    print(f"{result.path.name:<25} {result.inputs[0].name} {result.inputs[0].shape} -> "
          f"{result.outputs[0].name}, batch axis: {result.outputs[0].shape[0]}")

# %% [markdown]
# Parity first on the raw numbers, then on what a student would see. The raw test is relative to each
# column group's *scale*: boxes are pixels of a 1120-pixel image, so 6e-3 px of fp32 rounding (a
# different summation order, not a different function) is agreement, while a class probability, whose
# scale is 1, may move by no more than 1e-4 (`FP32_TOLERANCE`). A plain `allclose(rtol, atol)` cannot
# say both at once. Then `check_outputs` post-processes both outputs alike at a confidence that finds
# boxes even on random weights (`comparison_threshold`: 0.25, or lower until 50 rows pass), matches boxes
# one to one by IoU and reports unmatched boxes, score differences and class disagreements.
# `python -m course_lib yolo check` uses exactly this definition.

# %%
from course_lib.onnx.session import run_ort
from course_lib.yolov5 import FP16_TOLERANCE, check_outputs

with torch.no_grad():
    output_torch = model(images)
output_ort = run_ort(static.path, {INPUT_NAME: images})[OUTPUT_NAME]
check = check_outputs(output_torch, output_ort)
print("output0", output_ort.shape, "| raw within tolerance:", check.within_tolerance,
      "| detections agree:", check.detections_agree)

# %% tags=["nbval-ignore-output"]
print(check.table())

# %%
print("boxes compared:", check.matched >= 50, "| error / scale < 1e-4:", check.max_rel_err < 1e-4,
      "| check passed:", check.passed)

# %% [markdown]
# The dynamic file takes two images at once; each image's rows equal the single-image run.

# %%
batch = torch.cat([images, images.flip(-1)])
output_batch = run_ort(dynamic.path, {INPUT_NAME: batch})[OUTPUT_NAME]
print("batch of 2 ->", output_batch.shape, "| image 0 matches the static run:",
      check_outputs(output_ort, output_batch[:1]).passed)

# %% [markdown]
# ## 4. Detections on the photo — and what random weights mean
#
# `PostProcessor` keeps rows whose objectness and obj × class probability exceed `conf_threshold`,
# takes the best class, runs NMS per class and undoes the letterbox. The course used 0.9: with
# **random weights no row is that confident**, so nothing is drawn — that is expected, not a bug. To see
# the plumbing we lower the threshold and keep the 10 best boxes. They are random boxes on a real photo.

# %%
from course_lib.yolov5 import PostProcessor, draw_boxes

strict = PostProcessor(conf_threshold=0.9)(output_ort, box)
loose = PostProcessor(conf_threshold=0.5, max_det=10)(output_ort, box)
print("boxes at conf 0.9:", len(strict), "| highest objectness:", f"{output_ort[0, :, 4].max():.2f}")
print("boxes at conf 0.5 (10 at most):", len(loose), "| all inside the photo:",
      bool((loose.boxes[:, [0, 2]] <= photo.shape[1]).all() and (loose.boxes[:, [1, 3]] <= photo.shape[0]).all()))
fig, ax = plt.subplots(figsize=(5, 5.5))
ax.imshow(draw_boxes(photo, loose))
ax.set_title("ONNX Runtime, random weights, conf 0.5")
ax.axis("off")
plt.show()

# %% [markdown]
# **Your trained weights.** Train with ultralytics/yolov5 (9 classes), then save the weights as a plain
# `state_dict` inside that repo: `torch.save(torch.load('best.pt', weights_only=False)['model'].float().state_dict(), 'best_state_dict.pt')`.
# Set `WEIGHTS` to that file's path: `load_yolov5_weights` checks every key and shape (yolov5s, nc=9) and
# the rest of this chapter runs unchanged with real boxes. Load **before** fusing BatchNorms. Left as
# `None`, the cell does nothing.

# %%
from course_lib.yolov5 import load_yolov5_weights

WEIGHTS = None          # e.g. "path/to/best_state_dict.pt"
if WEIGHTS is not None:
    trained = load_yolov5_weights(YOLOv5(yolov5_preset("s", nc=9), seed=None), WEIGHTS).fuse_conv_bn()
    print("loaded", WEIGHTS)
else:
    print("no weights given: keeping the random model")

# %% [markdown]
# ## 5. The course script's two post-processing bugs
#
# **Bug 1 — nc from the wrong axis.** `output0` is (1, rows, 5 + nc). The script read the number of
# classes as `shape[1] - 5`, which is *rows* − 5. `PostProcessor` uses the last axis.

# %%
print("wrong: shape[1] - 5 =", output_1120.shape[1] - 5, "| right: shape[-1] - 5 =", output_1120.shape[-1] - 5)

# %% [markdown]
# **Bug 2 — rescaling that ignores the padding.** The script mapped boxes back by dividing x by
# 640 / 512 and y by 640 / 600 — a per-axis stretch, as if the photo had been squashed to a square. The
# letterbox instead scaled both axes by the same factor and shifted x by the left padding. One
# hand-made row: an object at x 100..200, y 300..400 in the photo, placed into the model input.

# %%
import numpy as np

true_box = np.array([100.0, 300.0, 200.0, 400.0])
left, top = box.pad
x1, y1, x2, y2 = true_box * box.scale + [left, top, left, top]          # where it sits in the 640 input
row = np.zeros((1, 1, 14), np.float32)
row[0, 0, :6] = [(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1, 0.99, 0.99]   # class 0
fixed = PostProcessor(conf_threshold=0.9)(row, box).boxes[0]
stretch = np.array([640 / photo.shape[1], 640 / photo.shape[0]] * 2)
buggy = np.array([x1, y1, x2, y2]) / stretch
print("true box        ", true_box.round(1))
print("PostProcessor   ", fixed.round(1))
print("per-axis stretch", buggy.round(1), "<- shifted by the padding and squeezed in x")

# %% [markdown]
# ## 6. TensorRT: FP32 and FP16 engines at 1120
#
# We export the course's shape, 1120, statically, make an FP16 copy with `to_fp16_onnx`, build one
# engine from each and compare them with ONNX Runtime on the same photo. The build cells run wherever
# a TensorRT builder is (TensorRT for RTX: any CPU); the others where a CUDA GPU runs the plans
# (elsewhere each prints one line).

# %% tags=["requires-trt-builder", "nbval-ignore-output"]
# %%needs trt-builder
from course_lib.precision.fp16 import to_fp16_onnx
from course_lib.trt.build import build_engine_plan

onnx_1120 = export_onnx(model, {INPUT_NAME: images_1120}, out / "yolov5n_1120.onnx", output_names=[OUTPUT_NAME]).path
onnx_1120_fp16 = to_fp16_onnx(onnx_1120, out / "yolov5n_1120_fp16.onnx").path
yolo_plans = {}
for name, path in (("fp32", onnx_1120), ("fp16", onnx_1120_fp16)):
    yolo_plans[name] = build_engine_plan(path, out / f"yolov5n_1120_{name}.plan", workspace_gib=2)
    print(f"yolov5n {name}: {yolo_plans[name].extra['layers']} layers, {yolo_plans[name].precision}, "
          f"built in {yolo_plans[name].build_seconds:.1f} s, {yolo_plans[name].target}")

# %% tags=["requires-trt-builder"]
# %%needs trt-builder
print("fp32 and fp16 plans built:", all((out / f"yolov5n_1120_{name}.plan").is_file() for name in yolo_plans))

# %% [markdown]
# The build needs only a TensorRT builder (`%%needs trt-builder`; TensorRT for RTX on any CPU). Running
# the plans needs a GPU that runs them (with TensorRT for RTX: unverified here, no RTX-class GPU).

# %% tags=["requires-gpu", "requires-tensorrt"]
# %%needs gpu tensorrt
from course_lib.trt.engine import Engine

engines = {name: Engine(out / f"yolov5n_1120_{name}.plan").load().activate() for name in yolo_plans}
print(engines["fp32"].info())

# %% tags=["requires-gpu", "requires-tensorrt", "nbval-ignore-output"]
# %%needs gpu tensorrt
reference = run_ort(onnx_1120, {INPUT_NAME: images_1120})[OUTPUT_NAME]
feed = {INPUT_NAME: images_1120.cuda()}
trt_checks = {}
for name, engine in engines.items():
    trt_checks[name] = check_outputs(reference, engine.infer(feed)[OUTPUT_NAME].float().cpu(), FP16_TOLERANCE)
    print(f"--- ONNX Runtime fp32 vs TensorRT {name}\n{trt_checks[name].table()}\n")

# %% tags=["requires-gpu", "requires-tensorrt"]
# %%needs gpu tensorrt
print("fp32 engine detections agree:", trt_checks["fp32"].detections_agree,
      "| fp16 engine no NaN/Inf:", trt_checks["fp16"].nonfinite_candidate == 0)

# %% tags=["requires-gpu", "requires-tensorrt", "nbval-ignore-output"]
# %%needs gpu tensorrt
from course_lib.timing import summarize, time_cuda

for name, engine in engines.items():
    s = summarize(time_cuda(lambda: engine.infer(feed), warmup=5, iters=50))
    print(f"TensorRT {name}: median {s['median']:.2f} ms  (p10 {s['p10']:.2f}, p90 {s['p90']:.2f})")

# %% [markdown]
# ## Exercises
#
# **1.** How many rows does `output0` have at 640×640, and at a 1120×640 (H×W) input? Work it out
# from the strides and anchors, then check against the model.

# %%
from course_lib.notebook import answered      # the checks below say "not done yet" until you have answered

### BEGIN SOLUTION: rows_640 and rows_1120x640, from the strides (8, 16, 32) and 3 anchors per cell
rows_640 = 3 * (80**2 + 40**2 + 20**2)
rows_1120x640 = 3 * (140 * 80 + 70 * 40 + 35 * 20)
### END SOLUTION
if answered("exercise 1", rows_640, rows_1120x640):
    assert rows_640 == output_ort.shape[1] == config.output_shape(1, 640, 640)[1]
    assert rows_1120x640 == config.output_shape(1, 1120, 640)[1]
    print("exercise 1: correct", rows_640, rows_1120x640)

# %% [markdown]
# **2.** Letterbox a wide 300×800 (H×W) image into 640×640: what is the scale, and how many grey rows
# go above the image?

# %%
wide = np.zeros((300, 800, 3), np.uint8)
_, wide_box = letterbox(wide, 640)
### BEGIN SOLUTION: scale_guess and top_guess (grey rows above the image), by hand
scale_guess, top_guess = 640 / 800, (640 - 240) // 2
### END SOLUTION
if answered("exercise 2", scale_guess, top_guess):
    assert abs(wide_box.scale - scale_guess) < 1e-9 and wide_box.pad == (0, top_guess)
    print("exercise 2: correct", wide_box.scale, wide_box.pad)

# %% [markdown]
# ## Self-check

# %%
import onnx

graph = onnx.load(str(static.path)).graph
assert [i.name for i in graph.input] == [INPUT_NAME] and [o.name for o in graph.output] == [OUTPUT_NAME]
assert tuple(output_1120.shape) == (1, 77175, 14)
assert check.passed and output_batch.shape == (2, 25200, 14)
assert len(strict) == 0 and 0 < len(loose) <= 10
assert np.allclose(fixed, true_box, atol=0.5) and not np.allclose(buggy, true_box, atol=5)
print("chapter 6 self-check passed")
