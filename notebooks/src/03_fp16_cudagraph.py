# %% [markdown]
# # Chapter 3 — FP16, CUDA graphs and pipeline-level speedups
#
# Chapter 2 ran canny2image on engines. Now we make it fast, and show *why* each step helps, with
# numbers from a real GPU:
#
# 1. **FP16**: where Stable Diffusion leaves FP16's range, a range survey, and an FP16 ONNX the
#    TensorRT 11 way (strongly typed: the precision is in the graph, not in a builder flag);
# 2. **debugging precision**: a layer-wise comparison that names the first layer going bad;
# 3. **pipeline switches**: cond + uncond as one batch of 2, text and hint computed once, fewer steps,
#    reusing the previous step's noise estimate;
# 4. **CUDA graphs and the H100 benchmark**: at 256×384 the pipeline is bound by kernel *launches*, not
#    by FLOPs — measure per stage before tuning.
#
# The CPU part runs everywhere on the `tiny` preset (and on chapter 1's trained toy, to see what FP16 does
# to a picture); GPU cells are tagged and run on a GPU machine.

# %% [markdown]
# ## 1. FP16 in numbers
#
# FP16 has 5 exponent bits and 10 stored mantissa bits (11 with the implicit one). Three facts decide
# what breaks:

# %%
# %load_ext course_lib.notebook
import torch

f16 = torch.finfo(torch.float16)
print(f"largest value      {f16.max:.0f}")
print(f"smallest normal    {f16.tiny:.2e}")
print(f"relative step      {f16.eps:.2e}  (11 bits of mantissa)")
print(f"spacing near 999:  {float(torch.tensor(999.0).half().float() - torch.tensor(998.5).half().float()):.1f}"
      "  -> cos(t * freq) of a timestep embedding is off by up to 0.25")
print("256.0**2 in fp16 =", (torch.tensor(256.0, dtype=torch.float16) ** 2).item(),
      "| exp(12) in fp16 =", torch.tensor(12.0, dtype=torch.float16).exp().item())

# %% [markdown]
# Where Stable Diffusion meets those limits:
#
# * **attention scores** `q·kᵀ` grow with the head size and the token count, and `exp()` in the softmax
#   overflows past 11 — the original computes the softmax in FP32;
# * **LayerNorm / GroupNorm statistics**: the variance sums `(x − mean)²`, which passes 65504 as soon as
#   a value strays 256 from its mean — the original's `GroupNorm32` computes in FP32;
# * **the CLIP causal mask**: `−inf` (or float32's minimum) becomes `−inf` in FP16 and a fully masked
#   row gives NaN; the course's CLIP uses a constant −1e4 instead;
# * **the timestep embedding**: `cos(t · freq)` with t up to 999 needs more than FP16's 0.5 spacing.
#
# ## 2. A range survey
#
# Forward hooks record the largest |x| at every layer (plus the squared deviations inside each norm and
# every softmax input), in execution order. Anything above the red line cannot be stored in FP16.

# %%
import matplotlib.pyplot as plt

from course_lib.cnsd import build_cnsd, contracts, example_inputs, get_config
from course_lib.precision.ranges import plot_ranges, survey_ranges

tiny = get_config("tiny")
model = build_cnsd(tiny, seed=0)
small = contracts(tiny, batch=1, height=128, width=192)
ranges = {name: survey_ranges(model.positional(name), example_inputs(small[name], seed=1), title=name)
          for name in ("clip", "controlnet", "unet", "decoder")}
for name, table in ranges.items():
    print(f"{name:<11} points {len(table.rows):>4} | over 65504: {len(table.overflows)} | "
          f"largest |x| < 65504: {max(r.max_abs for r in table.rows) < 65504}")

# %%
fig = plot_ranges(ranges["unet"], title="tiny UNet: max |x| per layer (log scale)")
plt.show()

# %% [markdown]
# With random weights nothing overflows; with the real sd15 weights run the same survey on your GPU
# machine (the cell below) and look at the `norm x^2` and `softmax input` points.
# The CLIP row is instructive anyway: its largest softmax input is the causal mask's −1e4 — in range.

# %%
clip_softmax = [r for r in ranges["clip"].rows if r.point == "softmax input"]
print("CLIP softmax inputs reach the -1e4 mask:", max(r.max_abs for r in clip_softmax) >= 1e4,
      "| and stay in fp16 range:", max(r.max_abs for r in clip_softmax) < 65504)

# %% tags=["requires-gpu", "nbval-ignore-output"]
# %%needs gpu
# GPU machine: the same survey on the real model (pass your checkpoint path) at the course's size.
from course_lib.cnsd import load_checkpoint  # noqa: E402

sd15 = build_cnsd(get_config("sd15"), seed=0)
# load_checkpoint("control_sd15_canny.pth", sd15)   # <- with the real weights the picture changes
sd15 = sd15.cuda()
sd15_feed = {k: v.cuda() for k, v in example_inputs(contracts(sd15.config)["unet"], seed=1).items()}
sd15_unet = survey_ranges(sd15.positional("unet"), sd15_feed, title="sd15 UNet (random weights)")
print(sd15_unet.summary())
plot_ranges(sd15_unet)
plt.show()

# %% [markdown]
# ## 3. An FP16 ONNX, strongly typed
#
# TensorRT 11 removed the FP16 builder flag: an FP16 engine comes from an FP16 ONNX. `to_fp16_onnx`
# converts an exported FP32 model (ModelOpt AutoCast where installed, else onnxconverter-common),
# keeping `LayerNormalization`, `InstanceNormalization` (GroupNorm), `Softmax`, the timestep embedding's
# `Sin`/`Cos` chain and reductions in FP32, and the model's inputs and outputs float32 — so every
# caller feeds the same arrays as before.

# %% tags=["nbval-ignore-output"]
from pathlib import Path

from course_lib.onnx.export_cnsd import export_cnsd
from course_lib.precision.fp16 import precision_report, to_fp16_onnx

out = Path("out/03_fp16")
fp32 = export_cnsd(model, out / "fp32", height=128, width=192)
fp16 = {name: to_fp16_onnx(result.path, out / "fp16" / f"{name}.onnx")
        for name, result in fp32.items()}
report = precision_report(fp16["unet"].path)
print(report)

# %%
float_io = {d for _, d in report.inputs + report.outputs if d != "int32"}       # timestep stays int32
print("UNet float inputs/outputs stay float32:", float_io == {"float32"})
kept = {op for op, _ in report.fp32_nodes}
print("kept in FP32:", sorted(kept & {"InstanceNormalization", "LayerNormalization", "Softmax", "Sin", "Cos"}))

# %% [markdown]
# ### FP16 vs FP32 in ONNX Runtime
#
# ONNX Runtime's CPU provider has few FP16 kernels and runs most FP16 ops through casts to FP32 it
# inserts itself: this shows **correctness** (how far the outputs move), not speed. Speed is the
# GPU's part below.

# %% tags=["nbval-ignore-output"]
from course_lib.onnx.compare import ComparisonTable, compare_outputs
from course_lib.onnx.session import run_ort

parity = {}
for name in fp32:
    feed = example_inputs(small[name], seed=2)
    parity[name] = compare_outputs(run_ort(fp32[name].path, feed), run_ort(fp16[name].path, feed),
                                   rtol=5e-3, atol=5e-3)
fp16_table = ComparisonTable.combine(parity, title="FP16 vs FP32 ONNX (ONNX Runtime CPU)")
fp16_table

# %%
worst_rel = max(r.max_rel for r in fp16_table.rows)
print("every output within 5e-3 of its scale:", worst_rel < 5e-3, "| no NaN/Inf:", not any(r.note for r in fp16_table.rows))

# %% [markdown]
# ### FP16 on trained weights: what happens to the picture
#
# The table above says how far each output moves, on random weights and random inputs. Whether the
# *image* changes is another question, and random weights draw noise either way. Chapter 1's **toy**
# (the course's architecture, trained on 64×64 coloured shapes) can answer it: export it as in section
# 3, convert it with the same `to_fp16_onnx`, and first the same per-model errors:

# %% tags=["nbval-ignore-output"]
from IPython.display import Markdown, display

from course_lib.toy.quality import compare_toy_pipelines, toy_ort_pipeline
from course_lib.toy.weights import TOY_WEIGHTS, load_toy, weights_status

print(weights_status())
toy_fp16 = None
if TOY_WEIGHTS.is_file():
    toy = load_toy()
    toy_fp32 = export_cnsd(toy, out / "toy_fp32", height=64, width=64)
    toy_fp16 = {name: to_fp16_onnx(result.path, out / "toy_fp16" / f"{name}.onnx") for name, result in toy_fp32.items()}
    toy_small = contracts(toy.config, batch=1, height=64, width=64)
    toy_feeds = {name: example_inputs(toy_small[name], seed=2, vocab_size=toy.config.clip.vocab_size) for name in toy_fp32}
    toy_table = ComparisonTable.combine({name: compare_outputs(run_ort(toy_fp32[name].path, toy_feeds[name]),
                                                               run_ort(toy_fp16[name].path, toy_feeds[name]),
                                                               rtol=5e-3, atol=5e-3) for name in toy_fp32},
                                        title="toy: FP16 vs FP32 ONNX (ONNX Runtime CPU)")
    display(toy_table)

# %% [markdown]
# Then the toy's evaluation on both (ONNX Runtime, CPU): 12 held-out scenes, each with the same noise
# seed for fp32 and FP16, 20 DDIM steps, CFG 9. **Edge F1** and **colour accuracy** say whether the image
# still follows the hint and the prompt; **PSNR** and the **largest pixel difference** compare each FP16
# image with its fp32 twin. Below the hints: the fp32 and FP16 images and their difference, 10× brighter.

# %% tags=["nbval-ignore-output"]
toy_cmp = None
if toy_fp16 is not None:
    toy_cmp = compare_toy_pipelines({"fp32": toy_ort_pipeline(toy_fp32), "fp16": toy_ort_pipeline(toy_fp16)},
                                    n=12, ddim_steps=20)
    toy_cmp.figure(k=6)
    plt.show()
    display(Markdown(toy_cmp.table()))
    print(", ".join(f"{r.name}: {r.score.n} scenes in {r.score.seconds:.0f} s" for r in toy_cmp.rows))
else:
    print(weights_status())

# %%
if toy_cmp is not None:
    print("toy, every output finite in FP16 (no NaN/Inf):", not any(r.note for r in toy_table.rows))
    print("FP16 edge F1 within 0.05 of fp32:", abs(toy_cmp.f1_change("fp16")) <= 0.05,
          "| colour accuracy within 10 points:", abs(toy_cmp.colour_change("fp16")) <= 0.10)
    print("FP16 images close to fp32 (PSNR > 30 dB):", toy_cmp.row("fp16").psnr_db > 30)
else:
    print(weights_status())

# %% [markdown]
# The errors of single calls add up over 20 DDIM steps × 2 guidance calls; what counts is whether they
# stay small enough for the picture to keep its edges and its colours — the lines above say so for this
# FP16 recipe (Softmax, the norms and the timestep embedding in FP32). ONNX Runtime's CPU provider runs the
# FP16 graph through casts of its own, so its seconds say nothing about FP16 speed: that is the GPU part.

# %% [markdown]
# ## 4. Which layer goes bad first?
#
# A whole-model error says *that* something is off, not *where*. Polygraphy can mark every tensor of
# a graph as an output; running the FP32 and the FP16 model that way and comparing tensor by tensor in
# graph order names the first layer out of tolerance. To see it work, convert the ControlNet once more
# but **without** keeping the timestep embedding in FP32:

# %% tags=["nbval-ignore-output"]
from course_lib.onnx.compare import layerwise_compare
from course_lib.precision.fp16 import KEEP_FP32_OPS

naive_ops = tuple(op for op in KEEP_FP32_OPS if op not in ("Sin", "Cos"))
naive = to_fp16_onnx(fp32["controlnet"].path, out / "naive" / "controlnet.onnx", keep_fp32_ops=naive_ops)
feed = example_inputs(small["controlnet"], seed=3)
feed["timestep"][:] = 951                       # a late DDIM timestep: t * freq is large
naive_layers = layerwise_compare(fp32["controlnet"].path, naive.path, feed, rtol=1e-2, atol=1e-2)
kept_layers = layerwise_compare(fp32["controlnet"].path, fp16["controlnet"].path, feed, rtol=1e-2, atol=1e-2)
print(naive_layers.first_bad)

# %%
first = naive_layers.first_bad
print("naive FP16: first tensor out of tolerance comes from a", first.model.split()[0] if first else None, "node")
print("Sin/Cos kept in FP32: that tensor passes:", kept_layers.first_bad is None or kept_layers.first_bad.name != first.name)

# %% [markdown]
# ## 5. Pipeline-level switches
#
# Before touching kernels, do less work:
#
# * **batched guidance**: the original calls ControlNet and UNet twice per step (cond, then uncond);
#   one call with a batch of 2 halves the launches and fills the GPU better. The maths is the same, so
#   the image must not change;
# * **text and hint once**: CLIP runs once per prompt, and the hint is the same at every step;
# * **fewer steps** and **reusing the previous step's noise estimate** on some steps trade quality for
#   time. We measure them below against the 20-step image.
#
# There is one pipeline, `Canny2Image`. How each DDIM step gets its eps is a **strategy** it is given
# (`course_lib.pipeline.eps`). The default, `GuidedEps("separate")`, is the original:

# %%
from course_lib.cnsd.tokenizer import byte_level_tokenizer
from course_lib.pipeline.canny2image import Canny2Image
from course_lib.pipeline.eps import GuidedEps
from course_lib.samples import sample_photo
from course_lib.score import max_pixel_diff, psnr

photo = sample_photo(size=(128, 192))
pipe = Canny2Image.from_torch(model, byte_level_tokenizer())
separate = pipe.process(photo, "a bird", image_resolution=128, ddim_steps=20)[0]
pipe.eps = GuidedEps("batched")
batched = pipe.process(photo, "a bird", image_resolution=128, ddim_steps=20)[0]
print("batched guidance, same image (max pixel difference <= 1):", max_pixel_diff(separate, batched) <= 1)

# %% [markdown]
# Every switch of the chapter is either a **backend** choice (fp16 weights, SDPA attention,
# `torch.compile`) or an **eps strategy** plugged into that same pipeline: `GuidedEps` (separate or
# batched), `HintOnce`, `GraphedEps` (section 6) and `ReuseEps`. Fewer steps is just `ddim_steps=`.
# A variant's name spells its switches (`fp16-batched-graph-sdpa`, ...). `make_pipeline` builds a
# variant on a torch model, and `eps_strategy` gives its strategy alone. Fewer steps and eps reuse
# change the image; how much is the price (with random weights the PSNR only says how far the image
# moved).

# %%
from course_lib.pipeline.eps import eps_reuse_steps
from course_lib.pipeline.speedups import Switches, eps_strategy, make_pipeline

print("fp16-batched-graph-sdpa-hint-once-reuse-eps4 ->", eps_strategy("fp16-batched-graph-sdpa-hint-once-reuse-eps4", model))
reference = make_pipeline(model, byte_level_tokenizer(), "fp32-batched", device="cpu") \
    .process(photo, "a bird", image_resolution=128, ddim_steps=20)[0]
print("make_pipeline('fp32-batched') == the batched pipeline above:", bool((reference == batched).all()))
print("eps reused on steps", eps_reuse_steps(20, every=4), "of 20")
quality = {}
for name in ("fp32-batched-steps10", "fp32-batched-steps5", "fp32-batched-reuse-eps4", "fp32-batched-reuse-eps2"):
    switches = Switches.from_name(name)
    variant = make_pipeline(model, byte_level_tokenizer(), switches, device="cpu")
    quality[name] = psnr(reference, variant.process(photo, "a bird", image_resolution=128,
                                                    ddim_steps=switches.steps or 20)[0])
print("every variant moves the image, none destroys it (PSNR between 15 and 60 dB):",
      all(15 < q < 60 for q in quality.values()))

# %% tags=["nbval-ignore-output"]
for name, q in quality.items():
    print(f"{name:<28} PSNR vs 20 steps: {q:5.1f} dB")

# %% [markdown]
# The strategies work on any backends. Here eps reuse runs on ONNX Runtime, with the FP32 exports of
# section 3 (static batch 1, so guidance stays "separate"). Hint once is the exception: it feeds the
# ControlNet its hint block's output, and only the torch ControlNet can take that. The course's ONNX and
# TensorRT ControlNets take the canny hint, so the pipeline refuses with one sentence.

# %%
from course_lib.backends import make_backends
from course_lib.pipeline.eps import HintOnce, ReuseEps

ort_backends = make_backends("ort", onnx_dir=out / "fp32")
reuse = {kind: Canny2Image(backends, byte_level_tokenizer(), tiny, eps=ReuseEps(every=4))
         .process(photo, "a bird", image_resolution=128, ddim_steps=20)[0]
         for kind, backends in (("torch", pipe.backends), ("ort", ort_backends))}
print("reuse-eps4 on ONNX Runtime = on torch (max pixel difference <= 2):", max_pixel_diff(reuse["ort"], reuse["torch"]) <= 2)
try:
    Canny2Image(ort_backends, byte_level_tokenizer(), tiny, eps=HintOnce(model)) \
        .process(photo, "a bird", image_resolution=128, ddim_steps=1)
    hint_once_error = None
except ValueError as e:
    hint_once_error = str(e)
print("hint once on ONNX Runtime:", hint_once_error.split(";")[0])

# %% [markdown]
# ## 6. CUDA graphs
#
# Each DDIM step launches hundreds of small kernels (≈ 10 µs each at these shapes). The CPU can't
# enqueue them as fast as the H100 runs them. A **CUDA graph** records one step's kernels once and
# replays them with a single launch. What a graph records is fixed: the kernels, their launch
# parameters and **the addresses** of every buffer. So
#
# * inputs must be copied into the same static buffers before each replay, and outputs read from the
#   same static buffers after it;
# * a new shape (another image size or batch) means a new capture;
# * the first run happens outside the graph (a warm-up: cuDNN picks algorithms, allocators settle).
#
# That is chapter 2's rule (§3.4), and `course_lib.cudagraph.CudaGraph` applies it everywhere:
#
# * `GraphedEps` graphs a whole DDIM step: ControlNet, UNet and guidance, both branches. The step's
#   inputs are x, the timestep, the contexts and the hint, so one capture serves all 20 steps and every
#   image of that size. It graphs torch backends, or TensorRT backends made with
#   `use_cuda_graph=False` (one graph holds the whole step). It can't graph ONNX Runtime, whose feeds
#   go through host memory;
# * `GraphedBackend` graphs one backend: the ladder uses it for CLIP and the decoder;
# * `Engine.infer(use_cuda_graph=True)` graphs one TensorRT engine.
#
# On the GPU machine, the sd15 UNet with and without its graph:

# %% tags=["requires-gpu", "nbval-ignore-output"]
# %%needs gpu --see docs/benchmarks.md, "Chapter 3" (the pipeline with and without CUDA graphs on an H100)
from course_lib.cudagraph import CudaGraph  # noqa: E402
from course_lib.timing import summarize, time_cuda  # noqa: E402

gpu_model = sd15.half()                             # the sd15 model of section 2, now in fp16
unet_feed = {k: (v.half() if v.is_floating_point() else v).cuda()
             for k, v in example_inputs(contracts(gpu_model.config, batch=2)["unet"], seed=0).items()}
unet = gpu_model.positional("unet")
with torch.inference_mode():
    eager = summarize(time_cuda(lambda: unet(*unet_feed.values()), warmup=3, iters=20))
    graphed_unet = CudaGraph(unet, "sd15 UNet")       # warm-up and capture happen in time_cuda's warm-up
    graphed = summarize(time_cuda(lambda: graphed_unet(*unet_feed.values()), warmup=3, iters=20))
print(f"sd15 UNet fp16, batch 2, 256x384: eager {eager['median']:.1f} ms, CUDA graph {graphed['median']:.1f} ms "
      f"({graphed_unet.last_action})")

# %% [markdown]
# ## 7. The H100 benchmark
#
# `tools/bench_h100.py` climbs the ladder on an H100 with the sd15 sizes (random weights: timing does
# not depend on their values) at the hackathon settings — 256×384, 20 DDIM steps, CFG 9, batch 1 — and
# stores raw per-image timings. The numbers below are read from the committed results
# (`docs/bench/h100_ch3.json`), so this cell runs anywhere; `docs/benchmarks.md` has the full tables.

# %%
import json

from course_lib.notebook import course_file          # the repository's docs/, from notebooks/ or notebooks/student/

bench = json.loads(course_file("docs/bench/h100_ch3.json").read_text())
env = bench["environment"]
print(f"measured on {env['gpu']}, driver {env['driver']}, torch {env['torch']}, CUDA {env['cuda']}")
print(f"compute floor: {bench['image_tflop']:.1f} TFLOP per image -> {bench['floor_ms']:.1f} ms at 800 TFLOP/s")
baseline = next(r for r in bench["results"] if r["variant"] == bench["baseline"])["total"]["median"]
print(f"{'variant':<44}{'median ms':>10}{'p10-p90 ms':>16}{'speed-up':>9}")
for r in bench["results"]:
    if "total" in r:
        t = r["total"]
        print(f"{r['variant']:<44}{t['median']:>10.0f}{t['p10']:>8.0f}-{t['p90']:<7.0f}{baseline / t['median']:>8.1f}x")

# %%
best = min((r for r in bench["results"] if "total" in r), key=lambda r: r["total"]["median"])
print("best path at least 8x faster than the fp32 original:", baseline / best["total"]["median"] >= 8)
print("best path within 3x of the compute floor (<= 60 ms):", best["total"]["median"] <= 3 * bench["floor_ms"])
fig, ax = plt.subplots(figsize=(8, 3.5))
rows = [r for r in bench["results"] if "total" in r]
ax.barh([r["variant"] for r in rows], [r["total"]["median"] for r in rows], color="tab:blue")
ax.axvline(bench["floor_ms"], color="red", linestyle="--", label="compute floor")
ax.set_xscale("log")
ax.set_xlabel("ms per image (median), H100, sd15 sizes, 256x384, 20 steps")
ax.invert_yaxis()
ax.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# Read it as a story: fp32 with separate cond/uncond calls is launch-bound and noisy; FP16 + batched
# CFG halves it; a CUDA graph per step is the big jump (launch overhead gone); SDPA attention and the
# hint-once trick add a little; `torch.compile` fuses kernels (GroupNorm + SiLU, attention epilogues)
# and lands near 160 ms — still about 8× the floor, because at these small shapes each kernel is
# short and the matrix units idle between them.
#
# ### 7b. Where the last 160 ms go: Hopper without TensorRT
#
# `tools/hopper_speed.py` measures more switches in one run, side by side with the fp32 original and
# against its image (`Switches` names them: `loop-graph` captures the whole 20-step DDIM loop in one
# CUDA graph with static buffers, `cl` channels-last convolutions, `fp8` FP8 linears through
# `torch._scaled_mm`, `compile-max` inductor's max-autotune), and profiles one DDIM step by kernel
# class. The committed run (an H200; the table and the analysis are in `docs/benchmarks.md`):

# %%
from IPython.display import Image, Markdown, display  # noqa: E402

from course_lib.profiling import kernel_table  # noqa: E402
from course_lib.speed_report import speed_table  # noqa: E402

hopper = json.loads(Path("../docs/bench/h200_hopper.json").read_text())
from course_lib.pipeline.speedups import HOPPER_LADDER  # noqa: E402

measured = {r["variant"] for r in hopper["variants"] if "total" in r}
print(f"measured on {hopper['environment']['gpu']}, torch {hopper['environment']['torch']}, "
      f"floor {hopper['settings']['floor_ms']:.1f} ms")
print("switches not measured in that run (no device time left):",
      sorted({v for v in HOPPER_LADDER if v not in measured} | {s["what"] for s in hopper["skipped"]}))
display(Markdown(speed_table(hopper)))
display(Markdown(kernel_table({k: v for k, v in hopper["profiles"].items() if "classes" in v})))
display(Image("../docs/bench/h200_hopper.png", width=900))

# %% [markdown]
# Read the profile before reaching for a switch. In eager PyTorch a third of the step is *layout*:
# cuDNN's fast convolutions want NHWC, the model holds NCHW, so 221 `nchwToNhwc` kernels run per step;
# `torch.compile` removes them (and fuses GroupNorm + SiLU and most elementwise work: 1971 kernels →
# 1069). What is left is real work at small sizes — 339 GEMMs of about 5 µs at 1536 tokens — running at
# ~16% of the matmul peak. Capturing the whole loop as one graph gives the same image bit for bit and no
# time: once a step is one replay, launches are no longer the problem. And 19 of the 164 ms are host work
# (Canny on the CPU, tokenizing, the copy back), as much as the floor itself. Fewer steps are the only
# rows near 60 ms here, and they draw another image (8 steps: 41 dB from the fp32 one).
#
# TensorRT does the same fusions with its own kernels: the cells below build FP16 engines from the FP16
# ONNX of section 3 (with any TensorRT builder: on a CPU with TensorRT for RTX) and time them on a GPU.

# %% tags=["requires-trt-builder", "nbval-ignore-output"]
# %%needs trt-builder
from course_lib.trt import inspect_onnx  # noqa: E402
from course_lib.trt.build import build_engine_plan  # noqa: E402
from course_lib.trt.profiles import onnx_input_dims, shapes_at, static_profile  # noqa: E402

plans = {}
for name in ("controlnet", "unet"):
    onnx_path = fp16[name].path
    profile = static_profile(shapes_at(onnx_input_dims(onnx_path), batch=1, height=128, width=192))
    plans[name] = build_engine_plan(onnx_path, out / "plans" / f"{name}_fp16.plan", profile, workspace_gib=2)
    fp32_net = inspect_onnx(fp32[name].path)
    print(f"{name}: {plans[name].precision}, {plans[name].extra['layers']} layers "
          f"({fp32_net.layers} from the fp32 ONNX), CAST layers {plans[name].extra['layer_types'].get('CAST', 0)} "
          f"(fp32: {fp32_net.count('CAST')}), built in {plans[name].build_seconds:.1f} s")

# %% tags=["requires-trt-builder"]
# %%needs trt-builder
print("FP16 plans, strongly typed, precision from the ONNX:",
      all(p.strongly_typed and p.precision.startswith("as in the ONNX (float16") for p in plans.values()))

# %% [markdown]
# Those two cells need only a TensorRT builder (`%%needs trt-builder`): TensorRT for RTX builds the FP16
# plans on a CPU, and the stored outputs come from such a run. Timing them needs a GPU that runs them
# (with TensorRT for RTX: unverified, the course's machines have no RTX-class GPU).

# %% tags=["requires-tensorrt", "requires-gpu", "nbval-ignore-output"]
# %%needs gpu tensorrt
from course_lib.timing import summarize, time_cuda  # noqa: E402
from course_lib.trt.engine import Engine  # noqa: E402

for name in plans:
    engine = Engine(out / "plans" / f"{name}_fp16.plan")
    engine.load()
    engine.activate()
    engine.allocate_buffers()
    feed = {k: v.cuda() for k, v in example_inputs(small[name], seed=4).items()}
    for graph in (False, True):
        t = summarize(time_cuda(lambda: engine.infer(feed, use_cuda_graph=graph), warmup=3, iters=50))
        print(f"{name} fp16 engine, CUDA graph {graph}: {t['median']:.3f} ms ({engine.last_action})")

# %% [markdown]
# ## Self-check

# %%
assert all(len(t.overflows) == 0 for t in ranges.values())
assert float_io == {"float32"}
assert {"InstanceNormalization", "Softmax"} <= kept
assert worst_rel < 5e-3
assert first is not None and first.model.split()[0] in ("Sin", "Cos")
assert max_pixel_diff(separate, batched) <= 1 and (reference == batched).all()
assert max_pixel_diff(reuse["ort"], reuse["torch"]) <= 2
assert hint_once_error is not None and "only the torch ControlNet" in hint_once_error
if toy_cmp is not None:                                   # trained toy: FP16 keeps the picture
    assert abs(toy_cmp.f1_change("fp16")) <= 0.05 and toy_cmp.row("fp16").psnr_db > 30
print("chapter 3 self-check passed")
