"""course_lib.pipeline.loopgraph (chapter 3, issue 19): the whole DDIM loop as one CUDA graph.

What runs on a CPU: the loop itself (ddim_loop == ddim_sample, eps reuse as ReuseEps does it), the schedule as
the graph's key, and LoopGraphEps in a pipeline -- its capture fails on CPU tensors, so it warns once and runs
the same loop eagerly: the same image as the per-step strategies. The real capture runs in
tools/hopper_speed.py on a GPU (its loop-graph row is compared with the per-step graphed image).
"""
import warnings

import numpy as np
import pytest
import torch

from course_lib.cnsd.tokenizer import byte_level_tokenizer
from course_lib.pipeline.canny2image import Canny2Image
from course_lib.pipeline.eps import GraphedEps, GuidedEps, HintOnce, ReuseEps, eps_reuse_steps
from course_lib.pipeline.loopgraph import LoopGraphEps, ddim_loop, schedule_from_key, schedule_key
from course_lib.pipeline.sampler import ddim_sample, make_ddim_schedule
from course_lib.pipeline.speedups import eps_strategy, with_reuse

pytestmark = pytest.mark.usefixtures("one_thread")


def toy_eps(x, timestep):
    return torch.tanh(x * 0.7 + timestep / 1000.0)


def test_ddim_loop_is_ddim_sample_bit_for_bit():
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    for steps in (20, 10, 4):
        schedule = make_ddim_schedule(steps)
        assert torch.equal(ddim_loop(toy_eps, x, schedule), ddim_sample(toy_eps, x, schedule))
    with pytest.raises(ValueError, match="eta 0"):
        ddim_loop(toy_eps, x, make_ddim_schedule(4, eta=0.5))


def test_ddim_loop_reuses_eps_on_the_steps_reuse_eps_skips():
    x, schedule = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)), make_ddim_schedule(20)
    calls = []
    reuse = ReuseEps(every=4)
    reuse.inner.eps_fn = lambda backends, c, s: toy_eps                             # the model, replaced by toy_eps
    want = ddim_sample(reuse.eps_fn({}, None, schedule), x, schedule)

    def counted(x_, t):
        calls.append(t)
        return toy_eps(x_, t)
    got = ddim_loop(counted, x, schedule, eps_reuse_steps(20, 4))
    assert torch.equal(got, want) and len(calls) == 16 and reuse.reused == 4


def test_schedule_key_is_exact_and_hashable():
    schedule = make_ddim_schedule(20)
    key = schedule_key(schedule)
    assert hash(key) == hash(schedule_key(make_ddim_schedule(20))) and key != schedule_key(make_ddim_schedule(10))
    back = schedule_from_key(key)
    assert back.timesteps == schedule.timesteps and back.eta == schedule.eta
    for name in ("alphas", "alphas_prev", "sigmas", "sqrt_one_minus_alphas", "sqrt_alphas", "sqrt_alphas_prev",
                 "dir_coefs"):
        assert torch.equal(getattr(back, name), getattr(schedule, name)) and getattr(back, name).dtype == torch.float32


def pipe_with(cnsd, eps, **kwargs):
    return Canny2Image.from_torch(cnsd, byte_level_tokenizer(), eps=eps, progress=False, **kwargs)


def images(pipe, photo, n=3, steps=4, seeds=(2946901, 7, 2946901)):
    return [pipe.process(photo, "a bird", image_resolution=64, ddim_steps=steps, seed=seeds[i])[0] for i in range(n)]


@pytest.mark.parametrize("inner", ["batched", "hint-once"])
def test_loop_graph_pipeline_gives_the_per_step_image(cnsd, photo, inner):
    make = (lambda: GuidedEps("batched")) if inner == "batched" else (lambda: HintOnce(cnsd, "batched"))
    want = images(pipe_with(cnsd, make()), photo)
    loop = LoopGraphEps(make())
    pipe = pipe_with(cnsd, loop, time_stages=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = images(pipe, photo)
    assert all(np.array_equal(g, w) for g, w in zip(got, want))
    failed = [str(w.message) for w in caught if "DDIM loop: CUDA graph capture failed" in str(w.message)]
    assert len(failed) == 1 and loop.loop.failed and loop.loop.last_action == "eager"   # CPU: no capture
    assert len(pipe.last_timings.steps) == 1                                           # one timing for the loop


def test_loop_graph_bakes_in_eps_reuse(cnsd, photo):
    want = images(pipe_with(cnsd, ReuseEps(GuidedEps("batched"), every=2)), photo, n=1, steps=10)
    loop = with_reuse(LoopGraphEps(GuidedEps("batched")), 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = images(pipe_with(cnsd, loop), photo, n=1, steps=10)
    assert np.array_equal(got[0], want[0]) and loop.reuse_every == 2 and loop.reused == len(eps_reuse_steps(10, 2))


def test_loop_graph_is_spelled_and_refuses_what_it_cannot_do(cnsd, photo):
    eps = eps_strategy("fp16-batched-graph-sdpa-hint-once-cl-loop-graph-reuse-eps4", cnsd)
    assert isinstance(eps, LoopGraphEps) and isinstance(eps, GraphedEps) and isinstance(eps.inner, HintOnce)
    assert eps.whole_loop and eps.reuse_every == 4 and eps.guidance == "batched"
    assert isinstance(with_reuse(GuidedEps(), 4), ReuseEps) and with_reuse(eps, 0) is eps
    with pytest.raises(ValueError, match="runs the whole loop: bake the reuse in with its with_reuse"):
        ReuseEps(LoopGraphEps(), 4)
    with pytest.raises(ValueError, match="reuse_every=1"):
        LoopGraphEps(reuse_every=1)
    with pytest.raises(ValueError, match="record_latents"):
        pipe_with(cnsd, LoopGraphEps(GuidedEps("batched")), record_latents=True).process(photo, "a bird",
                                                                                        image_resolution=64, ddim_steps=2)
    with pytest.raises(ValueError, match="eta 0"):
        pipe_with(cnsd, LoopGraphEps(GuidedEps("batched"))).process(photo, "a bird", image_resolution=64, ddim_steps=2,
                                                                    eta=0.5)
