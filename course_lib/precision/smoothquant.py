"""SmoothQuant (optional): move activation outliers into the weights before INT8.

Chapter 5 introduces this module. INT8 activations get one scale per tensor, so a few input channels
with large values (outliers, common after LayerNorm in transformers) force a coarse step on every other
channel. SmoothQuant (Xiao et al., 2022) divides each input channel j of a Linear layer by a factor s_j
and multiplies the matching weight column by s_j -- the same function, since ``(x / s) @ (s * W)ᵀ = x @ Wᵀ``
-- with

    s_j = max|x_j| ** alpha / max|W_:,j| ** (1 - alpha)

so the activation's channel ranges shrink towards each other and the weights (quantized per output
channel, where a larger column costs less) take the difference. ``alpha`` 0.5 splits it evenly. The
division by s is free: it folds into the LayerNorm that produces x (its gain and shift are divided by s).

The course's master branch applied alpha 0.5 to the inputs of the attention and feed-forward layers of
every BasicTransformerBlock: norm1 -> attn1.to_q/to_k/to_v, norm2 -> attn2.to_q (k and v read the text,
not norm2), norm3 -> ff.net.0.proj. (Its script passed attn2's to_q again on the feed-forward branch;
here each LayerNorm smooths the layers it really feeds.) Smooth the torch model, then export and
quantize as usual: the ONNX graph is unchanged apart from the weights (:func:`smooth_cnsd` does it to a
copy of a whole CNSD, each sub-model with statistics from its own recorded inputs).

Chapter 4's fused q/k/v layers stay correct: the fused weight is rebuilt from to_q/to_k/to_v when
they change in place, which is how the smoothing changes them.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from course_lib.cnsd.attention import BasicTransformerBlock

# (LayerNorm, the Linear layers it feeds) inside a BasicTransformerBlock, by attribute path
BRANCHES = {"attn1": ("norm1", ("attn1.to_q", "attn1.to_k", "attn1.to_v")),
            "attn2": ("norm2", ("attn2.to_q",)),
            "ff": ("norm3", ("ff.net.0.proj",))}


@torch.no_grad()
def activation_channel_max(model: nn.Module, feeds: Iterable[Mapping], layers: Sequence[str] | None = None
                           ) -> dict[str, torch.Tensor]:
    """Chapter 5: per input channel, the largest |x| each Linear layer of ``model`` saw over ``feeds``.

    Args:
        model: called as ``model(*feed.values())`` (e.g. ``CNSD.positional("controlnet")``).
        feeds: ``{input name: array or tensor}`` dicts in the model's argument order, e.g. a
            :class:`~course_lib.precision.calibration.CalibrationReader`'s ``feeds()``.
        layers: names (as in ``model.named_modules()``) of the Linear layers to watch; default all.
    Returns ``{layer name: float32 tensor (in_features,)}``.
    """
    found: dict[str, torch.Tensor] = {}
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    names = list(linears) if layers is None else list(layers)
    missing = [n for n in names if n not in linears]
    if missing:
        raise ValueError(f"layers {missing[:3]}: not Linear layers of the model (e.g. {next(iter(linears), '-')})")

    def hook(name):
        def record(module, args):
            x = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(dim=0).float().cpu()
            found[name] = x if name not in found else torch.maximum(found[name], x)
        return record

    handles = [linears[n].register_forward_pre_hook(hook(n)) for n in names]
    device = next(model.parameters()).device
    try:
        count = 0
        for feed in (feeds.feeds() if hasattr(feeds, "feeds") else feeds):
            model(*(torch.as_tensor(np.asarray(v)).to(device) for v in feed.values()))
            count += 1
    finally:
        for h in handles:
            h.remove()
    if count == 0:
        raise ValueError("feeds: no inputs; expected at least one sample")
    return found


def smoothing_scales(act_max: torch.Tensor, weights: Sequence[torch.Tensor], alpha: float = 0.5) -> torch.Tensor:
    """Chapter 5: ``s_j = max|x_j| ** alpha / max|W_:,j| ** (1 - alpha)`` over the columns of all ``weights``."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha {alpha}: expected a number in [0, 1] (0.5 in the course)")
    w_max = torch.stack([w.detach().abs().amax(dim=0).float() for w in weights]).amax(dim=0).clamp(min=1e-5)
    return (act_max.float().clamp(min=1e-5) ** alpha / w_max ** (1 - alpha)).clamp(min=1e-5)


@torch.no_grad()
def smooth_layernorm_linears(norm: nn.LayerNorm, linears: Sequence[nn.Linear], act_max: torch.Tensor,
                             alpha: float = 0.5) -> torch.Tensor:
    """Chapter 5: fold SmoothQuant's scales into ``norm`` (gain, shift / s) and ``linears`` (columns * s).

    ``act_max`` is the per-channel max |x| of the norm's output (the linears' common input). The
    function the block computes is unchanged. Returns the scales s.
    """
    if norm.weight is None or norm.weight.numel() != act_max.numel() or \
            any(lin.in_features != act_max.numel() for lin in linears):
        raise ValueError(f"smoothing: the norm and linears must share {act_max.numel()} channels "
                         "(and the norm needs an elementwise gain)")
    s = smoothing_scales(act_max, [lin.weight for lin in linears], alpha).to(norm.weight)
    norm.weight.div_(s)
    if norm.bias is not None:
        norm.bias.div_(s)
    for lin in linears:
        lin.weight.mul_(s.to(lin.weight)[None, :])
    return s


def smooth_transformer_blocks(model: nn.Module, act_max: Mapping[str, torch.Tensor], alpha: float = 0.5,
                              branches: Sequence[str] = tuple(BRANCHES)) -> dict[str, torch.Tensor]:
    """Chapter 5: SmoothQuant on every BasicTransformerBlock of ``model``, in place (the course's recipe).

    ``act_max`` comes from :func:`activation_channel_max` on the same ``model`` (so the names match);
    ``branches``: some of "attn1", "attn2", "ff". Returns ``{first linear's name: scales}`` per smoothed
    group; a block whose statistics are missing raises ValueError.
    """
    bad = [b for b in branches if b not in BRANCHES]
    if bad:
        raise ValueError(f"branches {bad}: expected some of {tuple(BRANCHES)}")
    done = {}
    for name, block in model.named_modules():
        if not isinstance(block, BasicTransformerBlock):
            continue
        for branch in branches:
            norm_name, linear_names = BRANCHES[branch]
            key = f"{name}.{linear_names[0]}"
            if key not in act_max:
                raise ValueError(f"no activation statistics for {key!r}: run activation_channel_max on this model")
            linears = [block.get_submodule(n) for n in linear_names]
            done[key] = smooth_layernorm_linears(getattr(block, norm_name), linears, act_max[key], alpha)
    if not done:
        raise ValueError("the model has no BasicTransformerBlock to smooth")
    return done


def smooth_cnsd(cnsd: nn.Module, feeds: Mapping[str, Iterable[Mapping]], alpha: float = 0.5
                ) -> tuple[nn.Module, dict[str, dict[str, torch.Tensor]]]:
    """Chapter 5: a SmoothQuant copy of a whole CNSD, ready to export and quantize (``cnsd`` is untouched).

    ``feeds``: ``{sub-model name: its recorded inputs}``, e.g. ``{"unet": calib.reader("unet", runs=[0, 1])}``;
    each named sub-model's transformer blocks are smoothed (:func:`smooth_transformer_blocks`) with
    statistics measured on its own feeds. Returns ``(smoothed copy, {name: {layer: scales}})``.
    """
    import copy

    smoothed, scales = copy.deepcopy(cnsd), {}
    for name, model_feeds in feeds.items():
        net = smoothed.positional(name)                   # shares the copy's modules: smoothing is in place
        scales[name] = smooth_transformer_blocks(net, activation_channel_max(net, model_feeds), alpha=alpha)
    return smoothed, scales


def outlier_ratio(channel_max: torch.Tensor) -> float:
    """Chapter 5: largest over median per-channel range: how much one INT8 step is stretched by outliers."""
    channel_max = channel_max.float()
    return float(channel_max.max() / channel_max.median().clamp(min=1e-12))


def plot_channel_ranges(before: torch.Tensor, after: torch.Tensor, title: str = ""):
    """Chapter 5: per-channel max |x| before and after smoothing (bars), and their spread (histogram).

    Returns a matplotlib Figure of a fixed size (10 x 3.5 in), ready for a notebook (PNG).
    """
    import matplotlib.pyplot as plt

    fig, (bars, hist) = plt.subplots(1, 2, figsize=(10, 3.5))
    channels = np.arange(before.numel())
    for values, label in ((before, "before"), (after, "after")):
        bars.bar(channels, values.numpy(), width=1.0, alpha=0.6,
                 label=f"{label} (max/median {outlier_ratio(values):.1f})")
    bars.set(xlabel="input channel", ylabel="max |x|", title=title or "per-channel activation range")
    bars.legend()
    edges = np.logspace(np.log10(max(min(before.min(), after.min()).item(), 1e-6)),
                        np.log10(max(before.max(), after.max()).item()), 30)
    hist.hist([before.numpy(), after.numpy()], bins=edges, label=["before", "after"])
    hist.set(xscale="log", xlabel="max |x| of a channel", ylabel="channels", title="spread of channel ranges")
    hist.legend()
    fig.tight_layout()
    return fig


__all__ = ["BRANCHES", "activation_channel_max", "outlier_ratio", "plot_channel_ranges", "smooth_cnsd",
           "smooth_layernorm_linears", "smooth_transformer_blocks", "smoothing_scales"]
