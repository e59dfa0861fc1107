# %% [markdown]
# # Chapter 7 — Serving canny2image with Triton Inference Server
#
# A deployment does not end at a plan file: the engines are *served*. Many users send requests at
# once, over the network, and the server decides when each model runs. NVIDIA's server for TensorRT
# plans and ONNX models is **Triton Inference Server**. In this chapter you
#
# 1. turn chapter 1's exports into a **model repository** — one folder per model, each with a
#    `config.pbtxt` — and read one `config.pbtxt` line by line,
# 2. see canny2image itself become a served model that runs the DDIM loop by calling the four
#    sub-models through the server (*business-logic scripting*, BLS),
# 3. start a server on 127.0.0.1, ask it for health and readiness, and send one request over HTTP and
#    over gRPC — and check that the served image is the ONNX Runtime pipeline's, pixel for pixel,
# 4. load it with 1, 4 and 8 concurrent clients, with and without **dynamic batching**, and read from
#    the server's own metrics the batches it formed,
# 5. break things on purpose: wrong inputs, no server, a server killed mid-run,
# 6. read what changes on a GPU with NVIDIA's container (written down, **not run here**).
#
# Everything up to section 6 runs on a CPU, on the `tiny` preset at 64×64 pixels so that hundreds of
# requests take seconds. The server is the `tritonserver` 2.51 that PyPI ships inside
# `nvidia-pytriton` 0.7.0; it has the **Python backend only**, so on this machine each sub-model is a
# small Python model running ONNX Runtime. NVIDIA's container adds the native ONNX Runtime and
# TensorRT backends (section 6). `python -m course_lib serve-install` unpacked the server (CI does it
# in its set-up); the next cell does it too if needed.

# %% tags=["nbval-ignore-output"]
# %load_ext course_lib.notebook
from course_lib.env import detect
from course_lib.serve.install import TRITON_VERSION, install_tritonserver

print(detect().report())
dist = install_tritonserver(say=lambda message: None)     # unpacks once (a 55 MB download), then finds it
print("tritonserver", TRITON_VERSION, "in", dist.home)

# %% [markdown]
# ## 1. From exports to a model repository
#
# The sub-models are exported as in chapter 1, with one change: the batch axis is **dynamic** (`B`), so
# the server may stack several users' requests into one run. `write_repository` (the command is
# `python -m course_lib serve-repo --onnx-dir DIR --out REPO`) writes one folder per model:
# `config.pbtxt` and a version folder `1/` holding the model itself. Tensor names, data types and
# dims come from the ONNX files and are checked against the course's contract; `check_repository`
# parses every `config.pbtxt` with Triton's own protobuf schema and checks it again.

# %%
from pathlib import Path

from course_lib.cnsd import build_cnsd, get_config
from course_lib.onnx.export_cnsd import export_cnsd
from course_lib.serve.model_config import check_repository
from course_lib.serve.repository import write_repository

SIZE = 64                                            # pixels: the latent is 8x8, a request takes milliseconds
out = Path("out/07_serve")
config = get_config("tiny")
export_cnsd(build_cnsd(config, seed=0), out / "onnx", height=SIZE, width=SIZE, dynamic=["B"])
repo = out / "repo"
write_repository(out / "onnx", repo, target="cpu")
for path in sorted(p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file()):
    print(path)

# %% [markdown]
# One row per model: the backend that runs it, the largest batch the server may form, whether it
# forms them (`dynamic_batching`), how many copies of the model run (instances) and where.

# %%
def show(rows):
    keys = list(rows[0])
    print("  ".join(f"{k:>{max(len(k), *(len(str(r[k])) for r in rows))}}" for k in keys))
    for r in rows:
        print("  ".join(f"{str(r[k]):>{max(len(k), *(len(str(x[k])) for x in rows))}}" for k in keys))


show(check_repository(repo))

# %% [markdown]
# ## 2. One `config.pbtxt`, line by line
#
# The UNet's configuration (the header lines starting with `#` are comments):

# %%
print((repo / "unet" / "config.pbtxt").read_text())

# %% [markdown]
# Reading it from the top:
#
# * `name` must equal the folder name; clients ask for the model by it.
# * `backend: "python"` — on this server each sub-model is a Python model, `1/model.py`, which runs
#   `1/model.onnx` with ONNX Runtime. In NVIDIA's container the same model would say
#   `platform: "onnxruntime_onnx"` (or `"tensorrt_plan"`) and need no Python at all (section 6).
# * `max_batch_size: 8` — the model accepts a batch axis of up to 8 in front of every `dims`. The
#   dims are **per item**: `x_noisy` is `(B, 4, 8, 8)` for the model and `dims: [ 4, 8, 8 ]` here.
#   A model exported with a static batch of 1 gets `max_batch_size: 0` and its full shape instead.
# * `timestep` is `(B,)` for the model — one number per item — but Triton wants at least one dim per
#   item, so the wire shape is `[ 1 ]` and `reshape: { shape: [ ] }` removes it before the model sees
#   it. Clients send `(B, 1)`.
# * `data_type: TYPE_FP32` / `TYPE_INT32` — the contract's float32 and int32; the server refuses
#   anything else (section 5).
# * `dynamic_batching { max_queue_delay_microseconds: 2000 }` — when a request arrives, wait up to
#   2 ms for more, then run everything waiting **as one batch** (up to 8). Without this block, every
#   request runs alone.
# * `instance_group [ { count: 1 kind: KIND_CPU } ]` — one copy of the model, on the CPU. On a GPU:
#   `KIND_GPU`, and `count: 2` lets one copy compute while the other copies its inputs.
# * `parameters` — free-form strings for the model's own code: here, ONNX Runtime's thread count.
#
# Triton's schema reads it back: the parsed message is what the server will use.

# %%
from course_lib.serve.model_config import parse_config, type_name

unet_config = parse_config(repo / "unet" / "config.pbtxt")
timestep = [t for t in unet_config.input if t.name == "timestep"][0]
print("max_batch_size:", unet_config.max_batch_size, "| inputs:", len(unet_config.input),
      "| dynamic batching:", unet_config.HasField("dynamic_batching"))
print("timestep:", type_name(timestep.data_type), "dims", list(timestep.dims), "-> model sees", list(timestep.reshape.shape))
try:
    parse_config('name: "unet"\nmax_batch_sise: 8\n')     # a typo: Triton would refuse to load it
except ValueError as e:
    print("typo:", str(e).split(": ", 1)[1])

# %% [markdown]
# ### canny2image as a served model: business-logic scripting
#
# The fifth model, `canny2image`, takes a photo and a prompt and returns images. Its `model.py` is
# course_lib's own `Canny2Image` — the DDIM loop of chapter 1, unchanged — over four backends of a
# new kind: `TritonBackend.infer(feed)` sends a request **to another model of the same server**
# (`pb_utils.InferenceRequest(...).exec()`) instead of running it. That is the whole trick: the
# pipeline was written against the backend interface in chapter 2, so serving it is one more backend.
# Its inputs are the photo (uint8 H×W×3), the prompt (UTF-8 bytes as uint8 — the bundled server's
# Python stub predates numpy 2 and mis-reads Triton's string type) and optional numbers
# (`seed`, `ddim_steps`, ...).

# %%
source = (repo / "canny2image" / "1" / "model.py").read_text()
start = source.index("class TritonBackend")
print(source[start:source.index("class TritonPythonModel")].strip())

# %% [markdown]
# ## 3. Start the server: health and readiness
#
# `TritonServer(repo).start()` (the command is `python -m course_lib serve --repo REPO`) runs the
# bundled `tritonserver` binary on **127.0.0.1 only**, on three free ports: HTTP, gRPC and metrics.
# It fixes three things for you, all in the environment of the server process: `LD_LIBRARY_PATH`
# starts with this Python's library folder (the Python backend's stub is linked against
# `libpython3.X.so` and would otherwise pick up the system's copy and fail with `'_thread.RLock' object
# has no attribute '_recursion_count'`), `PATH` starts with this Python's folder (so the stub's
# embedded Python finds this environment's numpy, ONNX Runtime and torch) and `PYTHONPATH` starts with
# this course_lib. Each Python model runs in its own stub process; all of them are in one process
# group, so stopping the server stops them all.
#
# Two questions a load balancer asks: **live** (`/v2/health/live`: the process answers) and **ready**
# (`/v2/health/ready`: every model loaded). `start()` returns when the server is ready.

# %%
import sysconfig

from course_lib.serve.server import TritonServer, server_env

env = server_env(dist)
print("LD_LIBRARY_PATH starts with this Python's LIBDIR:",
      env["LD_LIBRARY_PATH"].split(":")[0] == sysconfig.get_config_var("LIBDIR"))
server = TritonServer(repo)
server.start()
print("live:", server.live(), "| ready:", server.ready())
print({name: server.model_ready(name) for name in ("clip", "controlnet", "unet", "decoder", "canny2image")})
print("listens on 127.0.0.1 only:", all(url.startswith("127.0.0.1:") for url in (server.http_url, server.grpc_url)))

# %% tags=["nbval-ignore-output"]
print(" \\\n    ".join(server.command(dist)))      # the command line it runs (ports differ every time)

# %% [markdown]
# ## 4. One request, two protocols, the same pixels
#
# `request_canny2image` sends the photo and the prompt through `tritonclient` (the command is
# `python -m course_lib request --repo REPO --out out.png`). We ask for 20 DDIM steps at seed 2946901,
# over HTTP and over gRPC, and run the same ONNX files in this process with chapter 2's ONNX Runtime
# pipeline. Same files, same seed, same arithmetic: the images must be equal, not just close.

# %%
import numpy as np

from course_lib.backends import make_backends
from course_lib.cnsd.tokenizer import byte_level_tokenizer
from course_lib.pipeline.canny2image import Canny2Image
from course_lib.samples import sample_photo
from course_lib.serve.client import request_canny2image

photo = sample_photo(size=(SIZE, SIZE))
settings = dict(ddim_steps=20, image_resolution=SIZE, seed=2946901)
served_http = request_canny2image(server.http_url, photo, "a bird", protocol="http", **settings)
served_grpc = request_canny2image(server.grpc_url, photo, "a bird", protocol="grpc", **settings)
pipe = Canny2Image(make_backends("ort", onnx_dir=out / "onnx"), byte_level_tokenizer(), config)
local = pipe.process(photo, "a bird", **settings)[0]
print("served images:", served_http.shape, served_http.dtype)
print("HTTP == gRPC:", np.array_equal(served_http, served_grpc))
print("served == ONNX Runtime pipeline, pixel for pixel:", np.array_equal(served_http[0], local))

# %%
import matplotlib.pyplot as plt

fig, axes = plt.subplots(1, 3, figsize=(9, 3))
for ax, image, title in zip(axes, (photo, pipe.last_edge_map, served_http[0]),
                            ("photo 64x64", "Canny hint", "served (random tiny weights)")):
    ax.imshow(image)
    ax.set_title(title)
    ax.axis("off")
plt.show()

# %% [markdown]
# ## 5. Many clients at once: dynamic batching
#
# A whole canny2image request is 80 sub-model calls (20 steps × ControlNet and UNet × cond and
# uncond), one after the other — too slow on two CPU cores for hundreds of requests. The batching
# experiment therefore serves **one sub-model, the UNet**, twice in one server: `unet` as generated
# (dynamic batching) and `unet_nobatch`, the same files with the `dynamic_batching` block removed
# (`batching_twin` edits the parsed config and writes it back). Then `sweep` runs 1, 4 and 8
# concurrent clients against each, 50 requests per run, three rounds, the two models interleaved so
# that a busy moment of this shared machine hits both. Each run stops after its requests or 30 s.
#
# Afterwards the server's metrics endpoint tells what it did: `nv_inference_count` counts inferences
# (batch items), `nv_inference_exec_count` counts executions (model runs). Their ratio is the average
# batch the server formed; the statistics extension gives every batch size.

# %%
server.stop()                                       # free the CPU for the measurement
from course_lib.serve.loadtest import batching_twin, contract_feed, plot_load, summary, sweep

models = batching_twin(repo, "unet", out / "batching")
feed = contract_feed(repo, "unet")                  # seeded inputs, (B, 1) timestep, as on the wire
print("models:", models, "| inputs:", {k: v.shape for k, v in list(feed.items())[:3]}, "...")
bench = TritonServer(out / "batching").start()
results = sweep(bench, models, feed, concurrencies=(1, 4, 8), requests=50, repeats=3, time_limit=30)
rows = summary(results)

# %% tags=["nbval-ignore-output"]
show(rows)
plot_load(results, out / "load.png")
plt.show()

# %% [markdown]
# How to read it (numbers differ from machine to machine and run to run; the facts below do not):
#
# * **1 client**: nothing to batch; `unet` waits up to 2 ms for company that never comes, so its
#   latency is a little worse than `unet_nobatch`'s.
# * **4 and 8 clients**: without batching the requests queue for the single model instance, one run
#   each, and latency grows with the queue. With batching the server runs them together; one run of 8
#   costs much less than 8 runs of 1 here, so throughput rises and latency stays lower.
# * The batch sizes come from the server, not from us.
# * Batching is not free for a lone user: canny2image's DDIM loop makes 82 sub-model calls one after
#   the other, and each waits up to 2 ms for company. On this machine a whole request took ~770 ms
#   served with batching, ~620 ms served without, ~500 ms in-process (docs/benchmarks.md).

# %%
by = {(r["model"], r["clients"]): r for r in rows}
print("every request answered:", all(r["errors"] == 0 and r["requests"] == 150 for r in rows))
print("without dynamic batching, every execution ran one request:",
      all(by["unet_nobatch", c]["executions"] == by["unet_nobatch", c]["inferences"] for c in (1, 4, 8)))
print("with 8 clients the server formed batches (mean > 1):", by["unet", 8]["mean batch"] > 1)
print("no batch larger than max_batch_size 8:",
      all(int(b.split(":")[0]) <= 8 for r in rows for b in r["batch sizes"].split()))

# %% tags=["nbval-ignore-output"]
metrics = bench.metrics()
print("\n".join(line for line in metrics.splitlines()
                if line.startswith(("nv_inference_count", "nv_inference_exec_count")) and "unet" in line))

# %% [markdown]
# ## 6. When things go wrong
#
# Every failure comes back as **one line**: Triton's own message when it refuses a request, a plain
# sentence when there is no server or the connection drops.

# %%
from course_lib.serve.client import infer
from course_lib.serve.server import ServeError, free_ports

wrong = {"a wrong name": {**{k: v for k, v in feed.items() if k != "context"}, "contxt": feed["context"]},
         "a wrong shape": {**feed, "x_noisy": feed["x_noisy"][:, :, :4]},
         "a wrong dtype": {**feed, "x_noisy": feed["x_noisy"].astype(np.float64)}}
for what, bad in wrong.items():
    try:
        infer(bench.grpc_url, "unet", bad, protocol="grpc")
    except ServeError as e:
        print(f"{what}: {e}")

# %%
port = free_ports(1)[0]
try:
    infer(f"127.0.0.1:{port}", "unet", feed, timeout=5)
except ServeError as e:
    print(str(e).replace(str(port), "PORT"))
try:
    TritonServer(repo, http_port=int(bench.http_url.split(":")[1])).start()     # that port is in use
except ServeError as e:
    print(str(e).replace(bench.http_url.split(":")[1], "PORT"))

# %% [markdown]
# Now the server dies in the middle of a load test (SIGKILL to its process group). The clients that
# were waiting get an error, the run ends at once instead of hammering a dead address, and the next
# start works.

# %%
import threading
import time

from course_lib.serve.loadtest import load_test

crash = {}
thread = threading.Thread(target=lambda: crash.update(run=load_test(bench, "unet", feed, 4, 10**6, time_limit=20)))
thread.start()
time.sleep(0.5)
bench.kill()
thread.join(30)
bench.stop()
run = crash["run"]
print("answered before the kill:", run.completed > 0, "| failed cleanly:", run.errors > 0,
      "| run ended within 5 s:", run.seconds < 5)
print("the client was told the server went away:",
      "closed the connection" in run.first_error or "no Triton server answers" in run.first_error)
with TritonServer(out / "batching", models=["unet"]) as again:
    print("next start ready:", again.ready(), "| answers:", infer(again.http_url, "unet", feed)["latent"].shape)

# %% [markdown]
# ## 7. On a GPU: NVIDIA's container (written down, not run here)
#
# Nothing in this section executed on the machine that built this notebook (no GPU, no container);
# it is the layout and the commands as Triton documents them, and the repository below is checked
# structurally only. What changes:
#
# * **Native backends.** `--target gpu` writes the sub-models as `platform: "onnxruntime_onnx"`
#   (`1/model.onnx`) or, with `--plan-dir`, as `platform: "tensorrt_plan"` (`1/model.plan`, built in
#   chapter 2): no Python in the sub-models, the server runs them itself. A plan is tied to its GPU
#   and TensorRT version — build it with the TensorRT of the container — and its optimisation profile
#   must cover `max_batch_size` (build with `--profile dynamic`), else the server refuses to load it.
# * **Instance groups.** `kind: KIND_GPU, gpus: [ 0 ]`; `count: 2` overlaps one instance's copies
#   with the other's compute; with several GPUs, one group per GPU.
# * **canny2image** stays a Python model; the container's Python needs course_lib (and torch, OpenCV):
#   `pip install` it in a derived image, or point `PYTHONPATH` at a mounted checkout.
# * **CUDA shared memory.** A client on the same machine can register GPU buffers
#   (`tritonclient.utils.cuda_shared_memory`) and pass tensors by handle instead of over HTTP/gRPC.
# * Run it: `docker run --gpus all --rm --network host -v $PWD/repo_gpu:/models nvcr.io/nvidia/tritonserver:<yy.mm>-py3 tritonserver --model-repository=/models --http-address=127.0.0.1 --grpc-address=127.0.0.1`
#   and measure with `perf_analyzer -m unet --concurrency-range 1:8` from the SDK image.

# %%
write_repository(out / "onnx", out / "repo_gpu", target="gpu")
show(check_repository(out / "repo_gpu"))
print((out / "repo_gpu" / "unet" / "config.pbtxt").read_text().split("input [")[0])

# %% tags=["requires-gpu"]
# %%needs gpu
import shutil

if shutil.which("docker") is None:
    print("a GPU but no docker: run the docker command above where NVIDIA's container runs")
else:
    print("docker run --gpus all --rm --network host -v", (out / "repo_gpu").resolve(),
          ":/models nvcr.io/nvidia/tritonserver:<yy.mm>-py3 tritonserver --model-repository=/models")

# %% [markdown]
# ## Self-check

# %%
assert all(r["model"] for r in check_repository(repo))
assert np.array_equal(served_http[0], local) and np.array_equal(served_http, served_grpc)
assert all(r["errors"] == 0 for r in rows) and by["unet", 8]["mean batch"] > 1
assert run.errors > 0 and run.seconds < 5 and not again.live()
print("chapter 7 self-check passed")
