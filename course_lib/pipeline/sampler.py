"""DDIM sampling with classifier-free guidance: the loop that calls ControlNet and the UNet.

Chapter 1 introduces it. Three pieces, top to bottom:

1. the schedule -- :func:`ddpm_alphas_cumprod` (SD's 1000-step "linear" betas), :func:`ddim_timesteps`
   (20 of them: 1, 51, ..., 951) and :class:`DDIMSchedule`, which precomputes every per-step constant
   once and does one DDIM update in :meth:`DDIMSchedule.step`;
2. the model call -- :func:`guided_eps`: ControlNet -> scaled controls -> UNet for the prompt (cond) and
   the negative prompt (uncond), then ``eps = u + scale * (c - u)``. ``guidance="separate"`` makes two
   calls of each model per step like the original (40 ControlNet + 40 UNet runs per image at 20 steps);
   ``guidance="batched"`` stacks cond and uncond into batch 2, one call each (chapter 3);
3. the loop -- :func:`ddim_sample` walks the timesteps from 951 down to 1.

The numbers follow ControlNet 1.0 (``ldm/models/diffusion/ddpm.py`` register_schedule,
``ldm/modules/diffusionmodules/util.py``, ``cldm/ddim_hacked.py``): the schedule is computed in float64,
stored in float32, and every per-step operation runs in float32 in the original's order, so a torch
pipeline here reproduces the original's latents to float32 rounding.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from course_lib.progress import tqdm

from course_lib.cnsd.contract import CONTROL_NAMES

NUM_TRAIN_STEPS = 1000    # DDPM timesteps the model was trained with
LINEAR_START = 0.00085    # cldm_v15.yaml linear_start
LINEAR_END = 0.012        # cldm_v15.yaml linear_end
GUIDANCE_MODES = ("separate", "batched")   # cond and uncond: two calls, or one of batch 2

# ------------------------------------------------------------------------------------------- schedule


def ddpm_alphas_cumprod(num_train_steps: int = NUM_TRAIN_STEPS, linear_start: float = LINEAR_START,
                        linear_end: float = LINEAR_END) -> torch.Tensor:
    """Chapter 1: the DDPM noise schedule ``ā_t = prod_{s<=t} (1 - beta_s)`` for t = 0 .. T-1.

    ``betas = linspace(sqrt(start), sqrt(end), T) ** 2`` in float64 (SD's "linear" schedule), the
    cumulative product in float64, then cast to float32 -- as the original registers the buffer.
    Returns a float32 tensor of shape (T,).
    """
    betas = torch.linspace(linear_start ** 0.5, linear_end ** 0.5, num_train_steps, dtype=torch.float64) ** 2
    alphas_cumprod = np.cumprod(1.0 - betas.numpy(), axis=0)
    return torch.tensor(alphas_cumprod, dtype=torch.float32)


def ddim_timesteps(num_steps: int, num_train_steps: int = NUM_TRAIN_STEPS) -> np.ndarray:
    """Chapter 1: DDIM's "uniform" timesteps, ascending: every ``T // num_steps``-th step, plus one.

    For 20 steps: 1, 51, 101, ..., 951. The ``+ 1`` is the original's ("to get the final alpha values
    right"). When ``T`` is not a multiple of ``num_steps`` the original gets a few more steps than asked
    (30 -> 31 timesteps: 1, 34, ..., 991); this keeps that behaviour so results match. Counts whose
    spacing would reach timestep 1000 (3, 9, 27, ...) crash the original; here they raise ValueError.
    """
    if not isinstance(num_steps, (int, np.integer)) or not 1 <= num_steps <= num_train_steps:
        raise ValueError(f"ddim_steps {num_steps!r}: expected an integer in 1..{num_train_steps}")
    stride = num_train_steps // num_steps
    steps = np.arange(0, num_train_steps, stride, dtype=np.int64) + 1
    if steps[-1] >= num_train_steps:  # the original fails here too (an index past its alphas table)
        raise ValueError(f"ddim_steps {num_steps}: uniform spacing (every {stride}) + 1 reaches timestep "
                         f"{steps[-1]}, past the last of {num_train_steps}; use e.g. 2, 4, 5, 10, 20 or 50 steps")
    return steps


@dataclass(frozen=True)
class DDIMSchedule:
    """Chapter 1: every per-step DDIM constant, computed once (float32, CPU, 0-dim when indexed).

    ``index`` runs over the ascending ``timesteps``; sampling goes from the last index to 0.
    ``alphas[i]`` is ā at ``timesteps[i]``, ``alphas_prev[i]`` is ā at ``timesteps[i-1]`` (ā_0 for
    i = 0, as in the original), ``sigmas`` is 0 for eta = 0 (deterministic DDIM).
    """
    timesteps: tuple[int, ...]            # (S,) ascending, e.g. (1, 51, ..., 951)
    alphas: torch.Tensor                  # (S,) float32  ā_t
    alphas_prev: torch.Tensor             # (S,) float32  ā_prev
    sigmas: torch.Tensor                  # (S,) float32  eta * sqrt((1-ā_prev)/(1-ā_t) * (1 - ā_t/ā_prev))
    sqrt_one_minus_alphas: torch.Tensor   # (S,) float32  sqrt(1 - ā_t)
    sqrt_alphas: torch.Tensor             # (S,) float32  sqrt(ā_t)
    sqrt_alphas_prev: torch.Tensor        # (S,) float32  sqrt(ā_prev)
    dir_coefs: torch.Tensor               # (S,) float32  sqrt(1 - ā_prev - sigma^2)
    eta: float = 0.0

    def __len__(self) -> int:
        return len(self.timesteps)

    def step(self, x: torch.Tensor, eps: torch.Tensor, index: int, noise: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """One DDIM update from ``timesteps[index]``: returns ``(x_prev, pred_x0)`` (float32, like x).

        ``pred_x0 = (x - sqrt(1-ā_t) eps) / sqrt(ā_t)``;
        ``x_prev = sqrt(ā_prev) pred_x0 + sqrt(1 - ā_prev - sigma^2) eps + sigma noise``.
        ``noise`` (standard normal, x's shape) is needed only when ``sigmas[index] > 0``.
        """
        pred_x0 = (x - self.sqrt_one_minus_alphas[index] * eps) / self.sqrt_alphas[index]
        x_prev = self.sqrt_alphas_prev[index] * pred_x0 + self.dir_coefs[index] * eps
        if self.sigmas[index] > 0:
            if noise is None:
                raise ValueError(f"DDIM step {index}: sigma > 0 (eta={self.eta}) needs a noise tensor")
            x_prev = x_prev + self.sigmas[index] * noise.to(x_prev)
        return x_prev, pred_x0


def make_ddim_schedule(num_steps: int = 20, eta: float = 0.0, num_train_steps: int = NUM_TRAIN_STEPS
                       ) -> DDIMSchedule:
    """Chapter 1: the :class:`DDIMSchedule` for ``num_steps`` DDIM steps (20 in the course) and ``eta``."""
    if eta < 0:
        raise ValueError(f"eta {eta}: expected >= 0 (0 is deterministic DDIM)")
    steps = ddim_timesteps(num_steps, num_train_steps)
    acp = ddpm_alphas_cumprod(num_train_steps)                      # float32, like the original's buffer
    alphas = acp[steps]
    alphas_prev = torch.cat([acp[:1], acp[steps[:-1]]])
    a64, p64 = alphas.double(), alphas_prev.double()
    sigmas = (eta * torch.sqrt((1 - p64) / (1 - a64) * (1 - a64 / p64))).float()
    return DDIMSchedule(
        timesteps=tuple(int(t) for t in steps),
        alphas=alphas, alphas_prev=alphas_prev, sigmas=sigmas,
        # float32 throughout, with the original's functions: numpy's sqrt here, torch's below
        sqrt_one_minus_alphas=torch.from_numpy(np.sqrt(1.0 - alphas.numpy())),
        sqrt_alphas=alphas.sqrt(), sqrt_alphas_prev=alphas_prev.sqrt(),
        dir_coefs=(1.0 - alphas_prev - sigmas ** 2).sqrt(),
        eta=float(eta),
    )

# ----------------------------------------------------------------------------------- the model call


def timestep_tensor(timestep: int, batch: int, device: torch.device | str) -> torch.Tensor:
    """Chapter 1: the ``timestep`` input of the contract: int32, shape (batch,)."""
    return torch.full((batch,), int(timestep), dtype=torch.int32, device=device)


def run_controlnet(controlnet, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
                   hint: torch.Tensor, control_scales: Sequence[float]) -> dict[str, torch.Tensor]:
    """Chapter 1: ControlNet's 13 residuals, each multiplied by its control scale (``control0..12``)."""
    out = controlnet.infer({"x_noisy": x, "hint": hint, "timestep": timestep, "context": context})
    return {name: out[name] * float(s) for name, s in zip(CONTROL_NAMES, control_scales)}


def run_unet(unet, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
             controls: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Chapter 1: the ControlledUnet's noise prediction ``eps`` (the contract's ``latent`` output)."""
    return unet.infer({"x_noisy": x, "timestep": timestep, "context": context, **controls})["latent"]


def classifier_free_guidance(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Chapter 1: ``eps = u + scale * (c - u)`` (the original's order of operations)."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


def guided_eps(controlnet, unet, x: torch.Tensor, timestep: int | torch.Tensor, cond: torch.Tensor,
               uncond: torch.Tensor, hint: torch.Tensor, control_scales: Sequence[float], scale: float,
               guidance: str = "separate", guess_mode: bool = False) -> torch.Tensor:
    """Chapter 1: the guided noise prediction of one DDIM step, float32 (B, 4, h, w).

    ``controlnet``/``unet`` are backends; ``timestep`` an int or an int32 (B,) tensor; cond/uncond the
    CLIP contexts (B, 77, C); ``hint`` (B, ...) what the ControlNet takes. ``scale == 1`` runs the cond
    branch only, as the original. ``guidance``: "separate" (two calls of each model, the original) or
    "batched" (one call of batch 2B). ``guess_mode``: the uncond branch gets no control (zeros).
    """
    if guidance not in GUIDANCE_MODES:
        raise ValueError(f"guidance {guidance!r}: expected one of {GUIDANCE_MODES}")
    b = x.shape[0]
    t = timestep if isinstance(timestep, torch.Tensor) else timestep_tensor(timestep, b, x.device)
    if scale == 1.0:
        return run_unet(unet, x, t, cond, run_controlnet(controlnet, x, t, cond, hint, control_scales))
    if guidance == "separate":
        controls_c = run_controlnet(controlnet, x, t, cond, hint, control_scales)
        eps_c = run_unet(unet, x, t, cond, controls_c)
        controls_u = ({k: torch.zeros_like(v) for k, v in controls_c.items()} if guess_mode
                      else run_controlnet(controlnet, x, t, uncond, hint, control_scales))
        eps_u = run_unet(unet, x, t, uncond, controls_u)
        return classifier_free_guidance(eps_c, eps_u, scale)
    x2, t2, context2 = torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, uncond])   # (2B, ...)
    if guess_mode:
        controls_c = run_controlnet(controlnet, x, t, cond, hint, control_scales)
        controls = {k: torch.cat([v, torch.zeros_like(v)]) for k, v in controls_c.items()}
    else:
        controls = run_controlnet(controlnet, x2, t2, context2, torch.cat([hint, hint]), control_scales)
    eps_c, eps_u = run_unet(unet, x2, t2, context2, controls).chunk(2)
    return classifier_free_guidance(eps_c, eps_u, scale)

# ------------------------------------------------------------------------------------------ the loop

EpsFn = Callable[[torch.Tensor, int], torch.Tensor]
StepCallback = Callable[[int, int, torch.Tensor, torch.Tensor], None]


def ddim_sample(eps_fn: EpsFn, x_T: torch.Tensor, schedule: DDIMSchedule, *,
                generator: torch.Generator | None = None, callback: StepCallback | None = None,
                progress: bool = False) -> torch.Tensor:
    """Chapter 1: run DDIM from noise ``x_T`` down the schedule; returns the final latent.

    Args:
        eps_fn: ``eps_fn(x, timestep) -> eps`` (e.g. :func:`guided_eps` with the models bound).
        x_T: the starting noise (B, 4, h, w) float32.
        schedule: from :func:`make_ddim_schedule`.
        generator: a CPU ``torch.Generator`` for the per-step noise; required when eta > 0.
        callback: called after every step as ``callback(i, timestep, x_prev, pred_x0)``, i = 0..S-1.
        progress: show a tqdm bar over the steps.
    """
    if schedule.eta > 0 and generator is None:
        raise ValueError(f"eta={schedule.eta}: DDIM with eta > 0 needs a seeded torch.Generator for its noise")
    x = x_T
    num = len(schedule)
    for i in tqdm(range(num), desc="DDIM", disable=not progress):
        index = num - 1 - i                           # timesteps 951, 901, ..., 1
        timestep = schedule.timesteps[index]
        eps = eps_fn(x, timestep)
        noise = None
        if schedule.sigmas[index] > 0:
            noise = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device)
        x, pred_x0 = schedule.step(x, eps, index, noise)
        if callback is not None:
            callback(i, timestep, x, pred_x0)
    return x
