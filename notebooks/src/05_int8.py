# %% [markdown]
# # Chapter 5 — INT8 by explicit quantization, calibrated on the pipeline's own data
#
# FP16 (chapter 3) halves every number. INT8 halves it again, and on tensor cores doubles the peak
# throughput once more — *if* the accuracy survives and *if* the kernels really are faster. In this
# chapter you
#
# 1. learn what an INT8 number means: scale, zero point, symmetric vs asymmetric, per-tensor vs per-channel,
# 2. record calibration data from the real `canny2image` pipeline (not random tensors),
# 3. write INT8 **Q/DQ** ONNX files for the ControlNet and the UNet, in the form TensorRT accepts,
#    and check that form — including a quantization TensorRT would reject,
# 4. measure the cost in accuracy (per model, and end to end on the image) and the gain in speed,
# 5. try SmoothQuant, the trick that tames activation outliers.
#
# Everything runs on a CPU with the `tiny` preset at 64×64 and 2 DDIM steps (and, at the end of part 5,
# on chapter 1's trained toy at 20 steps, to see what INT8 does to a picture). The TensorRT INT8 vs FP16
# comparison at the end needs a GPU with TensorRT (`%%needs gpu tensorrt`; elsewhere one line says so);
# building its plans only a builder (`%%needs trt-builder`: TensorRT for RTX builds them on a CPU).

# %% tags=["nbval-ignore-output"]
# %load_ext course_lib.notebook
from course_lib.env import detect

print(detect().report())   # part 6 needs "TensorRT" and a "CUDA GPU" here

# %% [markdown]
# ## 1. What an INT8 number means
#
# An INT8 tensor stores integers q in [-128, 127] and one float **scale** s (and a **zero point** z):
# the value it stands for is `x ≈ s · (q − z)`. Quantizing is `q = clip(round(x / s) + z, −128, 127)`.
#
# * **Symmetric** (z = 0): s = max|x| / 127. Zero is exact, the range is [−max, +max]. TensorRT supports
#   **only** this: its INT8 kernels have no zero-point arithmetic.
# * **Asymmetric** (z ≠ 0, usually with uint8 [0, 255]): the range [min, max] is used fully — better for
#   a one-sided tensor such as a ReLU output, but TensorRT rejects it.
# * **Per-tensor**: one s for the whole tensor (how activations are quantized).
#   **Per-channel**: one s per output channel (how weights are quantized): a channel of small weights
#   is not rounded with the step of the largest one.
#
# A small weight matrix with one large row shows why weights get per-channel scales:

# %%
import numpy as np


def fake_quant(x, scale, zero=0, lo=-128, hi=127):
    """Quantize then dequantize: what the INT8 model computes with."""
    return (np.clip(np.round(x / scale) + zero, lo, hi) - zero) * scale


rng = np.random.default_rng(0)
w = rng.standard_normal((4, 64)).astype(np.float32) * np.array([[0.01], [0.02], [0.05], [2.0]], np.float32)
per_tensor = fake_quant(w, np.abs(w).max() / 127)
per_channel = fake_quant(w, np.abs(w).max(axis=1, keepdims=True) / 127)
rel = lambda q: np.abs(q - w).max(axis=1) / np.abs(w).max(axis=1)   # noqa: E731  error per row, relative
print("row max |w|:          ", np.round(np.abs(w).max(axis=1), 3))
print("per-tensor rel. error:", np.round(rel(per_tensor), 3))
print("per-channel rel. error:", np.round(rel(per_channel), 4))

# %% [markdown]
# Per-tensor, the three small rows are rounded with the big row's step: they lose everything (relative
# error 0.5 or 1: most of their weights become 0). Per-channel, every row keeps ~0.4 % error. Now a
# one-sided activation (all values ≥ 0, like after a ReLU or a softmax): asymmetric uint8 uses all 256
# levels, symmetric int8 wastes the negative half — half the resolution, the price TensorRT's format asks.

# %%
x = rng.random(1000).astype(np.float32) * 6.0            # values in [0, 6)
sym = fake_quant(x, np.abs(x).max() / 127)
scale_u8 = (x.max() - x.min()) / 255
asym = fake_quant(x, scale_u8, zero=np.round(-x.min() / scale_u8), lo=0, hi=255)
print(f"symmetric int8 step {np.abs(x).max() / 127:.4f}, max error {np.abs(sym - x).max():.4f}")
print(f"asymmetric uint8 step {scale_u8:.4f}, max error {np.abs(asym - x).max():.4f}")

# %% [markdown]
# ### Explicit quantization: Q/DQ nodes in the ONNX
#
# TensorRT 7–9 quantized *implicitly*: you handed the builder a **calibrator** object, it ran your data
# through the network and picked a range per tensor itself (or you called `set_dynamic_range`). Those APIs
# are deprecated in TensorRT 10 and gone in 11. What remains is **explicit quantization**: the ONNX graph
# carries `QuantizeLinear → DequantizeLinear` pairs whose scales say exactly where and how each tensor is
# rounded. TensorRT then fuses each DQ → Conv/MatMul → … into an INT8 kernel. The scales travel with
# the model, any tool can write them, and ONNX Runtime can run the same file on a CPU to measure accuracy.
#
# Where do the ranges come from? From **calibration**: run representative inputs, record each tensor's
# values, pick a range:
#
# | method | range | notes |
# |---|---|---|
# | **max** | the largest \|x\| seen | simple; one outlier stretches the step for everything |
# | **entropy** | the clip that loses least information (KL divergence of the histograms) | TensorRT's old default for CNNs |
# | **percentile** | e.g. the 99.99th percentile of \|x\| | clips the rare outliers, keeps resolution |
#
# Whatever the method, the ranges are only as good as the inputs: calibrate on what the model really sees.

# %% [markdown]
# ## 2. Calibration data from the pipeline itself
#
# The ControlNet and UNet see noisy latents at every DDIM timestep, the canny hint, and the text embedding
# of the prompt *and* of the negative prompt (classifier-free guidance: two calls per step). Random
# tensors look nothing like that. `capture_calibration` wraps each sub-model's backend in a
# `RecordingBackend` for a few `process()` calls and writes every call's inputs to a `.npz`, with a
# manifest saying which run, DDIM step and call it came from.
#
# First the artifacts: the tiny model (seed 0, as in chapter 1) exported at 64×64.

# %%
from pathlib import Path

import torch

from course_lib.cnsd import build_cnsd, get_config
from course_lib.onnx.export_cnsd import export_cnsd

torch.manual_seed(0)
SIZE, STEPS = 64, 2
tiny = get_config("tiny")
model = build_cnsd(tiny, seed=0)
out = Path("out/05_int8")
exports = export_cnsd(model, out / "fp32", height=SIZE, width=SIZE)
fp32 = {name: result.path for name, result in exports.items()}
print({name: path.name for name, path in fp32.items()})

# %% [markdown]
# Three runs: three versions of the sample photo, each with its own prompt and seed. Runs 0 and 1 are for
# calibration; run 2 is **held out** to measure accuracy on inputs the ranges never saw.

# %%
from course_lib.precision.calibration import capture_calibration
from course_lib.pipeline.canny2image import Canny2Image
from course_lib.cnsd.tokenizer import byte_level_tokenizer
from course_lib.samples import sample_photo

photo = sample_photo(size=(SIZE, SIZE))
photos = [photo, np.ascontiguousarray(photo[:, ::-1]), np.ascontiguousarray(photo[::-1])]
prompts = ["a bird", "a bird on a branch", "a painting of a bird"]
seeds = [1, 2, 3]
tokenizer = byte_level_tokenizer()
pipe_torch = Canny2Image.from_torch(model, tokenizer)
calib = capture_calibration(pipe_torch, photos, prompts, out / "calib_data", seeds=seeds, overwrite=True,
                            models=["controlnet", "unet"], image_resolution=SIZE, ddim_steps=STEPS)
for run in calib.manifest["runs"]:
    print({k: v for k, v in run.items() if k in ("run", "prompt", "seed")})
for name in calib.models:
    print(f"{name:<11}{len(calib.samples(name))} samples = {len(photos)} runs x {STEPS} steps x 2 calls")

# %% [markdown]
# Each manifest entry names its file, run, DDIM step, timestep and call (0 = prompt, 1 = negative prompt):

# %%
for entry in calib.samples("unet")[:4]:
    print(entry)
print("unet inputs:", {k: tuple(v) for k, v in list(calib.input_shapes("unet").items())[:4]}, "... control0..12")

# %% [markdown]
# ## 3. INT8 Q/DQ models for TensorRT
#
# `quantize_int8` runs ONNX Runtime's `quantize_static` with the settings TensorRT needs
# (`ORT_TRT_OPTIONS`): QDQ format, INT8 activations and weights, **symmetric** (zero point 0), per-channel
# weights, biases left float, and Q/DQ only on the inputs of the weighted layers (Conv, MatMul, Gemm) —
# where TensorRT gains from INT8. Ranges: "max" over the calibration runs (ModelOpt, NVIDIA's quantizer,
# is used instead where installed and adds "entropy").
#
# Some layers are usually kept in float: `sensitive_nodes` finds them by their place in the graph.

# %%
from course_lib.precision.int8 import ORT_TRT_OPTIONS, check_qdq, quantize_int8, sensitive_nodes

print(ORT_TRT_OPTIONS)
groups = sensitive_nodes(fp32["controlnet"])
print({group: len(names) for group, names in groups.items()})

# %% [markdown]
# We keep the time embedding and the first and last convs (the ControlNet's 13 zero convs write the
# controls directly) in float, and quantize everything else. Calibration uses runs 0 and 1 only.

# %%
int8 = {}
for name in ("controlnet", "unet"):
    sensitive = sensitive_nodes(fp32[name])
    kept = {g: sensitive[g] for g in ("time_embed", "first_last_conv")}
    result = quantize_int8(fp32[name], out / "int8" / f"{name}.int8.onnx", calib.reader(name, runs=[0, 1]),
                           method="ort", exclude_nodes=kept)
    int8[name] = result.path
    print(f"{name:<11}calibrated on {result.samples} samples, {len(result.excluded_nodes)} nodes kept float")

# %% [markdown]
# ### The structural check: will TensorRT take it?
#
# `check_qdq` reads the file the way TensorRT will: every Q/DQ INT8 with zero point 0, each Q followed by
# a DQ, scales positive constants, biases float — and lists which compute layers stayed float.
# (`quantize_int8` refuses to write a model that fails it.)

# %%
reports = {name: check_qdq(path) for name, path in int8.items()}
print(reports["controlnet"])

# %%
for name, report in reports.items():
    print(f"{name:<11}passed: {report.passed}, int8 layers: {len(report.quantized_layers)}, "
          f"float layers: {len(report.float_layers)}, per-tensor weights: {report.per_tensor_weights}")

# %% [markdown]
# Now the same model quantized the way ONNX Runtime would for its own CPU kernels: **asymmetric uint8**
# activations. It runs fine in ONNX Runtime — and the check rejects it, as TensorRT would.

# %%
from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

import logging

asym_path = out / "int8" / "controlnet.uint8.onnx"
logging.getLogger().setLevel(logging.ERROR)   # ONNX Runtime's quantizer warns about every norm's bias
quantize_static(str(fp32["controlnet"]), str(asym_path), calib.reader("controlnet", runs=[0], limit=2),
                quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                extra_options={"ActivationSymmetric": False})
logging.getLogger().setLevel(logging.WARNING)
asym_report = check_qdq(asym_path)
print("uint8 model passed:", asym_report.passed)
print("a uint8 problem found:", any("UINT8" in p for p in asym_report.problems))
print(f"{len(asym_report.problems)} problems, the first:", asym_report.problems[0])

# %% [markdown]
# ## 4. What INT8 costs in accuracy
#
# Per model: the INT8 and the fp32 file on the **held-out** run's recorded inputs, every output compared
# (max and mean absolute error, relative L2 error, cosine similarity).

# %% tags=["nbval-ignore-output"]
from course_lib.precision.evaluation import AccuracyTable, compare_images, int8_accuracy

tables = [int8_accuracy(fp32[name], int8[name], calib.reader(name, runs=[2]), name=name)
          for name in ("controlnet", "unet")]
accuracy = AccuracyTable.combine(tables)
print(accuracy)

# %%
rows = [row for table in tables for row in table.rows]
print("rows:", len(rows), "| held-out samples per model:", {t.rows[0].model: t.rows[0].samples for t in tables})
print("every output finite and cosine > 0.95:", all(np.isfinite(r.max_abs) and r.cosine > 0.95 for r in rows))
print("unet latent relative L2 error < 0.2:", tables[1].rows[0].rel_l2 < 0.2)

# %% [markdown]
# End to end: the pipeline on ONNX Runtime with the fp32 files, then with the INT8 ControlNet and UNet,
# on the held-out photo, prompt and seed. The errors of every step add up through the DDIM loop.

# %%
import matplotlib.pyplot as plt

from course_lib.backends import OrtBackend

backends32 = {name: OrtBackend(path, providers=["CPUExecutionProvider"]) for name, path in fp32.items()}
backends8 = {**backends32, **{name: OrtBackend(path, providers=["CPUExecutionProvider"]) for name, path in int8.items()}}
args = dict(image_resolution=SIZE, ddim_steps=STEPS, seed=seeds[2])
image32 = Canny2Image(backends32, tokenizer, tiny).process(photos[2], prompts[2], **args)[0]
image8 = Canny2Image(backends8, tokenizer, tiny).process(photos[2], prompts[2], **args)[0]
fig, axes = plt.subplots(1, 2, figsize=(5, 2.6))
for ax, img, title in zip(axes, (image32, image8), ("fp32", "INT8 ControlNet + UNet")):
    ax.imshow(img)
    ax.set_title(title)
    ax.axis("off")
plt.show()

# %% tags=["nbval-ignore-output"]
agreement = compare_images(image32, image8, with_pd=False)
print(agreement)

# %%
print("PSNR > 20 dB:", agreement.psnr_db > 20, "| images differ (really quantized):", agreement.max_pixel_diff > 0)

# %% [markdown]
# ## 5. SmoothQuant: moving outliers from activations into weights
#
# Activations get **one** scale per tensor. In real SD models a few channels after each LayerNorm are
# much larger than the rest, and they set the step for all the others. SmoothQuant divides input channel
# j by s_j = max|x_j|^α / max|W_:,j|^(1−α) and multiplies the weight column by s_j: the same function,
# narrower activation channels, and the weights (quantized per channel) absorb the difference. The
# division folds into the LayerNorm, so it costs nothing at run time.
#
# The tiny model has random weights and no outliers, so we plant them as SD has them: three LayerNorm
# channels made 20× larger. Then we measure per-channel max |x| at one block's `attn1.to_q` on the
# recorded ControlNet inputs, smooth every transformer block (α = 0.5), and measure again.

# %%
import copy

from torch import nn

from course_lib.precision.smoothquant import activation_channel_max, outlier_ratio, plot_channel_ranges, smooth_transformer_blocks

net = copy.deepcopy(model).positional("controlnet")
with torch.no_grad():
    for module in net.modules():
        if isinstance(module, nn.LayerNorm):
            module.weight[:3] *= 20
feeds = list(calib.reader("controlnet", runs=[0], limit=2).feeds())
before = activation_channel_max(net, feeds)
smoothed = copy.deepcopy(net)
scales = smooth_transformer_blocks(smoothed, before, alpha=0.5)
after = activation_channel_max(smoothed, feeds)
layer = next(name for name in scales if name.endswith("attn1.to_q"))
print("smoothed groups:", len(scales), "| shown:", layer)
print(f"outlier ratio (max / median channel range): before {outlier_ratio(before[layer]):.1f}, "
      f"after {outlier_ratio(after[layer]):.1f}")

# %%
fig = plot_channel_ranges(before[layer], after[layer], title=layer)
plt.show()

# %%
from course_lib.notebook import every     # all(), but "nothing to check" when there are no layers

args_t = [torch.as_tensor(v) for v in feeds[0].values()]
with torch.no_grad():
    diff = max(float((a - b).abs().max() / a.abs().max()) for a, b in zip(net(*args_t), smoothed(*args_t)))
print("same function (relative difference < 1e-4):", diff < 1e-4)
print("outliers at least halved in every smoothed layer:",
      every(outlier_ratio(after[n]) < 0.5 * outlier_ratio(before[n]) for n in scales))

# %% [markdown]
# To use it for INT8: smooth the torch model, export it, calibrate and quantize as in parts 2–3. The
# ONNX graph is the same; only the weights changed. The next section does exactly that, on weights that
# draw something.
#
# ### INT8 on trained weights: what happens to the picture
#
# The tiny model's random weights draw noise, so its PSNR above only says how far the image moved.
# Chapter 1's **toy** (the course's architecture, trained on 64×64 coloured shapes) shows whether an INT8
# image still *follows the hint and the prompt*. The recipe of parts 2–5, on the toy:
#
# * export it in fp32 at 64×64 and record calibration data from its own pipeline (ONNX Runtime, CPU) on
#   6 toy scenes from the *training* stream at 20 DDIM steps, every 4th step (10 samples per run);
# * quantize the ControlNet and the UNet with runs 0–4, the time embedding and first/last convs kept
#   float — and once more after SmoothQuant (α = 0.5, statistics from the same runs);
# * per-model errors on the held-out run 5 (the worst output of each model), then the toy's evaluation.

# %% tags=["nbval-ignore-output"]
from course_lib.precision.smoothquant import smooth_cnsd
from course_lib.toy.quality import compare_toy_pipelines, quantize_controlnet_unet, record_toy_calibration, toy_ort_pipeline
from course_lib.toy.weights import TOY_WEIGHTS, load_toy, weights_status

print(weights_status())
toy_int8 = None
if TOY_WEIGHTS.is_file():
    toy = load_toy()
    toy_fp32 = export_cnsd(toy, out / "toy_fp32", height=SIZE, width=SIZE)
    toy_pipe32 = toy_ort_pipeline(toy_fp32)
    toy_calib = record_toy_calibration(toy_pipe32, out / "toy_calib", n=6, ddim_steps=20, step_stride=4)
    calib_runs, held_out = [0, 1, 2, 3, 4], [5]
    toy_int8 = quantize_controlnet_unet(toy_fp32, toy_calib, out / "toy_int8", runs=calib_runs)
    toy_smooth, _ = smooth_cnsd(toy, {n: toy_calib.reader(n, runs=calib_runs) for n in toy_int8}, alpha=0.5)
    toy_sq32 = export_cnsd(toy_smooth, out / "toy_sq_fp32", height=SIZE, width=SIZE, models=list(toy_int8))
    toy_sq8 = quantize_controlnet_unet(toy_sq32, toy_calib, out / "toy_sq_int8", runs=calib_runs)
    toy_tables = [int8_accuracy(toy_fp32[n], q[n], toy_calib.reader(n, runs=held_out), name=f"{label} {n}")
                  for label, q in (("int8", toy_int8), ("smoothquant", toy_sq8)) for n in q]
    print(AccuracyTable([t.worst() for t in toy_tables], "toy: INT8 vs fp32 on the held-out run (worst output per model)"))

# %% [markdown]
# The evaluation: the same 8 held-out scenes (never calibrated on) and noise seeds through the fp32, the
# INT8 and the SmoothQuant INT8 pipeline (INT8 ControlNet and UNet; CLIP and the decoder stay fp32).
# **Edge F1** and **colour accuracy** as in chapter 1, **PSNR** and the **largest pixel difference** of
# each INT8 image against its fp32 twin. The figure's last rows: the differences, 10× brighter.

# %% tags=["nbval-ignore-output"]
from IPython.display import Markdown, display

toy_cmp = None
if toy_int8 is not None:
    toy_cmp = compare_toy_pipelines({"fp32": toy_pipe32, "int8": toy_ort_pipeline({**toy_fp32, **toy_int8}),
                                     "smoothquant-int8": toy_ort_pipeline({**toy_fp32, **toy_sq8})}, n=8, ddim_steps=20)
    toy_cmp.figure(k=6)
    plt.show()
    display(Markdown(toy_cmp.table()))
    print(", ".join(f"{r.name}: {r.score.n} scenes in {r.score.seconds:.0f} s" for r in toy_cmp.rows))
else:
    print(weights_status())

# %%
if toy_cmp is not None:
    print("toy INT8 models pass TensorRT's Q/DQ rules:", all(q[n].report.passed for q in (toy_int8, toy_sq8) for n in q))
    print("held-out outputs finite, cosine > 0.9:", all(np.isfinite(t.worst().max_abs) and
                                                       min(r.cosine for r in t.rows) > 0.9 for t in toy_tables))
    for name in ("int8", "smoothquant-int8"):
        print(f"{name}: edge F1 within 0.1 of fp32:", abs(toy_cmp.f1_change(name)) <= 0.1,
              "| colour accuracy within 15 points:", abs(toy_cmp.colour_change(name)) <= 0.15)
else:
    print(weights_status())

# %% [markdown]
# Read the two tables together, and beside chapter 3's FP16 rows: per-model errors say how far each call
# moves; over 20 DDIM steps × 2 guidance calls they add up, and the picture-level rows say what that costs
# someone looking at the image. SmoothQuant helps where activation outliers set the INT8 step; a model
# without such outliers gains little from it.
#
# ## 6. What INT8 buys in speed — a number, not a claim
#
# ONNX Runtime on this CPU, one thread, the same UNet input, fp32 vs INT8 Q/DQ:

# %% tags=["nbval-ignore-output"]
from course_lib.precision.evaluation import ort_latency

feed = calib.reader("unet", runs=[2]).load(0)
latency = {kind: ort_latency(path, feed, runs=10, warmup=2, intra_op_threads=1)
           for kind, path in (("fp32", fp32["unet"]), ("int8", int8["unet"]))}
for kind, lat in latency.items():
    print(f"unet {kind}: median {lat.median_ms:.2f} ms, min {lat.min_ms:.2f} ms over {lat.runs} runs")
print(f"INT8 / fp32 median: {latency['int8'].median_ms / latency['fp32'].median_ms:.2f}x")

# %% [markdown]
# Expect INT8 to be *no faster*, often slower, here: ONNX Runtime runs a QDQ graph by dequantizing back to
# float around layers it has no fused kernel for, and the tiny model's layers are too small to be bound
# by memory. **INT8 is not automatically faster.** An honest record from the field:
#
# * In the 2023 TensorRT hackathon (this course's ControlNet task), teams that tried post-training INT8
#   found it **slower than FP16 on their A10 GPUs** — for this model, at that time, the extra work around
#   the INT8 layers cost more than the INT8 kernels saved.
# * Ultralytics report that exporting YOLOv8n to TensorRT INT8 **loses about 4 points of mAP50-95**
#   against FP16 — the accuracy price of PTQ on a small detector.
#
# So: measure both numbers on the target GPU, per model, with the engine you would ship.
#
# ## 7. TensorRT: INT8 vs FP16 on the GPU
#
# The Q/DQ file builds into an INT8 engine directly — no calibrator. On TensorRT 10 the layers left
# unquantized run in FP16 through the FP16 builder flag on a weakly typed network, and the FP16 engine
# is built from the fp32 file the same way. TensorRT 11 and TensorRT for RTX have no such flag: their
# networks are strongly typed, every layer runs in the ONNX's own type, so the FP16 engine comes from
# chapter 3's FP16 ONNX and the INT8 file's unquantized layers stay fp32 (ModelOpt's
# `high_precision="fp16"` would make them FP16). Building needs only a builder (`%%needs trt-builder`):
# TensorRT for RTX builds both files on a CPU — the stored outputs come from such a run. Whether its
# just-in-time compiler then runs INT8 kernels on an RTX GPU is unverified here (no RTX-class GPU).

# %% tags=["requires-trt-builder", "nbval-ignore-output"]
# %%needs trt-builder
from course_lib.precision.fp16 import to_fp16_onnx
from course_lib.trt.build import build_engine_plan
from course_lib.trt.flavour import has_feature, require_tensorrt

weak_fp16 = has_feature(require_tensorrt(), "fp16_flag")          # TensorRT 10: the FP16 builder flag
fp16_unet = fp32["unet"] if weak_fp16 else to_fp16_onnx(fp32["unet"], out / "fp16" / "unet.onnx").path
plans, int8_plans = {}, {}
for kind, path in (("fp16", fp16_unet), ("int8", int8["unet"])):
    plans[kind] = out / "plans" / f"unet.{kind}.plan"
    side = build_engine_plan(path, plans[kind], workspace_gib=2, strongly_typed=not weak_fp16, fp16_flag=weak_fp16)
    int8_plans[kind] = side
    layers = side.extra["layer_types"]
    print(f"unet {kind}: {side.extra['layers']} layers (QUANTIZE {layers.get('QUANTIZE', 0)}, DEQUANTIZE "
          f"{layers.get('DEQUANTIZE', 0)}, CAST {layers.get('CAST', 0)}), {side.precision}, {side.build_seconds:.1f} s")

# %% tags=["requires-trt-builder"]
# %%needs trt-builder
qdq_layers = int8_plans["int8"].extra["layer_types"]
print("the Q/DQ UNet builds, its pairs parsed as QUANTIZE/DEQUANTIZE layers:",
      plans["int8"].is_file() and qdq_layers.get("QUANTIZE", 0) > 0 and qdq_layers.get("DEQUANTIZE", 0) > 0)

# %% tags=["requires-gpu", "requires-tensorrt", "nbval-ignore-output"]
# %%needs gpu tensorrt
from course_lib.timing import summarize, time_cuda
from course_lib.trt.engine import Engine

cuda_feed = {k: torch.as_tensor(v).cuda() for k, v in feed.items()}
trt_ms, trt_out = {}, {}
for kind, plan in plans.items():
    engine = Engine(plan).load().activate()
    trt_out[kind] = engine.infer(cuda_feed)["latent"].clone().cpu()
    trt_ms[kind] = summarize(time_cuda(lambda: engine.infer(cuda_feed), warmup=5, iters=50))
    print(f"unet {kind}: {trt_ms[kind]}")
ref = torch.as_tensor(OrtBackend(fp32["unet"], providers=["CPUExecutionProvider"]).infer(
    {k: torch.as_tensor(v) for k, v in feed.items()})["latent"])
for kind, latent in trt_out.items():
    cos = torch.nn.functional.cosine_similarity(latent.flatten().float(), ref.flatten(), dim=0)
    print(f"{kind} engine vs fp32 ONNX Runtime: cosine {float(cos):.4f}")

# %% [markdown]
# ## Exercises
#
# **1.** By hand: the symmetric INT8 scale of a tensor whose largest |x| is 2.54, and the integer that 1.0
# becomes. Fill in and run the check.

# %%
from course_lib.notebook import answered      # the checks below say "not done yet" until you have answered

### BEGIN SOLUTION: scale_ex1, the symmetric INT8 scale for max |x| = 2.54, and q_of_one, the integer 1.0 becomes
scale_ex1 = 2.54 / 127
q_of_one = int(np.round(1.0 / scale_ex1))
### END SOLUTION
if answered("exercise 1", scale_ex1, q_of_one):
    assert abs(scale_ex1 - 0.02) < 1e-9 and q_of_one == 50
    print("exercise 1: correct")

# %% [markdown]
# **2.** The course calibrates at 20 DDIM steps with separate CFG calls. How many UNet samples do 8 photos
# give, and how many with `step_stride=4` (every 4th step: 0, 4, 8, 12, 16)? Check the formula against
# this chapter's manifest first.

# %%
### BEGIN SOLUTION: samples_per_run(steps, stride=1), the UNet samples one photo gives
samples_per_run = lambda steps, stride=1: len(range(0, steps, stride)) * 2   # noqa: E731
### END SOLUTION
if answered("exercise 2", samples_per_run):
    assert len(calib.samples("unet")) == len(photos) * samples_per_run(STEPS)
    full, strided = 8 * samples_per_run(20), 8 * samples_per_run(20, 4)
    assert (full, strided) == (320, 80)
    print("exercise 2: correct")

# %% [markdown]
# **3.** Which layers would stay float if we *also* kept the attention matmuls (q·kᵀ and softmax·v) out of
# INT8? Count them with `sensitive_nodes` for the UNet, without quantizing again.

# %%
unet_groups = sensitive_nodes(fp32["unet"])
### BEGIN SOLUTION: kept_with_attention, the UNet layers that would stay float, from unet_groups
kept_with_attention = sum(len(unet_groups[g]) for g in ("time_embed", "first_last_conv", "attention"))
### END SOLUTION
if answered("exercise 3", kept_with_attention):
    assert kept_with_attention == len(reports["unet"].float_layers) + len(unet_groups["attention"])
    assert len(unet_groups["attention"]) % 2 == 0          # two matmuls per attention layer
    print("exercise 3: correct")

# %% [markdown]
# ## Hand it in (the INT8 homework)
#
# The INT8 homework hands in the Q/DQ ControlNet and UNet of **your** seed's model, made by this
# chapter's recipe (fp32 export, calibration recorded from the pipeline, `quantize_int8` with the time
# embedding and the first/last convs kept float), with their sidecars. The grader rebuilds the fp32 model
# from your seed and re-checks on a CPU: TensorRT's Q/DQ rules, how much of each model is INT8, and the
# INT8 outputs against fp32 on fresh inputs (cosine ≥ 0.98). The cell writes `homework/int8/` and runs
# those tests here; then, in a terminal:
# `python -m course_lib submit --hw int8 --student YOUR_ID --seed YOUR_SEED --out int8.zip`.

# %%
from course_lib.homework.handin import write_int8_evidence
from course_lib.homework.submit import submit

SEED, STUDENT = 0, "your-id"                     # <- the seed your instructor issued, your ID
write_int8_evidence(build_cnsd(tiny, seed=SEED), "homework", height=SIZE, width=SIZE, steps=STEPS)
dry_run = submit("int8", STUDENT, SEED, out=None)
print(dry_run.report())

# %% [markdown]
# ## Self-check
# What this chapter must leave behind: calibration data recorded from the pipeline (runs × steps × 2
# calls per model), INT8 ControlNet and UNet files that pass TensorRT's Q/DQ rules while a uint8 one
# fails them, accuracy measured on held-out data, SmoothQuant keeping the function, and the INT8
# homework's checks passing for your seed.

# %%
assert all(len(calib.samples(n)) == len(photos) * STEPS * 2 for n in ("controlnet", "unet"))
assert all(report.passed and report.per_tensor_weights == 0 for report in reports.values())
assert not asym_report.passed
assert all(np.isfinite(r.max_abs) and r.cosine > 0.95 for r in rows)
assert agreement.psnr_db > 20 and agreement.max_pixel_diff > 0
assert diff < 1e-4 and outlier_ratio(after[layer]) < outlier_ratio(before[layer])
assert dry_run.passed
if toy_cmp is not None:                                   # trained toy: INT8 keeps the picture's edges
    assert all(q[n].report.passed for q in (toy_int8, toy_sq8) for n in q)
    assert abs(toy_cmp.f1_change("int8")) <= 0.1
print("chapter 5 self-check passed")
