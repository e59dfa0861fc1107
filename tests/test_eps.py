"""course_lib.pipeline.eps: the eps strategies plugged into the one Canny2Image, on torch and on ONNX Runtime.

Tiny model, 64x64 image, a few DDIM steps. The ONNX files are exported once for the module (batch axis
dynamic, so batched guidance runs on them). CUDA-graph replays are checked here through ``Recorded``
(a capture that records the call; see test_cudagraph.py) and for real in tools/pipeline_gpu_check.py.
"""
import numpy as np
import pytest
import torch

from course_lib.backends import make_backends
from course_lib.cnsd.tokenizer import byte_level_tokenizer
from course_lib.pipeline import eps as eps_module
from course_lib.pipeline.canny2image import Canny2Image
from course_lib.pipeline.eps import (
    HINT_ONCE_NEEDS, GraphedEps, GuidedEps, HintOnce, ReuseEps, eps_reuse_steps, reuse_timesteps,
)
from course_lib.pipeline.sampler import make_ddim_schedule
from course_lib.score import max_pixel_diff, psnr
from test_cudagraph import Recorded
from test_pipeline import Counted



@pytest.fixture(scope="module")
def onnx_dir(cnsd, tmp_path_factory):
    from course_lib.onnx.export_cnsd import export_cnsd

    folder = tmp_path_factory.mktemp("onnx64")
    export_cnsd(cnsd, folder, height=64, width=64, dynamic=["B"], progress=False)
    return folder


def pipe_on(kind, cnsd, onnx_dir=None, **kwargs):
    backends = {n: Counted(b) for n, b in make_backends(kind, cnsd, onnx_dir=onnx_dir).items()}
    return Canny2Image(backends, byte_level_tokenizer(), cnsd.config, progress=False, record_latents=True, **kwargs)


def run(pipe, photo, steps=4, **kwargs):
    return pipe.process(photo, "a bird", image_resolution=64, ddim_steps=steps, **kwargs)[0]


def calls(pipe, name):
    return pipe.backends[name].calls


@pytest.mark.parametrize("kind", ["torch", "ort"])
def test_batched_guidance_halves_the_calls_and_keeps_the_latents(kind, cnsd, photo, request):
    onnx_dir = request.getfixturevalue("onnx_dir") if kind == "ort" else None
    separate, batched = pipe_on(kind, cnsd, onnx_dir), pipe_on(kind, cnsd, onnx_dir, eps=GuidedEps("batched"))
    out_s, out_b = run(separate, photo), run(batched, photo)
    assert (calls(separate, "controlnet"), calls(separate, "unet")) == (8, 8)     # 2 per step, the original
    assert (calls(batched, "controlnet"), calls(batched, "unet")) == (4, 4)       # one batch of 2 per step
    assert batched.guidance == "batched" and max_pixel_diff(out_s, out_b) <= 1
    for a, b in zip(separate.last_latents, batched.last_latents):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_ort_strategies_match_torch(cnsd, photo, onnx_dir):
    """Each CPU-runnable strategy gives on ONNX Runtime what it gives on torch (to float tolerance)."""
    for make in (lambda: GuidedEps("batched"), lambda: ReuseEps(GuidedEps("batched"), every=2),
                 lambda: ReuseEps(GuidedEps("separate"), every=2)):
        on_torch, on_ort = pipe_on("torch", cnsd, eps=make()), pipe_on("ort", cnsd, onnx_dir, eps=make())
        a, b = run(on_torch, photo, steps=8), run(on_ort, photo, steps=8)
        assert max_pixel_diff(a, b) <= 2, on_ort.eps
        torch.testing.assert_close(on_torch.last_latents[-1], on_ort.last_latents[-1], rtol=1e-3, atol=1e-3)


def test_eps_reuse_calls_the_models_fewer_times(cnsd, photo, onnx_dir):
    full, reused = pipe_on("ort", cnsd, onnx_dir), pipe_on("ort", cnsd, onnx_dir, eps=ReuseEps(every=2))
    a, b = run(full, photo, steps=8), run(reused, photo, steps=8)
    assert eps_reuse_steps(8, 2) == [3, 5] and reused.eps.reused == 2
    assert calls(full, "unet") == 16 and calls(reused, "unet") == 12 and calls(reused, "controlnet") == 12
    assert not np.array_equal(a, b) and psnr(b, a) > 25 and b.std() > 1        # another image, not a broken one


def test_fewer_steps_and_cached_text_on_ort(cnsd, photo, onnx_dir):
    pipe = pipe_on("ort", cnsd, onnx_dir, cache_text=True)
    two = run(pipe, photo, steps=2)
    assert calls(pipe, "unet") == 4 and len(pipe.last_latents) == 3 and calls(pipe, "clip") == 2
    four = run(pipe, photo, steps=4)
    assert calls(pipe, "clip") == 2 and calls(pipe, "unet") == 12             # text from the cache
    assert not np.array_equal(two, four)
    run(pipe, photo, n_prompt="blurry")
    assert calls(pipe, "clip") == 3


def test_hint_once_on_torch_gives_the_same_image(cnsd, photo):
    default = run(pipe_on("torch", cnsd), photo)
    for guidance in ("separate", "batched"):
        pipe = pipe_on("torch", cnsd, eps=HintOnce(cnsd, guidance))
        assert max_pixel_diff(run(pipe, photo), default) <= 1
        assert calls(pipe, "controlnet") == 0                                   # its own ControlNet ran


def test_hint_once_needs_the_torch_controlnet(cnsd, photo, onnx_dir):
    assert "torch ControlNet" in HINT_ONCE_NEEDS
    with pytest.raises(ValueError, match="hint once needs a ControlNet that takes the hint block's output"):
        run(pipe_on("ort", cnsd, onnx_dir, eps=HintOnce(cnsd)), photo)


def test_a_graphed_step_can_not_capture_onnx_runtime(cnsd, photo, onnx_dir):
    with pytest.raises(ValueError, match="can't capture ONNX Runtime"):
        run(pipe_on("ort", cnsd, onnx_dir, eps=GraphedEps()), photo)


def test_graphed_step_without_cuda_warns_once_and_gives_the_same_image(cnsd, photo):
    if torch.cuda.is_available():
        pytest.skip("checks the failed capture on a machine without CUDA")
    default = run(pipe_on("torch", cnsd), photo)
    pipe = pipe_on("torch", cnsd, eps=GraphedEps())
    with pytest.warns(RuntimeWarning, match="DDIM step: CUDA graph capture failed") as caught:
        assert np.array_equal(run(pipe, photo), default)
        assert np.array_equal(run(pipe, photo), default)
    assert len([w for w in caught if "capture failed" in str(w.message)]) == 1


@pytest.mark.parametrize("inner", ["separate", "batched", "hint-once"])
def test_one_recorded_step_graph_serves_every_step_and_image(inner, cnsd, photo, monkeypatch):
    """The graphed step takes x, timestep, contexts and hint as inputs: replays with new ones give the eager
    image bit for bit (a timestep or hint baked into the graph would not)."""
    monkeypatch.setattr(eps_module, "CudaGraph", Recorded)
    make = (lambda: HintOnce(cnsd, "batched")) if inner == "hint-once" else (lambda: GuidedEps(inner))
    eager, graphed = pipe_on("torch", cnsd, eps=make()), pipe_on("torch", cnsd, eps=GraphedEps(make()))
    for seed in (1, 2):
        assert np.array_equal(run(graphed, photo, seed=seed), run(eager, photo, seed=seed))
    assert len(graphed.eps.graph.graphs) == 1 and graphed.eps.graph.last_action == "replay"


def test_reuse_helpers():
    assert eps_reuse_steps(20, 4) == [3, 7, 11, 15]
    schedule = make_ddim_schedule(20)
    assert reuse_timesteps(schedule, [1, 3]) == [901, 801]
    with pytest.raises(ValueError, match="step 0 has no previous eps"):
        reuse_timesteps(schedule, [0])
    with pytest.raises(ValueError, match="every=1"):
        ReuseEps(every=1)
    with pytest.raises(ValueError, match="guidance 'fused'"):
        GuidedEps("fused")
    assert repr(ReuseEps(GraphedEps(GuidedEps("batched")), 4)) == "ReuseEps(GraphedEps(GuidedEps('batched')), every=4)"
