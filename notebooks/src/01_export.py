# %% [markdown]
# # Chapter 1 — CNSD in PyTorch, and its export to ONNX
#
# The course's model is **ControlNet 1.0 canny on Stable Diffusion 1.5** ("CNSD"): a photo's edges
# steer what Stable Diffusion draws. In this chapter you
#
# 1. meet the four sub-models and how data flows between them,
# 2. run the course's `canny2image` pipeline in PyTorch,
# 3. export each sub-model to ONNX — static and dynamic shapes, and the 2 GB trap,
# 4. check every export against PyTorch with ONNX Runtime, and read the parity table.
#
# Everything here runs on a CPU with the **`tiny` preset**: the same topology as SD 1.5 with small
# widths and random weights. On your GPU machine, `get_config("sd15")` plus `load_checkpoint(...)`
# gives the real model; nothing else in the code changes.

# %% tags=["nbval-ignore-output"]
# %load_ext course_lib.notebook
from course_lib.env import detect

print(detect().report())   # what this machine can run; chapter 2 needs TensorRT

# %% [markdown]
# ## 1. Four models, one pipeline
#
# | sub-model | runs | input → output |
# |---|---|---|
# | **CLIP** text encoder (ViT-L/14) | twice per image (prompt, negative prompt) | token ids (B, 77) → text embedding (B, 77, 768) |
# | **ControlNet** | every DDIM step, cond + uncond | noisy latent, canny hint, timestep, text → 13 residuals |
# | **ControlledUnet** | every DDIM step, cond + uncond | noisy latent, timestep, text, 13 residuals → predicted noise |
# | **VAE decoder** | once per image | latent (B, 4, H/8, W/8) → image (B, 3, H, W) in [-1, 1] |
#
# The course scores 256×384 images with 20 DDIM steps and classifier-free guidance, so one image costs
# 2 CLIP calls, 40 ControlNet calls, 40 UNet calls and 1 decoder call. The names and shapes of every
# tensor are the **contract** all later chapters rely on (ONNX names, TensorRT profiles, backends):

# %%
from course_lib.cnsd import build_cnsd, contracts, get_config

tiny = get_config("tiny")
for name, contract in contracts(tiny, batch=1, height=256, width=384).items():
    shown = contract.inputs[:3] if name == "unet" else contract.inputs
    ins = ", ".join(t.name for t in shown) + (", control0..12" if name == "unet" else "")
    outs = ", ".join(t.name for t in contract.outputs[:1]) + (" .. control12" if name == "controlnet" else "")
    print(f"{name:<11} ({ins}) -> ({outs})")

# %% [markdown]
# Same topology, very different sizes. `sd15` is the real model (counted on PyTorch's `meta` device:
# no memory is allocated); `tiny` is what this notebook runs.

# %%
import torch

from course_lib.cnsd import CNSD

with torch.device("meta"):
    sd15_counts = CNSD(get_config("sd15")).parameter_counts()
model = build_cnsd(tiny, seed=0)
tiny_counts = model.parameter_counts()
print(f"{'sub-model':<11}{'sd15':>12}{'tiny':>10}")
for name in sd15_counts:
    print(f"{name:<11}{sd15_counts[name] / 1e6:>11.1f}M{tiny_counts[name] / 1e6:>9.2f}M")

# %% [markdown]
# ### A trap before we start: a fresh model outputs exactly zero
#
# The original initialises every `zero_module` layer (the ControlNet's zero convs, the UNet's last
# conv, each ResBlock's last conv, each `proj_out`) to zero, so it can be trained from a pretrained
# UNet without disturbing it. Export such a model and *every* parity check passes — zeros equal zeros.
# `build_cnsd(..., seed=None)` gives that model; the default `seed=0` gives every weight a non-zero
# value of sensible scale. Always test with the latter (or with the real checkpoint).

# %%
from course_lib.cnsd import example_inputs

small = contracts(tiny, batch=1, height=128, width=192)
feed = example_inputs(small["controlnet"], seed=1)
with torch.no_grad():
    zero_controls = build_cnsd(tiny, seed=None).positional("controlnet")(*feed.values())
    real_controls = model.positional("controlnet")(*feed.values())
print("original init, all 13 controls exactly zero:", all(bool((c == 0).all()) for c in zero_controls))
print("seeded init, every control non-zero:        ", all(bool((c != 0).any()) for c in real_controls))

# %% [markdown]
# ## 2. canny2image in PyTorch
#
# The pipeline turns a photo into a *hint* — its Canny edges, 3 channels in [0, 1] — and asks for
# "a bird". A real photo ships with matplotlib, cropped to the course's 384×256 (W×H).

# %%
import matplotlib.pyplot as plt

from course_lib.pipeline.hint import canny_hint
from course_lib.samples import sample_photo

photo = sample_photo(size=(256, 384))
edges, hint = canny_hint(photo, 100, 200)
print("photo", photo.shape, photo.dtype, "| hint", tuple(hint.shape), hint.dtype,
      f"| edge pixels: {(hint[0, 0] > 0).float().mean():.1%}")
fig, axes = plt.subplots(1, 2, figsize=(8, 2.8))
for ax, img, title in zip(axes, (photo, edges), ("photo", "canny hint (low 100, high 200)")):
    ax.imshow(img)
    ax.set_title(title)
    ax.axis("off")
plt.show()

# %% [markdown]
# Now the whole pipeline on PyTorch. To stay quick on a CPU we generate at 128×192 (the hint is
# resized with the photo); the hackathon setting is `image_resolution=256`. With random weights the
# picture is structured noise — the *plumbing* is what we test. The tokenizer is CLIP's byte-level
# fallback, which needs no vocabulary file (sd15 needs CLIP's real BPE vocabulary).

# %%
from course_lib.pipeline.canny2image import Canny2Image
from course_lib.cnsd.tokenizer import byte_level_tokenizer

tokenizer = byte_level_tokenizer()
photo_small = sample_photo(size=(128, 192))
pipe_torch = Canny2Image.from_torch(model, tokenizer, record_latents=True)
image_torch = pipe_torch.process(photo_small, "a bird", image_resolution=128, ddim_steps=20)[0]
latents_torch = pipe_torch.last_latents
print("image", image_torch.shape, image_torch.dtype, "| DDIM latents recorded:", len(latents_torch))

# %% tags=["nbval-ignore-output"]
from course_lib.timing import markdown_table

stages = pipe_torch.last_timings.summary()   # milliseconds per stage on this machine
print(markdown_table(["stage", "ms"], list(stages.items())))

# %% [markdown]
# ### Inside `process()`: the DDIM loop
#
# `process()` is five numbered steps: hint, text, noise, DDIM, decode. Step 4 is the heart of it:
# 20 DDIM steps from timestep 951 down to 1. At each step ControlNet and the UNet run twice, once with
# the prompt (`cond`) and once with the negative prompt (`uncond`). Classifier-free guidance mixes the two
# noise predictions, `eps = u + 9·(c − u)`. The DDIM update then predicts the clean latent `x0` and moves
# `x` towards it. Written out over the pipeline's own backends, the loop gives `process()`'s image
# bit for bit:

# %%
from course_lib.pipeline.canny2image import A_PROMPT, N_PROMPT
from course_lib.pipeline.hint import hwc3, resize_image
from course_lib.pipeline.sampler import classifier_free_guidance, make_ddim_schedule, run_controlnet, run_unet, timestep_tensor

b, scales = pipe_torch.backends, [1.0] * 13                                # strength 1: every control scale is 1
with torch.inference_mode():
    _, hint_small = canny_hint(resize_image(hwc3(photo_small), 128), 100, 200)          # 1. hint (1, 3, 128, 192)
    cond = b["clip"].infer({"input_ids": tokenizer(["a bird, " + A_PROMPT])})["last_hidden_state"]   # 2. text
    uncond = b["clip"].infer({"input_ids": tokenizer([N_PROMPT])})["last_hidden_state"]
    x = torch.randn((1, 4, 16, 24), generator=torch.Generator().manual_seed(2946901))   # 3. x_T from the seed
    s = make_ddim_schedule(20)
    for i in reversed(range(20)):                                          # 4. timesteps 951, 901, ..., 1
        t = timestep_tensor(s.timesteps[i], 1, "cpu")
        eps_c = run_unet(b["unet"], x, t, cond, run_controlnet(b["controlnet"], x, t, cond, hint_small, scales))
        eps_u = run_unet(b["unet"], x, t, uncond, run_controlnet(b["controlnet"], x, t, uncond, hint_small, scales))
        eps = classifier_free_guidance(eps_c, eps_u, 9.0)                  # u + 9 (c - u)
        pred_x0 = (x - s.sqrt_one_minus_alphas[i] * eps) / s.sqrt_alphas[i]    # the clean latent it predicts
        x = s.sqrt_alphas_prev[i] * pred_x0 + s.dir_coefs[i] * eps          # eta 0: dir_coefs = sqrt(1 - ā_prev)
    image_by_hand = pipe_torch.decode(x)[0]                                # 5. decode
print("20 steps, 40 ControlNet + 40 UNet calls: the same image as process():", bool((image_by_hand == image_torch).all()))

# %% [markdown]
# ### The same pipeline on trained weights: the toy
#
# Random weights test the plumbing but draw noise. To *see* what ControlNet does on a laptop, the
# course ships a **toy** CNSD: the same four models and the same pipeline, shrunk to ~2.5 M parameters
# and trained by the course itself (`python -m course_lib train-toy`, issue #18) on generated 64×64
# images of coloured shapes, each with its prompt ("a red star on a white background") and its Canny
# hint. The VAE was trained first, then the UNet and text encoder on its latents, then the ControlNet
# against the frozen UNet, its zero convolutions starting at zero — the original's order. Its weights
# sit in `course_lib/data/` in the real checkpoint's key layout, so `load_checkpoint` reads them like
# `control_sd15_canny.pth`. The card beside them says how they were made.

# %%
import json

from course_lib.toy.weights import TOY_CARD, TOY_WEIGHTS, load_toy, toy_tokenizer, weights_status

print(weights_status())
if TOY_CARD.is_file():
    card = json.loads(TOY_CARD.read_text())
    print("trained by:", card["command"], f"({card['total_seconds'] / 60:.0f} min)")
    print("training on", card["training"]["device"], "| steps per stage:",
          {k: v["steps"] for k, v in card["training"]["stages"].items()})

# %% [markdown]
# Held-out scenes (a seed the training never drew from): the input image, the hint canny2image takes
# from it, and what the toy draws from the hint and the prompt alone — next to the same pipeline with
# random weights of the same size. The metric: **edge F1** between the Canny edges of the output and
# the hint (a match within 2 pixels), and **colour accuracy**, the shape's and the background's colour
# read back from the output and compared with the prompt's.

# %%
from IPython.display import Markdown, display

from course_lib.toy.evaluate import evaluate_pipeline, evaluation_table

toy_rows, toy_scores = {}, []
if TOY_WEIGHTS.is_file():
    for label, toy_model in (("trained", load_toy()), ("random", build_cnsd(get_config("toy"), seed=0))):
        toy_pipe = Canny2Image.from_torch(toy_model, toy_tokenizer())
        toy_rows[label] = []
        toy_scores.append(evaluate_pipeline(toy_pipe, label, n=12, ddim_steps=20, keep_images=toy_rows[label]))
    first = toy_rows["trained"]
    fig, axes = plt.subplots(4, 6, figsize=(10, 7))
    for c in range(6):
        for r, (img, title) in enumerate(((first[c][0], "input"), (first[c][1], "hint"),
                                          (first[c][2], "trained toy"), (toy_rows["random"][c][2], "random"))):
            axes[r, c].imshow(img)
            axes[r, c].set_xticks([]), axes[r, c].set_yticks([])
            if c == 0:
                axes[r, c].set_ylabel(title)
    plt.tight_layout()
    plt.show()
    display(Markdown(evaluation_table(toy_scores)))
else:
    print("no toy weights in this checkout: the figure and the table need them (see the line above)")

# %% [markdown]
# The trained rows follow the hint: the shape sits where its edges are, in the prompt's colours. The
# random rows are what the rest of this chapter draws — same code, meaningless weights. The card's own
# evaluation (more scenes, from the training run) is in `docs/benchmarks.md`; chapters 3 and 5 use this
# table to say what FP16 and INT8 do to the picture, not just to the numbers.

# %% [markdown]
# ## 3. Export to ONNX
#
# `export_cnsd` exports each sub-model through `torch.onnx.export` (TorchScript exporter, opset 18)
# with the contract's names, checks the file with `onnx.checker` and writes it **atomically**: into a
# hidden temporary folder first, then `os.replace` into place — an interrupted export leaves nothing
# under the final name. A JSON sidecar records names, shapes, versions and a SHA-256.
#
# **Static shapes** (the default) fix every dimension: what the course's TensorRT engines use, and
# what lets TensorRT pick the best kernels.

# %%
from pathlib import Path

from course_lib.onnx.export_cnsd import check_exports, export_cnsd
from course_lib.onnx.graph import io_table, op_census

out = Path("out/01_export")
results = export_cnsd(model, out, height=128, width=192)
for name, result in results.items():
    print(f"{name:<11}{result.path.name:<17} external data: {result.external_data}")

# %%
print(io_table(out / "controlnet.onnx"))

# %% [markdown]
# ### Static vs dynamic axes
#
# A dynamic axis gets a *name* instead of a number in the ONNX graph. Naming `B`, `H`, `W` makes the
# batch and the image size free (the latent `h`, `w` follow). The same file then serves several sizes —
# at the price, in TensorRT, of an optimisation *profile* (min/opt/max) per input (chapter 2).

# %%
from course_lib.onnx.session import run_ort

dyn = export_cnsd(model, out / "dynamic", height=128, width=192, dynamic={"B", "H", "W"},
                  models=["controlnet"])
print(io_table(dyn["controlnet"].path).splitlines()[0])
for batch, height, width in [(1, 128, 192), (2, 64, 128)]:
    outs = run_ort(dyn["controlnet"].path, example_inputs(contracts(tiny, batch, height, width)["controlnet"]))
    print(f"batch {batch}, {height}x{width}: control0 {outs['control0'].shape}, control12 {outs['control12'].shape}")

# %% [markdown]
# ### The 2 GB trap and external data
#
# An ONNX file is one protobuf message, and protobuf cannot serialise more than 2 GB. The sd15 UNet
# has 859.5 M fp32 parameters — 3.4 GB — so its weights must live in a separate file
# (`unet.onnx.data`), referenced from the graph. `export_onnx` does this automatically past ~1.94 GB;
# here we force it on the tiny UNet to see the two files and check ONNX Runtime still finds the weights.

# %%
from course_lib.onnx.export import export_onnx

print(f"sd15 UNet weights: {sd15_counts['unet'] * 4 / 1e9:.2f} GB = {sd15_counts['unet'] * 4 / 2**30:.2f} GiB "
      "> protobuf's 2 GiB limit")
unet_feed = example_inputs(small["unet"], seed=2)
ext = export_onnx(model.positional("unet"), unet_feed, out / "external" / "unet.onnx",
                  output_names=["latent"], external_data=True)
print(sorted(p.name for p in ext.path.parent.iterdir()))
print(f"graph file {ext.path.stat().st_size / 2**20:.2f} MiB, weights file {ext.data_path.stat().st_size / 2**20:.1f} MiB")

# %% [markdown]
# ## 4. Parity: is the ONNX model the same function?
#
# For each model, fresh random inputs (a different seed from the export's, so a graph that froze an
# input as a constant is caught) go through PyTorch and ONNX Runtime. Per output the table shows the
# max absolute error, the max error relative to the output's scale, and `numpy.allclose(rtol=1e-3,
# atol=1e-5)`; NaN/Inf or a shape mismatch fail the row. fp32 ONNX Runtime vs fp32 PyTorch differ only
# by the order of floating-point operations: expect ~1e-6.

# %% tags=["nbval-ignore-output"]
table = check_exports(model, out, height=128, width=192)
table

# %%
worst = max(row.max_abs for row in table.rows)
print("rows:", len(table.rows), "| all pass:", table.passed, "| max abs err < 1e-4:", worst < 1e-4)

# %% [markdown]
# The same pipeline on ONNX Runtime: chapter 2's backends swap each sub-model for its ONNX file without
# touching the pipeline. Same seed, same noise — the images should agree to a pixel level or so.

# %%
from course_lib.backends import OrtBackend
from course_lib.cnsd import MODEL_NAMES
from course_lib.score import max_pixel_diff, psnr

pipe_ort = Canny2Image({n: OrtBackend(out / f"{n}.onnx") for n in MODEL_NAMES}, tokenizer, tiny, record_latents=True)
image_ort = pipe_ort.process(photo_small, "a bird", image_resolution=128, ddim_steps=20)[0]
latent_err = max(float((a - b).abs().max()) for a, b in zip(latents_torch, pipe_ort.last_latents))
print("max pixel difference <= 2:", max_pixel_diff(image_torch, image_ort) <= 2,
      "| PSNR > 40 dB:", psnr(image_torch, image_ort) > 40, "| latents within 1e-3:", latent_err < 1e-3)
fig, axes = plt.subplots(1, 3, figsize=(9, 2.4))
for ax, img, title in zip(axes, (edges, image_torch, image_ort), ("hint", "PyTorch", "ONNX Runtime")):
    ax.imshow(img)
    ax.set_title(title)
    ax.axis("off")
plt.show()

# %% [markdown]
# ## 5. Looking inside: op census and Netron
#
# Which operators did the exporter emit? Attention shows up as `MatMul` + `Softmax`; GroupNorm as
# `InstanceNormalization` between reshapes (or `GroupNormalization` in newer exporters); the no-op
# `Cast`s come from computing softmax and GroupNorm in fp32 — they matter in chapter 3 (FP16).

# %%
census = op_census(out / "unet.onnx")
print(", ".join(f"{op} {n}" for op, n in census.most_common(10)))
print("Softmax nodes (one per attention layer):", census["Softmax"])

# %% [markdown]
# Netron draws the graph. This cell starts a local Netron server on 127.0.0.1 (a free port, one per
# kernel, stopped with it) and shows it here. Find `control12` being added after the middle block.
#
# A cell that needs something your machine may lack starts with `%%needs` (loaded by the first cell's
# `%load_ext course_lib.notebook`): where Netron is missing, this one prints one line and Run All goes on.

# %% tags=["nbval-ignore-output"]
# %%needs netron
from course_lib.onnx.graph import show_in_netron

show_in_netron(out / "unet.onnx")

# %% [markdown]
# ## Exercises
#
# **1.** The hint goes into the ControlNet at full resolution, the latent at 1/8. Which of the 13
# controls have the latent's size at 128×192, and how many channels does `control12` have in `tiny`?
# Fill in and run the check.

# %%
from course_lib.notebook import answered      # the check below says "not done yet" until you have answered

### BEGIN SOLUTION: the names of the controls at the latent's 16x24 (a list), and control12's channels in tiny
full_size = [n for n, t in zip(small["controlnet"].output_names, small["controlnet"].outputs) if t.shape[2:] == (16, 24)]
control12_channels = small["controlnet"].outputs[-1].shape[1]
### END SOLUTION
if answered("exercise 1", full_size, control12_channels):
    assert full_size == ["control0", "control1", "control2"], full_size
    assert control12_channels == tiny.controlnet.model_channels * tiny.controlnet.channel_mult[-1]
    print("exercise 1: correct")

# %% [markdown]
# **2.** Export the VAE decoder with a dynamic batch only (`dynamic={"B"}`) and check that it decodes
# two latents at once in ONNX Runtime, matching PyTorch.

# %%
from course_lib.onnx.compare import check_onnx_against_torch

### BEGIN SOLUTION: export to out / "exercise2", then ex2 = check_onnx_against_torch(...) on a batch of 2
dec = export_cnsd(model, out / "exercise2", height=128, width=192, dynamic={"B"}, models=["decoder"])
two = example_inputs(contracts(tiny, 2, 128, 192)["decoder"], seed=3)
ex2 = check_onnx_against_torch(model.positional("decoder"), dec["decoder"].path, two)
### END SOLUTION
if answered("exercise 2", ex2):
    assert ex2.passed and ex2.rows[0].ref_shape == (2, 3, 128, 192)
    print("exercise 2: correct")

# %% [markdown]
# ## Hand it in (homework 1, the CPU half)
#
# Homework 1 hands in the four ONNX files (with their sidecars), the canny2image images on PyTorch and
# ONNX Runtime, and on a GPU machine the TensorRT plans' sidecars (chapter 2) — for **your** seed: the
# grader rebuilds the same tiny model from it and re-runs the parity checks on a CPU with fresh inputs.
# This cell writes the evidence into `homework/hw1/` and runs the homework's tests as the grader will;
# then, in a terminal: `python -m course_lib submit --hw 1 --student YOUR_ID --seed YOUR_SEED --out hw1.zip`.

# %%
from course_lib.homework.handin import write_hw1_evidence
from course_lib.homework.submit import submit

SEED, STUDENT = 0, "your-id"                     # <- the seed your instructor issued, your ID
write_hw1_evidence(build_cnsd(tiny, seed=SEED), "homework", height=64, width=64)
dry_run = submit("1", STUDENT, SEED, out=None)
print(dry_run.report())

# %% [markdown]
# ## Self-check
# What this chapter must leave behind: four ONNX files with the course's names, all parity rows green,
# and a pipeline that gives the same image on ONNX Runtime as on PyTorch.

# %%
import onnx

expected_io = {n: (c.input_names, c.output_names) for n, c in small.items()}
for name, (ins, outs) in expected_io.items():
    graph = onnx.load(str(out / f"{name}.onnx"), load_external_data=False).graph
    assert [i.name for i in graph.input] == ins and [o.name for o in graph.output] == outs, name
assert table.passed and worst < 1e-4
assert max_pixel_diff(image_torch, image_ort) <= 2 and latent_err < 1e-3
assert (image_by_hand == image_torch).all()
assert dry_run.passed
if toy_scores:                                              # the trained toy follows the edges, random does not
    assert toy_scores[0].edge_f1 > toy_scores[1].edge_f1
print("chapter 1 self-check passed")
