"""The VAE decoder of SD 1.5 (AutoencoderKL's post_quant_conv + Decoder): latent -> image in [-1, 1].

Chapter 1 introduces it. Names follow ldm's diffusionmodules.model (``first_stage_model.decoder.*`` and
``first_stage_model.post_quant_conv.*`` in the checkpoint). The latent it takes is already divided by
the scale factor 0.18215: the course applies that scaling outside the model, as the original does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from course_lib.cnsd.config import VAEConfig
from course_lib.cnsd.unet import Upsample  # nearest x2 then a 3x3 conv named ``conv``, as in ldm's VAE


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """norm1-SiLU-conv1, norm2-SiLU-conv2, plus the input (through a 1x1 ``nin_shortcut`` if widths differ)."""

    def __init__(self, in_channels: int, out_channels: int, groups: int = 32):
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, groups)
        self.dropout = nn.Dropout(0.0)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with 1x1 convs for q, k, v and proj_out."""

    def __init__(self, channels: int, groups: int = 32):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q, self.k, self.v = (nn.Conv2d(channels, channels, 1) for _ in range(3))
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q = self.q(y).flatten(2).transpose(1, 2)                # (B, hw, C)
        k = self.k(y).flatten(2)                                # (B, C, hw)
        v = self.v(y).flatten(2)                                # (B, C, hw)
        attn = ((q @ k) * c ** -0.5).softmax(dim=-1)            # (B, hw, hw)
        out = (v @ attn.transpose(1, 2)).reshape(b, c, h, w)    # (B, C, h, w)
        return x + self.proj_out(out)


class Decoder(nn.Module):
    """conv_in, mid (res, attn, res), up levels from the deepest (index len-1) to 0, norm_out, conv_out."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        g = cfg.norm_groups
        block_in = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, g)
        self.mid.attn_1 = AttnBlock(block_in, g)
        self.mid.block_2 = ResnetBlock(block_in, block_in, g)
        ups = []
        curr_res = cfg.resolution // 2 ** (len(cfg.ch_mult) - 1)
        for level in reversed(range(len(cfg.ch_mult))):
            up = nn.Module()
            block_out = cfg.ch * cfg.ch_mult[level]
            up.block = nn.ModuleList()
            up.attn = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                up.block.append(ResnetBlock(block_in, block_out, g))
                block_in = block_out
                if curr_res in cfg.attn_resolutions:
                    up.attn.append(AttnBlock(block_in, g))
            if level != 0:
                up.upsample = Upsample(block_in)
                curr_res *= 2
            ups.insert(0, up)                                    # up[0] is the full-resolution level
        self.up = nn.ModuleList(ups)
        self.norm_out = _norm(block_in, g)
        self.conv_out = nn.Conv2d(block_in, cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(range(len(self.up))):
            up = self.up[level]
            for i, block in enumerate(up.block):
                h = block(h)
                if len(up.attn):
                    h = up.attn[i](h)
            if level != 0:
                h = up.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VAEDecoder(nn.Module):
    """``vae_decoder(latent) -> images``: post_quant_conv (1x1) then the Decoder; (B,4,h,w) -> (B,3,8h,8w)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.config = cfg
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)
        self.decoder = Decoder(cfg)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_tracing() and (latent.ndim != 4 or latent.shape[1] != self.config.embed_dim):
            raise ValueError(f"latent {tuple(latent.shape)}: expected (B, {self.config.embed_dim}, h, w)")
        return self.decoder(self.post_quant_conv(latent))
