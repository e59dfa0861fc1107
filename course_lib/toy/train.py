"""Training the toy CNSD in the order the original was built: VAE, then UNet + text encoder, then ControlNet.

1. :func:`train_vae` -- encoder and decoder on the images: L1 reconstruction + a small KL to N(0, 1) on the
   posterior (ldm's AutoencoderKL, without its perceptual and adversarial terms). :func:`calibrate_latents`
   then folds one scale into ``quant_conv`` and ``post_quant_conv`` so that latents times the course's
   fixed 0.18215 have unit variance, as SD's do.
2. :func:`train_unet` -- UNet and CLIP together on posterior latents: the DDPM epsilon objective with the
   course's schedule (1000 steps, betas = linspace(sqrt 0.00085, sqrt 0.012)^2, timesteps uniform). A
   share of prompts is replaced by "" or the negative prompt so that classifier-free guidance has an
   unconditional model to subtract.
3. :func:`train_controlnet` -- the ControlNet starts as a copy of the trained UNet's encoder, its zero
   convolutions (and the hint block's last conv) at zero, as in the paper; UNet and CLIP are frozen.

Each stage runs until its step count or its wall-clock deadline, whichever comes first, with AdamW, a
linear warm-up then a constant rate, gradient clipping at 1, and an EMA of the weights (UNet, CLIP and
ControlNet; the shipped weights are the EMA's). Losses are logged per step.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from course_lib.cnsd.attention import set_attention_backend
from course_lib.cnsd.config import LATENT_SCALE
from course_lib.cnsd.model import CNSD
from course_lib.pipeline.canny2image import A_PROMPT, N_PROMPT
from course_lib.pipeline.sampler import NUM_TRAIN_STEPS, ddpm_alphas_cumprod
from course_lib.toy.data import ShapesData, all_prompts
from course_lib.toy.vae_encoder import VAEEncoder, kl_to_standard_normal

SUFFIXES = ("", ", ", ", " + A_PROMPT)   # canny2image sends prompt + ", " + a_prompt; a_prompt may be ""
UNCOND = ("", N_PROMPT)                  # what the pipeline's n_prompt may be


@dataclass(frozen=True)
class Recipe:
    """Batch, steps, learning rates and the rest of one training plan (see RECIPES)."""
    batch: int = 256
    vae_steps: int = 6000
    unet_steps: int = 20000
    control_steps: int = 30000
    vae_lr: float = 5e-4
    unet_lr: float = 3e-4
    control_lr: float = 2e-4
    kl_weight: float = 1e-4          # on the per-element mean KL; reconstruction is a per-pixel mean L1
    uncond_prob: float = 0.1         # UNet + CLIP stage: prompts replaced by "" or the negative prompt
    control_uncond_prob: float = 0.2
    ema_decay: float = 0.999
    warmup: int = 200
    pool: int = 100_000              # scenes drawn once at the start
    budget_shares: tuple[float, float, float] = (0.2, 0.35, 0.45)   # of --budget-s, by stage


RECIPES = {
    # an H100: the steps are upper bounds, a wall-clock budget (``--budget-s``) decides
    "gpu": Recipe(),
    # two CPU cores in about two hours (measured per step, see docs/benchmarks.md)
    "cpu": Recipe(batch=32, vae_steps=2000, unet_steps=8000, control_steps=7000, pool=20_000, warmup=100),
    # the test: every code path, a few seconds
    "smoke": Recipe(batch=4, vae_steps=2, unet_steps=2, control_steps=2, pool=64, warmup=1),
}


@dataclass
class StageLog:
    """What one stage did: steps run, why it stopped, its per-step losses."""
    name: str
    steps: int = 0
    planned_steps: int = 0
    batch: int = 0
    lr: float = 0.0
    seconds: float = 0.0
    stopped_by: str = "steps"
    losses: list[float] = field(default_factory=list)

    def final_loss(self, last: int = 200) -> float:
        tail = self.losses[-last:]
        return float(sum(tail) / len(tail)) if tail else math.nan

    def summary(self) -> dict:
        return {"steps": self.steps, "planned_steps": self.planned_steps, "batch": self.batch, "lr": self.lr,
                "seconds": round(self.seconds, 1), "stopped_by": self.stopped_by,
                "first_loss": self.losses[0] if self.losses else math.nan, "final_loss": self.final_loss()}


class EMA:
    """An exponential moving average of some modules' parameters (buffers are not averaged)."""

    def __init__(self, modules: list[nn.Module], decay: float):
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay = decay

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - self.decay)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        for p, s in zip(self.params, self.shadow):
            p.copy_(s)


def run_stage(name: str, loss_fn: Callable[[], torch.Tensor], params: list[nn.Parameter], steps: int, lr: float,
              recipe: Recipe, deadline: float, ema: EMA | None = None, progress: bool = True) -> StageLog:
    """The loop every stage shares: AdamW, warm-up, clipping, EMA, the deadline; losses fetched in blocks."""
    from course_lib.progress import tqdm

    log = StageLog(name, planned_steps=steps, batch=recipe.batch, lr=lr)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    pending: list[torch.Tensor] = []
    start = last_line = time.perf_counter()
    bar = tqdm(total=steps, desc=name, mininterval=10.0, disable=not progress)
    while log.steps < steps:
        if time.perf_counter() >= deadline:
            log.stopped_by = "budget"
            break
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (log.steps + 1) / recipe.warmup)
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if ema is not None:
            ema.update()
        pending.append(loss.detach())
        log.steps += 1
        if len(pending) == 100 or log.steps == steps:           # one device sync per 100 steps
            log.losses += torch.stack(pending).float().cpu().tolist()
            pending.clear()
            bar.set_postfix(loss=f"{log.final_loss(100):.4f}", refresh=False)
            if not progress and time.perf_counter() - last_line >= 30:            # a log line instead of a bar
                last_line = time.perf_counter()
                print(f"{name}: step {log.steps}/{steps}, loss {log.final_loss(100):.4f}, "
                      f"{last_line - start:.0f} s", flush=True)
        bar.update(1)
    log.losses += torch.stack(pending).float().cpu().tolist() if pending else []
    bar.close()
    if not all(math.isfinite(x) for x in log.losses):
        raise ValueError(f"stage {name}: the loss became NaN or infinite (lower the learning rate)")
    if ema is not None:
        ema.copy_to_model()
    log.seconds = time.perf_counter() - start
    return log


def train_vae(encoder: VAEEncoder, decoder: nn.Module, data: ShapesData, recipe: Recipe, deadline: float,
              progress: bool = True) -> StageLog:
    """Stage 1: the VAE on the pool's images (no EMA, as ldm's first stage)."""
    device = data.device

    def loss_fn() -> torch.Tensor:
        x = data.pixels(torch.randint(data.n, (recipe.batch,), device=device))      # (B, 3, H, W) in [-1, 1]
        mean, logvar = encoder(x)                                                    # (B, 4, H/8, W/8) each
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        return (decoder(z) - x).abs().mean() + recipe.kl_weight * kl_to_standard_normal(mean, logvar)

    params = [*encoder.parameters(), *decoder.parameters()]
    return run_stage("vae", loss_fn, params, recipe.vae_steps, recipe.vae_lr, recipe, deadline, None, progress)


@torch.no_grad()
def calibrate_latents(encoder: VAEEncoder, decoder: nn.Module, data: ShapesData, chunk: int = 2048
                      ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Encode the pool; scale the latent space so that ``latent * 0.18215`` has unit standard deviation.

    The scale k is folded into the weights (quant_conv's mean rows times k, its log-variance bias plus
    2 ln k, post_quant_conv's weight divided by k): decode(encode(x)) is unchanged. Returns the pool's
    posterior (mean, logvar) on the new scale and the standard deviation measured before.
    """
    means, logvars = [], []
    for start in range(0, data.n, chunk):
        m, lv = encoder(data.pixels(torch.arange(start, min(start + chunk, data.n), device=data.device)))
        means.append(m), logvars.append(lv)
    mean, logvar = torch.cat(means), torch.cat(logvars)
    std = float((mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)).std())
    k = 1.0 / (LATENT_SCALE * std)
    z = encoder.config.embed_dim
    encoder.quant_conv.weight[:z] *= k
    encoder.quant_conv.bias[:z] *= k
    encoder.quant_conv.bias[z:] += 2.0 * math.log(k)
    decoder.post_quant_conv.weight /= k
    return mean * k, logvar + 2.0 * math.log(k), std


class TextTable:
    """Token ids of every prompt the training can draw, on the device: (combos, suffixes, 77) and (2, 77)."""

    def __init__(self, tokenizer, device: torch.device):
        prompts = all_prompts()
        ids = tokenizer([p + s for p in prompts for s in SUFFIXES])
        self.ids = ids.reshape(len(prompts), len(SUFFIXES), -1).to(device)
        self.uncond = tokenizer(list(UNCOND)).to(device)

    def sample(self, combo: torch.Tensor, uncond_prob: float) -> torch.Tensor:
        """Ids (B, 77) for scenes ``combo``: a random suffix each, a share replaced by an uncond prompt."""
        b, device = len(combo), combo.device
        ids = self.ids[combo, torch.randint(len(SUFFIXES), (b,), device=device)]
        drop = torch.rand(b, device=device) < uncond_prob
        return torch.where(drop[:, None], self.uncond[torch.randint(len(UNCOND), (b,), device=device)], ids)


def _noisy(z0: torch.Tensor, acp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x_t = sqrt(a_t) z0 + sqrt(1 - a_t) noise for uniform t: returns (x_t, t, noise)."""
    t = torch.randint(NUM_TRAIN_STEPS, (z0.shape[0],), device=z0.device)
    a = acp[t][:, None, None, None]
    noise = torch.randn_like(z0)
    return a.sqrt() * z0 + (1 - a).sqrt() * noise, t, noise


def _latents(posterior: tuple[torch.Tensor, torch.Tensor], index: torch.Tensor) -> torch.Tensor:
    mean, logvar = posterior[0][index], posterior[1][index]
    return (mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)) * LATENT_SCALE    # (B, 4, h, w)


def train_unet(model: CNSD, data: ShapesData, posterior, text: TextTable, recipe: Recipe, deadline: float,
               progress: bool = True) -> StageLog:
    """Stage 2: UNet (no controls) and CLIP, the epsilon objective on posterior latents."""
    acp = ddpm_alphas_cumprod().to(data.device)

    def loss_fn() -> torch.Tensor:
        index = torch.randint(data.n, (recipe.batch,), device=data.device)
        x_t, t, noise = _noisy(_latents(posterior, index), acp)
        context = model.clip(text.sample(data.combo[index], recipe.uncond_prob))    # (B, 77, C)
        return F.mse_loss(model.unet(x_t, t, context), noise)

    modules = [model.unet, model.clip]
    set_attention_backend(model, "sdpa")
    try:
        ema = EMA(modules, recipe.ema_decay)
        return run_stage("unet+clip", loss_fn, [p for m in modules for p in m.parameters()], recipe.unet_steps,
                         recipe.unet_lr, recipe, deadline, ema, progress)
    finally:
        set_attention_backend(model, "math")


@torch.no_grad()
def init_controlnet(model: CNSD) -> None:
    """The paper's start: a copy of the UNet's encoder (time_embed, input_blocks, middle_block); the zero
    convs, middle_block_out and the hint block's last conv at zero; the rest of the hint block as built."""
    cn, unet = model.controlnet, model.unet
    for name in ("time_embed", "input_blocks", "middle_block"):
        getattr(cn, name).load_state_dict(getattr(unet, name).state_dict())
    for layer in [*(zc[0] for zc in cn.zero_convs), cn.middle_block_out[0], cn.input_hint_block[-1]]:
        layer.weight.zero_()
        layer.bias.zero_()


def train_controlnet(model: CNSD, data: ShapesData, posterior, text: TextTable, recipe: Recipe,
                     deadline: float, progress: bool = True) -> StageLog:
    """Stage 3: the ControlNet against the frozen UNet and CLIP (contexts computed once per prompt)."""
    acp = ddpm_alphas_cumprod().to(data.device)
    data.make_hints()
    init_controlnet(model)
    for m in (model.unet, model.clip):
        m.requires_grad_(False)
    with torch.no_grad():                                    # every prompt's context, once (CLIP is frozen)
        contexts = model.clip(text.ids.flatten(0, 1)).reshape(*text.ids.shape[:2], 77, -1)
        uncond = model.clip(text.uncond)

    def loss_fn() -> torch.Tensor:
        index = torch.randint(data.n, (recipe.batch,), device=data.device)
        b = len(index)
        x_t, t, noise = _noisy(_latents(posterior, index), acp)
        context = contexts[data.combo[index], torch.randint(len(SUFFIXES), (b,), device=data.device)]
        drop = torch.rand(b, device=data.device) < recipe.control_uncond_prob
        context = torch.where(drop[:, None, None], uncond[torch.randint(len(UNCOND), (b,), device=data.device)],
                              context)
        controls = model.controlnet(x_t, data.hint(index), t, context)               # 13 residuals
        return F.mse_loss(model.unet(x_t, t, context, controls), noise)

    set_attention_backend(model, "sdpa")
    try:
        ema = EMA([model.controlnet], recipe.ema_decay)
        return run_stage("controlnet", loss_fn, list(model.controlnet.parameters()), recipe.control_steps,
                         recipe.control_lr, recipe, deadline, ema, progress)
    finally:
        set_attention_backend(model, "math")
        for m in (model.unet, model.clip):
            m.requires_grad_(True)
