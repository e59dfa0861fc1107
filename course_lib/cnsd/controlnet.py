"""ControlNet 1.0: a trainable copy of the UNet encoder that turns a canny hint into 13 residuals.

Chapter 1 introduces it. Parameter names follow cldm.cldm.ControlNet (``control_model.*`` in the
checkpoint): time_embed, input_hint_block, input_blocks, zero_convs, middle_block, middle_block_out.
"""
from __future__ import annotations

import torch
from torch import nn

from course_lib.cnsd.config import ControlNetConfig
from course_lib.cnsd.unet import build_encoder, build_time_embed, timestep_embedding


class ZeroConv(nn.Sequential):
    """A 1x1 conv from a block's output to one control (zero-initialised in the paper).

    It reads only ``h``: the original wraps it in a ``TimestepEmbedSequential``, which is why the
    checkpoint calls its weight ``zero_convs.<i>.0.weight``; this one-element Sequential keeps that key.
    """

    def __init__(self, channels: int):
        super().__init__(nn.Conv2d(channels, channels, 1))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self[0](h)


def build_hint_block(cfg: ControlNetConfig) -> nn.Sequential:
    """input_hint_block: 3x3 convs 3->16->16->32(s2)->32->96(s2)->96->256(s2)->model_channels, SiLU between.

    Three stride-2 convs take the H x W hint down to the latent's H/8 x W/8. The last conv is a zero
    conv in the original (indices 0, 2, ..., 14 are convs; the odd ones SiLU).
    """
    chans = (cfg.hint_channels,) + tuple(cfg.hint_block_channels)
    layers: list[nn.Module] = []
    for i, (cin, cout) in enumerate(zip(chans[:-1], chans[1:])):
        stride = 2 if i in (2, 4, 6) else 1                               # 16->32, 32->96, 96->256
        layers += [nn.Conv2d(cin, cout, 3, padding=1, stride=stride), nn.SiLU()]
    layers.append(nn.Conv2d(chans[-1], cfg.model_channels, 3, padding=1))
    return nn.Sequential(*layers)


class ControlNet(nn.Module):
    """``controlnet(x_noisy, hint, timestep, context) -> (control0, ..., control12)``.

    The guided hint is added after input_blocks[0] (conv_in) only; a 1x1 zero conv reads each input
    block's output (control0..control11) and the middle block's (control12).
    """

    def __init__(self, cfg: ControlNetConfig):
        super().__init__()
        self.config = cfg
        self.time_embed = build_time_embed(cfg.model_channels)
        self.input_hint_block = build_hint_block(cfg)
        self.input_blocks, self.middle_block, chans = build_encoder(cfg)
        self.zero_convs = nn.ModuleList(ZeroConv(c) for c in chans)
        self.middle_block_out = ZeroConv(chans[-1])

    def forward(self, x_noisy: torch.Tensor, hint: torch.Tensor, timestep: torch.Tensor,
                context: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if not torch.jit.is_tracing() and hint.shape[-2:] != (x_noisy.shape[-2] * 8, x_noisy.shape[-1] * 8):
            raise ValueError(f"hint {tuple(hint.shape)}: expected 8x the latent's size "
                             f"{(x_noisy.shape[-2] * 8, x_noisy.shape[-1] * 8)}")
        guided_hint = self.input_hint_block(hint)                        # (B, mc, h, w): the hint alone
        return self.controls(x_noisy, guided_hint, timestep, context)

    def controls(self, x_noisy: torch.Tensor, guided_hint: torch.Tensor, timestep: torch.Tensor,
                 context: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The 13 controls from an already computed ``guided_hint = input_hint_block(hint)``.

        The hint block reads only the hint, which is the same at every DDIM step: chapter 3 computes it
        once per image and calls this method at each step.
        """
        emb = self.time_embed(timestep_embedding(timestep, self.config.model_channels).to(x_noisy.dtype))
        outs, h = [], x_noisy
        for i, (block, zero_conv) in enumerate(zip(self.input_blocks, self.zero_convs)):
            h = block(h, emb, context)
            if i == 0:
                h = h + guided_hint
            outs.append(zero_conv(h))
        h = self.middle_block(h, emb, context)
        outs.append(self.middle_block_out(h))
        return tuple(outs)
