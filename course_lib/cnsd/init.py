"""Random weights that test something.

Chapter 1 introduces :func:`randomize_weights`. The original initialises every ``zero_module``'d layer to
zero (the UNet's final conv, each ResBlock's last conv, each proj_out, the ControlNet's zero convs and the
last hint conv), so a freshly built model outputs exactly zero: every parity check between two backends
then passes trivially and timings are taken on zeros. Lessons, tests, exports and benchmarks use this
seeded initializer instead: every parameter gets non-zero values of a scale that keeps activations in a
sensible range through the depth (LeCun-normal weights, small biases, norm gains near one).
"""
from __future__ import annotations

import math

import torch
from torch import nn


@torch.no_grad()
def randomize_weights(model: nn.Module, seed: int = 0) -> nn.Module:
    """Chapter 1: give every parameter of ``model`` seeded non-zero values; returns the model.

    Values are drawn in place on the CPU in parameter order, so a seed gives the same weights anywhere
    (move the model to its device afterwards).
    """
    g = torch.Generator().manual_seed(seed)
    norms = (nn.GroupNorm, nn.LayerNorm)
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if p.device.type != "cpu":
                raise ValueError(f"randomize_weights: parameter on {p.device}; expected the model on the CPU")
            if isinstance(module, norms):
                # gain near 1, shift near 0: statistics stay normalised, yet no value is exactly 0 or 1
                p.normal_(1.0 if name == "weight" else 0.0, 0.1, generator=g)
            elif isinstance(module, nn.Embedding):
                p.normal_(0.0, 0.02, generator=g)                           # CLIP's own init scale
            elif p.ndim >= 2:
                p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()), generator=g)  # LeCun: 1/sqrt(fan_in)
            else:                                                           # biases
                p.normal_(0.0, 0.02, generator=g)
    return model
