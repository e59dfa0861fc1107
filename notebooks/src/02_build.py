# %% [markdown]
# # Chapter 2 — TensorRT engines, the engine runtime, the pipeline on any backend, scoring
#
# Chapter 1 left four ONNX files that compute the same functions as the PyTorch modules. This chapter
# turns them into something that runs the course's pipeline, and measures the result:
#
# 1. the pipeline on ONNX Runtime against PyTorch, **step by step** through DDIM;
# 2. the **Backend** interface: one `infer(feed)` for PyTorch, ONNX Runtime and TensorRT, mixed at will;
# 3. TensorRT's ideas that need no GPU: the TensorRT 8 → 10/11 API, **optimisation profiles**, the
#    plan's **sidecar**, and the **CUDA-graph** rule (warm up, capture, replay);
# 4. the course **score**: PD, latency, and how they combine;
# 5. **TensorRT or TensorRT for RTX**: the two flavours of TensorRT, and which one your GPU wants;
# 6. **build** the four plans — on any CPU with TensorRT for RTX: the parsed network, profiles, memory
#    pool, optimisation level, timing cache, plan sizes, static vs dynamic;
# 7. on a GPU: run the plans, time them with and without CUDA graphs, and the harness for homework 2.
#
# Parts 1–4 run on a CPU with the `tiny` preset and need no TensorRT. Parts 5 and 6 need a TensorRT
# *builder* (cells starting with `%%needs trt-builder`): TensorRT for RTX (`pip install tensorrt-rtx`)
# builds on a CPU, so they run on a laptop and in the course's CI; their stored outputs come from such a
# run (two CPU cores, no GPU). Part 7 needs a GPU that runs the plans (`%%needs gpu tensorrt`): on a
# machine without one each of its cells prints one line saying so, and Run All goes on.

# %% tags=["nbval-ignore-output"]
# %load_ext course_lib.notebook
from course_lib.env import detect

print(detect().report())   # parts 5-6 need a TensorRT builder here, part 7 a GPU that runs the plans

# %% [markdown]
# ## 1. The pipeline on ONNX Runtime, step by step
#
# First the artifacts: the tiny model (same seed as chapter 1) and its four ONNX files at 128×192.
# Chapter 1 wrote the same files; re-exporting them here (a few seconds) lets this chapter stand alone.

# %%
from pathlib import Path

from course_lib.cnsd import build_cnsd, get_config
from course_lib.onnx.export_cnsd import export_cnsd

tiny = get_config("tiny")
model = build_cnsd(tiny, seed=0)
out = Path("out/02_build")
onnx_dir = out / "onnx"
exports = export_cnsd(model, onnx_dir, height=128, width=192)
print(sorted(p.name for p in onnx_dir.glob("*.onnx")))

# %% [markdown]
# `make_backends(kind, ...)` gives one backend per sub-model: `"torch"` wraps the modules, `"ort"` opens
# `onnx_dir/<name>.onnx` in ONNX Runtime, `"trt"` loads `plan_dir/<name>.plan` (part 5). The pipeline
# takes either dict. With `record_latents=True` it keeps the latent after every DDIM step, so we can
# see *where* two backends start to drift apart, not only whether the final images differ.

# %%
from course_lib.backends import make_backends
from course_lib.pipeline.canny2image import Canny2Image
from course_lib.cnsd.tokenizer import byte_level_tokenizer
from course_lib.samples import sample_photo

tokenizer = byte_level_tokenizer()
photo = sample_photo(size=(128, 192))
backends = {kind: make_backends(kind, model, onnx_dir=onnx_dir) for kind in ("torch", "ort")}
images, latents = {}, {}
for kind, chosen in backends.items():
    pipe = Canny2Image(chosen, tokenizer, tiny, record_latents=True)
    images[kind] = pipe.process(photo, "a bird", image_resolution=128, ddim_steps=20)[0]
    latents[kind] = pipe.last_latents
step_err = [float((a - b).abs().max()) for a, b in zip(latents["torch"], latents["ort"])]
print("latents recorded per run:", len(latents["ort"]), "(x_T and one after each of 20 steps)")
print("same starting noise x_T:", step_err[0] == 0.0, "| every step within 1e-3:", max(step_err) < 1e-3)

# %% [markdown]
# The largest latent difference after each DDIM step. fp32 ONNX Runtime and fp32 PyTorch add up in a
# different order, so the first step differs by rounding only; DDIM feeds each step's output into the
# next, so the difference grows step by step — here it stays an order of magnitude below the 1e-3
# tolerance. (Chapter 3's FP16 engines make the same plot more interesting.)

# %%
import matplotlib.pyplot as plt

from course_lib.pipeline.sampler import ddim_timesteps

timesteps = ddim_timesteps(20)[::-1]                         # 951, 901, ..., 1: the order they run
fig, ax = plt.subplots(figsize=(7, 2.8))
ax.semilogy(range(1, 21), step_err[1:], "o-")
ax.axhline(1e-3, color="tab:red", ls="--", label="tolerance 1e-3")
ax.set_xticks(range(1, 21, 2), [f"{i}\nt={t}" for i, t in zip(range(1, 21, 2), timesteps[::2])], fontsize=7)
ax.set_xlabel("DDIM step")
ax.set_ylabel("max |ORT - torch|")
ax.set_title("latent difference after each DDIM step", fontsize=10)
ax.legend(fontsize=8)
fig.tight_layout()
plt.show()

# %%
from course_lib.score import max_pixel_diff, psnr

fig, axes = plt.subplots(1, 3, figsize=(9, 2.4))
for ax, img, title in zip(axes, (pipe.last_edge_map, images["torch"], images["ort"]),
                          ("hint", "PyTorch", "ONNX Runtime")):
    ax.imshow(img)
    ax.set_title(title)
    ax.axis("off")
plt.show()
print("max pixel difference <= 2:", max_pixel_diff(images["torch"], images["ort"]) <= 2)

# %% [markdown]
# ## 2. The Backend interface
#
# The pipeline never asks *what* runs a sub-model. A backend is anything with
#
# * `name`, `input_names`, `output_names` — the contract's tensor names, in order;
# * `infer(feed) -> outputs` — a dict of torch tensors in, a dict of float32 torch tensors out, by name.
#
# `TorchBackend`, `OrtBackend` and `TrtBackend` all follow it (`Backend` is a `typing.Protocol`, so
# `isinstance` checks the shape of the class, not its ancestry).

# %%
from course_lib.backends import Backend

for kind, chosen in backends.items():
    unet = chosen["unet"]
    print(f"{kind:<6}{type(unet).__name__:<13} is a Backend: {isinstance(unet, Backend)} | "
          f"inputs {unet.input_names[:3] + ['control0', '...', 'control12']} -> {unet.output_names}")

# %% [markdown]
# A feed is checked by name before anything runs: a misspelt or missing tensor is one clear error,
# not a crash deep inside ONNX Runtime. The same holds for a shape the static ONNX file does not take.

# %%
import torch

from course_lib.cnsd import contracts, example_inputs

table_128 = contracts(tiny, batch=1, height=128, width=192)
feed = example_inputs(table_128["decoder"], seed=0)
for bad in ({"latents": feed["latent"]}, {"latent": torch.zeros(1, 4, 32, 48)}):
    try:
        backends["ort"]["decoder"].infer(bad)
    except ValueError as e:
        print("ValueError:", e)

# %% [markdown]
# Backends mix freely: every sub-model can run somewhere else. Here CLIP runs in PyTorch and the other
# three in ONNX Runtime — handy when one model does not convert yet, or to find which engine causes
# a difference (swap them one at a time).

# %%
mixed = {**backends["ort"], "clip": backends["torch"]["clip"]}
print({name: type(b).__name__ for name, b in mixed.items()})
pipe_mixed = Canny2Image(mixed, tokenizer, tiny)
images["mixed"] = pipe_mixed.process(photo, "a bird", image_resolution=128, ddim_steps=20)[0]
print("mixed vs ONNX Runtime, max pixel difference <= 2:", max_pixel_diff(images["mixed"], images["ort"]) <= 2)

# %% [markdown]
# ## 3. TensorRT, the ideas that need no GPU
#
# ### 3.1 From the course's TensorRT 8 scripts to TensorRT 10 / 11
#
# The original course (2023) used TensorRT 8. TensorRT 10 removed the *binding index* API and the old
# builder calls; 11 removed the precision flags and calibrators. `course_lib.trt` uses only the
# tensor-name API; this table is what changed, call by call.

# %%
from course_lib.trt import migration_table

print(migration_table())

# %% [markdown]
# ### 3.2 Optimisation profiles
#
# An engine is built for a box of input shapes: per input a `(min, opt, max)` triple. TensorRT picks
# kernels valid for the whole box, tuned for `opt`. The course's engines are **static** (min = opt =
# max: the fastest, one image size). The profile comes from the ONNX file itself: `onnx_input_dims`
# reads each input's dimensions — numbers where the export fixed them, names where it left them free.

# %%
from course_lib.trt import onnx_input_dims, profile_table, shapes_at, static_profile

static_dims = onnx_input_dims(onnx_dir / "controlnet.onnx")
print(static_dims)
static = static_profile(shapes_at(static_dims, batch=1, height=128, width=192), static_dims)
print(profile_table(static))

# %% [markdown]
# A **dynamic** export names its free axes (`B` batch, `H`/`W` image, `h`/`w` latent = `H/8`, `W/8`), and
# `dynamic_profile` fills every named axis from three `(batch, height, width)` sizes. One engine then
# serves batch 1–2 and 128×128 up to 256×384, a little slower than a static one at `opt`.

# %%
from course_lib.trt import dynamic_profile

dynamic = export_cnsd(model, out / "dynamic", height=128, width=192, dynamic={"B", "H", "W"},
                      models=["controlnet"])
dynamic_dims = onnx_input_dims(dynamic["controlnet"].path)
print(dynamic_dims)
flexible = dynamic_profile(dynamic_dims, min_size=(1, 128, 128), opt_size=(1, 128, 192), max_size=(2, 256, 384))
print(profile_table(flexible))

# %% [markdown]
# Profiles are checked against the model before any build: a shape the ONNX fixes otherwise is a
# one-line error naming the input — minutes earlier than TensorRT would say it.

# %%
try:
    static_profile(shapes_at(dynamic_dims, batch=1, height=256, width=384), static_dims)
except ValueError as e:
    print("ValueError:", e)

# %% [markdown]
# ### 3.3 The plan and its sidecar
#
# A serialized engine (a *plan*) runs only on the TensorRT version that built it, on GPUs of the same
# compute capability (part 5: TensorRT for RTX's plans on the compute capabilities they were built
# for). `build_engine_plan` therefore writes `unet.plan.json` next to `unet.plan`: the TensorRT flavour
# and version, the target (GPU and compute capability), profiles, precision, optimisation level and
# the ONNX it came from. `Engine.load()` checks it *before* deserializing and says how to rebuild.
# Here is a sidecar written by hand, as if the plan came from a TA's RTX 3060:

# %%
from course_lib.trt import PlanSidecar, check_sidecar, read_sidecar, write_sidecar
from course_lib.trt.profiles import profile_to_json

handmade_plan = out / "handmade" / "controlnet.plan"
write_sidecar(handmade_plan, PlanSidecar(
    plan="controlnet.plan", tensorrt="10.8.0.43", gpu="NVIDIA GeForce RTX 3060", compute_capability="86",
    profiles=[profile_to_json(static)], precision="as in the ONNX (float32)", builder_optimization_level=3,
    workspace_gib=10, strongly_typed=True, build_seconds=42.0, built_at="2025-01-31T12:00:00+00:00",
    onnx_path=str(onnx_dir / "controlnet.onnx"), onnx_sha256="0" * 64))
sidecar = read_sidecar(handmade_plan)
print(sidecar.describe(), "| opt level", sidecar.builder_optimization_level, "| profiles:", len(sidecar.profiles))

# %% [markdown]
# On another TensorRT or another compute capability the check refuses, in one line with the command
# that rebuilds the plan. A different GPU model of the *same* compute capability runs the plan but was
# not tuned for: a warning (an error with `strict_gpu=True`).

# %%
import warnings

try:
    check_sidecar(sidecar, "10.13.3.9", "NVIDIA H100 80GB HBM3", (9, 0), plan_path=handmade_plan)
except ValueError as e:
    print("ValueError:", e)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    check_sidecar(sidecar, "10.8.0.43", "NVIDIA GeForce RTX 3070", "8.6", plan_path=handmade_plan)
print("same TensorRT and sm_86, other GPU -> one warning:", len(caught) == 1)
check_sidecar(sidecar, "10.8.0.43", "NVIDIA GeForce RTX 3060", "sm_86")
print("same TensorRT, same GPU -> the check passes")

# %% [markdown]
# A TensorRT for RTX plan (part 5) records where it runs instead of the GPU that built it: *ahead of
# time, for compute capability 8.0, 8.6, 8.9, 12.0*. Any GPU of those runs it (its kernels are compiled
# on that GPU); a Hopper GPU (9.0) or full TensorRT does not, in one line each:

# %%
rtx_sidecar = PlanSidecar(**{**sidecar.to_dict(), "tensorrt": "1.7.1.116", "gpu": "", "flavour": "tensorrt_rtx",
                             "compute_capability": "80,86,89,120", "compute_capabilities": ["80", "86", "89", "120"],
                             "target": "ahead of time, for compute capability 8.0, 8.6, 8.9, 12.0"})
print(rtx_sidecar.describe())
check_sidecar(rtx_sidecar, "1.7.1.116", "NVIDIA GeForce RTX 4070", "8.9", flavour="tensorrt_rtx")
print("TensorRT for RTX on an RTX 4070 (sm_89) -> the check passes")
for version, gpu, cc, flavour in (("1.7.1.116", "NVIDIA H100 80GB HBM3", (9, 0), "tensorrt_rtx"),
                                  ("10.13.3.9", "NVIDIA GeForce RTX 4070", "8.9", "tensorrt")):
    try:
        check_sidecar(rtx_sidecar, version, gpu, cc, flavour=flavour, plan_path=handmade_plan)
    except ValueError as e:
        print("ValueError:", e)

# %% [markdown]
# ### 3.4 CUDA graphs: warm up, capture, replay
#
# A CUDA graph records one call's kernel launches and replays them with a single launch: no Python and
# no per-kernel launch overhead. But it replays the *same* kernels on the *same* addresses. The rule
# that follows, for a torch function and a TensorRT engine alike:
#
# 1. **key** each call by its inputs' shapes and dtypes (an engine's graph reads the engine's own
#    buffers, so for an engine the buffers' addresses are part of the key too);
# 2. the first call with a key runs **eagerly**: a warm-up, because TensorRT and cuDNN set things up
#    lazily on a first run;
# 3. the next call **captures** into a `torch.cuda.CUDAGraph` and replays it. Later calls copy their
#    inputs into the captured buffers and **replay**. A new key (another batch, another image size)
#    gets its own warm-up and capture;
# 4. if a capture **fails**, warn once and run eagerly from then on: same results, no speed-up.
#
# `course_lib.cudagraph.CudaGraph` is that rule. `Engine.infer(feed, use_cuda_graph=True)` gives it the
# engine's launch, `execute_async_v3`, which torch captures like any kernel on its stream. Here it wraps
# a torch function. The tensors are on the CPU, which has no graphs, so the capture fails and we see the
# fallback. Section 7 shows a real capture on a GPU.

# %%
import warnings

from course_lib.cudagraph import CudaGraph, graph_key


def step(x, scale):                          # a function of tensors (and constants) that only launches work
    return torch.sin(x) * scale


graph = CudaGraph(step, "step")
print("key of step(x, 2.0):", graph_key([torch.zeros(2, 4), 2.0]))
actions, same = [], []
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for k in range(4):
        x = torch.full((2, 4), float(k))
        same.append(torch.equal(graph(x, 2.0), step(x, 2.0)))
        actions.append(graph.last_action)
print("calls:", ", ".join(actions), "| warnings:", len(caught), "| results as step() itself:", all(same))
print("why:", graph.failed)

# %% [markdown]
# Each row of the rule shows up: the first call is the warm-up, the second tries to capture, fails
# (CPU tensors), warns once, and every call from then on runs eagerly with the same results.
#
# ## 4. Scoring
#
# The hackathon scored each image by its **latency** (wall time of `process()`, warm-up excluded) and
# its **perceptual distance** PD to the PyTorch-fp32 image (L2 distance of InceptionV3 features).
# `pd_factor(PD)` is how much of the speed score an image keeps: piecewise linear, continuous, and zero
# above PD 12 (a failed image). Score per image = `pd_factor(PD) · 7000 / latency_ms`.

# %%
import numpy as np

from course_lib.score import PD_LIMIT, course_score, pd_factor

pds = np.linspace(0, 14, 561)
fig, ax = plt.subplots(figsize=(6, 2.8))
ax.plot(pds, [pd_factor(p) for p in pds])
for pd in (4, 8, 12):
    ax.axvline(pd, color="gray", ls=":")
    ax.annotate(f"PD {pd}: {pd_factor(pd):.2f}", (pd, pd_factor(pd)), xytext=(4, 8), textcoords="offset points",
                fontsize=8)
ax.set_xlabel("PD (perceptual distance to the fp32 image)")
ax.set_ylabel("pd_factor")
ax.set_title("how much of the speed score an image keeps", fontsize=10)
fig.tight_layout()
plt.show()
print("pd_factor at 0, 4, 8, 12, 12.5:", [round(pd_factor(p), 4) for p in (0, 4, 8, 12, 12.5)])

# %% [markdown]
# Below PD 4 each unit of PD costs 10 % of the score; between 4 and 8 only 1.25 % per unit — a flat
# stretch where a faster, slightly different image (FP16, fewer steps) pays off; past 8 the slope is
# steep again. Some examples:

# %%
examples = [(0.0, 1000.0), (2.0, 700.0), (6.0, 500.0), (9.0, 400.0), (12.5, 200.0)]
print(f"{'PD':>5}{'latency ms':>12}{'pd_factor':>11}{'score':>8}")
for pd, ms in examples:
    print(f"{pd:>5.1f}{ms:>12.0f}{pd_factor(pd):>11.4f}{course_score(pd, ms):>8.3f}")

# %% [markdown]
# PD needs InceptionV3 (`pytorch-fid` and its weights file, which the course never downloads for you).
# Two cheap checks need nothing: **PSNR** and the **largest pixel difference**. For ONNX Runtime against
# PyTorch both say "the same image":

# %%
print("ORT vs torch: max pixel difference <= 2:", max_pixel_diff(images["ort"], images["torch"]) <= 2,
      "| PSNR > 40 dB:", psnr(images["ort"], images["torch"]) > 40)

# %% tags=["nbval-ignore-output"]
from course_lib.env import MissingDependency
from course_lib.score import perceptual_distance

try:
    pd = perceptual_distance(images["ort"], images["torch"])
    print(f"PD(ORT, torch) = {pd:.3f} -> pd_factor {pd_factor(pd):.3f}")
except MissingDependency as e:
    print("PD not computed on this machine:", e)

# %% [markdown]
# `score_folder` does this for a folder of images against a folder of references with the same names
# (and reads latencies from `latencies.json` if the folder has one) — what `python -m course_lib score`
# prints. We score the ONNX Runtime and the mixed pipeline's images against the PyTorch image:

# %% tags=["nbval-ignore-output"]
import json

from course_lib.samples import write_image
from course_lib.score import score_folder, score_table

for name, kind in (("bird_ort.png", "ort"), ("bird_mixed.png", "mixed")):
    write_image(out / "score" / "images" / name, images[kind])
    write_image(out / "score" / "reference" / name, images["torch"])
(out / "score" / "images" / "latencies.json").write_text(   # made-up latencies, to show the column
    json.dumps({"bird_ort.png": 812.5, "bird_mixed.png": 790.0}))
rows = score_folder(out / "score" / "images", out / "score" / "reference", with_pd=False)
print(score_table(rows))

# %%
print("rows:", [r.name for r in rows], "| every max diff <= 2:", all(r.max_diff <= 2 for r in rows),
      "| no PD -> no score:", all(r.pd is None and r.score is None for r in rows))

# %% [markdown]
# ## 5. TensorRT or TensorRT for RTX
#
# NVIDIA makes TensorRT in two flavours with one Python API — `Builder`, `OnnxParser`, profiles,
# memory pools, `build_serialized_network`, `Runtime`, tensors by name, `execute_async_v3`:
#
# | | TensorRT (`tensorrt`) | TensorRT for RTX (`tensorrt_rtx`) |
# |---|---|---|
# | made for | data-centre GPUs (H100, A100, A10, L4, T4) and RTX cards: the course's original setting | consumer RTX GPUs and some data-centre ones: compute capability 8.0, 8.6, 8.9, 12.0 (A100, A10, RTX 30/40/50, L4, L40) |
# | the builder | times candidate kernels **on the GPU it runs on** (autotuning) and keeps the fastest; a **timing cache** keeps those timings for the next build | needs **no GPU**: builds *ahead of time* for a list of **compute capabilities**; times nothing, so has no timing cache |
# | the plan | the chosen kernels for that kind of GPU (same compute capability, same TensorRT version) and the weights | the network and its **weights**, no finished kernels: the GPU compiles them **just in time** on first use; a **runtime cache** file keeps them for the next run |
# | precision | from the ONNX (strong typing); TensorRT 10 still has the FP16 builder flag | from the ONNX only: networks are always strongly typed |
# | CUDA graphs | capture them yourself (`infer(..., use_cuda_graph=True)`, chapter 3) | that, or its built-in strategy (`Engine(..., tensorrt_graphs=True)`) |
# | refuses | — | Hopper (H100, H200: compute capability 9.0) |
#
# **Which one your GPU wants.** An H100/H200, a V100 or a T4: TensorRT. An RTX 30/40/50 card, an A10, an
# L4: either — TensorRT tunes each plan for the exact card, TensorRT for RTX builds one plan for all of
# them (even on a machine without a GPU) and compiles it on each. No GPU at all: TensorRT for RTX still
# builds every plan of this course, but nothing runs them.
#
# **What changes in your code.** The import — `import tensorrt_rtx as trt` instead of `import tensorrt
# as trt` (the course does it in one place, `course_lib.trt.flavour`: `COURSE_TENSORRT=tensorrt_rtx`
# or the CLI's `--tensorrt tensorrt_rtx` chooses it; otherwise full TensorRT comes first) — and, at run
# time, the runtime cache: `engine.create_runtime_config()`, `config.create_runtime_cache()`, load the
# file into it, `config.set_runtime_cache(cache)`, `engine.create_execution_context(config)`, and save
# it after the first inference (`Engine` keeps it beside the plan as `controlnet.plan.runtime_cache`).
# Where a flavour lacks something a cell asks for, the course says so in one sentence. Here:

# %% tags=["requires-trt-builder", "nbval-ignore-output"]
# %%needs trt-builder
from course_lib.trt.flavour import FEATURES, has_feature, label, require_tensorrt

trt = require_tensorrt()
print("TensorRT in force:", label(trt))
for feature, spec in FEATURES.items():
    print(f"  {'has' if has_feature(trt, feature) else 'no':<4}{spec.what}")

# %% [markdown]
# ## 6. Building the four plans
#
# The cells of this part need only a builder (`%%needs trt-builder`). With TensorRT for RTX they run
# on any CPU — the outputs stored here come from two CPU cores without a GPU — with full TensorRT on a
# GPU. They build the four plans from the ONNX files of part 1, the way the course's `onnx2trt` did,
# with the TensorRT 10/11 API:
#
# * the **parsed network**: the ONNX parser turns each node into TensorRT *layers*;
# * a **static profile** at 1×128×192 (batch × H × W; the course builds 1×256×384);
# * a **workspace** memory pool limit (the course used 10 GiB; the tiny model needs far less);
# * the **builder optimisation level** (0–5; 3 is TensorRT's default, 5 searches longest);
# * a **timing cache** (full TensorRT): kernel timings saved to a file and reused by the next build.
#
# The build logs through Python (`course_lib.trt.logger`), so its warnings land in this notebook.
# First the network as the parser sees it: how many layers, and of which types.

# %% tags=["requires-trt-builder", "nbval-ignore-output"]
# %%needs trt-builder
from course_lib.cnsd import MODEL_NAMES
from course_lib.trt import inspect_onnx

networks = {name: inspect_onnx(onnx_dir / f"{name}.onnx") for name in MODEL_NAMES}
for network in networks.values():
    print(network.table(top=5))

# %% [markdown]
# Weights are `CONSTANT` layers, every reshape or transpose a `SHUFFLE`, every add or multiply an
# `ELEMENTWISE` layer; the work is in `MATRIX_MULTIPLY` (attention, linear layers) and `CONVOLUTION`.
# The builder fuses most of them away. Now the build itself:

# %% tags=["requires-trt-builder", "nbval-ignore-output"]
# %%needs trt-builder
from course_lib.trt import build_plans

timing_cache = out / "timing.cache" if has_feature(trt, "timing_cache") else None   # full TensorRT only
plan_dir = out / "plans"
plans = build_plans(onnx_dir, plan_dir, profile="static", batch=1, height=128, width=192, opt_level=3,
                    timing_cache=timing_cache, workspace_gib=2)

# %% tags=["requires-trt-builder", "nbval-ignore-output"]
# %%needs trt-builder
print(f"{'plan':<16}{'layers':>7}{'build s':>9}{'ONNX MiB':>10}{'plan MiB':>10}  target")
for plan in plans:
    side = read_sidecar(plan)
    onnx_mib = (onnx_dir / f"{plan.stem}.onnx").stat().st_size / 2**20
    print(f"{plan.name:<16}{side.extra['layers']:>7}{side.build_seconds:>9.1f}{onnx_mib:>10.1f}"
          f"{plan.stat().st_size / 2**20:>10.1f}  {side.target}")
print(f"all: opt level {side.builder_optimization_level}, workspace pool {side.workspace_gib} GiB, "
      f"strongly typed {side.strongly_typed}, {label(trt)}")

# %% tags=["requires-trt-builder"]
# %%needs trt-builder
sides = {plan.stem: read_sidecar(plan) for plan in plans}
print("4 plans, each with its sidecar:", sorted(sides) == sorted(MODEL_NAMES))
print("static profile at 1x128x192:", all(lo == opt == hi for s in sides.values() for lo, opt, hi in s.profiles[0].values()),
      "| hint", sides["controlnet"].profiles[0]["hint"][0])
print("layers as parsed:", all(s.extra["layers"] == networks[name].layers for name, s in sides.items()))
print("every plan holds its weights (at least the ONNX's size):",
      all((plan_dir / f"{name}.plan").stat().st_size >= (onnx_dir / f"{name}.onnx").stat().st_size for name in sides))

# %% [markdown]
# **Timing cache, and a second build.** Full TensorRT times candidate kernels on the GPU during the
# build; the timing cache keeps those timings, so building the same layers again skips the timing and
# is much faster (the course's TA saw minutes become seconds for the UNet). TensorRT for RTX times
# nothing at build time, so there is nothing to cache: its timing-cache calls are kept only as
# deprecated no-ops, and `build_engine_plan(..., timing_cache=...)` says so in one sentence. The cell
# builds the ControlNet twice — with full TensorRT the second build reuses the first one's cache — and
# measures both.

# %% tags=["requires-trt-builder", "nbval-ignore-output"]
# %%needs trt-builder
from course_lib.trt import FeatureMissing, build_engine_plan

rebuild_cache = out / "rebuild.cache" if has_feature(trt, "timing_cache") else None
if rebuild_cache is not None:
    rebuild_cache.unlink(missing_ok=True)
rebuild_s = [build_engine_plan(onnx_dir / "controlnet.onnx", out / "rebuild" / "controlnet.plan", static, workspace_gib=2,
                               timing_cache=rebuild_cache).build_seconds for _ in range(2)]
print(f"first build {rebuild_s[0]:.1f} s, second build {rebuild_s[1]:.1f} s "
      f"({'timing cache reused' if rebuild_cache else label(trt) + ': no timing cache, nothing to reuse'})")
try:
    build_engine_plan(onnx_dir / "controlnet.onnx", out / "rebuild" / "cached.plan", static, timing_cache=out / "t.cache")
except FeatureMissing as e:
    print("FeatureMissing:", e)

# %% [markdown]
# **Static or dynamic.** The dynamic ControlNet of 3.2 with its profile (batch 1–2, 128×128 up to
# 256×384): one plan for every shape in the box, tuned for `opt`. Its sidecar keeps the box.

# %% tags=["requires-trt-builder", "nbval-ignore-output"]
# %%needs trt-builder
dynamic_side = build_engine_plan(dynamic["controlnet"].path, out / "plans_dynamic" / "controlnet.plan", flexible,
                                 workspace_gib=2)
static_side = sides["controlnet"]
for kind, side, plan in (("static", static_side, plan_dir / "controlnet.plan"),
                         ("dynamic", dynamic_side, out / "plans_dynamic" / "controlnet.plan")):
    lo, opt, hi = side.profiles[0]["hint"]
    print(f"{kind:<8} hint {tuple(lo)} / {tuple(opt)} / {tuple(hi)}   plan {plan.stat().st_size / 2**20:.1f} MiB"
          f"   build {side.build_seconds:.1f} s")

# %% [markdown]
# A model the parser cannot take is one line naming the node and its op — and no plan is written.
# `Det` (a matrix determinant) is a standard ONNX op that TensorRT has no layer for:

# %% tags=["requires-trt-builder", "nbval-ignore-output"]
# %%needs trt-builder
import onnx
from onnx import TensorProto, helper

odd = helper.make_model(helper.make_graph(
    [helper.make_node("Det", ["x"], ["y"], name="determinant")], "odd",
    [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 4])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])]),
    opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
onnx.save(odd, out / "odd.onnx")
try:
    build_engine_plan(out / "odd.onnx", out / "odd" / "odd.plan")
except ValueError as e:
    parse_error = str(e)
    print("ValueError:", parse_error)

# %% tags=["requires-trt-builder"]
# %%needs trt-builder
print("one line, naming node and op:", "\n" not in parse_error and "node 'determinant' (op Det)" in parse_error,
      "| nothing written:", not (out / "odd").exists())
print("dynamic plan keeps its box:", dynamic_side.profiles[0]["hint"] == [[1, 3, 128, 128], [1, 3, 128, 192], [2, 3, 256, 384]])
print("a second build with the same settings gives the same plan size:",
      (out / "rebuild" / "controlnet.plan").stat().st_size == (plan_dir / "controlnet.plan").stat().st_size)

# %% [markdown]
# ## 7. Running the plans (GPU)
#
# From here on every cell needs a GPU that runs the plans (`%%needs gpu tensorrt`; elsewhere each prints
# one line instead): full TensorRT with the GPU that built them, or TensorRT for RTX with a GPU of
# compute capability 8.0, 8.6, 8.9 or 12.0. **Unverified on an RTX GPU:** the course's machines have no such GPU (their H100s refuse
# TensorRT for RTX plans), so these cells have run with full TensorRT only. With TensorRT for RTX, the
# runtime config, the runtime cache and `tensorrt_graphs` are written against `tensorrt_rtx` 1.7.1's API,
# and tests/test_trt_names.py checks every name they call on the installed module — but none of it has
# executed on a GPU.

# %% [markdown]
# `Engine` is the runtime: `load()` checks the sidecar and deserializes the plan, `activate()` creates an
# execution context, `allocate_buffers()` gives every tensor a torch CUDA buffer **by name**, and
# `info()` lists them.

# %% tags=["requires-gpu", "requires-tensorrt"]
# %%needs gpu tensorrt
from course_lib.trt import Engine

engine = Engine(plan_dir / "controlnet.plan").load().activate()
engine.allocate_buffers()
print(engine.info())

# %% [markdown]
# **TensorRT for RTX: the runtime cache** (unverified, see above). The first inference on a GPU compiles
# the plan's kernels; `Engine` saves them beside the plan (`decoder.plan.runtime_cache`), so the next load
# starts without compiling. Timed for the decoder: load, activate and one inference, without and then
# with the cache. Full TensorRT compiles nothing at load time; the cell says so.

# %% tags=["requires-gpu", "requires-tensorrt", "nbval-ignore-output"]
# %%needs gpu tensorrt
import time

from course_lib.trt.runtime_config import runtime_cache_path

if has_feature(trt, "runtime_cache"):
    runtime_cache_path(plan_dir / "decoder.plan").unlink(missing_ok=True)
    decoder_feed = {k: v.cuda() for k, v in example_inputs(table_128["decoder"], seed=0).items()}
    for attempt in ("without a runtime cache", "with the first run's runtime cache"):
        start = time.perf_counter()
        Engine(plan_dir / "decoder.plan").infer(decoder_feed)
        torch.cuda.synchronize()
        print(f"load + first inference {attempt}: {time.perf_counter() - start:.2f} s")
else:
    print(f"{label(trt)} compiles nothing at load time: no runtime cache")

# %% [markdown]
# `infer(feed)` copies the feed into the input buffers, sets each tensor's address and runs
# `execute_async_v3`. The outputs are the engine's own buffers (the next call overwrites them). Against
# ONNX Runtime on the same inputs: fp32 engines may use TF32 tensor-core math on Ampere and newer GPUs,
# so expect differences around 1e-3 of each output's scale, not 1e-6.

# %% tags=["requires-gpu", "requires-tensorrt", "nbval-ignore-output"]
# %%needs gpu tensorrt
from course_lib.onnx.compare import compare_outputs

feed = example_inputs(table_128["controlnet"], seed=1)
trt_out = engine.infer({name: t.cuda() for name, t in feed.items()})
trt_vs_ort = compare_outputs(backends["ort"]["controlnet"].infer(feed), trt_out, rtol=1e-2, atol=1e-3,
                             title="ControlNet: TensorRT vs ONNX Runtime")
trt_vs_ort

# %% tags=["requires-gpu", "requires-tensorrt"]
# %%needs gpu tensorrt
print("13 controls compared:", len(trt_vs_ort.rows) == 13,
      "| max error relative to each output's scale < 1e-2:", max(r.max_rel for r in trt_vs_ort.rows) < 1e-2)

# %% [markdown]
# The whole pipeline on TensorRT: `make_backends("trt", plan_dir=...)`, latents and hint on the GPU.

# %% tags=["requires-gpu", "requires-tensorrt"]
# %%needs gpu tensorrt
pipe_trt = Canny2Image(make_backends("trt", plan_dir=plan_dir), tokenizer, tiny, device="cuda",
                       record_latents=True)
images["trt"] = pipe_trt.process(photo, "a bird", image_resolution=128, ddim_steps=20)[0]
trt_step_err = [float((a - b).abs().max()) for a, b in zip(latents["torch"], pipe_trt.last_latents)]
print("TensorRT vs torch: latents within 1e-2 at every step:", max(trt_step_err) < 1e-2,
      "| PSNR > 30 dB:", psnr(images["trt"], images["torch"]) > 30)
fig, axes = plt.subplots(1, 2, figsize=(6, 2.4))
for ax, img, title in zip(axes, (images["torch"], images["trt"]), ("PyTorch (CPU)", "TensorRT")):
    ax.imshow(img)
    ax.set_title(title)
    ax.axis("off")
plt.show()

# %% [markdown]
# **§3.4's rule on a GPU.** The same `step` on CUDA tensors: the first call warms up, the second
# captures, and the later ones replay with new inputs. A replay returns the graph's own output buffer,
# so compare before the next call.

# %% tags=["requires-gpu"]
# %%needs gpu
gpu_graph, gpu_actions, gpu_same = CudaGraph(step, "step on the GPU"), [], []
for k in range(4):
    x = torch.randn(2, 4, device="cuda")
    gpu_same.append(torch.allclose(gpu_graph(x, 2.0), step(x, 2.0)))
    gpu_actions.append(gpu_graph.last_action)
print("calls:", ", ".join(gpu_actions), "| results as step() itself:", all(gpu_same))

# %% [markdown]
# **CUDA graph on and off.** The same plan, timed per call (`time_cpu`: warm-up excluded, the GPU
# synchronized around each call). With the graph the first call warms up, the second captures, the
# rest replay. The tiny models are launch-bound, so the graph's gain is large here; on sd15 the TA
# measured 41.6 → 30.9 ms for the fp16 UNet on an RTX 3060.

# %% tags=["requires-gpu", "requires-tensorrt", "nbval-ignore-output"]
# %%needs gpu tensorrt
from course_lib.backends import TrtBackend
from course_lib.cnsd import MODEL_NAMES
from course_lib.timing import time_cpu

graph_actions = {}
print(f"{'engine':<11}{'eager ms':>10}{'graph ms':>10}{'speed-up':>10}")
for name in MODEL_NAMES:
    cuda_feed = {k: v.cuda() for k, v in example_inputs(table_128[name], seed=0).items()}
    medians = []
    for use_graph in (False, True):
        trt_backend = TrtBackend(plan_dir / f"{name}.plan", use_cuda_graph=use_graph, copy_outputs=False)
        medians.append(float(np.median(time_cpu(lambda: trt_backend.infer(cuda_feed), warmup=3, iters=50))))
    graph_actions[name] = trt_backend.engine.last_action
    print(f"{name:<11}{medians[0]:>10.3f}{medians[1]:>10.3f}{medians[0] / medians[1]:>9.2f}x")

# %% tags=["requires-gpu", "requires-tensorrt"]
# %%needs gpu tensorrt
from course_lib.notebook import every

print("every engine replays its graph after warm-up and capture:",
      every(action == "replay" for action in graph_actions.values()))

# %% [markdown]
# **Homework 2 harness.** Per engine: build at builder optimisation levels 0, 3 and 5 and time each with
# and without a CUDA graph (CUDA events, median and p10–p90 spread). The homework asks for it on an FP16
# base (chapter 3 makes the FP16 ONNX); run it here on the fp32 files, then on `out/03_fp16/onnx`.
# Building 3 levels × 4 engines takes a few minutes even for the tiny model.

# %% tags=["requires-gpu", "requires-tensorrt", "nbval-ignore-output"]
# %%needs gpu tensorrt
from course_lib.trt.sweep import hw2_sweep, hw2_table, plot_hw2

records = hw2_sweep(onnx_dir, out / "hw2", opt_levels=(0, 3, 5), height=128, width=192,
                    timing_cache=timing_cache)
from IPython.display import Image

print(hw2_table(records))
Image(filename=str(plot_hw2(records, out / "hw2" / "hw2.png")))

# %% tags=["requires-gpu", "requires-tensorrt"]
# %%needs gpu tensorrt
print("records (4 engines x 3 levels x graph off/on):", len(records) == 24,
      "| results saved:", (out / "hw2" / "hw2.json").is_file())

# %% [markdown]
# ## Hand it in (homework 1, the GPU half, and homework 2)
#
# Homework 1's GPU half: engines built from **your** ONNX files (`homework/hw1/onnx`, exported again here
# for your seed: the same files as chapter 1's), the pipeline's image on them, and the plans' sidecars.
# Homework 2: a sweep — `hw2.json` with every raw sample, and the sidecar of each plan it timed. The
# homework asks for the FP16 engines: hand in the sweep of `out/03_fp16/onnx` if you ran it (the cell
# hands in the fp32 sweep above otherwise; your instructor says whether that counts).
# Plans themselves are never handed in: a plan only runs with the TensorRT version and GPU that built it,
# and the grader has neither; the sidecar says which (and the SHA-256 of the ONNX file it came from).
# The cell then runs both homeworks' tests as the grader will; afterwards, in a terminal:
# `python -m course_lib submit --hw 1 --student YOUR_ID --seed YOUR_SEED --out hw1.zip` (and `--hw 2`).

# %% tags=["requires-gpu", "requires-tensorrt", "nbval-ignore-output"]
# %%needs gpu tensorrt
from course_lib.homework.handin import write_hw1_evidence, write_hw2_evidence
from course_lib.homework.submit import submit
from course_lib.trt import build_plans

SEED, STUDENT = 0, "your-id"                     # <- the seed your instructor issued, your ID
student_model, hw1_onnx = build_cnsd(tiny, seed=SEED), Path("homework/hw1/onnx")
export_cnsd(student_model, hw1_onnx, height=64, width=64)
build_plans(hw1_onnx, out / "hw1_plans", profile="static", batch=1, height=64, width=64, opt_level=3,
            timing_cache=timing_cache, workspace_gib=2)
write_hw1_evidence(student_model, "homework", height=64, width=64, plan_dir=out / "hw1_plans", export=False)
write_hw2_evidence(out / "hw2", "homework")      # <- or the FP16 sweep's folder
hand_in = {hw: submit(hw, STUDENT, SEED, out=None) for hw in ("1", "2")}
for dry_run in hand_in.values():
    print(dry_run.report(outputs=True))

# %% tags=["requires-gpu", "requires-tensorrt"]
# %%needs gpu tensorrt
from course_lib.notebook import every

print("homework 1 and 2 ready to hand in:", every(dry_run.passed for dry_run in hand_in.values()))

# %% [markdown]
# ## Exercises
#
# **1.** Chapter 3 runs cond and uncond as one batch of 2. Make a profile for the *dynamic* ControlNet
# export (`dynamic_dims`) that takes batch 1 or 2 at exactly 128×192, tuned for batch 2.

# %%
from course_lib.notebook import answered      # the checks below say "not done yet" until you have answered

### BEGIN SOLUTION: batch_profile = dynamic_profile(dynamic_dims, ...) for batch 1..2 at 128x192, opt 2
batch_profile = dynamic_profile(dynamic_dims, min_size=(1, 128, 192), opt_size=(2, 128, 192), max_size=(2, 128, 192))
### END SOLUTION
if answered("exercise 1", batch_profile):
    assert batch_profile["x_noisy"] == ((1, 4, 16, 24), (2, 4, 16, 24), (2, 4, 16, 24))
    assert batch_profile["timestep"] == ((1,), (2,), (2,))
    print("exercise 1: correct")

# %% [markdown]
# **2.** An image with PD 2 takes 1000 ms. How fast must an image with PD 6 be to score the same?
# Work it out from `pd_factor`, then check with `course_score`.

# %%
### BEGIN SOLUTION: the ms at PD 6 that scores as much as 1000 ms at PD 2, from pd_factor
same_score_ms = 1000.0 * pd_factor(6.0) / pd_factor(2.0)
### END SOLUTION
if answered("exercise 2", same_score_ms):
    assert abs(course_score(6.0, same_score_ms) - course_score(2.0, 1000.0)) < 1e-9
    print(f"exercise 2: correct ({same_score_ms:.2f} ms)")

# %% [markdown]
# **3.** Any class with `name`, `input_names`, `output_names` and `infer` is a backend. Write one that
# wraps another backend and counts its calls, then check the course's count: with separate CFG, each
# DDIM step calls ControlNet and the UNet twice (cond and uncond), CLIP runs twice per image, the
# decoder once. (4 steps here, to be quick.)

# %%
### BEGIN SOLUTION: class CountingBackend: CountingBackend(inner) passes infer() on to inner, counts in .calls
class CountingBackend:
    """Wraps a backend and counts infer() calls."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0
        self.name, self.input_names, self.output_names = inner.name, inner.input_names, inner.output_names

    def infer(self, feed):
        self.calls += 1
        return self.inner.infer(feed)
### END SOLUTION


if answered("exercise 3", CountingBackend):
    counted = {name: CountingBackend(b) for name, b in backends["ort"].items()}
    Canny2Image(counted, tokenizer, tiny).process(photo, "a bird", image_resolution=128, ddim_steps=4)
    calls = {name: b.calls for name, b in counted.items()}
    assert isinstance(counted["unet"], Backend)
    assert calls == {"clip": 2, "controlnet": 8, "unet": 8, "decoder": 1}, calls
    print("exercise 3: correct", calls)

# %% [markdown]
# ## Self-check
# What this chapter leaves behind: the pipeline on ONNX Runtime (and on a mix of backends) giving the
# PyTorch image, latents within 1e-3 at every DDIM step, profiles that match the ONNX files, a sidecar
# that refuses a foreign machine, and the scoring maths.

# %%
assert len(step_err) == 21 and step_err[0] == 0.0 and max(step_err) < 1e-3
assert max_pixel_diff(images["torch"], images["ort"]) <= 2 and max_pixel_diff(images["mixed"], images["ort"]) <= 2
assert all(lo == opt == hi for lo, opt, hi in static.values())
assert flexible["hint"] == ((1, 3, 128, 128), (1, 3, 128, 192), (2, 3, 256, 384))
assert [r.name for r in rows] == ["bird_mixed.png", "bird_ort.png"] and all(r.max_diff <= 2 for r in rows)
assert (pd_factor(4), pd_factor(8), pd_factor(12), pd_factor(PD_LIMIT + 0.1)) == (0.6, 0.55, 0.0, 0.0)
try:
    check_sidecar(sidecar, "10.13.3.9", "NVIDIA H100 80GB HBM3", (9, 0))
    raise AssertionError("a plan from another GPU must be refused")
except ValueError as e:
    assert "rebuild it with python -m course_lib build" in str(e)
print("chapter 2 self-check passed")
