"""course_lib.pipeline.fastpath and course_lib.pipeline.fastpipeline (chapter 3): the speed-up switches keep canny2image's
result, on the tiny model.

CPU tests run a 64x64 image for a few DDIM steps; the CUDA-graph and fp16 paths are marked gpu.
"""
import numpy as np
import pytest
import torch

from course_lib.cnsd import build_cnsd, get_config
from course_lib.pipeline.canny2image import Canny2Image
from course_lib.cnsd.tokenizer import byte_level_tokenizer
from course_lib.cnsd.unet import GroupNorm32
from course_lib.pipeline.fastpath import (
    LADDER, GuidedEps, ReuseEps, Switches, controls_from_guided_hint, eps_reuse_steps, reuse_timesteps, to_half,
)
from course_lib.pipeline.fastpipeline import FastCanny2Image
from course_lib.pipeline.sampler import guided_eps, make_ddim_schedule
from course_lib.score import max_pixel_diff, psnr

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")




@pytest.fixture(scope="module")
def cnsd():
    return build_cnsd(get_config("tiny"), seed=0)


@pytest.fixture(scope="module")
def tokenizer():
    return byte_level_tokenizer()


@pytest.fixture(scope="module")
def photo():
    yy, xx = np.mgrid[:64, :64]
    img = np.stack([xx * 3, yy * 3, np.full_like(xx, 60)], axis=-1).astype(np.uint8)
    img[(yy - 28) ** 2 + (xx - 30) ** 2 < 15 ** 2] = (240, 200, 40)
    return img


@pytest.fixture(scope="module")
def reference(cnsd, tokenizer, photo):
    """The original pipeline's image at 4 steps (fp32, separate CFG)."""
    return Canny2Image.from_torch(cnsd, tokenizer, progress=False).process(photo, "a bird", image_resolution=64,
                                                                           ddim_steps=4)[0]


def fast(cnsd, tokenizer, photo, variant, steps=4, device="cpu", **kwargs):
    pipe = FastCanny2Image(cnsd, tokenizer, variant, device, **kwargs)
    return pipe, pipe.process(photo, "a bird", image_resolution=64, ddim_steps=steps)[0]


def test_variant_names_round_trip_and_reject_typos():
    for name in LADDER + ("fp16-batched-graph-sdpa-hint-once-reuse-eps4-steps10-cache-text", "fp32-batched-reuse-eps3"):
        assert Switches.from_name(name).name == name
    s = Switches.from_name("fp16-batched-graph-sdpa-hint-once-compile-reuse-eps")
    assert (s.dtype, s.cfg, s.cuda_graph, s.attention, s.hint_once, s.compile, s.reuse_every) == \
        ("fp16", "batched", True, "sdpa", True, True, 4)
    assert Switches().name == "fp32-separate" and not Switches().needs_cuda
    with pytest.raises(ValueError, match="unknown part 'grpah'"):
        Switches.from_name("fp16-batched-grpah")
    with pytest.raises(ValueError, match="dtype"):
        Switches(dtype="int8")
    with pytest.raises(ValueError, match="reuse_every"):
        Switches(reuse_every=1)


def test_to_half_runs_groupnorm32_in_fp32_and_leaves_the_original(cnsd):
    half = to_half(cnsd)
    norm = next(m for m in half.modules() if isinstance(m, GroupNorm32))
    assert norm.weight.dtype == torch.float16 and half.unet.input_blocks[0][0].weight.dtype == torch.float16
    x = torch.randn(1, norm.num_channels, 4, 4).half()
    reference = torch.nn.functional.group_norm(x.float(), norm.num_groups, norm.weight.float(), norm.bias.float(), norm.eps)
    assert norm(x).dtype == torch.float16 and torch.allclose(norm(x).float(), reference.half().float())
    assert all(p.dtype == torch.float32 for p in cnsd.parameters())


def test_default_switches_reproduce_the_original_pipeline(cnsd, tokenizer, photo, reference):
    pipe, image = fast(cnsd, tokenizer, photo, "fp32-separate", time_stages=True)
    assert np.array_equal(image, reference)
    assert len(pipe.last_timings.steps) == 4 and pipe.last_timings.total > 0
    assert pipe.last_edge_map.shape == (64, 64, 3) and pipe.last_seed == 2946901


def test_guided_eps_matches_the_samplers_guided_eps(cnsd, tokenizer):
    """The graphable step is the same function as chapter 1's guided_eps over TorchBackends."""
    pipe = Canny2Image.from_torch(cnsd, tokenizer, progress=False)
    g = torch.Generator().manual_seed(1)
    x, hint = torch.randn(1, 4, 8, 8, generator=g), torch.rand(1, 3, 64, 64, generator=g)
    cond, uncond = torch.randn(1, 77, 64, generator=g), torch.randn(1, 77, 64, generator=g)
    scales = [0.5 + 0.05 * i for i in range(13)]
    for cfg in ("separate", "batched"):
        want = guided_eps(pipe.backends["controlnet"], pipe.backends["unet"], x, 501, cond, uncond, hint, scales, 9.0, cfg=cfg)
        step = GuidedEps(cnsd.controlnet, cnsd.unet, torch.float32, cfg, 9.0, scales)
        with torch.inference_mode():
            got = step.compute(x, torch.full((1,), 501, dtype=torch.int32), torch.cat([cond, uncond]),
                               torch.cat([hint, hint]) if cfg == "batched" else hint)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_hint_once_gives_the_same_controls(cnsd):
    g = torch.Generator().manual_seed(2)
    x, hint = torch.randn(2, 4, 8, 8, generator=g), torch.rand(2, 3, 64, 64, generator=g)
    t, context = torch.tensor([951, 1], dtype=torch.int32), torch.randn(2, 77, 64, generator=g)
    with torch.inference_mode():
        want = cnsd.controlnet(x, hint, t, context)
        got = controls_from_guided_hint(cnsd.controlnet, x, cnsd.controlnet.input_hint_block(hint), t, context)
    assert len(got) == 13 and all(torch.equal(a, b) for a, b in zip(got, want))


def test_batched_cfg_sdpa_and_hint_once_stay_within_one_pixel_level(cnsd, tokenizer, photo, reference):
    for variant in ("fp32-batched", "fp32-batched-sdpa", "fp32-separate-hint-once", "fp32-batched-sdpa-hint-once"):
        _, image = fast(cnsd, tokenizer, photo, variant)
        assert max_pixel_diff(image, reference) <= 1, variant


def test_eps_reuse_skips_steps_and_changes_the_image_a_bounded_amount(cnsd, tokenizer, photo):
    _, full = fast(cnsd, tokenizer, photo, "fp32-batched", steps=8)
    pipe, reused = fast(cnsd, tokenizer, photo, "fp32-batched-reuse-eps2", steps=8)
    assert eps_reuse_steps(8, 2) == [3, 5] and pipe.last_reused == 2
    assert not np.array_equal(full, reused)
    assert psnr(reused, full) > 25                      # ~45 dB here; another seed gives ~9 dB
    assert reused.std() > 1


def test_fewer_steps_switch_overrides_ddim_steps(cnsd, tokenizer, photo, reference):
    pipe, two = fast(cnsd, tokenizer, photo, "fp32-separate-steps2", time_stages=True)
    assert len(pipe.last_timings.steps) == 2
    assert two.shape == reference.shape and not np.array_equal(two, reference)


def test_cache_text_encodes_each_prompt_pair_once(cnsd, photo):
    calls = []
    tokenizer = byte_level_tokenizer()

    def counting(texts):
        calls.append(list(texts))
        return tokenizer(texts)
    pipe = FastCanny2Image(cnsd, counting, "fp32-batched-cache-text", "cpu")
    for _ in range(2):
        pipe.process(photo, "a bird", image_resolution=64, ddim_steps=1)
    assert len(calls) == 1 and len(calls[0]) == 2      # one batched CLIP call for cond + uncond, once


def test_reuse_helpers():
    assert eps_reuse_steps(20, 4) == [3, 7, 11, 15]
    schedule = make_ddim_schedule(20)
    assert reuse_timesteps(schedule, [1, 3]) == [901, 801]
    with pytest.raises(ValueError, match="step 0 has no previous eps"):
        reuse_timesteps(schedule, [0])
    seen = []
    eps = ReuseEps(lambda x, t: seen.append(t) or torch.full((1,), float(t)), reuse_timesteps=[901])
    outs = [eps(None, t).item() for t in (951, 901, 851)]
    assert outs == [951.0, 951.0, 851.0] and seen == [951, 851] and eps.reused == 1


def test_bad_combinations_raise_one_clear_error(cnsd, tokenizer, photo):
    with pytest.raises(ValueError, match="need device cuda"):
        FastCanny2Image(cnsd, tokenizer, "fp32-batched-graph", "cpu")
    with pytest.raises(ValueError, match="to_half"):
        FastCanny2Image(cnsd, tokenizer, "fp16-batched", "cpu")
    pipe = FastCanny2Image(cnsd, tokenizer, "fp32-batched", "cpu")
    with pytest.raises(ValueError, match="guess_mode"):
        pipe.process(photo, "a bird", image_resolution=64, guess_mode=True)


def test_stage_functions_run_one_stage_each(cnsd, tokenizer):
    fns = FastCanny2Image(cnsd, tokenizer, "fp32-batched", "cpu").stage_fns(64, 64)
    assert list(fns) == ["clip", "controlnet", "unet", "step", "decoder"]
    assert fns["clip"]().shape == (2, 77, 64)
    assert fns["step"]().shape == (1, 4, 8, 8)
    assert fns["decoder"]().shape == (1, 64, 64, 3)
    assert len(fns["controlnet"]()) == 1 and len(fns["unet"]()) == 1      # batched: one call each


@pytest.mark.gpu
@needs_gpu
def test_cuda_graph_step_matches_eager_on_gpu(cnsd, tokenizer, photo):
    model = to_half(cnsd).cuda()
    _, eager = fast(model, tokenizer, photo, "fp16-batched-sdpa", device="cuda")
    pipe, graphed = fast(model, tokenizer, photo, "fp16-batched-graph-sdpa-hint-once", device="cuda")
    _, again = fast(model, tokenizer, photo, "fp16-batched-graph-sdpa-hint-once", device="cuda")
    assert max_pixel_diff(graphed, eager) <= 1 and np.array_equal(graphed, again)
    assert pipe._step.graphs                                                 # the step really was captured
    fns = pipe.stage_fns(64, 64)
    assert fns["step"]().shape == (1, 4, 8, 8)
