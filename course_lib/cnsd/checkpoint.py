"""Loading control_sd15_canny.pth (or a .safetensors twin) into the course's modules, by name.

Chapter 1 introduces it. The checkpoint keeps the original ControlLDM layout:

==========================================  =======================  =======
checkpoint prefix                           course module            tensors
==========================================  =======================  =======
model.diffusion_model.*                     cnsd.unet                686
control_model.*                             cnsd.controlnet          340
first_stage_model.decoder.*, post_quant_*   cnsd.vae_decoder         140
cond_stage_model.transformer.*              cnsd.clip                197
first_stage_model.encoder.*, quant_conv.*   (not used: reported)     108
betas, alphas_cumprod, ... (13 buffers)     (not used: reported)      13
==========================================  =======================  =======

Loading is strict for what the course uses: a needed key that is missing or has the wrong shape is an
error naming it. Keys the course doesn't use are counted in the report, never silently dropped.
"""
from __future__ import annotations

import pickle
import pickletools
import re
import warnings
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

# checkpoint prefix -> attribute of CNSD (the prefix is replaced by the attribute's name)
PREFIXES = {
    "model.diffusion_model.": "unet.",
    "control_model.": "controlnet.",
    "first_stage_model.post_quant_conv.": "vae_decoder.post_quant_conv.",
    "first_stage_model.decoder.": "vae_decoder.decoder.",
    "cond_stage_model.transformer.": "clip.",
}
# in the file, not used by the course (with the reason shown in the report)
UNUSED = {
    "first_stage_model.encoder.": "VAE encoder (canny2image never encodes an image)",
    "first_stage_model.quant_conv.": "VAE encoder's quant_conv",
    "cond_stage_model.transformer.text_model.embeddings.position_ids": "position_ids (recomputed; a non-persistent buffer)",
}
DDPM_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar",
)


@dataclass
class LoadReport:
    """What a checkpoint load did: tensors loaded per sub-model, and what was in the file but not used."""
    path: str
    loaded: dict[str, int] = field(default_factory=dict)
    unused: dict[str, int] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"checkpoint {self.path}"]
        lines += [f"  loaded  {n:>5}  {name}" for name, n in self.loaded.items()]
        lines += [f"  unused  {n:>5}  {why}" for why, n in self.unused.items()]
        return "\n".join(lines)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Chapter 1: the tensors of a .pth/.ckpt (torch.load, weights_only) or .safetensors file, on the CPU.

    A file wrapping everything in a ``"state_dict"`` key is unwrapped. A pickle that carries code is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path}: no such file (expected control_sd15_canny.pth or a .safetensors file)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            state = load_file(str(path), device="cpu")
        except Exception as e:  # safetensors raises its own error types  # noqa: BLE001
            raise ValueError(f"checkpoint {path}: not a readable .safetensors file ({e})") from None
    else:
        try:
            with warnings.catch_warnings():        # torch's notes on pickle protocols: the refusal says it all
                warnings.filterwarnings("ignore", module=r"torch\._weights_only_unpickler")
                warnings.filterwarnings("ignore", message=r".*(weights_only|pickle protocol)")
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
        except pickle.UnpicklingError as e:
            raise ValueError(f"checkpoint {path}: refused to unpickle it -- it is not plain tensors, it calls "
                             f"{_refused_callable(path, str(e))} (torch.load weights_only=True)") from None
        except Exception as e:  # torch.load fails in many ways on a file that isn't a checkpoint  # noqa: BLE001
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"checkpoint {path}: not a PyTorch checkpoint ({first[:160]})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"checkpoint {path}: expected a dict of tensors (a state_dict), got {type(state).__name__}")
    return state


def _refused_callable(path: Path, message: str) -> str:
    """What a refused pickle would have called (e.g. ``posix.system``), from torch's message or, failing
    that, from the pickle's opcodes (read, never run)."""
    found = re.search(r"GLOBAL (\S+)", message) or re.search(r"Unsupported global: (\S+)", message)
    if found:
        return found.group(1).rstrip(".,:")
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                name = next((n for n in zf.namelist() if n.endswith("data.pkl")), None)
                data = zf.read(name)[:2**24] if name else b""
        else:
            with open(path, "rb") as f:
                data = f.read(2**24)
        strings, names = [], []
        for op, arg, _ in pickletools.genops(data):
            if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"):
                strings.append(str(arg))
            elif op.name == "GLOBAL":
                names.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.append(f"{strings[-2]}.{strings[-1]}")
        odd = [n for n in names if not n.startswith(("torch.", "collections.OrderedDict"))]
        return ", ".join(dict.fromkeys(odd)) or "a function torch does not allow"
    except Exception:  # a truncated or odd pickle: name nothing rather than fail here  # noqa: BLE001
        return "a function torch does not allow"


def to_course_names(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], Counter]:
    """Rename checkpoint keys to CNSD's (``model.diffusion_model.x`` -> ``unet.x``).

    Returns (renamed tensors, Counter of unused keys by reason). A key matching no known prefix is an error.
    """
    renamed, unused, unknown = {}, Counter(), []
    for key, tensor in state.items():
        reason = next((why for p, why in UNUSED.items() if key.startswith(p)), None)
        if reason is None and key in DDPM_BUFFERS:
            reason = "DDPM schedule buffers (the sampler computes its own)"
        if reason is not None:
            unused[reason] += 1
            continue
        prefix = next((p for p in PREFIXES if key.startswith(p)), None)
        if prefix is None:
            unknown.append(key)
            continue
        renamed[PREFIXES[prefix] + key[len(prefix):]] = tensor
    if unknown:
        raise ValueError(f"checkpoint has {len(unknown)} keys of no known sub-model, e.g. {unknown[0]!r}: "
                         "expected the ControlLDM layout (model.diffusion_model.*, control_model.*, ...)")
    return renamed, unused


@torch.no_grad()
def load_checkpoint(path: str | Path, cnsd: torch.nn.Module) -> LoadReport:
    """Chapter 1: load a ControlNet-SD1.5 checkpoint into ``cnsd`` (a :class:`~course_lib.cnsd.CNSD`).

    Raises ValueError naming the first missing, unexpected or mis-shaped key. Tensors are cast to the
    model's dtype. Returns a :class:`LoadReport`.
    """
    state, unused = to_course_names(read_state_dict(path))
    load_state(cnsd, state)
    loaded = Counter(k.split(".", 1)[0] for k in state)
    return LoadReport(str(path), dict(loaded), dict(unused))


def load_state(cnsd: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy course-named tensors into ``cnsd`` after checking names and shapes (all-or-nothing)."""
    own = cnsd.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} tensors the model needs, e.g. "
                         f"{_original_name(missing[0])!r}")
    if unexpected:
        raise ValueError(f"checkpoint has {len(unexpected)} tensors this model doesn't have, e.g. "
                         f"{_original_name(unexpected[0])!r} (a different config?)")
    for k, t in state.items():
        if t.shape != own[k].shape:
            raise ValueError(f"checkpoint tensor {_original_name(k)!r} has shape {tuple(t.shape)}, the model "
                             f"expects {tuple(own[k].shape)} (wrong config for this checkpoint?)")
    cnsd.load_state_dict(state, strict=True)


def checkpoint_state(cnsd: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Chapter 1: the model's tensors under the original checkpoint names (the inverse of loading)."""
    back = {v: k for k, v in PREFIXES.items()}
    out = {}
    for k, t in cnsd.state_dict().items():
        prefix = next(p for p in back if k.startswith(p))
        out[back[prefix] + k[len(prefix):]] = t
    return out


def _original_name(course_key: str) -> str:
    back = {v: k for k, v in PREFIXES.items()}
    prefix = next((p for p in back if course_key.startswith(p)), None)
    return course_key if prefix is None else back[prefix] + course_key[len(prefix):]
