"""Hyperparameters of the four CNSD sub-models, named as in ControlNet's cldm_v15.yaml.

Chapter 1 introduces these. Each dataclass carries the field names of the original config file, so a
cldm-style config maps over one to one, e.g. ``UNetConfig(**yaml["model"]["params"]["unet_config"]["params"])``
(unknown keys such as ``use_checkpoint`` are ignored by :func:`from_yaml_params`).

Three presets:

* ``sd15`` -- the real sizes (UNet 859.5M, ControlNet 361.3M, VAE decoder 49.5M, CLIP text 123.1M params);
* ``tiny`` -- the same topology with small widths, random-initialised, for CPU lessons and CI;
* ``toy``  -- the same topology, smaller still, with trained weights shipped in the package
  (:mod:`course_lib.toy`: 64x64 images of coloured shapes that follow the hint's edges).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

LATENT_SCALE = 0.18215  # first_stage_model scale_factor: the decoder sees latent / 0.18215
CONTEXT_LENGTH = 77     # CLIP tokens per prompt


@dataclass(frozen=True)
class UNetConfig:
    """ControlledUnetModel / UNetModel hyperparameters (cldm_v15.yaml ``unet_config``)."""
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    attention_resolutions: tuple[int, ...] = (4, 2, 1)
    num_res_blocks: int = 2
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_heads: int = 8
    num_head_channels: int = -1        # -1: derive from num_heads (dim_head = channels // num_heads)
    transformer_depth: int = 1
    context_dim: int = 768
    use_spatial_transformer: bool = True
    legacy: bool = False
    norm_groups: int = 32              # GroupNorm(32, ...) everywhere in ldm


@dataclass(frozen=True)
class ControlNetConfig(UNetConfig):
    """ControlNet hyperparameters (cldm_v15.yaml ``control_stage_config``): the UNet encoder + a hint input."""
    hint_channels: int = 3
    hint_block_channels: tuple[int, ...] = (16, 16, 32, 32, 96, 96, 256)  # before the last conv to model_channels


@dataclass(frozen=True)
class VAEConfig:
    """AutoencoderKL decoder hyperparameters (cldm_v15.yaml ``first_stage_config.ddconfig``)."""
    embed_dim: int = 4
    z_channels: int = 4
    in_channels: int = 3                     # the encoder's input (the toy trains the encoder too)
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = ()   # only the mid block has attention in SD's VAE
    resolution: int = 256
    norm_groups: int = 32


@dataclass(frozen=True)
class CLIPTextConfig:
    """openai/clip-vit-large-patch14 text tower, with Hugging Face ``CLIPTextConfig`` field names."""
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = CONTEXT_LENGTH
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    pad_token_id: int = 49407


@dataclass(frozen=True)
class CNSDConfig:
    """The whole model: four sub-model configs under one preset name."""
    name: str
    unet: UNetConfig = field(default_factory=UNetConfig)
    controlnet: ControlNetConfig = field(default_factory=ControlNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    clip: CLIPTextConfig = field(default_factory=CLIPTextConfig)

    def __post_init__(self):
        if self.unet.context_dim != self.clip.hidden_size or self.controlnet.context_dim != self.clip.hidden_size:
            raise ValueError(f"config {self.name!r}: UNet/ControlNet context_dim must equal CLIP hidden_size "
                             f"({self.clip.hidden_size}), got {self.unet.context_dim}/{self.controlnet.context_dim}")
        for c in (self.unet, self.controlnet):
            widths = [c.model_channels * m for m in c.channel_mult]
            if any(w % c.norm_groups for w in widths):
                raise ValueError(f"config {self.name!r}: every width {widths} must be a multiple of "
                                 f"norm_groups={c.norm_groups}")
        for key in ("model_channels", "channel_mult", "num_res_blocks", "attention_resolutions", "num_heads",
                    "num_head_channels", "transformer_depth", "context_dim", "in_channels"):
            if getattr(self.unet, key) != getattr(self.controlnet, key):
                raise ValueError(f"config {self.name!r}: ControlNet.{key} must equal UNet.{key} "
                                 "(the control residuals are added to the UNet's skips)")


def _tiny() -> CNSDConfig:
    unet = dict(model_channels=32, num_heads=2, context_dim=64)
    return CNSDConfig(
        name="tiny",
        unet=UNetConfig(**unet),
        controlnet=ControlNetConfig(**unet),
        vae=VAEConfig(ch=32),
        clip=CLIPTextConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2),
    )


def _toy() -> CNSDConfig:
    """The trained toy (issue #18): tiny's topology sized to ~2.5M parameters (< 10 MB in fp32) for 64x64
    images (8x8 latents). GroupNorm groups of 4 channels at the first level like SD's VAE (SD's UNet has
    10); ids from the compact byte-level tokenizer (vocabulary 514, see ``byte_level_tokenizer``)."""
    unet = dict(model_channels=12, num_heads=2, context_dim=64, norm_groups=3)
    return CNSDConfig(
        name="toy",
        unet=UNetConfig(**unet),
        controlnet=ControlNetConfig(**unet, hint_block_channels=(16, 16, 32, 32, 64, 64, 128)),
        vae=VAEConfig(ch=8, norm_groups=2, resolution=64),
        clip=CLIPTextConfig(vocab_size=514, hidden_size=64, intermediate_size=256, num_hidden_layers=3,
                            num_attention_heads=4, bos_token_id=512, eos_token_id=513, pad_token_id=513),
    )


PRESETS = {"sd15": lambda: CNSDConfig(name="sd15"), "tiny": _tiny, "toy": _toy}


def get_config(name: str) -> CNSDConfig:
    """Chapter 1: the config of a preset, ``"sd15"`` (real sizes), ``"tiny"`` (CPU lessons, CI) or ``"toy"``
    (trained on coloured shapes, :mod:`course_lib.toy`)."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown config {name!r}: expected one of {sorted(PRESETS)}") from None


def from_yaml_params(cls, params: dict):
    """Chapter 1: build one of the config dataclasses from a cldm yaml ``params`` dict, ignoring
    keys the course doesn't use (``use_checkpoint``, ``image_size``, ...). Lists become tuples."""
    names = {f.name for f in dataclasses.fields(cls)}
    kept = {k: tuple(v) if isinstance(v, list) else v for k, v in params.items() if k in names}
    return cls(**kept)
