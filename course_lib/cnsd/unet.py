"""The denoising UNet of SD 1.5 and its ControlNet-aware variant (ControlledUnet).

Chapter 1 introduces it. Parameter names follow ldm's openaimodel.UNetModel, so the checkpoint's
``model.diffusion_model.*`` tensors load by name. The building blocks here (ResBlock, Downsample,
Upsample, the timestep embedding) are shared with the ControlNet, which copies the UNet's encoder.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from course_lib.cnsd.attention import SpatialTransformer
from course_lib.cnsd.config import UNetConfig
from course_lib.cnsd.contract import NUM_CONTROLS


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps (B,) -> (B, dim), [cos | sin] as in ldm."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in fp32 whatever the input dtype (fp16 statistics overflow)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()    # a .half() model keeps fp16 weights
        bias = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, + time embedding, GroupNorm-SiLU-Dropout-conv, + skip (identity or 1x1 conv)."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int | None = None, groups: int = 32):
        super().__init__()
        out_channels = out_channels or channels
        self.in_layers = nn.Sequential(GroupNorm32(groups, channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(GroupNorm32(groups, out_channels), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))  # zero-init in ldm
        self.skip_connection = (nn.Identity() if out_channels == channels
                                else nn.Conv2d(channels, out_channels, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    """Stride-2 3x3 conv (named ``op`` as in ldm)."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv (named ``conv``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class TimestepEmbedSequential(nn.Sequential):
    """A sequential block that hands the time embedding to ResBlocks and the context to transformers."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


def _heads(cfg: UNetConfig, ch: int) -> tuple[int, int]:
    """(num_heads, dim_head) for a block of ``ch`` channels."""
    if cfg.num_head_channels == -1:
        return cfg.num_heads, ch // cfg.num_heads
    return ch // cfg.num_head_channels, cfg.num_head_channels


def _transformer(cfg: UNetConfig, ch: int) -> SpatialTransformer:
    heads, dim_head = _heads(cfg, ch)
    return SpatialTransformer(ch, heads, dim_head, cfg.transformer_depth, cfg.context_dim, cfg.norm_groups)


def build_encoder(cfg: UNetConfig) -> tuple[nn.ModuleList, nn.Module, list[int]]:
    """The encoder the UNet and the ControlNet share: input_blocks 0..11 and middle_block.

    Returns (input_blocks, middle_block, channels after each input block) -- the last list sizes the
    skips (UNet) and the zero convs (ControlNet).
    """
    emb_ch, mc, g = 4 * cfg.model_channels, cfg.model_channels, cfg.norm_groups
    blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
    chans, ch, ds = [mc], mc, 1
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks):
            layers: list[nn.Module] = [ResBlock(ch, emb_ch, mc * mult, g)]
            ch = mc * mult
            if ds in cfg.attention_resolutions:
                layers.append(_transformer(cfg, ch))
            blocks.append(TimestepEmbedSequential(*layers))
            chans.append(ch)
        if level != len(cfg.channel_mult) - 1:
            blocks.append(TimestepEmbedSequential(Downsample(ch)))
            chans.append(ch)
            ds *= 2
    middle = TimestepEmbedSequential(ResBlock(ch, emb_ch, ch, g), _transformer(cfg, ch), ResBlock(ch, emb_ch, ch, g))
    return blocks, middle, chans


def build_time_embed(model_channels: int) -> nn.Sequential:
    """time_embed: Linear(mc -> 4mc), SiLU, Linear(4mc -> 4mc)."""
    return nn.Sequential(nn.Linear(model_channels, 4 * model_channels), nn.SiLU(),
                         nn.Linear(4 * model_channels, 4 * model_channels))


class ControlledUnet(nn.Module):
    """SD 1.5's UNet with ControlNet residuals: ``unet(x_noisy, timestep, context, controls) -> eps``.

    ``controls`` holds the ControlNet's 13 outputs (already multiplied by the control scales). control12
    is added to the middle block's output, then control11..control0 to the skips, each just before its
    concatenation. The sequence is read, never mutated (the original pops from it).
    """

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg
        self.time_embed = build_time_embed(cfg.model_channels)
        self.input_blocks, self.middle_block, chans = build_encoder(cfg)
        emb_ch, mc, g = 4 * cfg.model_channels, cfg.model_channels, cfg.norm_groups
        ch = mc * cfg.channel_mult[-1]
        ds = 2 ** (len(cfg.channel_mult) - 1)
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers: list[nn.Module] = [ResBlock(ch + chans.pop(), emb_ch, mc * mult, g)]
                ch = mc * mult
                if ds in cfg.attention_resolutions:
                    layers.append(_transformer(cfg, ch))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(GroupNorm32(g, ch), nn.SiLU(), nn.Conv2d(ch, cfg.out_channels, 3, padding=1))

    def forward(self, x_noisy: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
                controls: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        if controls is not None and len(controls) != NUM_CONTROLS:
            raise ValueError(f"controls: expected {NUM_CONTROLS} tensors (control0..control12), got {len(controls)}")
        emb = self.time_embed(timestep_embedding(timestep, self.config.model_channels).to(x_noisy.dtype))
        skips, h = [], x_noisy
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        if controls is not None:
            h = h + controls[-1]
        for i, block in enumerate(self.output_blocks):
            skip = skips.pop()
            if controls is not None:
                skip = skip + controls[len(controls) - 2 - i]                  # control11 .. control0
            h = block(torch.cat([h, skip], dim=1), emb, context)
        return self.out(h)
