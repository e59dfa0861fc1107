"""course_lib.pipeline.canny2image: canny2image end to end on the tiny preset (chapter 1), small and fast.

64x64 image, 2-4 DDIM steps, except one test at the course's 20 steps.
"""
import numpy as np
import pytest
import torch

from course_lib.backends import TorchBackend
from course_lib.cnsd import build_cnsd, contracts, get_config
from course_lib.cnsd.tokenizer import get_tokenizer
from course_lib.pipeline.canny2image import A_PROMPT, N_PROMPT, Canny2Image, StageTimings, control_scales
from course_lib.pipeline.eps import GuidedEps
from course_lib.pipeline.hint import canny_hint, hwc3, resize_image
from course_lib.pipeline.sampler import (
    classifier_free_guidance, make_ddim_schedule, run_controlnet, run_unet, timestep_tensor,
)




@pytest.fixture(scope="module")
def cnsd():
    return build_cnsd(get_config("tiny"), seed=0)


@pytest.fixture(scope="module")
def tokenizer():
    return get_tokenizer(allow_fallback=True)


@pytest.fixture
def pipe(cnsd, tokenizer):
    return Canny2Image.from_torch(cnsd, tokenizer, progress=False)


@pytest.fixture(scope="module")
def photo():
    """A 64x64 "photo": a bright disc and a bar on a gradient, so Canny finds edges."""
    yy, xx = np.mgrid[:64, :64]
    img = np.stack([xx * 3, yy * 3, np.full_like(xx, 60)], axis=-1).astype(np.uint8)
    img[(yy - 28) ** 2 + (xx - 30) ** 2 < 15 ** 2] = (240, 200, 40)
    img[50:56, 8:56] = (20, 20, 200)
    return img


def run(pipe, photo, **kwargs):
    kwargs = {"image_resolution": 64, "ddim_steps": 2, **kwargs}
    return pipe.process(photo, "a bird", **kwargs)


def _one_step(pipe, photo, **kwargs):
    return run(pipe, photo, ddim_steps=1, **kwargs)


def test_output_is_uint8_hwc_and_deterministic(pipe, photo):
    out = run(pipe, photo)
    assert isinstance(out, list) and len(out) == 1
    assert out[0].shape == (64, 64, 3) and out[0].dtype == np.uint8
    assert out[0].std() > 1                                      # an image, not a constant
    again = run(pipe, photo)
    assert np.array_equal(out[0], again[0])
    other = run(pipe, photo, seed=1)
    assert np.abs(other[0].astype(int) - out[0].astype(int)).max() > 10
    assert pipe.last_seed == 1
    assert pipe.last_edge_map.shape == (64, 64, 3) and pipe.last_edge_map.max() == 255


def test_num_samples_and_bad_arguments(pipe, photo):
    out = _one_step(pipe, photo, num_samples=2)
    assert len(out) == 2 and all(o.shape == (64, 64, 3) for o in out)
    assert not np.array_equal(out[0], out[1])                    # each sample has its own noise
    with pytest.raises(ValueError, match="num_samples"):
        run(pipe, photo, num_samples=0)
    with pytest.raises(ValueError, match="low <= high"):
        run(pipe, photo, low_threshold=200, high_threshold=100)
    with pytest.raises(ValueError, match="backends: missing"):
        Canny2Image({"clip": pipe.backends["clip"]}, pipe.tokenizer, pipe.config)


def test_recorded_latents_and_timings(pipe, photo):
    pipe.record_latents = True
    out = run(pipe, photo, ddim_steps=4)
    latents = pipe.last_latents
    assert len(latents) == 5 and all(x.shape == (1, 4, 8, 8) for x in latents)
    x_T = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(2946901))
    assert torch.equal(latents[0], x_T)                          # the seed's CPU noise
    with torch.inference_mode():
        assert np.array_equal(pipe.decode(latents[-1])[0], out[0])
    t = pipe.last_timings
    assert isinstance(t, StageTimings) and len(t.steps) == 4
    assert t.clip > 0 and t.decoder > 0 and min(t.steps) > 0
    assert t.total >= t.clip + sum(t.steps) + t.decoder
    assert set(t.summary()) == {"clip", "controlnet+unet", "per step", "decoder", "total"}
    pipe.time_stages = False
    assert np.array_equal(run(pipe, photo, ddim_steps=4)[0], out[0])
    assert pipe.last_timings.steps == [] and pipe.last_timings.clip == 0 and pipe.last_timings.total > 0


def test_the_ddim_loop_by_hand_is_process(pipe, photo):
    """What chapter 1 shows: the steps, the two eps and the update written out give process()'s image."""
    out = run(pipe, photo, ddim_steps=4)[0]
    b, scales = pipe.backends, [1.0] * 13
    with torch.inference_mode():
        _, hint = canny_hint(resize_image(hwc3(photo), 64), 100, 200)
        cond, uncond = (b["clip"].infer({"input_ids": pipe.tokenizer([text])})["last_hidden_state"]
                        for text in ("a bird, " + A_PROMPT, N_PROMPT))
        x = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(2946901))
        schedule = make_ddim_schedule(4)
        for index in reversed(range(len(schedule))):                     # timesteps 751, 501, 251, 1
            t = timestep_tensor(schedule.timesteps[index], 1, "cpu")
            eps_c = run_unet(b["unet"], x, t, cond, run_controlnet(b["controlnet"], x, t, cond, hint, scales))
            eps_u = run_unet(b["unet"], x, t, uncond, run_controlnet(b["controlnet"], x, t, uncond, hint, scales))
            eps = classifier_free_guidance(eps_c, eps_u, 9.0)
            s = schedule                                                  # sqrt(1 - ā_t), sqrt(ā_t), ...
            pred_x0 = (x - s.sqrt_one_minus_alphas[index] * eps) / s.sqrt_alphas[index]
            x = s.sqrt_alphas_prev[index] * pred_x0 + s.dir_coefs[index] * eps   # dir_coefs: sqrt(1 - ā_prev)
        assert np.array_equal(pipe.decode(x)[0], out)


def test_given_x_T_reproduces_the_seed(pipe, photo):
    x_T = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(7))
    assert np.array_equal(run(pipe, photo, seed=7)[0], run(pipe, photo, seed=123, x_T=x_T)[0])
    with pytest.raises(ValueError, match="x_T shape"):
        run(pipe, photo, x_T=torch.zeros(1, 4, 16, 16))


class Counted:
    """Wraps a backend and counts its calls."""

    def __init__(self, backend):
        self.backend, self.calls = backend, 0
        self.name, self.input_names, self.output_names = backend.name, backend.input_names, backend.output_names

    def infer(self, feed):
        self.calls += 1
        return self.backend.infer(feed)


def counted_pipe(pipe, **kwargs):
    backends = {n: Counted(b) for n, b in pipe.backends.items()}
    return Canny2Image(backends, pipe.tokenizer, pipe.config, progress=False, **kwargs), backends


def test_batched_guidance_matches_separate(pipe, photo):
    separate, counts_s = counted_pipe(pipe, record_latents=True)
    batched, counts_b = counted_pipe(pipe, eps=GuidedEps("batched"), record_latents=True)
    out_s, out_b = run(separate, photo, ddim_steps=4), run(batched, photo, ddim_steps=4)
    assert (counts_s["controlnet"].calls, counts_s["unet"].calls) == (8, 8)     # 2 per step, like the original
    assert (counts_b["controlnet"].calls, counts_b["unet"].calls) == (4, 4)     # cond + uncond as batch 2
    assert np.abs(out_s[0].astype(int) - out_b[0].astype(int)).max() <= 1
    for a, b in zip(separate.last_latents, batched.last_latents):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_guess_mode_and_strength(pipe, photo):
    scales = control_scales(1.0, guess_mode=True)
    assert scales[12] == 1.0 and scales[0] == pytest.approx(0.825 ** 12) and control_scales(0.5) == [0.5] * 13
    guess, counts = counted_pipe(pipe)
    run = _one_step
    out_guess = run(guess, photo, guess_mode=True)
    assert counts["controlnet"].calls == 1 and counts["unet"].calls == 2       # uncond runs without control
    base = run(pipe, photo)
    assert not np.array_equal(out_guess[0], base[0])
    assert not np.array_equal(run(pipe, photo, strength=0.0)[0], base[0])


def test_text_cache_switch(pipe, photo):
    cached, counts = counted_pipe(pipe, cache_text=True)
    run = _one_step
    first = run(cached, photo)
    assert counts["clip"].calls == 2                                           # prompt + a_prompt, n_prompt
    second = run(cached, photo)
    assert counts["clip"].calls == 2 and np.array_equal(first[0], second[0])
    run(cached, photo, n_prompt="blurry")
    assert counts["clip"].calls == 3
    uncached, counts = counted_pipe(pipe)
    assert np.array_equal(run(uncached, photo)[0], first[0])
    run(uncached, photo)
    assert counts["clip"].calls == 4


def test_progress_bar_switch(pipe, photo, capsys):
    run = _one_step
    run(pipe, photo)
    assert "DDIM" not in capsys.readouterr().err
    pipe.progress = True
    run(pipe, photo)
    assert "DDIM" in capsys.readouterr().err


@pytest.mark.slow
def test_default_settings_twenty_steps(pipe, photo):
    """The course's settings (20 DDIM steps, scale 9, the two prompts) on a 64x64 image."""
    pipe.record_latents = True
    out = pipe.process(photo, "a bird", A_PROMPT, N_PROMPT, 1, 64)
    assert out[0].shape == (64, 64, 3) and len(pipe.last_timings.steps) == 20
    assert len(pipe.last_latents) == 21 and torch.isfinite(pipe.last_latents[-1]).all()


def test_from_torch_wraps_each_sub_model(cnsd, tokenizer):
    pipe = Canny2Image.from_torch(cnsd, tokenizer)
    assert set(pipe.backends) == {"clip", "controlnet", "unet", "decoder"}
    assert all(isinstance(b, TorchBackend) for b in pipe.backends.values())
    assert pipe.backends["unet"].input_names == contracts(cnsd.config)["unet"].input_names
