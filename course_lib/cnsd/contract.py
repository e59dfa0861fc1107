"""The course's I/O contract for the four CNSD sub-models: tensor names, shapes and dtypes.

Chapter 1 introduces it. One table serves every stage that needs names: the ONNX exporter (input and
output names, dynamic axes), the backends (feeds by tensor name), TensorRT profiles (chapter 2) and the
pipeline. Shapes are given for a batch ``B`` and an image ``H x W`` (the latent is ``H/8 x W/8``).

=========== ============================================================ ===============================
model        inputs                                                       outputs
=========== ============================================================ ===============================
clip         input_ids (B,77) int32                                       last_hidden_state (B,77,C)
controlnet   x_noisy (B,4,h,w), hint (B,3,H,W), timestep (B,) int32,      control0 .. control12
             context (B,77,C)
unet         x_noisy, timestep, context, control0 .. control12            latent (B,4,h,w)
decoder      latent (B,4,h,w) -- already divided by 0.18215               images (B,3,H,W) in [-1, 1]
=========== ============================================================ ===============================
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from course_lib.cnsd.config import CONTEXT_LENGTH, CNSDConfig

MODEL_NAMES = ("clip", "controlnet", "unet", "decoder")
NUM_CONTROLS = 13
CONTROL_NAMES = tuple(f"control{i}" for i in range(NUM_CONTROLS))


@dataclass(frozen=True)
class TensorSpec:
    """One named tensor of a model's interface. ``axes`` names each dimension (for dynamic axes)."""
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    axes: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.name} {tuple(self.shape)} {str(self.dtype).replace('torch.', '')}"


@dataclass(frozen=True)
class ModelContract:
    """Inputs and outputs of one sub-model, in the order its forward takes and returns them."""
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]


def control_shapes(config: CNSDConfig, batch: int, height: int, width: int) -> list[tuple[int, ...]]:
    """Shapes of the 13 control residuals: one per ControlNet input block, then the middle block."""
    c = config.controlnet
    h, w = height // 8, width // 8
    shapes = [(batch, c.model_channels, h, w)]                         # after conv_in (input_blocks[0])
    for level, mult in enumerate(c.channel_mult):
        shapes += [(batch, c.model_channels * mult, h, w)] * c.num_res_blocks
        if level != len(c.channel_mult) - 1:
            h, w = (h + 1) // 2, (w + 1) // 2                          # stride-2 conv, padding 1
            shapes.append((batch, c.model_channels * mult, h, w))
    shapes.append((batch, c.model_channels * c.channel_mult[-1], h, w))  # middle_block_out
    return shapes


def _scaled(axis: str, ratio: int) -> str:
    return axis if ratio == 1 else f"{axis}/{ratio}"


def check_image_size(height: int, width: int) -> None:
    """Images must be multiples of 64 pixels (the latent is downsampled three more times by 2)."""
    if height <= 0 or width <= 0 or height % 64 or width % 64:
        raise ValueError(f"image size {height}x{width}: expected positive multiples of 64 (e.g. 256x384)")


def contracts(config: CNSDConfig, batch: int = 1, height: int = 256, width: int = 384) -> dict[str, ModelContract]:
    """Chapter 1: the four models' contracts at one batch size and image size (H x W pixels)."""
    check_image_size(height, width)
    if batch < 1:
        raise ValueError(f"batch {batch}: expected a positive integer")
    f32, i32 = torch.float32, torch.int32
    h, w = height // 8, width // 8
    ctx_dim = config.clip.hidden_size
    latent_axes = ("B", "C", "h", "w")
    x_noisy = TensorSpec("x_noisy", (batch, config.unet.in_channels, h, w), f32, latent_axes)
    timestep = TensorSpec("timestep", (batch,), i32, ("B",))
    context = TensorSpec("context", (batch, CONTEXT_LENGTH, ctx_dim), f32, ("B", "T", "C"))
    hint = TensorSpec("hint", (batch, config.controlnet.hint_channels, height, width), f32, ("B", "C", "H", "W"))
    controls = tuple(
        TensorSpec(name, shape, f32, ("B", "C", _scaled("h", h // shape[2]), _scaled("w", w // shape[3])))
        for name, shape in zip(CONTROL_NAMES, control_shapes(config, batch, height, width))
    )
    return {
        "clip": ModelContract("clip", (TensorSpec("input_ids", (batch, CONTEXT_LENGTH), i32, ("B", "T")),),
                              (TensorSpec("last_hidden_state", (batch, CONTEXT_LENGTH, ctx_dim), f32, ("B", "T", "C")),)),
        "controlnet": ModelContract("controlnet", (x_noisy, hint, timestep, context), controls),
        "unet": ModelContract("unet", (x_noisy, timestep, context) + controls,
                              (TensorSpec("latent", (batch, config.unet.out_channels, h, w), f32, latent_axes),)),
        "decoder": ModelContract("decoder",
                                 (TensorSpec("latent", (batch, config.vae.z_channels, h, w), f32, latent_axes),),
                                 (TensorSpec("images", (batch, config.vae.out_ch, height, width), f32, ("B", "C", "H", "W")),)),
    }


def example_inputs(contract: ModelContract, seed: int = 0, vocab_size: int = 49408) -> dict[str, torch.Tensor]:
    """Chapter 1: random inputs that follow a contract (seeded), for parity checks and timing.

    Float inputs are standard normal (the hint is uniform in [0, 1], like a canny map); ``timestep`` is
    drawn from 0..999 and ``input_ids`` from the vocabulary.
    """
    g = torch.Generator().manual_seed(seed)
    feed = {}
    for spec in contract.inputs:
        if spec.name == "timestep":
            feed[spec.name] = torch.randint(0, 1000, spec.shape, generator=g, dtype=torch.int32)
        elif spec.name == "input_ids":
            feed[spec.name] = torch.randint(0, vocab_size, spec.shape, generator=g, dtype=torch.int32)
        elif spec.name == "hint":
            feed[spec.name] = torch.rand(spec.shape, generator=g)
        else:
            feed[spec.name] = torch.randn(spec.shape, generator=g)
    return feed
