"""Where a YOLOv5's weights come from -- Chapter 6.

* :func:`load_yolov5_weights`: a ``state_dict`` trained with ultralytics/yolov5 (``.pt`` or ``.safetensors``),
  loaded strictly and safely (``weights_only=True``);
* :func:`randomize_`: random weights for lessons without a checkpoint, built so that the network behaves
  numerically like a trained one (no chaos, no dead signal, non-trivial BatchNorm statistics).
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from torch import nn

from .model import YOLOv5

_EXPORT_HINT = ("an ultralytics training checkpoint (best.pt / last.pt) pickles the whole model object; inside "
                "the yolov5 repo save its weights with: python -c \"import torch; m = torch.load('best.pt', "
                "weights_only=False)['model']; torch.save(m.float().state_dict(), 'best_state_dict.pt')\" "
                "and load that file")


def load_yolov5_weights(model: YOLOv5, path) -> YOLOv5:
    """Chapter 6: load a yolov5 ``state_dict`` into ``model`` strictly (every key, every shape); returns model.

    ``path``: a file written by ``torch.save(model.state_dict(), path)`` (read with ``weights_only=True``,
    so a file that pickles code or objects is refused) or a ``.safetensors`` file. Load before
    :func:`fuse_conv_bn`. Raises FileNotFoundError, or ValueError naming the first thing that did not fit.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"YOLOv5 weights not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            state = load_file(str(path))
        except Exception as e:
            raise ValueError(f"{path} is not a readable .safetensors file ({e})") from None
    else:
        with path.open("rb") as f:
            magic = f.read(4)
        if not (magic[:1] == b"\x80" or magic == b"PK\x03\x04"):  # a bare pickle, or torch.save's zip
            raise ValueError(f"{path} is neither a file written by torch.save nor a .safetensors file")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            if "Weights only load failed" in str(e):
                why = "it pickles Python objects or code"
            else:  # first line of torch's message, without terminal colour codes
                why = re.sub(r"\x1b\[[0-9;]*m", "", (str(e).strip() or type(e).__name__).splitlines()[0])[:120]
            raise ValueError(f"{path} is not a plain state_dict that torch.load(weights_only=True) accepts "
                             f"({why}); {_EXPORT_HINT}") from None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{path} holds a {type(state).__name__}, expected a state_dict (name -> tensor); "
                         f"{_EXPORT_HINT}")
    own = model.state_dict()
    if not any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        raise ValueError("the model is already fused (fuse_conv_bn); load its weights before fusing")
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise ValueError(f"{path} does not match YOLOv5-{model.config.size} (nc={model.config.nc}): {what}; "
                         f"{len(missing)} missing and {len(unexpected)} unexpected keys in all")
    for k, v in own.items():
        if state[k].shape != v.shape:
            hint = ""
            if k.startswith("model.24.m."):
                hint = f" (the file was trained with nc={state[k].shape[0] // model.model[24].na - 5})"
            raise ValueError(f"{path}: {k} has shape {tuple(state[k].shape)}, the model expects "
                             f"{tuple(v.shape)}{hint}")
    model.load_state_dict(state, strict=True)
    return model


@torch.no_grad()
def randomize_(model: YOLOv5, seed: int = 0) -> YOLOv5:
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
