"""Export the four CNSD sub-models to ONNX with the course's names, and check each against torch.

Chapter 1 introduces :func:`export_cnsd` and :func:`check_exports` (what ``python -m course_lib export``
runs). Files: ``clip.onnx``, ``controlnet.onnx``, ``unet.onnx`` (+ ``unet.onnx.data`` for sd15: the fp32
UNet is ~3.4 GB, over protobuf's 2 GB limit) and ``decoder.onnx``, each with a ``.json`` sidecar. One
export holds the folder's lock and gives every sidecar the same run id (:mod:`course_lib.onnx.folder`).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from course_lib.onnx.compare import ComparisonTable, check_onnx_against_torch
from course_lib.onnx.export import ExportResult, dynamic_axes_from_names, export_onnx
from course_lib.onnx.folder import export_lock, new_run_id
from course_lib.cnsd.contract import MODEL_NAMES, ModelContract, contracts, example_inputs

DYNAMIC_CHOICES = ("B", "H", "W", "h", "w")  # batch, image height/width, latent height/width


def _models(models: Iterable[str] | None) -> list[str]:
    models = list(MODEL_NAMES if models is None else models)
    unknown = [m for m in models if m not in MODEL_NAMES]
    if unknown or not models:
        raise ValueError(f"models {unknown or models}: expected some of {MODEL_NAMES}")
    return models


def dynamic_axes(contract: ModelContract, dynamic: Iterable[str]) -> dict[str, dict[int, str]] | None:
    """Chapter 1: torch ``dynamic_axes`` for a contract; ``dynamic`` names axes, e.g. ``{"B"}``.

    Asking for the image size ("H"/"W") makes the latent ("h"/"w") dynamic too, since one follows the other.
    """
    wanted = set(dynamic)
    bad = wanted - set(DYNAMIC_CHOICES)
    if bad:
        raise ValueError(f"dynamic axes {sorted(bad)}: expected some of {DYNAMIC_CHOICES}")
    wanted |= {a.lower() for a in wanted if a in "HW"} | {a.upper() for a in wanted if a in "hw"}
    if not wanted:
        return None
    specs = contract.inputs + contract.outputs
    present = {a.split("/")[0] for s in specs for a in s.axes}
    return dynamic_axes_from_names(specs, wanted & present) or None


def export_cnsd(cnsd: torch.nn.Module, out_dir: str | Path, *, batch: int = 1, height: int = 256, width: int = 384,
                dynamic: Iterable[str] = (), models: Sequence[str] | None = None, opset: int = 18,
                progress: bool = True) -> dict[str, ExportResult]:
    """Chapter 1: export the CNSD sub-models to ``out_dir/<name>.onnx`` (static shapes unless ``dynamic``).

    Returns ``{name: ExportResult}``. Inputs are seeded random tensors of the contract's shapes. The
    folder is locked while the models are written (a second export into it is a ValueError) and their
    sidecars share one run id, so a folder mixing two exports is caught later (``check_export_folder``).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} is an existing file: expected a folder (it is created if missing)")
    table = contracts(cnsd.config, batch, height, width)
    names = _models(models)
    device = next(cnsd.parameters()).device
    results, run_id = {}, new_run_id()
    with export_lock(out_dir):
        for name in names:
            contract = table[name]
            feed = example_inputs(contract, seed=0, vocab_size=cnsd.config.clip.vocab_size)
            results[name] = export_onnx(
                cnsd.positional(name), {k: v.to(device) for k, v in feed.items()},
                out_dir / f"{name}.onnx", output_names=contract.output_names, opset=opset,
                dynamic_axes=dynamic_axes(contract, dynamic), progress=progress, run_id=run_id)
    return results


def check_exports(cnsd: torch.nn.Module, out_dir: str | Path, *, batch: int = 1, height: int = 256, width: int = 384,
                  models: Sequence[str] | None = None, seed: int = 1, rtol: float = 1e-3, atol: float = 1e-5,
                  providers: Sequence[str] | None = None) -> ComparisonTable:
    """Chapter 1: run each exported model in ONNX Runtime and in torch on the same (fresh) inputs.

    One row per (model, output): max abs / rel error, allclose(rtol, atol), NaN/Inf. The inputs use a
    different seed from the export's, so a graph that baked an input in as a constant is caught.
    """
    out_dir = Path(out_dir)
    table = contracts(cnsd.config, batch, height, width)
    tables = {}
    device = next(cnsd.parameters()).device
    with export_lock(out_dir, exclusive=False):          # no export may write while the files are read
        for name in _models(models):
            feed = example_inputs(table[name], seed=seed, vocab_size=cnsd.config.clip.vocab_size)
            feed = {k: v.to(device) for k, v in feed.items()}
            tables[name] = check_onnx_against_torch(cnsd.positional(name), out_dir / f"{name}.onnx", feed,
                                                    rtol=rtol, atol=atol, providers=providers)
    return ComparisonTable.combine(tables, title=f"ONNX Runtime vs torch, batch {batch}, {height}x{width}")
