"""Where a YOLOv5's weights come from -- Chapter 6.

* :func:`load_yolov5_weights`: a ``state_dict`` trained with ultralytics/yolov5 (``.pt`` or ``.safetensors``),
  loaded strictly and safely (``weights_only=True``);
* :func:`randomize_`: random weights for lessons without a checkpoint, built so that the network behaves
  numerically like a trained one (no chaos, no dead signal, non-trivial BatchNorm statistics).
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from course_lib.yolov5.model import YOLOv5

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
