"""The toy model's weights: written in control_sd15_canny.pth's layout, shipped in the package, loaded back.

Chapter 1 introduces :func:`load_toy`. The file holds every tensor the real checkpoint holds, under the
same names (``model.diffusion_model.*``, ``control_model.*``, ``first_stage_model.{encoder,decoder,
quant_conv,post_quant_conv}.*``, ``cond_stage_model.transformer.text_model.*`` with its position_ids,
and the 13 DDPM schedule buffers), so :func:`~course_lib.cnsd.checkpoint.load_checkpoint` reads it as
it reads the real one and reports the same unused groups. Its JSON card says how it was made.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import torch

from course_lib.cnsd.checkpoint import checkpoint_state, load_checkpoint
from course_lib.cnsd.config import get_config
from course_lib.cnsd.model import CNSD, build_cnsd
from course_lib.cnsd.tokenizer import CLIPTokenizer, byte_level_tokenizer
from course_lib.files import atomic_path
from course_lib.pipeline.sampler import LINEAR_END, LINEAR_START, NUM_TRAIN_STEPS
from course_lib.toy.vae_encoder import VAEEncoder

DATA_DIR = Path(__file__).resolve().parents[1] / "data"
WEIGHTS_NAME, CARD_NAME = "cnsd_toy.safetensors", "cnsd_toy.json"
TOY_WEIGHTS, TOY_CARD = DATA_DIR / WEIGHTS_NAME, DATA_DIR / CARD_NAME
RETRAIN = "python -m course_lib train-toy --device cuda --out DIR"
ENCODER_PREFIXES = {"encoder.": "first_stage_model.encoder.", "quant_conv.": "first_stage_model.quant_conv."}
POSITION_IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"


def toy_tokenizer() -> CLIPTokenizer:
    """Chapter 1: the toy's tokenizer: byte-level, BOS 512 / EOS 513 (a 514-token vocabulary)."""
    return byte_level_tokenizer(compact=True)


def ddpm_buffers(num_train_steps: int = NUM_TRAIN_STEPS) -> dict[str, torch.Tensor]:
    """The 13 schedule buffers ldm's DDPM registers (float64 maths, stored float32), as in the real file."""
    betas = np.linspace(LINEAR_START ** 0.5, LINEAR_END ** 0.5, num_train_steps, dtype=np.float64) ** 2
    alphas = 1.0 - betas
    acp = np.cumprod(alphas)
    acp_prev = np.append(1.0, acp[:-1])
    posterior_variance = betas * (1.0 - acp_prev) / (1.0 - acp)
    values = {
        "betas": betas, "alphas_cumprod": acp, "alphas_cumprod_prev": acp_prev,
        "sqrt_alphas_cumprod": np.sqrt(acp), "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - acp),
        "log_one_minus_alphas_cumprod": np.log(1.0 - acp), "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / acp),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / acp - 1), "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": np.log(np.maximum(posterior_variance, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(acp_prev) / (1.0 - acp),
        "posterior_mean_coef2": (1.0 - acp_prev) * np.sqrt(alphas) / (1.0 - acp),
        "logvar": np.zeros(num_train_steps),
    }
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in values.items()}


def toy_checkpoint_state(cnsd: CNSD, encoder: VAEEncoder) -> dict[str, torch.Tensor]:
    """Every tensor of the real checkpoint's layout: the four sub-models, the VAE encoder, position_ids
    and the DDPM buffers, on the CPU, contiguous, float32 (position_ids int64)."""
    state = checkpoint_state(cnsd)
    for key, t in encoder.state_dict().items():
        prefix = next(p for p in ENCODER_PREFIXES if key.startswith(p))
        state[ENCODER_PREFIXES[prefix] + key[len(prefix):]] = t
    state[POSITION_IDS] = torch.arange(cnsd.config.clip.max_position_embeddings, dtype=torch.int64)[None]
    state.update(ddpm_buffers())
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32"}


def save_safetensors(state: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write ``state`` as a .safetensors file, atomically: with the safetensors package where installed,
    else with this writer of the same format (8-byte header size, JSON header, raw little-endian data)."""
    path = Path(path)
    try:
        from safetensors.torch import save_file
    except ImportError:
        save_file = None
    with atomic_path(path, suffix=".safetensors") as tmp:
        if save_file is not None:
            save_file(state, str(tmp), metadata=metadata)
            return path
        header: dict = {"__metadata__": dict(metadata)} if metadata else {}
        blobs, offset = [], 0
        for name in sorted(state):
            t = state[name]
            if t.dtype not in _DTYPES:
                raise ValueError(f"tensor {name}: dtype {t.dtype} has no safetensors code here")
            data = t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()   # the host is little-endian
            header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
            blobs.append(data)
            offset += len(data)
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)                                         # data starts 8-byte aligned
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(text)) + text)
            for blob in blobs:
                f.write(blob)
    return path


def weights_status(path: str | Path = TOY_WEIGHTS) -> str:
    """Chapter 1: one line: where the toy's weights are and what they score, or that they are not there yet."""
    path = Path(path)
    if not path.is_file():
        return (f"toy weights not there yet: {path} is made by `{RETRAIN}` (issue #18); "
                "until then lessons run the random tiny preset")
    card_path = path.with_name(CARD_NAME)
    shown = f"course_lib/data/{path.name}" if path.resolve() == TOY_WEIGHTS.resolve() else str(path)
    line = f"toy weights: {shown} ({path.stat().st_size / 1e6:.1f} MB)"
    if card_path.is_file():
        trained = json.loads(card_path.read_text()).get("evaluation", {}).get("trained", {})
        if trained:
            line += (f", edge F1 {trained['edge_f1']:.2f}, colour accuracy {trained['colour_accuracy']:.0%} "
                     f"({trained['n']} held-out scenes, {trained['ddim_steps']} DDIM steps, CFG {trained['scale']:g})")
    return line


def load_toy(path: str | Path = TOY_WEIGHTS, device: str | torch.device = "cpu") -> CNSD:
    """Chapter 1: the trained toy CNSD (eval mode) from the package's weights (or ``path``).

    Raises FileNotFoundError with one line (see :func:`weights_status`) while the weights are not there.
    Use it with :func:`toy_tokenizer` and 64x64 images: ``Canny2Image.from_torch(load_toy(), toy_tokenizer())``.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(weights_status(path))
    model = build_cnsd(get_config("toy"), seed=None)
    load_checkpoint(path, model)
    return model.to(device).eval()


def load_toy_encoder(path: str | Path = TOY_WEIGHTS) -> VAEEncoder:
    """The toy's VAE encoder (image -> latent), which canny2image never needs, from the same file."""
    from course_lib.cnsd.checkpoint import read_state_dict

    state = read_state_dict(path)
    back = {v: k for k, v in ENCODER_PREFIXES.items()}
    own = {back[p] + k[len(p):]: t for k, t in state.items() for p in back if k.startswith(p)}
    encoder = VAEEncoder(get_config("toy").vae)
    encoder.load_state_dict(own, strict=True)
    return encoder.eval()
