"""CNSD: the four sub-models under one roof, and their positional (export-ready) forms.

Chapter 1 introduces :func:`build_cnsd` and :class:`CNSD`.
"""
from __future__ import annotations

import torch
from torch import nn

from course_lib.cnsd.attention import SpatialTransformer
from course_lib.cnsd.clip import CLIPEmbeddings, CLIPTextModel
from course_lib.cnsd.config import CNSDConfig
from course_lib.cnsd.contract import MODEL_NAMES, NUM_CONTROLS
from course_lib.cnsd.controlnet import ControlNet
from course_lib.cnsd.init import randomize_weights
from course_lib.cnsd.unet import ControlledUnet, ResBlock
from course_lib.cnsd.vae import VAEDecoder


# the original zero-initialises the ends of residual branches; random weights there are scaled down by this
ZERO_MODULE_SCALE = 0.25


class _Positional(nn.Module):
    """A sub-model whose forward takes the contract's inputs in order and returns a tuple of outputs."""

    def __init__(self, name: str, model: nn.Module):
        super().__init__()
        self.name, self.model = name, model

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.name == "unet":                                   # x_noisy, timestep, context, control0..12
            if len(inputs) != 3 + NUM_CONTROLS:
                raise ValueError(f"unet: expected {3 + NUM_CONTROLS} inputs, got {len(inputs)}")
            return (self.model(inputs[0], inputs[1], inputs[2], inputs[3:]),)
        out = self.model(*inputs)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)


class CNSD(nn.Module):
    """ControlNet + SD 1.5: ``clip``, ``controlnet``, ``unet`` (ControlledUnet), ``vae_decoder``."""

    def __init__(self, config: CNSDConfig):
        super().__init__()
        self.config = config
        self.clip = CLIPTextModel(config.clip)
        self.controlnet = ControlNet(config.controlnet)
        self.unet = ControlledUnet(config.unet)
        self.vae_decoder = VAEDecoder(config.vae)

    def submodule(self, name: str) -> nn.Module:
        """The sub-model behind a contract name: "clip", "controlnet", "unet" or "decoder"."""
        if name not in MODEL_NAMES:
            raise ValueError(f"unknown sub-model {name!r}: expected one of {MODEL_NAMES}")
        return self.vae_decoder if name == "decoder" else getattr(self, name)

    def positional(self, name: str) -> nn.Module:
        """Chapter 1: the sub-model with the contract's positional I/O (what ONNX export and backends call)."""
        return _Positional(name, self.submodule(name)).eval()

    def parameter_counts(self) -> dict[str, int]:
        """Parameters per sub-model (sd15: UNet 859.5M, ControlNet 361.3M, VAE decoder 49.5M, CLIP 123.1M)."""
        return {n: sum(p.numel() for p in self.submodule(n).parameters()) for n in MODEL_NAMES}


def build_cnsd(config: CNSDConfig, seed: int | None = 0) -> CNSD:
    """Chapter 1: build the four sub-models in eval mode.

    ``seed`` (default 0) randomises every weight with :func:`randomize_weights` -- what lessons, tests and
    benchmarks use; ``seed=None`` keeps PyTorch's default init with the original's zero-initialised
    layers, i.e. a model that outputs exactly zero until a checkpoint is loaded.
    """
    if seed is None:
        model = CNSD(config)
        _zero_init_like_original(model)
    else:
        with torch.device("meta"):                      # skip PyTorch's default init: it is overwritten
            model = CNSD(config)
        model = randomize_weights(model.to_empty(device="cpu"), seed)
        with torch.no_grad():                           # small, not zero: like trained zero convs, and the
            for layer in zero_module_layers(model):     # residual stream stays O(1) through the depth
                layer.weight.mul_(ZERO_MODULE_SCALE)
        for m in model.modules():                       # to_empty left the buffers uninitialised too
            if isinstance(m, CLIPEmbeddings):
                m.position_ids.copy_(torch.arange(m.position_ids.shape[1])[None])
    return model.eval()


def zero_module_layers(model: CNSD) -> list[nn.Module]:
    """The layers the original wraps in ``zero_module()``: the ends of residual branches and the
    ControlNet's outputs (UNet ``out.2``, each ResBlock's ``out_layers.3``, each ``proj_out``, the
    ControlNet's ``zero_convs``, ``middle_block_out`` and last hint conv)."""
    layers = [model.unet.out[-1], model.controlnet.input_hint_block[-1], model.controlnet.middle_block_out[0]]
    layers += [zc[0] for zc in model.controlnet.zero_convs]
    for net in (model.unet, model.controlnet):
        for m in net.modules():
            if isinstance(m, ResBlock):
                layers.append(m.out_layers[-1])
            elif isinstance(m, SpatialTransformer):
                layers.append(m.proj_out)
    return layers


@torch.no_grad()
def _zero_init_like_original(model: CNSD) -> None:
    """Zero the layers the original wraps in zero_module(), as a freshly built ldm model has them."""
    for layer in zero_module_layers(model):
        for p in layer.parameters():
            p.zero_()
