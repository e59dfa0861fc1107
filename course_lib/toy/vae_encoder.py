"""The VAE encoder of SD 1.5 (AutoencoderKL's Encoder + quant_conv): image -> latent distribution.

The course never encodes an image (canny2image starts from noise), so :mod:`course_lib.cnsd` has only the
decoder. Training the toy model's VAE needs both halves, as the original first stage was trained. Names
follow ldm's ``diffusionmodules.model.Encoder`` (``first_stage_model.encoder.*`` and
``first_stage_model.quant_conv.*`` in the checkpoint), so the toy checkpoint carries the same 108 encoder
tensors as control_sd15_canny.pth (tests/test_toy.py checks the sd15 shapes against the real layout).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from course_lib.cnsd.config import VAEConfig
from course_lib.cnsd.vae import AttnBlock, ResnetBlock, _norm


class Downsample(nn.Module):
    """Pad right and bottom by one, then a stride-2 3x3 conv without padding (ldm's VAE ``downsample.conv``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Encoder(nn.Module):
    """conv_in, down levels 0..len-1 (res blocks, then a Downsample except on the last), mid (res, attn,
    res), norm_out, conv_out to ``2 * z_channels`` (mean and log-variance: ldm's ``double_z``)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        g = cfg.norm_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        curr_res, block_in = cfg.resolution, cfg.ch
        in_mult = (1,) + tuple(cfg.ch_mult)
        self.down = nn.ModuleList()
        for level, mult in enumerate(cfg.ch_mult):
            down = nn.Module()
            down.block, down.attn = nn.ModuleList(), nn.ModuleList()
            block_in, block_out = cfg.ch * in_mult[level], cfg.ch * mult
            for _ in range(cfg.num_res_blocks):
                down.block.append(ResnetBlock(block_in, block_out, g))
                block_in = block_out
                if curr_res in cfg.attn_resolutions:
                    down.attn.append(AttnBlock(block_in, g))
            if level != len(cfg.ch_mult) - 1:
                down.downsample = Downsample(block_in)
                curr_res //= 2
            self.down.append(down)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, g)
        self.mid.attn_1 = AttnBlock(block_in, g)
        self.mid.block_2 = ResnetBlock(block_in, block_in, g)
        self.norm_out = _norm(block_in, g)
        self.conv_out = nn.Conv2d(block_in, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)                                        # (B, ch, H, W)
        for level, down in enumerate(self.down):
            for i, block in enumerate(down.block):
                h = block(h)
                if len(down.attn):
                    h = down.attn[i](h)
            if level != len(self.down) - 1:
                h = down.downsample(h)                             # halves H and W
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))             # (B, 2*z, H/8, W/8)


class VAEEncoder(nn.Module):
    """``vae_encoder(images) -> (mean, logvar)``: images (B,3,H,W) in [-1, 1] -> two (B,4,H/8,W/8) tensors.

    A latent is ``mean + exp(logvar / 2) * noise``; the diffusion model sees it times 0.18215.
    """

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, logvar = self.quant_conv(self.encoder(images)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)                     # as ldm's DiagonalGaussianDistribution

    def sample(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A latent drawn from the posterior (what the first stage hands to diffusion training)."""
        mean, logvar = self(images)
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + torch.exp(0.5 * logvar) * noise


def kl_to_standard_normal(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)) per element, averaged (ldm sums it; the toy's loss averages)."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
