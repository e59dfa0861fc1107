"""course_lib.pipeline.sampler: the DDPM/DDIM schedule, one DDIM step, guidance, the loop (chapter 1)."""
import math

import pytest
import torch

from course_lib.cnsd.contract import CONTROL_NAMES
from course_lib.pipeline.sampler import (
    classifier_free_guidance, ddim_sample, ddim_timesteps, ddpm_alphas_cumprod, guided_eps,
    make_ddim_schedule,
)


def alpha_bar_by_hand(t: int) -> float:
    """ā_t from the formula, in float64: betas = linspace(sqrt(0.00085), sqrt(0.012), 1000) ** 2."""
    lo, hi = math.sqrt(0.00085), math.sqrt(0.012)
    prod = 1.0
    for s in range(t + 1):
        prod *= 1.0 - (lo + (hi - lo) * s / 999) ** 2
    return prod


def test_ddim_timesteps_have_the_plus_one_offset():
    assert ddim_timesteps(20).tolist() == list(range(1, 1000, 50))        # 1, 51, ..., 951
    assert ddim_timesteps(20)[-1] == 951 and len(ddim_timesteps(20)) == 20
    assert ddim_timesteps(1).tolist() == [1]
    steps30 = ddim_timesteps(30)                                           # the original's 31 steps
    assert len(steps30) == 31 and steps30[1] - steps30[0] == 33
    for bad in (0, 1001, 2.5):
        with pytest.raises(ValueError, match="ddim_steps"):
            ddim_timesteps(bad)
    for past_the_end in (3, 9, 1000):                                      # 999 + 1 would be timestep 1000
        with pytest.raises(ValueError, match="timestep 1000"):
            ddim_timesteps(past_the_end)


def test_alphas_cumprod_match_the_formula():
    acp = ddpm_alphas_cumprod()
    assert acp.shape == (1000,) and acp.dtype == torch.float32
    assert acp[0].item() == pytest.approx(1 - 0.00085, rel=1e-7)
    for t in (1, 51, 500, 951, 999):
        assert acp[t].item() == pytest.approx(alpha_bar_by_hand(t), rel=2e-7)
    assert acp[951].item() < 0.01                                          # nearly pure noise at the start


def test_schedule_tables():
    s = make_ddim_schedule(20)
    acp = ddpm_alphas_cumprod()
    assert s.timesteps == tuple(range(1, 1000, 50)) and len(s) == 20
    assert torch.equal(s.alphas, acp[list(s.timesteps)])
    assert s.alphas_prev[0] == acp[0]                                      # ā_0, not 1, as the original
    assert torch.equal(s.alphas_prev[1:], s.alphas[:-1])
    assert (s.sigmas == 0).all()
    torch.testing.assert_close(s.sqrt_one_minus_alphas, torch.sqrt(1 - s.alphas), rtol=2e-7, atol=0)
    for table in (s.alphas, s.alphas_prev, s.sigmas, s.dir_coefs):
        assert table.dtype == torch.float32
    s1 = make_ddim_schedule(20, eta=1.0)
    a, p = alpha_bar_by_hand(951), alpha_bar_by_hand(901)
    assert s1.sigmas[19].item() == pytest.approx(math.sqrt((1 - p) / (1 - a) * (1 - a / p)), rel=1e-5)
    with pytest.raises(ValueError, match="eta"):
        make_ddim_schedule(20, eta=-0.1)


def test_step_recovers_x0_from_the_true_noise():
    s = make_ddim_schedule(20)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    i = 10
    a, p = s.alphas[i].double(), s.alphas_prev[i].double()
    x_t = (a.sqrt() * x0 + (1 - a).sqrt() * eps).float()
    x_prev, pred_x0 = s.step(x_t, eps, i)
    torch.testing.assert_close(pred_x0, x0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x_prev, (p.sqrt() * x0 + (1 - p).sqrt() * eps).float(), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="noise"):
        make_ddim_schedule(20, eta=0.5).step(x_t, eps, i)


def test_loop_order_callback_and_closed_form():
    s = make_ddim_schedule(20)
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    seen = []
    out = ddim_sample(lambda x, t: torch.zeros_like(x), x_T, s,
                      callback=lambda i, t, x, x0: seen.append((i, t)))
    assert seen == [(i, 951 - 50 * i) for i in range(20)]
    # with eps = 0 every step scales x by sqrt(ā_prev / ā_t): the product telescopes
    torch.testing.assert_close(out, x_T * math.sqrt(s.alphas_prev[0] / s.alphas[-1]), rtol=1e-5, atol=1e-6)


def test_eta_needs_a_generator_and_is_seeded():
    s = make_ddim_schedule(4, eta=0.5)
    x_T = torch.zeros(1, 4, 4, 4)
    eps_fn = lambda x, t: 0.1 * x  # noqa: E731
    with pytest.raises(ValueError, match="Generator"):
        ddim_sample(eps_fn, x_T, s)
    run = lambda seed: ddim_sample(eps_fn, x_T, s, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    assert torch.equal(run(3), run(3)) and not torch.equal(run(3), run(4))


class Counting:
    """A backend over plain tensor arithmetic that counts calls and batch sizes (enough for CFG algebra)."""

    def __init__(self, name, input_names, output_names, fn):
        self.name, self.input_names, self.output_names, self.fn = name, input_names, output_names, fn
        self.batches = []

    def infer(self, feed):
        self.batches.append(feed["x_noisy"].shape[0])
        assert feed["timestep"].dtype == torch.int32 and feed["timestep"].shape == (feed["x_noisy"].shape[0],)
        return dict(zip(self.output_names, self.fn(**feed)))


def make_models():
    def controlnet(x_noisy, hint, timestep, context):
        base = x_noisy * hint.mean((1, 2, 3), keepdim=True) + context.mean((1, 2))[:, None, None, None]
        return [base * (k + 1) for k in range(13)]

    def unet(x_noisy, timestep, context, **controls):
        extra = sum(controls[n] for n in CONTROL_NAMES)
        per_sample = timestep[:, None, None, None] * 1e-3 + context.mean((1, 2))[:, None, None, None]
        return [0.5 * x_noisy + extra + per_sample]

    return (Counting("controlnet", ["x_noisy", "hint", "timestep", "context"], list(CONTROL_NAMES), controlnet),
            Counting("unet", ["x_noisy", "timestep", "context", *CONTROL_NAMES], ["latent"], unet))


@pytest.mark.parametrize("guess_mode", [False, True])
def test_separate_and_batched_guidance_agree(guess_mode):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 4, 4, generator=g)
    cond, uncond = torch.randn(2, 77, 8, generator=g), torch.randn(2, 77, 8, generator=g)
    hint = torch.rand(2, 3, 32, 32, generator=g)
    scales = [0.5 + 0.1 * i for i in range(13)]
    results = {}
    for guidance in ("separate", "batched"):
        cn, un = make_models()
        results[guidance] = guided_eps(cn, un, x, 951, cond, uncond, hint, scales, 9.0, guidance, guess_mode=guess_mode)
        if guidance == "separate":
            assert cn.batches == ([2] if guess_mode else [2, 2]) and un.batches == [2, 2]
        else:
            assert cn.batches == ([2] if guess_mode else [4]) and un.batches == [4]
    torch.testing.assert_close(results["separate"], results["batched"], rtol=1e-6, atol=1e-5)
    # the guided eps is u + 9 (c - u) of the two branches computed by hand (no guess mode)
    if not guess_mode:
        cn, un = make_models()
        t = torch.full((2,), 951, dtype=torch.int32)
        eps = []
        for ctx in (cond, uncond):
            c = cn.fn(x, hint, t, ctx)
            eps.append(un.fn(x, t, ctx, **{n: v * s for n, v, s in zip(CONTROL_NAMES, c, scales)})[0])
        torch.testing.assert_close(results["separate"], classifier_free_guidance(eps[0], eps[1], 9.0))


def test_scale_one_runs_the_cond_branch_only_and_bad_guidance():
    cn, un = make_models()
    x = torch.ones(1, 4, 4, 4)
    ctx, hint = torch.zeros(1, 77, 8), torch.ones(1, 3, 32, 32)
    guided_eps(cn, un, x, 1, ctx, ctx, hint, [1.0] * 13, 1.0)
    assert cn.batches == [1] and un.batches == [1]
    with pytest.raises(ValueError, match="guidance 'fused'"):
        guided_eps(cn, un, x, 1, ctx, ctx, hint, [1.0] * 13, 9.0, guidance="fused")
