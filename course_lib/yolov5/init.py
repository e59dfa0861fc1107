"""Chapter 6: random YOLOv5 weights that behave numerically like trained ones (for lessons without weights)."""
from __future__ import annotations

import math

import torch
from torch import nn


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Chapter 6: give ``model`` random weights that behave numerically like trained ones (in place; returns it).

    A random deep network easily becomes chaotic (tiny input changes, or fp16 rounding, blow up) or dead
    (every image gives the same output). This init avoids both:

    * each conv = a random orthogonal mixing of channels spread over its k x k window by a smooth binomial
      kernel, plus a little noise (smooth, like trained filters: pixel noise is not amplified);
    * BN: gamma ~ U(0.8, 1.2), beta ~ U(1.5, 3.0) so SiLU works in its nearly linear range; running mean and
      variance are measured, layer by layer, on four random calibration images (non-trivial statistics);
    * Detect convs: logits scaled to unit spread on those images, objectness biased towards background.
    """
    g = torch.Generator().manual_seed(seed)
    for mod in model.modules():
        if isinstance(mod, nn.Conv2d):
            mix = torch.empty(mod.out_channels, mod.in_channels)
            nn.init.orthogonal_(mix, generator=g)
            k = mod.kernel_size[0]
            taps = torch.tensor([math.comb(k - 1, i) for i in range(k)], dtype=torch.float32)
            blur = torch.outer(taps, taps) / taps.sum() ** 2
            noise = torch.randn(mod.weight.shape, generator=g) * (0.1 / math.sqrt(mod.weight[0].numel()))
            mod.weight.copy_(mix[:, :, None, None] * blur + noise)
        elif isinstance(mod, nn.BatchNorm2d):
            mod.weight.copy_(torch.rand(mod.weight.shape, generator=g) * 0.4 + 0.8)
            mod.bias.copy_(torch.rand(mod.bias.shape, generator=g) * 1.5 + 1.5)

    def calibrate(bn, args):              # runs just before each BN, in eval mode, on what that BN sees
        bn.running_mean.copy_(args[0].mean(dim=(0, 2, 3)))
        var = args[0].var(dim=(0, 2, 3))
        bn.running_var.copy_(var + 0.5 * var.mean() + 1e-4)   # floor: no channel gets a huge gain

    det, head_inputs = model.model[24], []
    hooks = [m.register_forward_pre_hook(calibrate) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    hooks += [conv.register_forward_pre_hook(lambda m, args: head_inputs.append(args[0])) for conv in det.m]
    was_training = model.training
    model.eval()(_calibration_images(g))
    model.train(was_training)
    for h in hooks:
        h.remove()
    for conv, x in zip(det.m, head_inputs):
        logits = nn.functional.conv2d(x, conv.weight)                   # (4, na*no, h, w), before the bias
        k = 1 / logits.std(dim=(0, 2, 3)).clamp_min(1e-6)               # unit spread on the four images
        k.view(det.na, det.no)[:, 2:4] *= 0.5                             # w, h stay near the anchor size
        bias = torch.randn((det.na, det.no), generator=g) * 0.1
        bias[:, 4] -= 4.0                                                # objectness: mostly background
        bias[:, 5:] -= 1.0
        conv.weight.mul_(k.view(-1, 1, 1, 1))
        conv.bias.copy_(bias.view(-1) - logits.mean(dim=(0, 2, 3)) * k)  # centred on the calibration mean
    return model


def _calibration_images(g: torch.Generator, size: int = 192) -> torch.Tensor:
    """Four random images (4, 3, size, size) in [0, 1]: two of pixel noise (high frequencies, where random
    convs respond most) and two of smooth blobs at every scale (low frequencies, like photos)."""
    blobs = torch.zeros(2, 3, size, size)
    for cells in (2, 4, 8, 16, 32):
        noise = torch.rand((2, 3, cells, cells), generator=g)
        blobs += nn.functional.interpolate(noise, size=(size, size), mode="bilinear", align_corners=False)
    lo, hi = blobs.amin(dim=(1, 2, 3), keepdim=True), blobs.amax(dim=(1, 2, 3), keepdim=True)
    return torch.cat([torch.rand((2, 3, size, size), generator=g), (blobs - lo) / (hi - lo)])
